"""
What passive health costs a call: a policy with a ``health:`` section against the
same policy without it.

Usage::

    python benchmarks/bench_health.py [--quick] [--rounds N] [--block-ms MS]

A policy with a ``health:`` section gets the passive-health call observer
(resilient.health): per call, one counter bump and one addition, and the call
takes the pipeline's full path (the observer hook needs it). The function returns
at once, so the figures are the library's own cost, the worst case for the ratio.

Method (as benchmarks/bench_metrics.py): one sample is a block of ``n`` calls
timed with ``perf_counter_ns``; every round times "without" and "with" one after
the other in alternating order; the figure kept is the minimum over rounds.
``gc`` is off while a block runs. The acceptance target is with / without <= 1.1
for the full stacks. The lean rows (breaker only) are for information: without
``health:`` such a policy runs on a fast lane, with it on the full path.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from _blocks import best_of_async, best_of_sync
from _runner import Context, Row

import resilient

TARGET = 1.1

FULL = {
    "retry": {"max_attempts": 3, "base_delay": 0.01},
    "circuit_breaker": {"failure_threshold": 5},
    "rate_limit": {"max_rate": 1e9, "time_period": 1.0},
    "bulkhead": {"max_concurrent_requests": 100},
    "timeout": {"per_attempt": 5.0, "total": 10.0},
}
LEAN = {"circuit_breaker": {"failure_threshold": 5}}
POLICIES = {
    "version": 1,
    "policies": {
        "full": FULL,
        "full_health": {**FULL, "health": {}},
        "lean": LEAN,
        "lean_health": {**LEAN, "health": {}},
    },
}


def _pair_sync(without: Any, with_: Any, rounds: int, block_ms: float) -> tuple[float, float]:
    off, on = best_of_sync((without, with_), rounds, block_ms)
    return off, on


async def _pair_async(
    without: Any, with_: Any, rounds: int, block_ms: float
) -> tuple[float, float]:
    off, on = await best_of_async((without, with_), rounds, block_ms)
    return off, on


def _pair(policy: str) -> tuple[Callable[[], int], Callable[[], int]]:
    return (
        resilient.resilient(policy)(lambda: 1),
        resilient.resilient(f"{policy}_health")(lambda: 1),
    )


def _apair(policy: str) -> tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[int]]]:
    async def one() -> int:
        return 1

    async def two() -> int:
        return 1

    return resilient.resilient(policy)(one), resilient.resilient(f"{policy}_health")(two)


def measure(rounds: int, block_ms: float) -> list[tuple[str, float, float, bool]]:
    """(stack, ns/call without health, ns/call with health, held to the target)."""
    resilient.load_policies(POLICIES)
    return [
        ("full stack, sync", *_pair_sync(*_pair("full"), rounds, block_ms), True),
        (
            "full stack, async",
            *asyncio.run(_pair_async(*_apair("full"), rounds, block_ms)),
            True,
        ),
        ("breaker only, sync", *_pair_sync(*_pair("lean"), rounds, block_ms), False),
        (
            "breaker only, async",
            *asyncio.run(_pair_async(*_apair("lean"), rounds, block_ms)),
            False,
        ),
    ]


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    rounds, block_ms = ctx.pick((15, 50.0), (3, 20.0), (1, 2.0))
    return [
        Row(f"health: on, {name}", on, "ns/call", "without health:", off,
            max_ratio=TARGET if gated else None)
        for name, off, on, gated in measure(rounds, block_ms)
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 ms blocks")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    rounds, block_ms = (3, 20.0) if args.quick else (args.rounds, args.block_ms)

    rows = measure(rounds, block_ms)
    print(
        f"Python {platform.python_version()} on {platform.machine()} "
        f"({platform.system()}), {rounds} rounds of {block_ms:g} ms blocks, min per variant\n"
    )
    print("| stack | without health (ns/call) | with health (ns/call) | with / without | target |")
    print("|---|---:|---:|---:|---|")
    failed = False
    for name, off, on, gated in rows:
        ratio = on / off
        verdict = (f"<= {TARGET} " + ("ok" if ratio <= TARGET else "FAIL")) if gated else "info"
        failed |= gated and ratio > TARGET
        print(f"| {name} | {off:,.0f} | {on:,.0f} | {ratio:.2f}x | {verdict} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""
What Prometheus metrics cost a call: the same decorator stack with metrics on and off.

Usage::

    python benchmarks/bench_metrics.py [--quick] [--rounds N] [--block-ms MS]

The stack is the full pipeline (docs/architecture.md): total timeout -> retry -> circuit
breaker -> rate limiter -> bulkhead -> per-attempt timeout (the sync stack has
no per-attempt timeout, which sync code cannot enforce). The function returns
at once, so the figures are the library's own cost, the worst case for the
ratio. "Metrics on" is ``resilient.metrics.enable(registry=CollectorRegistry())``:
every call increments ``resilient_calls_total`` and observes
``resilient_call_duration_seconds``.

Method (as benchmarks/bench_foundation.py): one sample is a block of ``n``
calls timed with ``perf_counter_ns`` (``n`` calibrated so a block lasts
``--block-ms``); every round times "off" and "on" one after the other in
alternating order; the figure kept is the minimum over rounds (noise only
adds time). ``gc`` is off while a block runs. The acceptance target is
on / off <= 1.25 for the full stacks. The lean rows (breaker only) are for
information: with metrics on, every call takes the pipeline's full path,
which is what the observer hook needs, so there the ratio is larger.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from _blocks import async_block, calls_per_block, sync_block
from _runner import Context, Row
from prometheus_client import CollectorRegistry

import resilient
from resilient import metrics

TARGET = 1.25

POLICIES = {
    "version": 1,
    "policies": {
        "full": {
            "retry": {"max_attempts": 3, "base_delay": 0.01},
            "circuit_breaker": {"failure_threshold": 5},
            "rate_limit": {"max_rate": 1e9, "time_period": 1.0},
            "bulkhead": {"max_concurrent_requests": 100},
            "timeout": {"per_attempt": 5.0, "total": 10.0},
        },
        "lean": {"circuit_breaker": {"failure_threshold": 5}},
    },
}


def _switch(on: bool) -> None:
    if on:
        if metrics.active() is None:
            metrics.enable(registry=CollectorRegistry())
    else:
        metrics.disable()


def _measure_sync(fn: Callable[[], Any], rounds: int, block_ms: float) -> tuple[float, float]:
    for on in (False, True):  # warm up both (pipelines compile at first call)
        _switch(on)
        for _ in range(2000):
            fn()
    n = 1000
    while True:  # calibrate
        per = sync_block(fn, n)
        if per * n >= block_ms * 1e6 / 2:
            break
        n *= 2
    n = calls_per_block(per, block_ms)
    best = {False: float("inf"), True: float("inf")}
    for r in range(rounds):
        for on in (False, True) if r % 2 == 0 else (True, False):
            _switch(on)
            fn()  # rebuild the pipeline for this setting outside the timing
            best[on] = min(best[on], sync_block(fn, n))
        gc.collect()
    _switch(False)
    return best[False], best[True]


async def _measure_async(
    fn: Callable[[], Awaitable[Any]], rounds: int, block_ms: float
) -> tuple[float, float]:
    for on in (False, True):
        _switch(on)
        for _ in range(2000):
            await fn()
    n = 1000
    while True:
        per = await async_block(fn, n)
        if per * n >= block_ms * 1e6 / 2:
            break
        n *= 2
    n = calls_per_block(per, block_ms)
    best = {False: float("inf"), True: float("inf")}
    for r in range(rounds):
        for on in (False, True) if r % 2 == 0 else (True, False):
            _switch(on)
            await fn()
            best[on] = min(best[on], await async_block(fn, n))
        gc.collect()
    _switch(False)
    return best[False], best[True]


def measure(rounds: int, block_ms: float) -> list[tuple[str, float, float, bool]]:
    """(stack, ns/call metrics off, ns/call metrics on, held to the target) per stack."""
    resilient.load_policies(POLICIES)

    @resilient.resilient("full")
    def full_sync() -> int:
        return 1

    @resilient.resilient("full")
    async def full_async() -> int:
        return 1

    @resilient.resilient("lean")
    def lean_sync() -> int:
        return 1

    @resilient.resilient("lean")
    async def lean_async() -> int:
        return 1

    return [
        ("full stack, sync", *_measure_sync(full_sync, rounds, block_ms), True),
        ("full stack, async", *asyncio.run(_measure_async(full_async, rounds, block_ms)), True),
        ("breaker only, sync", *_measure_sync(lean_sync, rounds, block_ms), False),
        ("breaker only, async", *asyncio.run(_measure_async(lean_async, rounds, block_ms)), False),
    ]


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    rounds, block_ms = ctx.pick((15, 50.0), (3, 20.0), (1, 2.0))
    return [
        Row(f"metrics on, {name}", on, "ns/call", "metrics off", off,
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
    print("| stack | metrics off (ns/call) | metrics on (ns/call) | on / off | target |")
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

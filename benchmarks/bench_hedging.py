"""
What hedging buys and costs.

Usage::

    python benchmarks/bench_hedging.py [--quick] [--rounds N] [--block-ms MS]

1. **The tail, in virtual time.** The simulator (``resilient.testing.simulate``) runs
   the real pipeline against a dependency whose latency has a heavy tail (log-normal,
   median 10 ms, p99 1 s: p99 is 100x the median), once without and once with
   ``hedge: {delay: p95}``, with the same seed. Figures: caller p99 and p99.9, and
   the extra load (backend calls per caller call). Targets: p99.9 with hedging
   <= 0.2x without, for <= 10 % extra backend calls.
2. **The success path, in real time.** A call whose first attempt answers before
   the delay, through a policy with ``hedge:`` against the same policy without it.
   The function awaits ``asyncio.sleep(0)`` (one turn of the loop: the least any
   I/O costs), so the figures are the library's overhead next to the cheapest
   possible call. Method as benchmarks/bench_health.py: blocks of ``n`` calls
   timed with ``perf_counter_ns``, "without" and "with" alternating, minimum over
   rounds, ``gc`` off while a block runs. Target: with / without <= 1.3.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from _blocks import best_of_async
from _runner import Context, Row

import resilient
from resilient.testing import Latency, Scenario, simulate
from resilient.testing._scenario import Conditions

TAIL_TARGET = 0.2
LOAD_TARGET = 0.10
SUCCESS_TARGET = 1.3

#: The heavy-tailed dependency: 10 ms median, 1 s p99 (log-normal).
TAIL = Scenario("heavy_tail", Conditions(0.0, Latency(0.01, 1.0)))
HEDGE = {"delay": "p95", "max_delay": 5.0}


def tail(duration: float, rate: float, seed: int = 1) -> dict[str, dict[str, float]]:
    """Caller p99 / p99.9 (ms) and backend calls per call, without and with hedging."""
    plain = resilient.Policy.model_validate({})
    hedged = resilient.Policy.model_validate({"hedge": HEDGE})
    figures = {}
    for label, policy in (("without", plain), ("with", hedged)):
        result = simulate(policy, TAIL, duration=duration, rate=rate, seed=seed, name="dep")
        figures[label] = {
            "p50": result.latency.p50 * 1000,
            "p99": result.latency.p99 * 1000,
            "p999": result.latency.p999 * 1000,
            "load": result.load_amplification,
            "calls": float(result.attempted),
        }
    return figures


STACK = {
    "retry": {"max_attempts": 3, "base_delay": 0.01},
    "circuit_breaker": {"failure_threshold": 5},
    "timeout": {"per_attempt": 5.0, "total": 10.0},
}
POLICIES = {
    "version": 1,
    "policies": {
        "stack": STACK,
        "stack_hedged": {**STACK, "hedge": {"delay": 1.0}},
        # the calls take microseconds, and so would their p95: the floor keeps the
        # delay above them, so that this measures an answer before the delay (with
        # every latency recorded and the quantile kept up to date), not hedging
        "stack_hedged_p95": {**STACK, "hedge": {"delay": "p95", "min_delay": 0.1}},
    },
}


async def _measure(
    without: Callable[[], Awaitable[Any]],
    with_: Callable[[], Awaitable[Any]],
    rounds: int,
    block_ms: float,
) -> tuple[float, float]:
    off, on = await best_of_async((without, with_), rounds, block_ms)
    return off, on


def _guarded(policy: str) -> Callable[[], Awaitable[int]]:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 1

    return resilient.resilient(policy)(answer)


def success_path(rounds: int, block_ms: float) -> list[tuple[str, float, float]]:
    """(case, ns/call without hedge:, ns/call with hedge:)."""
    resilient.load_policies(POLICIES)
    plain = _guarded("stack")
    return [
        (
            "fixed delay (1 s)",
            *asyncio.run(_measure(plain, _guarded("stack_hedged"), rounds, block_ms)),
        ),
        (
            "delay: p95 (latency recorded)",
            *asyncio.run(_measure(plain, _guarded("stack_hedged_p95"), rounds, block_ms)),
        ),
    ]


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    # the tail needs calls: 24,000 even at the tiny scale (about a second of real time)
    duration, rate = ctx.pick((300.0, 200.0), (120.0, 200.0), (120.0, 200.0))
    rounds, block_ms = ctx.pick((15, 50.0), (3, 20.0), (1, 2.0))
    t = tail(duration, rate)
    rows = [
        Row("hedging, caller p99.9 (virtual time)", t["with"]["p999"], "ms",
            "without hedge:", t["without"]["p999"], max_ratio=TAIL_TARGET),
        Row("hedging, caller p99 (virtual time)", t["with"]["p99"], "ms",
            "without hedge:", t["without"]["p99"]),
        Row("hedging, extra backend calls", (t["with"]["load"] - 1) * 100, "%",
            max_value=LOAD_TARGET * 100),
    ]  # fmt: skip
    for case, off, on in success_path(rounds, block_ms):
        rows.append(
            Row(f"hedge: success path, {case}", on, "ns/call", "without hedge:", off,
                max_ratio=SUCCESS_TARGET)
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs and fewer rounds")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    rounds, block_ms = (3, 20.0) if args.quick else (args.rounds, args.block_ms)
    duration, rate = (120.0, 200.0) if args.quick else (300.0, 200.0)

    print(
        f"Python {platform.python_version()} on {platform.machine()} ({platform.system()})\n\n"
        f"Tail: {duration:g} s of virtual time at {rate:g} calls/s, latency log-normal "
        f"(median 10 ms, p99 1 s), hedge: {HEDGE}\n"
    )
    t = tail(duration, rate)
    print("| | p50 (ms) | p99 (ms) | p99.9 (ms) | backend calls per call |")
    print("|---|---:|---:|---:|---:|")
    for label in ("without", "with"):
        f = t[label]
        print(
            f"| {label} hedging | {f['p50']:.1f} | {f['p99']:.1f} | {f['p999']:.1f} "
            f"| {f['load']:.3f} |"
        )
    ratio = t["with"]["p999"] / t["without"]["p999"]
    extra = t["with"]["load"] - 1
    tail_ok = ratio <= TAIL_TARGET and extra <= LOAD_TARGET
    print(
        f"\np99.9 with / without: {ratio:.2f}x (target <= {TAIL_TARGET}), extra backend "
        f"calls: {extra:.1%} (target <= {LOAD_TARGET:.0%}): {'ok' if tail_ok else 'FAIL'}\n"
    )
    print(f"Success path: {rounds} rounds of {block_ms:g} ms blocks, min per variant\n")
    print("| hedge: | without (ns/call) | with (ns/call) | with / without | target |")
    print("|---|---:|---:|---:|---|")
    failed = not tail_ok
    for case, off, on in success_path(rounds, block_ms):
        r = on / off
        failed |= r > SUCCESS_TARGET
        verdict = "ok" if r <= SUCCESS_TARGET else "FAIL"
        print(f"| {case} | {off:,.0f} | {on:,.0f} | {r:.2f}x | <= {SUCCESS_TARGET} {verdict} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

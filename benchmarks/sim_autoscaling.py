"""
The auto-scaling bulkhead against healthy backends, in virtual time.

    python benchmarks/sim_autoscaling.py

Drives the real pipeline with ``resilient.testing.simulate``: 200 calls/s for
60 s through ``bulkhead: {max_concurrent_requests: 10}`` with auto-scaling on
(the default) and off, against the ``healthy`` and ``healthy_noisy`` scenarios,
seeds 0-2, and prints the share of calls the bulkhead rejected and the callers'
p99 latency. docs/bulkheads.md quotes this table.
"""

from __future__ import annotations

from typing import Any

from _runner import Context, Row

import resilient
from resilient import BulkheadConfig
from resilient.testing import healthy, healthy_noisy, simulate


def run(duration: float, seeds: tuple[int, ...]) -> list[tuple[str, int, Any, Any]]:
    """(scenario, seed, result with auto-scaling, result with a fixed limit)."""
    out = []
    for label, scenario in (("healthy", healthy), ("healthy_noisy", healthy_noisy)):
        for seed in seeds:
            rows = []
            for auto in (True, False):
                section = BulkheadConfig(max_concurrent_requests=10, enable_auto_scaling=auto)
                policy = resilient.Policy(bulkhead=section)
                rows.append(simulate(policy, scenario(), duration=duration, rate=200, seed=seed))
            out.append((label, seed, rows[0], rows[1]))
    return out


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    duration, seeds = ctx.pick((60.0, (0, 1, 2)), (20.0, (0,)), (2.0, (0,)))
    rows = []
    for label, seed, scaled, fixed in run(duration, seeds):
        rows.append(
            Row(
                f"auto-scaling bulkhead, {label}, seed {seed}, share rejected",
                100 * scaled.rejected_bulkhead / scaled.attempted,
                "% of calls",
                "fixed limit",
                100 * fixed.rejected_bulkhead / fixed.attempted,
                note=f"virtual time, {duration:g} s at 200/s",
            )
        )
    return rows


def main() -> None:
    print("| backend | seed | rejected, auto-scaling | rejected, fixed | p99 auto | p99 fixed |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, seed, scaled, fixed in run(60.0, (0, 1, 2)):
        print(
            f"| {label} | {seed} "
            f"| {scaled.rejected_bulkhead / scaled.attempted:.1%} "
            f"| {fixed.rejected_bulkhead / fixed.attempted:.1%} "
            f"| {scaled.latency.p99 * 1000:.0f} ms | {fixed.latency.p99 * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    main()

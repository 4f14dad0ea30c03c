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

import resilient
from resilient import BulkheadConfig
from resilient.testing import healthy, healthy_noisy, simulate


def main() -> None:
    print("| backend | seed | rejected, auto-scaling | rejected, fixed | p99 auto | p99 fixed |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, scenario in (("healthy", healthy), ("healthy_noisy", healthy_noisy)):
        for seed in (0, 1, 2):
            rows = []
            for auto in (True, False):
                section = BulkheadConfig(max_concurrent_requests=10, enable_auto_scaling=auto)
                policy = resilient.Policy(bulkhead=section)
                rows.append(simulate(policy, scenario(), duration=60, rate=200, seed=seed))
            scaled, fixed = rows
            print(
                f"| {label} | {seed} "
                f"| {scaled.rejected_bulkhead / scaled.attempted:.1%} "
                f"| {fixed.rejected_bulkhead / fixed.attempted:.1%} "
                f"| {scaled.latency.p99 * 1000:.0f} ms | {fixed.latency.p99 * 1000:.0f} ms |"
            )


if __name__ == "__main__":
    main()

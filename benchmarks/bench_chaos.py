"""
What chaos injection costs a call: off (a ``chaos:`` section, switch off), and on at rate 0.

Usage::

    python benchmarks/bench_chaos.py [--calls N] [--rounds R]

Each pair runs the *same* trivial function through the same policy with and
without a ``chaos:`` section, side by side: every round times each variant in
turn (a block of N calls, ``gc`` off), and the figure kept is the minimum over
the rounds (noise on a shared machine only adds time). The ratio ``with / without``
is what the chaos issue bounds: at most 1.02 while chaos is off.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

import resilient
from resilient import chaos

SECTION = {"chaos": {"failure_modes": ["exception"], "rate": 0.0}}
BASES: dict[str, dict[str, Any]] = {
    "direct (retry)": {"retry": {"max_attempts": 3}},
    "breaker lane": {"circuit_breaker": {}},
    "full (total timeout)": {"retry": {"max_attempts": 3}, "timeout": {"total": 10}},
}


def _policies() -> dict[str, Any]:
    policies: dict[str, Any] = {}
    for index, base in enumerate(BASES.values()):
        policies[f"p{index}"] = base
        policies[f"c{index}"] = {**base, **SECTION}
    return policies


def _sync(name: str) -> Callable[[], int]:
    @resilient.resilient(name)
    def work() -> int:
        return 1

    return work


def _time_sync(fn: Callable[[], int], calls: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        return (time.perf_counter_ns() - start) / calls
    finally:
        gc.enable()


async def _time_async(fn: Callable[[], Any], calls: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for index in range(calls):
            await fn()
            if index % 100 == 0:
                await asyncio.sleep(0)
        return (time.perf_counter_ns() - start) / calls
    finally:
        gc.enable()


def _async(name: str) -> Callable[[], Any]:
    @resilient.resilient(name)
    async def work() -> int:
        return 1

    return work


def measure(calls: int, rounds: int) -> list[tuple[str, str, float, float]]:
    """``(case, form, ns without the section, ns with it)`` for each case and form."""
    resilient.load_policies({"version": 1, "policies": _policies()})
    rows = []
    for index, case in enumerate(BASES):
        plain_s, section_s = _sync(f"p{index}"), _sync(f"c{index}")
        plain_a, section_a = _async(f"p{index}"), _async(f"c{index}")
        best: dict[str, float] = {}
        for round_ in range(rounds):
            order = [
                ("sync", "plain"),
                ("sync", "section"),
                ("async", "plain"),
                ("async", "section"),
            ]
            if round_ % 2:
                order.reverse()
            for form, variant in order:
                if form == "sync":
                    fn = plain_s if variant == "plain" else section_s
                    took = _time_sync(fn, calls)
                else:
                    afn = plain_a if variant == "plain" else section_a
                    took = asyncio.run(_time_async(afn, calls))
                key = f"{form}/{variant}"
                best[key] = min(best.get(key, float("inf")), took)
        for form in ("sync", "async"):
            rows.append((case, form, best[f"{form}/plain"], best[f"{form}/section"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print("chaos off: the same policy without and with a chaos: section")
    for case, form, plain, section in measure(args.calls, args.rounds):
        print(f"  {case:22s} {form:5s} {plain:7.0f} ns  {section:7.0f} ns  x{section / plain:.3f}")
    chaos.enable()
    try:
        print("chaos on, rate 0: the section's stage runs but injects nothing")
        for case, form, plain, section in measure(args.calls, args.rounds):
            print(
                f"  {case:22s} {form:5s} {plain:7.0f} ns  {section:7.0f} ns  x{section / plain:.3f}"
            )
    finally:
        chaos.disable()


if __name__ == "__main__":
    main()

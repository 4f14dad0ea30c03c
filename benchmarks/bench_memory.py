"""
Memory: what one loaded, decorated and called policy with every section costs, and that
memory stays flat over many rejections and many timeouts.

Usage::

    python benchmarks/bench_memory.py [--quick]

* Per policy: a fresh interpreter loads N policies (10,000; fewer with ``--quick``) that
  have every section on, decorates one function per policy and calls each once. Bytes per
  policy by ``tracemalloc`` (allocations still live after a ``gc.collect()``) and by the
  resident set size (``/proc/self/statm``, in another interpreter without tracemalloc,
  whose own bookkeeping would inflate it). Sections of the model that validate with their
  defaults (``{}``) are added too, so a new section is counted as soon as it lands.
  Twice: with N identical policies (as a file whose policies repeat their sections:
  equal sections are kept once, equal budgets share one deadline queue), and with N
  policies that all differ, in every section (``distinct_section``: the worst case,
  nothing to share, every timeout a duration of its own).
* Flat memory: tracemalloc bytes still allocated after N rejections (the full async
  stack with its breaker open) and after N per-attempt timeouts (a function that never
  returns, ``timeout: {per_attempt: 1e-6}``), measured after a warm-up and a
  ``gc.collect()``; the target is at most 16 KiB whatever N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import json
import os
import subprocess
import sys
import tracemalloc
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runner import ROOT, Context, Row, render

EVERY_SECTION: dict[str, Any] = {
    "retry": {"max_attempts": 3, "base_delay": 0.01, "budget": {}},
    "circuit_breaker": {"failure_threshold": 5},
    "timeout": {"per_attempt": 5.0, "total": 10.0},
    "fallback": {"value": None},
    "bulkhead": {"max_concurrent_requests": 100},
    "rate_limit": {"max_rate": 1000.0, "time_period": 1.0},
    "health": {},
}
# Sections that need settings to validate, with settings that make them present but inert.
NEEDS_SETTINGS: dict[str, Any] = {"chaos": {"failure_modes": ["exception"], "rate": 0.0}}
FLAT_LIMIT = 16 * 1024
# For the distinct variant: a setting per section made unique to each policy (i is
# the policy's number), durations included, so that no two policies share anything.
DISTINCT: dict[str, Any] = {
    "retry": lambda i: {"base_delay": 0.01 + i * 1e-6, "budget": {"ratio": 0.2 + i * 1e-6}},
    "circuit_breaker": lambda i: {"failure_threshold": 5 + i},
    "timeout": lambda i: {"per_attempt": 5.0 + i * 1e-4, "total": 10.0 + i * 1e-4},
    "fallback": lambda i: {"value": i},
    "bulkhead": lambda i: {"max_concurrent_requests": 100 + i},
    "rate_limit": lambda i: {"max_rate": 1000.0 + i},
    "health": lambda i: {"check_interval": 30.0 + i},
    "hedge": lambda i: {"max_delay": 1.0 + i * 1e-4},
    "chaos": lambda i: {"exception": {"message": f"fault {i}"}},
    "http": lambda i: {"max_keys": 100 + i},
}


def every_section() -> tuple[dict[str, Any], list[str]]:
    """EVERY_SECTION plus each other section of the model that validates as ``{}`` (or
    with its NEEDS_SETTINGS)."""
    from resilient._models import Policy

    policy, added = dict(EVERY_SECTION), []
    for name in Policy.model_fields:
        if name in policy or name == "description":
            continue
        settings = NEEDS_SETTINGS.get(name, {})
        try:
            Policy.model_validate({name: settings})
        except Exception:  # a section that needs settings: left out, and said so
            continue
        policy[name] = settings
        added.append(name)
    return policy, added


def distinct_section(section: dict[str, Any], i: int) -> dict[str, Any]:
    """A copy of *section* whose every section differs from the one of any other *i*."""
    policy = copy.deepcopy(section)
    for name, body in policy.items():
        change = DISTINCT.get(name)
        if change is None:  # a section without a setting here yet: say so, do not guess
            msg = f"bench_memory.DISTINCT has no setting for the section {name!r}"
            raise KeyError(msg)
        for key, value in change(i).items():
            if isinstance(value, dict):
                body[key] = {**body.get(key, {}), **value}
            else:
                body[key] = value
    return policy


def copy_function(fn: Any) -> Any:
    """A new function object with *fn*'s code (each decorated function is its own)."""
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_policy_child(count: int, trace: bool, distinct: bool = False) -> dict[str, Any]:
    """Run in a fresh interpreter: bytes per loaded, decorated and called policy."""
    import resilient

    section, added = every_section()
    # one copy per policy, as a file of N policies would parse (a shared dict is an alias)
    make = (
        (lambda i: distinct_section(section, i)) if distinct else (lambda i: copy.deepcopy(section))
    )
    doc = {"version": 1, "policies": {f"p{i}": make(i) for i in range(count)}}

    async def work() -> int:
        return 1

    async def call(fn: Any) -> None:
        with contextlib.suppress(Exception):  # a section such as chaos may fail a call
            await fn()

    resilient.load_policies({"version": 1, "policies": {"warm": section}})  # first-use costs
    asyncio.run(call(resilient.resilient("warm")(work)))
    gc.collect()
    if trace:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if trace else _rss()
    resilient.load_policies(doc)

    async def decorate_and_call() -> list[Any]:
        handles = []
        for i in range(count):
            # one function object per policy, as in a program with many endpoints
            fn = resilient.resilient(f"p{i}")(copy_function(work))
            await call(fn)
            handles.append(fn)
        return handles

    handles = asyncio.run(decorate_and_call())
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if trace else _rss()
    del handles
    return {"per_policy": (after - before) / count, "added": added}


def per_policy(count: int, trace: bool, distinct: bool = False) -> dict[str, Any]:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import bench_memory as m; "
        f"print(json.dumps(m.per_policy_child({count}, {trace}, {distinct})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=900
    )
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def _retained(call: Any, count: int, exc: type[BaseException]) -> int:
    """tracemalloc bytes still allocated after *count* calls that raise *exc*."""

    async def many(n: int) -> None:
        for i in range(n):
            with contextlib.suppress(exc):
                await call()
            if i % 100 == 99:
                await asyncio.sleep(0)

    await many(2000)  # warm-up: caches, lazily built objects
    gc.collect()
    tracemalloc.start()
    try:
        await many(1000)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        await many(count)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return after - before


def flat_rows(ctx: Context) -> list[Row]:
    import resilient

    count = ctx.pick(100_000, 20_000, 1_000)
    full = {k: v for k, v in EVERY_SECTION.items() if k not in ("fallback", "health")}
    resilient.load_policies(
        {
            "version": 1,
            "policies": {
                "open": {**full, "circuit_breaker": {"timeout_seconds": 3600}},
                "slow": {"timeout": {"per_attempt": 1e-6}, "bulkhead": {}},
            },
        }
    )

    async def never() -> None:
        await asyncio.get_running_loop().create_future()

    async def fine() -> int:
        return 1

    rejected = resilient.resilient("open")(fine)
    timed_out = resilient.resilient("slow")(never)

    async def measure() -> tuple[int, int]:
        await rejected()
        resilient.get_breaker("open").open()
        rej = await _retained(rejected, count, resilient.CircuitOpenError)
        tmo = await _retained(timed_out, count, resilient.AttemptTimeoutError)
        return rej, tmo

    rej, tmo = asyncio.run(measure())
    return [
        Row(f"memory retained after {count:,} rejections (full async stack, open)", rej, "B",
            max_value=FLAT_LIMIT),
        Row(f"memory retained after {count:,} per-attempt timeouts", tmo, "B",
            max_value=FLAT_LIMIT),
    ]  # fmt: skip


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    rows: list[Row] = []
    if ctx.wants("memory per policy"):
        count = ctx.pick(10_000, 2_000, 200)
        traced, rss = per_policy(count, True), per_policy(count, False)
        note = f"{count:,} policies; sections beyond the list: {', '.join(traced['added']) or '-'}"
        rows.append(
            Row(
                "memory per policy, every section (tracemalloc)",
                traced["per_policy"],
                "B",
                max_value=10_000,
                note=note,
            )
        )
        rows.append(Row("memory per policy, every section (RSS)", rss["per_policy"], "B",
                        max_value=10_000, note=f"{count:,} policies"))  # fmt: skip
    if ctx.wants("memory per distinct policy"):
        count = ctx.pick(10_000, 2_000, 200)
        note = f"{count:,} policies, all different in every section: nothing to share"
        for trace, how in ((True, "tracemalloc"), (False, "RSS")):
            rows.append(
                Row(
                    f"memory per distinct policy, every section ({how})",
                    per_policy(count, trace, distinct=True)["per_policy"],
                    "B",
                    max_value=10_000,
                    note=note,
                )
            )
    if ctx.wants("memory retained"):
        rows += flat_rows(ctx)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    args = parser.parse_args(argv)
    ctx = Context(scale="quick" if args.quick else "full", module="bench_memory")
    print(render(run_benchmark(ctx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

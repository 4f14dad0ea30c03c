"""
Isolation benchmarks: bulkhead and rate-limiter success-path overhead against
their peers (hyx's bulkhead, a bare ``asyncio.Semaphore``, aiolimiter), side by
side in one process.

Usage::

    python benchmarks/bench_isolation.py [--rounds 15] [--calls 20000]

Method (the same as benchmarks/bench_foundation.py, in short): every variant is
a loop compiled from a one-statement template around the same trivial
``async def f(): return 1``; ``overhead = ns per call - ns per bare call``;
rounds rotate the order of the variants; the figure kept is the minimum over
rounds (noise only adds time), the median is printed as a noise indicator.
``gc`` is off while a block runs. Nothing ever waits: the bulkhead limit and the
rate are far above what one loop can use, so this is the success path only.

"Layer" rows run the statement the pipeline runs for that layer (see
``Pipeline.run_async``); "decorator" rows call a function decorated with a
policy that has only that section, so they include the pipeline itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from _runner import Context, Row

import resilient
from resilient import BulkheadConfig, RateLimitConfig
from resilient.bulkhead import Bulkhead
from resilient.ratelimit import RateLimiter

TEMPLATE = """
async def run(n, f, ns):
    {setup}
    t0 = perf_counter_ns()
    for i in range(n):
        {stmt}
        if i % 100 == 0:
            await sleep0(0)
    return perf_counter_ns() - t0
"""


def compile_variant(stmt: str, setup: str, names: dict[str, Any]) -> Callable[..., Any]:
    indented = stmt.replace("\n", "\n        ")
    source = TEMPLATE.format(stmt=indented, setup=setup or "pass")
    scope: dict[str, Any] = {"perf_counter_ns": time.perf_counter_ns, "sleep0": asyncio.sleep}
    scope.update(names)
    exec(compile(source, "<bench>", "exec"), scope)
    return scope["run"]  # type: ignore[no-any-return]


async def f() -> int:
    return 1


def variants() -> dict[str, tuple[str, str, dict[str, Any]]]:
    import aiolimiter
    import hyx.bulkhead

    fixed = BulkheadConfig(max_concurrent_requests=10**9, enable_auto_scaling=False)
    scaling = BulkheadConfig(max_concurrent_requests=10**9)
    ours = Bulkhead("bench", fixed)
    ours_scaling = Bulkhead("bench-scaling", scaling)
    rate = RateLimitConfig(max_rate=1e9, time_period=1.0)  # the largest a policy allows
    limiter = RateLimiter("bench", rate)
    resilient.load_policies(
        {
            "version": 1,
            "policies": {
                "bh": {"bulkhead": fixed.model_dump()},
                "bh_scaling": {"bulkhead": scaling.model_dump()},
                "rl": {"rate_limit": rate.model_dump()},
            },
        },
        apply_env=False,
    )
    dec_bh = resilient.resilient("bh")(f)
    dec_bh_scaling = resilient.resilient("bh_scaling")(f)
    dec_rl = resilient.resilient("rl")(f)
    names = {
        "ours": ours,
        "ours_scaling": ours_scaling,
        "monotonic": time.monotonic,
        "sem": None,
        "hyx_bh": hyx.bulkhead.bulkhead(max_concurrency=10**9, max_capacity=10**9),
        "limiter": limiter,
        "aiolimiter": aiolimiter,
        "dec_bh": dec_bh,
        "dec_bh_scaling": dec_bh_scaling,
        "dec_rl": dec_rl,
    }
    return {
        "bare": ("await f()", "", names),
        # --- bulkhead
        "bulkhead layer (fixed limit)": (
            "if not ours.try_acquire():\n    await ours.acquire_async()\n"
            "try:\n    await f()\nfinally:\n    ours.release()",
            "",
            names,
        ),
        "bulkhead layer (auto-scaling)": (
            "if not ours_scaling.try_acquire():\n    await ours_scaling.acquire_async()\n"
            "began = monotonic()\n"
            "try:\n    await f()\n"
            "finally:\n    ours_scaling.release_timed(monotonic() - began)",
            "",
            names,
        ),
        "bulkhead `async with` (ours)": ("async with ours:\n    await f()", "", names),
        "asyncio.Semaphore `async with`": (
            "async with sem:\n    await f()",
            "sem = asyncio.Semaphore(10**9)",
            {**names, "asyncio": asyncio},
        ),
        "hyx bulkhead `async with`": ("async with hyx_bh:\n    await f()", "", names),
        "@resilient, bulkhead only (fixed)": ("await dec_bh()", "", names),
        "@resilient, bulkhead only (auto-scaling)": ("await dec_bh_scaling()", "", names),
        # --- rate limiter
        "rate-limit layer": (
            "lim = limiter.for_loop()\n"
            "if not lim.try_take():\n    await limiter.wait_async(lim)\n"
            "await f()",
            "",
            names,
        ),
        "RateLimiter.acquire_async()": ("await limiter.acquire_async()\nawait f()", "", names),
        "aiolimiter `async with`": (
            "async with al:\n    await f()",
            "al = aiolimiter.AsyncLimiter(1e9, 1.0)",
            names,
        ),
        "aiolimiter `await acquire()`": (
            "await al.acquire()\nawait f()",
            "al = aiolimiter.AsyncLimiter(1e9, 1.0)",
            names,
        ),
        "@resilient, rate limit only": ("await dec_rl()", "", names),
    }


async def measure(rounds: int, calls: int) -> dict[str, list[float]]:
    table = variants()
    runners = {name: compile_variant(*spec) for name, spec in table.items()}
    for run in runners.values():  # warm-up (also compiles the policies)
        await run(calls // 10, f, None)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for name in rotated:
            gc.collect()
            gc.disable()
            try:
                elapsed = await runners[name](calls, f, None)
            finally:
                gc.enable()
            samples[name].append(elapsed / calls)
    return samples


def render(samples: dict[str, list[float]]) -> str:
    best = {name: min(values) for name, values in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    bare = best["bare"]
    over = {name: best[name] - bare for name in best}

    def ratio(a: str, b: str) -> str:
        return f"{over[a] / over[b]:.2f}x"

    lines = [
        "| variant | ns/call (min) | median | overhead ns |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in samples:
        lines.append(f"| {name} | {best[name]:.0f} | {median[name]:.0f} | {over[name]:.0f} |")
    sem, hyx = "asyncio.Semaphore `async with`", "hyx bulkhead `async with`"
    layer, scaling = "bulkhead layer (fixed limit)", "bulkhead layer (auto-scaling)"
    rl, al, al_acq = "rate-limit layer", "aiolimiter `async with`", "aiolimiter `await acquire()`"
    lines += [
        "",
        "| target | measured | limit |",
        "| --- | ---: | ---: |",
        f"| bulkhead layer (fixed) / hyx bulkhead | {ratio(layer, hyx)} | ≤ 0.5x |",
        f"| bulkhead layer (auto-scaling) / hyx bulkhead | {ratio(scaling, hyx)} | ≤ 0.5x |",
        f"| bulkhead layer (fixed) / asyncio.Semaphore | {ratio(layer, sem)} | ≤ 1.0x |",
        f"| bulkhead layer (auto-scaling) / asyncio.Semaphore | {ratio(scaling, sem)} | ≤ 1.0x |",
        f"| rate-limit layer / aiolimiter `async with` | {ratio(rl, al)} | ≤ 1.0x |",
        f"| rate-limit layer / aiolimiter `await acquire()` | {ratio(rl, al_acq)} | (info) |",
    ]
    return "\n".join(lines)


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    if ctx.peer("hyx") is None or ctx.peer("aiolimiter") is None:
        return [Row.missing("isolation: bulkhead and rate-limit layers", "hyx or aiolimiter")]
    rounds, calls = ctx.pick((15, 20000), (5, 5000), (1, 500))
    samples = asyncio.run(measure(rounds, calls))
    best = {name: min(values) for name, values in samples.items()}
    over = {name: best[name] - best["bare"] for name in best}
    unit = "ns/call overhead"
    hyx, sem = "hyx bulkhead `async with`", "asyncio.Semaphore `async with`"
    al = "aiolimiter `async with`"
    rows = []
    for layer in ("bulkhead layer (fixed limit)", "bulkhead layer (auto-scaling)"):
        rows.append(Row(layer, over[layer], unit, "hyx bulkhead", over[hyx], max_ratio=0.5))
        rows.append(Row(layer, over[layer], unit, "asyncio.Semaphore", over[sem], max_ratio=1.0))
    rows.append(Row("rate-limit layer", over["rate-limit layer"], unit, "aiolimiter", over[al],
                    max_ratio=1.0))  # fmt: skip
    for name in ("@resilient, bulkhead only (fixed)", "@resilient, rate limit only"):
        rows.append(Row(name, over[name], unit))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bulkhead and rate-limiter overhead vs peers")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args(argv)
    samples = asyncio.run(measure(args.rounds, args.calls))
    print(
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"resilient {resilient.__version__}, hyx {version('hyx')}, "
        f"aiolimiter {version('aiolimiter')}; {args.rounds} rounds x {args.calls} calls"
    )
    print()
    print(render(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Foundation benchmarks: resilient's per-call overhead against its peers, in one process.

Usage::

    python benchmarks/bench_foundation.py [--quick] [--json out.json]

What is measured
================

For every scenario, the *same* trivial function (``return 1``, or ``raise
ConnectionError`` for the failure path) is called bare, through resilient and
through each peer. ``overhead = ns per wrapped call - ns per bare call``; the
ratio ``ours / peer`` of those overheads is checked against the targets of the
performance issue (see docs/performance.md).

How
===

* Each variant is a loop compiled from a one-statement template (like
  ``timeit``), so ours, the peers and the bare call run in identical loops and
  differ only in the statement. Peers that are used inline (``cb.call(f)``,
  ``async with asyncio.timeout(5.0)``) are measured inline: no extra lambda.
* One *sample* is one block of ``n`` calls timed with ``time.perf_counter_ns``
  (``n`` calibrated so that a block lasts ``--block-ms``): timing single calls
  would measure the clock itself (~50 ns), as much as some overheads here.
* Warm-up first (this also compiles the policies, which compile at first call).
* ``gc`` is disabled while a block runs and collected between rounds.
* Every round measures all the variants of a scenario one after the other, in
  a rotated order, so slow drifts (CPU frequency, the other processes on the
  machine) hit all of them alike.
* The figure kept per variant is the *minimum over rounds* of the block
  means. Noise on a shared machine (preemption, cache eviction by another
  process, interrupts) only ever adds time, so the minimum is the estimate
  least polluted by it and the most reproducible; the median is kept in the
  JSON output as a noise indicator.
* Async variants run in one event loop; the timed loop yields to the event
  loop (``await asyncio.sleep(0)``) every 100 calls, as a server would between
  requests: otherwise the timer handles that ``asyncio.timeout`` cancels would
  pile up unboundedly in the loop's heap, which is not what happens in real use.
  That yield is in the bare loop too, so it cancels out of the overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiobreaker  # not a project dependency: pip install aiobreaker
import nopanic
import pybreaker
import stamina
import tenacity
from _blocks import Config, Runner, Variant, environment, retained_bytes, threads_wall_ns
from _runner import Context
from _runner import Row as TableRow

import resilient

# --------------------------------------------------------------------------- policies

POLICIES: dict[str, Any] = {
    "version": 1,
    "policies": {
        # 1. retry only, no timeouts
        "bench_retry": {
            "retry": {
                "max_attempts": 3,
                "retry_on": ["ConnectionError"],
                "timeout": None,
                "per_attempt_timeout": None,
            }
        },
        # 2. per-attempt timeout only
        "bench_timeout": {"timeout": {"per_attempt": 5.0}},
        # 3. circuit breaker only (defaults: time window of 60 s)
        "bench_breaker": {"circuit_breaker": {}},
        # 4. breakers forced open; an open period long enough to outlast the run
        "bench_open": {"circuit_breaker": {"timeout_seconds": 3600, "max_open_duration": 3600}},
        "bench_forced": {"circuit_breaker": {}},
        # 5. failure path, zero wait; like-for-like with tenacity (no timeouts) ...
        "bench_fail": {
            "retry": {
                "max_attempts": 5,
                "base_delay": 0,
                "retry_on": ["ConnectionError"],
                "timeout": None,
                "per_attempt_timeout": None,
            }
        },
        # ... and, for reference, with the retry section's default timeouts (60 s / 30 s)
        "bench_fail_timeouts": {
            "retry": {"max_attempts": 5, "base_delay": 0, "retry_on": ["ConnectionError"]}
        },
        # 6. one breaker shared by 8 threads
        "bench_threads": {"circuit_breaker": {}},
    },
}


# --------------------------------------------------------------------------- the functions


def f() -> int:
    return 1


async def af() -> int:
    return 1


async def abad() -> None:
    raise ConnectionError


def sleepy() -> None:
    time.sleep(0.05)


def build_namespace() -> dict[str, Any]:
    """Every callable the timed statements use, decorated once."""
    resilient.load_policies(POLICIES)
    res = resilient.resilient
    ten = tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        retry=tenacity.retry_if_exception_type(ConnectionError),
    )
    ten_fail = tenacity.retry(
        stop=tenacity.stop_after_attempt(5),
        wait=tenacity.wait_none(),
        retry=tenacity.retry_if_exception_type(ConnectionError),
        reraise=True,
    )
    npr = nopanic.retry(attempts=3, on=ConnectionError)
    stm = stamina.retry(on=ConnectionError, attempts=3)
    pb = pybreaker.CircuitBreaker()
    pb_open = pybreaker.CircuitBreaker(reset_timeout=3600)
    pb_open.open()
    pb_threads = pybreaker.CircuitBreaker()
    aio = aiobreaker.CircuitBreaker()

    resilient.get_breaker("bench_open").open()
    resilient.get_breaker("bench_forced").force_open()

    return {
        "asyncio": asyncio,
        "f": f,
        "af": af,
        "abad": abad,
        # 1
        "r_f": res("bench_retry")(f),
        "r_af": res("bench_retry")(af),
        "ten_f": ten(f),
        "ten_af": ten(af),
        "np_f": npr(f),
        "np_af": npr(af),
        "st_f": stm(f),
        "st_af": stm(af),
        # 2
        "t_af": res("bench_timeout")(af),
        "timeout_wrapped_af": _timeout_wrapper(af),
        # 3
        "b_f": res("bench_breaker")(f),
        "b_af": res("bench_breaker")(af),
        "pb": pb,
        "aio": aio,
        # 4
        "open_f": res("bench_open")(f),
        "forced_f": res("bench_forced")(f),
        "pb_open": pb_open,
        "CircuitOpenError": resilient.CircuitOpenError,
        "CircuitBreakerError": pybreaker.CircuitBreakerError,
        # 5
        "fail_abad": res("bench_fail")(abad),
        "fail_t_abad": res("bench_fail_timeouts")(abad),
        "ten_abad": ten_fail(abad),
        # 6
        "b_sleepy": res("bench_threads")(sleepy),
        "pb_threads": pb_threads,
    }


def _timeout_wrapper(fn: Callable[[], Any]) -> Callable[[], Any]:
    async def wrapped() -> Any:
        async with asyncio.timeout(5.0):
            return await fn()

    return wrapped


# --------------------------------------------------------------------------- scenarios


def _try(call: str, exc: str) -> str:
    return f"try:\n    {call}\nexcept {exc}:\n    pass"


def run_all(cfg: Config) -> dict[str, Any]:
    ns = build_namespace()
    runner = Runner(cfg, ns)
    V = Variant

    # 1. retry-only success path
    runner.group_sync(
        [
            V("s_bare", "bare f()", "f()"),
            V("s_retry_ours", "resilient retry-only", "r_f()"),
            V("s_retry_tenacity", "tenacity.retry", "ten_f()"),
            V("s_retry_nopanic", "nopanic.retry", "np_f()"),
            V("s_retry_stamina", "stamina.retry", "st_f()"),
        ]
    )
    runner.group_async(
        [
            V("a_bare", "bare await af()", "await af()"),
            V("a_retry_ours", "resilient retry-only", "await r_af()"),
            V("a_retry_tenacity", "tenacity.retry", "await ten_af()"),
            V("a_retry_nopanic", "nopanic.retry", "await np_af()"),
            V("a_retry_stamina", "stamina.retry", "await st_af()"),
        ]
    )
    # 2. per-attempt timeout, async success path
    runner.group_async(
        [
            V("t_bare", "bare await af()", "await af()"),
            V("t_ours", "resilient timeout.per_attempt", "await t_af()"),
            V(
                "t_asyncio_timeout",
                "async with asyncio.timeout(5.0) (inline)",
                "async with asyncio.timeout(5.0):\n    await af()",
            ),
            V(
                "t_asyncio_timeout_fn",
                "asyncio.timeout in a wrapper fn",
                "await timeout_wrapped_af()",
            ),
            V("t_wait_for", "asyncio.wait_for(af(), 5.0)", "await asyncio.wait_for(af(), 5.0)"),
        ]
    )
    # 3. breaker-only success path
    runner.group_sync(
        [
            V("bs_bare", "bare f()", "f()"),
            V("bs_ours", "resilient breaker-only", "b_f()"),
            V("bs_pybreaker", "pybreaker cb.call(f)", "pb.call(f)"),
        ]
    )
    runner.group_async(
        [
            V("ba_bare", "bare await af()", "await af()"),
            V("ba_ours", "resilient breaker-only", "await b_af()"),
            V("ba_aiobreaker", "aiobreaker cb.call_async(af)", "await aio.call_async(af)"),
            V("ba_pybreaker", "pybreaker cb.call_async(af) (tornado)", "await pb.call_async(af)"),
        ]
    )
    # 4. rejection while open
    runner.group_sync(
        [
            V("rej_bare", "bare f() in try/except", _try("f()", "CircuitOpenError")),
            V("rej_ours", "resilient, open()", _try("open_f()", "CircuitOpenError")),
            V("rej_ours_forced", "resilient, force_open()", _try("forced_f()", "CircuitOpenError")),
            V("rej_pybreaker", "pybreaker, open()", _try("pb_open.call(f)", "CircuitBreakerError")),
        ]
    )
    # 5. async failure path, zero wait, 5 attempts
    runner.group_async(
        [
            V("fail_bare", "bare await abad() (1 raise)", _try("await abad()", "ConnectionError")),
            V("fail_ours", "resilient", _try("await fail_abad()", "ConnectionError"), 5),
            V(
                "fail_ours_timeouts",
                "resilient, default timeouts",
                _try("await fail_t_abad()", "ConnectionError"),
                5,
            ),
            V("fail_tenacity", "tenacity", _try("await ten_abad()", "ConnectionError"), 5),
        ]
    )

    # 4b. memory over rejections
    mem_ours = retained_bytes(_try("open_f()", "CircuitOpenError"), ns, cfg.rejections)
    mem_pb = retained_bytes(_try("pb_open.call(f)", "CircuitBreakerError"), ns, cfg.rejections)
    # 6. 8 threads x 50 ms through one breaker
    wall_ours = threads_wall_ns(ns["b_sleepy"], 8, cfg.thread_runs)
    wall_pb = threads_wall_ns(lambda: ns["pb_threads"].call(sleepy), 8, cfg.thread_runs)

    return {
        "variants": runner.results,
        "memory": {"ours": mem_ours, "pybreaker": mem_pb, "rejections": cfg.rejections},
        "threads": {"ours": wall_ours, "pybreaker": wall_pb},
    }


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    target: str
    ours: float
    peer: float
    peer_name: str
    limit: float | None  # ratio limit; None = reported only
    unit: str = "ns"

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("inf")

    @property
    def verdict(self) -> str:
        if self.limit is None:
            return "(report)"
        return "PASS" if self.ratio <= self.limit else "FAIL"


def build_rows(data: dict[str, Any]) -> list[Row]:
    v: dict[str, Variant] = data["variants"]

    def over(key: str, bare: str) -> float:
        return v[key].best - v[bare].best

    def per_attempt(key: str) -> float:
        return v[key].best / v[key].calls_per_stmt

    rows = []
    for mode, bare, p in (("sync", "s_bare", "s_"), ("async", "a_bare", "a_")):
        ours = over(f"{p}retry_ours", bare)
        rows += [
            Row(f"1. retry-only success, {mode}, overhead", ours,
                over(f"{p}retry_tenacity", bare), "tenacity.retry", 0.05),
            Row(f"1. retry-only success, {mode}, overhead", ours,
                over(f"{p}retry_nopanic", bare), "nopanic.retry", 1.0),
            Row(f"1. retry-only success, {mode}, overhead", ours,
                over(f"{p}retry_stamina", bare), "stamina.retry", None),
        ]  # fmt: skip
    ours = over("t_ours", "t_bare")
    rows += [
        Row("2. per-attempt timeout, async success, overhead", ours,
            over("t_asyncio_timeout", "t_bare"), "async with asyncio.timeout (inline)", 0.3),
        Row("2. per-attempt timeout, async success, overhead", ours,
            over("t_asyncio_timeout_fn", "t_bare"), "asyncio.timeout in a wrapper fn", None),
        Row("2. per-attempt timeout, async success, overhead", ours,
            over("t_wait_for", "t_bare"), "asyncio.wait_for", None),
        Row("3. breaker-only success, sync, overhead", over("bs_ours", "bs_bare"),
            over("bs_pybreaker", "bs_bare"), "pybreaker CircuitBreaker.call", 0.5),
        Row("3. breaker-only success, async, overhead", over("ba_ours", "ba_bare"),
            over("ba_pybreaker", "ba_bare"), "pybreaker call_async (tornado)", 0.5),
        Row("3. breaker-only success, async, overhead", over("ba_ours", "ba_bare"),
            over("ba_aiobreaker", "ba_bare"), "aiobreaker call_async", None),
        Row("4. rejection while open, sync, cost", over("rej_ours", "rej_bare"),
            over("rej_pybreaker", "rej_bare"), "pybreaker (open)", 0.5),
        Row("4. rejection, force_open(), sync, cost", over("rej_ours_forced", "rej_bare"),
            over("rej_pybreaker", "rej_bare"), "pybreaker (open)", None),
        Row("5. async failure, 5 attempts, zero wait, per attempt", per_attempt("fail_ours"),
            per_attempt("fail_tenacity"), "tenacity wait_none, reraise", 0.2),
        Row("5. same, with default retry timeouts (60 s / 30 s)",
            per_attempt("fail_ours_timeouts"), per_attempt("fail_tenacity"),
            "tenacity wait_none, reraise", None),
    ]  # fmt: skip
    mem = data["memory"]
    rows.append(
        Row(
            f"4. bytes retained after {mem['rejections']:,} rejections (tracemalloc)",
            mem["ours"][0],
            mem["pybreaker"][0],
            "pybreaker",
            None,
            unit="B",
        )
    )
    th = data["threads"]
    rows.append(
        Row("6. 8 threads x 50 ms call, one breaker, wall", th["ours"] / 1e6,
            th["pybreaker"] / 1e6, "pybreaker", None, unit="ms")
    )  # fmt: skip
    return rows


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value:,.0f} ns"


def render(data: dict[str, Any], rows: list[Row]) -> str:
    lines = [
        "| target | ours | peer | ratio | target | result |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        peer = f"{_fmt(row.peer, row.unit)} ({row.peer_name})"
        limit = f"≤ {row.limit:g}x" if row.limit is not None else "-"
        lines.append(
            f"| {row.target} | {_fmt(row.ours, row.unit)} | {peer} | "
            f"{row.ratio:.3f} | {limit} | {row.verdict} |"
        )
    # The absolute targets that are not ratios of a single row.
    mem_ours = data["memory"]["ours"][0]
    n = data["memory"]["rejections"]
    flat = mem_ours <= 16 * 1024
    lines.append(
        f"| 4. memory flat over {n:,} rejections | {mem_ours:,} B retained | - | - | "
        f"≤ 16 KiB | {'PASS' if flat else 'FAIL'} |"
    )
    mem = data["memory"]
    lines.append(
        f"| 4. during {n:,} rejections: peak above start; cyclic garbage per rejection | "
        f"{mem['ours'][1]:,} B; {mem['ours'][2]:g} objects | "
        f"{mem['pybreaker'][1]:,} B; {mem['pybreaker'][2]:g} objects (pybreaker) "
        "| - | - | (report) |"
    )
    wall = data["threads"]["ours"] / 1e6
    lines.append(
        f"| 6. 8 threads x 50 ms, one breaker | {wall:.1f} ms | - | {wall / 50:.2f} x 50 ms | "
        f"≤ 1.2 x 50 ms | {'PASS' if wall <= 60 else 'FAIL'} |"
    )
    lines += ["", "Raw ns per call (min over rounds; median in brackets):", ""]
    lines += [
        "| variant | statement | ns/call (min) | median | n per block |",
        "|---|---|---:|---:|---:|",
    ]
    for var in data["variants"].values():
        stmt = var.stmt.replace("\n", " ").replace("|", "\\|")
        lines.append(
            f"| {var.label} | `{stmt}` | {var.best:,.0f} | {var.median:,.0f} | {var.n:,} |"
        )
    return "\n".join(lines)


def run_benchmark(ctx: Context) -> list[TableRow]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    cfg = ctx.pick(
        Config(block_ms=20, rounds=15, thread_runs=5, rejections=100_000),
        Config(block_ms=5, rounds=5, thread_runs=2, rejections=100_000),
        Config(block_ms=1, rounds=1, thread_runs=1, rejections=2_000),
    )
    data = run_all(cfg)
    units = {"ns": "ns/call overhead", "B": "B", "ms": "ms"}
    out = [
        TableRow(r.target, r.ours, units[r.unit], r.peer_name, r.peer, max_ratio=r.limit)
        for r in build_rows(data)
    ]
    n = data["memory"]["rejections"]
    out.append(
        TableRow(f"4. memory retained after {n:,} rejections", data["memory"]["ours"][0], "B",
                 max_value=16 * 1024)
    )  # fmt: skip
    out.append(
        TableRow("6. 8 threads x 50 ms, one breaker, wall", data["threads"]["ours"] / 1e6, "ms",
                 max_value=60.0, note="target 1.2 x 50 ms")
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~15 s)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    parser.add_argument("--block-ms", type=float, help="duration of one timed block")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (best-of-N)")
    args = parser.parse_args(argv)
    if args.quick:
        cfg = Config(block_ms=5, rounds=5, thread_runs=2, rejections=100_000)
    else:
        cfg = Config(block_ms=20, rounds=15, thread_runs=5, rejections=100_000)
    if args.block_ms:
        cfg.block_ms = args.block_ms
    if args.rounds:
        cfg.rounds = args.rounds

    env = environment(("tenacity", "pybreaker", "stamina", "nopanic", "aiobreaker"))
    started = time.monotonic()
    data = run_all(cfg)
    rows = build_rows(data)
    env["seconds"] = round(time.monotonic() - started, 1)
    env["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(
        f"Python {env['python']} on {env['platform']}, {env['nproc']} CPUs ({env['cpu']}); "
        f"{cfg.rounds} rounds x {cfg.block_ms:g} ms blocks; {env['seconds']} s; "
        f"load average {env['loadavg_1min_before']} -> {env['loadavg_1min_after']}; "
        f"resilient at {env['git']}"
    )
    print(", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print()
    print(render(data, rows))
    if args.json:
        out = {
            "environment": env,
            "config": vars(cfg),
            "rows": [
                {
                    "target": r.target,
                    "ours": r.ours,
                    "peer": r.peer,
                    "peer_name": r.peer_name,
                    "unit": r.unit,
                    "ratio": r.ratio,
                    "limit": r.limit,
                    "verdict": r.verdict,
                }
                for r in rows
            ],
            "variants": {
                k: {
                    "label": v.label,
                    "stmt": v.stmt,
                    "n": v.n,
                    "best_ns": v.best,
                    "median_ns": v.median,
                    "samples_ns": v.samples,
                }
                for k, v in data["variants"].items()
            },
            "memory": data["memory"],
            "threads_ns": data["threads"],
        }
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

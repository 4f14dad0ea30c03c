"""
Timing machinery shared by the benchmarks.

* ``sync_block`` / ``async_block``: a block of ``n`` calls of one callable, timed with
  ``perf_counter_ns``, ``gc`` off while it runs; async blocks yield to the loop every
  100 calls, as a server would (bench_metrics.py, bench_health.py).
* ``compile_loop`` / ``Variant`` / ``Runner``: variants written as one statement, each
  compiled into an identical loop (as ``timeit`` does), measured round by round in a
  rotated order, minimum over rounds kept (bench_foundation.py, bench_stack.py).
* ``retained_bytes``, ``threads_wall_ns``, ``environment``: memory over many runs of a
  statement, wall time of threads released together, the machine and versions.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from itertools import repeat
from typing import Any

PERF = time.perf_counter_ns
ASYNC_CHUNK = 100  # async loops yield to the event loop every ASYNC_CHUNK calls


def sync_block(fn: Callable[[], Any], n: int) -> float:
    """ns per call of *n* calls of *fn*."""
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - t0) / n
    finally:
        gc.enable()


async def async_block(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    """ns per call of *n* awaited calls of *fn*."""
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for i in range(n):
            await fn()
            if i % 100 == 99:
                await asyncio.sleep(0)  # let the loop breathe, as a server would
        return (time.perf_counter_ns() - t0) / n
    finally:
        gc.enable()


def calls_per_block(ns_per_call: float, block_ms: float) -> int:
    """How many calls make one block of about *block_ms* milliseconds."""
    return max(int(block_ms * 1e6 / ns_per_call), 100)


def best_of_sync(
    variants: Sequence[Callable[[], Any]], rounds: int, block_ms: float, warmup: int = 2000
) -> list[float]:
    """
    Best ns per call of each variant, measured side by side: blocks of about
    *block_ms* each, the order rotated every round, a garbage collection between rounds.
    """
    for fn in variants:
        for _ in range(warmup):
            fn()
    n = calls_per_block(sync_block(variants[0], warmup), block_ms)
    best = [float("inf")] * len(variants)
    for r in range(rounds):
        for i in _rotation(len(variants), r):
            best[i] = min(best[i], sync_block(variants[i], n))
        gc.collect()
    return best


async def best_of_async(
    variants: Sequence[Callable[[], Awaitable[Any]]],
    rounds: int,
    block_ms: float,
    warmup: int = 2000,
) -> list[float]:
    """:func:`best_of_sync` for coroutine functions."""
    for fn in variants:
        for _ in range(warmup):
            await fn()
    n = calls_per_block(await async_block(variants[0], warmup), block_ms)
    best = [float("inf")] * len(variants)
    for r in range(rounds):
        for i in _rotation(len(variants), r):
            best[i] = min(best[i], await async_block(variants[i], n))
        gc.collect()
    return best


# --------------------------------------------------------------------------- compiled loops

_SYNC_TEMPLATE = """
def _loop(_n, _perf=_perf, _repeat=_repeat):
    _t0 = _perf()
    for _ in _repeat(None, _n):
{stmt}
    return _perf() - _t0
"""

_ASYNC_TEMPLATE = """
async def _loop(_n, _perf=_perf, _repeat=_repeat, _yield=_yield):
    _t0 = _perf()
    for _ in _repeat(None, _n // {chunk}):
        for _ in _repeat(None, {chunk}):
{stmt}
        await _yield(0)
    return _perf() - _t0
"""


def compile_loop(stmt: str, ns: dict[str, Any], is_async: bool) -> Callable[[int], Any]:
    """A function running *stmt* ``n`` times, returning the elapsed ns (a coroutine if async)."""
    if is_async:
        src = _ASYNC_TEMPLATE.format(stmt=textwrap.indent(stmt, " " * 12), chunk=ASYNC_CHUNK)
    else:
        src = _SYNC_TEMPLATE.format(stmt=textwrap.indent(stmt, " " * 8))
    scope = {**ns, "_perf": PERF, "_repeat": repeat, "_yield": asyncio.sleep}
    exec(compile(src, f"<bench {stmt!r}>", "exec"), scope)
    return scope["_loop"]  # type: ignore[no-any-return]


@dataclass
class Variant:
    key: str
    label: str
    stmt: str
    calls_per_stmt: int = 1  # attempts per call for the failure path (ns per attempt)
    setup: Callable[[], object] | None = None  # run before each block (e.g. metrics on/off)
    samples: list[float] = field(default_factory=list)
    n: int = 0

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass
class Config:
    block_ms: float
    rounds: int
    thread_runs: int
    rejections: int


class Runner:
    """Measures groups of variants, interleaved round by round (see the module docstring)."""

    def __init__(self, cfg: Config, ns: dict[str, Any]) -> None:
        self.cfg = cfg
        self.ns = ns
        self.results: dict[str, Variant] = {}

    # -- sync
    def group_sync(self, variants: list[Variant]) -> None:
        loops = [compile_loop(v.stmt, self.ns, False) for v in variants]
        for v, loop in zip(variants, loops, strict=True):
            if v.setup:
                v.setup()
            loop(2000)  # warm-up (and first-call compilation of the pipeline)
            v.n = self._calibrate(loop, 1)
        for r in range(self.cfg.rounds):
            gc.collect()
            for i in _rotation(len(variants), r):
                v = variants[i]
                if v.setup:
                    v.setup()
                    loops[i](1)  # the pipeline rebuilds for the new setting, untimed
                gc.disable()
                try:
                    elapsed = loops[i](v.n)
                finally:
                    gc.enable()
                v.samples.append(elapsed / v.n)
        self._store(variants)

    # -- async
    def group_async(
        self,
        variants: list[Variant],
        prepare: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """*prepare*, if given, runs in the group's event loop and adds names to the namespace
        (for peers whose objects must be made inside a running loop)."""
        asyncio.run(self._group_async(variants, prepare))
        self._store(variants)

    async def _group_async(
        self,
        variants: list[Variant],
        prepare: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        if prepare is not None:
            self.ns.update(await prepare())
        loops = [compile_loop(v.stmt, self.ns, True) for v in variants]
        for v, loop in zip(variants, loops, strict=True):
            if v.setup:
                v.setup()
            await loop(2000)
            v.n = await self._acalibrate(loop)
        for r in range(self.cfg.rounds):
            gc.collect()
            for i in _rotation(len(variants), r):
                v = variants[i]
                if v.setup:
                    v.setup()
                    await loops[i](ASYNC_CHUNK)  # the pipeline rebuilds, untimed
                gc.disable()
                try:
                    elapsed = await loops[i](v.n)
                finally:
                    gc.enable()
                v.samples.append(elapsed / v.n)

    def _calibrate(self, run: Callable[[int], int], step: int) -> int:
        target = self.cfg.block_ms * 1e6
        n = 1000
        while True:
            elapsed = run(n)
            if elapsed >= target / 4:
                return max(step, int(n * target / elapsed) // step * step)
            n *= 4

    async def _acalibrate(self, loop: Callable[[int], Any]) -> int:
        target = self.cfg.block_ms * 1e6
        n = 1000
        while True:
            elapsed = await loop(n)
            if elapsed >= target / 4:
                return max(ASYNC_CHUNK, int(n * target / elapsed) // ASYNC_CHUNK * ASYNC_CHUNK)
            n *= 4

    def _store(self, variants: list[Variant]) -> None:
        for v in variants:
            self.results[v.key] = v


def _rotation(count: int, r: int) -> list[int]:
    return [(r + i) % count for i in range(count)]


# --------------------------------------------------------------------------- non-loop scenarios


def retained_bytes(stmt: str, ns: dict[str, Any], count: int) -> tuple[int, int, float]:
    """
    Bytes still allocated after *count* runs of *stmt* (after gc), the peak above
    the start (tracemalloc), and the objects per run that only the cyclic gc can
    free (reference cycles, e.g. exception -> traceback -> frame -> exception).
    """
    loop = compile_loop(stmt, ns, False)
    loop(2000)  # warm: caches, interned strings, lazily built objects
    gc.collect()
    gc.disable()
    try:
        loop(1000)
        cyclic = gc.collect() / 1000
    finally:
        gc.enable()
    tracemalloc.start()
    try:
        loop(1000)
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loop(count)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before, peak - before, cyclic


def threads_wall_ns(call: Callable[[], Any], threads: int, runs: int) -> float:
    """Best wall time for *threads* threads each making one *call*, released together."""
    best = float("inf")
    for _ in range(runs):
        barrier = threading.Barrier(threads + 1)

        def worker(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            call()

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        barrier.wait()
        t0 = PERF()
        for t in pool:
            t.join()
        best = min(best, PERF() - t0)
    return best


def _git_state() -> str:
    """Commit of the working tree, and whether resilient/ differs from it (best effort)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "resilient"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in resilient/' if dirty else ''}"


def environment(dists: Iterable[str] = ()) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    versions = {}
    for dist in ("resilient-policies", *dists):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "source" if dist == "resilient-policies" else "missing"
    return {
        "git": _git_state(),
        "loadavg_1min_before": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }

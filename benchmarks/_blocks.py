"""
Timed blocks shared by the benchmarks that compare two settings of one stack
(bench_metrics.py: metrics off/on; bench_health.py: without/with ``health:``).

One sample is a block of ``n`` calls timed with ``perf_counter_ns``, ``gc`` off while
it runs; async blocks yield to the loop every 100 calls, as a server would.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any


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

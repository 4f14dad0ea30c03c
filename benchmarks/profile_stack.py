"""
Where the microseconds of the full stack go: cProfile of many calls through it.

Usage::

    python benchmarks/profile_stack.py [--sync] [--tasks N] [--calls N] [--top N]

The async stack of bench_stack.py (breaker, retry, bulkhead, rate limit, per-attempt and
total timeout, metrics on) or, with ``--sync``, the sync one; ``--tasks N`` runs the calls
from N concurrent tasks through a function that yields once (``await asyncio.sleep(0)``),
as the throughput rows do. Prints the functions ranked by their own time. (Not a
``bench_*`` module: profiles are read, not tabulated; cProfile's own cost per call
inflates small functions, so read the ranking, not the absolute figures.)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stack

import resilient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--sync", action="store_true", help="the sync stack")
    parser.add_argument("--tasks", type=int, default=0, help="concurrent tasks (async)")
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    resilient.load_policies(bench_stack.policies())
    bench_stack.metrics_on()
    profiler = cProfile.Profile()
    if args.sync:
        fn = resilient.resilient("sync_full")(bench_stack.f)
        for _ in range(2000):
            fn()
        profiler.enable()
        for _ in range(args.calls):
            fn()
        profiler.disable()
    else:

        async def run() -> None:
            if args.tasks:
                afn = resilient.resilient("async_wide")(bench_stack.io)
                per = args.calls // args.tasks

                async def worker() -> None:
                    for _ in range(per):
                        await afn()

                await worker()
                profiler.enable()
                await asyncio.gather(*(worker() for _ in range(args.tasks)))
                profiler.disable()
            else:
                afn = resilient.resilient("async_full")(bench_stack.af)
                for _ in range(2000):
                    await afn()
                profiler.enable()
                for i in range(args.calls):
                    await afn()
                    if i % 100 == 99:
                        await asyncio.sleep(0)
                profiler.disable()

        asyncio.run(run())
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

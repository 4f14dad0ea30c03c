"""The seed's ResilienceManager facade (issue 5)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import Sleeps

import resilient
from resilient import (
    AttemptTimeoutError,
    BulkheadFullError,
    CircuitOpenError,
    FeatureDisabledError,
    PolicyError,
    ResilienceConfig,
    ResilienceManager,
    ServiceExistsError,
    ServiceNotFoundError,
    create_resilience_manager,
    metrics,
)
from resilient.events import BreakerStateChanged, HealthChanged, RetryScheduled
from resilient.manager import ENV_VARS, FLAT_KEYS

SEED_CONFIG = {
    "failure_threshold": 5,
    "timeout_seconds": 30,
    "max_retry_attempts": 3,
    "retry_base_delay": 1.0,
    "max_threads": 10,
    "max_connections": 5,
    "max_concurrent": 20,
    "failure_modes": ["network_delay", "timeout", "exception"],
}


class DB:
    """A fake client: fails while `failing` is set."""

    def __init__(self) -> None:
        self.failing: BaseException | None = None
        self.calls = 0

    async def query(self, sql: str) -> list[int]:
        self.calls += 1
        if self.failing is not None:
            raise self.failing
        return [1]

    def query_sync(self, sql: str) -> list[int]:
        self.calls += 1
        if self.failing is not None:
            raise self.failing
        return [1]


@pytest.fixture(autouse=True)
def _no_metrics_left() -> Any:
    yield
    metrics.disable()
    resilient.disable_logging()
    resilient.bulkhead_manager.reset()


@pytest.fixture(name="manager")
async def _manager() -> AsyncIterator[ResilienceManager]:
    manager = await create_resilience_manager(service_name="app", logging_enabled=False)
    yield manager
    await manager.close()


class TestSeedCodeBlock:
    async def test_runs_as_written(self) -> None:
        """The issue's code block runs unchanged, in memory (chaos says 'not yet')."""
        db_client = DB()
        manager = await create_resilience_manager(
            service_name="trading_app", environment="production", redis_url=None
        )
        await manager.register_service(
            service_name="database", service_instance=db_client, service_config=SEED_CONFIG
        )
        async with manager.resilient_call("database", "query"):
            rows = await db_client.query("SELECT 1")
        assert rows == [1]

        config = ResilienceConfig(
            service_name="trading_system",
            environment="production",
            circuit_breaker_enabled=True,
            adaptive_circuit_breaker_enabled=True,
            retry_enabled=True,
            health_monitoring_enabled=True,
            bulkhead_enabled=True,
            chaos_engineering_enabled=False,
            redis_url=None,
            metrics_enabled=True,
            prometheus_enabled=True,
        )
        manager2 = ResilienceManager(config)
        await manager2.initialize()
        await manager2.register_service("database", db_client, SEED_CONFIG)

        for m in (manager, manager2):
            json.dumps(m.get_system_status())
            json.dumps(m.get_service_status("database"))
            health = await m.run_health_check("database")
            json.dumps(health)
            # DB has no health_check() and its config no health: section: nothing to judge
            assert (health["service"], health["status"], health["checks"]) == (
                "database",
                "unknown",
                {},
            )
            assert m.health_monitor is not None
            assert m.health_monitor.running
            assert m.health_monitor.get_system_health_summary()["status"] == "unknown"
            assert m.circuit_breakers["database"].get_status()["state"] == "closed"
            assert m.retry_managers["database"].get_metrics()["retries_scheduled"] == 0
            assert m.bulkhead_manager is not None
            assert "database" in m.bulkhead_manager.get_all_pools_status()
            with pytest.raises(FeatureDisabledError, match="chaos engineering is switched off"):
                await m.run_chaos_experiment("network_delay_test", "database")
        await manager.close()
        await manager2.close()

        async with ResilienceManager(config) as manager3:
            await manager3.register_service("database", db_client, SEED_CONFIG)
            assert list(manager3.services) == ["database"]
        assert manager3.get_system_status()["state"] == "closed"

    async def test_unreachable_redis_never_fails_calls(self) -> None:
        """With Redis down, the manager's calls run on local state; the URL is not echoed."""
        import socket

        from resilient import backends

        with socket.socket() as sock:  # a port with nothing listening
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        manager = await create_resilience_manager(
            redis_url=f"redis://:s3cret@127.0.0.1:{port}/0", logging_enabled=False
        )
        try:
            db = DB()
            await manager.register_service("database", db, SEED_CONFIG)
            async with manager.resilient_call("database", "query"):
                assert await db.query("SELECT 1") == [1]
            assert "s3cret" not in json.dumps(manager.get_system_status())
        finally:
            await manager.close()
            backends.reset()


class TestConfig:
    @pytest.mark.parametrize(
        ("var", "raw", "expected"),
        [
            pytest.param("RESILIENCE_SERVICE_NAME", "svc", "svc", id="service_name"),
            pytest.param("RESILIENCE_ENVIRONMENT", "staging", "staging", id="environment"),
            pytest.param("RESILIENCE_CIRCUIT_BREAKER_ENABLED", "false", False, id="cb"),
            pytest.param("RESILIENCE_ADAPTIVE_CIRCUIT_BREAKER_ENABLED", "true", True, id="acb"),
            pytest.param("RESILIENCE_RETRY_ENABLED", "0", False, id="retry"),
            pytest.param("RESILIENCE_MAX_RETRY_ATTEMPTS", "7", 7, id="attempts"),
            pytest.param("RESILIENCE_HEALTH_MONITORING_ENABLED", "no", False, id="health"),
            pytest.param("RESILIENCE_HEALTH_CHECK_INTERVAL", "12.5", 12.5, id="interval"),
            pytest.param("RESILIENCE_BULKHEAD_ENABLED", "off", False, id="bulkhead"),
            pytest.param("RESILIENCE_MAX_CONCURRENT_REQUESTS", "42", 42, id="concurrent"),
            pytest.param("RESILIENCE_CHAOS_ENGINEERING_ENABLED", "yes", True, id="chaos"),
            pytest.param("RESILIENCE_METRICS_ENABLED", "false", False, id="metrics"),
            pytest.param("RESILIENCE_PROMETHEUS_ENABLED", "true", True, id="prometheus"),
            pytest.param("RESILIENCE_REDIS_URL", "redis://h:1/0", "redis://h:1/0", id="redis"),
        ],
    )
    def test_reads_each_seed_variable(
        self, monkeypatch: pytest.MonkeyPatch, var: str, raw: str, expected: object
    ) -> None:
        """Every RESILIENCE_* variable of the seed sets its field."""
        monkeypatch.setenv(var, raw)
        assert expected == getattr(ResilienceConfig(), ENV_VARS[var])

    def test_explicit_arguments_win(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An argument wins over the environment, which wins over the default."""
        monkeypatch.setenv("RESILIENCE_ENVIRONMENT", "staging")
        assert ResilienceConfig(environment="production").environment == "production"
        assert ResilienceConfig().environment == "staging"

    def test_bad_variable_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bad value names the variable."""
        monkeypatch.setenv("RESILIENCE_MAX_RETRY_ATTEMPTS", "lots")
        with pytest.raises(ValueError, match="RESILIENCE_MAX_RETRY_ATTEMPTS"):
            ResilienceConfig()

    def test_unknown_field(self) -> None:
        """Unknown fields are errors."""
        with pytest.raises(ValueError, match="circuit_breaker_enable"):
            ResilienceConfig(circuit_breaker_enable=True)  # type: ignore[call-arg]


class TestRegistration:
    async def test_flat_keys_map_onto_a_policy(self, manager: ResilienceManager) -> None:
        """Every flat key lands on its documented field."""
        await manager.register_service("db", DB(), SEED_CONFIG)
        policy = manager._pipeline(manager._service("db")).policy
        for key, target in FLAT_KEYS.items():
            if target is None:
                continue
            section, field = target
            assert SEED_CONFIG[key] == getattr(getattr(policy, section), field), key
        assert (manager.get_service_status("db")["failure_modes"]) == [
            "network_delay",
            "timeout",
            "exception",
        ]

    async def test_config_defaults_apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """max_retry_attempts / max_concurrent_requests are the defaults of services."""
        config = ResilienceConfig(max_retry_attempts=5, max_concurrent_requests=9)
        async with ResilienceManager(config) as manager:
            await manager.register_service("db", DB())
            policy = manager._pipeline(manager._service("db")).policy
            assert policy.retry is not None
            assert policy.bulkhead is not None
            assert policy.retry.max_attempts == 5
            assert policy.bulkhead.max_concurrent_requests == 9

    async def test_unknown_key_suggests(self, manager: ResilienceManager) -> None:
        """An unknown flat key is an error with a did-you-mean."""
        with pytest.raises(PolicyError, match="did you mean 'failure_threshold'"):
            await manager.register_service("db", DB(), {"failure_treshold": 3})

    async def test_bad_value_names_key(self, manager: ResilienceManager) -> None:
        """A bad value names the flat key."""
        with pytest.raises(PolicyError, match="max_concurrent"):
            await manager.register_service("db", DB(), {"max_concurrent": 0})

    async def test_twice_is_an_error_unless_replace(self, manager: ResilienceManager) -> None:
        """Registering a name twice fails; replace=True replaces."""
        await manager.register_service("db", DB())
        with pytest.raises(ServiceExistsError, match="replace=True"):
            await manager.register_service("db", DB())
        new = DB()
        await manager.register_service("db", new, {"failure_threshold": 2}, replace=True)
        assert new is manager.services["db"]

    async def test_unknown_service_lists_registered(self, manager: ResilienceManager) -> None:
        """An unknown name raises a clear error listing the registered services."""
        await manager.register_service("database", DB())
        with pytest.raises(ServiceNotFoundError, match="did you mean 'database'") as info:
            manager.get_service_status("databse")
        assert "registered: 'database'" in str(info.value)
        with pytest.raises(KeyError):
            manager.circuit_breakers["nope"]
        assert manager.circuit_breakers.get("nope") is None
        with pytest.raises(ServiceNotFoundError):
            manager.resilient_call("nope")

    async def test_named_policy(self, manager: ResilienceManager) -> None:
        """policy= uses a policy from the files; an unknown one fails at registration."""
        resilient.load_policies(
            {"version": 1, "policies": {"broker": {"circuit_breaker": {"failure_threshold": 2}}}}
        )
        await manager.register_service("broker-svc", DB(), policy="broker")
        status = manager.get_service_status("broker-svc")
        assert status["source"] == {"kind": "policy", "policy": "broker"}
        assert status["circuit_breaker"]["config"]["failure_threshold"] == 2
        assert "retry" not in status
        with pytest.raises(PolicyError, match="unknown policy"):
            await manager.register_service("x", DB(), policy="nope")

    async def test_requires_initialize(self) -> None:
        """Registering before initialize() (or after close) says what to do."""
        manager = ResilienceManager(ResilienceConfig(logging_enabled=False))
        with pytest.raises(RuntimeError, match="initialize"):
            await manager.register_service("db", DB())
        await manager.initialize()
        await manager.close()
        with pytest.raises(RuntimeError, match="closed"):
            await manager.register_service("db", DB())


class TestFeaturesOff:
    async def test_switched_off_features_are_absent(self) -> None:
        """Breaker, retry, bulkhead and health switched off leave no trace."""
        config = ResilienceConfig(
            circuit_breaker_enabled=False,
            retry_enabled=False,
            bulkhead_enabled=False,
            health_monitoring_enabled=False,
            metrics_enabled=False,
            logging_enabled=False,
        )
        async with ResilienceManager(config) as manager:
            await manager.register_service("db", DB(), SEED_CONFIG)
            assert dict(manager.circuit_breakers) == {}
            assert dict(manager.retry_managers) == {}
            assert manager.bulkhead_manager is None
            assert manager.health_monitor is None
            status = manager.get_service_status("db")
            for key in ("circuit_breaker", "retry", "bulkhead", "health", "calls", "timeouts"):
                assert key not in status
            assert status["strategies"] == []
            assert "health" not in manager.get_system_status()
            with pytest.raises(FeatureDisabledError):
                await manager.run_health_check("db")

    async def test_named_policy_loses_switched_off_sections(self) -> None:
        """A policy from the files loses the sections the config switches off."""
        resilient.load_policies(
            {
                "version": 1,
                "policies": {"p": {"circuit_breaker": {}, "retry": {"max_attempts": 2}}},
            }
        )
        config = ResilienceConfig(circuit_breaker_enabled=False, logging_enabled=False)
        async with ResilienceManager(config) as manager:
            await manager.register_service("svc", policy="p")
            assert dict(manager.circuit_breakers) == {}
            assert list(manager.retry_managers) == ["svc"]


class TestGuardedBlock:
    async def test_block_is_not_retried_and_errors_pass_through(
        self, manager: ResilienceManager
    ) -> None:
        """The with block runs once; the user's exception is the same object."""
        await manager.register_service("db", DB(), {"failure_threshold": 2})
        boom = ConnectionError("down")
        runs = 0

        async def block() -> None:
            nonlocal runs
            async with manager.resilient_call("db", "query"):
                runs += 1
                raise boom

        with pytest.raises(ConnectionError) as info:
            await block()
        assert info.value is boom
        assert runs == 1
        assert manager.get_service_status("db")["calls"]["failure"] == 1

    async def test_breaker_opens_and_rejects_on_entry(self, manager: ResilienceManager) -> None:
        """Failures open the breaker; the next block is rejected before it runs."""
        await manager.register_service("db", DB(), {"failure_threshold": 2})
        for _ in range(2):
            with pytest.raises(ConnectionError):
                async with manager.resilient_call("db"):
                    raise ConnectionError
        ran = False
        with pytest.raises(CircuitOpenError):
            async with manager.resilient_call("db"):
                ran = True
        assert not ran
        calls = manager.get_service_status("db")["calls"]
        assert (calls["failure"], calls["rejected"]) == (2, 1)
        # an open breaker degrades the service; it does not take it out of the load balancer
        assert manager.get_service_status("db")["health"]["status"] == "degraded"

    async def test_timeout_cancels_the_block(self, manager: ResilienceManager) -> None:
        """The block runs under the smaller time budget and raises AttemptTimeoutError."""
        await manager.register_service(
            "slow", policy=resilient.Policy(timeout=resilient.TimeoutConfig(per_attempt=0.02))
        )
        with pytest.raises(AttemptTimeoutError):
            async with manager.resilient_call("slow"):
                await asyncio.sleep(1)
        assert manager.get_service_status("slow")["calls"]["timeout"] == 1

    async def test_bulkhead_full_rejects(self, manager: ResilienceManager) -> None:
        """A full bulkhead rejects the block; the slot is given back afterwards."""
        await manager.register_service(
            "iso",
            policy=resilient.Policy(
                bulkhead=resilient.BulkheadConfig(
                    max_concurrent_requests=1, acquire_timeout=0, enable_auto_scaling=False
                )
            ),
        )
        inside = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            async with manager.resilient_call("iso"):
                inside.set()
                await release.wait()

        task = asyncio.create_task(hold())
        await inside.wait()
        with pytest.raises(BulkheadFullError):
            async with manager.resilient_call("iso"):
                pass
        release.set()
        await task
        assert manager.get_service_status("iso")["bulkhead"]["in_use"] == 0
        async with manager.resilient_call("iso"):
            pass


class TestRetryingForms:
    async def test_call_retries(self, manager: ResilienceManager, sleeps: Sleeps) -> None:
        """manager.call retries through the service's policy and counts it."""
        db = DB()
        await manager.register_service("db", db, {"max_retry_attempts": 3})
        db.failing = ConnectionError("flaky")
        with pytest.raises(ConnectionError):
            await manager.call("db", db.query, "SELECT 1")
        assert db.calls == 3
        assert len(sleeps) == 2
        retry = manager.retry_managers["db"].get_metrics()
        assert retry["retries_scheduled"] == 2
        assert retry["exhausted_by_reason"] == {"attempts": 1}
        db.failing = None
        assert await manager.call("db", "query", "SELECT 1") == [1]
        assert await manager.call("db", "query_sync", "SELECT 1") == [1]  # sync: a thread

    async def test_call_unknown_method(self, manager: ResilienceManager) -> None:
        """A method name the instance lacks is an AttributeError naming it."""
        await manager.register_service("db", DB())
        with pytest.raises(AttributeError, match="no method 'nope'"):
            await manager.call("db", "nope")

    async def test_attempts(self, manager: ResilienceManager, sleeps: Sleeps) -> None:
        """async for attempt in manager.attempts(...) retries the block."""
        await manager.register_service("db", DB(), {"max_retry_attempts": 3})
        seen = []
        async for attempt in manager.attempts("db"):
            with attempt:
                seen.append(attempt.number)
                if attempt.number < 3:
                    raise ConnectionError
        assert seen == [1, 2, 3]


class TestStatus:
    async def test_shapes_are_documented_and_serialisable(self, manager: ResilienceManager) -> None:
        """The status dicts carry the documented keys and survive json.dumps."""
        await manager.register_service("db", DB(), SEED_CONFIG)
        async with manager.resilient_call("db", "query"):
            pass
        system = json.loads(json.dumps(manager.get_system_status()))
        assert {
            "service_name",
            "environment",
            "version",
            "backend",
            "backend_status",
            "state",
            "started_at",
            "uptime_seconds",
            "features",
            "unavailable",
            "services",
            "summary",
            "health",
        } == set(system)
        service = system["services"]["db"]
        assert {
            "name",
            "source",
            "instance_type",
            "registered_at",
            "strategies",
            "failure_modes",
            "circuit_breaker",
            "retry",
            "bulkhead",
            "timeouts",
            "health",
            "calls",
        } == set(service)
        assert service["strategies"] == ["timeout", "retry", "circuit_breaker", "bulkhead"]
        assert service["calls"]["success"] == 1
        assert service["timeouts"] == {"per_attempt": 30.0, "total": 60.0}
        summary = manager.health_monitor.get_system_health_summary()  # type: ignore[union-attr]
        assert {"status", "score", "source", "active_checks", "counts", "services"} <= set(summary)


class TestEvents:
    async def test_health_changed_on_breaker_transition(self, manager: ResilienceManager) -> None:
        """A breaker opening degrades the service's health, as an event."""
        events: list[object] = []
        resilient.subscribe(events.append)
        await manager.register_service("db", DB(), {"failure_threshold": 1})
        with pytest.raises(ConnectionError):
            async with manager.resilient_call("db"):
                raise ConnectionError
        changes = [e for e in events if isinstance(e, HealthChanged)]
        assert [(e.old_status, e.new_status) for e in changes[-1:]] == [("unknown", "degraded")]
        assert "circuit_breaker:open" in changes[-1].reason
        summary = manager.health_monitor.get_system_health_summary()  # type: ignore[union-attr]
        assert summary["status"] == "degraded"

    async def test_raising_subscribers_never_break_manager_calls(
        self, manager: ResilienceManager, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Sync and async subscribers that raise are logged; the calls carry on."""

        def bad(event: object) -> None:
            raise RuntimeError("sync subscriber")

        async def abad(event: object) -> None:
            raise RuntimeError("async subscriber")

        resilient.subscribe(bad)
        resilient.subscribe(abad)
        db = DB()
        await manager.register_service("db", db, {"failure_threshold": 3})
        db.failing = ConnectionError()
        with pytest.raises(ConnectionError):
            await manager.call("db", "query", "SELECT 1")  # retry, exhausted, transition
        with pytest.raises(CircuitOpenError):
            async with manager.resilient_call("db"):
                pass
        db.failing = None
        await asyncio.sleep(0)
        assert any("raised" in r.getMessage() for r in caplog.records)
        assert manager.retry_managers["db"].get_metrics()["retries_scheduled"] == 2
        assert manager.circuit_breakers["db"].state == "open"

    async def test_manager_only_counts_its_services(self, manager: ResilienceManager) -> None:
        """Events of other policies do not touch the manager's services."""
        await manager.register_service("db", DB())
        resilient.events.bus.emit(BreakerStateChanged("other", "closed", "open"))
        resilient.events.bus.emit(RetryScheduled("other", "f", 1, 0.1, "E"))
        assert manager.retry_managers["db"].get_metrics()["retries_scheduled"] == 0


class TestSharedCounts:
    async def test_decorated_calls_of_the_service_name_are_counted(
        self, manager: ResilienceManager, sleeps: Sleeps
    ) -> None:
        """@resilient(..., name="svc") calls show in service "svc"'s calls and retries."""
        resilient.load_policies(
            {"version": 1, "policies": {"p": {"retry": {"max_attempts": 2, "base_delay": 0.01}}}}
        )
        await manager.register_service("svc", policy="p")

        @resilient.resilient("p", name="svc")
        async def fetch(fail: bool) -> int:
            if fail:
                raise ConnectionError
            return 1

        @resilient.resilient("p", name="svc")
        def fetch_sync() -> int:
            return 2

        assert await fetch(False) == 1
        with pytest.raises(ConnectionError):
            await fetch(True)
        assert fetch_sync() == 2
        async with manager.resilient_call("svc", "block"):
            pass
        calls = manager.get_service_status("svc")["calls"]
        assert (calls["total"], calls["success"], calls["failure"]) == (4, 3, 1)
        retry = manager.retry_managers["svc"].get_metrics()
        assert (retry["retries_scheduled"], retry["exhausted_by_reason"]) == (1, {"attempts": 1})
        assert retry["total_delay"] > 0

    async def test_two_managers_read_the_same_counts(self, manager: ResilienceManager) -> None:
        """Counts belong to the name, not to a manager: nothing is counted twice or apart."""
        await manager.register_service("db", DB())
        async with ResilienceManager(ResilienceConfig(logging_enabled=False)) as other:
            await other.register_service("db", DB())
            async with manager.resilient_call("db"):
                pass
            with pytest.raises(ValueError):
                async with other.resilient_call("db"):
                    raise ValueError("bad")
            for m in (manager, other):
                calls = m.get_service_status("db")["calls"]
                assert (calls["total"], calls["success"], calls["failure"]) == (2, 1, 1)
                assert calls["last_error_type"] == "ValueError"


class TestLastErrorType:
    async def test_last_error_type_of_call_and_of_the_decorator(
        self, manager: ResilienceManager, sleeps: Sleeps
    ) -> None:
        db = DB()
        await manager.register_service("db", db, {"max_retry_attempts": 1})
        db.failing = LookupError()
        with pytest.raises(LookupError):
            await manager.call("db", "query", "x")
        assert manager.get_service_status("db")["calls"]["last_error_type"] == "LookupError"

        @resilient.resilient(resilient.Policy(), name="db")
        def direct() -> None:
            raise KeyError("k")

        with pytest.raises(KeyError):
            direct()
        assert manager.get_service_status("db")["calls"]["last_error_type"] == "KeyError"


def test_a_bad_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILIENCE_HEALTH_CHECK_INTERVAL", "-5")
    with pytest.raises(resilient.PolicyError, match="RESILIENCE_HEALTH_CHECK_INTERVAL"):
        resilient.ResilienceConfig()
    monkeypatch.setenv("RESILIENCE_HEALTH_CHECK_INTERVAL", "5")
    monkeypatch.setenv("RESILIENCE_REDIS_URL", "redis://:hunter2@localhost:99999")
    with pytest.raises(resilient.PolicyError) as caught:
        resilient.ResilienceConfig()
    assert "RESILIENCE_REDIS_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)

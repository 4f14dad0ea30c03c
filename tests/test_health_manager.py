"""The manager's health monitoring (issue 11): run_health_check, instances' health_check()."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

import resilient
from resilient import (
    FeatureDisabledError,
    HealthCheckConfig,
    ResilienceManager,
    ServiceNotFoundError,
    create_resilience_manager,
)
from resilient.health import HealthMonitor


class Client:
    """A client with a sync health_check()."""

    def __init__(self) -> None:
        self.up = True
        self.probes = 0

    def health_check(self) -> bool:
        self.probes += 1
        return self.up


class AsyncClient:
    """A client with an async health_check() that raises when down."""

    def __init__(self) -> None:
        self.up = True

    async def health_check(self) -> None:
        if not self.up:
            raise ConnectionError("no route to host")


@pytest.fixture(name="manager")
async def _manager() -> AsyncIterator[ResilienceManager]:
    manager = await create_resilience_manager(
        service_name="app", logging_enabled=False, health_check_interval=3600
    )
    yield manager
    await manager.close()


async def test_run_health_check_uses_the_instances_health_check(
    manager: ResilienceManager,
) -> None:
    client, other = Client(), AsyncClient()
    await manager.register_service("database", client, {"failure_threshold": 5})
    await manager.register_service("cache", other)
    assert isinstance(manager.health_monitor, HealthMonitor)
    health = await manager.run_health_check("database")
    json.dumps(health)
    assert (health["status"], client.probes) == ("healthy", 1)
    assert health["checks"]["health_check"]["kind"] == "shallow"
    other.up = False
    for _ in range(3):  # failure_threshold of the default config
        health = await manager.run_health_check("cache")
    assert health["status"] == "unhealthy"
    assert health["checks"]["health_check"]["error"] == "ConnectionError: no route to host"
    status = manager.get_system_status()
    assert status["summary"]["health"] == "unhealthy"
    assert "health_checks" not in status["unavailable"]
    assert status["services"]["database"]["health"]["status"] == "healthy"


async def test_the_manager_runs_the_scheduler_at_its_interval() -> None:
    client = Client()
    async with ResilienceManager(
        resilient.ResilienceConfig(health_check_interval=0.02, logging_enabled=False)
    ) as manager:
        await manager.register_service("database", client)
        await asyncio.sleep(0.2)
        assert client.probes >= 4
        assert manager.health_monitor is not None
        assert manager.health_monitor.running
        assert manager.health_monitor.config.check_interval == 0.02
    assert not manager.health_monitor.running
    probes = client.probes
    await asyncio.sleep(0.05)
    assert client.probes == probes  # stopped with the manager


async def test_unknown_services_are_refused(manager: ResilienceManager) -> None:
    await manager.register_service("database", Client())
    monitor = manager.health_monitor
    assert monitor is not None
    with pytest.raises(ServiceNotFoundError, match="did you mean 'database'"):
        monitor.add_check("databse", lambda: True)
    with pytest.raises(ServiceNotFoundError, match="did you mean 'database'"):
        await manager.run_health_check("databse")
    with pytest.raises(ServiceNotFoundError):
        monitor.get_service_health("nope")
    monitor.add_check("database", lambda: True, kind="deep", name="select_one")
    assert set((await manager.run_health_check("database"))["checks"]) == {
        "health_check",
        "select_one",
    }
    await manager.unregister_service("database")
    assert monitor.services == []


async def test_switched_off_health_monitoring() -> None:
    async with ResilienceManager(
        resilient.ResilienceConfig(health_monitoring_enabled=False, logging_enabled=False)
    ) as manager:
        await manager.register_service("database", Client())
        with pytest.raises(FeatureDisabledError, match="health monitoring is switched off"):
            await manager.run_health_check("database")


async def test_a_policy_health_section_judges_the_service_and_watches_its_calls(
    manager: ResilienceManager,
) -> None:
    policy = resilient.Policy(
        health=HealthCheckConfig(failure_threshold=1, min_calls=2, response_time_threshold=1.0)
    )
    await manager.register_service("api", Client(), policy=policy)
    await manager.run_health_check("api")  # starts watching the live calls

    async def fails() -> None:
        raise ConnectionError

    for _ in range(3):
        with pytest.raises(ConnectionError):
            await manager.call("api", fails)
    health = await manager.run_health_check("api")
    # the instance's check passes, the live calls fail: degraded, not unhealthy
    assert health["status"] == "degraded"
    assert health["checks"]["live_calls"]["detail"]["error_rate"] == 1.0


async def test_a_replaced_service_starts_afresh(manager: ResilienceManager) -> None:
    client = Client()
    client.up = False
    await manager.register_service("database", client)
    for _ in range(3):
        await manager.run_health_check("database")
    assert manager.get_service_status("database")["health"]["status"] == "unhealthy"
    await manager.register_service("database", Client(), replace=True)
    health = manager.get_service_status("database")["health"]
    assert (health["status"], health["checks"]["health_check"]["status"]) == (
        "unknown",
        "unknown",
    )


async def test_replacing_a_service_keeps_the_checks_the_user_added(
    manager: ResilienceManager,
) -> None:
    first, second = Client(), Client()
    await manager.register_service("db", first)
    monitor = manager.health_monitor
    assert monitor is not None
    monitor.add_check("db", lambda: True, kind="deep", name="select1")
    await manager.register_service("db", second, replace=True)
    health = await manager.run_health_check("db")
    assert sorted(health["checks"]) == ["health_check", "select1"]
    assert (first.probes, second.probes) == (0, 1)  # the new instance's probe only
    await manager.register_service("db", replace=True)  # no instance: no health_check
    assert list(monitor.get_service_health("db")["checks"]) == ["select1"]

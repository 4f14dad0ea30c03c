"""
The seed's ResilienceManager, as the issue's code block writes it (in memory).

Run it: ``python examples/manager_quickstart.py``. It prints the status dicts
as JSON and the health check's answer; ``run_chaos_experiment``, which this
version does not implement yet, says so.
"""

from __future__ import annotations

import asyncio
import json

from resilient import (
    FeatureDisabledError,
    ResilienceConfig,
    ResilienceManager,
    create_resilience_manager,
)


class DatabaseClient:
    """Stands in for a real database client."""

    async def query(self, sql: str) -> list[tuple[int]]:
        await asyncio.sleep(0)
        return [(1,)]

    async def health_check(self) -> bool:
        """The manager makes this the service's shallow health check."""
        return await self.query("SELECT 1") == [(1,)]


async def main() -> None:
    db_client = DatabaseClient()

    manager = await create_resilience_manager(
        service_name="trading_app", environment="production", redis_url=None
    )  # None: in-memory backend
    await manager.register_service(
        service_name="database",
        service_instance=db_client,
        service_config={
            "failure_threshold": 5,
            "timeout_seconds": 30,
            "max_retry_attempts": 3,
            "retry_base_delay": 1.0,
            "max_threads": 10,
            "max_connections": 5,
            "max_concurrent": 20,
            "failure_modes": ["network_delay", "timeout", "exception"],
        },
    )
    async with manager.resilient_call("database", "query"):
        rows = await db_client.query("SELECT 1")
    print("rows:", rows)
    await manager.close()

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
    manager = ResilienceManager(config)
    await manager.initialize()
    await manager.register_service("database", db_client, {"failure_threshold": 5})
    async with manager.resilient_call("database", "query"):
        await db_client.query("SELECT 1")
    # the retrying form
    print("call:", await manager.call("database", "query", "SELECT 1"))

    print(json.dumps(manager.get_system_status(), indent=2)[:400], "...")
    print(json.dumps(manager.get_service_status("database"), indent=2)[:400], "...")
    health = await manager.run_health_check("database")  # the client's health_check()
    print("run_health_check:", health["status"])
    print("health:", manager.health_monitor.get_system_health_summary()["status"])
    print("breaker:", manager.circuit_breakers["database"].get_status()["state"])
    print("retry:", manager.retry_managers["database"].get_metrics()["retries_scheduled"])
    print("bulkheads:", sorted(manager.bulkhead_manager.get_all_pools_status()))
    try:
        await manager.run_chaos_experiment("network_delay_test", "database")
    except (FeatureDisabledError, NotImplementedError) as exc:
        print("run_chaos_experiment:", exc)
    await manager.close()

    async with ResilienceManager(config) as manager:
        await manager.register_service("database", db_client, {"failure_threshold": 5})
        print("services:", list(manager.services))


if __name__ == "__main__":
    asyncio.run(main())

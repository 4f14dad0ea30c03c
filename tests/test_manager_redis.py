"""The seed's manager code block against a real Redis (the fleet backend), not only in memory."""

from __future__ import annotations

import asyncio

from redis_support import RedisServer
from test_manager import SEED_CONFIG

import resilient
from resilient import backends, create_resilience_manager


async def test_manager_on_redis(server: RedisServer) -> None:
    """create_resilience_manager(redis_url=...) puts the services' breakers on Redis."""

    class DB:
        async def query(self, sql: str) -> list[int]:
            return [1]

    db_client = DB()
    manager = await create_resilience_manager(
        service_name="trading_app", environment="production", redis_url=server.url
    )
    try:
        await manager.register_service(
            service_name="database",
            service_instance=db_client,
            service_config=SEED_CONFIG,
        )
        async with manager.resilient_call("database", "query"):
            rows = await db_client.query("SELECT 1")
        assert rows == [1]
        assert manager.circuit_breakers["database"].get_status()["state"] == "closed"
        assert "redis" in str(manager.get_system_status()["backend"]).lower()
        # An open breaker is shared through Redis: its state is stored there.
        resilient.get_breaker("database").open()
        import redis

        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            keys: list[str] = []
            for _ in range(200):  # the transition is written by the backend's thread
                keys = client.keys("*database*")
                if keys:
                    break
                await asyncio.sleep(0.01)
        finally:
            client.close()
        assert keys, "the breaker's shared state is in Redis"
    finally:
        await manager.close()
        backends.reset()

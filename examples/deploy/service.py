"""
An example service, "orders": a database and a payment API behind resilient
policies, with its health served over HTTP for Kubernetes.

    uvicorn service:app --host 0.0.0.0 --port 8080       # what the Dockerfile runs

The manager reads the ``RESILIENCE_*`` environment variables (the Deployment sets
them) and the policies of ``RESILIENCE_POLICY_FILE``. With FastAPI installed, ``app``
is a FastAPI application with the health endpoints mounted; without it, ``app`` serves
the health endpoints alone (``/health``, ``/health/live``, ``/health/ready``,
``/metrics``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from resilient import ResilienceManager
from resilient.health import asgi_app


class Database:
    """Stands in for your database client (an asyncpg pool, SQLAlchemy engine...)."""

    async def health_check(self) -> bool:
        return True  # a real client runs `SELECT 1` on its pool here

    async def fetch_order(self, order_id: int) -> dict[str, Any]:
        return {"id": order_id, "status": "paid"}


class PaymentAPI:
    """Stands in for the payment provider's HTTP client."""

    async def health_check(self) -> bool:
        return True  # a real client calls the provider's status endpoint here


manager = ResilienceManager()  # ResilienceConfig from RESILIENCE_*
health = asgi_app(
    manager.health_monitor,
    service_id=manager.config.service_name,
    description="orders: health of the service and its dependencies",
)


@asynccontextmanager
async def running() -> AsyncIterator[None]:
    """The manager's life: services registered, checks scheduled, closed at the end."""
    await manager.initialize()
    await manager.register_service("database", Database(), policy="database")
    await manager.register_service("payments", PaymentAPI(), policy="payments")
    try:
        yield
    finally:
        await manager.close()


try:
    from fastapi import FastAPI
except ImportError:  # the health endpoints alone, as a plain ASGI app

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await health(scope, receive, send)
            return
        await receive()  # lifespan.startup
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(running())
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await stack.aclose()
        await send({"type": "lifespan.shutdown.complete"})

else:

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with running():
            yield

    app = FastAPI(title="orders", lifespan=lifespan)

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, Any]:
        order: dict[str, Any] = await manager.call("database", "fetch_order", order_id)
        return order

    # Last: a mount at "/" answers every path that no route above matched.
    app.mount("/", health)

"""
Prometheus metrics of the decorator and the manager, scraped over HTTP.

Run it: ``python examples/metrics_server.py``. It serves the metrics with
prometheus-client's own HTTP server on 127.0.0.1 (a free port), makes a few
calls (one fails, is retried, and succeeds), scrapes itself and prints the
``resilient_*`` lines. Point Prometheus at the same kind of server and import
docs/grafana-dashboard.json into Grafana.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request

from prometheus_client import start_http_server

import resilient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


resilient.load_policies(
    {
        "version": 1,
        "policies": {
            "broker": {
                "retry": {"max_attempts": 3, "base_delay": 0.01, "jitter": False},
                "circuit_breaker": {"failure_threshold": 5},
                "bulkhead": {"max_concurrent_requests": 10},
            }
        },
    }
)

attempts: list[int] = []


@resilient.resilient("broker")
async def place_order(order_id: int) -> str:
    attempts.append(order_id)
    if len(attempts) == 1:
        raise ConnectionError("broker hiccup")
    return f"order {order_id} placed"


async def main() -> None:
    resilient.enable_metrics()  # prometheus_client's default REGISTRY
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1")

    print(await place_order(1))
    print(await place_order(2))
    async with resilient.ResilienceManager() as manager:
        await manager.register_service("database", None, {"failure_threshold": 5})
        async with manager.resilient_call("database", "query"):
            pass

    body = await asyncio.to_thread(scrape, port)
    server.shutdown()
    server.server_close()
    thread.join(5)
    for line in body.splitlines():
        if line.startswith("resilient_") and not line.startswith(
            "resilient_call_duration_seconds_bucket"
        ):
            print(line)


if __name__ == "__main__":
    asyncio.run(main())

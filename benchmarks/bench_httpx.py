"""
What ``resilient.httpx`` costs a request that succeeds at once: an httpx client whose
transport goes through a policy (retry + circuit breaker), against the same client
without it and against stamina's ``retry`` around the same request (how stamina is
used with httpx).

Usage::

    python benchmarks/bench_httpx.py [--quick]

Two servers: httpx's ``MockTransport`` (no I/O, so the figures are the libraries'
own cost, the worst case for the ratios) and a stdlib HTTP/1.1 server on 127.0.0.1
(a realistic floor: one keep-alive round trip on the loopback).

Method (as benchmarks/bench_health.py): one sample is a block of ``n`` requests timed
with ``perf_counter_ns``, the variants measured one after the other in a rotated order
each round, the minimum over rounds kept, ``gc`` off while a block runs. No target is
gated: the rows are for information.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import threading
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from _blocks import best_of_async, best_of_sync
from _runner import Context, Row

import resilient
from resilient.httpx import AsyncResilientTransport, ResilientTransport

POLICIES = {
    "version": 1,
    "policies": {
        "api": {
            "retry": {"max_attempts": 3, "base_delay": 0.01},
            "circuit_breaker": {"failure_threshold": 5},
        }
    },
}


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"ok")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers and body wait on a delayed ACK (40 ms)

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def _measure(variants: list[Callable[[], Any]], rounds: int, block_ms: float) -> list[float]:
    return best_of_sync(variants, rounds, block_ms, warmup=200)


async def _ameasure(
    variants: list[Callable[[], Awaitable[Any]]], rounds: int, block_ms: float
) -> list[float]:
    return await best_of_async(variants, rounds, block_ms, warmup=200)


def _sync_case(
    inner: Callable[[], httpx.BaseTransport], target: str, rounds: int, block_ms: float
) -> list[float]:
    import stamina

    with (
        httpx.Client(transport=inner()) as plain,
        httpx.Client(transport=ResilientTransport("api", inner())) as ours,
    ):
        retried = stamina.retry(on=httpx.TransportError, attempts=3)(plain.get)
        return _measure(
            [lambda: plain.get(target), lambda: retried(target), lambda: ours.get(target)],
            rounds,
            block_ms,
        )


async def _async_case(
    inner: Callable[[], httpx.AsyncBaseTransport], target: str, rounds: int, block_ms: float
) -> list[float]:
    import stamina

    async with (
        httpx.AsyncClient(transport=inner()) as plain,
        httpx.AsyncClient(transport=AsyncResilientTransport("api", inner())) as ours,
    ):
        retried = stamina.retry(on=httpx.TransportError, attempts=3)(plain.get)
        return await _ameasure(
            [lambda: plain.get(target), lambda: retried(target), lambda: ours.get(target)],
            rounds,
            block_ms,
        )


def measure(rounds: int, block_ms: float) -> list[tuple[str, float, float, float]]:
    """``(case, plain, stamina, resilient)`` in ns per request."""
    resilient.load_policies(POLICIES)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    mock = "http://mock.test/"
    try:
        cases = [
            (
                "MockTransport, sync",
                _sync_case(lambda: httpx.MockTransport(_ok), mock, rounds, block_ms),
            ),
            ("127.0.0.1 server, sync", _sync_case(httpx.HTTPTransport, url, rounds, block_ms)),
            (
                "MockTransport, async",
                asyncio.run(_async_case(lambda: httpx.MockTransport(_ok), mock, rounds, block_ms)),
            ),
            (
                "127.0.0.1 server, async",
                asyncio.run(_async_case(httpx.AsyncHTTPTransport, url, rounds, block_ms)),
            ),
        ]
    finally:
        server.shutdown()
        server.server_close()
    return [(case, f[0], f[1], f[2]) for case, f in cases]


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    if ctx.peer("stamina") is None:
        return [Row.missing("httpx transport", "stamina")]
    rounds, block_ms = ctx.pick((9, 50.0), (3, 20.0), (1, 2.0))
    rows: list[Row] = []
    for case, plain, with_stamina, ours in measure(rounds, block_ms):
        rows.append(Row(f"httpx transport, {case}", ours, "ns/req", "plain httpx", plain))
        rows.append(Row(f"httpx transport, {case}", ours, "ns/req", "stamina.retry", with_stamina))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 ms blocks")
    args = parser.parse_args(argv)
    rounds, block_ms = (3, 20.0) if args.quick else (9, 50.0)
    rows = measure(rounds, block_ms)
    print(
        f"Python {platform.python_version()} on {platform.machine()} "
        f"({platform.system()}), {rounds} rounds of {block_ms:g} ms blocks, min per variant\n"
    )
    print(
        "| case | plain httpx (µs/req) | stamina.retry (µs/req) | resilient transport "
        "(µs/req) | / plain | / stamina |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for case, plain, st, ours in rows:
        print(
            f"| {case} | {plain / 1000:.1f} | {st / 1000:.1f} | {ours / 1000:.1f} "
            f"| {ours / plain:.2f}x | {ours / st:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

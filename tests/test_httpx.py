"""resilient.httpx: httpx transports through a policy, against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Sleeps, load

import resilient
from resilient.httpx import AsyncResilientTransport, ResilientTransport, StatusFailure

# ---------------------------------------------------------------------------- the server


@dataclass
class Reply:
    """What the server answers to one request."""

    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False  # close the connection without answering


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    host: str
    body: bytes
    number: int


class Server:
    """
    A stdlib HTTP/1.1 server in a thread. Replies are scripted per path (popped in
    order; the last one repeats) and may depend on the Host header (``by_host``).
    """

    def __init__(self) -> None:
        self.scripts: dict[str, list[Reply]] = {}
        self.by_host: dict[str, Reply] = {}
        self.seen: list[Seen] = []
        self.answered: list[int] = []  # numbers of the requests answered, in order
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no delayed-ACK wait between headers and body

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            return b"".join(chunks)
                        chunks.append(chunk)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _serve(self) -> None:
                body = self._body()
                host = self.headers.get("Host", "").rsplit(":", 1)[0]
                with server.lock:
                    number = len(server.seen) + 1
                    server.seen.append(Seen(self.command, self.path, host, body, number))
                    reply = server.by_host.get(host)
                    if reply is None:
                        script = server.scripts.get(self.path) or [Reply()]
                        reply = script.pop(0) if len(script) > 1 else script[0]
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if reply.delay:
                    time.sleep(reply.delay)
                with server.lock:  # before the answer: a client that has it sees it counted
                    server.answered.append(number)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hung up on a slow answer (hedging, timeouts)

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def script(self, path: str, *replies: Reply) -> None:
        self.scripts[path] = list(replies)

    def count(self, path: str | None = None) -> int:
        return sum(1 for s in self.seen if path is None or s.path == path)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(name="servers")
def _servers() -> Iterator[Callable[[], Server]]:
    """A factory of servers, each stopped after the test."""
    made: list[Server] = []

    def make() -> Server:
        server = Server()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture(name="server")
def _server(servers: Callable[[], Server]) -> Server:
    return servers()


# ---------------------------------------------------------------------------- the clients

Send = Callable[..., Awaitable[httpx.Response]]


class Client:
    """One test body for both transports: ``await client.send("GET", url)``."""

    def __init__(
        self,
        kind: str,
        policy: str | resilient.Policy,
        limits: httpx.Limits | None = None,
        **client: Any,
    ) -> None:
        self.kind = kind
        pool = {"limits": limits} if limits is not None else {}
        if kind == "sync":
            self.transport: Any = ResilientTransport(policy, httpx.HTTPTransport(**pool))
            self.sync = httpx.Client(transport=self.transport, **client)
        else:
            self.transport = AsyncResilientTransport(policy, httpx.AsyncHTTPTransport(**pool))
            self.asynchronous = httpx.AsyncClient(transport=self.transport, **client)

    async def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self.kind == "sync":
            # the sync client in a worker thread, so both kinds share one test body
            return await asyncio.to_thread(self.sync.request, method, url, **kwargs)
        return await self.asynchronous.request(method, url, **kwargs)

    async def close(self) -> None:
        if self.kind == "sync":
            self.sync.close()
        else:
            await self.asynchronous.aclose()


@pytest.fixture(name="kind", params=["sync", "async"])
def _kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(name="client")
async def _client(kind: str) -> Any:
    """A client of policy ``api`` (load it in the test), sync or async."""
    made: list[Client] = []

    def make(policy: str | resilient.Policy = "api", **options: Any) -> Client:
        client = Client(kind, policy, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def api(**sections: Any) -> None:
    """Load policy ``api``: fast retries (base_delay 0.01, no jitter) plus *sections*."""
    retry = {"max_attempts": 3, "base_delay": 0.01, "jitter": False}
    retry.update(sections.pop("retry", {}))
    load(api={"retry": retry, **sections})


# ---------------------------------------------------------------------------- tests


class TestRetries:
    async def test_503_then_200(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """A 503 is retried and the caller gets the 200 that follows it."""
        api()
        server.script("/a", Reply(503, b"busy"), Reply(200, b"fine"))
        response = await client().send("GET", server.url("/a"))
        assert (response.status_code, response.content) == (200, b"fine")
        assert server.count("/a") == 2
        assert sleeps == [0.01]

    @pytest.mark.parametrize("status", [429, 502, 503, 504])
    async def test_default_failure_statuses(
        self, server: Server, client: Any, sleeps: Sleeps, status: int
    ) -> None:
        """429, 502, 503 and 504 are retried by default."""
        api()
        server.script("/s", Reply(status), Reply(200))
        assert (await client().send("GET", server.url("/s"))).status_code == 200
        assert server.count() == 2

    async def test_other_statuses_are_answers(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """A 500 or a 404 is not in the default list: returned at once, not retried."""
        api()
        server.script("/e", Reply(500, b"broken"))
        server.script("/n", Reply(404, b"missing"))
        c = client()
        assert (await c.send("GET", server.url("/e"))).status_code == 500
        assert (await c.send("GET", server.url("/n"))).status_code == 404
        assert server.count() == 2
        assert sleeps == []

    async def test_statuses_by_name(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """``failure_statuses`` takes names too, and replaces the default list."""
        api(http={"failure_statuses": ["internal_server_error"]})
        server.script("/e", Reply(500), Reply(200))
        server.script("/u", Reply(503))
        c = client()
        assert (await c.send("GET", server.url("/e"))).status_code == 200
        assert (await c.send("GET", server.url("/u"))).status_code == 503
        assert server.count() == 3

    async def test_exhausted_returns_the_last_response(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """When every attempt fails on a status, the caller gets the last response, body and
        headers intact, and no exception."""
        api()
        server.script(
            "/x",
            Reply(503, b"one"),
            Reply(503, b"two"),
            Reply(503, b"three", headers={"X-Try": "3"}),
        )
        response = await client().send("GET", server.url("/x"))
        assert (
            response.status_code,
            response.content,
            response.headers["x-try"],
        ) == (503, b"three", "3")
        assert server.count() == 3
        assert response.is_closed

    async def test_raise_on_exhausted(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """``raise_on_exhausted: true`` raises httpx.HTTPStatusError with the last response."""
        api(http={"raise_on_exhausted": True})
        server.script("/x", Reply(503, b"down"))
        with pytest.raises(httpx.HTTPStatusError) as caught:
            await client().send("GET", server.url("/x"))
        assert caught.value.response.status_code == 503
        assert caught.value.response.content == b"down"
        assert any("gave up after 3 attempts" in n for n in caught.value.__notes__)
        assert server.count() == 3

    async def test_policy_without_retry(self, server: Server, client: Any) -> None:
        """A policy with no retry section sends once and returns the failure response."""
        load(api={"circuit_breaker": {"failure_threshold": 5}})
        server.script("/x", Reply(503))
        assert (await client().send("GET", server.url("/x"))).status_code == 503
        assert server.count() == 1

    async def test_default_policy(self, server: Server, kind: str, sleeps: Sleeps) -> None:
        """Without a policy name the transport uses the built-in ``default`` policy and the
        default ``http:`` settings."""
        server.script("/x", Reply(503), Reply(200))
        transport: Any = ResilientTransport() if kind == "sync" else AsyncResilientTransport()
        if kind == "sync":
            with httpx.Client(transport=transport) as c:
                response = c.get(server.url("/x"))
        else:
            async with httpx.AsyncClient(transport=transport) as ac:
                response = await ac.get(server.url("/x"))
        assert response.status_code == 200
        assert server.count() == 2

    async def test_policy_object(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """A resilient.Policy works as well as a name."""
        policy = resilient.Policy.model_validate(
            {"retry": {"max_attempts": 2, "base_delay": 0.01}, "http": {"failure_statuses": [500]}}
        )
        server.script("/x", Reply(500), Reply(200))
        assert (await client(policy).send("GET", server.url("/x"))).status_code == 200
        assert server.count() == 2


class TestRetryAfter:
    async def test_seconds(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """A Retry-After in seconds is the delay before the next attempt."""
        api(retry={"max_delay": 60})
        server.script("/x", Reply(503, headers={"Retry-After": "7"}), Reply(200))
        assert (await client().send("GET", server.url("/x"))).status_code == 200
        assert sleeps == [7.0]

    async def test_http_date(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """A Retry-After HTTP-date waits until that moment."""
        api(retry={"max_delay": 60})
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        server.script("/x", Reply(429, headers={"Retry-After": when}), Reply(200))
        assert (await client().send("GET", server.url("/x"))).status_code == 200
        assert len(sleeps) == 1
        assert 27.0 < sleeps[0] <= 30.0

    async def test_capped_by_max_delay(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """A Retry-After beyond the retry section's max_delay waits max_delay."""
        api(retry={"max_delay": 5})
        server.script("/x", Reply(503, headers={"Retry-After": "3600"}), Reply(200))
        assert (await client().send("GET", server.url("/x"))).status_code == 200
        assert sleeps == [5.0]

    async def test_ignored_when_switched_off(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """``respect_retry_after: false`` keeps the policy's own backoff."""
        api(retry={"max_delay": 60}, http={"respect_retry_after": False})
        server.script("/x", Reply(503, headers={"Retry-After": "7"}), Reply(200))
        assert (await client().send("GET", server.url("/x"))).status_code == 200
        assert sleeps == [0.01]

    async def test_unreadable_header_keeps_the_backoff(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """A Retry-After that is neither seconds nor a date is ignored."""
        api()
        server.script("/x", Reply(503, headers={"Retry-After": "soon"}), Reply(200))
        assert (await client().send("GET", server.url("/x"))).status_code == 200
        assert sleeps == [0.01]


class TestMethods:
    async def test_post_not_retried_by_default(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """POST is not idempotent: one attempt, and its failure response is returned."""
        api()
        server.script("/p", Reply(503, b"busy"), Reply(200))
        response = await client().send("POST", server.url("/p"), content=b"order")
        assert (response.status_code, response.content) == (503, b"busy")
        assert server.count() == 1
        assert sleeps == []

    async def test_post_retried_when_listed(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """``retry_methods`` opts POST in; the same body is sent again."""
        api(http={"retry_methods": ["GET", "post"]})
        server.script("/p", Reply(503), Reply(200))
        response = await client().send("POST", server.url("/p"), json={"id": 1})
        assert response.status_code == 200
        assert [s.body for s in server.seen] == [b'{"id":1}', b'{"id":1}']

    @pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
    async def test_idempotent_methods_retried(
        self, server: Server, client: Any, sleeps: Sleeps, method: str
    ) -> None:
        """The idempotent methods are retried by default."""
        api()
        server.script("/i", Reply(503, b""), Reply(200, b""))
        assert (await client().send(method, server.url("/i"))).status_code == 200
        assert server.count() == 2

    async def test_patch_connection_error_not_retried(
        self, servers: Callable[[], Server], client: Any, sleeps: Sleeps
    ) -> None:
        """A request that is not retried is not retried on a connection error either."""
        api()
        stopped = servers()
        stopped.stop()  # nothing listens on its port now
        with pytest.raises(httpx.ConnectError):
            await client().send("PATCH", stopped.url("/"), content=b"x")
        assert sleeps == []

    async def test_streamed_body_not_retried(
        self, server: Server, client: Any, kind: str, sleeps: Sleeps
    ) -> None:
        """A body given as a stream is consumed by the first attempt: not sent again."""
        api()
        server.script("/u", Reply(503), Reply(200))

        def chunks() -> Iterator[bytes]:
            yield b"part1,"
            yield b"part2"

        async def achunks() -> Any:
            yield b"part1,"
            yield b"part2"

        body: Any = chunks() if kind == "sync" else achunks()
        response = await client().send("PUT", server.url("/u"), content=body)
        assert response.status_code == 503
        assert [s.body for s in server.seen] == [b"part1,part2"]

    async def test_bytes_body_retried(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """A body in memory (bytes) is sent again, whole."""
        api()
        server.script("/u", Reply(503), Reply(200))
        response = await client().send("PUT", server.url("/u"), content=b"payload")
        assert response.status_code == 200
        assert [s.body for s in server.seen] == [b"payload", b"payload"]


class TestTransportErrors:
    async def test_connection_errors_retried(
        self, servers: Callable[[], Server], client: Any, sleeps: Sleeps
    ) -> None:
        """httpx.ConnectError is in the default retry_on: retried, then raised unchanged."""
        api()
        stopped = servers()
        stopped.stop()  # nothing listens on its port now
        with pytest.raises(httpx.ConnectError) as caught:
            await client().send("GET", stopped.url("/"))
        assert sleeps == [0.01, 0.02]
        assert any("gave up after 3 attempts" in n for n in caught.value.__notes__)

    async def test_dropped_connection_then_success(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """A connection closed without an answer is retried like a failure status."""
        api()
        server.script("/d", Reply(drop=True), Reply(200, b"back"))
        response = await client().send("GET", server.url("/d"))
        assert (response.status_code, response.content) == (200, b"back")
        assert server.count() == 2

    async def test_users_exception_passes_through(self, server: Server, kind: str) -> None:
        """An exception of the inner transport that is not retryable reaches the caller as
        the same object, after one attempt."""
        api()
        boom = LookupError("no route for this tenant")
        calls: list[str] = []

        class Refusing(httpx.BaseTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                calls.append(request.method)
                raise boom

        class ARefusing(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                calls.append(request.method)
                raise boom

        with pytest.raises(LookupError) as caught:
            if kind == "sync":
                with httpx.Client(transport=ResilientTransport("api", Refusing())) as c:
                    c.get(server.url("/"))
            else:
                async with httpx.AsyncClient(
                    transport=AsyncResilientTransport("api", ARefusing())
                ) as ac:
                    await ac.get(server.url("/"))
        assert caught.value is boom
        assert calls == ["GET"]

    async def test_retried_responses_release_their_connection(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """Failure responses of retried attempts are closed: a pool of one connection
        serves many retried requests without running out."""
        api()
        c = client(limits=httpx.Limits(max_connections=1), timeout=httpx.Timeout(5, pool=1))
        for n in range(5):
            server.script(f"/r{n}", Reply(503, b"x" * 10_000), Reply(502), Reply(200, b"ok"))
            response = await c.send("GET", server.url(f"/r{n}"))
            assert response.status_code == 200
        assert server.count() == 15


class TestBreaker:
    async def test_failure_statuses_open_the_breaker(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """Failure responses count as breaker failures; once open, requests are refused
        without reaching the server."""
        load(api={"circuit_breaker": {"failure_threshold": 2}})
        server.script("/x", Reply(503))
        c = client()
        for _ in range(2):
            assert (await c.send("GET", server.url("/x"))).status_code == 503
        with pytest.raises(resilient.CircuitOpenError):
            await c.send("GET", server.url("/x"))
        assert server.count() == 2
        assert resilient.get_breaker("api").state == "open"

    async def test_successes_keep_it_closed(self, server: Server, client: Any) -> None:
        """Other statuses (404 included) are successes for the breaker."""
        load(api={"circuit_breaker": {"failure_threshold": 2}})
        server.script("/x", Reply(404))
        c = client()
        for _ in range(4):
            assert (await c.send("GET", server.url("/x"))).status_code == 404
        assert resilient.get_breaker("api").state == "closed"

    async def test_one_breaker_per_host(self, server: Server, client: Any) -> None:
        """With ``key: host`` a failing host opens its own breaker; another host is still
        served."""
        load(api={"circuit_breaker": {"failure_threshold": 2}, "http": {"key": "host"}})
        server.by_host["127.0.0.1"] = Reply(503)
        server.by_host["localhost"] = Reply(200)
        c = client()
        failing, healthy = server.url("/", "127.0.0.1"), server.url("/", "localhost")
        for _ in range(2):
            assert (await c.send("GET", failing)).status_code == 503
        with pytest.raises(resilient.CircuitOpenError):
            await c.send("GET", failing)
        assert (await c.send("GET", healthy)).status_code == 200
        port = server.port
        assert [f"api@127.0.0.1:{port}", f"api@localhost:{port}"] == c.transport.keys
        assert resilient.get_breaker(f"api@127.0.0.1:{port}").state == "open"
        assert resilient.get_breaker(f"api@localhost:{port}").state == "closed"

    async def test_one_breaker_per_policy_by_default(self, server: Server, client: Any) -> None:
        """Without ``key: host`` every host shares the policy's breaker."""
        load(api={"circuit_breaker": {"failure_threshold": 2}})
        server.by_host["127.0.0.1"] = Reply(503)
        server.by_host["localhost"] = Reply(200)
        c = client()
        for _ in range(2):
            await c.send("GET", server.url("/", "127.0.0.1"))
        with pytest.raises(resilient.CircuitOpenError):
            await c.send("GET", server.url("/", "localhost"))
        assert c.transport.keys == ["api"]

    def test_a_default_port_is_the_same_host(self) -> None:
        """``http://h/`` and ``http://h:80/`` (and ``https://h:443/``) share one breaker.
        (httpx's MockTransport: a server on port 80 would need root.)"""
        load(api={"circuit_breaker": {"failure_threshold": 2}, "http": {"key": "host"}})
        inner = httpx.MockTransport(lambda request: httpx.Response(503))
        with httpx.Client(transport=ResilientTransport("api", inner)) as c:
            for url in ("http://h.example/", "http://H.example:80/x"):
                assert c.get(url).status_code == 503
            with pytest.raises(resilient.CircuitOpenError):
                c.get("https://h.example:443/")
            assert c.get("http://h.example:8080/").status_code == 503
            assert c._transport.keys == ["api@h.example", "api@h.example:8080"]  # type: ignore[attr-defined]

    async def test_key_cap(self, servers: Callable[[], Server], client: Any) -> None:
        """Beyond ``max_keys`` hosts, the others share one overflow breaker."""
        load(
            api={
                "circuit_breaker": {"failure_threshold": 1},
                "http": {"key": "host", "max_keys": 2},
            }
        )
        a, b, c3, d = (servers() for _ in range(4))
        c3.script("/", Reply(503))
        c = client()
        for server in (a, b, c3):
            await c.send("GET", server.url("/"))
        assert [f"api@127.0.0.1:{a.port}", f"api@127.0.0.1:{b.port}", "api@*"] == c.transport.keys
        # the overflow breaker opened on c3's failure: d shares it, a and b do not
        with pytest.raises(resilient.CircuitOpenError):
            await c.send("GET", d.url("/"))
        assert d.count() == 0
        assert (await c.send("GET", a.url("/"))).status_code == 200
        assert len(c.transport.keys) == 3

    async def test_breaker_stops_the_retries(
        self, server: Server, client: Any, sleeps: Sleeps
    ) -> None:
        """A breaker that opens during the retries ends them; the caller gets the last
        response."""
        api(circuit_breaker={"failure_threshold": 2, "timeout_seconds": 60})
        server.script("/x", Reply(503, b"no"))
        response = await client().send("GET", server.url("/x"))
        assert (response.status_code, response.content) == (503, b"no")
        assert server.count() == 2


class TestMetrics:
    async def test_counts_per_host(self, server: Server, client: Any, sleeps: Sleeps) -> None:
        """With ``key: host`` the call counters are kept per host; a request that ends on a
        failure status counts as a failure even though the caller gets the response."""
        from resilient.metrics import statistics

        api(retry={"max_attempts": 2}, http={"key": "host"})
        server.by_host["127.0.0.1"] = Reply(503)
        server.by_host["localhost"] = Reply(200)
        statistics.retain()
        try:
            c = client()
            await c.send("GET", server.url("/", "127.0.0.1"))
            await c.send("GET", server.url("/", "localhost"))
            failing = statistics.counts(f"api@127.0.0.1:{server.port}")
            healthy = statistics.counts(f"api@localhost:{server.port}")
        finally:
            statistics.release()
        assert (failing.calls["failure"], failing.retries) == (1, 1)
        assert failing.last_error_type == "StatusFailure"
        assert (healthy.calls["success"], healthy.calls["failure"]) == (1, 0)


class TestTimeouts:
    async def test_per_attempt_timeout_cuts_a_slow_answer(
        self, server: Server, sleeps: Sleeps
    ) -> None:
        """On the async transport the per-attempt timeout cancels a request whose answer is
        late; the retry gets the next, prompt answer."""
        api(retry={"per_attempt_timeout": 0.2})
        server.script("/t", Reply(200, b"late", delay=1.0), Reply(200, b"prompt"))
        async with httpx.AsyncClient(transport=AsyncResilientTransport("api")) as c:
            response = await c.get(server.url("/t"))
            answered = list(server.answered)
        assert response.content == b"prompt"
        assert answered == [2]


class TestPolicyFile:
    def test_bad_status_has_file_and_line(self, tmp_path: Path) -> None:
        """An entry that is not an HTTP status is a PolicyError at its line, with a
        did-you-mean for a misspelt name."""
        path = tmp_path / "resilience.yaml"
        path.write_text(
            "version: 1\n"
            "policies:\n"
            "  api:\n"
            "    http:\n"
            "      failure_statuses: [503, 700, servce_unavailable]\n"
            "      retry_methods: [GET, 'NOT A METHOD']\n"
        )
        with pytest.raises(resilient.PolicyError) as caught:
            resilient.load_policies(path)
        text = str(caught.value)
        assert f"{path}:5" in text
        assert "700 is not an HTTP status code (100-599)" in text
        assert "did you mean 'service_unavailable'" in text
        assert f"{path}:6" in text

    def test_unknown_key(self, tmp_path: Path) -> None:
        """A misspelt key of the http: section gets a did-you-mean."""
        path = tmp_path / "resilience.yaml"
        path.write_text("version: 1\npolicies:\n  api:\n    http:\n      raise_on_exhaust: true\n")
        with pytest.raises(resilient.PolicyError, match="did you mean 'raise_on_exhausted'"):
            resilient.load_policies(path)

    @pytest.mark.parametrize(
        "value", [pytest.param(99, id="low"), pytest.param(True, id="bool"), 1.5]
    )
    def test_bad_status_values(self, value: object) -> None:
        """Numbers outside 100-599, booleans and floats are refused."""
        with pytest.raises(resilient.PolicyError, match="failure_statuses"):
            load(api={"http": {"failure_statuses": [value]}})

    def test_misspelt_method_gets_a_did_you_mean(self, tmp_path: Path) -> None:
        """A method close to a standard one is taken for a typo; registered and extension
        methods are accepted, in any case (httpx sends them upper-cased)."""
        path = tmp_path / "resilience.yaml"
        path.write_text(
            "version: 1\npolicies:\n  api:\n    http:\n      retry_methods: [get, GTE, PSOT]\n"
        )
        with pytest.raises(resilient.PolicyError) as caught:
            resilient.load_policies(path)
        text = str(caught.value)
        assert f"{path}:5" in text
        assert "unknown HTTP method 'GTE' (did you mean 'GET'?)" in text
        assert "unknown HTTP method 'PSOT' (did you mean 'POST'?)" in text
        assert "retry_methods[0]" not in text  # 'get' is GET
        load(api={"http": {"retry_methods": ["get", "PURGE", "propfind", "MYMETHOD"]}})
        http = resilient.get_policy("api").http
        assert http is not None
        assert http.retry_methods == ("GET", "PURGE", "PROPFIND", "MYMETHOD")

    def test_misspelt_key_value_gets_a_did_you_mean(self) -> None:
        """``key: hots`` names the valid values and the closest one."""
        with pytest.raises(
            resilient.PolicyError,
            match=r"expected 'policy' or 'host', got 'hots' \(did you mean 'host'\?\)",
        ):
            load(api={"http": {"key": "hots"}})

    def test_schema_has_the_section(self) -> None:
        """``resilient schema`` documents the http: section."""
        from resilient._models import policy_file_schema

        fields = policy_file_schema()["$defs"]["HttpConfig"]["properties"]
        assert {"failure_statuses", "retry_methods", "key", "max_keys"} <= set(fields)

    async def test_reload_switches_to_per_host(self, server: Server, client: Any) -> None:
        """A reload that changes the http: section reaches a transport at its next request."""
        load(api={"circuit_breaker": {"failure_threshold": 5}})
        c = client()
        await c.send("GET", server.url("/"))
        assert c.transport.keys == ["api"]
        load(api={"circuit_breaker": {"failure_threshold": 5}, "http": {"key": "host"}})
        await c.send("GET", server.url("/"))
        assert [f"api@127.0.0.1:{server.port}"] == c.transport.keys


class TestModule:
    def test_transport_closes_its_inner_transport(self) -> None:
        """close() closes the inner transport."""
        closed: list[bool] = []

        class Inner(httpx.BaseTransport):
            def close(self) -> None:
                closed.append(True)

        with httpx.Client(transport=ResilientTransport("api", Inner())):
            pass
        assert closed == [True]

    async def test_async_transport_closes_its_inner_transport(self) -> None:
        """aclose() closes the inner transport."""
        closed: list[bool] = []

        class Inner(httpx.AsyncBaseTransport):
            async def aclose(self) -> None:
                closed.append(True)

        async with httpx.AsyncClient(transport=AsyncResilientTransport("api", Inner())):
            pass
        assert closed == [True]

    def test_bad_policy_argument(self) -> None:
        """A policy that is neither a name nor a Policy is a TypeError at once."""
        with pytest.raises(TypeError, match="policy must be"):
            ResilientTransport(3)  # type: ignore[arg-type]

    def test_unknown_policy(self, server: Server) -> None:
        """An unknown policy name is a PolicyError at the first request."""
        load(api={})
        with (
            httpx.Client(transport=ResilientTransport("apj")) as c,
            pytest.raises(resilient.PolicyError, match="did you mean 'api'"),
        ):
            c.get(server.url("/"))

    def test_status_failure_names_the_response(self) -> None:
        """StatusFailure says which request got which status (it appears in events)."""
        request = httpx.Request("GET", "http://example.test/x")
        failure = StatusFailure(request, httpx.Response(503))
        assert str(failure) == "503 Service Unavailable from GET http://example.test/x"

    def test_missing_httpx_is_a_clear_import_error(self) -> None:
        """Without httpx, importing resilient.httpx names the `http` extra."""
        code = (
            "import sys; sys.modules['httpx'] = None\n"
            "try:\n    import resilient.httpx\n"
            "except ImportError as e:\n    print(e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        assert "resilient-policies[http]" in out
        assert "`http` extra" in out

    def test_import_resilient_does_not_import_httpx(self) -> None:
        """`import resilient` alone leaves httpx unimported."""
        code = "import sys, resilient; print('httpx' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == "False"


class TestHedging:
    async def test_hedging_cuts_a_slow_response(self, server: Server) -> None:
        """A request still unanswered after ``hedge.delay`` is sent again; the second copy's
        answer reaches the caller while the first is still being worked on."""
        load(api={"hedge": {"delay": 0.05}})
        server.script("/slow", Reply(200, b"slow", delay=1.0), Reply(200, b"fast"))
        async with httpx.AsyncClient(transport=AsyncResilientTransport("api")) as c:
            began = time.monotonic()
            response = await c.get(server.url("/slow"))
            took = time.monotonic() - began
            answered = list(server.answered)
        assert response.content == b"fast"
        assert answered == [2]  # request 1 was still sleeping on the server
        assert took < 0.9  # generous: the slow copy alone takes 1 s

    async def test_post_is_not_hedged(self, server: Server) -> None:
        """A method that is not retried is not hedged either: one request, its answer."""
        load(api={"hedge": {"delay": 0.05}})
        server.script("/slow", Reply(200, b"slow", delay=0.3), Reply(200, b"fast"))
        async with httpx.AsyncClient(transport=AsyncResilientTransport("api")) as c:
            response = await c.post(server.url("/slow"), content=b"order")
        assert response.content == b"slow"
        assert server.count() == 1

    def test_sync_hedging_in_the_thread_pool(self, server: Server) -> None:
        """A sync client hedges through the thread-pool bulkhead; the loser's response,
        which arrives after the call is over, is closed (its connection goes back to the
        pool)."""
        load(
            api={
                "hedge": {"delay": 0.05},
                "bulkhead": {"isolation": "thread_pool", "max_concurrent_requests": 4},
            }
        )
        server.script("/slow", Reply(200, b"slow", delay=0.3), Reply(200, b"fast"))
        received: list[httpx.Response] = []

        class Recording(httpx.HTTPTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                response = super().handle_request(request)
                received.append(response)
                return response

        with httpx.Client(transport=ResilientTransport("api", Recording())) as c:
            response = c.get(server.url("/slow"))
            answered = list(server.answered)
            deadline = time.monotonic() + 5
            while len(received) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # the loser's thread finishes on its own
            assert response.content == b"fast"
            assert answered == [2]
            assert len(received) == 2
            assert all(r.is_closed for r in received)

    def test_sync_hedging_needs_the_thread_pool(self, server: Server) -> None:
        """A sync transport on a hedged policy without thread isolation is a PolicyError."""
        load(api={"hedge": {"delay": 0.05}})
        with (
            httpx.Client(transport=ResilientTransport("api")) as c,
            pytest.raises(resilient.PolicyError, match="hedge"),
        ):
            c.get(server.url("/"))
        assert server.count() == 0

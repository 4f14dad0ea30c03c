"""
Health over HTTP (resilient/_health_http.py, ``resilient serve``): real HTTP against
uvicorn on 127.0.0.1, a free port per server.

Most tests serve a small monitor of this file, with the two methods the HTTP layer
reads (``get_system_health_summary()`` and ``run_check()``), so each status the
layer maps can be set exactly; ``TestRealMonitor`` serves resilient.health's own
``HealthMonitor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from resilient._health_http import HEALTH_JSON, asgi_app, health_document

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def service(
    status: str = "healthy", *, critical: bool = True, score: float = 100.0
) -> dict[str, Any]:
    """One service entry as a monitor's summary holds it, with one shallow check."""
    ok = status != "unhealthy"
    return {
        "status": status,
        "score": score,
        "reason": "checks pass" if ok else "ping: ConnectionError: refused",
        "checks": [
            {
                "name": "ping",
                "kind": "shallow",
                "critical": critical,
                "ok": ok,
                "duration": 0.004,
                "time": "2026-12-04T12:00:00+00:00",
                "error": None if ok else "ConnectionError: refused",
            }
        ],
    }


class FakeMonitor:
    """The monitor surface the HTTP layer reads, with counters."""

    def __init__(self, services: dict[str, dict[str, Any]], status: str = "healthy") -> None:
        self.services = services
        self.status = status
        self.runs: Counter[str] = Counter()
        self.summaries = 0
        self.delay = 0.0
        self.running = False
        self.starts = 0
        self.stops = 0
        self.broken = False

    def get_system_health_summary(self) -> dict[str, Any]:
        self.summaries += 1
        if self.broken:
            raise RuntimeError("monitor exploded")
        return {
            "status": self.status,
            "score": 50.0,
            "counts": Counter(s["status"] for s in self.services.values()),
            "services": copy.deepcopy(self.services),
            "timestamp": "2026-12-04T12:00:01+00:00",
        }

    async def run_check(self, name: str) -> dict[str, Any]:
        self.runs[name] += 1
        await asyncio.sleep(self.delay)
        return self.services[name]

    async def start(self) -> None:
        self.starts += 1
        self.running = True

    async def stop(self) -> None:
        self.stops += 1
        self.running = False


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run *app* with uvicorn in a thread on a free port; yields the base URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started"
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive()


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One plain urllib request: (status, headers, body), error statuses included."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = get(url)
    return status, headers, json.loads(body)


# --------------------------------------------------------------------------- /health


class TestHealth:
    def test_the_document_has_the_ietf_shape(self) -> None:
        monitor = FakeMonitor({"db": service("healthy"), "cache": service("healthy")})
        with serving(asgi_app(monitor, version="1.2.3", service_id="orders")) as base:
            status, headers, doc = get_json(base + "/health")
        assert status == 200
        assert headers["content-type"] == HEALTH_JSON
        assert headers["cache-control"] == "no-store"
        assert doc["status"] == "pass"
        assert doc["version"] == "1.2.3"
        assert doc["serviceId"] == "orders"
        assert set(doc["checks"]) == {"db:health", "db:shallow", "cache:health", "cache:shallow"}
        for key, items in doc["checks"].items():
            assert key.count(":") == 1
            assert isinstance(items, list)
            for item in items:
                assert item["status"] in {"pass", "warn", "fail"}
                assert {"componentId", "componentType", "time"} <= set(item)
        [health] = doc["checks"]["db:health"]
        assert health["observedValue"] == 100.0
        assert health["observedUnit"] == "score"
        [ping] = doc["checks"]["db:shallow"]
        assert ping == {
            "componentId": "db/ping",
            "componentType": "component",
            "kind": "shallow",
            "status": "pass",
            "time": "2026-12-04T12:00:00+00:00",
            "critical": True,
            "observedValue": 0.004,
            "observedUnit": "s",
        }

    @pytest.mark.parametrize(
        ("overall", "expected", "code"),
        [
            ("healthy", "pass", 200),
            ("degraded", "warn", 200),
            ("unknown", "warn", 200),
            ("unhealthy", "fail", 503),
        ],
    )
    def test_status_and_code(self, overall: str, expected: str, code: int) -> None:
        monitor = FakeMonitor({"db": service(overall)}, status=overall)
        with serving(asgi_app(monitor)) as base:
            status, _, doc = get_json(base + "/health")
        assert (doc["status"], status) == (expected, code)
        [item] = doc["checks"]["db:health"]
        assert item["status"] == expected
        if expected != "pass":
            assert doc["output"] == f"db: {overall}"

    def test_a_failing_check_carries_its_error(self) -> None:
        monitor = FakeMonitor({"db": service("unhealthy")}, status="unhealthy")
        with serving(asgi_app(monitor)) as base:
            status, _, doc = get_json(base + "/health")
        assert status == 503
        [ping] = doc["checks"]["db:shallow"]
        assert ping["status"] == "fail"
        assert ping["output"] == "ConnectionError: refused"
        assert doc["checks"]["db:health"][0]["output"] == "ping: ConnectionError: refused"

    def test_a_broken_monitor_is_a_503_not_a_500(self) -> None:
        monitor = FakeMonitor({"db": service()})
        monitor.broken = True
        with serving(asgi_app(monitor)) as base:
            status, _, doc = get_json(base + "/health")
            live, _, _ = get(base + "/health/live")
        assert status == 503
        assert doc["status"] == "fail"
        assert doc["output"] == "health summary unavailable: RuntimeError: monitor exploded"
        assert live == 200


# --------------------------------------------------------------------------- live / ready


class TestLiveAndReady:
    def test_live_stays_200_while_every_dependency_fails(self) -> None:
        monitor = FakeMonitor(
            {"db": service("unhealthy"), "cache": service("unhealthy")}, status="unhealthy"
        )
        with serving(asgi_app(monitor)) as base:
            assert get(base + "/health")[0] == 503
            assert get(base + "/health/ready")[0] == 503
            before = monitor.summaries
            status, headers, body = get(base + "/health/live")
            monitor.broken = True
            assert get(base + "/health/live")[0] == 200
        assert status == 200
        assert headers["content-type"] == HEALTH_JSON
        assert json.loads(body) == {"status": "pass"}
        assert monitor.summaries == before  # liveness never asks the monitor
        assert sum(monitor.runs.values()) == 0

    def test_ready_fails_on_an_unhealthy_critical_service(self) -> None:
        monitor = FakeMonitor(
            {"db": service("unhealthy"), "search": service("healthy", critical=False)},
            status="unhealthy",
        )
        with serving(asgi_app(monitor)) as base:
            status, _, doc = get_json(base + "/health/ready")
        assert status == 503
        assert doc["status"] == "fail"
        assert set(doc["checks"]) == {"db:health", "db:shallow"}  # critical services only

    def test_ready_ignores_non_critical_services(self) -> None:
        monitor = FakeMonitor(
            {"db": service("healthy"), "search": service("unhealthy", critical=False)},
            status="degraded",
        )
        with serving(asgi_app(monitor)) as base:
            ready, _, doc = get_json(base + "/health/ready")
            health, _, whole = get_json(base + "/health")
        assert (ready, doc["status"]) == (200, "pass")
        assert set(doc["checks"]) == {"db:health", "db:shallow"}
        assert (health, whole["status"]) == (200, "warn")
        assert whole["checks"]["search:shallow"][0]["critical"] is False

    def test_ready_warns_on_a_degraded_critical_service(self) -> None:
        monitor = FakeMonitor({"db": service("degraded")}, status="degraded")
        with serving(asgi_app(monitor)) as base:
            status, _, doc = get_json(base + "/health/ready")
        assert (status, doc["status"]) == (200, "warn")


# --------------------------------------------------------------------------- HTTP rules


class TestHttp:
    def test_unknown_paths_are_404(self) -> None:
        monitor = FakeMonitor({"db": service()})
        with serving(asgi_app(monitor, metrics=False)) as base:
            assert get(base + "/")[0] == 404
            assert get(base + "/healthz")[0] == 404
            assert get(base + "/health/db")[0] == 404
            assert get(base + "/metrics")[0] == 404  # metrics=False
            assert get(base + "/health/")[0] == 200  # a trailing slash is the same path

    def test_other_methods_are_405_with_allow(self) -> None:
        monitor = FakeMonitor({"db": service()})
        with serving(asgi_app(monitor)) as base:
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                status, headers, _ = get(base + "/health/live", method=method)
                assert status == 405, method
                assert headers["allow"] == "GET, HEAD"

    def test_head_has_the_headers_and_no_body(self) -> None:
        monitor = FakeMonitor({"db": service("unhealthy")}, status="unhealthy")
        with serving(asgi_app(monitor)) as base:
            status, headers, body = get(base + "/health", method="HEAD")
            _, _, full = get(base + "/health")
        assert status == 503
        assert body == b""
        assert headers["content-length"] == str(len(full))

    def test_metrics_serves_the_prometheus_exposition(self) -> None:
        from prometheus_client import CollectorRegistry, Counter

        registry = CollectorRegistry()
        Counter("orders_placed", "orders", registry=registry).inc(3)
        with serving(asgi_app(FakeMonitor({}), registry=registry)) as base:
            status, headers, body = get(base + "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=")
        assert b"orders_placed_total 3.0" in body

    async def test_metrics_without_prometheus_client_is_a_clear_404(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
        status, _, body = await call_asgi(asgi_app(FakeMonitor({})), "/metrics")
        assert status == 404
        assert b"pip install 'resilient-policies[prometheus]'" in body

    async def test_mounted_under_a_root_path(self) -> None:
        app = asgi_app(FakeMonitor({"db": service()}))
        status, _, body = await call_asgi(app, "/ops/health/ready", root_path="/ops")
        assert status == 200
        assert json.loads(body)["status"] == "pass"
        assert (await call_asgi(app, "/ops/other", root_path="/ops"))[0] == 404


async def call_asgi(
    app: Any, path: str, *, root_path: str = "", query: bytes = b""
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One in-process ASGI request (for what real HTTP cannot set up)."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "root_path": root_path,
        "query_string": query,
        "headers": [],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


# --------------------------------------------------------------------------- refreshes


class TestRefresh:
    def test_requests_never_run_checks(self) -> None:
        monitor = FakeMonitor({"db": service(), "cache": service()})
        with serving(asgi_app(monitor)) as base:
            for path in ("/health", "/health/ready", "/health/live") * 10:
                get(base + path)
        assert sum(monitor.runs.values()) == 0

    async def test_a_flood_of_refreshes_runs_the_checks_once(self) -> None:
        monitor = FakeMonitor({"db": service(), "cache": service()})
        monitor.delay = 0.3  # the run is still going while every request arrives
        app = asgi_app(monitor)
        with serving(app) as base:
            async with httpx.AsyncClient(base_url=base, timeout=20) as client:
                responses = await asyncio.gather(
                    *(
                        client.get(path, params={"refresh": "1"})
                        for path in ["/health", "/health/ready"] * 50
                    )
                )
        assert {r.status_code for r in responses} == {200}
        assert monitor.runs == {"db": 1, "cache": 1}
        assert app.refreshes == 1

    async def test_a_finished_run_is_reused_within_the_min_interval(self) -> None:
        monitor = FakeMonitor({"db": service()})
        app = asgi_app(monitor, refresh_min_interval=3600)
        for _ in range(5):
            await call_asgi(app, "/health", query=b"refresh=1")
        assert monitor.runs == {"db": 1}

    async def test_refresh_runs_again_after_the_min_interval(self) -> None:
        monitor = FakeMonitor({"db": service()})
        app = asgi_app(monitor, refresh_min_interval=0)
        for _ in range(3):
            await call_asgi(app, "/health", query=b"refresh=true")
        await call_asgi(app, "/health", query=b"refresh=0")
        await call_asgi(app, "/health", query=b"other=1")
        assert monitor.runs == {"db": 3}

    async def test_refresh_can_be_switched_off(self) -> None:
        monitor = FakeMonitor({"db": service()})
        app = asgi_app(monitor, allow_refresh=False)
        await call_asgi(app, "/health", query=b"refresh=1")
        assert monitor.runs == {}

    async def test_stale_results_are_refreshed_once_per_max_age(self) -> None:
        monitor = FakeMonitor({"db": service()})
        app = asgi_app(monitor, max_age=3600, allow_refresh=False)
        await asyncio.gather(*(call_asgi(app, "/health/ready") for _ in range(20)))
        await call_asgi(app, "/health")
        assert monitor.runs == {"db": 1}  # then fresh for an hour

    async def test_a_hung_run_does_not_hold_the_requests(self) -> None:
        monitor = FakeMonitor({"db": service()})
        monitor.delay = 3600
        app = asgi_app(monitor, refresh_timeout=0.05)
        statuses = await asyncio.gather(
            *(call_asgi(app, "/health", query=b"refresh") for _ in range(10))
        )
        assert {s for s, _, _ in statuses} == {200}  # the last results, served
        assert monitor.runs == {"db": 1}  # and the run still going is the only one
        await app.shutdown()  # cancels it


# --------------------------------------------------------------------------- lifespan, input


class TestLifespanAndInput:
    def test_start_monitor_starts_and_stops_the_scheduler(self) -> None:
        monitor = FakeMonitor({"db": service()})
        with serving(asgi_app(monitor, start_monitor=True)) as base:
            assert (monitor.starts, monitor.stops) == (1, 0)
            assert get(base + "/health/live")[0] == 200
        assert (monitor.starts, monitor.stops) == (1, 1)

    def test_a_running_scheduler_is_left_alone(self) -> None:
        monitor = FakeMonitor({"db": service()})
        monitor.running = True
        with serving(asgi_app(monitor, start_monitor=True)):
            pass
        assert (monitor.starts, monitor.stops) == (0, 0)

    def test_not_a_monitor(self) -> None:
        with pytest.raises(TypeError, match="needs a health monitor"):
            asgi_app(object())

    def test_refresh_needs_run_check(self) -> None:
        class SummaryOnly:
            def get_system_health_summary(self) -> dict[str, Any]:
                return {"status": "healthy", "services": {}}

        with pytest.raises(TypeError, match="no run_check"):
            asgi_app(SummaryOnly())
        asgi_app(SummaryOnly(), allow_refresh=False)  # serving results only is fine

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("max_age", 0),
            ("max_age", -1.0),
            ("refresh_timeout", 0),
            ("refresh_timeout", float("inf")),
            ("refresh_min_interval", -1),
            ("refresh_min_interval", float("nan")),
        ],
    )
    def test_bad_durations(self, option: str, value: float) -> None:
        with pytest.raises(ValueError, match=option):
            asgi_app(FakeMonitor({}), **{option: value})

    def test_health_document_of_an_empty_summary(self) -> None:
        assert health_document({"status": "unknown", "services": {}}) == {
            "status": "warn",
            "checks": {},
        }


# --------------------------------------------------------------------------- resilient serve

APP_MODULE = """
import asyncio


class Monitor:
    def __init__(self):
        self.running = False

    def get_system_health_summary(self):
        status = "healthy" if self.running else "unknown"
        return {
            "status": status,
            "services": {"db": {"status": status, "score": 100.0, "checks": []}},
        }

    async def run_check(self, name):
        return None

    async def start(self):
        self.running = True

    async def stop(self):
        self.running = False
        print("monitor stopped", flush=True)


monitor = Monitor()


class Manager:
    health_monitor = monitor


manager = Manager()


class Disabled:
    health_monitor = None


disabled = Disabled()

from resilient import ResilienceManager
from resilient.health import HealthMonitor

real_monitor = HealthMonitor()
real_monitor.add_check("db", lambda: True, interval=0.2)
real_manager = ResilienceManager()
"""


def _serve_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "healthapp.py").write_text(textwrap.dedent(APP_MODULE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENCE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run_cli(tmp_path: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}\nfrom resilient.cli import main\nraise SystemExit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_serve_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestServe:
    @pytest.mark.parametrize("attribute", ["monitor", "manager"])
    def test_serve_starts_and_answers(self, tmp_path: Path, attribute: str) -> None:
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()  # uvicorn binds it; the race with another process is negligible here
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "resilient", "serve", "--app", f"healthapp:{attribute}"),
                *("--port", str(port), "--log-level", "warning"),
            ],
            cwd=tmp_path,
            env=_serve_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, process.communicate()[1]
                try:
                    live = get(f"http://127.0.0.1:{port}/health/live")
                    break
                except OSError:
                    assert time.monotonic() < deadline, "resilient serve did not answer in 30 s"
                    time.sleep(0.05)
            status, _, doc = get_json(f"http://127.0.0.1:{port}/health")
        finally:
            process.terminate()
            stdout, stderr = process.communicate(timeout=20)
        assert live[0] == 200
        assert status == 200
        assert doc["status"] == "pass"  # the scheduler was started: "running"
        # uvicorn shuts down gracefully (lifespan: the scheduler stopped), then
        # re-raises the signal it caught
        assert process.returncode == -signal.SIGTERM, stderr
        assert "Traceback" not in stderr
        assert stdout == "monitor stopped\n"

    @pytest.mark.parametrize(
        ("attribute", "expected"), [("real_monitor", "pass"), ("real_manager", "warn")]
    )
    def test_serve_a_real_monitor_or_manager(
        self, tmp_path: Path, attribute: str, expected: str
    ) -> None:
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "resilient", "serve", "--app", f"healthapp:{attribute}"),
                *("--port", str(port), "--log-level", "warning"),
            ],
            cwd=tmp_path,
            env=_serve_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            doc: dict[str, Any] = {}
            while doc.get("status") != expected:  # the monitor: after the scheduler's first round
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, f"no {expected!r} in 30 s: {doc}"
                try:
                    status, _, doc = get_json(base + "/health")
                except OSError:
                    time.sleep(0.05)
            assert status == 200
            assert get(base + "/health/ready")[0] == 200
            assert get(base + "/health/live")[0] == 200
        finally:
            process.terminate()
            _, stderr = process.communicate(timeout=20)
        assert "Traceback" not in stderr, stderr

    def test_bad_app_spec_is_a_usage_error(self, tmp_path: Path) -> None:
        result = _run_cli(tmp_path, "serve", "--app", "healthapp")
        assert result.returncode == 2
        assert "expected module:attribute" in result.stderr

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("nosuchmodule:app", "no module named 'nosuchmodule'"),
            ("healthapp:monitr", "has no attribute 'monitr' (did you mean 'monitor'?)"),
            ("healthapp:Monitor", "the class Monitor; name an instance"),
            ("healthapp:asyncio", "a module, not a health monitor or a ResilienceManager"),
            ("healthapp:disabled", "health monitoring is off"),
        ],
    )
    def test_bad_app_is_reported(self, tmp_path: Path, spec: str, message: str) -> None:
        result = _run_cli(tmp_path, "serve", "--app", spec)
        assert result.returncode == 1
        assert message in result.stderr
        assert "Traceback" not in result.stderr

    def test_without_uvicorn(self, tmp_path: Path) -> None:
        result = _run_cli(
            tmp_path,
            "serve",
            "--app",
            "healthapp:monitor",
            prelude="import sys; sys.modules['uvicorn'] = None",
        )
        assert result.returncode == 1
        assert "pip install 'resilient-policies[server]'" in result.stderr


# --------------------------------------------------------------------------- the real monitor


class TestRealMonitor:
    """resilient.health.HealthMonitor served as it is."""

    async def test_live_stays_200_while_every_dependency_fails(self) -> None:
        from resilient.health import HealthMonitor

        monitor = HealthMonitor()

        def refused() -> bool:
            raise ConnectionError("connection refused")

        monitor.add_check("db", refused, kind="shallow")
        monitor.add_check("cache", lambda: False, kind="deep")
        for _ in range(monitor.config.failure_threshold):
            await monitor.run_checks()
        app = asgi_app(monitor, allow_refresh=False)
        with serving(app) as base:
            health = get_json(base + "/health")
            ready = get_json(base + "/health/ready")
            live = get(base + "/health/live")
        assert live[0] == 200
        assert json.loads(live[2]) == {"status": "pass"}
        assert (health[0], health[2]["status"]) == (503, "fail")
        assert (ready[0], ready[2]["status"]) == (503, "fail")
        [ping] = health[2]["checks"]["db:shallow"]
        assert ping["componentId"] == "db/refused"
        assert ping["status"] == "fail"
        assert ping["output"] == "ConnectionError: connection refused"
        [db] = health[2]["checks"]["db:health"]
        assert db["status"] == "fail"
        assert db["critical"] is True

    async def test_a_flood_of_refreshes_runs_each_check_once(self) -> None:
        from resilient.health import HealthMonitor

        monitor = HealthMonitor()
        calls = Counter[str]()

        async def database_answers() -> bool:
            calls["db"] += 1
            await asyncio.sleep(0.3)
            return True

        def search_answers() -> bool:  # a sync check: a worker thread
            calls["search"] += 1
            time.sleep(0.3)
            return True

        monitor.add_check("db", database_answers, kind="deep")
        monitor.add_check("search", search_answers, kind="shallow", critical=False)
        app = asgi_app(monitor)
        with serving(app) as base:
            async with httpx.AsyncClient(base_url=base, timeout=20) as client:
                responses = await asyncio.gather(
                    *(
                        client.get(path, params={"refresh": "1"})
                        for path in ["/health", "/health/ready"] * 50
                    )
                )
                after = await client.get("/health")
        assert calls == {"db": 1, "search": 1}
        assert {r.status_code for r in responses} == {200}
        assert {r.json()["status"] for r in responses} == {"pass"}
        assert after.json()["checks"]["db:deep"][0]["observedValue"] >= 0.3

    async def test_a_failing_non_critical_check_warns_and_stays_ready(self) -> None:
        from resilient.health import HealthMonitor

        monitor = HealthMonitor()
        monitor.add_check("db", lambda: True, kind="shallow")
        monitor.add_check("search", lambda: False, kind="shallow", critical=False)
        for _ in range(monitor.config.failure_threshold):
            await monitor.run_checks()
        with serving(asgi_app(monitor)) as base:
            health = get_json(base + "/health")
            ready = get_json(base + "/health/ready")
        assert (health[0], health[2]["status"]) == (200, "warn")
        assert health[2]["checks"]["search:health"][0]["status"] == "warn"  # degraded
        assert (ready[0], ready[2]["status"]) == (200, "pass")
        assert {key.partition(":")[0] for key in ready[2]["checks"]} == {"db"}

    async def test_before_the_first_result_everything_is_warn(self) -> None:
        from resilient.health import HealthMonitor

        monitor = HealthMonitor()
        monitor.add_check("db", lambda: True)
        with serving(asgi_app(monitor)) as base:
            status, _, doc = get_json(base + "/health/ready")
        assert (status, doc["status"]) == (200, "warn")  # unknown: warn, still ready
        assert doc["checks"]["db:shallow"][0]["status"] == "warn"

    async def test_a_refresh_during_a_scheduled_run_joins_it_and_stays_ready(self) -> None:
        from resilient import HealthCheckConfig
        from resilient.health import HealthMonitor

        monitor = HealthMonitor(HealthCheckConfig(failure_threshold=1, check_interval=60))
        started = asyncio.Event()
        runs = []

        @monitor.check("db")
        async def query() -> bool:  # a healthy but not instant dependency
            runs.append(1)
            started.set()
            await asyncio.sleep(0.3)
            return True

        app = asgi_app(monitor)
        async with monitor:
            await asyncio.wait_for(started.wait(), 5)  # the scheduler's run is in flight
            status, _, body = await call_asgi(app, "/health/ready", query=b"refresh=1")
        doc = json.loads(body)
        assert (status, doc["status"]) == (200, "pass"), doc
        assert "output" not in doc["checks"]["db:shallow"][0]
        assert len(runs) == 1

    async def test_a_dependency_dead_at_startup_is_not_ready(self) -> None:
        from resilient import HealthCheckConfig
        from resilient.health import HealthMonitor

        monitor = HealthMonitor(HealthCheckConfig(failure_threshold=3))
        monitor.add_check("db", lambda: False, name="ping")
        await monitor.run_checks()  # one failed round, below failure_threshold
        app = asgi_app(monitor, allow_refresh=False)
        ready_status, _, ready = await call_asgi(app, "/health/ready")
        health_status, _, health = await call_asgi(app, "/health")
        assert (ready_status, json.loads(ready)["status"]) == (503, "fail")
        assert (health_status, json.loads(health)["status"]) == (200, "warn")  # degraded
        [entry] = json.loads(health)["checks"]["db:health"]
        assert "check 'ping' failing: returned False" in entry["output"]

    async def test_checks_with_no_reading_carry_no_time_nor_value(self) -> None:
        import resilient
        from resilient.health import HealthMonitor

        resilient.load_policies(
            {"version": 1, "policies": {"orders": {"health": {"min_calls": 5}}}}
        )
        resilient.call("orders", lambda: 1)  # its pipeline (and live-call counter) exists
        monitor = HealthMonitor()
        monitor.add_check("db", lambda: True)
        app = asgi_app(monitor, allow_refresh=False)
        _, _, before = await call_asgi(app, "/health")
        [ping] = json.loads(before)["checks"]["db:shallow"]
        assert "time" not in ping
        assert "observedValue" not in ping
        await monitor.run_check("orders")  # no live calls to judge yet
        _, _, after = await call_asgi(app, "/health")
        [live] = json.loads(after)["checks"]["orders:passive"]
        assert live["status"] == "warn"
        assert "observedValue" not in live


# --------------------------------------------------------------------------- in FastAPI


def test_mounted_in_fastapi_next_to_its_routes() -> None:
    fastapi = pytest.importorskip("fastapi")  # not a dependency of resilient
    monitor = FakeMonitor({"db": service("unhealthy")}, status="unhealthy")
    app = fastapi.FastAPI()

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, int]:
        return {"id": order_id}

    app.mount("/", asgi_app(monitor))
    with serving(app) as base:
        order = get_json(base + "/orders/7")
        live = get(base + "/health/live")
        ready = get_json(base + "/health/ready")
        missing = get(base + "/nothing")
        post = get(base + "/health", method="POST")
    assert order[0] == 200
    assert order[2] == {"id": 7}
    assert live[0] == 200
    assert (ready[0], ready[2]["status"]) == (503, "fail")
    assert missing[0] == 404
    assert post[0] == 405


def test_mounted_under_a_prefix_in_fastapi() -> None:
    fastapi = pytest.importorskip("fastapi")
    app = fastapi.FastAPI()
    app.mount("/ops", asgi_app(FakeMonitor({"db": service()})))
    with serving(app) as base:
        assert get(base + "/ops/health/live")[0] == 200
        assert get_json(base + "/ops/health")[2]["status"] == "pass"
        assert get(base + "/health/live")[0] == 404


async def test_serve_initialises_a_manager_its_module_did_not() -> None:
    """`resilient serve --app mod:manager` with a manager made at import but never
    initialised: the server's lifespan initialises it and closes it at shutdown."""
    from resilient._health_http import asgi_app
    from resilient.cli import _ManagerLifespan
    from resilient.manager import ResilienceConfig, ResilienceManager

    manager = ResilienceManager(
        ResilienceConfig(metrics_enabled=False, logging_enabled=False, prometheus_enabled=False)
    )
    assert manager.health_monitor is not None
    app = _ManagerLifespan(asgi_app(manager.health_monitor, start_monitor=True), manager)
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []
    seen_running: list[bool] = []

    async def receive() -> dict[str, Any]:
        if len(inbox) == 1:  # startup handled: the manager runs now
            seen_running.append(manager.initialized)
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert seen_running == [True]
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert not manager.initialized  # closed at shutdown

"""
Health over HTTP: a pure ASGI application over a health monitor.

    app = resilient.health.asgi_app(monitor)     # uvicorn, or mounted in FastAPI / Starlette

=====================  ===============================================================
``GET /health``        The whole picture, ``application/health+json``
                       (draft-inadarei-api-health-check): ``status`` pass/warn/fail and
                       ``checks`` keyed ``service:measurement``.
``GET /health/live``   The process only, never a dependency: 200 while the app answers.
``GET /health/ready``  The critical services only: 503 when one of them is unhealthy.
``GET /metrics``       Prometheus exposition (404 with an explanation without
                       prometheus-client).
=====================  ===============================================================

Statuses map as healthy -> pass, degraded -> warn, unknown -> warn, unhealthy -> fail;
pass and warn answer 200, fail 503. The endpoints serve the monitor's *last* results;
they never run a check per request. An on-demand run (``?refresh=1``, or results older
than ``max_age``) is coalesced: one run at a time, every request that arrives meanwhile
awaits that same run, and a run finished less than ``refresh_min_interval`` seconds ago
is reused, so a flood of requests cannot hammer a dependency.

This module does not import :mod:`resilient.health`: the monitor is duck-typed (it needs
``get_system_health_summary()``; ``run_checks()`` or ``run_check(service)`` for
refreshes; ``start()`` and ``stop()`` when the app runs the scheduler), and statuses
are read as strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

__all__ = [
    "HEALTH_JSON",
    "STATUS_MAP",
    "HealthApp",
    "asgi_app",
    "health_document",
]

_log = logging.getLogger("resilient.health")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The media type of the IETF health check response format.
HEALTH_JSON = "application/health+json"

#: A monitor's status -> the health check format's status.
STATUS_MAP: Mapping[str, str] = {
    "healthy": "pass",
    "degraded": "warn",
    "unknown": "warn",
    "unhealthy": "fail",
}

_HTTP_STATUS = {"pass": 200, "warn": 200, "fail": 503}
_RANK = {"pass": 0, "warn": 1, "fail": 2}
_TRUE = frozenset({"1", "true", "yes", "on"})
_METHODS = frozenset({"GET", "HEAD"})
_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})
_NO_PROMETHEUS = b"/metrics needs prometheus-client: pip install 'resilient-policies[prometheus]'\n"

# Per check: the keys a monitor may use for one value, first found wins.
_CHECK_OK = ("ok", "passed", "success", "healthy")
_CHECK_DURATION = ("duration", "response_time", "latency", "elapsed")
_CHECK_TIME = ("time", "checked_at", "last_run", "last_checked", "timestamp")
_CHECK_OUTPUT = ("output", "error", "message", "reason")


# --------------------------------------------------------------------------- the document


def _status(value: Any) -> str:
    """
    The format's status of a monitor's status (a check's own ``pass``/``warn``/``fail``
    stays; anything unrecognised is ``warn``).
    """
    if isinstance(value, bool):
        return "pass" if value else "fail"
    text = str(getattr(value, "value", value)).lower()
    return text if text in _RANK else STATUS_MAP.get(text, "warn")


def _first(entry: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = entry.get(key)
        if value is not None:
            return value
    return None


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _iso(value: Any, default: str) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 1e9:
        return datetime.fromtimestamp(value, UTC).isoformat()  # a wall-clock timestamp
    if isinstance(value, str) and value:
        return value
    return default


def _check_entries(raw: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """A service's checks as ``(name, entry)``: a mapping by name or a list of mappings."""
    if isinstance(raw, Mapping):
        return [(str(name), e) for name, e in raw.items() if isinstance(e, Mapping)]
    if isinstance(raw, list | tuple):
        found = []
        for i, e in enumerate(raw):
            if isinstance(e, Mapping):
                found.append((str(e.get("name") or e.get("kind") or f"check-{i + 1}"), e))
        return found
    return []


def _is_critical(service: Mapping[str, Any]) -> bool:
    """A service is critical when it says so, or when any of its checks is (the default)."""
    flag = service.get("critical")
    if isinstance(flag, bool):
        return flag
    checks = _check_entries(service.get("checks"))
    if not checks:
        return True
    return any(entry.get("critical", True) is not False for _, entry in checks)


def _service_checks(
    name: str, service: Mapping[str, Any], now: str
) -> dict[str, list[dict[str, Any]]]:
    """The ``checks`` members of one service: its score and each of its checks."""
    when = _iso(_first(service, _CHECK_TIME), now)
    status = _status(service.get("status"))
    summary: dict[str, Any] = {
        "componentId": name,
        "componentType": "component",
        "status": status,
        "time": when,
    }
    score = _number(service.get("score"))
    if score is not None:
        summary["observedValue"] = score
        summary["observedUnit"] = "score"
    critical = _is_critical(service)
    summary["critical"] = critical
    reason = service.get("reason")
    if reason and status != "pass":
        summary["output"] = str(reason)
    members: dict[str, list[dict[str, Any]]] = {f"{name}:health": [summary]}
    breaker = service.get("circuit_breaker")
    if isinstance(breaker, str):
        members[f"{name}:circuitBreaker"] = [
            {
                "componentId": name,
                "componentType": "component",
                "observedValue": breaker,
                "status": "pass" if breaker == "closed" else "warn",
                "time": when,
            }
        ]
    for measurement, unit, keys in (
        ("responseTime", "s", ("response_time", "latency")),
        ("errorRate", "ratio", ("error_rate",)),
    ):
        value = _number(_first(service, keys))
        if value is not None:
            members[f"{name}:{measurement}"] = [
                {
                    "componentId": name,
                    "componentType": "component",
                    "observedValue": value,
                    "observedUnit": unit,
                    "status": status,
                    "time": when,
                }
            ]
    for check_name, entry in _check_entries(service.get("checks")):
        kind = str(entry.get("kind") or "check")
        if "status" in entry:
            check_status = _status(entry["status"])
        else:
            ok = _first(entry, _CHECK_OK)
            check_status = "warn" if ok is None else ("pass" if ok else "fail")
        item: dict[str, Any] = {
            "componentId": f"{name}/{check_name}",
            "componentType": "component",
            "kind": kind,
            "status": check_status,
        }
        taken = _first(entry, _CHECK_TIME)
        if taken is not None:
            item["time"] = _iso(taken, when)
        elif not any(key in entry for key in _CHECK_TIME):
            item["time"] = when  # the entry carries no time at all: the document's
        # else: no result yet, so no time (and no observedValue) of a reading
        item["critical"] = entry.get("critical", True) is not False
        duration = _number(_first(entry, _CHECK_DURATION))
        if duration is not None:
            item["observedValue"] = duration
            item["observedUnit"] = "s"
        output = _first(entry, _CHECK_OUTPUT)
        if output and check_status != "pass":
            item["output"] = str(output)
        members.setdefault(f"{name}:{kind}", []).append(item)
    return members


def health_document(
    summary: Mapping[str, Any],
    *,
    critical_only: bool = False,
    service_id: str | None = None,
    version: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """
    A monitor's ``get_system_health_summary()`` as an ``application/health+json``
    document.

    ``critical_only`` keeps the critical services alone and takes the status from
    them (readiness): ``fail`` when one is unhealthy or not ready (``"ready": False``:
    its checks have failed since the start, below ``failure_threshold``), else ``warn``
    when one is degraded or unknown, else ``pass``. Otherwise the status is the summary's own.
    """
    now = _iso(summary.get("timestamp"), datetime.now(UTC).isoformat())
    services = summary.get("services")
    if not isinstance(services, Mapping):
        services = {}
    checks: dict[str, list[dict[str, Any]]] = {}
    worst = "pass"
    problems: list[str] = []
    for name, entry in services.items():
        if not isinstance(entry, Mapping):
            continue
        if critical_only and not _is_critical(entry):
            continue
        service_status = _status(entry.get("status"))
        if critical_only and entry.get("ready") is False:
            # failing since the start (below failure_threshold): not ready yet
            service_status = "fail"
        if _RANK[service_status] > _RANK[worst]:
            worst = service_status
        if service_status != "pass":
            problems.append(f"{name}: {entry.get('status')}")
        checks.update(_service_checks(str(name), entry, now))
    status = worst if critical_only else _status(summary.get("status", "unknown"))
    document: dict[str, Any] = {"status": status}
    if version is not None:
        document["version"] = version
    if service_id is not None:
        document["serviceId"] = service_id
    if description is not None:
        document["description"] = description
    if status != "pass" and problems:
        document["output"] = "; ".join(problems)
    document["checks"] = checks
    return document


# --------------------------------------------------------------------------- the app


class HealthApp:
    """
    The ASGI application of :func:`asgi_app` (see the module docstring).

    Attributes:
        monitor: The monitor whose last results are served.
        refreshes: How many on-demand runs have started (each is one run of every
            service's checks, however many requests asked for it).
    """

    def __init__(
        self,
        monitor: Any,
        *,
        max_age: float | None = None,
        allow_refresh: bool = True,
        refresh_min_interval: float = 1.0,
        refresh_timeout: float = 10.0,
        metrics: bool = True,
        registry: Any = None,
        start_monitor: bool = False,
        service_id: str | None = None,
        version: str | None = None,
        description: str | None = None,
    ) -> None:
        if not callable(getattr(monitor, "get_system_health_summary", None)):
            msg = (
                f"asgi_app() needs a health monitor (an object with "
                f"get_system_health_summary()), got {type(monitor).__name__}"
            )
            raise TypeError(msg)
        needs_run = allow_refresh or max_age is not None
        can_run = any(callable(getattr(monitor, m, None)) for m in ("run_checks", "run_check"))
        if needs_run and not can_run:
            msg = (
                f"{type(monitor).__name__} has no run_check(service): pass "
                "allow_refresh=False and max_age=None to serve its results only"
            )
            raise TypeError(msg)
        _positive("max_age", max_age, allow_none=True)
        _positive("refresh_timeout", refresh_timeout)
        if not (refresh_min_interval >= 0 and math.isfinite(refresh_min_interval)):
            msg = f"refresh_min_interval must be >= 0 seconds, got {refresh_min_interval!r}"
            raise ValueError(msg)
        self.monitor = monitor
        self.refreshes = 0
        self._max_age = max_age
        self._allow_refresh = allow_refresh
        self._min_interval = refresh_min_interval
        self._refresh_timeout = refresh_timeout
        self._metrics = metrics
        self._registry = registry
        self._start_monitor = start_monitor
        self._started_monitor = False
        self._meta = {"service_id": service_id, "version": version, "description": description}
        self._task: asyncio.Task[None] | None = None
        self._refreshed_at: float | None = None
        live: dict[str, Any] = {"status": "pass"}
        for key, value in (("version", version), ("serviceId", service_id)):
            if value is not None:
                live[key] = value
        self._live_body = json.dumps(live).encode()

    def __repr__(self) -> str:
        return f"<HealthApp of {self.monitor!r}>"

    # ----------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Scope, send: Send) -> None:
        path = _route_path(scope)
        if path not in _PATHS or (path == "/metrics" and not self._metrics):
            await _respond(send, scope, 404, b"not found\n", "text/plain; charset=utf-8")
            return
        if scope.get("method", "GET") not in _METHODS:
            await _respond(
                send,
                scope,
                405,
                b"method not allowed\n",
                "text/plain; charset=utf-8",
                extra=[(b"allow", b"GET, HEAD")],
            )
            return
        if path == "/health/live":
            await _respond(send, scope, 200, self._live_body, HEALTH_JSON)
            return
        if path == "/metrics":
            status, body, content_type = self._metrics_response()
            await _respond(send, scope, status, body, content_type)
            return
        if self._wants_refresh(scope):
            await self.refresh()
        document = self._document(critical_only=path == "/health/ready")
        body = json.dumps(document, default=str).encode()
        await _respond(send, scope, _HTTP_STATUS[document["status"]], body, HEALTH_JSON)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Start the monitor's scheduler (``start_monitor=True`` and it is not running)."""
        if not self._start_monitor or _is_running(self.monitor):
            return
        start = getattr(self.monitor, "start", None)
        if start is None:
            msg = f"start_monitor=True, but {type(self.monitor).__name__} has no start()"
            raise TypeError(msg)
        await start()
        self._started_monitor = True

    async def shutdown(self) -> None:
        """Stop what :meth:`startup` started, and an on-demand run still going."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._started_monitor:
            self._started_monitor = False
            await self.monitor.stop()

    # ----------------------------------------------------------------- refresh

    def _wants_refresh(self, scope: Scope) -> bool:
        if self._max_age is not None and (
            self._refreshed_at is None or time.monotonic() - self._refreshed_at >= self._max_age
        ):
            return True
        if not self._allow_refresh:
            return False
        query = scope.get("query_string", b"")
        if not query:
            return False
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if key == "refresh":
                return value.lower() in _TRUE or value == ""
        return False

    async def refresh(self) -> None:
        """
        Run every service's checks now, coalesced: while a run is going every caller
        awaits that run, a run that finished less than ``refresh_min_interval``
        seconds ago is reused, and no caller waits longer than ``refresh_timeout``
        (the run goes on; the caller is served the results there are).
        """
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            done = self._refreshed_at
            if done is not None and time.monotonic() - done < self._min_interval:
                return
            self.refreshes += 1
            task = self._task = loop.create_task(self._run_all(), name="resilient-health-refresh")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self._refresh_timeout)

    async def _run_all(self) -> None:
        try:
            run_checks = getattr(self.monitor, "run_checks", None)
            if callable(run_checks):  # resilient.health.HealthMonitor: every service at once
                await run_checks()
                return
            services = list(self._summary().get("services") or ())
            results = await asyncio.gather(
                *(self.monitor.run_check(name) for name in services), return_exceptions=True
            )
            for name, result in zip(services, results, strict=True):
                if isinstance(result, Exception):
                    _log.warning("health refresh of %r failed: %r", name, result)
        except Exception:
            _log.warning("health refresh failed", exc_info=True)
        finally:
            self._refreshed_at = time.monotonic()

    # ----------------------------------------------------------------- bodies

    def _summary(self) -> Mapping[str, Any]:
        summary = self.monitor.get_system_health_summary()
        if not isinstance(summary, Mapping):
            msg = f"get_system_health_summary() returned {type(summary).__name__}"
            raise TypeError(msg)
        return summary

    def _document(self, *, critical_only: bool) -> dict[str, Any]:
        try:
            return health_document(self._summary(), critical_only=critical_only, **self._meta)
        except Exception as exc:  # a broken monitor is a failed check, never a 500
            _log.warning("health summary failed", exc_info=True)
            document: dict[str, Any] = {"status": "fail"}
            document.update(
                (key, value)
                for key, value in (
                    ("version", self._meta["version"]),
                    ("serviceId", self._meta["service_id"]),
                )
                if value is not None
            )
            document["output"] = f"health summary unavailable: {type(exc).__name__}: {exc}"
            document["checks"] = {}
            return document

    def _metrics_response(self) -> tuple[int, bytes, str]:
        try:
            import prometheus_client as pc
        except ImportError:
            return 404, _NO_PROMETHEUS, "text/plain; charset=utf-8"
        registry = pc.REGISTRY if self._registry is None else self._registry
        return 200, pc.generate_latest(registry), str(pc.CONTENT_TYPE_LATEST)


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
        msg = f"{name} must be a positive number of seconds, got {value!r}"
        raise ValueError(msg)


def _is_running(monitor: Any) -> bool:
    for attribute in ("running", "is_running"):
        value = getattr(monitor, attribute, None)
        if isinstance(value, bool):
            return value
        if callable(value):
            return bool(value())
    return False


def _route_path(scope: Scope) -> str:
    """The path below the mount point (Starlette keeps the full path in ``path``)."""
    path: str = scope.get("path", "/")
    root = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root) :] or "/"
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


async def _respond(
    send: Send,
    scope: Scope,
    status: int,
    body: bytes,
    content_type: str,
    *,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    head = scope.get("method") == "HEAD"
    await send({"type": "http.response.body", "body": b"" if head else body})


def asgi_app(
    monitor: Any,
    *,
    max_age: float | None = None,
    allow_refresh: bool = True,
    refresh_min_interval: float = 1.0,
    refresh_timeout: float = 10.0,
    metrics: bool = True,
    registry: Any = None,
    start_monitor: bool = False,
    service_id: str | None = None,
    version: str | None = None,
    description: str | None = None,
) -> HealthApp:
    """
    An ASGI application serving *monitor*'s health over HTTP.

    Args:
        monitor: A :class:`resilient.health.HealthMonitor` (``manager.health_monitor``).
        max_age: Seconds after which the results are stale: the next ``/health`` or
            ``/health/ready`` request runs the checks (coalesced) before answering.
            ``None`` (default): never; the monitor's scheduler keeps them fresh.
        allow_refresh: ``?refresh=1`` runs the checks (coalesced) before answering.
        refresh_min_interval: A run that finished less than this many seconds ago
            serves a refresh request instead of a new run.
        refresh_timeout: The longest a request waits for a run; then it is served
            the results there are, and the run goes on.
        metrics: Serve ``/metrics`` (``False``: it is 404 like any unknown path).
        registry: The prometheus-client registry of ``/metrics`` (default: the global
            ``REGISTRY``, where :func:`resilient.metrics.enable` registers).
        start_monitor: Start the monitor's scheduler at the ASGI lifespan's startup
            (unless it runs already) and stop it at shutdown. A mounted sub-app gets
            no lifespan events: there, start the monitor in the parent's lifespan.
        service_id, version, description: Copied into the ``serviceId``,
            ``version`` and ``description`` members of the documents.

    Raises:
        TypeError: *monitor* has no ``get_system_health_summary()`` (or no
            ``run_check()`` while refreshes are on).
        ValueError: A duration that is not a positive number of seconds.
    """
    return HealthApp(
        monitor,
        max_age=max_age,
        allow_refresh=allow_refresh,
        refresh_min_interval=refresh_min_interval,
        refresh_timeout=refresh_timeout,
        metrics=metrics,
        registry=registry,
        start_monitor=start_monitor,
        service_id=service_id,
        version=version,
        description=description,
    )

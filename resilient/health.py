"""
Health monitoring: checks of four kinds, a status with hysteresis, a 0-100
score, recovery coordination with circuit breakers, and passive health from
live calls.

    monitor = HealthMonitor()

    @monitor.check("database", kind="deep")
    async def database_answers() -> bool:
        return await db.fetchval("SELECT 1") == 1

    async with monitor:              # the scheduler runs the checks
        ...
        monitor.get_system_health_summary()

Every policy with a ``health:`` section is also watched *passively*: one call
observer per policy name counts its live calls (two C-level counter bumps and
one addition per call, no lock), and the monitor judges those counts against
the section's thresholds off the call path. docs/health.md describes the rules.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import itertools
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from resilient import events as _events
from resilient import pipeline as _pipeline
from resilient._health_http import asgi_app
from resilient._models import MAX_SECONDS, HealthCheckConfig
from resilient.breaker import CircuitBreaker
from resilient.errors import RejectedError, ServiceNotFoundError, did_you_mean
from resilient.policy import registry
from resilient.runtime import runtime

__all__ = [
    "CHECK_KINDS",
    "HealthCheckConfig",
    "HealthMonitor",
    "HealthStatus",
    "asgi_app",
    "health_score",
]

_log = logging.getLogger("resilient.health")

F = TypeVar("F", bound=Callable[..., Any])

#: The kinds of check, cheapest first.
CHECK_KINDS: tuple[str, ...] = ("shallow", "deep", "synthetic", "passive")
#: The kinds whose passing results count towards moving an open breaker to half-open.
RECOVERY_KINDS = frozenset({"deep", "synthetic"})
#: Results of a service's checks kept for its error rate (and so its score).
HISTORY = 10
#: Name of the built-in passive check of a service whose policy has a ``health:`` section.
_LIVE = "live_calls"
#: Longest sleep of the scheduler, so services added later are picked up soon.
_MAX_TICK = 1.0
#: Longest wait for a cancelled async check to end (``stop()``, a cancelled run).
_CANCEL_GRACE = 1.0


class HealthStatus(StrEnum):
    """The health of a service, or of the whole system."""

    HEALTHY = "healthy"
    """Every check passes, fast enough, with few errors."""
    DEGRADED = "degraded"
    """Working, but slow, erring, behind an open breaker, or a non-critical check fails."""
    UNHEALTHY = "unhealthy"
    """``failure_threshold`` rounds in a row had a failing critical check."""
    UNKNOWN = "unknown"
    """No result yet."""


def health_score(
    response_time: float | None,
    error_rate: float | None,
    config: HealthCheckConfig,
) -> float:
    """
    The 0-100 score of a response time (seconds) and an error rate (0-1), each
    judged against its threshold in *config*::

        latency = clamp(1 - response_time / (2 * response_time_threshold), 0, 1)
        errors  = clamp(1 - error_rate / (2 * error_rate_threshold), 0, 1)
        score   = round(100 * latency * errors, 1)

    A value at its threshold halves the score, twice the threshold zeroes it;
    ``None`` (not measured) counts as 0. Never increases when either input grows.
    """
    rt = response_time or 0.0
    er = error_rate or 0.0
    latency = min(max(1.0 - rt / (2.0 * config.response_time_threshold), 0.0), 1.0)
    errors = min(max(1.0 - er / (2.0 * config.error_rate_threshold), 0.0), 1.0)
    return round(100.0 * latency * errors, 1)


def _now_iso(at: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if at is None else at, UTC).isoformat()


# --------------------------------------------------------------------------- passive health


class _PassiveCounter:
    """
    The call observer of every pipeline of one policy name that has a ``health:``
    section. Lock-free like ``resilient.metrics``: ``next()`` on an
    ``itertools.count`` is one C call that the GIL makes atomic; the time sum is
    a plain attribute (on a free-threaded build it may miss an update under
    contention, the counts never do). Rejections and cancellations are no
    evidence about the dependency and are not counted.
    """

    __slots__ = ("errors", "ok", "spent")

    def __init__(self) -> None:
        self.ok = itertools.count()
        self.errors = itertools.count()
        self.spent = 0.0

    def record(self, outcome: str, duration: float) -> None:
        if outcome == "success":
            next(self.ok)
        elif outcome == "rejected" or outcome == "cancelled":
            return
        else:  # failure, timeout, fallback (the dependency failed, a fallback answered)
            next(self.errors)
        self.spent += duration

    def read(self) -> tuple[int, int, float]:
        """``(successes, errors, seconds)`` so far."""
        return _count(self.ok), _count(self.errors), self.spent


def _count(counter: itertools.count[int]) -> int:
    # itertools.count shows its next value only through repr / __reduce__.
    return int(counter.__reduce__()[1][0])


class _PassiveTable:
    """Policy name -> its passive counter, and the ``health:`` section it was built with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, _PassiveCounter] = {}
        self._configs: dict[str, HealthCheckConfig] = {}

    def observer(self, pipeline: Any) -> _PassiveCounter | None:
        """The observer factory: ``None`` for a pipeline whose policy has no ``health:``."""
        config = pipeline.policy.health
        name = pipeline.name
        if config is None:
            if name in self._configs:  # rebuilt without its health: section
                with self._lock:
                    self._configs.pop(name, None)
            return None
        with self._lock:
            self._configs[name] = config
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = _PassiveCounter()
            return counter

    def get(self, name: str) -> _PassiveCounter | None:
        return self._counters.get(name)

    def config(self, name: str) -> HealthCheckConfig | None:
        return self._configs.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._counters)

    def save(self) -> tuple[dict[str, _PassiveCounter], dict[str, HealthCheckConfig]]:
        with self._lock:
            return dict(self._counters), dict(self._configs)

    def put_back(
        self, state: tuple[dict[str, _PassiveCounter], dict[str, HealthCheckConfig]]
    ) -> None:
        with self._lock:
            self._counters, self._configs = dict(state[0]), dict(state[1])


passive = _PassiveTable()
# set aside and put back with the rest of the runtime (isolated tests cannot leak it)
runtime.add_state("passive-health", passive.save, passive.put_back)


def _ensure_observer() -> None:
    """Install the passive-health observer factory (again, after a runtime restore)."""
    if not any(key == "health" for key, _factory in runtime.observers):
        runtime.add_observer_factory("health", passive.observer)


_ensure_observer()


# --------------------------------------------------------------------------- sources


class ServiceSource(Protocol):
    """Where a monitor learns its services, their ``health:`` sections and their breakers."""

    def names(self) -> list[str]: ...
    def config(self, service: str) -> HealthCheckConfig | None: ...
    def breaker(self, service: str) -> CircuitBreaker | None: ...
    def require(self, service: str) -> None: ...


class _PolicySource:
    """
    The default: every active policy with a ``health:`` section is a service. A
    function decorated with an inline ``Policy(health=...)`` and ``name=`` is judged
    by that section once the monitor has a check for its name.
    """

    def names(self) -> list[str]:
        # the active policies only: the passive table keeps the counters of names
        # whose policy may be gone since
        return [n for n, p in (registry.contents()[0] or {}).items() if p.health is not None]

    def config(self, service: str) -> HealthCheckConfig | None:
        policy = (registry.contents()[0] or {}).get(service)
        if policy is not None and policy.health is not None:
            return policy.health
        return passive.config(service)

    def breaker(self, service: str) -> CircuitBreaker | None:
        return _pipeline.breakers().get(service)

    def require(self, service: str) -> None:
        return None  # any name may get checks


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One run of one check."""

    ok: bool | None
    """Passed, failed, or ``None``: no evidence (no live calls yet, a rejection)."""
    duration: float
    """Seconds it ran (for the passive check: the mean duration of the live calls)."""
    error: str | None
    """Why it failed, or why it gave no evidence."""
    at: float
    """Wall-clock time it finished (``time.time()``)."""
    detail: dict[str, Any] | None = None


@dataclass(slots=True)
class _Check:
    service: str
    name: str
    fn: Callable[[], Any] | None  # None: the built-in passive check
    kind: str
    interval: float | None
    timeout: float | None
    critical: bool
    tags: tuple[str, ...]
    is_async: bool
    up: bool | None = None  # passing / failing after its own hysteresis; None: no result yet
    fails: int = 0
    passes: int = 0
    last: CheckResult | None = None
    evidence: CheckResult | None = None  # the last result that passed or failed
    busy: bool = False  # a sync check's thread still runs (after its run timed out: hung)
    round_result: CheckResult | None = None  # its latest result in the round not yet closed
    run: concurrent.futures.Future[None] | None = None  # the run in flight (any loop)
    due: float = 0.0


@dataclass(slots=True)
class _PassiveState:
    baseline: tuple[int, int, float] | None = None


@dataclass(slots=True)
class _Service:
    name: str
    checks: dict[str, _Check] = field(default_factory=dict)
    history: list[bool] = field(default_factory=list)
    recovery_streak: int = 0
    passive: _PassiveState = field(default_factory=_PassiveState)
    last: tuple[HealthStatus, float | None, str] = (HealthStatus.UNKNOWN, None, "no result yet")
    checked_at: float | None = None
    # the service-level hysteresis, counted in rounds (docs/health.md, "Status")
    up: bool | None = None  # None: no round yet, or only failed ones below the threshold
    fail_rounds: int = 0
    pass_rounds: int = 0
    failure: str = ""  # what the failing critical checks said, at the last failed round
    pending: bool = False  # results recorded since the last round


def _positive_seconds(what: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{what} must be a number of seconds, not {value!r}"
        raise TypeError(msg)
    if not 0 < value <= MAX_SECONDS:  # also refuses NaN
        msg = f"{what} must be more than 0 and at most {MAX_SECONDS} seconds, not {value!r}"
        raise ValueError(msg)
    return float(value)


# --------------------------------------------------------------------------- the monitor


class HealthMonitor:
    """
    Runs health checks and keeps the health of each service.

    Args:
        config: The default :class:`HealthCheckConfig` of services whose policy has
            no ``health:`` section.
        source: Where services, their ``health:`` sections and their circuit
            breakers come from (the manager passes its own); by default every
            policy with a ``health:`` section is a service, watched passively.

    ``async with monitor:`` (or :meth:`start` / :meth:`stop`) runs the scheduler;
    :meth:`run_check` runs a service's checks now. Thread-safe: results are
    recorded under a short lock, never held while a check runs.
    """

    def __init__(
        self, config: HealthCheckConfig | None = None, *, source: ServiceSource | None = None
    ) -> None:
        if config is not None and not isinstance(config, HealthCheckConfig):
            msg = f"config must be a resilient.HealthCheckConfig, not {config!r}"
            raise TypeError(msg)
        self.config = config if config is not None else HealthCheckConfig()
        self._source: ServiceSource = source if source is not None else _PolicySource()
        self._lock = threading.RLock()
        self._services: dict[str, _Service] = {}
        self._callbacks: list[Callable[[_events.HealthChanged], Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        _ensure_observer()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<HealthMonitor {state} services={len(self.services)}>"

    # ------------------------------------------------------------ checks

    def add_check(
        self,
        service: str,
        fn: Callable[[], Any],
        *,
        kind: str = "shallow",
        interval: float | None = None,
        timeout: float | None = None,
        critical: bool = True,
        tags: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        """
        Add a check to *service*: *fn* (sync or async, no arguments) passes by
        returning anything but ``False`` and fails by returning ``False`` or raising.

        Args:
            kind: ``shallow`` (a ping), ``deep`` (real work), ``synthetic`` (a
                scripted transaction) or ``passive`` (reads evidence, sends nothing).
            interval: Seconds between runs (default: the service's ``check_interval``).
            timeout: Seconds a run may take (default: the service's ``timeout``).
            critical: A failing critical check makes the service ``unhealthy``; a
                failing non-critical one, ``degraded``.
            tags: Free labels, reported with the check.
            name: Names the check within the service (default: *fn*'s name).

        Raises:
            TypeError: *fn* is not callable, or a bad type of argument.
            ValueError: Unknown *kind*, an interval or timeout not above 0, or a
                check of that name already exists for the service.
            ServiceNotFoundError: The source does not know *service* (the manager:
                ``ServiceNotFoundError``).
        """
        if not isinstance(service, str) or not service:
            msg = f"service must be a non-empty string, not {service!r}"
            raise TypeError(msg)
        if not callable(fn):
            msg = f"health check for {service!r} must be callable, not {fn!r}"
            raise TypeError(msg)
        target = inspect.unwrap(fn) if inspect.isfunction(fn) else fn
        target = getattr(target, "__func__", target)  # staticmethod / classmethod objects
        call = None if inspect.isroutine(target) else getattr(type(target), "__call__", None)  # noqa: B004 - the method itself
        if any(
            inspect.isgeneratorfunction(t) or inspect.isasyncgenfunction(t)
            for t in (target, call)
            if t is not None
        ):
            msg = (
                f"health check {getattr(fn, '__qualname__', fn)!r} for {service!r} is a "
                "generator function: calling it runs none of its body, so it would always "
                "pass. Make it a plain (or async) function that returns a bool"
            )
            raise TypeError(msg)
        if not isinstance(critical, bool):
            msg = f"critical must be True or False, not {critical!r}"
            raise TypeError(msg)
        if kind not in CHECK_KINDS:
            msg = (
                f"unknown health check kind {kind!r}{did_you_mean(kind, CHECK_KINDS)}; "
                f"kinds: {', '.join(CHECK_KINDS)}"
            )
            raise ValueError(msg)
        every = _positive_seconds("interval", interval)
        limit = _positive_seconds("timeout", timeout)
        if isinstance(tags, str):
            tags = (tags,)
        elif not isinstance(tags, Iterable):
            msg = f"tags must be a string or a sequence of strings, not {tags!r}"
            raise TypeError(msg)
        self._source.require(service)
        check_name = name if name is not None else getattr(fn, "__name__", None) or kind
        if check_name == "<lambda>":
            check_name = kind
        check = _Check(
            service=service,
            name=str(check_name),
            fn=fn,
            kind=kind,
            interval=every,
            timeout=limit,
            critical=critical,
            tags=tuple(str(t) for t in tags),
            is_async=_pipeline._is_async_callable(fn),
        )
        with self._lock:
            svc = self._services.setdefault(service, _Service(service))
            if check.name in svc.checks or check.name == _LIVE:
                msg = (
                    f"service {service!r} already has a health check named {check.name!r}; "
                    "pass name= to tell them apart"
                )
                raise ValueError(msg)
            svc.checks[check.name] = check

    def check(
        self,
        service: str,
        *,
        kind: str = "shallow",
        interval: float | None = None,
        timeout: float | None = None,
        critical: bool = True,
        tags: Sequence[str] = (),
        name: str | None = None,
    ) -> Callable[[F], F]:
        """Decorator form of :meth:`add_check`; the function is returned unchanged."""

        def register(fn: F) -> F:
            self.add_check(
                service,
                fn,
                kind=kind,
                interval=interval,
                timeout=timeout,
                critical=critical,
                tags=tags,
                name=name,
            )
            return fn

        return register

    def remove_service(self, service: str) -> None:
        """Forget *service*'s checks and results (no error if there are none)."""
        with self._lock:
            self._services.pop(service, None)

    def reset_service(self, service: str, *, drop: Iterable[str] = ()) -> None:
        """
        Forget *service*'s results and status (it is ``unknown`` again), keeping its
        checks except those named in *drop* (no error if it has none).
        """
        with self._lock:
            old = self._services.pop(service, None)
            if old is None:
                return
            fresh = self._services[service] = _Service(service)
            for name, check in old.checks.items():
                if name in drop or check.fn is None:
                    continue
                fresh.checks[name] = _Check(
                    service,
                    name,
                    check.fn,
                    check.kind,
                    check.interval,
                    check.timeout,
                    check.critical,
                    check.tags,
                    check.is_async,
                )

    def on_change(self, callback: Callable[[_events.HealthChanged], Any]) -> Callable[[], None]:
        """
        Call *callback* with a :class:`resilient.events.HealthChanged` at every
        status transition of a service (an alert hook). It may be async. A callback
        that raises is logged and ignored. Returns a function that removes it.
        """
        if not callable(callback):
            msg = f"on_change callback must be callable, not {callback!r}"
            raise TypeError(msg)
        with self._lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove

    # ------------------------------------------------------------ services

    @property
    def services(self) -> list[str]:
        """The services monitored: those with checks, and those of the source."""
        with self._lock:
            names = list(self._services)
        return [*names, *(n for n in self._source.names() if n not in names)]

    def _service(self, name: str) -> _Service:
        with self._lock:
            svc = self._services.get(name)
        if svc is not None:
            return svc
        if name not in self._source.names():
            raise ServiceNotFoundError(name, self.services, "health-monitored service")
        with self._lock:
            return self._services.setdefault(name, _Service(name))

    def config_of(self, service: str) -> HealthCheckConfig:
        """The :class:`HealthCheckConfig` that judges *service*."""
        found = self._source.config(service)
        return found if found is not None else self.config

    def _checks(self, svc: _Service) -> list[_Check]:
        """The service's checks, with its built-in passive check if its policy has ``health:``."""
        checks = [c for c in svc.checks.values() if c.fn is not None]
        if self._source.config(svc.name) is not None:
            builtin = svc.checks.get(_LIVE)
            if builtin is None:
                with self._lock:
                    builtin = svc.checks.setdefault(
                        _LIVE, _Check(svc.name, _LIVE, None, "passive", None, None, True, (), False)
                    )
            checks.append(builtin)
        return checks

    @staticmethod
    def _critical(check: _Check, checks: list[_Check]) -> bool:
        if check.fn is None:
            # the live calls' judge: critical when nothing else is, else a degrading signal
            return not any(c.critical for c in checks if c.fn is not None)
        return check.critical

    # ------------------------------------------------------------ running checks

    async def run_check(self, service: str) -> dict[str, Any]:
        """
        Run *service*'s checks now, concurrently, each cut at its timeout, and
        return its health (:meth:`get_service_health`). Concurrent callers for
        one service share one run.

        Raises:
            ServiceNotFoundError: No such service.
        """
        self._source.require(service)
        svc = self._service(service)
        running = self._inflight.get(service)
        if (
            running is None
            or running.done()
            or running.get_loop() is not asyncio.get_running_loop()
        ):
            running = asyncio.ensure_future(self._run_all_of(svc))
            self._inflight[service] = running

            def forget(f: asyncio.Future[dict[str, Any]]) -> None:
                if self._inflight.get(service) is f:
                    del self._inflight[service]

            running.add_done_callback(forget)
        return await asyncio.shield(running)

    async def run_checks(self) -> dict[str, Any]:
        """Run every service's checks now; return :meth:`get_system_health_summary`."""
        names = self.services
        await asyncio.gather(*(self.run_check(n) for n in names), return_exceptions=True)
        return self.get_system_health_summary()

    async def _run_all_of(self, svc: _Service) -> dict[str, Any]:
        checks = self._checks(svc)
        outcomes = await asyncio.gather(
            *(self._run_one(c, count_round=False) for c in checks), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                _log.error("health check of %r: recording failed", svc.name, exc_info=outcome)
        self._round(svc.name)  # one round for the whole run
        return self.get_service_health(svc.name)

    async def _run_one(self, check: _Check, *, count_round: bool = True) -> None:
        cfg = self.config_of(check.service)
        limit = check.timeout or cfg.timeout
        if check.fn is None:
            self._record(check, self._judge_passive(check.service, cfg), cfg, count_round)
            return
        with self._lock:
            inflight = check.run
            joins = inflight is not None and not inflight.done()
            if not joins:
                inflight = check.run = concurrent.futures.Future()
        assert inflight is not None
        if joins:
            # a run of this check is in flight (the scheduler, another caller, another
            # loop): await it rather than start a second one; it records the result
            waiter = asyncio.wrap_future(inflight)
            await asyncio.wait({waiter}, timeout=limit + _CANCEL_GRACE)
            return
        try:
            if check.busy:  # its thread outlived an earlier run's timeout and still runs
                result = CheckResult(  # a reading of its timeout, not a fake 0 s
                    False, limit, "still running from an earlier run (hung)", time.time()
                )
            else:
                result = await self._call(check, limit)
            self._record(check, result, cfg, count_round)
        finally:
            with self._lock:
                if check.run is inflight:
                    check.run = None
            inflight.set_result(None)

    async def _call(self, check: _Check, limit: float) -> CheckResult:
        fn = check.fn
        assert fn is not None
        began = time.perf_counter()
        future: asyncio.Future[Any]
        if check.is_async:
            try:
                future = asyncio.ensure_future(fn())
            except Exception as exc:
                return self._failed(check, exc, time.perf_counter() - began)

            def retrieved(f: asyncio.Future[Any]) -> None:
                if not f.cancelled():
                    f.exception()  # retrieved: a late failure is not "never retrieved"

            future.add_done_callback(retrieved)
        else:
            try:
                future = self._in_thread(check, fn)
            except RuntimeError as exc:  # no thread could be started
                return self._failed(check, exc, time.perf_counter() - began)
        try:
            done, _pending = await asyncio.wait({future}, timeout=limit)
        except asyncio.CancelledError:
            # stop(), or the run was cancelled: an async check is cancelled with it
            # (and awaited, bounded); a thread cannot be stopped and runs on
            future.cancel()
            if check.is_async:
                with contextlib.suppress(BaseException):
                    await asyncio.wait({future}, timeout=_CANCEL_GRACE)
            raise
        duration = time.perf_counter() - began
        if not done:
            future.cancel()  # a coroutine is cancelled; a thread runs on (busy until it ends)
            return CheckResult(False, duration, f"timed out after {limit:g}s", time.time())
        if future.cancelled():
            return CheckResult(False, duration, "cancelled", time.time())
        if check.is_async:
            problem = future.exception()
            value = None if problem is not None else future.result()
        else:
            value, problem = future.result()
        if problem is not None:
            return self._failed(check, problem, duration)
        if inspect.isawaitable(value):  # a sync function that returned a coroutine
            try:
                async with asyncio.timeout(max(limit - duration, 0.0)):
                    value = await value
            except TimeoutError:
                return CheckResult(
                    False, time.perf_counter() - began, f"timed out after {limit:g}s", time.time()
                )
            except Exception as error:
                return self._failed(check, error, time.perf_counter() - began)
            duration = time.perf_counter() - began
        if value is False:
            return CheckResult(False, duration, "returned False", time.time())
        return CheckResult(True, duration, None, time.time())

    @staticmethod
    def _in_thread(
        check: _Check, fn: Callable[[], Any]
    ) -> asyncio.Future[tuple[Any, BaseException | None]]:
        """
        Run a sync check in a daemon thread of its own, never in the loop's default
        executor: a hung check cannot starve the application's ``asyncio.to_thread``
        nor hold up the process's exit. A check is not started again while its thread
        runs, so there are at most as many threads as sync checks.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, BaseException | None]] = loop.create_future()
        context = contextvars.copy_context()

        def settle(outcome: tuple[Any, BaseException | None]) -> None:
            if not future.done():
                future.set_result(outcome)

        def run() -> None:
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (context.run(fn), None)
            except BaseException as exc:  # reported as the check's failure
                outcome = (None, exc)
            finally:
                check.busy = False
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, outcome)

        check.busy = True
        thread = threading.Thread(
            target=run, name=f"resilient-health:{check.service}:{check.name}", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            check.busy = False
            raise
        return future

    @staticmethod
    def _failed(check: _Check, exc: BaseException, duration: float) -> CheckResult:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, RejectedError):
            # the service's own breaker / bulkhead / rate limiter refused the probe: it
            # says nothing new about the dependency
            return CheckResult(None, duration, f"rejected ({text})", time.time())
        return CheckResult(False, duration, text, time.time())

    def _judge_passive(self, service: str, cfg: HealthCheckConfig) -> CheckResult:
        counter = passive.get(service)
        now = time.time()
        with self._lock:
            state = self._service(service).passive
            if counter is None:  # no pipeline yet: every call it will count is new
                state.baseline = (0, 0, 0.0)
                return CheckResult(None, 0.0, "no live calls yet", now)
            current = counter.read()
            if state.baseline is None:
                state.baseline = current
                return CheckResult(None, 0.0, "watching live calls from now on", now)
            ok = current[0] - state.baseline[0]
            errors = current[1] - state.baseline[1]
            spent = current[2] - state.baseline[2]
            calls = ok + errors
            if calls < cfg.min_calls:  # wait for more: the window grows
                return CheckResult(
                    None, 0.0, f"{calls} live calls, fewer than min_calls", now, {"calls": calls}
                )
            state.baseline = current
        rate = errors / calls
        mean = spent / calls
        detail: dict[str, Any] = {
            "calls": calls,
            "error_rate": round(rate, 4),
            "mean_duration": round(mean, 6),
        }
        if rate > cfg.error_rate_threshold:
            problem = (
                f"error rate {rate:.0%} of {calls} live calls > {cfg.error_rate_threshold:.0%}"
            )
            return CheckResult(False, mean, problem, now, detail)
        return CheckResult(True, mean, None, now, detail)

    # ------------------------------------------------------------ results

    def _record(
        self, check: _Check, result: CheckResult, cfg: HealthCheckConfig, count_round: bool = True
    ) -> None:
        breaker = self._source.breaker(check.service)
        half_open = False
        with self._lock:
            svc = self._services.get(check.service)
            if svc is None or svc.checks.get(check.name) is not check:
                return  # removed meanwhile
            check.last = result
            check.round_result = result
            svc.checked_at = result.at
            if result.ok is not None:
                check.evidence = result
                svc.pending = True
            if result.ok is True:
                check.passes += 1
                check.fails = 0
                if check.up is None or (
                    check.up is False and check.passes >= cfg.recovery_threshold
                ):
                    check.up = True
            elif result.ok is False:
                check.fails += 1
                check.passes = 0
                if check.fails >= cfg.failure_threshold:
                    check.up = False
            if result.ok is not None:
                svc.history.append(result.ok)
                del svc.history[:-HISTORY]
            if check.kind in RECOVERY_KINDS and result.ok is not None:
                is_open = (
                    breaker is not None and breaker.mode == "normal" and breaker.state == "open"
                )
                if result.ok and is_open:
                    svc.recovery_streak += 1
                    if cfg.auto_recovery and svc.recovery_streak >= cfg.recovery_threshold:
                        half_open = True
                        svc.recovery_streak = 0
                else:
                    svc.recovery_streak = 0
        if half_open and breaker is not None and breaker.half_open():
            _log.info(
                "service %r: %d passing deep/synthetic checks; its circuit breaker is "
                "half-open early, for its trial calls",
                check.service,
                cfg.recovery_threshold,
            )
        if count_round:
            self._round(check.service)
        else:
            self.refresh(check.service)

    def _round(self, service: str) -> None:
        """
        Close a round of *service*: it fails when a critical check's latest result
        failed, and passes otherwise; ``failure_threshold`` failed rounds in a row make
        the service unhealthy, then ``recovery_threshold`` passing ones healthy again.
        Nothing happens when no result came in since the last round.
        """
        cfg = self.config_of(service)
        with self._lock:
            svc = self._services.get(service)
            if svc is None or not svc.pending:
                return
            checks = self._checks(svc)
            # A round is one result from every check: checks run at their own
            # intervals, and a round closed per result would count one old failure
            # again with every sibling's result (and flap with a flapping check).
            if any(c.round_result is None for c in checks):
                return
            svc.pending = False
            failing = [
                c
                for c in checks
                if c.round_result is not None
                and c.round_result.ok is False
                and self._critical(c, checks)
            ]
            for c in checks:
                c.round_result = None
            if failing:
                svc.fail_rounds += 1
                svc.pass_rounds = 0
                # the failure that sets the status is the reason shown: it follows
                # the failing rounds until the service is unhealthy, then stays
                if svc.up is not False or svc.failure is None:
                    svc.failure = "; ".join(
                        f"check {c.name!r} failing: {c.evidence.error if c.evidence else '?'}"
                        for c in failing
                    )
                if svc.up is not False and svc.fail_rounds >= cfg.failure_threshold:
                    svc.up = False
            else:
                svc.pass_rounds += 1
                svc.fail_rounds = 0
                if svc.up is None or (
                    svc.up is False and svc.pass_rounds >= cfg.recovery_threshold
                ):
                    svc.up = True
        self.refresh(service)

    def _evaluate(self, svc: _Service) -> dict[str, Any]:
        cfg = self.config_of(svc.name)
        checks = self._checks(svc)
        breaker = self._source.breaker(svc.name)
        bstate: str | None = None
        if breaker is not None:
            mode = breaker.mode
            bstate = (
                "open" if mode == "forced_open" else (None if mode != "normal" else breaker.state)
            )
        with self._lock:
            up, fail_rounds, failure = svc.up, svc.fail_rounds, svc.failure
            other_down = [
                c
                for c in checks
                if not self._critical(c, checks)
                and (c.up is False or (c.up is None and c.fails > 0))
            ]
            durations = [
                c.last.duration for c in checks if c.last is not None and c.last.ok is not None
            ]
            passive_check = next((c for c in checks if c.fn is None), None)
            failures = svc.history.count(False)
            history = len(svc.history)
            passive_detail = (
                passive_check.last.detail if passive_check and passive_check.last else None
            )
        response_time = max(durations) if durations else None
        error_rate = failures / history if history else None
        if passive_detail and "error_rate" in passive_detail:
            error_rate = max(error_rate or 0.0, passive_detail["error_rate"])
        reasons: list[str] = []
        status: HealthStatus
        # not ready: unhealthy, or failing since the start (never passed a round yet)
        ready = True
        if up is False:
            status = HealthStatus.UNHEALTHY
            reasons = [failure]
        elif bstate == "open" and cfg.open_breaker == "unhealthy":
            status = HealthStatus.UNHEALTHY
            reasons = ["circuit_breaker:open"]
        else:
            if up is None and fail_rounds:
                # failed from the start, below failure_threshold: degraded, not unknown
                ready = False
                reasons.append(
                    f"{failure} ({fail_rounds} of {cfg.failure_threshold} failed rounds "
                    "before unhealthy; never passed yet)"
                )
            reasons += [f"non-critical check {c.name!r} failing" for c in other_down]
            if response_time is not None and response_time > cfg.response_time_threshold:
                reasons.append(
                    f"response time {response_time:.3f}s > {cfg.response_time_threshold:g}s"
                )
            if bstate in ("open", "half-open"):
                reasons.append(f"circuit_breaker:{bstate}")
            if reasons:
                status = HealthStatus.DEGRADED
            elif up:
                status = HealthStatus.HEALTHY
                reasons = ["checks pass"]
            else:
                status = HealthStatus.UNKNOWN
                reasons = ["no result yet"]
        score = (
            None if status is HealthStatus.UNKNOWN else health_score(response_time, error_rate, cfg)
        )
        return {
            "status": status,
            "score": score,
            "reason": "; ".join(reasons),
            "critical": not checks or any(self._critical(c, checks) for c in checks),
            "ready": ready and status is not HealthStatus.UNHEALTHY,
            "response_time": None if response_time is None else round(response_time, 6),
            "error_rate": None if error_rate is None else round(error_rate, 4),
            "circuit_breaker": bstate,
            "checks": {c.name: self._check_view(c, checks) for c in checks},
        }

    def _check_view(self, c: _Check, checks: list[_Check]) -> dict[str, Any]:
        last = c.last
        return {
            "kind": c.kind,
            "critical": self._critical(c, checks),
            "status": (
                "fail"
                if c.up is None and c.fails
                else {None: "unknown", True: "pass", False: "fail"}[c.up]
            ),
            "last_result": (
                None
                if last is None
                else {None: "no evidence", True: "pass", False: "fail"}[last.ok]
            ),
            "consecutive_failures": c.fails,
            "consecutive_passes": c.passes,
            # no reading: no result yet, or the live calls' judge with no evidence
            "duration": (
                None
                if last is None or (c.fn is None and last.ok is None)
                else round(last.duration, 6)
            ),
            "error": None if last is None else last.error,
            "checked_at": None if last is None else _now_iso(last.at),
            "tags": list(c.tags),
            **({} if last is None or last.detail is None else {"detail": dict(last.detail)}),
        }

    def refresh(self, service: str) -> HealthStatus:
        """
        Evaluate *service* from its last results and its breaker now, announcing a
        transition (``HealthChanged`` event, :meth:`on_change` callbacks). Returns the status.
        """
        with self._lock:
            svc = self._services.get(service)
        if svc is None:
            svc = self._service(service)
        view = self._evaluate(svc)
        return self._transition(svc, view)

    def _transition(self, svc: _Service, view: dict[str, Any]) -> HealthStatus:
        status: HealthStatus = view["status"]
        with self._lock:
            old = svc.last[0]
            svc.last = (status, view["score"], view["reason"])
            callbacks = list(self._callbacks) if status is not old else []
        if status is old:
            return status
        score = view["score"] / 100.0 if view["score"] is not None else 0.0
        event = _events.HealthChanged(svc.name, old.value, status.value, score, view["reason"])
        if _events.bus.active:
            _events.bus.emit(event)
        for callback in callbacks:
            self._call_back(callback, event)
        return status

    def _call_back(self, callback: Callable[[_events.HealthChanged], Any], event: Any) -> None:
        try:
            value = callback(event)
            if inspect.isawaitable(value):
                self._schedule(value, callback)
        except Exception:
            _log.exception("health on_change callback %r raised; ignoring it", callback)

    def _schedule(self, awaitable: Awaitable[Any], callback: object) -> None:
        async def guarded() -> None:
            try:
                await awaitable
            except Exception:
                _log.exception("health on_change callback %r raised; ignoring it", callback)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            task = loop.create_task(guarded())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        elif self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(guarded(), self._loop)
        else:
            coro = guarded()
            coro.close()
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            _log.warning("async on_change callback %r skipped: no event loop running", callback)

    # ------------------------------------------------------------ reading

    def get_service_health(self, service: str) -> dict[str, Any]:
        """
        A JSON-serialisable view of one service: ``service``, ``status``, ``score``
        (0-100, ``None`` while unknown), ``reason``, ``critical``, ``response_time``,
        ``error_rate``, ``circuit_breaker``, ``checks`` (per check: ``kind``,
        ``critical``, ``status``, ``last_result``, ``consecutive_failures``,
        ``consecutive_passes``, ``duration``, ``error``, ``checked_at``, ``tags``)
        and ``checked_at``. Reads the last results; runs nothing.

        Raises:
            ServiceNotFoundError: No such service.
        """
        self._source.require(service)
        svc = self._service(service)
        view = self._evaluate(svc)
        self._transition(svc, view)
        view["status"] = view["status"].value
        return {
            "service": service,
            **view,
            "source": "health_checks",
            "checked_at": None if svc.checked_at is None else _now_iso(svc.checked_at),
        }

    def status(self, service: str) -> HealthStatus:
        """*service*'s status now (from its last results and its breaker)."""
        return HealthStatus(self.get_service_health(service)["status"])

    def get_system_health_summary(self) -> dict[str, Any]:
        """
        A JSON-serialisable summary: ``status``, ``score`` (mean of the known
        services' scores, or ``None``), ``source``, ``active_checks``, ``counts``
        per status, ``critical`` (the critical services), ``services`` (each as
        :meth:`get_service_health`) and ``timestamp``. The rules are in docs/health.md.
        """
        services = {name: self.get_service_health(name) for name in self.services}
        counts = {s.value: 0 for s in HealthStatus}
        for entry in services.values():
            counts[entry["status"]] += 1
        known = {n: e for n, e in services.items() if e["status"] != "unknown"}
        critical = [n for n, e in services.items() if e["critical"]]
        if not known:
            overall = HealthStatus.UNKNOWN
        elif any(known[n]["status"] == "unhealthy" for n in critical if n in known):
            overall = HealthStatus.UNHEALTHY
        elif all(e["status"] == "healthy" for e in known.values()):
            overall = HealthStatus.HEALTHY
        else:
            overall = HealthStatus.DEGRADED
        scores = [e["score"] for e in known.values() if e["score"] is not None]
        with self._lock:
            active = any(
                c.fn is not None for s in self._services.values() for c in s.checks.values()
            )
        return {
            "status": overall.value,
            "score": round(sum(scores) / len(scores), 1) if scores else None,
            "source": "health_checks",
            "active_checks": active,
            "counts": counts,
            "critical": critical,
            "services": services,
            "timestamp": _now_iso(),
        }

    # ------------------------------------------------------------ the scheduler

    @property
    def running(self) -> bool:
        """Whether the scheduler runs."""
        task = self._task
        if task is None or task.done():
            return False
        loop = task.get_loop()
        return loop.is_running() and not loop.is_closed()  # not a loop that was left

    async def start(self) -> None:
        """Start the scheduler on the running loop (idempotent)."""
        if self.running:
            return
        _ensure_observer()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._schedule_loop(), name="resilient-health")

    async def stop(self) -> None:
        """
        Stop the scheduler and cancel the checks it runs (idempotent): an async check
        in flight is cancelled and awaited (at most about a second); a sync check's
        thread cannot be stopped and ends on its own (a daemon thread: it never holds
        up the process's exit). May be awaited from another event loop than the one
        :meth:`start` ran on: the stop is then done on that loop, and awaited.
        """
        here = asyncio.get_running_loop()
        owner = self._loop
        if owner is not None and owner is not here and self._task is not None:
            if owner.is_running() and not owner.is_closed():
                done = asyncio.run_coroutine_threadsafe(self._stop_here(), owner)
                await asyncio.wrap_future(done)
            else:  # its loop is gone: so are its tasks
                self._task = None
                self._background = {t for t in self._background if t.get_loop() is here}
            return
        await self._stop_here()

    async def _stop_here(self) -> None:
        here = asyncio.get_running_loop()
        task, self._task = self._task, None
        pending = [t for t in self._background if not t.done() and t.get_loop() is here]
        if task is not None:
            pending.append(task)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def __aenter__(self) -> HealthMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _schedule_loop(self) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random()
        while True:
            now = loop.time()
            wake = now + _MAX_TICK
            try:
                for name in self.services:
                    with self._lock:
                        svc = self._services.get(name)
                    if svc is None:
                        svc = self._service(name)
                    cfg = self.config_of(name)
                    for check in self._checks(svc):
                        every = check.interval or cfg.check_interval
                        if check.due == 0.0:  # first run soon, spread a little
                            check.due = now + rng.uniform(0, min(every, 1.0) * 0.1)
                        if check.due <= now:
                            check.due = now + every * rng.uniform(0.9, 1.1)
                            task = loop.create_task(self._guarded(check))
                            self._background.add(task)
                            task.add_done_callback(self._background.discard)
                        wake = min(wake, check.due)
                    if not svc.checks:
                        self.refresh(name)  # a breaker may have moved
            except Exception:
                _log.exception("health scheduler: evaluating the services failed; carrying on")
            await asyncio.sleep(max(wake - loop.time(), 0.001))

    async def _guarded(self, check: _Check) -> None:
        try:
            await self._run_one(check)
        except Exception:
            _log.exception("health check %r of %r: recording failed", check.name, check.service)

"""
The seed's ``ResilienceManager``: a facade over the decorator's machinery.

    manager = await create_resilience_manager(service_name="trading_app")
    await manager.register_service("database", db, service_config={"failure_threshold": 5})
    async with manager.resilient_call("database", "query"):
        rows = await db.query("SELECT 1")

Every registered service gets a :class:`resilient.Policy` (from the flat
``service_config`` keys, or a named policy from the files) and runs through
:class:`resilient.pipeline.Pipeline`, the object ``@resilient`` compiles: the same
breaker, retry, bulkhead, rate limiter and time budgets, the same events and
the same metrics. A service's breaker, bulkhead and rate limiter are keyed by
the *service name*, like ``@resilient(..., name=...)``.

docs/manager.md has the flat-key table and the shapes of the status dicts.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resilient import _logging as _log_events
from resilient import attempt as _attempt
from resilient import events as _events
from resilient import metrics as _metrics
from resilient import pipeline as _pipeline
from resilient._models import (
    BulkheadConfig,
    CircuitBreakerConfig,
    HealthCheckConfig,
    Policy,
    PositiveFloat,
    PositiveInt,
    RetryConfig,
)
from resilient.backends._config import RedisUrl
from resilient.breaker import CircuitBreaker
from resilient.bulkhead import BulkheadManager, bulkhead_manager
from resilient.chaos import _inject as _chaos
from resilient.decorator import AttemptIterator, _Handle, _run_sync
from resilient.errors import PolicyError, ResilienceError, ServiceNotFoundError, did_you_mean
from resilient.health import HealthMonitor
from resilient.policy import parse_env_value, registry
from resilient.runtime import runtime

__all__ = [
    "FLAT_KEYS",
    "FeatureDisabledError",
    "HealthMonitor",
    "ResilienceConfig",
    "ResilienceManager",
    "RetryManager",
    "ServiceExistsError",
    "ServiceNotFoundError",
    "create_resilience_manager",
]


# --------------------------------------------------------------------------- errors


class ServiceExistsError(ResilienceError, ValueError):
    """``register_service`` named a service that is already registered (pass ``replace=True``)."""


class FeatureDisabledError(ResilienceError, RuntimeError):
    """The method needs a feature that ``ResilienceConfig`` switches off."""


# --------------------------------------------------------------------------- config

#: The seed's environment variables and the ``ResilienceConfig`` field each one sets.
ENV_VARS: Mapping[str, str] = {
    "RESILIENCE_SERVICE_NAME": "service_name",
    "RESILIENCE_ENVIRONMENT": "environment",
    "RESILIENCE_REDIS_URL": "redis_url",
    "RESILIENCE_CIRCUIT_BREAKER_ENABLED": "circuit_breaker_enabled",
    "RESILIENCE_ADAPTIVE_CIRCUIT_BREAKER_ENABLED": "adaptive_circuit_breaker_enabled",
    "RESILIENCE_RETRY_ENABLED": "retry_enabled",
    "RESILIENCE_MAX_RETRY_ATTEMPTS": "max_retry_attempts",
    "RESILIENCE_HEALTH_MONITORING_ENABLED": "health_monitoring_enabled",
    "RESILIENCE_HEALTH_CHECK_INTERVAL": "health_check_interval",
    "RESILIENCE_BULKHEAD_ENABLED": "bulkhead_enabled",
    "RESILIENCE_MAX_CONCURRENT_REQUESTS": "max_concurrent_requests",
    "RESILIENCE_CHAOS_ENGINEERING_ENABLED": "chaos_engineering_enabled",
    "RESILIENCE_METRICS_ENABLED": "metrics_enabled",
    "RESILIENCE_PROMETHEUS_ENABLED": "prometheus_enabled",
}


class ResilienceConfig(BaseModel):
    """
    What a :class:`ResilienceManager` switches on, with the seed's field names.

    A field not passed to the constructor is read from its ``RESILIENCE_*``
    environment variable (see ``ENV_VARS``), else takes its default: explicit
    arguments win over the environment, the environment over defaults. A feature
    switched off is absent from every service (no section in its policy, no
    entry in ``circuit_breakers`` ...).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    service_name: str = "resilient"
    """Name of the application (reported in the status)."""
    environment: str = "development"
    """Deployment environment (reported in the status)."""
    redis_url: RedisUrl = None
    """Shared state across processes: a Redis URL puts breakers, retry budgets and rate
    limits on the Redis backend (see docs/distributed.md); ``None`` keeps them in memory."""
    circuit_breaker_enabled: bool = True
    """Give every service a circuit breaker."""
    adaptive_circuit_breaker_enabled: bool = False
    """Give services the adaptive (learning) breaker: ``type: adaptive`` in their breaker
    section, in the mode of ``circuit_breaker_config.adaptive`` (``shadow`` unless set;
    see docs/adaptive.md). Needs the ``ml`` extra unless ML prediction is off."""
    retry_enabled: bool = True
    """Give every service retries (the ``attempts`` and ``call`` forms use them)."""
    max_retry_attempts: PositiveInt | None = None
    """Attempts in all, the first included, for services whose ``service_config`` names
    none. ``None``: ``retry_config.max_attempts``."""
    health_monitoring_enabled: bool = True
    """Keep ``manager.health_monitor`` and run its health checks (see docs/health.md)."""
    health_check_interval: PositiveFloat = 30.0
    """Seconds between two runs of each health check of a service whose policy has no
    ``health:`` section (the ``check_interval`` of the monitor's default config)."""
    bulkhead_enabled: bool = True
    """Give every service a bulkhead."""
    max_concurrent_requests: PositiveInt | None = None
    """Bulkhead size for services whose ``service_config`` has no ``max_concurrent``.
    ``None``: ``bulkhead_config.max_concurrent_requests``."""
    chaos_engineering_enabled: bool = False
    """Allow chaos engineering: while the manager runs, fault injection is allowed in the
    process (``resilient.chaos.allow``) and :meth:`ResilienceManager.run_chaos_experiment`
    works (docs/chaos.md)."""
    metrics_enabled: bool = True
    """Keep per-service call counts (in the status dicts)."""
    prometheus_enabled: bool = False
    """Export Prometheus metrics (``resilient.metrics.enable()`` while the manager runs;
    needs ``metrics_enabled`` and the ``prometheus`` extra)."""
    logging_enabled: bool = True
    """Log events on the ``resilient.*`` loggers while the manager runs."""
    circuit_breaker_config: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    """Breaker settings every flat ``service_config`` starts from."""
    retry_config: RetryConfig = Field(default_factory=RetryConfig)
    """Retry settings every flat ``service_config`` starts from."""
    bulkhead_config: BulkheadConfig = Field(default_factory=BulkheadConfig)
    """Bulkhead settings every flat ``service_config`` starts from."""

    def __init__(self, **data: Any) -> None:
        # Read here rather than in a validator, so that a bad variable is the
        # PolicyError naming it (pydantic would wrap it in a ValidationError).
        super().__init__(**self._from_environment(data))

    @classmethod
    def _from_environment(cls, data: dict[str, Any]) -> dict[str, Any]:
        merged = dict(data)
        for var, field in ENV_VARS.items():
            if field in merged:
                continue
            raw = os.environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            # the one parser of RESILIENCE_* values (policy overrides use it too)
            merged[field] = parse_env_value(
                var, raw, cls.model_fields[field], secret=field == "redis_url"
            )
        return merged


# --------------------------------------------------------------------------- flat keys

#: The seed's flat ``service_config`` keys: key -> (policy section, field).
#: ``failure_modes`` has no section: it is kept for chaos experiments.
FLAT_KEYS: Mapping[str, tuple[str, str] | None] = {
    "failure_threshold": ("circuit_breaker", "failure_threshold"),
    "timeout_seconds": ("circuit_breaker", "timeout_seconds"),
    "max_retry_attempts": ("retry", "max_attempts"),
    "retry_base_delay": ("retry", "base_delay"),
    "max_threads": ("bulkhead", "max_thread_pool_size"),
    "max_connections": ("bulkhead", "max_connection_pool_size"),
    "max_concurrent": ("bulkhead", "max_concurrent_requests"),
    "failure_modes": None,
}

_SECTION_FLAGS = {
    "circuit_breaker": "circuit_breaker_enabled",
    "retry": "retry_enabled",
    "bulkhead": "bulkhead_enabled",
}


def _flat_policy(
    service: str, flat: Mapping[str, Any], config: ResilienceConfig
) -> tuple[Policy, tuple[str, ...]]:
    """The policy of a flat ``service_config`` under *config*, and its failure modes."""
    unknown = [key for key in flat if key not in FLAT_KEYS]
    if unknown:
        problems = []
        for key in unknown:
            hint = did_you_mean(key, FLAT_KEYS)
            problems.append(f"unknown service_config key {key!r}{hint}")
        known = ", ".join(FLAT_KEYS)
        msg = f"service {service!r}: {'; '.join(problems)}; known keys: {known}"
        raise PolicyError(msg, policy=service, key=f"service_config.{unknown[0]}")
    updates: dict[str, dict[str, Any]] = {"circuit_breaker": {}, "retry": {}, "bulkhead": {}}
    if config.max_retry_attempts is not None:
        updates["retry"]["max_attempts"] = config.max_retry_attempts
    if config.max_concurrent_requests is not None:
        updates["bulkhead"]["max_concurrent_requests"] = config.max_concurrent_requests
    origin: dict[tuple[str, str], str] = {}
    for key, value in flat.items():
        target = FLAT_KEYS[key]
        if target is not None:
            updates[target[0]][target[1]] = value
            origin[target] = key
    bases: dict[str, BaseModel] = {
        "circuit_breaker": config.circuit_breaker_config,
        "retry": config.retry_config,
        "bulkhead": config.bulkhead_config,
    }
    cb = updates["circuit_breaker"]
    if config.adaptive_circuit_breaker_enabled:
        cb.setdefault("type", "adaptive")
    if "timeout_seconds" in cb:
        # a long open period must not trip the "max_open_duration >= timeout_seconds" rule
        cb.setdefault(
            "max_open_duration",
            _max_float(config.circuit_breaker_config.max_open_duration, cb["timeout_seconds"]),
        )
    sections: dict[str, Any] = {}
    for section, base in bases.items():
        if not getattr(config, _SECTION_FLAGS[section]):
            continue  # switched off: absent, whatever the keys say
        try:
            sections[section] = type(base)(**{**dict(base), **updates[section]})
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = str(err["loc"][0]) if err["loc"] else ""
                key = origin.get((section, field), f"{section}.{field}" if field else section)
                problems.append(f"service_config[{key!r}]: {err['msg']}")
            msg = f"service {service!r}: " + "; ".join(problems)
            raise PolicyError(msg, policy=service, problems=tuple(problems)) from None
    modes = flat.get("failure_modes") or ()
    if isinstance(modes, str) or not all(isinstance(m, str) for m in modes):
        msg = f"service {service!r}: service_config['failure_modes'] must be a list of names"
        raise PolicyError(msg, policy=service, key="service_config.failure_modes")
    # the modes its chaos experiments may inject: a misspelt one is a did-you-mean error
    where = f"service {service!r}: service_config['failure_modes']"
    checked = _chaos.check_modes(modes, where=where)
    return Policy(description=f"service {service}", **sections), checked


def _max_float(a: float, b: Any) -> Any:
    try:
        return max(a, float(b))
    except (TypeError, ValueError):
        return a  # let validation report the bad value


def _switch_off(policy: Policy, config: ResilienceConfig) -> Policy:
    """*policy* without the sections *config* switches off."""
    off = {
        section: None
        for section, flag in _SECTION_FLAGS.items()
        if not getattr(config, flag) and getattr(policy, section) is not None
    }
    return policy.model_copy(update=off) if off else policy


# --------------------------------------------------------------------------- services


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp is not None else None


def _calls_status(name: str) -> dict[str, Any]:
    """
    The ``calls`` part of a service's status, read from the process's shared
    counters (resilient.metrics.statistics) for *name*: every call of a pipeline
    of that name, the manager's and ``@resilient(..., name=<service>)``'s alike.
    """
    counts = _metrics.statistics.counts(name)
    calls = counts.calls
    total = counts.total
    return {
        "total": total,
        "success": calls["success"] + calls["fallback"],  # the fallback answered
        "failure": calls["failure"],
        "rejected": calls["rejected"],
        "timeout": calls["timeout"],
        "cancelled": calls["cancelled"],
        "fallbacks": calls["fallback"],
        "average_duration": counts.duration_sum / total if total else 0.0,
        "last_failure_at": _iso(counts.last_failure_at),
        "last_error_type": counts.last_error_type,
    }


class RetryManager:
    """
    The retry side of one service (the seed's ``retry_managers[name]``): its
    settings, its retry budget, and what its retries did. The counts are the
    process's shared counters for the service name (``resilient.metrics.statistics``,
    the ones Prometheus exports), so calls of ``@resilient(..., name=<service>)``
    are in them too; they are kept while the manager runs with ``metrics_enabled``
    (or while anything else holds them) and read zero otherwise.
    """

    def __init__(self, service: str, pipeline_of: Callable[[], _pipeline.Pipeline]) -> None:
        self.service = service
        self._pipeline_of = pipeline_of

    def get_metrics(self) -> dict[str, Any]:
        """
        A JSON-serialisable dict: ``service``, ``config`` (``max_attempts``,
        ``strategy``, ``base_delay``, ``max_delay``, ``multiplier``, ``jitter``,
        ``retry_on``), ``retries_scheduled``, ``total_delay``, ``average_delay``,
        ``exhausted`` (total) and ``exhausted_by_reason``, ``budget_exhausted``,
        ``last_error_type``, and ``budget`` (the retry budget's status, or ``None``).
        """
        pipeline = self._pipeline_of()
        retry = pipeline.policy.retry
        config: dict[str, Any] | None = None
        if retry is not None:
            config = {
                "max_attempts": retry.max_attempts,
                "strategy": retry.strategy.value,
                "base_delay": retry.base_delay,
                "max_delay": retry.max_delay,
                "multiplier": retry.multiplier,
                "jitter": retry.jitter,
                "retry_on": [e.__name__ for e in retry.retry_on],
            }
        counts = _metrics.statistics.counts(self.service)
        scheduled, delay = counts.retries, counts.retry_delay
        return {
            "service": self.service,
            "config": config,
            "retries_scheduled": scheduled,
            "total_delay": delay,
            "average_delay": delay / scheduled if scheduled else 0.0,
            "exhausted": sum(counts.exhausted.values()),
            "exhausted_by_reason": dict(counts.exhausted),
            "budget_exhausted": counts.budget_exhausted,
            "last_error_type": counts.retry_error_type,
            "budget": pipeline.budget.get_status() if pipeline.budget is not None else None,
        }


class _ServiceHandle:
    """
    A service's pipelines, one per operation name (operations name the events):
    the decorator's handles, claiming the shared objects under the service name,
    with the manager's switched-off sections removed from the policy.
    """

    __slots__ = ("_handles", "_lock", "name", "policy", "policy_name", "transform")

    def __init__(
        self,
        name: str,
        policy: Policy | None,
        policy_name: str | None,
        transform: Callable[[Policy], Policy] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.policy_name = policy_name
        self.transform = transform
        self._lock = threading.Lock()
        self._handles: dict[str, _Handle] = {}

    def get(self, operation: str) -> _pipeline.Pipeline:
        handle = self._handles.get(operation)
        if handle is None:
            with self._lock:
                if len(self._handles) >= 256 and operation not in self._handles:
                    self._handles.clear()  # operation names come from code; a safety net
                source = self.policy_name if self.policy_name is not None else self.policy
                assert source is not None
                handle = self._handles.setdefault(
                    operation,
                    _Handle(
                        source,
                        key=self.name,
                        callable_name=f"{self.name}.{operation}",
                        fallback=None,
                        claimant=f"service {self.name!r}",
                        transform=self.transform,
                    ),
                )
        return handle.get()


class _Service:
    __slots__ = (
        "failure_modes",
        "flat_config",
        "handle",
        "instance",
        "name",
        "policy_name",
        "registered_at",
        "retry",
    )

    def __init__(
        self,
        name: str,
        instance: Any,
        handle: _ServiceHandle,
        flat_config: dict[str, Any] | None,
        failure_modes: tuple[str, ...],
    ) -> None:
        self.name = name
        self.instance = instance
        self.handle = handle
        self.flat_config = flat_config
        self.policy_name = handle.policy_name
        self.failure_modes = failure_modes
        self.registered_at = _now_iso()
        self.retry: RetryManager | None = None


# --------------------------------------------------------------------------- views


class _ServiceView(Mapping[str, Any]):
    """A live, read-only mapping over the services that have a component."""

    def __init__(self, manager: ResilienceManager, pick: Callable[[_Service], Any], what: str):
        self._manager = manager
        self._pick = pick
        self._what = what

    def __getitem__(self, name: str) -> Any:
        service = self._manager._services.get(name)
        value = self._pick(service) if service is not None else None
        if value is None:
            raise ServiceNotFoundError(name, list(self), self._what)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(
            [name for name, s in list(self._manager._services.items()) if self._pick(s) is not None]
        )

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return f"<{self._what}s of {self._manager!r}: {sorted(self)}>"


def _breaker_of(manager: ResilienceManager, service: _Service) -> CircuitBreaker | None:
    return manager._pipeline(service).breaker


class _HealthSource:
    """What ``manager.health_monitor`` monitors: the registered services, their policies'
    ``health:`` sections and their circuit breakers."""

    def __init__(self, manager: ResilienceManager) -> None:
        self._manager = manager

    def names(self) -> list[str]:
        return list(self._manager._services)

    def config(self, service: str) -> HealthCheckConfig | None:
        found = self._manager._services.get(service)
        return self._manager._pipeline(found).policy.health if found is not None else None

    def breaker(self, service: str) -> CircuitBreaker | None:
        found = self._manager._services.get(service)
        return _breaker_of(self._manager, found) if found is not None else None

    def require(self, service: str) -> None:
        self._manager._service(service)


# --------------------------------------------------------------------------- the guarded block


class _GuardedBlock:
    """
    ``async with manager.resilient_call(service, operation):`` - the block is
    one attempt of the attempt engine (resilient.attempt): admitted by breaker,
    rate limiter and bulkhead, under the smaller of the two time budgets.
    """

    __slots__ = ("_began", "_manager", "_operation", "_pipeline", "_service", "_ticket")

    def __init__(self, manager: ResilienceManager, service: _Service, operation: str) -> None:
        self._manager = manager
        self._service = service
        self._operation = operation
        self._ticket: list[Any] | None = None
        self._began = 0.0

    async def __aenter__(self) -> _GuardedBlock:
        self._manager._check_open()
        p = self._pipeline = self._service.handle.get(self._operation)
        self._began = time.perf_counter()
        try:
            # one attempt, under the smaller of the two budgets (armed below)
            ticket = _attempt.admit(p, False, True, False)
            if ticket[_attempt.WAIT]:
                await _attempt.admit_rest(p, ticket, False)
        except BaseException as exc:
            self._finish(exc)
            raise
        _attempt.arm_single(p, ticket)
        stage = p.chaos
        if stage is not None:  # an injected fault is the attempt's outcome (docs/chaos.md)
            treated = stage.begin()
            try:
                fault = await stage.enter_async(treated)
            except BaseException as exc:  # the armed deadline cancelled an injected hang
                fault = exc
            if isinstance(fault, BaseException):  # SKIPPED (error_result): run the block
                error = _attempt.settle(p, ticket, fault)
                self._finish(error)
                assert error is not None
                raise error
        self._ticket = ticket
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        ticket, self._ticket = self._ticket, None
        assert ticket is not None
        error = _attempt.settle(self._pipeline, ticket, exc)
        self._finish(error)
        if error is not exc:
            assert error is not None
            raise error from None
        return False

    def _finish(self, error: BaseException | None) -> None:
        observer = self._pipeline.observer
        if observer is not None:
            outcome = "success" if error is None else _pipeline.outcome_of(error)
            _pipeline.observe(observer, outcome, self._began, error)


# --------------------------------------------------------------------------- the manager


class ResilienceManager:
    """
    The seed's facade: services registered by name, each guarded by a policy
    that runs on the decorator's pipeline.

    Use ``await manager.initialize()`` (or ``async with ResilienceManager(config)
    as manager``, or ``await create_resilience_manager(...)``) before registering
    services, and ``await manager.close()`` at the end.

    Attributes:
        config: The :class:`ResilienceConfig`.
        circuit_breakers: Service name -> :class:`resilient.CircuitBreaker`, for
            services with a breaker (live: follows policy reloads).
        retry_managers: Service name -> :class:`RetryManager`, for services that retry.
        bulkhead_manager: The process's :class:`resilient.BulkheadManager` (it lists
            every bulkhead of the process; the manager's are under their service
            names), or ``None`` when bulkheads are switched off.
        health_monitor: The :class:`resilient.health.HealthMonitor` of the
            services, or ``None`` when health monitoring is switched off. Its
            scheduler runs from :meth:`initialize` to :meth:`close`.
    """

    def __init__(self, config: ResilienceConfig | None = None) -> None:
        self.config = config if config is not None else ResilienceConfig()
        self._services: dict[str, _Service] = {}
        self._initialized = False
        self._closed = False
        self._started = time.monotonic()
        self._started_at = _now_iso()
        self._unsubscribe: Callable[[], None] | None = None
        self._owns_metrics = False
        self._owns_statistics = False
        self._owns_logging = False
        self._owns_backend = False
        self._experiments: dict[str, Any] = {}  # register_experiment(): name -> Experiment
        self._last_experiment: dict[str, Any] | None = None
        cfg = self.config
        self.circuit_breakers: Mapping[str, CircuitBreaker] = _ServiceView(
            self, lambda s: _breaker_of(self, s), "circuit breaker"
        )
        self.retry_managers: Mapping[str, RetryManager] = _ServiceView(
            self,
            lambda s: s.retry if self._pipeline(s).policy.retry is not None else None,
            "retry manager",
        )
        self.bulkhead_manager: BulkheadManager | None = (
            bulkhead_manager if cfg.bulkhead_enabled else None
        )
        self.health_monitor: HealthMonitor | None = (
            HealthMonitor(
                HealthCheckConfig(check_interval=cfg.health_check_interval),
                source=_HealthSource(self),
            )
            if cfg.health_monitoring_enabled
            else None
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("ready" if self._initialized else "new")
        return f"<ResilienceManager {self.config.service_name!r} {state} services={len(self)}>"

    @property
    def initialized(self) -> bool:
        """Whether :meth:`initialize` ran (and :meth:`close` did not)."""
        return self._initialized and not self._closed

    def __len__(self) -> int:
        return len(self._services)

    # ------------------------------------------------------------ lifecycle

    async def initialize(self) -> None:
        """
        Start the manager: subscribe to the event bus and, per the config, turn
        on Prometheus metrics and event logging. Idempotent.

        Raises:
            ImportError: ``prometheus_enabled`` without prometheus-client, or
                ``redis_url`` without redis-py (the ``redis`` extra).
        """
        if self._closed:
            msg = "this ResilienceManager is closed; make a new one"
            raise RuntimeError(msg)
        if self._initialized:
            return
        cfg = self.config
        if cfg.redis_url is not None:
            self._connect_backend(cfg.redis_url)
        if cfg.metrics_enabled:
            _metrics.statistics.retain()  # the per-service counts of the status
            self._owns_statistics = True
            if cfg.prometheus_enabled:
                _metrics._retain()
                self._owns_metrics = True
        if cfg.logging_enabled:
            _log_events._retain()
            self._owns_logging = True
        self._unsubscribe = _events.subscribe(self._on_event)
        _chaos.set_environment(cfg.environment, owner=self)  # the production guard reads it
        if cfg.chaos_engineering_enabled:
            _chaos.allow(self)  # injection allowed while this manager runs
        if self.health_monitor is not None:
            await self.health_monitor.start()
        self._initialized = True

    def _connect_backend(self, url: str) -> None:
        from resilient.backends._config import BackendConfig

        runtime.claim_backend(self, BackendConfig(redis_url=url))
        runtime.backend()  # connect now: a bad URL or a missing extra fails here
        self._owns_backend = True

    async def close(self) -> None:
        """
        Stop the manager: unsubscribe, release metrics and logging, forget the
        services. Breakers and bulkheads stay with their names in the process
        (as for ``@resilient``). Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if self.health_monitor is not None:
            await self.health_monitor.stop()
            for name in list(self._services):
                self.health_monitor.remove_service(name)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        _chaos.disallow(self)
        _chaos.set_environment(None, owner=self)
        if self._owns_metrics:
            _metrics._release()
            self._owns_metrics = False
        if self._owns_statistics:
            _metrics.statistics.release()
            self._owns_statistics = False
        if self._owns_logging:
            _log_events._release()
            self._owns_logging = False
        if self._owns_backend:
            # Never reset what we did not set: the newest running manager's backend
            # stays in use, and the last one gives back the application's own choice.
            runtime.release_backend(self)
            runtime.backend()  # switch now, so a Redis link no one uses closes
            self._owns_backend = False
        self._services.clear()

    async def __aenter__(self) -> ResilienceManager:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            msg = "this ResilienceManager is closed"
            raise RuntimeError(msg)
        if not self._initialized:
            msg = (
                "the ResilienceManager is not initialised: await manager.initialize() first "
                "(or use create_resilience_manager() / `async with ResilienceManager(config)`)"
            )
            raise RuntimeError(msg)

    # ------------------------------------------------------------ services

    async def register_service(
        self,
        service_name: str,
        service_instance: Any = None,
        service_config: Mapping[str, Any] | None = None,
        *,
        policy: str | Policy | None = None,
        replace: bool = False,
    ) -> None:
        """
        Register a service under *service_name*.

        Args:
            service_name: Names the service; its breaker, bulkhead, rate limiter,
                events and metrics use this name.
            service_instance: The client object; ``call(name, "method", ...)``
                looks methods up on it.
            service_config: The seed's flat keys (see ``FLAT_KEYS`` and
                docs/manager.md), on top of the config's ``*_config`` defaults.
            policy: Instead of *service_config*: a policy name from the policy
                files (followed across reloads) or a :class:`resilient.Policy`.
            replace: Replace a service already registered under that name. The health
                checks added with ``health_monitor.add_check`` stay (their results start
                afresh); the old instance's ``health_check()`` gives way to the new one's.

        Raises:
            ServiceExistsError: The name is taken and *replace* is false.
            PolicyError: Unknown or invalid keys, or an unknown policy name.
            ValueError: Both *service_config* and *policy* were given.
        """
        self._check_open()
        if not isinstance(service_name, str) or not service_name:
            msg = f"service_name must be a non-empty string, not {service_name!r}"
            raise TypeError(msg)
        if service_name in self._services and not replace:
            msg = f"service {service_name!r} is already registered; pass replace=True to replace it"
            raise ServiceExistsError(msg, policy=service_name)
        if service_config is not None and policy is not None:
            msg = "give either service_config (flat seed keys) or policy, not both"
            raise ValueError(msg)
        flat: dict[str, Any] | None = None
        modes: tuple[str, ...] = ()
        if isinstance(policy, str):
            registry.get(policy)  # an unknown name fails now (PolicyError)
            handle = _ServiceHandle(
                service_name, None, policy, transform=lambda p: _switch_off(p, self.config)
            )
        elif isinstance(policy, Policy):
            handle = _ServiceHandle(service_name, _switch_off(policy, self.config), None)
        elif policy is None:
            flat = dict(service_config or {})
            built, modes = _flat_policy(service_name, flat, self.config)
            handle = _ServiceHandle(service_name, built, None)
        else:
            msg = f"policy must be a policy name or a resilient.Policy, not {policy!r}"
            raise TypeError(msg)
        service = _Service(service_name, service_instance, handle, flat, modes)
        service.retry = RetryManager(service_name, lambda: self._pipeline(service))
        self._pipeline(service)  # build now: breaker and bulkhead exist from the start
        monitor = self.health_monitor
        if monitor is not None:
            if service_name in self._services:
                # replaced: the checks the user added stay (and start afresh); only the
                # old instance's own health_check() goes
                monitor.reset_service(service_name, drop=("health_check",))
            else:
                monitor.remove_service(service_name)
        self._services[service_name] = service
        _chaos.register_target(service_name)  # an experiment may name it before its first call
        if monitor is not None:
            probe = getattr(service_instance, "health_check", None)
            if service_instance is not None and callable(probe):
                monitor.add_check(service_name, probe, kind="shallow", name="health_check")
            self._update_health(service)

    async def unregister_service(self, service_name: str) -> None:
        """
        Forget a service.

        Raises:
            ServiceNotFoundError: No such service.
        """
        self._service(service_name)
        del self._services[service_name]
        if self.health_monitor is not None:
            self.health_monitor.remove_service(service_name)

    @property
    def services(self) -> Mapping[str, Any]:
        """Service name -> the registered service instance."""
        return {name: s.instance for name, s in self._services.items()}

    def _service(self, name: str) -> _Service:
        service = self._services.get(name)
        if service is None:
            raise ServiceNotFoundError(name, list(self._services))
        return service

    def _pipeline(self, service: _Service, operation: str = "call") -> _pipeline.Pipeline:
        return service.handle.get(operation)

    # ------------------------------------------------------------ calling

    def resilient_call(self, service_name: str, operation: str = "call") -> _GuardedBlock:
        """
        Guard a block of code: ``async with manager.resilient_call("db", "query"): ...``.

        The block is one attempt: it passes the service's circuit breaker, rate
        limiter and bulkhead on entry, runs under its time budget (the smaller
        of the per-attempt and total budgets; on expiry the block is cancelled
        and ``resilient.AttemptTimeoutError`` raised), and its outcome feeds the
        breaker and the metrics.

        **It is not retried**: a ``with`` block cannot be run again by the
        context manager around it. For retries use ``await manager.call(...)``
        or ``async for attempt in manager.attempts(...)``.

        Raises:
            ServiceNotFoundError: No such service (at once, not on entry).
            resilient.CircuitOpenError, resilient.BulkheadFullError,
            resilient.RateLimitedError: On entry; the block did not run.
        """
        service = self._service(service_name)
        return _GuardedBlock(self, service, operation)

    async def call(
        self, service_name: str, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> Any:
        """
        Call *fn* through the service's whole policy, retries included:
        ``await manager.call("database", db.query, sql)``.

        *fn* may be a method name of the registered instance
        (``await manager.call("database", "query", sql)``). An async *fn* is
        awaited; a sync one runs in a worker thread so the loop is not blocked.

        Raises:
            ServiceNotFoundError: No such service.
            AttributeError: *fn* names no method of the instance.
        """
        self._check_open()
        service = self._service(service_name)
        target: Callable[..., Any]
        if isinstance(fn, str):
            operation = fn
            method = getattr(service.instance, fn, None)
            if method is None or not callable(method):
                msg = f"service {service_name!r}: its instance has no method {fn!r}"
                raise AttributeError(msg)
            target = method
        else:
            target = fn
            operation = getattr(fn, "__name__", None) or "call"
        pipeline = service.handle.get(operation)
        # counted by the pipeline's observer (resilient.metrics.statistics)
        if _pipeline._is_async_callable(target):
            return await pipeline.run_async(target, args, kwargs)
        # the decorator's sync runner: a coroutine handed back is a TypeError
        return await asyncio.to_thread(_run_sync, pipeline, target, args, kwargs)

    def attempts(self, service_name: str) -> AttemptIterator:
        """
        The retrying block form: ``async for attempt in manager.attempts("db"):
        with attempt: ...``. The block runs again while it raises a retryable
        exception and attempts remain; the breaker sees every attempt. As with
        ``resilient.attempts``, bulkhead and time budgets are not applied to the
        block (use :meth:`call` for them).

        Raises:
            ServiceNotFoundError: No such service.
        """
        self._check_open()
        return AttemptIterator(self._pipeline(self._service(service_name), "attempts"))

    # ------------------------------------------------------------ status

    def get_service_status(self, service_name: str) -> dict[str, Any]:
        """
        A JSON-serialisable snapshot of one service (shape in docs/manager.md):
        ``name``, ``source``, ``registered_at``, ``strategies``, ``failure_modes``,
        and, for each feature present, ``circuit_breaker``, ``retry``,
        ``bulkhead``, ``rate_limit``, ``timeouts``, ``health``, ``calls``.

        Raises:
            ServiceNotFoundError: No such service.
        """
        service = self._service(service_name)
        pipeline = self._pipeline(service)
        policy = pipeline.policy
        source: dict[str, Any]
        if service.policy_name is not None:
            source = {"kind": "policy", "policy": service.policy_name}
        elif service.flat_config is not None:
            source = {"kind": "service_config", "service_config": _jsonable(service.flat_config)}
        else:
            source = {"kind": "policy_object"}
        status: dict[str, Any] = {
            "name": service.name,
            "source": source,
            "instance_type": (
                type(service.instance).__qualname__ if service.instance is not None else None
            ),
            "registered_at": service.registered_at,
            "strategies": [
                name
                for name, present in (
                    ("fallback", pipeline.fallback is not None),
                    ("timeout", pipeline.per_attempt is not None or pipeline.total is not None),
                    ("retry", pipeline.retry is not None),
                    ("circuit_breaker", pipeline.breaker is not None),
                    ("rate_limit", pipeline.limiter is not None),
                    ("bulkhead", pipeline.bulkhead is not None),
                )
                if present
            ],
            "failure_modes": list(service.failure_modes),
        }
        if pipeline.breaker is not None:
            status["circuit_breaker"] = pipeline.breaker.get_status()
        if policy.retry is not None and service.retry is not None:
            status["retry"] = service.retry.get_metrics()
        if pipeline.bulkhead is not None:
            status["bulkhead"] = pipeline.bulkhead.get_status()
        if pipeline.limiter is not None:
            status["rate_limit"] = pipeline.limiter.get_status()
        if pipeline.per_attempt is not None or pipeline.total is not None:
            status["timeouts"] = {"per_attempt": pipeline.per_attempt, "total": pipeline.total}
        if self.health_monitor is not None:
            status["health"] = self.health_monitor.get_service_health(service.name)
        if self.config.metrics_enabled:
            status["calls"] = _calls_status(service.name)
        return status

    def get_system_status(self) -> dict[str, Any]:
        """
        A JSON-serialisable snapshot of the manager (shape in docs/manager.md):
        ``service_name``, ``environment``, ``version``, ``backend``, ``state``,
        ``started_at``, ``uptime_seconds``, ``features``, ``unavailable``,
        ``services`` (each as :meth:`get_service_status`), ``summary`` and, with
        health monitoring, ``health``.
        """
        from resilient import metrics
        from resilient._version import __version__

        cfg = self.config
        services = {name: self.get_service_status(name) for name in list(self._services)}
        unavailable: dict[str, str] = {}
        state = "closed" if self._closed else ("running" if self._initialized else "created")
        backend = runtime.backend()  # the one really in use, whoever chose it
        backend_name, backend_status = backend.name, backend.status()
        open_breakers = [
            name
            for name, s in services.items()
            if s.get("circuit_breaker", {}).get("state", "closed") != "closed"
        ]
        status: dict[str, Any] = {
            "service_name": cfg.service_name,
            "environment": cfg.environment,
            "version": __version__,
            "backend": backend_name,
            "backend_status": backend_status,
            "state": state,
            "started_at": self._started_at,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "features": {
                "circuit_breaker": cfg.circuit_breaker_enabled,
                "adaptive_circuit_breaker": cfg.circuit_breaker_enabled
                and cfg.adaptive_circuit_breaker_enabled,
                "retry": cfg.retry_enabled,
                "bulkhead": cfg.bulkhead_enabled,
                "health_monitoring": cfg.health_monitoring_enabled,
                "chaos_engineering": cfg.chaos_engineering_enabled,
                "metrics": cfg.metrics_enabled,
                "prometheus": cfg.metrics_enabled
                and cfg.prometheus_enabled
                and metrics.active() is not None,
                "logging": cfg.logging_enabled,
            },
            "unavailable": unavailable,
            "services": services,
            "summary": {
                "services": len(services),
                "circuit_breakers_not_closed": open_breakers,
            },
        }
        if self.health_monitor is not None:
            health = self.health_monitor.get_system_health_summary()
            status["health"] = health
            status["summary"]["health"] = health["status"]
        if cfg.chaos_engineering_enabled:
            status["chaos"] = self._chaos_status()
        return status

    def _chaos_status(self) -> dict[str, Any]:
        """The ``chaos`` block of the system status."""
        return {
            "injection_allowed": _chaos.enabled(),
            "environment": _chaos.environment(),
            "stopped": _chaos.is_stopped(),
            "stop_reason": _chaos.stop_reason(),
            "active_injections": [
                {
                    "target": inj.target,
                    "experiment": inj.experiment,
                    "rate": inj.rate,
                    "faults": inj.faults,
                }
                for inj in _chaos.active_injections()
            ],
            "experiments": sorted(self._experiments),
            "last_experiment": self._last_experiment,
        }

    # ------------------------------------------------------------ health and chaos

    async def run_health_check(self, service_name: str) -> dict[str, Any]:
        """
        Run the service's health checks now (its ``health_check()`` method, the
        checks added with ``manager.health_monitor.add_check``, the passive check of
        a policy with a ``health:`` section) and return its health, as
        ``manager.health_monitor.get_service_health(name)`` (docs/health.md).

        Raises:
            FeatureDisabledError: ``health_monitoring_enabled`` is false.
            ServiceNotFoundError: No such service.
        """
        if self.health_monitor is None:
            msg = "health monitoring is switched off (ResilienceConfig.health_monitoring_enabled)"
            raise FeatureDisabledError(msg)
        self._check_open()
        return await self.health_monitor.run_check(service_name)

    def register_experiment(self, experiment: Any, *, name: str | None = None) -> str:
        """
        Make an experiment runnable by name with :meth:`run_chaos_experiment`.

        Args:
            experiment: A :class:`resilient.chaos.Experiment`, or the path of an
                experiment file (its services may be this manager's services).
            name: The name to run it by (default: its title).

        Returns:
            The name it was registered under.

        Raises:
            resilient.PolicyError: The file is invalid or names an unknown service.
            ValueError: A step injects a mode that its service's ``failure_modes`` does
                not list.
        """
        from resilient.chaos._experiment import Experiment, load_experiment

        if isinstance(experiment, str | os.PathLike):
            experiment = load_experiment(experiment, services=self._services)
        if not isinstance(experiment, Experiment):
            msg = f"experiment must be a resilient.chaos.Experiment or a path, not {experiment!r}"
            raise TypeError(msg)
        self._check_failure_modes(experiment)
        key = name if name is not None else experiment.title
        self._experiments[key] = experiment
        return key

    def _check_failure_modes(self, experiment: Any) -> None:
        """Every step into a service with ``failure_modes`` injects only those (ValueError)."""
        for number, step in enumerate(experiment.method):
            service = self._services.get(step.service)
            if service is None or not service.failure_modes:
                continue
            refused = [mode for mode in step.mode if mode not in service.failure_modes]
            if refused:
                msg = (
                    f"chaos experiment {experiment.title!r}: method[{number}] injects "
                    f"{', '.join(refused)} into service {service.name!r}, whose failure_modes "
                    f"are {', '.join(service.failure_modes)}"
                )
                raise ValueError(msg)

    async def run_chaos_experiment(
        self,
        experiment_name: str,
        service_name: str,
        *,
        target: Callable[..., Any] | None = None,
        duration: float | None = None,
        intensity: float | None = None,
        dry_run: bool = False,
        now: Any = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """
        Run a chaos experiment against a service and return its journal (a
        JSON-serialisable dict, as ``ExperimentResult.to_dict()``; docs/chaos.md).

        *experiment_name* is an experiment given to :meth:`register_experiment`,
        or a built-in template ``<failure_mode>_test`` (``network_delay_test``,
        ``timeout_test``, ``exception_test``, ``error_result_test``,
        ``latency_spike_test``): inject that mode into *service_name* (which must
        list it in its ``failure_modes`` when it has any) at *intensity* (default
        0.5) for *duration* seconds (default 30), with the steady state "at least
        80 % of calls succeed and the breaker is closed" checked before and after.
        The template drives load by calling the service's ``health_check()``
        through the service's policy 5 times a second (or *target*, or observes
        real traffic when there is neither).

        Raises:
            FeatureDisabledError: ``chaos_engineering_enabled`` is false.
            ServiceNotFoundError: No such service.
            ValueError: No experiment and no template of that name, the service does
                not allow a failure mode the experiment injects into it, or a registered
                experiment does not inject into *service_name*.
            resilient.ChaosRefusedError: A guard refused the run (production,
                emergency stop, business hours, minimum interval).
        """
        if not self.config.chaos_engineering_enabled:
            msg = (
                f"chaos experiment {experiment_name!r} not run: chaos engineering is switched "
                "off (ResilienceConfig.chaos_engineering_enabled / "
                "RESILIENCE_CHAOS_ENGINEERING_ENABLED)"
            )
            raise FeatureDisabledError(msg)
        self._check_open()
        service = self._service(service_name)
        from resilient.chaos._runner import run_experiment

        experiment = self._experiments.get(experiment_name)
        if experiment is None:
            experiment = self._template(experiment_name, service, duration, intensity)
            if target is None:
                target = self._template_target(service)
        else:
            if duration is not None or intensity is not None:
                msg = "duration and intensity apply to the built-in templates only"
                raise ValueError(msg)
            services = sorted({step.service for step in experiment.method})
            if service_name not in services:
                msg = (
                    f"chaos experiment {experiment_name!r} injects into "
                    f"{', '.join(repr(name) for name in services)}, not into {service_name!r}"
                )
                raise ValueError(msg)
            self._check_failure_modes(experiment)  # (services registered after it, too)
        result = await run_experiment(
            experiment,
            target=target,
            dry_run=dry_run,
            now=now,
            monitor=self.health_monitor,
            services=self._services,
            seed=seed,
        )
        journal = result.to_dict()
        self._last_experiment = {
            "name": experiment_name,
            "service": service_name,
            "status": journal["status"],
            "held": journal["held"],
            "started_at": journal["started_at"],
        }
        return journal

    def _template(
        self, name: str, service: _Service, duration: float | None, intensity: float | None
    ) -> Any:
        """The built-in experiment ``<failure_mode>_test`` against *service*."""
        from resilient.chaos._experiment import FAILURE_MODES, Experiment

        mode = name.removesuffix("_test") if name.endswith("_test") else None
        if mode not in FAILURE_MODES:
            options = [*self._experiments, *(f"{m}_test" for m in FAILURE_MODES)]
            hint = did_you_mean(name, options)
            msg = (
                f"no chaos experiment {name!r}{hint}: register one with "
                f"register_experiment(), or use a template: {', '.join(options)}"
            )
            raise ValueError(msg)
        if service.failure_modes and mode not in service.failure_modes:
            msg = (
                f"service {service.name!r} does not allow the failure mode {mode!r}: its "
                f"failure_modes are {', '.join(service.failure_modes)}"
            )
            raise ValueError(msg)
        has_breaker = self._pipeline(service).breaker is not None
        probes: list[dict[str, Any]] = [{"type": "success_rate", "tolerance": 0.8}]
        if has_breaker:
            probes.append({"type": "breaker_state", "service": service.name, "tolerance": "closed"})
        driven = callable(getattr(service.instance, "health_check", None))
        if not driven:
            probes = probes[1:]  # no traffic of our own: the rate is not ours to judge
        return Experiment.model_validate(
            {
                "title": name,
                "description": f"built-in template: {mode} into service {service.name!r}",
                "steady_state_hypothesis": (
                    {"title": "the service answers", "probes": probes} if probes else None
                ),
                "method": [
                    {
                        "service": service.name,
                        "mode": mode,
                        "intensity": 0.5 if intensity is None else intensity,
                        "duration": 30.0 if duration is None else duration,
                    }
                ],
                "load": {"rate": 5},
                "allow_production": False,
            }
        )

    def _template_target(self, service: _Service) -> Callable[..., Any] | None:
        """The load of a template: the service's ``health_check()`` through its policy."""
        if not callable(getattr(service.instance, "health_check", None)):
            return None
        name = service.name

        async def call_health_check() -> Any:
            return await self.call(name, "health_check")

        return call_health_check

    # ------------------------------------------------------------ events

    def _on_event(self, event: object) -> None:
        policy = getattr(event, "policy", None)
        if policy is None:
            return
        service = self._services.get(policy)
        if service is None:
            return
        # counting is resilient.metrics.statistics' job; a breaker's move changes health
        if isinstance(event, _events.BreakerStateChanged) and self.health_monitor is not None:
            self._update_health(service)

    def _update_health(self, service: _Service) -> None:
        """Re-evaluate *service*'s health; a transition is announced by the monitor."""
        assert self.health_monitor is not None
        if self._services.get(service.name) is service:
            self.health_monitor.refresh(service.name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


async def create_resilience_manager(
    service_name: str | None = None,
    environment: str | None = None,
    redis_url: str | None = None,
    **config: Any,
) -> ResilienceManager:
    """
    Make and initialise a :class:`ResilienceManager` (the seed's entry point).

    Arguments left out (or ``None``) come from the ``RESILIENCE_*`` environment
    variables, else the defaults; *config* takes any other ``ResilienceConfig``
    field (``chaos_engineering_enabled=True`` ...).

    Raises:
        pydantic.ValidationError: An unknown or invalid config field.
    """
    given = dict(config)
    for key, value in (
        ("service_name", service_name),
        ("environment", environment),
        ("redis_url", redis_url),
    ):
        if value is not None:
            given[key] = value
    manager = ResilienceManager(ResilienceConfig(**given))
    await manager.initialize()
    return manager

"""
Prometheus metrics for every pipeline, on prometheus-client.

    import resilient

    resilient.metrics.enable()                 # the default registry
    resilient.metrics.enable(registry=my_reg)  # or a CollectorRegistry of your own
    resilient.metrics.disable()

``prometheus_client`` is imported by :func:`enable` (or by building a
:class:`PrometheusMetrics`), never by ``import resilient``. Three sources feed
the instruments, each chosen for what it costs the call path:

* **Per call** (``resilient_calls_total``, ``resilient_call_duration_seconds``):
  the pipeline's observer hook (:func:`resilient.pipeline.set_observer_factory`).
  The factory runs once per pipeline and binds the label children there; a call
  then costs one dict look-up, one counter increment and one histogram
  observation.
* **Per event** (transitions, retries, rejections, health, chaos, backend): a
  subscriber on the event bus. Events only happen off the success path.
* **Per scrape** (breaker state, bulkhead in use / queued / limit): a collector
  that reads the live objects when Prometheus scrapes, so keeping them current
  costs the calls nothing.

Every label is bounded by configuration (policy and service names, outcome,
state, reason, fault); no label ever holds a call's arguments. docs/metrics.md
lists every metric.
"""

from __future__ import annotations

import itertools
import threading
from bisect import bisect_left as _bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from resilient import events as _events
from resilient import pipeline as _pipeline
from resilient.runtime import runtime

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "DEFAULT_BUCKETS",
    "HEALTH_STATUSES",
    "OUTCOMES",
    "PrometheusMetrics",
    "active",
    "disable",
    "enable",
]

#: Every value of the ``outcome`` label of ``resilient_calls_total``.
OUTCOMES: tuple[str, ...] = ("success", "failure", "fallback", "rejected", "timeout", "cancelled")

#: Every value of the ``status`` label of ``resilient_health_status``.
HEALTH_STATUSES: tuple[str, ...] = ("healthy", "degraded", "unhealthy", "unknown")

#: Buckets of ``resilient_call_duration_seconds`` (seconds): 1 ms to 30 s.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

_BREAKER_STATES = ("closed", "open", "half-open")
_REJECTION_REASONS = ("circuit_open", "bulkhead_full", "rate_limited")


class _CallStats:
    """
    The call counts and duration histogram of one policy: the "label children"
    bound once per pipeline by the observer factory.

    prometheus-client's own children take a lock per ``inc()`` (four per call
    for a counter and a histogram: about 2 µs on a small machine, as much as the
    whole pipeline). Here every count is an ``itertools.count``, whose
    ``next()`` is one C call that CPython runs without releasing the GIL, so no
    lock is needed; the bucket is found in C (``bisect``). The duration *sum*
    is a float updated in place, which CPython's GIL also makes atomic (no
    thread switch can happen inside ``+=`` on a float); on a free-threaded
    build it may miss an update under contention, the counts never do.
    :class:`_CallCollector` turns the totals into ``resilient_calls_total``
    and ``resilient_call_duration_seconds`` when Prometheus scrapes.
    """

    __slots__ = ("bounds", "buckets", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = {outcome: itertools.count() for outcome in OUTCOMES}
        self.buckets = [itertools.count() for _ in range(len(bounds) + 1)]  # last: +Inf
        self.sum = 0.0

    def record(self, outcome: str, duration: float) -> None:
        next(self.counts[outcome])
        next(self.buckets[_bisect_left(self.bounds, duration)])  # first bound >= d: "le"
        self.sum += duration

    def snapshot(self) -> tuple[dict[str, int], list[int], float]:
        return (
            {outcome: _value(c) for outcome, c in self.counts.items()},
            [_value(c) for c in self.buckets],
            self.sum,
        )


def _value(counter: itertools.count[int]) -> int:
    # itertools.count shows its next value only through repr / __reduce__.
    return int(counter.__reduce__()[1][0])


class _CallCollector:
    """Exposes every policy's :class:`_CallStats` at scrape time."""

    def __init__(self, stats: dict[str, _CallStats], bounds: tuple[float, ...]) -> None:
        self._stats = stats
        self._les = [_le(b) for b in bounds] + ["+Inf"]

    def describe(self) -> Iterator[Any]:
        yield from self._families()

    def collect(self) -> Iterator[Any]:
        calls, duration = self._families()
        for name, stats in sorted(self._stats.items()):
            counts, buckets, total = stats.snapshot()
            for outcome, count in counts.items():
                calls.add_metric([name, outcome], float(count))
            cumulative, running = [], 0
            for le, count in zip(self._les, buckets, strict=True):
                running += count
                cumulative.append((le, float(running)))
            duration.add_metric([name], cumulative, sum_value=total)
        yield calls
        yield duration

    @staticmethod
    def _families() -> tuple[Any, Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        return (
            CounterMetricFamily(
                "resilient_calls",
                "Calls through a resilient pipeline, by how they ended.",
                labels=["policy", "outcome"],
            ),
            HistogramMetricFamily(
                "resilient_call_duration_seconds",
                "Time of a whole call through the pipeline (every attempt, wait and fallback).",
                labels=["policy"],
            ),
        )


def _le(bound: float) -> str:
    # prometheus-client writes bucket bounds as repr() of the float ("0.005", "1.0")
    return repr(float(bound))


class PrometheusMetrics:
    """
    The instruments of resilient in one registry.

    Building one imports ``prometheus_client`` and creates the instruments
    without registering them; :meth:`install` registers them and connects them
    to the pipelines and the event bus, :meth:`uninstall` undoes both (so a
    registry can be given to a new instance afterwards). Most code calls
    :func:`enable` / :func:`disable` instead, which keep one installed
    instance for the process.

    Args:
        registry: Where the metrics are registered (default: prometheus-client's
            global ``REGISTRY``, which ``generate_latest()`` and
            ``start_http_server()`` export).
        buckets: Upper bounds of the call-duration histogram, in seconds.

    Raises:
        ImportError: ``prometheus_client`` is not installed (the ``prometheus``
            extra).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        try:
            import prometheus_client as pc
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            msg = (
                "resilient metrics need prometheus-client: "
                "pip install 'resilient-policies[prometheus]'"
            )
            raise ImportError(msg) from exc
        self.registry: CollectorRegistry = pc.REGISTRY if registry is None else registry
        self._lock = threading.Lock()
        self._installed = False
        self._unsubscribe: Callable[[], None] | None = None
        c, g = pc.Counter, pc.Gauge
        bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        self._stats: dict[str, _CallStats] = {}
        self._bounds = bounds
        self._calls = _CallCollector(self._stats, bounds)
        self.breaker_transitions = c(
            "resilient_circuit_breaker_transitions_total",
            "Circuit breaker state changes.",
            ["policy", "from", "to"],
            registry=None,
        )
        self.breaker_rejections = c(
            "resilient_circuit_breaker_rejections_total",
            "Attempts refused because the circuit breaker was open (or its trial calls taken).",
            ["policy"],
            registry=None,
        )
        self.retry_attempts = c(
            "resilient_retry_attempts_total",
            "Retries scheduled (attempts after the first).",
            ["policy"],
            registry=None,
        )
        self.retries_exhausted = c(
            "resilient_retries_exhausted_total",
            "Calls whose retries stopped on a failure, by reason.",
            ["policy", "reason"],
            registry=None,
        )
        self.retry_budget_exhausted = c(
            "resilient_retry_budget_exhausted_total",
            "Failed attempts not retried because the retry budget was spent.",
            ["policy"],
            registry=None,
        )
        self.bulkhead_rejected = c(
            "resilient_bulkhead_rejected_total",
            "Attempts refused because the bulkhead had no free slot in time.",
            ["policy"],
            registry=None,
        )
        self.rate_limited = c(
            "resilient_rate_limited_total",
            "Attempts refused by the rate limiter.",
            ["policy"],
            registry=None,
        )
        self.health_status = g(
            "resilient_health_status",
            "1 for the current health status of a service, 0 for the others.",
            ["service", "status"],
            registry=None,
        )
        self.health_score = g(
            "resilient_health_score",
            "Health score of a service, 0 (down) to 1 (fully healthy).",
            ["service"],
            registry=None,
        )
        self.chaos_injections = c(
            "resilient_chaos_injections_total",
            "Faults injected by chaos engineering.",
            ["policy", "fault"],
            registry=None,
        )
        self.backend_up = g(
            "resilient_backend_up",
            "1 while the shared state backend is reachable, 0 while it is not.",
            ["backend"],
            registry=None,
        )
        self._state = _StateCollector()
        self._collectors: tuple[Any, ...] = (
            self._calls,
            self.breaker_transitions,
            self.breaker_rejections,
            self.retry_attempts,
            self.retries_exhausted,
            self.retry_budget_exhausted,
            self.bulkhead_rejected,
            self.rate_limited,
            self.health_status,
            self.health_score,
            self.chaos_injections,
            self.backend_up,
            self._state,
        )
        self._handlers: dict[type, Callable[[Any], None]] = {
            _events.BreakerStateChanged: self._on_transition,
            _events.CallRejected: self._on_rejected,
            _events.RetryScheduled: self._on_retry,
            _events.RetriesExhausted: self._on_exhausted,
            _events.RetryBudgetExhausted: self._on_budget,
            _events.HealthChanged: self._on_health,
            _events.ChaosInjected: self._on_chaos,
            _events.BackendDown: self._on_backend_down,
            _events.BackendUp: self._on_backend_up,
        }

    # ------------------------------------------------------------ wiring

    @property
    def installed(self) -> bool:
        """Whether the instruments are registered and fed."""
        return self._installed

    def install(self) -> None:
        """
        Register the instruments and start feeding them; pipelines get their
        observer at their next call.

        Raises:
            ValueError: The registry already holds metrics of these names (another
                instance is installed there).
        """
        with self._lock:
            if self._installed:
                return
            done: list[Any] = []
            try:
                for collector in self._collectors:
                    self.registry.register(collector)
                    done.append(collector)
            except ValueError:
                for collector in done:
                    self.registry.unregister(collector)
                raise
            self._unsubscribe = _events.subscribe(self.on_event)
            _pipeline.set_observer_factory(self.observer_for)
            self._installed = True

    def uninstall(self) -> None:
        """Stop feeding the instruments and take them out of the registry."""
        with self._lock:
            if not self._installed:
                return
            if runtime.observer_factory == self.observer_for:
                _pipeline.set_observer_factory(None)
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            for collector in self._collectors:
                self.registry.unregister(collector)
            self._installed = False

    # ------------------------------------------------------------ per pipeline

    def observer_for(self, pipeline: _pipeline.Pipeline) -> _CallStats:
        """
        The observer factory: the call statistics of *pipeline*'s policy, made
        once per policy name and shared by its pipelines; nothing is looked up
        per call.
        """
        name = pipeline.name
        stats = self._stats.get(name)
        if stats is None:
            with self._lock:
                stats = self._stats.setdefault(name, _CallStats(self._bounds))
        return stats

    # ------------------------------------------------------------ per event

    def on_event(self, event: object) -> None:
        """The event-bus subscriber: updates the counters an event stands for."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _on_transition(self, event: _events.BreakerStateChanged) -> None:
        self.breaker_transitions.labels(event.policy, event.old_state, event.new_state).inc()

    def _on_rejected(self, event: _events.CallRejected) -> None:
        if event.reason == "circuit_open":
            self.breaker_rejections.labels(event.policy).inc()
        elif event.reason == "bulkhead_full":
            self.bulkhead_rejected.labels(event.policy).inc()
        elif event.reason == "rate_limited":
            self.rate_limited.labels(event.policy).inc()

    def _on_retry(self, event: _events.RetryScheduled) -> None:
        self.retry_attempts.labels(event.policy).inc()

    def _on_exhausted(self, event: _events.RetriesExhausted) -> None:
        self.retries_exhausted.labels(event.policy, event.reason).inc()

    def _on_budget(self, event: _events.RetryBudgetExhausted) -> None:
        self.retry_budget_exhausted.labels(event.policy).inc()

    def _on_health(self, event: _events.HealthChanged) -> None:
        for status in HEALTH_STATUSES:
            self.health_status.labels(event.service, status).set(
                1.0 if status == event.new_status else 0.0
            )
        self.health_score.labels(event.service).set(event.score)

    def _on_chaos(self, event: _events.ChaosInjected) -> None:
        self.chaos_injections.labels(event.policy, event.fault).inc()

    def _on_backend_down(self, event: _events.BackendDown) -> None:
        self.backend_up.labels(event.backend).set(0.0)

    def _on_backend_up(self, event: _events.BackendUp) -> None:
        self.backend_up.labels(event.backend).set(1.0)


class _StateCollector:
    """
    Breaker states and bulkhead occupancy, read from the live objects at
    scrape time (nothing is kept up to date on the call path).
    """

    def describe(self) -> Iterator[Any]:
        # Declared so that registering does not run a collection.
        yield from self._families()

    def collect(self) -> Iterator[Any]:
        state, in_use, queued, limit = self._families()
        for name, breaker in sorted(_pipeline.breakers().items()):
            current = breaker.state
            for value in _BREAKER_STATES:
                state.add_metric([name, value], 1.0 if value == current else 0.0)
        from resilient.bulkhead import bulkhead_manager

        for name, bulkhead in sorted(bulkhead_manager.bulkheads().items()):
            status = bulkhead.get_status()
            in_use.add_metric([name], float(status["in_use"]))
            queued.add_metric([name], float(status["queued"]))
            limit.add_metric([name], float(status["limit"]))
        yield state
        yield in_use
        yield queued
        yield limit

    @staticmethod
    def _families() -> tuple[Any, Any, Any, Any]:
        from prometheus_client.core import GaugeMetricFamily

        return (
            GaugeMetricFamily(
                "resilient_circuit_breaker_state",
                "1 for the current state of a circuit breaker, 0 for the others.",
                labels=["policy", "state"],
            ),
            GaugeMetricFamily(
                "resilient_bulkhead_in_use",
                "Bulkhead slots taken now.",
                labels=["policy"],
            ),
            GaugeMetricFamily(
                "resilient_bulkhead_queued",
                "Callers waiting for a bulkhead slot now.",
                labels=["policy"],
            ),
            GaugeMetricFamily(
                "resilient_bulkhead_limit",
                "Current concurrency limit of a bulkhead (moves with auto-scaling).",
                labels=["policy"],
            ),
        )


# --------------------------------------------------------------------------- process-wide

_lock = threading.RLock()
_active: PrometheusMetrics | None = None
_retained_by_managers = 0
_owned_by_managers = False


def enable(
    registry: CollectorRegistry | None = None,
    *,
    buckets: Sequence[float] | None = None,
) -> PrometheusMetrics:
    """
    Export resilient's metrics to *registry* (default: prometheus-client's
    global ``REGISTRY``) and return the installed :class:`PrometheusMetrics`.

    Calling it again with the same registry returns the installed instance.

    Raises:
        RuntimeError: Metrics are already enabled with another registry (call
            :func:`disable` first).
        ImportError: prometheus-client is not installed.
    """
    global _active, _owned_by_managers
    with _lock:
        if _active is not None:
            wanted = registry
            if wanted is None:
                import prometheus_client

                wanted = prometheus_client.REGISTRY
            if _active.registry is wanted and buckets is None:
                _owned_by_managers = False  # someone asked for it explicitly
                return _active
            msg = "resilient metrics are already enabled with another registry; disable() first"
            raise RuntimeError(msg)
        metrics = PrometheusMetrics(
            registry, buckets=DEFAULT_BUCKETS if buckets is None else buckets
        )
        metrics.install()
        _active = metrics
        _owned_by_managers = False
        return metrics


def disable() -> None:
    """Stop exporting: the observer hook, the subscriber and the instruments are removed."""
    global _active, _owned_by_managers
    with _lock:
        if _active is not None:
            _active.uninstall()
        _active = None
        _owned_by_managers = False


def active() -> PrometheusMetrics | None:
    """The installed :class:`PrometheusMetrics`, or ``None`` when metrics are off."""
    return _active


def _retain() -> PrometheusMetrics:
    """
    For ``ResilienceManager``: make sure metrics are on, counting the managers
    that need them. Metrics a manager turned on are turned off by the last
    :func:`_release`; metrics the application enabled itself are left alone.
    """
    global _retained_by_managers, _owned_by_managers
    with _lock:
        current = _active
        if current is None:
            current = enable()
            _owned_by_managers = True
        _retained_by_managers += 1
        return current


def _release() -> None:
    global _retained_by_managers
    with _lock:
        _retained_by_managers = max(_retained_by_managers - 1, 0)
        if _retained_by_managers == 0 and _owned_by_managers:
            disable()

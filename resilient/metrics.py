"""
The per-policy counters of resilient, and their Prometheus export.

    import resilient

    resilient.metrics.enable()                 # the default registry
    resilient.metrics.enable(registry=my_reg)  # or a CollectorRegistry of your own
    resilient.metrics.disable()

One set of counters, :data:`statistics`, is kept per policy name while someone
holds it (:meth:`Statistics.retain` / :meth:`Statistics.release`): the
Prometheus exporter and ``ResilienceManager`` (its ``calls`` and
``retry_managers``) both read it, so they always agree. It needs no
``prometheus_client``. What feeds it, each chosen for what it costs the call
path:

* **Per call** (outcome counts, duration histogram and sum, last failure): the
  pipeline's observer hook (:func:`resilient.pipeline.set_observer_factory`).
  The factory runs once per pipeline and hands it the :class:`_CallStats` of
  its policy; a call then costs one dict look-up and two lock-free counter
  increments.
* **Per event** (retries, retries exhausted, retry budget, refusals): a
  subscriber on the event bus. Events only happen off the success path.

``prometheus_client`` is imported by :func:`enable` (or by building a
:class:`PrometheusMetrics`), never by ``import resilient``. The exporter turns
:data:`statistics` into metric families when Prometheus scrapes, reads breaker
states and bulkhead occupancy from the live objects at scrape time, and keeps
prometheus-client instruments only for what the counters do not hold
(transitions, health, chaos, backend).

Every label is bounded by configuration (policy and service names, outcome,
state, reason, fault); no label ever holds a call's arguments. docs/metrics.md
lists every metric.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from bisect import bisect_left as _bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
    "PolicyCounts",
    "PrometheusMetrics",
    "Statistics",
    "active",
    "disable",
    "enable",
    "statistics",
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
_time = time.time


class _CallStats:
    """
    Everything counted for one policy name: the call observer that the
    factory binds once per pipeline, plus the counters the event bus feeds.

    Per call, prometheus-client's own children would take a lock per ``inc()``
    (four per call for a counter and a histogram: about 2 µs on a small
    machine, as much as the whole pipeline). Here every per-call count is an
    ``itertools.count``, whose ``next()`` is one C call that CPython runs
    without releasing the GIL, so no lock is needed; the bucket is found in C
    (``bisect``). The duration *sum* and the last failure time are plain
    attributes updated in place, which CPython's GIL also makes atomic; on a
    free-threaded build the sum may miss an update under contention, the counts
    never do. The event counters are updated under :class:`Statistics`' lock
    (events are off the success path).
    """

    __slots__ = (
        "bound",
        "budget_exhausted",
        "counts",
        "exhausted",
        "histogram",
        "last_error_type",
        "last_failure_at",
        "refused",
        "retries",
        "retry_delay",
        "retry_error_type",
        "sum",
    )

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.counts = {outcome: itertools.count() for outcome in OUTCOMES}
        # one attribute, so that a change of buckets is seen whole by a concurrent record()
        self.histogram = _histogram(bounds)
        self.sum = 0.0
        self.bound = False  # some pipeline observes through it (else: events only)
        self.last_failure_at: float | None = None
        self.last_error_type: str | None = None
        self.retries = 0
        self.retry_delay = 0.0
        self.retry_error_type: str | None = None
        self.exhausted: dict[str, int] = {}
        self.budget_exhausted = 0
        self.refused: dict[str, int] = {}

    def record(self, outcome: str, duration: float) -> None:
        """The observer hook: one call of the policy ended with *outcome*."""
        next(self.counts[outcome])
        bounds, buckets, first, lowest = self.histogram
        # the bucket of the first bound >= d ("le"); most calls of a fast
        # service land in the lowest one, found without the search
        next(lowest if duration <= first else buckets[_bisect_left(bounds, duration)])
        self.sum += duration
        if outcome != "success" and outcome != "fallback" and outcome != "cancelled":
            self.last_failure_at = _time()

    def failed(self, error: BaseException) -> None:
        """
        Optional observer hook, after :meth:`record`, for a call that did not
        succeed: remembers the error's type (cancellation is no failure).
        """
        if isinstance(error, Exception):
            self.last_error_type = type(error).__name__


_Histogram = tuple[tuple[float, ...], list["itertools.count[int]"], float, "itertools.count[int]"]


def _histogram(bounds: tuple[float, ...]) -> _Histogram:
    """
    A histogram's counts: ``(bounds, counts per bucket (the last one +Inf),
    the lowest bound, the lowest bucket's count)``, the last two for
    :meth:`_CallStats.record`'s shortcut.
    """
    buckets = [itertools.count() for _ in range(len(bounds) + 1)]
    return (bounds, buckets, bounds[0] if bounds else -math.inf, buckets[0])


def _value(counter: itertools.count[int]) -> int:
    # itertools.count shows its next value only through repr / __reduce__.
    return int(counter.__reduce__()[1][0])


@dataclass(frozen=True, slots=True)
class PolicyCounts:
    """
    What :data:`statistics` counted for one policy name since it was retained
    (:meth:`Statistics.counts`). All zero for a name nothing was counted for.

    Attributes:
        calls: Calls by outcome (every value of :data:`OUTCOMES`); one per call,
            whatever the number of attempts.
        duration_sum: Seconds spent in those calls, all outcomes together.
        retries: Retries scheduled (attempts after the first).
        retry_delay: Seconds of delay those retries were scheduled with.
        retry_error_type: Type name of the last error a retry was scheduled for,
            or that ended the retries.
        exhausted: Calls whose retries stopped on a failure, by reason
            (``attempts``, ``total_timeout``, ``not_retryable``, ``budget``, ...).
        budget_exhausted: Failed attempts not retried because the retry budget
            was spent.
        refused: Attempts refused, by reason (``circuit_open``,
            ``bulkhead_full``, ``rate_limited``).
        last_failure_at: ``time.time()`` of the last call that ended in failure,
            rejection or timeout, or ``None``.
        last_error_type: Type name of that call's error, or ``None`` (set by
            observers that report errors, see :meth:`_CallStats.failed`).
    """

    calls: Mapping[str, int]
    duration_sum: float
    retries: int
    retry_delay: float
    retry_error_type: str | None
    exhausted: Mapping[str, int]
    budget_exhausted: int
    refused: Mapping[str, int]
    last_failure_at: float | None
    last_error_type: str | None

    @property
    def total(self) -> int:
        """Calls in all."""
        return sum(self.calls.values())


class Statistics:
    """
    The process's per-policy counters (one instance: :data:`statistics`).

    Reference-counted: while at least one holder has called :meth:`retain`
    (the Prometheus exporter, each ``ResilienceManager`` with
    ``metrics_enabled``), it is the runtime's call observer factory and a
    subscriber of the event bus; pipelines built before pick it up at their
    next call. The last :meth:`release` unhooks it and forgets every count (the
    next holder starts from zero).
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self._lock = threading.Lock()  # the table and the event counters
        self._life = threading.RLock()  # retain / release
        self._holders = 0
        self._unsubscribe: Callable[[], None] | None = None
        self._bounds = _bounds_of(buckets)
        self._policies: dict[str, _CallStats] = {}
        self._handlers: dict[type, Callable[[_CallStats, Any], None]] = {
            _events.RetryScheduled: _on_retry,
            _events.RetriesExhausted: _on_exhausted,
            _events.RetryBudgetExhausted: _on_budget,
            _events.CallRejected: _on_rejected,
        }

    def __repr__(self) -> str:
        return f"<Statistics holders={self._holders} policies={sorted(self._policies)}>"

    # ------------------------------------------------------------ lifecycle

    @property
    def retained(self) -> bool:
        """Whether anyone holds the counters (they are fed only then)."""
        return self._holders > 0

    @property
    def holders(self) -> int:
        """How many :meth:`retain` calls are not yet matched by :meth:`release`."""
        return self._holders

    def retain(self) -> None:
        """Start counting (if not already) and count one more holder."""
        with self._life:
            self._holders += 1
            if self._holders > 1:
                return
            self._unsubscribe = _events.subscribe(self.on_event)
            runtime.set_observer_factory(self.observer_for)

    def release(self) -> None:
        """Count one holder less; the last one stops the counting and forgets the counts."""
        with self._life:
            if self._holders == 0:
                return
            self._holders -= 1
            if self._holders:
                return
            if runtime.observer_factory == self.observer_for:
                runtime.set_observer_factory(None)
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            with self._lock:
                self._policies = {}
                self._bounds = _bounds_of(DEFAULT_BUCKETS)

    def use_buckets(self, buckets: Sequence[float]) -> None:
        """
        Upper bounds of the duration histogram, in seconds. Changing them
        restarts every histogram from zero (the counts and the sum stay).
        """
        bounds = _bounds_of(buckets)
        with self._lock:
            if bounds == self._bounds:
                return
            self._bounds = bounds
            for stats in self._policies.values():
                stats.histogram = _histogram(bounds)

    # ------------------------------------------------------------ feeding

    def observer_for(self, pipeline: _pipeline.Pipeline) -> _CallStats:
        """
        The observer factory: the counters of *pipeline*'s policy name, made once
        per name and shared by its pipelines; nothing is looked up per call.
        """
        stats = self._entry(pipeline.name)
        stats.bound = True
        return stats

    def on_event(self, event: object) -> None:
        """The event-bus subscriber: counts retries, exhaustions and refusals."""
        handler = self._handlers.get(type(event))
        if handler is None:
            return
        name: str = event.policy  # type: ignore[attr-defined]
        stats = self._entry(name)
        with self._lock:
            handler(stats, event)

    def _entry(self, name: str) -> _CallStats:
        stats = self._policies.get(name)
        if stats is None:
            with self._lock:
                stats = self._policies.get(name)
                if stats is None:
                    stats = self._policies[name] = _CallStats(self._bounds)
        return stats

    # ------------------------------------------------------------ reading

    def names(self) -> list[str]:
        """The policy names something was counted for, sorted."""
        return sorted(self._policies)

    def counts(self, name: str) -> PolicyCounts:
        """What was counted for policy (or service) *name*; zeros if nothing was."""
        stats = self._policies.get(name)
        if stats is None:
            return PolicyCounts(
                calls=dict.fromkeys(OUTCOMES, 0),
                duration_sum=0.0,
                retries=0,
                retry_delay=0.0,
                retry_error_type=None,
                exhausted={},
                budget_exhausted=0,
                refused={},
                last_failure_at=None,
                last_error_type=None,
            )
        calls = {outcome: _value(c) for outcome, c in stats.counts.items()}
        with self._lock:
            return PolicyCounts(
                calls=calls,
                duration_sum=stats.sum,
                retries=stats.retries,
                retry_delay=stats.retry_delay,
                retry_error_type=stats.retry_error_type,
                exhausted=dict(stats.exhausted),
                budget_exhausted=stats.budget_exhausted,
                refused=dict(stats.refused),
                last_failure_at=stats.last_failure_at,
                last_error_type=stats.last_error_type,
            )

    def _entries(self) -> list[tuple[str, _CallStats]]:
        return sorted(self._policies.items())


def _bounds_of(buckets: Sequence[float]) -> tuple[float, ...]:
    return tuple(sorted(float(b) for b in buckets if b != float("inf")))


def _on_retry(stats: _CallStats, event: _events.RetryScheduled) -> None:
    stats.retries += 1
    stats.retry_delay += event.delay
    stats.retry_error_type = event.error_type


def _on_exhausted(stats: _CallStats, event: _events.RetriesExhausted) -> None:
    stats.exhausted[event.reason] = stats.exhausted.get(event.reason, 0) + 1
    stats.retry_error_type = event.error_type


def _on_budget(stats: _CallStats, event: _events.RetryBudgetExhausted) -> None:
    stats.budget_exhausted += 1


def _on_rejected(stats: _CallStats, event: _events.CallRejected) -> None:
    stats.refused[event.reason] = stats.refused.get(event.reason, 0) + 1


#: The process's per-policy counters.
statistics = Statistics()


class _CountsCollector:
    """
    Exposes :data:`statistics` at scrape time: calls, durations, retries and
    refusals. An event counter of a policy appears once it is above zero, as
    a prometheus-client child appears at its first increment.
    """

    def __init__(self, source: Statistics) -> None:
        self._source = source
        self._les: dict[tuple[float, ...], list[str]] = {}

    def describe(self) -> Iterator[Any]:
        yield from self._families()

    def collect(self) -> Iterator[Any]:
        calls, duration, retries, exhausted, budget, breaker, bulkhead, limited = self._families()
        refusals = tuple(zip(_REJECTION_REASONS, (breaker, bulkhead, limited), strict=True))
        source = self._source
        for name, stats in source._entries():
            counts = source.counts(name)
            if stats.bound:
                for outcome, count in counts.calls.items():
                    calls.add_metric([name, outcome], float(count))
                bounds, buckets, _, _ = stats.histogram
                les = self._les.get(bounds)
                if les is None:
                    les = self._les[bounds] = [_le(b) for b in bounds] + ["+Inf"]
                cumulative, running = [], 0
                for le, bucket in zip(les, buckets, strict=True):
                    running += _value(bucket)
                    cumulative.append((le, float(running)))
                duration.add_metric([name], cumulative, sum_value=counts.duration_sum)
            if counts.retries:
                retries.add_metric([name], float(counts.retries))
            for reason, count in sorted(counts.exhausted.items()):
                exhausted.add_metric([name, reason], float(count))
            if counts.budget_exhausted:
                budget.add_metric([name], float(counts.budget_exhausted))
            for reason, family in refusals:
                count = counts.refused.get(reason, 0)
                if count:
                    family.add_metric([name], float(count))
        yield calls
        yield duration
        yield breaker
        yield retries
        yield exhausted
        yield budget
        yield bulkhead
        yield limited

    @staticmethod
    def _families() -> tuple[Any, ...]:
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
            CounterMetricFamily(
                "resilient_retry_attempts",
                "Retries scheduled (attempts after the first).",
                labels=["policy"],
            ),
            CounterMetricFamily(
                "resilient_retries_exhausted",
                "Calls whose retries stopped on a failure, by reason.",
                labels=["policy", "reason"],
            ),
            CounterMetricFamily(
                "resilient_retry_budget_exhausted",
                "Failed attempts not retried because the retry budget was spent.",
                labels=["policy"],
            ),
            CounterMetricFamily(
                "resilient_circuit_breaker_rejections",
                "Attempts refused because the circuit breaker was open (or its trial calls taken).",
                labels=["policy"],
            ),
            CounterMetricFamily(
                "resilient_bulkhead_rejected",
                "Attempts refused because the bulkhead had no free slot in time.",
                labels=["policy"],
            ),
            CounterMetricFamily(
                "resilient_rate_limited",
                "Attempts refused by the rate limiter.",
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
    without registering them; :meth:`install` registers them, retains
    :data:`statistics` (which then feeds the call, retry and refusal counters)
    and subscribes to the event bus; :meth:`uninstall` undoes all three (so a
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
        self._buckets = _bounds_of(buckets)
        self._counts = _CountsCollector(statistics)
        self.breaker_transitions = c(
            "resilient_circuit_breaker_transitions_total",
            "Circuit breaker state changes.",
            ["policy", "from", "to"],
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
        self.hedges = c(
            "resilient_hedges",
            "Hedged attempts started (the hedge: section).",
            ["policy"],
            registry=None,
        )
        self.backend_up = g(
            "resilient_backend_up",
            "1 while the shared state backend is reachable, 0 while it is not.",
            ["backend"],
            registry=None,
        )
        self._state = _StateCollector()
        self._risk = _RiskCollector()
        self._collectors: tuple[Any, ...] = (
            self._counts,
            self.breaker_transitions,
            self.health_status,
            self.health_score,
            self.chaos_injections,
            self.hedges,
            self.backend_up,
            self._state,
            self._risk,
        )
        self._handlers: dict[type, Callable[[Any], None]] = {
            _events.BreakerStateChanged: self._on_transition,
            _events.HealthChanged: self._on_health,
            _events.ChaosInjected: self._on_chaos,
            _events.HedgeStarted: self._on_hedge,
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
            statistics.use_buckets(self._buckets)
            statistics.retain()
            self._installed = True

    def uninstall(self) -> None:
        """Stop feeding the instruments and take them out of the registry."""
        with self._lock:
            if not self._installed:
                return
            statistics.release()
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            for collector in self._collectors:
                self.registry.unregister(collector)
            self._installed = False

    # ------------------------------------------------------------ per pipeline

    def observer_for(self, pipeline: _pipeline.Pipeline) -> _CallStats:
        """The call observer of *pipeline*: its policy's counters in :data:`statistics`."""
        return statistics.observer_for(pipeline)

    # ------------------------------------------------------------ per event

    def on_event(self, event: object) -> None:
        """The event-bus subscriber: updates the instruments an event stands for."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _on_transition(self, event: _events.BreakerStateChanged) -> None:
        self.breaker_transitions.labels(event.policy, event.old_state, event.new_state).inc()

    def _on_health(self, event: _events.HealthChanged) -> None:
        for status in HEALTH_STATUSES:
            self.health_status.labels(event.service, status).set(
                1.0 if status == event.new_status else 0.0
            )
        self.health_score.labels(event.service).set(event.score)

    def _on_chaos(self, event: _events.ChaosInjected) -> None:
        self.chaos_injections.labels(event.policy, event.fault).inc()

    def _on_hedge(self, event: _events.HedgeStarted) -> None:
        self.hedges.labels(event.policy).inc()

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


class _RiskCollector:
    """
    The adaptive breakers' predicted failure probability, read at scrape time from
    the live breakers (only those predicting now: nothing without a model).
    """

    def describe(self) -> Iterator[Any]:
        yield self._family()

    def collect(self) -> Iterator[Any]:
        family = self._family()
        for name, breaker in sorted(_pipeline.breakers().items()):
            risk = getattr(breaker, "predicted_risk", None)
            if risk is not None:
                family.add_metric([name], float(risk))
        yield family

    @staticmethod
    def _family() -> Any:
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(
            "resilient_circuit_breaker_predicted_risk",
            "Failure probability predicted by an adaptive circuit breaker (0-1).",
            labels=["policy"],
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

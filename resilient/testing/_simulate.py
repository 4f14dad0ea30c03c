"""
``simulate()``: drive the real pipeline in virtual time against a scenario.

Callers arrive as a Poisson process at *rate* calls per second for *duration*
seconds; each one awaits a function decorated with ``@resilient`` (the real
decorator and pipeline, in an isolated registry) that calls the scenario's
backend. Everything runs on a :class:`VirtualTimeEventLoop`, so latencies,
backoff sleeps, timeouts and breaker periods cost no real time, and the run is
a pure function of its arguments: one ``random.Random(seed)`` draws arrivals,
failures and latencies, and the global ``random`` module (which tenacity's
jittered waits use) is seeded for the run and restored afterwards.

Outcomes count what the pipeline did with each call: it *succeeded*, *failed*
(the backend's error or a timeout ended it) or was *rejected* (by the breaker,
the bulkhead or the rate limit). A policy's fallback does not hide any of that:
*fallback* counts, among the failed and rejected calls, those the fallback
answered (the cause comes from the ``FallbackUsed`` event of the call).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from resilient._models import Policy
from resilient.errors import (
    AttemptTimeoutError,
    BulkheadFullError,
    CircuitOpenError,
    RateLimitedError,
    RejectedError,
)
from resilient.events import BreakerStateChanged, FallbackUsed, HedgeStarted, RetryScheduled, bus
from resilient.testing._helpers import isolated_registry
from resilient.testing._scenario import Scenario, SimulatedError
from resilient.testing._virtual import VirtualClock

__all__ = ["LatencySummary", "SecondStats", "SimulationResult", "Transition", "simulate"]

#: Names of the call outcomes, in the order the timeline and tables show them.
#: Exactly one per call; a fallback's answer is counted on top (``fallback``).
_OUTCOMES = (
    "succeeded",
    "failed",
    "rejected_breaker",
    "rejected_bulkhead",
    "rejected_rate_limit",
    "rejected_other",
)
_SUCCEEDED, _FAILED, _BREAKER, _BULKHEAD, _RATE, _OTHER = range(6)
_TIMED_OUT = -1  # a failure by AttemptTimeoutError (counted as _FAILED too)

_OK = object()  # what the simulated backend returns; anything else came from a fallback

#: The error type of the ``FallbackUsed`` event of the call running in this context.
_fallback_cause: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "resilient_simulation_fallback_cause", default=None
)


@dataclass(frozen=True, slots=True)
class Transition:
    """
    A circuit breaker transition.

    Attributes:
        at: Virtual time of the transition, in seconds since the start.
        old: State left (``"closed"``, ``"open"``, ``"half-open"``).
        new: State entered.
        backend_calls: Calls that reached the backend while the breaker was in
            *old* (since the transition before this one).
    """

    at: float
    old: str
    new: str
    backend_calls: int


@dataclass(frozen=True, slots=True)
class SecondStats:
    """
    One second of the timeline. Arrivals count in the second the caller
    arrived, backend calls in the second they started, outcomes in the second
    the caller got them.
    """

    second: int
    arrivals: int
    backend_calls: int
    succeeded: int
    fallback: int
    """Of the calls that failed or were rejected in this second, those the fallback answered."""
    failed: int
    rejected: int
    breaker_state: str | None
    """State at the end of the second (``None``: the policy has no breaker)."""


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Caller latency (arrival to outcome, every outcome), in seconds."""

    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    mean: float


@dataclass(frozen=True)
class SimulationResult:
    """
    What happened in a :func:`simulate` run. Two runs with the same arguments
    compare equal.
    """

    policy: str
    scenario: str
    duration: float
    rate: float
    seed: int
    attempted: int
    """Calls made by callers: ``succeeded + failed + rejected``."""
    succeeded: int
    """Calls whose caller got the backend's answer."""
    fallback: int
    """Of the failed and rejected calls, those the policy's fallback answered."""
    failed: int
    """Calls ended by an error that is not a rejection (timeouts included), whether the
    caller got the error or the fallback's answer."""
    timed_out: int
    """Of the failed calls, those that ended with ``AttemptTimeoutError``."""
    rejected_breaker: int
    """Calls refused by the circuit breaker (``CircuitOpenError``), whether the caller
    got the refusal or the fallback's answer; so are the other ``rejected_*`` counts."""
    rejected_bulkhead: int
    rejected_rate_limit: int
    rejected_other: int
    """Calls refused with another ``RejectedError``."""
    retried: int
    """Retries scheduled (``RetryScheduled`` events)."""
    backend_calls: int
    """Calls that reached the backend (every attempt that was let through)."""
    backend_failures: int
    """Of those, the ones where the backend failed."""
    backend_calls_by_state: dict[str, int]
    """Backend calls by breaker state at the moment they started."""
    transitions: tuple[Transition, ...]
    timeline: tuple[SecondStats, ...]
    latency: LatencySummary
    ended_at: float
    """Virtual time when the last call finished."""
    warnings: tuple[str, ...] = ()
    """What may make the run misleading, e.g. a ``retry_on`` that does not cover the
    simulated error (each is also issued as a ``UserWarning``)."""
    hedged: int = 0
    """Hedged attempts started (``HedgeStarted`` events; the ``hedge:`` section)."""

    @property
    def rejected(self) -> int:
        """Calls refused before reaching the backend, for any reason (fallback or not)."""
        return (
            self.rejected_breaker
            + self.rejected_bulkhead
            + self.rejected_rate_limit
            + self.rejected_other
        )

    @property
    def answered(self) -> int:
        """Calls whose caller got an answer: the backend's or the fallback's."""
        return self.succeeded + self.fallback

    @property
    def load_amplification(self) -> float:
        """Backend calls per caller call (1.0: no retries, no rejections)."""
        return self.backend_calls / self.attempted if self.attempted else 0.0

    @property
    def success_rate(self) -> float:
        """Share of calls whose caller got the backend's answer."""
        return self.succeeded / self.attempted if self.attempted else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready data (the ``--json`` output of the CLI)."""
        data = asdict(self)
        data["rejected"] = self.rejected
        data["answered"] = self.answered
        data["load_amplification"] = round(self.load_amplification, 6)
        data["success_rate"] = round(self.success_rate, 6)
        return data

    def summary(self) -> str:
        """A human-readable table of the counts, latencies and transitions."""
        n = self.attempted or 1
        lines = [
            f"policy {self.policy!r} vs scenario {self.scenario!r}: "
            f"{self.duration:g} s at {self.rate:g} calls/s, seed {self.seed}",
            "",
        ]
        lines += [f"  warning: {text}" for text in self.warnings]
        if self.warnings:
            lines.append("")
        rows = [
            ("attempted", self.attempted),
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("  of which timed out", self.timed_out),
            ("rejected by breaker", self.rejected_breaker),
            ("rejected by bulkhead", self.rejected_bulkhead),
            ("rejected by rate limit", self.rejected_rate_limit),
        ]
        if self.rejected_other:
            rows.append(("rejected (other)", self.rejected_other))
        for label, value in rows:
            lines.append(f"  {label:<24}{value:>9}  {100 * value / n:6.2f}%")
        if self.fallback:
            lines.append(
                f"  {'answered by fallback':<24}{self.fallback:>9}  "
                f"{100 * self.fallback / n:6.2f}%  (of the failed and rejected calls)"
            )
        if self.hedged:
            lines.append(f"  {'hedges started':<24}{self.hedged:>9}")
        lines += [
            f"  {'retries scheduled':<24}{self.retried:>9}",
            f"  {'backend calls':<24}{self.backend_calls:>9}  "
            f"(load amplification {self.load_amplification:.2f}x)",
            f"  {'backend failures':<24}{self.backend_failures:>9}",
            "",
            "  caller latency  "
            + "  ".join(
                f"{k} {_ms(getattr(self.latency, k))}" for k in ("p50", "p90", "p99", "p999", "max")
            ),
        ]
        if self.transitions:
            lines += ["", f"  breaker transitions ({len(self.transitions)}):"]
            shown = self.transitions if len(self.transitions) <= 12 else self.transitions[:12]
            for tr in shown:
                lines.append(
                    f"    {tr.at:9.3f} s  {tr.old:>9} -> {tr.new:<9}"
                    f" ({tr.backend_calls} backend calls while {tr.old})"
                )
            if len(shown) < len(self.transitions):
                lines.append(f"    ... {len(self.transitions) - len(shown)} more")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    rank = max(math.ceil(q * len(ordered)) - 1, 0)
    return ordered[min(rank, len(ordered) - 1)]


@contextlib.contextmanager
def _seeded_global_random(seed: int) -> Iterator[None]:
    # tenacity's waits and resilient's jitter draw from the module-level
    # generator; seed it for the run and give the program its state back.
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@contextlib.contextmanager
def _no_observer() -> Iterator[None]:
    # Call observers (metrics, passive health) must not count simulated calls.
    from resilient.runtime import runtime

    with runtime.observers_paused():
        yield


class _Run:
    """Mutable state of one simulation run."""

    def __init__(self, scenario: Scenario, rng: random.Random, seconds: int) -> None:
        self.scenario = scenario
        self.rng = rng
        size = seconds + 1
        self.arrivals = [0] * size
        self.backend = [0] * size
        self.outcomes = [[0] * size for _ in _OUTCOMES]
        self.totals = [0] * len(_OUTCOMES)
        self.fallbacks = [0] * size
        self.fallback_total = 0
        self.causes = _fallback_causes()
        self.timed_out = 0
        self.backend_failures = 0
        self.retried = 0
        self.hedged = 0
        self.latencies: list[float] = []
        self.state: str | None = None
        self.by_state: dict[str, int] = {}
        self.since_transition = 0
        self.transitions: list[Transition] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ended = 0.0

    def grow(self, second: int) -> None:
        missing = second + 1 - len(self.arrivals)
        if missing > 0:
            self.arrivals.extend([0] * missing)
            self.backend.extend([0] * missing)
            for counts in self.outcomes:
                counts.extend([0] * missing)
            self.fallbacks.extend([0] * missing)

    def on_event(self, event: object) -> None:
        if isinstance(event, RetryScheduled):
            self.retried += 1
        elif isinstance(event, HedgeStarted):
            self.hedged += 1
        elif isinstance(event, FallbackUsed):
            cause = _fallback_cause.get()
            if cause is not None:  # emitted inside one of the run's calls
                cause.append(event.error_type)
        elif isinstance(event, BreakerStateChanged):
            assert self.loop is not None
            self.transitions.append(
                Transition(
                    round(self.loop.time(), 9),
                    event.old_state,
                    event.new_state,
                    self.since_transition,
                )
            )
            self.since_transition = 0
            self.state = event.new_state

    async def backend_call(self) -> object:
        loop = self.loop
        assert loop is not None
        now = loop.time()
        second = int(now)
        if second >= len(self.backend):
            self.grow(second)
        self.backend[second] += 1
        state = self.state or "closed"
        self.by_state[state] = self.by_state.get(state, 0) + 1
        self.since_transition += 1
        conditions = self.scenario.conditions_at(now)
        rng = self.rng
        fails = conditions.error_rate > 0 and rng.random() < conditions.error_rate
        if fails and conditions.hang > 0 and rng.random() < conditions.hang:
            delay = conditions.hang_for
        else:
            delay = conditions.latency.sample(rng)
        await asyncio.sleep(delay)
        if fails:
            self.backend_failures += 1
            raise SimulatedError("simulated backend failure")
        return _OK

    async def caller(self, fn: Any, arrival: float) -> None:
        loop = self.loop
        assert loop is not None
        answered_by_fallback = False
        # Each caller runs in a task of its own (a context of its own): the
        # FallbackUsed event of its call lands in this list.
        cause: list[str] = []
        _fallback_cause.set(cause)
        try:
            value = await fn()
        except CircuitOpenError:
            outcome = _BREAKER
        except BulkheadFullError:
            outcome = _BULKHEAD
        except RateLimitedError:
            outcome = _RATE
        except RejectedError:
            outcome = _OTHER
        except AttemptTimeoutError:
            outcome = _TIMED_OUT
        except Exception:
            outcome = _FAILED
        else:
            if value is _OK:
                outcome = _SUCCEEDED
            else:
                answered_by_fallback = True
                # Why the fallback had to answer: the error it replaced.
                outcome = self.causes.get(cause[-1], _FAILED) if cause else _FAILED
        if outcome == _TIMED_OUT:
            self.timed_out += 1
            outcome = _FAILED
        now = loop.time()
        second = int(now)
        if second >= len(self.arrivals):
            self.grow(second)
        self.outcomes[outcome][second] += 1
        self.totals[outcome] += 1
        if answered_by_fallback:
            self.fallbacks[second] += 1
            self.fallback_total += 1
        self.latencies.append(now - arrival)


def _fallback_causes() -> dict[str, int]:
    """Outcome of a call that a fallback answered, by the name of the error it replaced."""
    causes: dict[str, int] = {}

    def add(cls: type[BaseException], outcome: int) -> None:
        causes.setdefault(cls.__name__, outcome)
        for sub in cls.__subclasses__():
            add(sub, outcome)

    # The specific classes first: setdefault keeps the first outcome given to a name.
    add(AttemptTimeoutError, _TIMED_OUT)
    add(CircuitOpenError, _BREAKER)
    add(BulkheadFullError, _BULKHEAD)
    add(RateLimitedError, _RATE)
    add(RejectedError, _OTHER)
    return causes


def _retry_warning(policy: Policy, name: str) -> str | None:
    """
    Why *policy* would never retry the simulated backend's failures, or ``None``
    when it would (or has no retry to speak of).
    """
    retry = policy.retry
    if retry is None or retry.max_attempts < 2:
        return None
    error = SimulatedError("simulated backend failure")
    covered = isinstance(error, retry.retry_on) and not isinstance(error, retry.give_up_on)
    if not covered and retry.retry_if_exception is not None:
        try:
            covered = bool(retry.retry_if_exception(error))
        except Exception:  # the user's predicate: assume it would retry
            covered = True
    if covered:
        return None
    listed = ", ".join(t.__name__ for t in retry.retry_on) or "nothing"
    why = (
        f"its give_up_on stops {SimulatedError.__name__}"
        if isinstance(error, retry.retry_on)
        else f"its retry_on ({listed}) does not cover it"
    )
    return (
        f"policy {name!r} never retries the simulated backend's failures "
        f"({SimulatedError.__name__}, a ConnectionError): {why}, so the run shows 0 "
        "retries; add ConnectionError to retry_on to simulate retries"
    )


def simulate(
    policy: Policy | str,
    scenario: Scenario,
    *,
    duration: float,
    rate: float = 200.0,
    seed: int = 0,
    name: str | None = None,
) -> SimulationResult:
    """
    Run *policy* against *scenario* for *duration* seconds of virtual time.

    Callers arrive at random (a Poisson process) at *rate* calls per second
    and each awaits one call of a function guarded by the **real**
    ``@resilient`` pipeline (async). Calls still in flight at *duration* are
    waited for. Nothing outside the run is touched: the policy registry,
    breakers, event subscribers and the global ``random`` state are isolated
    and restored.

    Args:
        policy: A :class:`~resilient.Policy`, or the name of a policy in the
            current registry (loaded or discovered as usual).
        scenario: How the backend behaves over time (see :func:`outage` & co).
        duration: Seconds of virtual time during which callers arrive.
        rate: Mean arrivals per second.
        seed: Everything random in the run derives from it.
        name: Policy name for the run (events, breaker); default: the name
            given, or ``"simulated"``.

    Returns:
        A :class:`SimulationResult`; equal arguments give equal results.
    """
    if not (duration > 0 and math.isfinite(duration)):
        msg = f"duration must be a positive number of seconds, got {duration!r}"
        raise ValueError(msg)
    if not (rate > 0 and math.isfinite(rate)):
        msg = f"rate must be a positive number of calls per second, got {rate!r}"
        raise ValueError(msg)
    if isinstance(policy, str):
        from resilient.policy import registry

        name = name or policy
        policy = registry.get(policy)
    elif not isinstance(policy, Policy):
        msg = f"policy must be a resilient.Policy or a policy name, not {policy!r}"
        raise TypeError(msg)
    name = name or "simulated"
    notes = tuple(n for n in (_retry_warning(policy, name),) if n is not None)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    run = _Run(scenario, random.Random(seed), math.ceil(duration))
    clock = VirtualClock()
    with (
        _seeded_global_random(seed),
        _no_observer(),
        isolated_registry({name: policy}),
        clock,
    ):
        from resilient.decorator import resilient

        bus.subscribe(run.on_event)

        @resilient(policy=name)
        async def guarded() -> object:
            return await run.backend_call()

        has_breaker = policy.circuit_breaker is not None
        if has_breaker:
            run.state = "closed"
        clock.run(_drive(run, guarded, duration, rate), poll_io=False)
    return _result(
        run,
        policy_name=name,
        duration=duration,
        rate=rate,
        seed=seed,
        breaker=has_breaker,
        notes=notes,
    )


async def _drive(run: _Run, fn: Any, duration: float, rate: float) -> None:
    loop = asyncio.get_running_loop()
    run.loop = loop
    rng = run.rng
    pending: set[asyncio.Task[None]] = set()
    start = loop.time()  # 0.0: the run's clock starts at zero
    t = rng.expovariate(rate)
    create_task = loop.create_task
    while t < duration:
        delay = start + t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        run.arrivals[int(t)] += 1
        task = create_task(run.caller(fn, loop.time()))
        pending.add(task)
        task.add_done_callback(pending.discard)
        t += rng.expovariate(rate)
    while pending:
        await asyncio.wait(list(pending))
    run.ended = loop.time() - start


def _result(
    run: _Run,
    *,
    policy_name: str,
    duration: float,
    rate: float,
    seed: int,
    breaker: bool,
    notes: tuple[str, ...],
) -> SimulationResult:
    latencies = sorted(run.latencies)
    latency = LatencySummary(
        p50=_percentile(latencies, 0.50),
        p90=_percentile(latencies, 0.90),
        p99=_percentile(latencies, 0.99),
        p999=_percentile(latencies, 0.999),
        max=latencies[-1] if latencies else 0.0,
        mean=math.fsum(latencies) / len(latencies) if latencies else 0.0,
    )
    # Breaker state at the end of each second, from the transitions.
    transitions = run.transitions
    timeline: list[SecondStats] = []
    state: str | None = "closed" if breaker else None
    k = 0
    o = run.outcomes
    for second in range(len(run.arrivals)):
        while k < len(transitions) and transitions[k].at < second + 1:
            state = transitions[k].new
            k += 1
        timeline.append(
            SecondStats(
                second=second,
                arrivals=run.arrivals[second],
                backend_calls=run.backend[second],
                succeeded=o[_SUCCEEDED][second],
                fallback=run.fallbacks[second],
                failed=o[_FAILED][second],
                rejected=o[_BREAKER][second]
                + o[_BULKHEAD][second]
                + o[_RATE][second]
                + o[_OTHER][second],
                breaker_state=state,
            )
        )
    totals = run.totals
    return SimulationResult(
        policy=policy_name,
        scenario=run.scenario.name,
        duration=duration,
        rate=rate,
        seed=seed,
        attempted=sum(run.arrivals),
        succeeded=totals[_SUCCEEDED],
        fallback=run.fallback_total,
        failed=totals[_FAILED],
        timed_out=run.timed_out,
        rejected_breaker=totals[_BREAKER],
        rejected_bulkhead=totals[_BULKHEAD],
        rejected_rate_limit=totals[_RATE],
        rejected_other=totals[_OTHER],
        retried=run.retried,
        backend_calls=sum(run.backend),
        backend_failures=run.backend_failures,
        backend_calls_by_state=dict(sorted(run.by_state.items())),
        transitions=tuple(transitions),
        timeline=tuple(timeline),
        latency=latency,
        ended_at=round(run.ended, 9),
        warnings=notes,
        hedged=run.hedged,
    )

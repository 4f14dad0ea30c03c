"""
The call pipeline: one compiled object per (function, policy).

Order, outermost first (docs/architecture.md)::

    fallback -> total timeout -> retry -> [one attempt: circuit breaker
      -> rate limiter -> bulkhead -> per-attempt timeout -> function]

One attempt is the business of :mod:`resilient.attempt` (the attempt engine);
this module is the loop around it: retries, the total budget, the fallback and
the call observer.

A strategy the policy does not enable is absent: its attribute is ``None`` and
the code path that would use it is skipped by one ``is None`` test. All the
work that does not depend on the call (building tenacity strategies, resolving
exception classes, choosing the path) happens here, once, when the pipeline is
built; the hot path reads plain slotted attributes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import tenacity

from resilient import _clock
from resilient import attempt as _attempt
from resilient._models import CircuitBreakerConfig, Policy, RetryStrategy
from resilient._shared import SharedByName
from resilient.breaker import CircuitBreaker
from resilient.budget import _BUDGETS, RetryBudget
from resilient.bulkhead import Bulkhead, bulkhead_manager, priority_level
from resilient.chaos import _inject as _chaos
from resilient.errors import (
    AttemptTimeoutError,
    BulkheadFullError,
    CircuitOpenError,
    RateLimitedError,
    RejectedError,
)
from resilient.events import (
    BreakerStateChanged,
    FallbackUsed,
    RetriesExhausted,
    RetryBudgetExhausted,
    RetryScheduled,
    bus,
)
from resilient.hedge import _HEDGERS, Hedger
from resilient.hedge import sync_error as _hedge_sync_error
from resilient.ratelimit import _LIMITERS, RateLimiter
from resilient.retry import FailureRate, RetryPlan
from resilient.runtime import runtime
from resilient.timeout import _QueueCache, deadline_queue

__all__ = ["CallObserver", "Pipeline", "breakers", "get_breaker", "set_observer_factory"]

_perf_counter = time.perf_counter
_task_of = _attempt.task_of
_running_loop = _attempt.running_loop
_log = logging.getLogger("resilient")
_admit_rest = _attempt.admit_rest
_call_sync = _attempt.call_sync
_WAIT = _attempt.WAIT
_NO_TICKET: list[Any] = []  # an attempt with no stage to admit (never read)


class CallObserver(Protocol):
    """
    Sees the end of every call of one pipeline (metrics use this).

    *outcome* is ``"success"``, ``"failure"``, ``"fallback"``, ``"rejected"``,
    ``"timeout"`` or ``"cancelled"``; *duration* is in seconds. An observer may
    also have a ``failed(error)`` method: it is then given the exception that
    ended each call that did not succeed.
    """

    def record(self, outcome: str, duration: float) -> None: ...


ObserverFactory = Callable[["Pipeline"], CallObserver | None]


def set_observer_factory(factory: ObserverFactory | None) -> None:
    """
    Install (or remove, with ``None``) the factory that gives each pipeline its
    observer. Pipelines are rebuilt at their next call.
    """
    runtime.set_observer_factory(factory)


def outcome_of(exc: BaseException) -> str:
    """The observer's outcome name for a call that ended with *exc*."""
    if isinstance(exc, RejectedError):
        return "rejected"
    if isinstance(exc, AttemptTimeoutError):
        return "timeout"
    if isinstance(exc, Exception):
        return "failure"
    return "cancelled"


def observe(
    observer: CallObserver, outcome: str, began: float, error: BaseException | None = None
) -> None:
    """
    Hand a call's end to *observer*, and the error that ended it to an observer
    with a ``failed(error)`` method; an observer that raises is logged, never
    propagated.
    """
    try:
        observer.record(outcome, _perf_counter() - began)
        if error is not None:
            failed = getattr(observer, "failed", None)
            if failed is not None:
                failed(error)
    except Exception:
        _log.exception("call observer %r raised; ignoring it", observer)


class _BusListener:
    """
    pybreaker-style listener that puts breaker transitions on the event bus.
    It has no success/failure methods, so the breaker calls nothing per call.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if bus.active:
            old = getattr(old_state, "name", old_state)
            new = getattr(new_state, "name", new_state)
            bus.emit(BreakerStateChanged(self.policy, str(old), str(new)))


# --------------------------------------------------------------------------- breakers


def _make_breaker(
    name: str, config: CircuitBreakerConfig, backend: Any, previous: CircuitBreaker | None
) -> CircuitBreaker:
    # The clock is read from the seam when the breaker is made, so a breaker
    # built under a virtual clock (resilient.testing) lives in virtual time.
    if config.type == "adaptive":
        from resilient import adaptive  # scikit-learn only when a model is trained or loaded

        return adaptive.make(
            name,
            config,
            clock=_clock.monotonic,
            listeners=[_BusListener(name)],
            backend=backend,
            previous=previous,  # a reload keeps what the breaker learned
        )
    return CircuitBreaker(
        name, config, clock=_clock.monotonic, listeners=[_BusListener(name)], backend=backend
    )


_BREAKERS: SharedByName[CircuitBreaker] = SharedByName(
    "circuit breaker", "circuit_breaker", _make_breaker, uses_backend=True
)
_reset_breakers = _BREAKERS.clear


def get_breaker(name: str) -> CircuitBreaker:
    """
    The circuit breaker shared by every call of policy *name* (or of the
    functions decorated with ``name=``).

    Raises:
        PolicyError: No breaker of that name, and no policy of that name with a
            ``circuit_breaker`` section.
    """
    return runtime.lookup(_BREAKERS, name)


def breakers() -> dict[str, CircuitBreaker]:
    """Every breaker created so far, by name."""
    return _BREAKERS.all()


# --------------------------------------------------------------------------- pipeline

LANE_DIRECT = 0
LANE_SINGLE = 1
LANE_FULL = 2
LANE_BREAKER = 3  # LANE_SINGLE with a circuit breaker and no other stage
LANE_DEADLINE = 4  # LANE_SINGLE with a per-attempt deadline and no other stage
LANE_FIRST = 5  # LANE_FULL whose first attempt the wrapper runs (see Pipeline.__init__)

#: What a caller that ran a call's first attempt itself hands to ``run_async`` /
#: ``run_sync``: when the call began (``perf_counter``, for the observer), when it
#: started (``_clock.monotonic()``, for the total budget; -1.0 without one), an
#: admitted ticket still waiting for admission (async), the function's own last
#: exception (``None``: the first attempt was refused or cancelled) and the total
#: budget's entry if the caller armed it (async). The *failed* that comes with it
#: may be a cancellation: the call then ends as the loop ends a cancelled one.
Resume = tuple[float, float, "list[Any] | None", "BaseException | None", Any]


def _sections_other_than(policy: Policy, known: set[str]) -> list[str]:
    """Names of the policy's strategy sections that are set, other than *known*."""
    return [
        field
        for field in type(policy).model_fields
        if field not in known and field != "description" and getattr(policy, field) is not None
    ]


class Pipeline:
    """
    A compiled policy for one callable.

    Args:
        policy: The validated policy.
        name: Policy name: names events and errors, and keys the shared breaker,
            bulkhead, rate limiter and retry budget.
        callable_name: Qualified name of the guarded function (for events).
        fallback: Callable taking the exception; overrides the policy's static
            fallback value.
        priority: Priority name of this callable's bulkhead waits (a
            ``resilient.priority`` block wins over it).
        claimant: Who asks for the shared objects of *name* (``policy 'db'``,
            ``service 'db'`` ...): a second claimant with another configuration
            for the same name is a :class:`~resilient.PolicyError`.

    Raises:
        PolicyError: Another claimant owns *name* with another configuration.
    """

    __slots__ = (
        "admit_step",
        "attempt_timeout",
        "breaker",
        "budget",
        "bulkhead",
        "callable_name",
        "chaos",
        "failure_rate",
        "fallback",
        "fallback_async",
        "fallback_on",
        "hedge",
        "lane",
        "limiter",
        "max_delay",
        "name",
        "observer",
        "per_attempt",
        "per_attempt_queues",
        "policy",
        "pooled",
        "priority",
        "retry",
        "retry_after",
        "settle_step",
        "slot_timed",
        "staged",
        "stages",
        "sync_lane",
        "total",
        "total_late",
        "total_queues",
    )

    def __init__(
        self,
        policy: Policy,
        *,
        name: str,
        callable_name: str = "<call>",
        fallback: Callable[[BaseException], Any] | None = None,
        priority: str | None = None,
        claimant: str | None = None,
    ) -> None:
        self.policy = policy
        self.name = name
        self.callable_name = callable_name
        owner = claimant if claimant is not None else f"policy {name!r}"
        # Breaker, rate limiter, bulkhead and retry budget are shared per policy
        # name (or name=) and kept across reloads while unchanged (resilient._shared).
        self.priority = priority_level(priority) if priority is not None else None
        bh = policy.bulkhead
        self.bulkhead: Bulkhead | None = (
            runtime.claim(bulkhead_manager.table, name, bh, owner) if bh is not None else None
        )
        self.slot_timed = self.bulkhead is not None and self.bulkhead.controller is not None
        self.pooled = self.bulkhead is not None and self.bulkhead.pooled
        rl = policy.rate_limit
        self.limiter: RateLimiter | None = (
            runtime.claim(_LIMITERS, name, rl, owner) if rl is not None else None
        )
        rc = policy.retry
        self.budget: RetryBudget | None = None
        self.retry_after: Callable[[Any], Any] | None = None
        self.max_delay = 0.0
        if rc is not None and rc.max_attempts > 1:
            if rc.budget is not None:
                self.budget = runtime.claim(_BUDGETS, name, rc.budget, owner)
            self.retry_after = rc.retry_after
            self.max_delay = rc.max_delay
        cb = policy.circuit_breaker
        self.breaker = runtime.claim(_BREAKERS, name, cb, owner) if cb is not None else None
        # hedging: None when off, so the loops below take their usual path
        hc = policy.hedge
        self.hedge: Hedger | None = None
        if hc is not None:
            self.hedge = runtime.claim(_HEDGERS, name, hc, owner)
            if self.budget is None and rc is not None and rc.budget is not None:
                self.budget = runtime.claim(_BUDGETS, name, rc.budget, owner)  # hedges draw on it
        self.per_attempt = policy.per_attempt_timeout
        self.total = policy.total_timeout
        self.per_attempt_queues: _QueueCache | None = (
            deadline_queue(self.per_attempt) if self.per_attempt is not None else None
        )
        self.total_queues: _QueueCache | None = (
            deadline_queue(self.total) if self.total is not None else None
        )
        # The total budget is armed late, at the first wait for admission or the
        # first retry, when the per-attempt budget is shorter: until then it
        # cannot fire first, and a call that succeeds at once (the common case)
        # never arms it. A hedged group runs beyond one attempt's deadline.
        self.total_late = (
            self.total is not None
            and self.per_attempt is not None
            and self.per_attempt < self.total
            and hc is None
            # the call's start is read with _clock and the deadline set on the
            # loop's clock: the same clock, unless a virtual one is installed
            and _clock.monotonic is time.monotonic
        )
        self.attempt_timeout: Callable[[], AttemptTimeoutError] = functools.partial(
            _attempt.timeout_error, self, "per_attempt"
        )
        # failure average of the adaptive retry strategy, for policies without a breaker
        self.failure_rate: FailureRate | None = None
        self.retry: RetryPlan | None = None
        if policy.retry is not None and policy.retry.max_attempts > 1:
            rate_source: Callable[[], float] | None = None
            if policy.retry.strategy is RetryStrategy.ADAPTIVE:
                breaker = self.breaker
                if breaker is not None:
                    rate_source = lambda: breaker.failure_rate  # noqa: E731
                else:
                    rate = self.failure_rate = FailureRate()
                    rate_source = lambda: rate.rate  # noqa: E731
            self.retry = RetryPlan(policy.retry, total=self.total, rate=rate_source)
        if fallback is not None:
            self.fallback: Callable[[BaseException], Any] | None = fallback
            self.fallback_on: tuple[type[BaseException], ...] = (
                policy.fallback.on if policy.fallback is not None else (Exception,)
            )
        elif policy.fallback is not None:
            value = policy.fallback.value
            self.fallback = lambda _exc: value
            self.fallback_on = policy.fallback.on
        else:
            self.fallback = None
            self.fallback_on = ()
        self.fallback_async = self.fallback is not None and _is_async_callable(self.fallback)
        # fault injection (resilient.chaos): None unless something asks for it and
        # the guards allow it; then the function is wrapped per call (full lane)
        self.chaos: _chaos.ChaosStage | None = _chaos.stage_for(self)
        self.observer: CallObserver | None = runtime.observer_for(self)
        # Fast lanes, chosen once here and read by the decorator's wrappers:
        # DIRECT calls the function with no wrapping at all and only enters the
        # pipeline after a first failure; SINGLE is one attempt of the engine
        # (resilient.attempt) with no loop around it; FULL is run_*().
        # Both fast lanes are white lists: a policy section they do not know
        # about (a later strategy) sends the call down the FULL path.
        known = {"retry", "fallback", "circuit_breaker", "timeout", "bulkhead", "rate_limit"}
        known.add("chaos")  # a chaos: section is inert unless self.chaos (checked below)
        others = _sections_other_than(policy, known)
        plain = self.observer is None and self.total is None and not others and self.chaos is None
        # Whether an attempt has any stage at all: a retry-and-timeouts policy
        # runs its attempts without admitting or settling anything.
        self.staged = (
            self.breaker is not None
            or self.limiter is not None
            or self.bulkhead is not None
            or self.per_attempt is not None
        )
        if (
            plain
            and self.breaker is None
            and self.per_attempt is None
            and self.limiter is None
            and self.bulkhead is None
            and self.failure_rate is None
            and self.budget is None
            and (self.retry is None or not self.retry.checks_result)
        ):
            self.lane = LANE_DIRECT
        elif plain and self.retry is None and self.fallback is None and not self.pooled:
            admits = self.limiter is not None or self.bulkhead is not None
            if not admits and self.per_attempt is None:
                self.lane = LANE_BREAKER
            elif not admits and self.breaker is None:
                self.lane = LANE_DEADLINE  # (sync wrappers: nothing to do but call)
            else:
                self.lane = LANE_SINGLE
        elif (
            # FIRST: the wrapper runs the first attempt as the SINGLE lane does
            # (an async one hedged, if the policy hedges), plus the call's
            # observer, budget deposit and total budget, and hands the call to
            # run_*() (resume=) at the first failure, cancellation, refusal or
            # wait: a call that succeeds at once (the common case) costs no loop
            # and no second coroutine. Only where the first attempt needs
            # nothing else of the loop: no chaos, failure-rate record, result
            # check, pool, or section the lane does not know (health is an
            # observer, http is the transports'). A sync wrapper of a hedging
            # policy takes the full lane (run_sync refuses it).
            self.staged
            and not _sections_other_than(policy, {*known, "health", "http", "hedge"})
            and self.chaos is None
            and self.failure_rate is None
            and (self.retry is None or not self.retry.checks_result)
            and not self.pooled
        ):
            self.lane = LANE_FIRST
        else:
            self.lane = LANE_FULL
        # the sync wrappers' lane: a hedging policy's sync calls need a thread pool,
        # which run_sync asks for (the first-attempt lane would not hedge them)
        self.sync_lane = LANE_FULL if self.hedge is not None else self.lane
        # what the attempt engine reads per attempt, in one tuple (one read)
        self.stages = (
            self.breaker,
            self.limiter,
            self.bulkhead,
            self.per_attempt_queues,
            self.slot_timed,
        )
        self.admit_step, self.settle_step = _attempt.compile_steps(self)
        if self.chaos is not None:
            # decided here, not per call: only a pipeline with faults to inject
            # runs the wrapping run_* of _ChaosPipeline (same slots, no cost otherwise)
            self.__class__ = _ChaosPipeline

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} of {self.callable_name}>"

    # ------------------------------------------------------------ shared logic

    def _give_up(self, exc: BaseException, attempt: int, reason: str) -> None:
        if attempt > 1:
            _note_once(
                exc, f"resilient: policy {self.name!r} gave up after {attempt} attempts ({reason})"
            )
        if bus.active:
            bus.emit(
                RetriesExhausted(self.name, self.callable_name, attempt, type(exc).__name__, reason)
            )

    def _decide(
        self,
        state: tenacity.RetryCallState | None,
        started: float,
        attempt: int,
        exc: BaseException | None,
        result: Any,
    ) -> tuple[float, tenacity.RetryCallState | None]:
        """After an attempt: ``(delay before the next one or -1 to stop, retry state)``.
        The retry state is made at the first failure only (none on the success path)."""
        plan = self.retry
        if plan is None:
            return -1.0, state
        if state is None:
            state = plan.new_state(started if started >= 0 else _clock.monotonic())
        return self._next_delay(state, attempt, exc, result), state

    def _next_delay(
        self, state: tenacity.RetryCallState, attempt: int, exc: BaseException | None, result: Any
    ) -> float:
        """Delay before the next attempt, or -1 to give up (the caller then raises)."""
        plan = self.retry
        assert plan is not None
        delay, reason = plan.decide(state, attempt, exc, result)
        if delay < 0 and reason == "not_retryable" and isinstance(exc, RejectedError):
            return -1.0  # refused, not retried: CallRejected was the event
        if delay >= 0 and (self.retry_after is not None or isinstance(exc, RejectedError)):
            delay, reason = self._server_delay(plan, state, delay, exc, result)
        if (
            delay >= 0
            and self.breaker is not None
            and not isinstance(exc, RejectedError)
            and self.breaker.open_for() > delay
        ):
            # Respect the breaker: it is open and stays open past this delay,
            # so the next attempt would only be refused.
            delay, reason = -1.0, "circuit_open"
        if delay >= 0 and self.budget is not None and not self.budget.try_withdraw():
            delay, reason = -1.0, "budget"
            if bus.active:
                error = type(exc).__name__ if exc is not None else "result"
                bus.emit(RetryBudgetExhausted(self.name, self.callable_name, attempt, error))
        if delay < 0:
            if exc is not None:
                self._give_up(exc, attempt, reason)
            return -1.0
        if bus.active:
            error = type(exc).__name__ if exc is not None else "result"
            bus.emit(RetryScheduled(self.name, self.callable_name, attempt, delay, error))
        return delay

    def _server_delay(
        self,
        plan: RetryPlan,
        state: tenacity.RetryCallState,
        delay: float,
        exc: BaseException | None,
        result: Any,
    ) -> tuple[float, str]:
        """Honour a Retry-After: the hook's answer, else a rejection's ``retry_after``."""
        hint: float | None = None
        if self.retry_after is not None:
            try:
                hint = _seconds(self.retry_after(exc if exc is not None else result))
            except Exception:
                _log.exception("retry_after hook of policy %r raised; ignoring it", self.name)
        if hint is None and isinstance(exc, RejectedError):
            hint = exc.retry_after
        if hint is None:
            return delay, ""
        wait = min(max(hint, 0.0), self.max_delay)
        state.idle_for += wait - delay
        state.upcoming_sleep = wait
        if plan.stop(state):  # the server's delay outlives the total budget
            return -1.0, "total_timeout"
        return wait, ""

    def _refused_after(
        self, refusal: BaseException, last: BaseException, attempt: int
    ) -> BaseException:
        """
        An attempt after the first was refused (breaker open, bulkhead full, rate
        limited) and will not be retried: the caller gets its function's own last
        exception, with a note, rather than the library's refusal.
        """
        if not isinstance(refusal, RejectedError):
            return refusal
        reason = {
            CircuitOpenError: "circuit_open",
            BulkheadFullError: "bulkhead_full",
            RateLimitedError: "rate_limited",
        }.get(type(refusal), "rejected")
        self._give_up(last, attempt - 1, reason)
        return last

    def _fallback_used(self, exc: BaseException) -> None:
        if bus.active:
            bus.emit(FallbackUsed(self.name, self.callable_name, type(exc).__name__))

    # ------------------------------------------------------------------ async

    async def run_async(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failed: BaseException | None = None,
        resume: Resume | None = None,
    ) -> Any:
        """
        Run *fn* through the whole pipeline. *failed* is the exception of a
        first attempt the caller already made (the direct and first lanes,
        which pass *resume* too: see :data:`Resume`).
        """
        # One coroutine for the whole pipeline: every extra layer of coroutine
        # would cost more than all the checks below together. Each attempt goes
        # through the attempt engine (resilient.attempt).
        observer = self.observer
        rate = self.failure_rate
        retry = self.retry
        staged = self.staged
        hedge = self.hedge
        admit, settle = self.admit_step, self.settle_step
        ticket: list[Any] = _NO_TICKET
        if resume is None:
            began = _perf_counter() if observer is not None else 0.0
            if self.budget is not None:
                self.budget.deposit()
            pending, last, total_entry = None, failed, None
        else:
            began, _, pending, last, total_entry = resume
        started = -1.0
        late = False  # the total budget is still to arm (self.total_late)
        # asyncio.current_task() costs more than a whole stage: read it once per call
        task = _task_of(_running_loop()) if self.per_attempt_queues is not None else None
        if self.total_queues is not None:
            if task is None:
                task = _task_of(_running_loop())
            if task is not None:
                if resume is None:
                    started = _clock.monotonic()
                    if self.total_late:
                        late = True
                    else:
                        total_entry = self.total_queues.arm(task)
                else:  # the caller armed the total budget, unless it is late
                    started = resume[1]
                    late = self.total_late and total_entry is None
        attempt = 1
        state: tenacity.RetryCallState | None = None
        # `last`: the function's own last exception
        try:
            if resume is not None and failed is not None and not isinstance(failed, Exception):
                raise failed  # the first attempt was cancelled: end the call below
            while True:
                if failed is None and staged:
                    try:
                        if pending is None:
                            ticket = admit(False, True, True, task)
                        else:  # admitted by the caller, waiting for the rest
                            ticket, pending = pending, None
                        if ticket[_WAIT]:
                            if late:  # waiting counts against the total budget
                                late = False
                                total_entry = _attempt.arm_late(self, task, started)
                            await _admit_rest(self, ticket)
                    except RejectedError as refusal:  # nothing is held
                        failed = refusal
                if failed is None:
                    try:
                        if hedge is None:
                            result = await fn(*args, **kwargs)
                        else:  # a hedged group in place of the attempt (resilient.hedge)
                            result = await hedge.run_async(
                                self, fn, args, kwargs, ticket, total_entry, task
                            )
                    except BaseException as exc:
                        error = settle(ticket, exc, total_entry) if staged else exc
                        if not isinstance(error, Exception):
                            raise  # the caller is cancelled: nothing to retry
                        if rate is not None:
                            rate.record(True)
                        if error is not exc:  # the per-attempt deadline fired
                            error.__cause__ = None
                            error.__suppress_context__ = True
                        failed = last = error
                    else:
                        if staged:
                            settle(ticket, None)
                        if rate is not None:
                            rate.record(False)
                        if retry is None or not retry.checks_result:
                            break
                        delay, state = self._decide(state, started, attempt, None, result)
                        if delay < 0:
                            break
                        if late:  # a retry: the total budget from here on
                            late = False
                            total_entry = _attempt.arm_late(self, task, started)
                        if delay > 0:
                            await _clock.asleep(delay)
                        attempt += 1
                        continue
                # the attempt failed with `failed`
                delay, state = self._decide(state, started, attempt, failed, None)
                if late and delay >= 0:  # a retry: the total budget from here on
                    late = False
                    total_entry = _attempt.arm_late(self, task, started)
                if delay < 0:
                    if last is not None and failed is not last:
                        failed = self._refused_after(failed, last, attempt)
                    try:
                        raise failed
                    finally:
                        # no frame -> exception -> traceback -> frame cycle
                        failed = last = None
                failed = None
                if delay > 0:
                    await _clock.asleep(delay)
                attempt += 1
        except BaseException as exc:
            error = exc
            if total_entry is not None and _attempt.settle_total(total_entry, exc):
                error = _attempt.timeout_error(self, "total")
            if self.fallback is not None and isinstance(error, self.fallback_on):
                self._fallback_used(error)
                if observer is not None:
                    observe(observer, "fallback", began)
                value = self.fallback(error)
                if self.fallback_async or inspect.isawaitable(value):
                    return await value
                return value
            if observer is not None:
                observe(observer, outcome_of(error), began, error)
            if error is exc:
                raise
            raise error from None
        if total_entry is not None:
            _attempt.settle_total(total_entry, None)
        if observer is not None:  # observe() inlined: the success path is the common one
            try:
                observer.record("success", _perf_counter() - began)
            except Exception:
                _log.exception("call observer %r raised; ignoring it", observer)
        return result

    # ------------------------------------------------------------------- sync

    def run_sync(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failed: BaseException | None = None,
        resume: Resume | None = None,
    ) -> Any:
        """Run *fn* in the caller's thread through the whole pipeline (see run_async)."""
        observer = self.observer
        rate = self.failure_rate
        retry = self.retry
        staged = self.staged
        admit, settle = self.admit_step, self.settle_step
        pooled = self.pooled
        hedge = self.hedge
        if hedge is not None and not pooled:
            raise _hedge_sync_error(self)
        ticket: list[Any] = _NO_TICKET
        if resume is None:
            began = _perf_counter() if observer is not None else 0.0
            if self.budget is not None:
                self.budget.deposit()
            # Sync code cannot be interrupted: the total budget is checked between
            # attempts (no sleep or new attempt starts after it), see docs/timeouts.md.
            started = _clock.monotonic() if self.total is not None else -1.0
            last = failed  # the function's own last exception
        else:
            began, started, _, last, _ = resume
        attempt = 1
        state: tenacity.RetryCallState | None = None
        try:
            if resume is not None and failed is not None and not isinstance(failed, Exception):
                raise failed  # the first attempt was interrupted: end the call below
            while True:
                if failed is None and staged:
                    try:
                        ticket = admit(True)
                    except RejectedError as refusal:  # nothing is held
                        failed = refusal
                if failed is None:
                    try:
                        if hedge is not None:  # a hedged group, in the thread pool
                            result = hedge.run_sync(self, fn, args, kwargs, ticket)
                        elif pooled:
                            result = _call_sync(self, fn, args, kwargs)
                        else:
                            result = fn(*args, **kwargs)
                    except Exception as exc:
                        if staged:
                            settle(ticket, exc)
                        if rate is not None:
                            rate.record(True)
                        failed = last = exc
                    except BaseException as exc:
                        if staged:
                            settle(ticket, exc)
                        raise
                    else:
                        if staged:
                            settle(ticket, None)
                        if rate is not None:
                            rate.record(False)
                        if retry is None or not retry.checks_result:
                            break
                        delay, state = self._decide(state, started, attempt, None, result)
                        if delay < 0:
                            break
                        if delay > 0:
                            _clock.sleep(delay)
                        attempt += 1
                        continue
                delay, state = self._decide(state, started, attempt, failed, None)
                if delay < 0:
                    if last is not None and failed is not last:
                        failed = self._refused_after(failed, last, attempt)
                    try:
                        raise failed
                    finally:
                        failed = last = None
                failed = None
                if delay > 0:
                    _clock.sleep(delay)
                attempt += 1
        except BaseException as exc:
            if self.fallback is not None and isinstance(exc, self.fallback_on):
                self._fallback_used(exc)
                if observer is not None:
                    observe(observer, "fallback", began)
                value = self.fallback(exc)
                if inspect.iscoroutine(value):
                    value.close()
                    msg = (
                        f"the fallback of {self.callable_name} returned a coroutine, but the "
                        "function is synchronous: give it a synchronous fallback"
                    )
                    raise TypeError(msg) from exc
                return value
            if observer is not None:
                observe(observer, outcome_of(exc), began, exc)
            raise
        if observer is not None:  # observe() inlined: the success path is the common one
            try:
                observer.record("success", _perf_counter() - began)
            except Exception:
                _log.exception("call observer %r raised; ignoring it", observer)
        return result


class _ChaosPipeline(Pipeline):
    """
    A pipeline with a chaos stage (resilient.chaos): the function is wrapped once per
    call, so faults are injected innermost, inside every attempt of the loop.
    """

    __slots__ = ()

    async def run_async(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failed: BaseException | None = None,
        resume: Resume | None = None,
    ) -> Any:
        chaos = self.chaos
        assert chaos is not None
        return await Pipeline.run_async(self, chaos.wrap_async(fn), args, kwargs, failed, resume)

    def run_sync(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failed: BaseException | None = None,
        resume: Resume | None = None,
    ) -> Any:
        chaos = self.chaos
        assert chaos is not None
        return Pipeline.run_sync(self, chaos.wrap_sync(fn), args, kwargs, failed, resume)


def _note_once(exc: BaseException, note: str) -> None:
    """Add *note* unless the exception already carries a note of ours (a shared instance
    re-raised by many calls must not grow a note per call)."""
    notes = getattr(exc, "__notes__", None)
    if notes and any(n.startswith("resilient: ") for n in notes):
        return
    exc.add_note(note)


def _seconds(hint: Any) -> float | None:
    """A Retry-After hint as seconds: a number, a numeric string or an HTTP-date;
    ``None`` for anything else (NaN and negative values mean "no hint")."""
    if hint is None or isinstance(hint, bool):
        return None
    if isinstance(hint, int | float):
        try:
            value = float(hint)
        except OverflowError:  # an int too large for a float: no usable hint
            return None
    elif isinstance(hint, str):
        text = hint.strip()
        try:
            value = float(text)
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                when = parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:
                return None
            import datetime as _dt

            value = (when - _dt.datetime.now(_dt.UTC)).total_seconds()
            value = max(value, 0.0)
    else:
        return None
    if value != value or value < 0:  # NaN, negative
        return None
    return value


def _is_async_callable(obj: Any) -> bool:
    """Coroutine functions, partials of them, and objects with an async ``__call__``."""
    while hasattr(obj, "func") and hasattr(obj, "args"):  # functools.partial
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - we want the method itself
    )

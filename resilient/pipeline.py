"""
The call pipeline: one compiled object per (function, policy).

Order, outermost first (DESIGN §3)::

    fallback -> total timeout -> retry -> circuit breaker -> rate limiter
      -> bulkhead -> per-attempt timeout -> function

A strategy the policy does not enable is absent: its attribute is ``None`` and
the code path that would use it is skipped by one ``is None`` test. All the
work that does not depend on the call (building tenacity strategies, resolving
exception classes, choosing the path) happens here, once, when the pipeline is
built; the hot path reads plain slotted attributes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import tenacity

from resilient import _clock
from resilient._models import CircuitBreakerConfig, Policy, RetryStrategy
from resilient._shared import SharedByName
from resilient.breaker import CircuitBreaker
from resilient.budget import RetryBudget, _budget_for
from resilient.bulkhead import Bulkhead, bulkhead_manager, priority_level
from resilient.errors import (
    AttemptTimeoutError,
    BulkheadFullError,
    CircuitOpenError,
    RateLimitedError,
    RejectedError,
)
from resilient.events import (
    BreakerStateChanged,
    CallRejected,
    FallbackUsed,
    RetriesExhausted,
    RetryBudgetExhausted,
    RetryScheduled,
    bus,
)
from resilient.policy import registry
from resilient.ratelimit import RateLimiter, _limiter_for, _LoopLimiter
from resilient.retry import FailureRate, RetryPlan
from resilient.timeout import DONE as _DONE
from resilient.timeout import FIRED as _FIRED
from resilient.timeout import _QueueCache, deadline_queue
from resilient.timeout import settle as _settle

__all__ = ["CallObserver", "Pipeline", "breakers", "get_breaker", "set_observer_factory"]

_current_task = asyncio.current_task
_perf_counter = time.perf_counter
_log = logging.getLogger("resilient")


class CallObserver(Protocol):
    """
    Sees the end of every call of one pipeline (metrics use this).

    *outcome* is ``"success"``, ``"failure"``, ``"fallback"``, ``"rejected"``,
    ``"timeout"`` or ``"cancelled"``; *duration* is in seconds.
    """

    def record(self, outcome: str, duration: float) -> None: ...


ObserverFactory = Callable[["Pipeline"], CallObserver | None]
_observer_factory: ObserverFactory | None = None


def set_observer_factory(factory: ObserverFactory | None) -> None:
    """
    Install (or remove, with ``None``) the factory that gives each pipeline its
    observer. Pipelines are rebuilt at their next call.
    """
    global _observer_factory
    _observer_factory = factory
    registry.touch()


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, RejectedError):
        return "rejected"
    if isinstance(exc, AttemptTimeoutError):
        return "timeout"
    if isinstance(exc, Exception):
        return "failure"
    return "cancelled"


def _observe(observer: CallObserver, outcome: str, began: float) -> None:
    try:
        observer.record(outcome, _perf_counter() - began)
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


def _make_breaker(name: str, config: CircuitBreakerConfig, backend: Any) -> CircuitBreaker:
    # The clock is read from the seam when the breaker is made, so a breaker
    # built under a virtual clock (resilient.testing) lives in virtual time.
    return CircuitBreaker(
        name, config, clock=_clock.monotonic, listeners=[_BusListener(name)], backend=backend
    )


_BREAKERS: SharedByName[CircuitBreaker] = SharedByName(
    "circuit_breaker", _make_breaker, uses_backend=True
)
_breaker_for = _BREAKERS.get_or_make
_reset_breakers = _BREAKERS.clear


def get_breaker(name: str) -> CircuitBreaker:
    """
    The circuit breaker shared by every call of policy *name* (or of the
    functions decorated with ``name=``).

    Raises:
        PolicyError: No breaker of that name, and no policy of that name with a
            ``circuit_breaker`` section.
    """
    return _BREAKERS.lookup(name)


def breakers() -> dict[str, CircuitBreaker]:
    """Every breaker created so far, by name."""
    return _BREAKERS.all()


# --------------------------------------------------------------------------- pipeline

LANE_DIRECT = 0
LANE_SINGLE = 1
LANE_FULL = 2


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
        name: Policy name: names events and errors, and keys the shared breaker.
        callable_name: Qualified name of the guarded function (for events).
        fallback: Callable taking the exception; overrides the policy's static
            fallback value.
        priority: Priority name of this callable's bulkhead waits (a
            ``resilient.priority`` block wins over it).
    """

    __slots__ = (
        "breaker",
        "budget",
        "bulkhead",
        "callable_name",
        "factory",
        "fallback",
        "fallback_async",
        "fallback_on",
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
        "rate",
        "retry",
        "retry_after",
        "slot_timed",
        "total",
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
    ) -> None:
        self.policy = policy
        self.name = name
        self.callable_name = callable_name
        # Rate limiter, bulkhead and retry budget are shared per policy name (or
        # name=), like the breaker, and kept across reloads while unchanged.
        self.priority = priority_level(priority) if priority is not None else None
        bh = policy.bulkhead
        self.bulkhead: Bulkhead | None = (
            bulkhead_manager.bulkhead_for(name, bh) if bh is not None else None
        )
        self.slot_timed = self.bulkhead is not None and self.bulkhead.controller is not None
        self.pooled = self.bulkhead is not None and self.bulkhead.pooled
        rl = policy.rate_limit
        self.limiter: RateLimiter | None = _limiter_for(name, rl) if rl is not None else None
        rc = policy.retry
        self.budget: RetryBudget | None = None
        self.retry_after: Callable[[Any], float | None] | None = None
        self.max_delay = 0.0
        if rc is not None and rc.max_attempts > 1:
            if rc.budget is not None:
                self.budget = _budget_for(name, rc.budget)
            self.retry_after = rc.retry_after
            self.max_delay = rc.max_delay
        cb = policy.circuit_breaker
        self.breaker = _breaker_for(name, cb) if cb is not None else None
        self.per_attempt = policy.per_attempt_timeout
        self.total = policy.total_timeout
        self.per_attempt_queues: _QueueCache | None = (
            deadline_queue(self.per_attempt) if self.per_attempt is not None else None
        )
        self.total_queues: _QueueCache | None = (
            deadline_queue(self.total) if self.total is not None else None
        )
        self.rate: FailureRate | None = None
        self.retry: RetryPlan | None = None
        if policy.retry is not None and policy.retry.max_attempts > 1:
            rate_source: Callable[[], float] | None = None
            if policy.retry.strategy is RetryStrategy.ADAPTIVE:
                breaker = self.breaker
                if breaker is not None:
                    rate_source = lambda: breaker.failure_rate  # noqa: E731
                else:
                    rate = self.rate = FailureRate()
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
        # The factory is remembered so that a handle rebuilding after
        # set_observer_factory() makes a new pipeline instead of reusing this one.
        self.factory = factory = _observer_factory
        self.observer: CallObserver | None = factory(self) if factory is not None else None
        # Fast lanes, chosen once here and read by the decorator's wrappers:
        # DIRECT calls the function with no wrapping at all and only enters the
        # pipeline after a first failure; SINGLE is one guarded attempt (breaker
        # and/or per-attempt timeout) inlined in the wrapper; FULL is run_*().
        # Both fast lanes are white lists: a policy section they do not know
        # about (a later strategy) sends the call down the FULL path.
        known = {"retry", "fallback", "circuit_breaker", "timeout", "bulkhead", "rate_limit"}
        others = _sections_other_than(policy, known)
        plain = self.observer is None and self.total is None and not others
        if (
            plain
            and self.breaker is None
            and self.per_attempt is None
            and self.limiter is None
            and self.bulkhead is None
            and self.rate is None
            and self.budget is None
            and (self.retry is None or not self.retry.checks_result)
        ):
            self.lane = LANE_DIRECT
        elif plain and self.retry is None and self.fallback is None and not self.pooled:
            self.lane = LANE_SINGLE
        else:
            self.lane = LANE_FULL

    # ------------------------------------------------------------ shared logic

    def _give_up(self, exc: BaseException, attempt: int, reason: str) -> None:
        if attempt > 1:
            exc.add_note(
                f"resilient: policy {self.name!r} gave up after {attempt} attempts ({reason})"
            )
        if bus.active:
            bus.emit(
                RetriesExhausted(self.name, self.callable_name, attempt, type(exc).__name__, reason)
            )

    def _next_delay(
        self, state: tenacity.RetryCallState, attempt: int, exc: BaseException | None, result: Any
    ) -> float:
        """Delay before the next attempt, or -1 to give up (the caller then raises)."""
        plan = self.retry
        assert plan is not None
        delay, reason = plan.decide(state, attempt, exc, result)
        if delay >= 0 and (self.retry_after is not None or isinstance(exc, RejectedError)):
            delay, reason = self._server_delay(plan, state, delay, exc, result)
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

    def _acquire_reporting(self, breaker: CircuitBreaker) -> int:
        """``breaker.acquire()``, putting a rejection on the event bus."""
        try:
            return breaker.acquire()
        except CircuitOpenError as rejected:
            self._rejected(rejected)
            raise

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
                hint = self.retry_after(exc if exc is not None else result)
            except Exception:
                _log.exception("retry_after hook of policy %r raised; ignoring it", self.name)
        if hint is None and isinstance(exc, RejectedError):
            hint = exc.retry_after
        if hint is None:
            return delay, ""
        wait = min(max(float(hint), 0.0), self.max_delay)
        state.idle_for += wait - delay
        state.upcoming_sleep = wait
        if plan.stop(state):  # the server's delay outlives the total budget
            return -1.0, "total_timeout"
        return wait, ""

    def _refused(self, exc: RejectedError, reason: str) -> None:
        if bus.active:
            bus.emit(CallRejected(self.name, self.callable_name, reason, exc.retry_after))

    async def _rate_wait_async(self, limiter: RateLimiter, loop_limiter: _LoopLimiter) -> None:
        try:
            await limiter.wait_async(loop_limiter)
        except RateLimitedError as exc:
            self._refused(exc, "rate_limited")
            raise

    def _rate_acquire_sync(self, limiter: RateLimiter) -> None:
        try:
            limiter.acquire_sync()
        except RateLimitedError as exc:
            self._refused(exc, "rate_limited")
            raise

    async def _bulkhead_wait_async(self, bulkhead: Bulkhead) -> None:
        try:
            await bulkhead.acquire_async(self.priority)
        except BulkheadFullError as exc:
            self._refused(exc, "bulkhead_full")
            raise

    def _bulkhead_wait_sync(self, bulkhead: Bulkhead) -> None:
        try:
            bulkhead.acquire_sync(self.priority)
        except BulkheadFullError as exc:
            self._refused(exc, "bulkhead_full")
            raise

    def _release_slot(self, began: float) -> None:
        bulkhead = self.bulkhead
        assert bulkhead is not None
        if self.slot_timed:
            bulkhead.release_timed(_clock.monotonic() - began)
        else:
            bulkhead.release()

    def _attempt_timeout(self) -> AttemptTimeoutError:
        return self._timeout("per_attempt")

    def _rejected(self, exc: CircuitOpenError) -> None:
        if bus.active:
            bus.emit(CallRejected(self.name, self.callable_name, "circuit_open", exc.retry_after))

    def _fallback_used(self, exc: BaseException) -> None:
        if bus.active:
            bus.emit(FallbackUsed(self.name, self.callable_name, type(exc).__name__))

    def _timeout(self, kind: str) -> AttemptTimeoutError:
        budget = self.per_attempt if kind == "per_attempt" else self.total
        assert budget is not None
        what = "attempt" if kind == "per_attempt" else "call"
        return AttemptTimeoutError(
            f"policy {self.name!r}: {what} of {self.callable_name} took longer than {budget}s",
            policy=self.name,
            timeout=budget,
            kind=kind,
        )

    # ------------------------------------------------------------------ async

    async def run_async(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failed: BaseException | None = None,
    ) -> Any:
        """
        Run *fn* through the whole pipeline. *failed* is the exception of a
        first attempt the caller already made (the direct lane).
        """
        # One coroutine for the whole pipeline: every extra layer of coroutine
        # would cost more than all the checks below together.
        observer = self.observer
        began = _perf_counter() if observer is not None else 0.0
        breaker = self.breaker
        queues = self.per_attempt_queues
        rate = self.rate
        retry = self.retry
        limiter = self.limiter
        bulkhead = self.bulkhead
        slot_timed = self.slot_timed
        if self.budget is not None:
            self.budget.deposit()
        total_entry = None
        started = -1.0
        if self.total_queues is not None:
            task = _current_task()
            if task is not None:
                started = _clock.monotonic()
                total_entry = self.total_queues.arm(task)
        attempt = 1
        state: tenacity.RetryCallState | None = None
        try:
            while True:
                if failed is None:
                    token: int | None = None
                    measured = -1.0
                    held = admitted = False
                    try:
                        if breaker is not None:
                            try:
                                token = breaker.acquire()
                            except CircuitOpenError as rejected:
                                self._rejected(rejected)
                                raise
                            if breaker.needs_duration:
                                measured = _clock.monotonic()
                        if limiter is not None:
                            loop_limiter = limiter.for_loop()
                            if not loop_limiter.try_take():
                                await self._rate_wait_async(limiter, loop_limiter)
                        if bulkhead is not None:
                            if not bulkhead.try_acquire():
                                await self._bulkhead_wait_async(bulkhead)
                            held = True
                            slot_began = _clock.monotonic() if slot_timed else 0.0
                        admitted = True
                        if queues is not None:
                            task = _current_task()
                            assert task is not None
                            entry = queues.arm(task)
                            try:
                                result = await fn(*args, **kwargs)
                            except BaseException as exc:
                                if _settle(entry, exc):
                                    raise self._timeout("per_attempt") from None
                                raise
                            entry[_DONE] = True
                            if entry[_FIRED]:
                                _settle(entry, None)
                        else:
                            result = await fn(*args, **kwargs)
                    except Exception as exc:
                        if held:
                            self._release_slot(slot_began)
                        if token is not None:
                            assert breaker is not None
                            if admitted:
                                breaker.on_failure(token, exc, _since(measured))
                            else:  # refused by the rate limiter or the bulkhead
                                breaker.on_cancel(token)
                        if rate is not None:
                            rate.record(True)
                        failed = exc
                    except BaseException:
                        if held:
                            self._release_slot(slot_began)
                        if token is not None:
                            assert breaker is not None
                            breaker.on_cancel(token)
                        raise
                    else:
                        if held:
                            assert bulkhead is not None
                            if slot_timed:
                                bulkhead.release_timed(_clock.monotonic() - slot_began)
                            else:
                                bulkhead.release()
                        if token is not None:
                            assert breaker is not None
                            breaker.on_success(
                                token, (_clock.monotonic() - measured) if measured >= 0 else 0.0
                            )
                        if rate is not None:
                            rate.record(False)
                        if retry is None or not retry.checks_result:
                            break
                        if state is None:
                            state = retry.new_state(started if started >= 0 else _clock.monotonic())
                        delay = self._next_delay(state, attempt, None, result)
                        if delay < 0:
                            break
                        if delay > 0:
                            await _clock.asleep(delay)
                        attempt += 1
                        continue
                # the attempt failed with `failed`
                if retry is not None:
                    if state is None:
                        state = retry.new_state(started if started >= 0 else _clock.monotonic())
                    delay = self._next_delay(state, attempt, failed, None)
                else:
                    delay = -1.0
                if delay < 0:
                    try:
                        raise failed
                    finally:
                        # no frame -> exception -> traceback -> frame cycle
                        failed = None
                failed = None
                if delay > 0:
                    await _clock.asleep(delay)
                attempt += 1
        except BaseException as exc:
            error: BaseException = exc
            if total_entry is not None and _settle(total_entry, exc):
                error = self._timeout("total")
            if self.fallback is not None and isinstance(error, self.fallback_on):
                self._fallback_used(error)
                if observer is not None:
                    _observe(observer, "fallback", began)
                value = self.fallback(error)
                return (await value) if self.fallback_async else value
            if observer is not None:
                _observe(observer, _outcome(error), began)
            if error is exc:
                raise
            raise error from None
        if total_entry is not None:
            _settle(total_entry, None)
        if observer is not None:
            _observe(observer, "success", began)
        return result

    # ------------------------------------------------------------------- sync

    def run_sync(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failed: BaseException | None = None,
    ) -> Any:
        """Run *fn* in the caller's thread through the whole pipeline (see run_async)."""
        observer = self.observer
        began = _perf_counter() if observer is not None else 0.0
        breaker = self.breaker
        rate = self.rate
        retry = self.retry
        limiter = self.limiter
        bulkhead = self.bulkhead
        slot_timed = self.slot_timed
        pooled = self.pooled
        if self.budget is not None:
            self.budget.deposit()
        # Sync code cannot be interrupted: the total budget is checked between
        # attempts (no sleep or new attempt starts after it), see docs/timeouts.md.
        started = _clock.monotonic() if self.total is not None else -1.0
        attempt = 1
        state: tenacity.RetryCallState | None = None
        try:
            while True:
                if failed is None:
                    token: int | None = None
                    measured = -1.0
                    held = admitted = False
                    try:
                        if breaker is not None:
                            try:
                                token = breaker.acquire()
                            except CircuitOpenError as rejected:
                                self._rejected(rejected)
                                raise
                            if breaker.needs_duration:
                                measured = _clock.monotonic()
                        if limiter is not None:
                            self._rate_acquire_sync(limiter)
                        if bulkhead is not None:
                            if not bulkhead.try_acquire():
                                self._bulkhead_wait_sync(bulkhead)
                            if pooled:
                                # the pool's thread gives the slot back when fn ends
                                admitted = True
                                result = bulkhead.run_in_pool(
                                    fn, args, kwargs, self.per_attempt, self._attempt_timeout
                                )
                            else:
                                held = True
                                slot_began = _clock.monotonic() if slot_timed else 0.0
                        if not pooled:
                            admitted = True
                            result = fn(*args, **kwargs)
                    except Exception as exc:
                        if held:
                            self._release_slot(slot_began)
                        if token is not None:
                            assert breaker is not None
                            if admitted:
                                breaker.on_failure(token, exc, _since(measured))
                            else:  # refused by the rate limiter or the bulkhead
                                breaker.on_cancel(token)
                        if rate is not None:
                            rate.record(True)
                        failed = exc
                    except BaseException:
                        if held:
                            self._release_slot(slot_began)
                        if token is not None:
                            assert breaker is not None
                            breaker.on_cancel(token)
                        raise
                    else:
                        if held:
                            assert bulkhead is not None
                            if slot_timed:
                                bulkhead.release_timed(_clock.monotonic() - slot_began)
                            else:
                                bulkhead.release()
                        if token is not None:
                            assert breaker is not None
                            breaker.on_success(
                                token, (_clock.monotonic() - measured) if measured >= 0 else 0.0
                            )
                        if rate is not None:
                            rate.record(False)
                        if retry is None or not retry.checks_result:
                            break
                        if state is None:
                            state = retry.new_state(started if started >= 0 else _clock.monotonic())
                        delay = self._next_delay(state, attempt, None, result)
                        if delay < 0:
                            break
                        if delay > 0:
                            _clock.sleep(delay)
                        attempt += 1
                        continue
                if retry is not None:
                    if state is None:
                        state = retry.new_state(started if started >= 0 else _clock.monotonic())
                    delay = self._next_delay(state, attempt, failed, None)
                else:
                    delay = -1.0
                if delay < 0:
                    try:
                        raise failed
                    finally:
                        failed = None
                failed = None
                if delay > 0:
                    _clock.sleep(delay)
                attempt += 1
        except BaseException as exc:
            if self.fallback is not None and isinstance(exc, self.fallback_on):
                self._fallback_used(exc)
                if observer is not None:
                    _observe(observer, "fallback", began)
                return self.fallback(exc)
            if observer is not None:
                _observe(observer, _outcome(exc), began)
            raise
        if observer is not None:
            _observe(observer, "success", began)
        return result


def _since(measured: float) -> float:
    return (_clock.monotonic() - measured) if measured >= 0 else 0.0


def _is_async_callable(obj: Any) -> bool:
    """Coroutine functions, partials of them, and objects with an async ``__call__``."""
    while hasattr(obj, "func") and hasattr(obj, "args"):  # functools.partial
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - we want the method itself
    )

"""
Retry on tenacity's strategies, driven by a lean loop of ours.

tenacity computes every delay (its ``wait_*`` objects), every stop decision
(``stop_after_attempt`` | ``stop_before_delay``) and every retry decision
(``retry_if_exception_type`` & co). What we do not take from tenacity is its
``Retrying`` loop: it copies the controller and builds a ``RetryCallState``,
action lists and futures on *every* call, success included. Our pipeline calls
the function directly and only on the first failure builds one
``RetryCallState`` that the strategies read; see docs/architecture.md for the
measured difference.

Three waits are written here because tenacity has none like them: Fibonacci
growth, "equal" and "decorrelated" jitter (AWS's formulas), and the
``ADAPTIVE`` strategy, which stretches exponential backoff by the policy's
recent failure rate.
"""

from __future__ import annotations

import functools
import random
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

import tenacity
from tenacity import stop as _stop
from tenacity import wait as _wait

from resilient import _clock
from resilient._models import RetryConfig, RetryStrategy
from resilient.errors import RejectedError

__all__ = ["FailureRate", "RetryPlan", "build_wait"]

_NO_RESULT: Any = object()


class _Outcome:
    """What tenacity's predicates read from ``retry_state.outcome`` (a Future's API)."""

    __slots__ = ("_exc", "_result", "failed")

    def __init__(self, exc: BaseException | None, result: Any) -> None:
        self._exc = exc
        self._result = result
        self.failed = exc is not None

    def exception(self) -> BaseException | None:
        return self._exc

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._result


class FailureRate:
    """
    Exponentially weighted failure rate of a policy's attempts (0..1), read by
    the ``ADAPTIVE`` strategy. Each outcome moves it 10% of the way.
    """

    __slots__ = ("rate",)

    def __init__(self) -> None:
        self.rate = 0.0

    def record(self, failed: bool) -> None:
        self.rate += ((1.0 if failed else 0.0) - self.rate) * 0.1


class _WaitFibonacci(_wait.wait_base):
    """``base * fib(n)``: 1, 1, 2, 3, 5 ... times *base*, capped at *cap*."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        a, b = 1, 1
        for _ in range(retry_state.attempt_number - 1):
            a, b = b, a + b
            if a * self.base >= self.cap:
                return self.cap
        return min(self.cap, self.base * a)


class _WaitAdaptive(_wait.wait_base):
    """Exponential backoff divided by ``1 - min(rate, 0.9)``: slower when failing more."""

    def __init__(self, inner: _wait.wait_base, rate: Callable[[], float], cap: float) -> None:
        self.inner = inner
        self.rate = rate
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        rate = min(max(self.rate(), 0.0), 0.9)
        return min(self.cap, self.inner(retry_state) / (1.0 - rate))


class _FullJitter(_wait.wait_base):
    """Uniform in [0, d] (AWS "full jitter")."""

    def __init__(self, inner: _wait.wait_base) -> None:
        self.inner = inner

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return random.uniform(0.0, self.inner(retry_state))


class _EqualJitter(_wait.wait_base):
    """d/2 + uniform in [0, d/2] (AWS "equal jitter")."""

    def __init__(self, inner: _wait.wait_base) -> None:
        self.inner = inner

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        half = self.inner(retry_state) / 2.0
        return half + random.uniform(0.0, half)


class _DecorrelatedJitter(_wait.wait_base):
    """``min(cap, uniform(base, 3 * previous))`` (AWS "decorrelated jitter")."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        previous = retry_state.upcoming_sleep if retry_state.attempt_number > 1 else 0.0
        high = max(self.base, previous * 3.0)
        return min(self.cap, random.uniform(self.base, high))


def build_wait(cfg: RetryConfig, rate: Callable[[], float] | None = None) -> _wait.wait_base:
    """The tenacity wait object for a retry section (delays in seconds)."""
    base, cap = cfg.base_delay, cfg.max_delay
    jitter = cfg.jitter_kind
    if jitter == "decorrelated":
        return _DecorrelatedJitter(base, cap)
    strategy = cfg.strategy
    inner: _wait.wait_base
    if strategy in (RetryStrategy.EXPONENTIAL_BACKOFF, RetryStrategy.ADAPTIVE):
        if jitter == "full" and strategy is RetryStrategy.EXPONENTIAL_BACKOFF:
            return _wait.wait_random_exponential(multiplier=base, max=cap, exp_base=cfg.multiplier)
        inner = _wait.wait_exponential(multiplier=base, max=cap, exp_base=cfg.multiplier)
        if strategy is RetryStrategy.ADAPTIVE:
            inner = _WaitAdaptive(inner, rate or (lambda: 0.0), cap)
    elif strategy is RetryStrategy.LINEAR:
        inner = _wait.wait_incrementing(start=base, increment=base, max=cap)
    elif strategy is RetryStrategy.FIBONACCI:
        inner = _WaitFibonacci(base, cap)
    else:
        inner = _wait.wait_fixed(min(base, cap))
    if jitter == "full":
        return _FullJitter(inner)
    if jitter == "equal":
        return _EqualJitter(inner)
    return inner


def _build_retry(cfg: RetryConfig) -> tenacity.retry_base:
    rejections = tuple(e for e in cfg.retry_on if issubclass(e, RejectedError))
    predicate: tenacity.retry_base = tenacity.retry_if_exception_type(
        cfg.retry_on
    ) & tenacity.retry_if_not_exception_type(RejectedError)
    if rejections:
        # Rejections are only retried when named explicitly (docs/retries.md).
        predicate = predicate | tenacity.retry_if_exception_type(rejections)
    if cfg.retry_if_exception is not None:
        predicate = predicate | tenacity.retry_if_exception(cfg.retry_if_exception)
    if cfg.give_up_on:
        predicate = predicate & tenacity.retry_if_not_exception_type(cfg.give_up_on)
    if cfg.retry_if_result is not None:
        predicate = predicate | tenacity.retry_if_result(cfg.retry_if_result)
    return predicate


#: The wait and retry strategies of a retry section, by section: equal sections
#: (many policies, or one policy's functions) share one pair, since tenacity's
#: strategy objects keep no state of their own (they read the call state). Weak
#: keys: a section no policy holds any more is forgotten.
_STRATEGIES: weakref.WeakKeyDictionary[RetryConfig, tuple[_wait.wait_base, tenacity.retry_base]]
_STRATEGIES = weakref.WeakKeyDictionary()
_STRATEGIES_LOCK = threading.Lock()


def _strategies(cfg: RetryConfig) -> tuple[_wait.wait_base, tenacity.retry_base]:
    """The (shared) wait and retry strategies of *cfg* (a section without a rate source)."""
    try:
        with _STRATEGIES_LOCK:
            found = _STRATEGIES.get(cfg)
            if found is None:
                found = _STRATEGIES[cfg] = (build_wait(cfg), _build_retry(cfg))
    except TypeError:  # a field that cannot be hashed (a callable object): its own pair
        return build_wait(cfg), _build_retry(cfg)
    return found


@functools.lru_cache(maxsize=1024)
def _stop_rule(max_attempts: int, total: float | None) -> _stop.stop_base:
    """The stop rule for *max_attempts* and a total budget (shared: it keeps no state)."""
    stop: _stop.stop_base = _stop.stop_after_attempt(max_attempts)
    if total is not None:
        stop = stop | _stop.stop_before_delay(total)
    return stop


class RetryPlan:
    """
    A compiled retry section: tenacity strategies plus the decision step the
    pipeline calls after each failed (or rejected-by-predicate) attempt.
    """

    __slots__ = ("checks_result", "max_attempts", "retry", "stop", "wait")

    def __init__(
        self, cfg: RetryConfig, *, total: float | None, rate: Callable[[], float] | None = None
    ) -> None:
        # *total* and *rate* are consumed here (the stop rule, the ADAPTIVE wait),
        # not kept: nothing reads them afterwards.
        self.max_attempts = cfg.max_attempts
        if rate is None:
            self.wait, self.retry = _strategies(cfg)
        else:  # the ADAPTIVE wait reads this pipeline's failure rate: its own
            self.wait, self.retry = build_wait(cfg, rate), _build_retry(cfg)
        self.stop = _stop_rule(cfg.max_attempts, total)
        self.checks_result = cfg.retry_if_result is not None

    def new_state(self, started: float) -> tenacity.RetryCallState:
        """Fresh tenacity state for one call whose first attempt began at *started*."""
        state = tenacity.RetryCallState(cast(Any, None), None, (), {})
        state.start_time = started
        return state

    def decide(
        self,
        state: tenacity.RetryCallState,
        attempt: int,
        exc: BaseException | None,
        result: Any = _NO_RESULT,
    ) -> tuple[float, str]:
        """
        After *attempt* ended with *exc* (or returned *result*): how long to wait
        before the next attempt, or a negative delay and the reason to give up
        (``"not_retryable"``, ``"attempts"``, ``"total_timeout"``).
        """
        state.attempt_number = attempt
        state.outcome = cast(Any, _Outcome(exc, result))
        state.outcome_timestamp = _clock.monotonic()
        if not self.retry(state):
            return -1.0, "not_retryable"
        delay = self.wait(state)
        state.upcoming_sleep = delay
        if self.stop(state):
            return -1.0, "attempts" if attempt >= self.max_attempts else "total_timeout"
        state.idle_for += delay
        return delay, ""

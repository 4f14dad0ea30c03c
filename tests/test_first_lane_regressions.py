"""
Regressions found by a review of the first-attempt lane, the late total budget and
the adaptive breaker's hot path, each checked against what the tree before them did
(commit 4951195): each test passed there, failed on 1b65efd, and passes now.
"""

from __future__ import annotations

import asyncio
import random
import sys
from typing import Any

import pytest

import resilient
from resilient import _clock
from resilient._models import CircuitBreakerConfig
from resilient.adaptive import FEATURES, AdaptiveCircuitBreaker, ThrottlingCircuitBreaker
from resilient.testing import VirtualClock


class Boom(Exception):
    pass


RETRY = {
    "max_attempts": 3,
    "strategy": "constant",
    "base_delay": 0.0,
    "jitter": False,
    "retry_on": [f"{__name__}.Boom"],
}
STAGED = {"retry": RETRY, "circuit_breaker": {"failure_threshold": 100}}


def _load(**policies: dict[str, Any]) -> None:
    resilient.load_policies({"version": 1, "policies": policies})


# --------------------------------------------------------------------------- first-attempt lane


def test_sync_retried_exception_has_no_context_from_the_first_attempt() -> None:
    """The last attempt's error is the user's own: no 'During handling of ...' chain."""
    _load(p=STAGED)
    seen: list[BaseException | None] = []

    @resilient.resilient("p")
    def flaky() -> None:
        seen.append(sys.exc_info()[1])  # nothing is being handled inside an attempt
        raise Boom(len(seen))

    for _ in range(3):  # past the first call (the rebuild takes the full lane)
        seen.clear()
        with pytest.raises(Boom) as caught:
            flaky()
        assert caught.value.__context__ is None
        assert seen == [None, None, None]


def test_async_retried_exception_has_no_context_from_the_first_attempt() -> None:
    _load(p=STAGED)
    seen: list[BaseException | None] = []

    @resilient.resilient("p")
    async def flaky() -> None:
        seen.append(sys.exc_info()[1])
        raise Boom(len(seen))

    async def main() -> None:
        for _ in range(3):
            seen.clear()
            with pytest.raises(Boom) as caught:
                await flaky()
            assert caught.value.__context__ is None
            assert seen == [None, None, None]

    asyncio.run(main())


def test_refused_retry_returns_the_users_error_without_the_refusal_as_context() -> None:
    """A retry refused by the rate limiter: the user's error, not chained to the refusal."""
    _load(
        r={
            "rate_limit": {"max_rate": 1, "time_period": 1.0, "max_wait": 0.0},
            "retry": {**RETRY, "retry_on": [f"{__name__}.Boom", "RateLimitedError"]},
        }
    )
    with VirtualClock() as clock:

        @resilient.resilient("r")
        def f(fail: bool) -> str:
            if fail:
                raise Boom
            return "ok"

        assert f(False) == "ok"
        clock.advance(1.0)
        assert f(False) == "ok"
        clock.advance(1.0)
        with pytest.raises(Boom) as caught:
            f(True)  # fails, its retry is refused (no permit): the user's Boom
        assert caught.value.__context__ is None


# --------------------------------------------------------------------------- late total budget


def test_late_total_budget_counts_from_the_calls_start_on_a_loop_of_real_time() -> None:
    """
    With the virtual clock installed and a stock loop (docs/testing.md: timeouts are
    then real), the total budget must still count from the call's start: armed
    late, it counted from the retry and gave the call a third attempt.
    """
    _load(
        v={
            "timeout": {"per_attempt": 0.4, "total": 0.5},
            "retry": {
                **RETRY,
                "max_attempts": 5,
                "retry_on": [f"{__name__}.Boom", "AttemptTimeoutError"],
            },
        }
    )
    attempts = 0

    @resilient.resilient("v")
    async def f() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(0.2)
            raise Boom
        await asyncio.sleep(5)

    with VirtualClock(), pytest.raises(resilient.AttemptTimeoutError) as caught:
        asyncio.run(f())
    assert caught.value.kind == "total"
    assert attempts == 2  # the total budget (0.5 s from the start) ends the second attempt


# --------------------------------------------------------------------------- adaptive breaker


def _slow_call_policy(kind: str) -> dict[str, Any]:
    cb: dict[str, Any] = {
        "failure_threshold": 1000,
        "min_requests_threshold": 20,
        "failure_rate_window": 5,
        "slow_call_duration": 0.005,
        "slow_call_rate_threshold": 0.5,
        "type": kind,
    }
    if kind == "adaptive":
        cb.update(enable_ml_prediction=False, adaptive={"mode": "shadow"})
    return {"circuit_breaker": cb}


def _opens_at(kind: str) -> float | None:
    """A breaker-only policy: healthy for 5 s, then every call is slow (> 64 a bucket)."""
    _load(**{kind: _slow_call_policy(kind)})
    with VirtualClock() as clock:

        @resilient.resilient(kind)
        def call() -> int:
            _clock.sleep(0.001 if clock.now < 5 else 0.006)
            return 1

        while clock.now < 30:
            try:
                call()
            except resilient.CircuitOpenError:
                return clock.now
    return None


def test_adaptive_shadow_trips_on_slow_calls_exactly_as_basic() -> None:
    """
    docs/adaptive.md: shadow outcomes are the basic breaker's, call for call. With
    slow_call_duration set, the latency sampling (64 calls a bucket) must not turn
    off the durations the basic slow-call rate needs.
    """
    basic = _opens_at("basic")
    assert basic is not None
    assert _opens_at("adaptive") == basic


def test_disabled_adaptive_breaker_does_not_learn_healthy_buckets_as_failures() -> None:
    """In ``disabled`` mode a healthy service (5 % errors) is not a failing one."""
    now = [0.0]
    cfg = CircuitBreakerConfig.model_validate(
        {
            "type": "adaptive",
            "enable_ml_prediction": False,
            "failure_threshold": 1000,
            "min_requests_threshold": 100_000,
            "adaptive": {"mode": "shadow", "bucket_seconds": 1.0, "horizon_seconds": 1},
        }
    )
    breaker = AdaptiveCircuitBreaker("d", cfg, clock=lambda: now[0])
    breaker.disable()
    for _ in range(12):
        for i in range(100):
            token = breaker.acquire()
            if i % 20 == 0:
                breaker.on_failure(token, ConnectionError(), 0.001)
            else:
                breaker.on_success(token, 0.001)
            now[0] += 0.01
    rows, labels = breaker.dataset()
    assert rows
    error_rate = FEATURES.index("error_rate")
    assert all(row[error_rate] < 0.5 for row in rows)
    assert not any(labels)


def test_throttle_refusals_say_throttling_not_a_predicted_failure() -> None:
    now = [0.0]
    cfg = CircuitBreakerConfig.model_validate(
        {
            "type": "adaptive",
            "failure_threshold": 1000,
            "min_requests_threshold": 100_000,
            "adaptive": {"mode": "throttle", "bucket_seconds": 1.0},
        }
    )
    breaker = ThrottlingCircuitBreaker("t", cfg, clock=lambda: now[0])
    random.seed(0)
    messages = set()
    for _ in range(100):  # a bucket of failures: the window's p is about 1
        try:
            breaker.on_failure(breaker.acquire(), ConnectionError(), 0.001)
        except resilient.CircuitOpenError as refusal:
            messages.add(str(refusal))
        now[0] += 0.005
    now[0] = 1.0
    for _ in range(50):
        try:
            breaker.on_failure(breaker.acquire(), ConnectionError(), 0.001)
        except resilient.CircuitOpenError as refusal:
            messages.add(str(refusal))
    assert messages
    assert all("throttling" in m and "predicted" not in m for m in messages)

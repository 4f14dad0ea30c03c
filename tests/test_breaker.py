"""Tests of resilient.breaker: every rule of the circuit breaker, on a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import threading
import time
from typing import Any

import pybreaker
import pytest

from resilient._models import CircuitBreakerConfig
from resilient.breaker import TRIALS_BUSY_RETRY_AFTER, CircuitBreaker
from resilient.errors import CircuitOpenError


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder(pybreaker.CircuitBreakerListener):
    """A pybreaker listener that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.events.append(("state", cb, old_state.name, new_state.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.events.append(("failure", cb, exc))

    def success(self, cb: Any) -> None:
        self.events.append(("success", cb))

    def changes(self) -> list[tuple[str, str]]:
        return [(e[2], e[3]) for e in self.events if e[0] == "state"]


class Boom(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        raise RuntimeError("listener bug")

    def failure(self, cb: Any, exc: BaseException) -> None:
        raise RuntimeError("listener bug")

    def success(self, cb: Any) -> None:
        raise RuntimeError("listener bug")


def make(**kwargs: Any) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    listeners = kwargs.pop("listeners", ())
    defaults: dict[str, Any] = {
        "failure_threshold": 3,
        "success_threshold": 2,
        "timeout_seconds": 10.0,
        "half_open_timeout": None,
        "failure_rate_threshold": None,
        "window_type": "count",
        "failure_rate_window": 10,
        "min_requests_threshold": 4,
    }
    defaults.update(kwargs)
    cb = CircuitBreaker("svc", CircuitBreakerConfig(**defaults), clock=clock, listeners=listeners)
    return cb, clock


def ok(cb: CircuitBreaker, duration: float = 0.0) -> None:
    cb.on_success(cb.acquire(), duration)


def bad(cb: CircuitBreaker, exc: BaseException | None = None, duration: float = 0.0) -> None:
    cb.on_failure(cb.acquire(), exc or ConnectionError("down"), duration)


def allowed(cb: CircuitBreaker) -> bool:
    try:
        token = cb.acquire()
    except CircuitOpenError:
        return False
    cb.on_cancel(token)
    return True


def trip(cb: CircuitBreaker) -> None:
    cb.open()
    assert cb.state == "open"


class TestClosed:
    def test_starts_closed_and_allows(self) -> None:
        cb, _ = make()
        assert cb.state == "closed"
        assert cb.mode == "normal"
        assert cb.acquire() == 0

    def test_consecutive_failures_trip(self) -> None:
        cb, _ = make(failure_threshold=3)
        bad(cb)
        bad(cb)
        assert cb.state == "closed"
        bad(cb)
        assert cb.state == "open"
        with pytest.raises(CircuitOpenError) as info:
            cb.acquire()
        assert info.value.policy == "svc"
        assert info.value.retry_after == pytest.approx(10.0)

    def test_success_resets_consecutive_count(self) -> None:
        cb, _ = make(failure_threshold=3)
        for _ in range(5):
            bad(cb)
            bad(cb)
            ok(cb)
        assert cb.state == "closed"
        assert cb.get_status()["failure_count"] == 0

    def test_rate_trip_needs_min_calls(self) -> None:
        cb, _ = make(failure_threshold=100, failure_rate_threshold=0.5, min_requests_threshold=4)
        bad(cb)
        ok(cb)
        bad(cb)
        assert cb.state == "closed"  # 2/3 but only 3 calls
        ok(cb)  # 2/4 = 0.5 reaches the threshold: a success can complete the quorum
        assert cb.state == "open"

    def test_rate_below_threshold_stays_closed(self) -> None:
        cb, _ = make(failure_threshold=100, failure_rate_threshold=0.6, min_requests_threshold=4)
        for _ in range(20):
            bad(cb)
            ok(cb)
            ok(cb)
        assert cb.state == "closed"
        assert cb.failure_rate == pytest.approx(0.3)  # the last 10 calls: o b o o b o o b o o

    def test_rate_tripping_off_when_threshold_none(self) -> None:
        cb, _ = make(failure_threshold=100, failure_rate_threshold=None, min_requests_threshold=1)
        for _ in range(50):
            bad(cb)
            ok(cb)
        assert cb.state == "closed"
        assert cb.failure_rate == 0.5

    def test_slow_call_trip(self) -> None:
        cb, _ = make(slow_call_duration=1.0, slow_call_rate_threshold=0.5, min_requests_threshold=4)
        assert cb.needs_duration
        ok(cb, 2.0)
        ok(cb, 0.1)
        ok(cb, 1.0)  # exactly the limit is slow
        assert cb.state == "closed"
        status = cb.get_status()["window"]
        assert (status["calls"], status["slow"], status["failures"]) == (3, 2, 0)
        ok(cb, 0.1)  # 2/4 slow
        assert cb.state == "open"

    def test_slow_success_counts_as_success_for_failure_rate(self) -> None:
        cb, _ = make(
            failure_threshold=100,
            failure_rate_threshold=0.5,
            slow_call_duration=1.0,
            slow_call_rate_threshold=1.0,
            min_requests_threshold=4,
        )
        bad(cb)
        ok(cb, 5.0)
        ok(cb, 5.0)
        ok(cb, 5.0)
        assert cb.state == "closed"
        assert cb.failure_rate == 0.25
        assert cb.get_status()["window"]["slow_call_rate"] == 0.75

    def test_durations_ignored_when_slow_calls_off(self) -> None:
        cb, _ = make(min_requests_threshold=1)
        assert not cb.needs_duration
        for _ in range(20):
            ok(cb, 1e6)
        assert cb.state == "closed"
        assert cb.get_status()["window"]["slow"] == 0


class TestWindows:
    def test_count_window_keeps_last_n_calls(self) -> None:
        cb, _ = make(failure_threshold=100, failure_rate_window=4, min_requests_threshold=4)
        bad(cb)
        bad(cb)
        for _ in range(4):
            ok(cb)
        w = cb.get_status()["window"]
        assert (w["calls"], w["failures"]) == (4, 0)
        bad(cb)
        w = cb.get_status()["window"]
        assert (w["calls"], w["failures"]) == (4, 1)

    def test_count_window_rate_trip_after_old_successes_fall_out(self) -> None:
        cb, _ = make(
            failure_threshold=100,
            failure_rate_threshold=0.75,
            failure_rate_window=4,
            min_requests_threshold=4,
        )
        for _ in range(4):
            ok(cb)
        bad(cb)
        bad(cb)
        assert cb.state == "closed"  # 2/4
        bad(cb)  # 3/4
        assert cb.state == "open"

    def test_time_window_counts_last_seconds(self) -> None:
        cb, clock = make(
            window_type="time",
            failure_rate_window=10,
            failure_threshold=100,
            failure_rate_threshold=0.5,
            min_requests_threshold=3,
        )
        bad(cb)
        bad(cb)
        clock.advance(10.0)  # the two failures are now out of the window
        ok(cb)
        ok(cb)
        bad(cb)
        assert cb.state == "closed"
        w = cb.get_status()["window"]
        assert (w["calls"], w["failures"]) == (3, 1)

    def test_time_window_old_buckets_expire(self) -> None:
        cb, clock = make(window_type="time", failure_rate_window=5, failure_threshold=100)
        clock.now = 100.0
        bad(cb)  # bucket 100
        clock.now = 102.5
        ok(cb)  # bucket 102
        clock.now = 104.9
        assert cb.get_status()["window"]["calls"] == 2
        assert cb.failure_rate == 0.5
        clock.now = 105.0  # bucket 100 leaves (window: buckets 101..105)
        assert cb.get_status()["window"]["calls"] == 1
        assert cb.failure_rate == 0.0
        clock.now = 107.0
        assert cb.get_status()["window"]["calls"] == 0
        clock.now = 1_000_000.0  # a jump far beyond the window clears everything
        ok(cb)
        assert cb.get_status()["window"]["calls"] == 1

    def test_long_time_window_uses_wide_buckets(self) -> None:
        cb, clock = make(window_type="time", failure_rate_window=3600, failure_threshold=100)
        clock.now = 0.0
        for _ in range(1000):
            bad(cb)
            ok(cb)
            clock.advance(3.0)
        window = cb._window
        assert len(window._b_calls) == 60  # type: ignore[union-attr]
        assert cb.get_status()["window"]["calls"] == 2000
        clock.advance(3600.0)
        assert cb.failure_rate == 0.0

    def test_time_window_rate_trip(self) -> None:
        cb, clock = make(
            window_type="time",
            failure_rate_window=10,
            failure_threshold=100,
            failure_rate_threshold=0.5,
            min_requests_threshold=4,
        )
        for _ in range(2):
            ok(cb)
            clock.advance(1.0)
            bad(cb)
            clock.advance(1.0)
        assert cb.state == "open"

    def test_window_cleared_on_transition(self) -> None:
        cb, _ = make(failure_threshold=100, failure_rate_threshold=0.9)
        bad(cb)
        ok(cb)
        cb.open()
        w = cb.get_status()["window"]
        assert (w["calls"], w["failures"]) == (0, 0)
        assert cb.failure_rate == 0.0


class TestOpenAndHalfOpen:
    def test_open_until_timeout_then_half_open(self) -> None:
        cb, clock = make(timeout_seconds=10.0)
        trip(cb)
        clock.advance(9.99)
        with pytest.raises(CircuitOpenError) as info:
            cb.acquire()
        assert info.value.retry_after == pytest.approx(0.01)
        clock.advance(0.01)
        assert cb.state == "half-open"

    def test_half_open_transition_is_lazy_on_acquire(self) -> None:
        cb, clock = make(timeout_seconds=10.0, success_threshold=1)
        trip(cb)
        clock.advance(10.0)
        assert cb.acquire() & 1  # a trial permit
        assert cb._state == "half-open"

    def test_exactly_n_trial_permits(self) -> None:
        cb, clock = make(success_threshold=2, half_open_max_calls=3)
        trip(cb)
        clock.advance(10.0)
        tokens = [cb.acquire() for _ in range(3)]
        assert all(t & 1 for t in tokens)
        with pytest.raises(CircuitOpenError) as info:
            cb.acquire()
        assert info.value.retry_after == TRIALS_BUSY_RETRY_AFTER
        # permits are counted when issued, not while in flight
        cb.on_success(tokens[0], 0.0)
        with pytest.raises(CircuitOpenError):
            cb.acquire()
        assert cb.get_status()["totals"]["rejections"] == 2

    def test_busy_retry_after_is_bounded_by_half_open_timeout(self) -> None:
        cb, clock = make(success_threshold=1, half_open_timeout=5.0)
        trip(cb)
        clock.advance(10.0)
        cb.acquire()
        clock.advance(4.9)
        with pytest.raises(CircuitOpenError) as info:
            cb.acquire()
        assert info.value.retry_after == pytest.approx(0.1)

    def test_close_after_success_threshold(self) -> None:
        cb, clock = make(success_threshold=2, half_open_max_calls=3)
        trip(cb)
        clock.advance(10.0)
        t1, t2, t3 = cb.acquire(), cb.acquire(), cb.acquire()
        cb.on_success(t1, 0.0)
        assert cb.state == "half-open"
        assert cb.get_status()["success_count"] == 1
        cb.on_success(t2, 0.0)
        assert cb.state == "closed"
        assert cb.trips == 0
        cb.on_failure(t3, ConnectionError(), 0.0)  # a late trial of the old period
        assert cb.state == "closed"
        assert cb.get_status()["failure_count"] == 0

    def test_reopen_on_trial_failure(self) -> None:
        cb, clock = make(success_threshold=2, timeout_seconds=10.0)
        trip(cb)
        clock.advance(10.0)
        t1, t2 = cb.acquire(), cb.acquire()
        cb.on_success(t1, 0.0)
        cb.on_failure(t2, ConnectionError(), 0.0)
        assert cb.state == "open"
        assert cb.trips == 2

    def test_slow_trial_reopens(self) -> None:
        cb, clock = make(success_threshold=1, slow_call_duration=1.0)
        trip(cb)
        clock.advance(10.0)
        cb.on_success(cb.acquire(), 1.5)
        assert cb.state == "open"

    def test_half_open_timeout_reopens(self) -> None:
        cb, clock = make(success_threshold=2, half_open_timeout=5.0)
        trip(cb)
        clock.advance(10.0)
        token = cb.acquire()
        assert cb.state == "half-open"
        clock.advance(5.0)
        assert cb.state == "open"
        assert cb.trips == 2
        cb.on_success(token, 0.0)  # too late: no verdict in time
        assert cb.state == "open"

    def test_half_open_timeout_checked_when_trial_reports(self) -> None:
        cb, clock = make(success_threshold=1, half_open_timeout=5.0)
        trip(cb)
        clock.advance(10.0)
        token = cb.acquire()
        clock.advance(6.0)
        cb.on_success(token, 0.0)
        assert cb.state == "open"

    def test_no_half_open_timeout_when_none(self) -> None:
        cb, clock = make(success_threshold=1, half_open_timeout=None)
        trip(cb)
        clock.advance(10.0)
        token = cb.acquire()
        clock.advance(1e6)
        assert cb.state == "half-open"
        cb.on_success(token, 0.0)
        assert cb.state == "closed"

    def test_open_duration_grows_and_is_capped_and_reset_on_close(self) -> None:
        cb, clock = make(
            timeout_seconds=10.0,
            open_duration_multiplier=2.0,
            max_open_duration=35.0,
            success_threshold=1,
        )
        for _ in range(3):
            bad(cb)
        durations = []
        for _ in range(4):
            with pytest.raises(CircuitOpenError) as info:
                cb.acquire()
            assert info.value.retry_after is not None
            durations.append(info.value.retry_after)
            clock.advance(info.value.retry_after)
            cb.on_failure(cb.acquire(), ConnectionError(), 0.0)  # the trial fails: trip again
        assert durations == [10.0, 20.0, 35.0, 35.0]
        assert cb.trips == 5
        clock.advance(35.0)
        cb.on_success(cb.acquire(), 0.0)
        assert cb.state == "closed"
        assert cb.trips == 0
        trip(cb)
        assert cb.get_status()["retry_after"] == 10.0

    def test_huge_trip_count_does_not_overflow(self) -> None:
        cb, _ = make(open_duration_multiplier=10.0, max_open_duration=100.0)
        for _ in range(400):
            cb.open()
        assert cb.trips == 400
        assert cb.get_status()["retry_after"] == 100.0


class TestClassification:
    def test_ignored_exception_counts_as_neither(self) -> None:
        cb, _ = make(ignore_exceptions=(KeyError,), min_requests_threshold=1)
        bad(cb)
        bad(cb)
        for _ in range(5):
            bad(cb, KeyError("x"))
        status = cb.get_status()
        assert status["failure_count"] == 2  # not reset, not increased
        assert status["window"]["calls"] == 2
        assert status["totals"]["ignored"] == 5

    def test_ignore_wins_over_record(self) -> None:
        cb, _ = make(
            record_exceptions=(LookupError,), ignore_exceptions=(KeyError,), failure_threshold=1
        )
        bad(cb, KeyError())
        assert cb.state == "closed"
        bad(cb, IndexError())
        assert cb.state == "open"

    def test_unrecorded_exception_counts_as_success(self) -> None:
        cb, _ = make(record_exceptions=(ConnectionError,), failure_threshold=2)
        bad(cb)
        bad(cb, ValueError("bad input"))  # the service answered: success
        bad(cb)
        assert cb.state == "closed"
        status = cb.get_status()
        assert status["totals"]["successes"] == 1
        assert status["window"]["failures"] == 2

    def test_ignored_trial_returns_permit(self) -> None:
        cb, clock = make(success_threshold=1, ignore_exceptions=(KeyError,))
        trip(cb)
        clock.advance(10.0)
        token = cb.acquire()
        assert not allowed_without_release(cb)
        cb.on_failure(token, KeyError(), 0.0)
        assert cb.state == "half-open"
        token = cb.acquire()
        cb.on_success(token, 0.0)
        assert cb.state == "closed"

    def test_unrecorded_trial_exception_is_a_success(self) -> None:
        cb, clock = make(success_threshold=1, record_exceptions=(ConnectionError,))
        trip(cb)
        clock.advance(10.0)
        cb.on_failure(cb.acquire(), ValueError(), 0.0)
        assert cb.state == "closed"


def allowed_without_release(cb: CircuitBreaker) -> bool:
    try:
        cb.acquire()
    except CircuitOpenError:
        return False
    return True


class TestCancel:
    def test_cancel_returns_permit(self) -> None:
        cb, clock = make(success_threshold=1)
        trip(cb)
        clock.advance(10.0)
        token = cb.acquire()
        assert not allowed_without_release(cb)
        cb.on_cancel(token)
        assert cb.get_status()["trial_permits_issued"] == 0
        cb.on_success(cb.acquire(), 0.0)
        assert cb.state == "closed"

    def test_cancel_counts_nothing_in_closed(self) -> None:
        cb, _ = make()
        bad(cb)
        cb.on_cancel(cb.acquire())
        status = cb.get_status()
        assert status["failure_count"] == 1
        assert status["window"]["calls"] == 1
        assert status["totals"]["calls"] == 1

    def test_stale_cancel_does_not_free_a_new_permit(self) -> None:
        cb, clock = make(success_threshold=1, half_open_timeout=5.0)
        trip(cb)
        clock.advance(10.0)
        old = cb.acquire()
        clock.advance(5.0)  # half-open timeout: open again
        clock.advance(10.0)
        new = cb.acquire()
        cb.on_cancel(old)
        assert not allowed_without_release(cb)
        cb.on_success(new, 0.0)
        assert cb.state == "closed"

    async def test_pipeline_style_cancellation(self) -> None:
        cb, clock = make(success_threshold=1)
        trip(cb)
        clock.advance(10.0)

        async def guarded() -> None:
            token = cb.acquire()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cb.on_cancel(token)
                raise
            cb.on_success(token, 0.0)

        task = asyncio.create_task(guarded())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert allowed(cb)


class TestTokens:
    def test_stale_trial_token_after_reset_is_ignored(self) -> None:
        cb, clock = make(success_threshold=1, failure_threshold=1)
        trip(cb)
        clock.advance(10.0)
        token = cb.acquire()
        cb.reset()
        cb.on_failure(token, ConnectionError(), 0.0)
        assert cb.state == "closed"
        assert cb.get_status()["failure_count"] == 0
        assert cb.get_status()["window"]["calls"] == 0

    def test_stale_trial_token_in_a_new_half_open_period_is_ignored(self) -> None:
        cb, clock = make(success_threshold=2, half_open_max_calls=2)
        trip(cb)
        clock.advance(10.0)
        old = cb.acquire()
        cb.open()
        clock.advance(20.0)
        assert cb.state == "half-open"
        cb.on_success(old, 0.0)
        assert cb.get_status()["success_count"] == 0
        cb.on_failure(old, ConnectionError(), 0.0)
        assert cb.state == "half-open"

    def test_closed_call_from_before_a_trip_is_not_counted_after_close(self) -> None:
        cb, _ = make(failure_threshold=1)
        token = cb.acquire()
        cb.open()
        cb.close()
        cb.on_failure(token, ConnectionError(), 0.0)
        assert cb.state == "closed"
        assert cb.get_status()["totals"]["failures"] == 1  # counted as a lifetime total only

    def test_closed_result_arriving_while_open_changes_nothing(self) -> None:
        cb, _ = make(failure_threshold=1)
        token = cb.acquire()
        bad(cb)
        assert cb.state == "open"
        cb.on_success(token, 0.0)
        assert cb.state == "open"
        assert cb.trips == 1


class TestModes:
    def test_initial_mode_from_config(self) -> None:
        cb, _ = make(mode="forced_open")
        assert cb.mode == "forced_open"
        with pytest.raises(CircuitOpenError) as info:
            cb.acquire()
        assert info.value.retry_after is None

    def test_disabled_lets_everything_through_and_records_nothing(self) -> None:
        cb, clock = make(failure_threshold=1)
        trip(cb)
        cb.disable()
        for _ in range(10):
            bad(cb)
            ok(cb)
        clock.advance(1000.0)
        assert cb._state == "open"  # frozen
        status = cb.get_status()
        assert status["totals"]["calls"] == 0
        assert status["state"] == "open"
        cb.normal()
        assert cb.state == "half-open"

    def test_disabled_ignores_results_of_calls_started_before(self) -> None:
        cb, _ = make(failure_threshold=1)
        token = cb.acquire()
        cb.disable()
        cb.on_failure(token, ConnectionError(), 0.0)
        assert cb.state == "closed"

    def test_metrics_only_records_every_outcome_and_never_transitions(self) -> None:
        """resilience4j's METRICS_ONLY: all calls pass, outcomes count, the state stays put."""
        rec = Recorder()
        cb, clock = make(
            failure_threshold=2, failure_rate_threshold=0.5, mode="metrics_only", listeners=[rec]
        )
        for _ in range(6):
            bad(cb)
        ok(cb)
        bad(cb)
        clock.advance(1000.0)  # no open period runs out either
        assert cb.state == "closed"
        assert cb.trips == 0
        assert cb.failure_rate == pytest.approx(7 / 8)
        status = cb.get_status()
        assert status["state"] == "closed"
        assert status["mode"] == "metrics_only"
        assert status["trips"] == 0
        assert status["opened_at"] is None
        assert status["failure_count"] == 1  # consecutive, reset by the success
        assert status["thresholds_exceeded"] is True  # a normal breaker would be open
        assert status["window"]["calls"] == 8
        assert status["window"]["failures"] == 7
        assert status["window"]["failure_rate"] == pytest.approx(7 / 8)
        assert status["totals"] == {
            "calls": 8,
            "successes": 1,
            "failures": 7,
            "ignored": 0,
            "rejections": 0,
        }
        assert rec.changes() == []
        assert sum(1 for e in rec.events if e[0] == "failure") == 7  # listeners still hear

    def test_metrics_only_time_window_counts_lock_free_successes(self) -> None:
        cb, clock = make(window_type="time", failure_rate_window=10, mode="metrics_only")
        for _ in range(5):
            ok(cb)
        for _ in range(5):
            bad(cb)
        window = cb.get_status()["window"]
        assert (window["calls"], window["failures"]) == (10, 5)
        assert cb.state == "closed"
        clock.advance(11.0)
        assert cb.get_status()["window"]["calls"] == 0  # the window still slides

    def test_metrics_only_lets_calls_through_an_open_breaker_and_freezes_it(self) -> None:
        cb, clock = make(failure_threshold=2)
        trip(cb)
        cb.metrics_only()
        for _ in range(3):
            bad(cb)
        ok(cb)
        clock.advance(100.0)
        status = cb.get_status()
        assert status["state"] == "open"  # frozen: no half-open, no re-trip
        assert status["trips"] == 1
        assert status["window"]["calls"] == 4
        assert status["totals"]["rejections"] == 0
        cb.normal()
        assert cb.state == "half-open"  # the open period was over long ago

    def test_metrics_only_then_normal_keeps_the_observed_window(self) -> None:
        cb, _ = make(failure_threshold=3, mode="metrics_only")
        bad(cb)
        bad(cb)
        cb.normal()
        assert cb.state == "closed"
        bad(cb)  # the third in a row: a normal breaker acts on what it has seen
        assert cb.state == "open"
        assert cb.trips == 1

    def test_metrics_only_manual_control_still_works(self) -> None:
        cb, _ = make(mode="metrics_only")
        cb.open()
        assert cb.state == "open"
        assert allowed(cb)  # but never rejects
        cb.close()
        assert cb.state == "closed"

    def test_forced_open_rejects_even_when_closed_and_normal_restores(self) -> None:
        cb, _ = make()
        cb.force_open()
        assert cb.state == "closed"
        for _ in range(3):
            with pytest.raises(CircuitOpenError):
                cb.acquire()
        assert cb.get_status()["retry_after"] is None
        cb.normal()
        assert cb.acquire() == 0


class TestControl:
    def test_open_close_reset(self) -> None:
        cb, clock = make(failure_threshold=2)
        bad(cb)
        cb.open()
        assert cb.state == "open"
        assert cb.trips == 1
        assert cb.get_status()["opened_at"] is not None
        cb.close()
        assert cb.state == "closed"
        assert cb.trips == 0
        assert cb.get_status()["failure_count"] == 0
        assert cb.get_status()["opened_at"] is None
        bad(cb)
        cb.open()
        clock.advance(3.0)
        cb.reset()
        status = cb.get_status()
        assert status["state"] == "closed"
        assert status["trips"] == 0
        assert status["totals"] == {
            "calls": 0,
            "successes": 0,
            "failures": 0,
            "ignored": 0,
            "rejections": 0,
        }

    def test_open_starts_a_normal_open_period(self) -> None:
        cb, clock = make(timeout_seconds=7.0)
        cb.open()
        clock.advance(6.9)
        assert not allowed(cb)
        clock.advance(0.1)
        assert allowed(cb)

    def test_transitions_show_in_the_public_state(self) -> None:
        """State, trip count and opening time follow every transition (no storage object)."""
        cb, _ = make()
        assert (cb.state, cb.trips, cb.get_status()["opened_at"]) == ("closed", 0, None)
        cb.open()
        assert (cb.state, cb.trips) == ("open", 1)
        assert cb.get_status()["opened_at"] is not None
        cb.open()
        assert cb.trips == 2
        cb.close()
        assert (cb.state, cb.trips, cb.get_status()["opened_at"]) == ("closed", 0, None)
        assert not hasattr(cb, "_storage")

    def test_get_status_is_json(self) -> None:
        cb, clock = make(ignore_exceptions=(KeyError,), slow_call_duration=2.0, window_type="time")
        bad(cb)
        ok(cb, 3.0)
        text = json.dumps(cb.get_status())
        data = json.loads(text)
        assert data["name"] == "svc"
        assert data["window"]["calls"] == 2
        assert data["config"]["ignore_exceptions"] == ["KeyError"]
        cb.open()
        clock.advance(1.0)
        data = json.loads(json.dumps(cb.get_status()))
        assert data["state"] == "open"
        assert data["retry_after"] == 9.0
        assert data["opened_at"].endswith("+00:00")


class TestListeners:
    def test_listeners_get_pybreaker_style_arguments(self) -> None:
        rec = Recorder()
        cb, clock = make(failure_threshold=1, success_threshold=1, listeners=[rec])
        ok(cb)
        exc = ConnectionError("x")
        bad(cb, exc)
        clock.advance(10.0)
        ok(cb)
        assert [e[0] for e in rec.events] == [
            "success",
            "failure",
            "state",
            "state",
            "success",
            "state",
        ]
        assert all(e[1] is cb for e in rec.events)
        assert rec.events[1][2] is exc
        assert rec.changes() == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]

    def test_add_and_remove_listener(self) -> None:
        rec = Recorder()
        cb, _ = make()
        cb.add_listener(rec)
        assert cb.listeners == (rec,)
        cb.open()
        cb.remove_listener(rec)
        cb.close()
        assert rec.changes() == [("closed", "open")]
        with pytest.raises(ValueError):
            cb.remove_listener(rec)

    def test_raising_listener_is_logged_and_harmless(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        rec = Recorder()
        cb, clock = make(failure_threshold=1, success_threshold=1, listeners=[Boom(), rec])
        with caplog.at_level(logging.ERROR, logger="resilient.breaker"):
            ok(cb)
            bad(cb)
            assert cb.state == "open"
            clock.advance(10.0)
            ok(cb)
        assert cb.state == "closed"
        assert rec.changes() == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]
        assert len(caplog.records) >= 5
        assert all(r.name == "resilient.breaker" for r in caplog.records)

    def test_inherited_no_op_callbacks_cost_nothing(self) -> None:
        class OnlyStates(pybreaker.CircuitBreakerListener):
            def __init__(self) -> None:
                self.changes: list[str] = []

            def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
                self.changes.append(new_state.name)

        class DuckTyped:
            def __init__(self) -> None:
                self.changes: list[str] = []

            def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
                self.changes.append(new_state.name)

        only, duck = OnlyStates(), DuckTyped()
        cb, _ = make(failure_threshold=1, listeners=[only, duck])
        assert cb._success_cbs == ()
        assert cb._failure_cbs == ()
        ok(cb)
        bad(cb)
        assert only.changes == duck.changes == ["open"]
        rec = Recorder()
        cb.add_listener(rec)
        assert len(cb._success_cbs) == len(cb._failure_cbs) == 1

    def test_listener_may_inspect_the_breaker(self) -> None:
        seen: list[str] = []

        class Inspect(pybreaker.CircuitBreakerListener):
            def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
                seen.append(cb.get_status()["state"])  # would deadlock if called under the lock

        cb, _ = make(listeners=[Inspect()])
        cb.open()
        assert seen == ["open"]


class TestResources:
    def test_rejections_keep_memory_flat(self) -> None:
        cb, _ = make()
        cb.open()
        for _ in range(1000):
            assert not allowed_without_release(cb)
        gc.collect()
        blocks = sys.getallocatedblocks()
        for _ in range(100_000):
            with contextlib.suppress(CircuitOpenError):
                cb.acquire()
        gc.collect()
        assert sys.getallocatedblocks() - blocks < 500
        assert cb.get_status()["totals"]["rejections"] == 101_000
        assert len(cb._window._ring) == 10  # type: ignore[union-attr]
        assert len(cb.listeners) == 0

    def test_locks_are_not_held_around_user_code(self) -> None:
        cb = CircuitBreaker("svc", CircuitBreakerConfig(window_type="time"))
        barrier = threading.Barrier(9)

        def worker() -> None:
            barrier.wait()
            token = cb.acquire()
            time.sleep(0.05)
            cb.on_success(token, 0.05)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        assert elapsed < 1.2 * 0.05
        assert cb.get_status()["totals"]["successes"] == 8

    def test_concurrent_trials_get_exactly_n_permits(self) -> None:
        cb, clock = make(success_threshold=3, half_open_max_calls=5)
        trip(cb)
        clock.advance(10.0)
        granted: list[int] = []
        barrier = threading.Barrier(16)

        def worker() -> None:
            barrier.wait()
            with contextlib.suppress(CircuitOpenError):
                granted.append(cb.acquire())

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(granted) == 5

    def test_closed_fast_path_constant_token(self) -> None:
        cb, _ = make()
        assert {cb.acquire() for _ in range(10)} == {0}


class TestLockFreeSuccesses:
    """Successes in a clean time window are counted without the lock, and folded in later."""

    def test_counts_are_exact(self) -> None:
        """Folded successes land in the window and the totals, in the right bucket."""
        cb, clock = make(window_type="time", failure_rate_window=10, failure_rate_threshold=0.5)
        for _ in range(30):
            ok(cb)
        status = cb.get_status()
        assert status["window"]["calls"] == 30
        assert status["totals"]["successes"] == 30
        bad(cb)
        assert cb.failure_rate == 1 / 31
        clock.advance(11)  # the whole window has passed: old successes expire
        assert cb.failure_rate == 0.0
        assert cb.get_status()["window"]["calls"] == 0

    def test_success_after_failures_can_still_trip(self) -> None:
        """With failures in the window, a success takes the locked path that checks the rate."""
        cb, _clock = make(
            window_type="time",
            failure_rate_window=10,
            failure_rate_threshold=0.5,
            min_requests_threshold=4,
            failure_threshold=100,
        )
        ok(cb)
        bad(cb)
        bad(cb)
        assert cb.state == "closed"  # 3 calls < min 4
        ok(cb)  # 2 of 4 failed: 50% with enough calls
        assert cb.state == "open"

    def test_threads_lose_nothing_visible(self) -> None:
        """Many threads counting at once: the window holds every success (within 0.1%)."""
        cb, _clock = make(window_type="time", failure_rate_window=60)
        per_thread = 5_000

        def work() -> None:
            for _ in range(per_thread):
                ok(cb)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = cb.get_status()["totals"]["successes"]
        assert 8 * per_thread * 0.999 <= total <= 8 * per_thread

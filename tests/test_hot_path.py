"""
The success path's shortcuts give the same results as the long way round (issue #15):

* the attempt engine reads the clock once per step and hands the reading on (the
  breaker's window, the bulkhead's slot, the per-attempt deadline);
* a closed breaker's success in an unchanged window bucket is one counter increment
  (``CircuitBreaker.on_success_at``), checked against the reference model of
  tests/test_breaker_stateful.py and through the public API;
* the metrics' duration histogram finds the lowest bucket without a search.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import load
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from test_breaker_stateful import SLOW, BreakerMachine

import resilient
from resilient import AttemptTimeoutError, metrics
from resilient._models import CircuitBreakerConfig
from resilient.breaker import CircuitBreaker
from resilient.errors import CircuitOpenError
from resilient.pipeline import get_breaker
from resilient.testing import VirtualClock

# ------------------------------------------------------------------ the breaker's model


class EngineBreakerMachine(BreakerMachine):
    """The stateful model test, with successes reported as the attempt engine does."""

    def _finish(self, pair: tuple[int, tuple[str, int]], outcome: str) -> None:
        success = self.cb.success_step(self.clock)
        if outcome not in ("success", "slow_success") or success is None:
            super()._finish(pair, outcome)
            return
        token, mtoken = pair
        now = self.clock.now
        success(token, 2 * SLOW if outcome == "slow_success" else 0.0, now)
        self.model.success(mtoken, outcome == "slow_success", now)


EngineBreakerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineBreakerMachine = EngineBreakerMachine.TestCase


class TestSuccessStep:
    def test_time_window_on_its_clock_takes_the_reading(self) -> None:
        clock = VirtualClock()
        cb = CircuitBreaker("x", CircuitBreakerConfig(), clock=clock.monotonic)
        assert cb.success_step(clock.monotonic) is not None

    def test_nothing_to_gain_or_not_usable(self) -> None:
        clock = VirtualClock()
        count = CircuitBreaker(
            "x", CircuitBreakerConfig(window_type="count"), clock=clock.monotonic
        )
        assert count.success_step(clock.monotonic) is None  # reads no clock on success
        timed = CircuitBreaker("x", CircuitBreakerConfig(), clock=clock.monotonic)
        assert timed.success_step(VirtualClock().monotonic) is None  # another clock

        seen: list[float] = []

        class Counting(CircuitBreaker):
            __slots__ = ()

            def on_success(self, token: int, duration: float) -> None:
                CircuitBreaker.on_success(self, token, duration)
                seen.append(duration)

        counting = Counting("x", CircuitBreakerConfig(), clock=clock.monotonic)
        # its own on_success must still run for every success
        assert counting.success_step(clock.monotonic) is None

    def test_success_listeners_hear_every_lock_free_success(self) -> None:
        clock = VirtualClock()
        cb = CircuitBreaker("x", CircuitBreakerConfig(), clock=clock.monotonic)
        heard: list[Any] = []

        class Listener:
            def success(self, breaker: CircuitBreaker) -> None:
                heard.append(breaker)

        cb.add_listener(Listener())
        success = cb.success_step(clock.monotonic)
        assert success is not None
        for _ in range(5):
            success(cb.acquire(), 0.0, clock.monotonic())
        assert heard == [cb] * 5
        assert cb.get_status()["totals"]["successes"] == 5


# ------------------------------------------------------------ through the public API

BREAKER = {
    "failure_threshold": 5,
    "failure_rate_threshold": 0.5,
    "min_requests_threshold": 10,
    "failure_rate_window": 10,
}
ONE_ATTEMPT = {"max_attempts": 1, "timeout": None, "per_attempt_timeout": None}


def _window(name: str) -> tuple[int, int, int]:
    status = get_breaker(name).get_status()
    return status["window"]["calls"], status["window"]["failures"], status["failure_count"]


class TestBreakerThroughThePipeline:
    """A breaker behind a bulkhead goes through the compiled steps (one clock reading)."""

    def test_sync_counts_trips_and_forgets_as_before(self) -> None:
        with VirtualClock() as clock:
            load(
                db={
                    "retry": ONE_ATTEMPT,
                    "circuit_breaker": BREAKER,
                    "bulkhead": {"max_concurrent_requests": 4},
                }
            )

            @resilient.resilient("db")
            def call(fail: bool = False) -> int:
                if fail:
                    raise ConnectionError("down")
                return 1

            for _ in range(5):
                assert call() == 1
            assert _window("db") == (5, 0, 0)
            with pytest.raises(ConnectionError):
                call(fail=True)
            assert _window("db") == (6, 1, 1)
            for _ in range(3):
                call()
            assert _window("db") == (9, 1, 0)  # a success ends the run of failures
            clock.advance(11.0)  # the whole window has passed
            for _ in range(4):
                call()
            assert _window("db") == (4, 0, 0)
            # failures interleaved with successes: the rate trips it, not a run
            for _ in range(3):
                with pytest.raises(ConnectionError):
                    call(fail=True)
                call()
            assert get_breaker("db").state == "closed"
            assert _window("db") == (10, 3, 0)
            for _ in range(3):
                with pytest.raises(ConnectionError):
                    call(fail=True)
            assert get_breaker("db").state == "closed"  # 6 of 13, and 3 in a row
            with pytest.raises(ConnectionError):
                call(fail=True)
            assert get_breaker("db").state == "open"  # 7 of 14: the rate, not a run of 5
            with pytest.raises(CircuitOpenError):
                call()
            totals = get_breaker("db").get_status()["totals"]
            assert (totals["successes"], totals["failures"]) == (15, 8)

    def test_async_with_a_per_attempt_deadline(self) -> None:
        with VirtualClock() as clock:
            load(
                api={
                    "retry": ONE_ATTEMPT,
                    "circuit_breaker": {**BREAKER, "slow_call_duration": 0.5},
                    "bulkhead": {"max_concurrent_requests": 4},
                    "timeout": {"per_attempt": 1.0},
                }
            )

            @resilient.resilient("api")
            async def call(latency: float) -> str:
                await asyncio.sleep(latency)
                return "ok"

            async def main() -> None:
                for _ in range(3):
                    assert await call(0.1) == "ok"
                assert _window("api") == (3, 0, 0)
                began = clock.now
                with pytest.raises(AttemptTimeoutError):
                    await call(5.0)
                # the deadline ran from the attempt's start: one second, not more
                assert clock.now - began == pytest.approx(1.0)
                assert _window("api") == (4, 1, 1)
                assert get_breaker("api").get_status()["window"]["slow"] == 1
                assert await call(0.6) == "ok"  # slow, measured on the one reading
                status = get_breaker("api").get_status()
                assert (status["window"]["calls"], status["window"]["slow"]) == (5, 2)

            clock.run(main())


# ------------------------------------------------------------------------- metrics


def test_histogram_buckets_at_and_around_the_lowest_bound() -> None:
    """A duration equal to a bound is in that bound's bucket ("le"), below it too."""
    load(svc={"retry": ONE_ATTEMPT, "circuit_breaker": {}})

    @resilient.resilient("svc")
    def ok() -> int:
        return 1

    registry = CollectorRegistry()
    metrics.enable(registry=registry, buckets=(0.01, 0.1))
    try:
        ok()  # builds the pipeline with the observer
        observer = ok.__resilient_handle__.state[1].observer  # type: ignore[attr-defined]

        def bucket(le: str) -> float:
            sample = registry.get_sample_value(
                "resilient_call_duration_seconds_bucket", {"policy": "svc", "le": le}
            )
            assert sample is not None
            return sample

        before = [bucket(le) for le in ("0.01", "0.1", "+Inf")]
        for duration in (0.0, 0.01, 0.010001, 0.1, 0.5):
            observer.record("success", duration)
        after = [bucket(le) for le in ("0.01", "0.1", "+Inf")]
        # cumulative: <= 0.01 got 2, <= 0.1 got 4, all 5
        assert [a - b for a, b in zip(after, before, strict=True)] == [2, 4, 5]
    finally:
        metrics.disable()


# ------------------------------------------------------------ the first-attempt lane


class Recorder:
    """A call observer: what the pipeline reports at the end of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.errors: list[str] = []

    def record(self, outcome: str, duration: float) -> None:
        self.calls.append((outcome, duration))

    def failed(self, error: BaseException) -> None:
        self.errors.append(type(error).__name__)


RETRYING = {
    "retry": {"max_attempts": 3, "base_delay": 0.0, "jitter": False, "budget": {}},
    "circuit_breaker": {"failure_threshold": 100},
    "bulkhead": {"max_concurrent_requests": 5, "enable_auto_scaling": False},
    "timeout": {"per_attempt": 1.0, "total": 5.0},
}


@pytest.fixture
def recorder() -> Recorder:
    from resilient.runtime import runtime

    seen = Recorder()
    runtime.add_observer_factory("test-recorder", lambda _pipeline: seen)
    return seen


class TestFirstAttemptLane:
    """
    A policy with retries (or a total budget, or an observer) runs its first attempt
    in the decorator (LANE_FIRST) and hands the call to the loop after it: the call
    must look the same to the observer, the retry budget and the total budget.
    """

    async def test_one_observation_and_one_deposit_per_call(self, recorder: Recorder) -> None:
        load(p=RETRYING)
        failures = iter([True, False, False, False])

        @resilient.resilient("p")
        async def work() -> str:
            await asyncio.sleep(0.02)
            if next(failures):
                raise ConnectionError("blip")
            return "ok"

        from resilient.pipeline import LANE_FIRST

        assert work.__resilient_handle__.get().lane == LANE_FIRST  # type: ignore[attr-defined]
        assert await work() == "ok"  # retried once
        assert await work() == "ok"
        assert await work() == "ok"
        assert [outcome for outcome, _ in recorder.calls] == ["success"] * 3
        assert recorder.calls[0][1] >= 0.04  # both attempts of the first call
        status = resilient.retry_budgets()["p"].get_status()
        assert (status["calls"], status["retries"]) == (3, 1)  # one deposit per call

    def test_sync_one_observation_and_one_deposit_per_call(self, recorder: Recorder) -> None:
        load(p=RETRYING)
        fail_next = [False, True, False]  # the second call fails once, then succeeds

        @resilient.resilient("p")
        def work() -> str:
            if fail_next.pop(0):
                raise ConnectionError("blip")
            return "ok"

        assert work() == "ok"  # the first call builds the pipeline (the long way round)
        assert work() == "ok"  # the first-attempt lane, then the loop's retry
        assert fail_next == []
        assert [outcome for outcome, _ in recorder.calls] == ["success", "success"]
        status = resilient.retry_budgets()["p"].get_status()
        assert (status["calls"], status["retries"]) == (2, 1)

    async def test_a_cancelled_first_attempt_is_observed_and_gives_everything_back(
        self, recorder: Recorder
    ) -> None:
        load(p=RETRYING)
        started = asyncio.Event()

        @resilient.resilient("p")
        async def hang() -> None:
            started.set()
            await asyncio.sleep(10)

        task = asyncio.ensure_future(hang())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [outcome for outcome, _ in recorder.calls] == ["cancelled"]
        assert recorder.errors == ["CancelledError"]  # as run_async reports it
        assert resilient.bulkhead_manager.bulkheads()["p"].get_status()["in_use"] == 0
        assert get_breaker("p").get_status()["totals"]["failures"] == 0

    async def test_a_refused_first_attempt_is_retried_by_the_loop(self, recorder: Recorder) -> None:
        load(p={**RETRYING, "retry": {**RETRYING["retry"], "retry_on": ["CircuitOpenError"]}})
        calls = 0

        @resilient.resilient("p")
        async def work() -> str:
            nonlocal calls
            calls += 1
            return "ok"

        breaker = get_breaker("p")
        breaker.force_open()
        with pytest.raises(CircuitOpenError):
            await work()
        assert calls == 0
        assert [outcome for outcome, _ in recorder.calls] == ["rejected"]
        breaker.normal()
        assert await work() == "ok"

    async def test_a_total_budget_ending_the_first_attempt_reaches_the_fallback(
        self, recorder: Recorder
    ) -> None:
        """The lane arms a total budget shorter than the attempt's; its end is the loop's."""
        load(
            p={
                "circuit_breaker": {"failure_threshold": 100},
                "timeout": {"per_attempt": 5.0, "total": 0.05},
                "fallback": {"value": "cached"},
            }
        )

        @resilient.resilient("p")
        async def hang() -> str:
            await asyncio.sleep(10)
            return "late"

        from resilient.pipeline import LANE_FIRST

        assert hang.__resilient_handle__.get().lane == LANE_FIRST  # type: ignore[attr-defined]
        assert await hang() == "cached"
        assert [outcome for outcome, _ in recorder.calls] == ["fallback"]
        # the cut attempt counts as a timeout for the breaker, as in the loop
        assert get_breaker("p").get_status()["totals"]["failures"] == 1

"""Hedged requests (the ``hedge:`` section), through the public API, in virtual time."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import load

import resilient
from resilient.events import HedgeStarted, RetryScheduled
from resilient.hedge import hedgers
from resilient.pipeline import LANE_FULL, Pipeline
from resilient.testing import VirtualClock, capture_events

_CLOCK: list[VirtualClock] = []


@pytest.fixture(autouse=True)
def _virtual_time(virtual_clock: VirtualClock) -> None:
    _CLOCK[:] = [virtual_clock]


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run *main* on a loop of the test's virtual clock (installed for the whole test)."""
    return _CLOCK[0].run(main)


class Backend:
    """A dependency whose n-th request (from 1) takes ``latencies[n-1]`` seconds."""

    def __init__(
        self, *latencies: float, fail: Callable[[int], BaseException | None] = lambda n: None
    ) -> None:
        self.latencies = latencies
        self.fail = fail
        self.started: list[tuple[int, float]] = []  # (request, start time)
        self.cancelled: list[int] = []
        self.finished: list[int] = []

    async def __call__(self) -> str:
        loop = asyncio.get_running_loop()
        n = len(self.started) + 1
        self.started.append((n, loop.time()))
        latency = self.latencies[min(n, len(self.latencies)) - 1]
        try:
            await asyncio.sleep(latency)
        except asyncio.CancelledError:
            self.cancelled.append(n)
            raise
        finally:
            self.finished.append(n)
        error = self.fail(n)
        if error is not None:
            raise error
        return f"answer {n}"


def hedged(backend: Backend, policy: str = "p") -> Callable[[], Awaitable[str]]:
    @resilient.resilient(policy)
    async def call() -> str:
        return await backend()

    return call


T = TypeVar("T")
NO_RETRY = {"max_attempts": 1, "timeout": None, "per_attempt_timeout": None}


# --------------------------------------------------------------------------- the basics


def test_a_slow_first_attempt_is_overtaken_by_the_hedge() -> None:
    load(p={"hedge": {"delay": 0.1}})
    backend = Backend(1.0, 0.05)
    call = hedged(backend)

    async def main() -> tuple[str, float]:
        with capture_events() as events:
            answer = await call()
        assert [type(e) for e in events] == [HedgeStarted]
        event = events[0]
        assert (event.policy, event.hedge, event.reason) == ("p", 1, "delay")
        assert event.after == pytest.approx(0.1)
        return answer, asyncio.get_running_loop().time()

    answer, ended = run(main())
    assert answer == "answer 2"
    assert ended == pytest.approx(0.15)
    assert [start for _, start in backend.started] == pytest.approx([0.0, 0.1])
    # the first attempt was cancelled, and its cancellation finished before the call returned
    assert backend.cancelled == [1]
    assert sorted(backend.finished) == [1, 2]


def test_an_answer_before_the_delay_costs_no_hedge() -> None:
    load(p={"hedge": {"delay": 0.1}})
    backend = Backend(0.05)
    call = hedged(backend)

    async def main() -> str:
        with capture_events() as events:
            answer = await call()
        assert list(events) == []
        await asyncio.sleep(1)  # the hedge timer is gone: nothing starts later
        return answer

    assert run(main()) == "answer 1"
    assert len(backend.started) == 1
    assert hedgers()["p"].started == 0


def test_delay_zero_starts_every_attempt_at_once() -> None:
    load(p={"hedge": {"delay": 0, "max_hedged_attempts": 2}})
    backend = Backend(0.3, 0.2, 0.1)
    assert run(hedged(backend)()) == "answer 3"
    assert [start for _, start in backend.started] == [0.0, 0.0, 0.0]
    assert sorted(backend.cancelled) == [1, 2]


def test_hedges_are_spaced_by_the_delay() -> None:
    load(p={"hedge": {"delay": 0.1, "max_hedged_attempts": 3}})
    backend = Backend(1.0, 1.0, 1.0, 0.01)
    assert run(hedged(backend)()) == "answer 4"
    assert [start for _, start in backend.started] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_max_hedged_attempts_bounds_a_call() -> None:
    load(p={"hedge": {"delay": 0.1, "max_hedged_attempts": 1}})
    backend = Backend(1.0, 2.0)
    assert run(hedged(backend)()) == "answer 1"  # the first attempt ends first after all
    assert len(backend.started) == 2
    assert backend.cancelled == [2]


def test_a_quantile_delay_follows_the_observed_latency() -> None:
    load(p={"hedge": {"delay": "p50", "min_delay": 0.01, "max_delay": 1.0}})
    backend = Backend(*([0.2] * 40 + [0.04] * 100))
    call = hedged(backend)

    async def main() -> list[float]:
        delays = []
        for _ in range(100):
            await call()
            delays.append(hedgers()["p"].current)
        return delays

    delays = run(main())
    assert delays[0] == 1.0  # the cap until enough latencies were seen
    assert delays[39] == pytest.approx(0.2)  # the median of what it saw
    assert delays[-1] == pytest.approx(0.04)  # and it follows a change


def test_a_quantile_delay_keeps_within_floor_and_cap() -> None:
    load(p={"hedge": {"delay": "p99", "min_delay": 0.05, "max_delay": 0.5}})
    backend = Backend(*([0.001] * 30))
    call = hedged(backend)

    async def main() -> float:
        for _ in range(30):
            await call()
        return hedgers()["p"].current

    assert run(main()) == 0.05


def test_a_quantile_delay_that_moves_down_hedges_at_once_after_the_move() -> None:
    # The cap (1 s) is in force for the first 20 calls: each armed the policy's
    # timer for 1 s after its start, and answered long before. When the estimate
    # moves down to 20 ms, the next slow call must hedge after 20 ms, not when the
    # timer armed for the earlier calls fires.
    load(p={"hedge": {"delay": "p50", "min_delay": 0.01, "max_delay": 1.0}})
    backend = Backend(*([0.02] * 20 + [2.0, 0.01]))
    call = hedged(backend)

    async def main() -> tuple[str, float, list[HedgeStarted]]:
        for _ in range(20):
            await call()
        assert hedgers()["p"].current == pytest.approx(0.02)
        loop = asyncio.get_running_loop()
        began = loop.time()
        with capture_events() as events:
            answer = await call()
        return answer, loop.time() - began, [e for e in events if isinstance(e, HedgeStarted)]

    answer, took, hedges = run(main())
    assert answer == "answer 22"
    assert [h.after for h in hedges] == [pytest.approx(0.02)]
    assert took == pytest.approx(0.03)


def test_a_hedge_runs_in_its_own_callers_context() -> None:
    # Two calls of one policy share its hedge timer, armed by the first call: the
    # second call's hedge must still see the second caller's contextvars.
    load(p={"hedge": {"delay": 0.05}})
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    seen: list[tuple[str, float]] = []

    @resilient.resilient("p")
    async def call(latency: float) -> str:
        seen.append((request_id.get(), latency))
        await asyncio.sleep(latency)
        return request_id.get()

    async def caller(name: str, latency: float, after: float) -> str:
        await asyncio.sleep(after)
        request_id.set(name)
        return await call(latency)

    async def main() -> list[str]:
        return await asyncio.gather(caller("A", 0.01, 0.0), caller("B", 0.2, 0.001))

    assert run(main()) == ["A", "B"]
    assert seen == [("A", 0.01), ("B", 0.2), ("B", 0.2)]  # the hedge of B, as B


# --------------------------------------------------------------------------- failures


def test_on_failure_starts_the_next_hedge_at_once() -> None:
    load(p={"hedge": {"delay": 1.0, "on_failure": True}})
    backend = Backend(0.01, 0.02, fail=lambda n: ConnectionError("down") if n == 1 else None)

    async def main() -> tuple[str, float]:
        with capture_events() as events:
            answer = await hedged(backend)()
        assert [(type(e), e.reason) for e in events] == [(HedgeStarted, "failure")]
        return answer, asyncio.get_running_loop().time()

    answer, ended = run(main())
    assert answer == "answer 2"
    assert ended == pytest.approx(0.03)


def test_without_on_failure_a_failure_is_the_retry_loops_business() -> None:
    load(p={"hedge": {"delay": 1.0}})
    backend = Backend(0.01, fail=lambda n: ConnectionError("down"))
    with pytest.raises(ConnectionError, match="down"):
        run(hedged(backend)())
    assert len(backend.started) == 1


def test_a_failed_attempt_waits_for_the_hedge_still_running() -> None:
    load(p={"hedge": {"delay": 0.1}})
    # the first attempt fails at 0.3, the hedge (started at 0.1) answers at 0.5
    backend = Backend(0.3, 0.4, fail=lambda n: ConnectionError("down") if n == 1 else None)
    assert run(hedged(backend)()) == "answer 2"


def test_when_every_attempt_fails_the_last_failure_is_raised() -> None:
    load(p={"hedge": {"delay": 0.1}})
    backend = Backend(0.3, 0.4, fail=lambda n: ConnectionError(f"down {n}"))
    with pytest.raises(ConnectionError, match="down 2"):
        run(hedged(backend)())


def test_an_error_the_retry_policy_would_not_retry_is_an_answer() -> None:
    load(
        p={
            "hedge": {"delay": 0.1},
            "retry": {**NO_RETRY, "max_attempts": 3, "retry_on": ["ConnectionError"]},
        }
    )
    backend = Backend(1.0, 0.05, fail=lambda n: KeyError("gone") if n == 2 else None)
    with pytest.raises(KeyError, match="gone"):
        run(hedged(backend)())
    assert backend.cancelled == [1]


def test_a_result_retry_if_result_rejects_is_not_an_answer() -> None:
    policy = resilient.Policy.model_validate(
        {
            "hedge": {"delay": 0.1},
            "retry": {**NO_RETRY, "max_attempts": 1, "retry_if_result": lambda r: r == "answer 2"},
        }
    )
    backend = Backend(0.3, 0.05)

    @resilient.resilient(policy)
    async def call() -> str:
        return await backend()

    assert run(call()) == "answer 1"  # the hedge answered first, but not acceptably


# --------------------------------------------------------------------------- composition


def test_retries_compose_a_failed_group_is_retried() -> None:
    load(
        p={
            "hedge": {"delay": 0.1},
            "retry": {**NO_RETRY, "max_attempts": 2, "base_delay": 0.5, "jitter": False},
        }
    )
    backend = Backend(0.3, 0.05, 0.01, fail=lambda n: ConnectionError("down") if n < 3 else None)

    async def main() -> str:
        with capture_events() as events:
            answer = await hedged(backend)()
        assert [type(e) for e in events] == [HedgeStarted, RetryScheduled]
        return answer

    assert run(main()) == "answer 3"
    assert [start for _, start in backend.started] == pytest.approx([0.0, 0.1, 0.8])


def test_losers_give_back_their_slots_and_breaker_permits() -> None:
    load(
        p={
            "hedge": {"delay": 0.1},
            "circuit_breaker": {"failure_threshold": 5, "timeout_seconds": 30},
            "bulkhead": {"max_concurrent_requests": 5, "enable_auto_scaling": False},
        }
    )
    backend = Backend(1.0, 0.05)
    assert run(hedged(backend)()) == "answer 2"
    assert resilient.bulkhead_manager.bulkheads()["p"].get_status()["in_use"] == 0
    totals = resilient.get_breaker("p").get_status()["totals"]
    assert (totals["successes"], totals["failures"]) == (1, 0)  # the loser counted nothing


def test_a_cancelled_caller_cancels_every_attempt() -> None:
    load(
        p={
            "hedge": {"delay": 0.1},
            "bulkhead": {"max_concurrent_requests": 5, "enable_auto_scaling": False},
        }
    )
    backend = Backend(10.0, 10.0)
    call = hedged(backend)

    async def main() -> None:
        task = asyncio.ensure_future(call())
        await asyncio.sleep(0.5)
        assert resilient.bulkhead_manager.bulkheads()["p"].get_status()["in_use"] == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(backend.cancelled) == [1, 2]

    run(main())
    assert resilient.bulkhead_manager.bulkheads()["p"].get_status()["in_use"] == 0


def test_each_attempt_has_its_own_deadline() -> None:
    load(
        p={
            "hedge": {"delay": 0.1},
            "timeout": {"per_attempt": 0.5},
            "circuit_breaker": {"failure_threshold": 5, "timeout_seconds": 30},
        }
    )
    backend = Backend(10.0, 10.0)

    async def main() -> float:
        with pytest.raises(resilient.AttemptTimeoutError):
            await hedged(backend)()
        return asyncio.get_running_loop().time()

    assert run(main()) == pytest.approx(0.6)  # the hedge's own deadline: 0.1 + 0.5
    assert resilient.get_breaker("p").get_status()["totals"]["failures"] == 2


def test_the_total_timeout_ends_the_whole_group() -> None:
    load(p={"hedge": {"delay": 0.1}, "timeout": {"total": 0.3}})
    backend = Backend(10.0, 10.0)
    with pytest.raises(resilient.AttemptTimeoutError) as caught:
        run(hedged(backend)())
    assert caught.value.kind == "total"
    assert sorted(backend.cancelled) == [1, 2]


def test_an_open_breaker_refuses_the_hedge_too() -> None:
    load(
        p={
            "hedge": {"delay": 0.1},
            "circuit_breaker": {"failure_threshold": 1, "timeout_seconds": 30},
        }
    )
    backend = Backend(0.3)
    call = hedged(backend)

    async def main() -> str:
        async def trip() -> None:
            await asyncio.sleep(0.05)
            resilient.get_breaker("p").open()

        tripping = asyncio.ensure_future(trip())
        answer = await call()
        await tripping
        return answer

    assert run(main()) == "answer 1"  # the hedge was refused; the first attempt answered
    assert len(backend.started) == 1


# --------------------------------------------------------------------------- load guards


def test_the_load_guard_stops_hedging_a_struggling_dependency() -> None:
    load(p={"hedge": {"delay": 0.01, "max_load_amplification": 1.2}})
    backend = Backend(0.1)  # every request is slower than the delay
    call = hedged(backend)

    async def main() -> None:
        await asyncio.gather(*(call() for _ in range(30)))  # a burst
        for _ in range(200):
            await call()

    run(main())
    hedger = hedgers()["p"]
    # the burst allowance (10 hedges) at once, then 0.2 hedge per call of the 200 after it
    assert 10 + 39 <= hedger.started <= 10 + 40
    assert hedger.started + hedger.refused == 230
    assert len(backend.started) == 230 + hedger.started


def test_hedges_draw_on_the_retry_budget() -> None:
    load(
        p={
            "hedge": {"delay": 0.01, "max_load_amplification": None},
            "retry": {
                **NO_RETRY,
                "budget": {"ratio": 0.1, "min_retries_per_second": 0, "max_tokens": 2},
            },
        }
    )
    backend = Backend(0.1)
    call = hedged(backend)

    async def main() -> None:
        for _ in range(20):
            await call()

    run(main())
    # the bucket starts with 2 tokens and each call deposits 0.1
    assert hedgers()["p"].started == 3
    assert resilient.retry_budgets()["p"].get_status()["retries"] == 3


def test_a_hedge_the_budget_refuses_costs_the_load_guard_nothing() -> None:
    load(
        p={
            "hedge": {"delay": 0.01, "max_load_amplification": 1.2},
            "retry": {
                **NO_RETRY,
                "budget": {"ratio": 0, "min_retries_per_second": 0, "max_tokens": 2},
            },
        }
    )
    backend = Backend(0.1)
    call = hedged(backend)

    async def main() -> None:
        for _ in range(20):
            await call()

    run(main())
    hedger = hedgers()["p"]
    assert (hedger.started, hedger.refused) == (2, 18)  # the budget's two tokens
    assert hedger.guard is not None
    guard = hedger.guard.get_status()
    # the 18 refusals took no guard token: it spent 2 and refilled (0.2 a call, cap 10)
    assert guard["refused"] == 0
    assert guard["tokens"] == pytest.approx(10.0)


def test_a_hedge_refused_after_waiting_for_a_slot_gives_its_tokens_back() -> None:
    load(
        p={
            "hedge": {"delay": 0.01, "max_load_amplification": 1.2},
            "bulkhead": {
                "max_concurrent_requests": 1,
                "acquire_timeout": 0.05,
                "enable_auto_scaling": False,
            },
            "retry": {
                **NO_RETRY,
                "budget": {"ratio": 0, "min_retries_per_second": 0, "max_tokens": 3},
            },
        }
    )
    backend = Backend(0.2)  # holds the one slot; each hedge waits 50 ms for it in vain
    call = hedged(backend)

    async def main() -> None:
        for n in range(1, 6):
            assert await call() == f"answer {n}"  # the first attempt each time

    run(main())
    hedger = hedgers()["p"]
    assert (hedger.started, hedger.refused) == (0, 5)
    assert len(backend.started) == 5
    # nothing was sent, so nothing was spent: the budget (3 tokens) still has them all
    assert resilient.retry_budgets()["p"].get_status()["tokens"] == 3.0
    assert hedger.guard is not None
    assert hedger.guard.get_status()["tokens"] == pytest.approx(10.0)


# --------------------------------------------------------------------------- observability


def test_hedges_are_counted_in_prometheus() -> None:
    from prometheus_client import CollectorRegistry

    from resilient.metrics import PrometheusMetrics

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    metrics.install()
    try:
        load(p={"hedge": {"delay": 0.1, "max_hedged_attempts": 2}})
        assert run(hedged(Backend(1.0, 1.0, 0.01))()) == "answer 3"
        assert registry.get_sample_value("resilient_hedges_total", {"policy": "p"}) == 2
    finally:
        metrics.uninstall()


def test_a_hedged_policy_takes_the_full_lane_and_others_keep_theirs() -> None:
    with_hedge = resilient.Policy.model_validate({"hedge": {"delay": 0.1}})
    assert Pipeline(with_hedge, name="a").lane == LANE_FULL
    plain = Pipeline(resilient.Policy.model_validate({}), name="b")
    assert plain.hedge is None
    assert plain.lane != LANE_FULL


# --------------------------------------------------------------------------- sync and errors


def test_a_sync_function_without_a_thread_pool_is_a_policy_error() -> None:
    load(p={"hedge": {"delay": 0.1}})

    @resilient.resilient("p")
    def lookup() -> str:
        return "x"

    with pytest.raises(resilient.PolicyError, match=r"'p'.*isolation: thread_pool"):
        lookup()
    with pytest.raises(resilient.PolicyError, match="make the function async"):
        resilient.call("p", lambda: "x")


def test_a_staged_sync_function_without_a_thread_pool_is_refused_on_every_call() -> None:
    """After the first call, the sync wrapper's lane must not skip the refusal."""
    load(p={"hedge": {"delay": 0.1}, "circuit_breaker": {"failure_threshold": 5}})

    @resilient.resilient("p")
    def lookup() -> str:
        return "x"

    for _ in range(3):
        with pytest.raises(resilient.PolicyError, match=r"'p'.*isolation: thread_pool"):
            lookup()


def test_a_sync_function_is_hedged_in_the_thread_pool() -> None:
    load(
        p={
            "hedge": {"delay": 0.01},
            "bulkhead": {"isolation": "thread_pool", "max_concurrent_requests": 4},
            "circuit_breaker": {"failure_threshold": 5, "timeout_seconds": 30},
        }
    )
    release = threading.Event()
    calls: list[int] = []
    lock = threading.Lock()

    @resilient.resilient("p")
    def lookup() -> str:
        with lock:
            calls.append(len(calls) + 1)
            n = len(calls)
        if n == 1:
            release.wait(10)  # the first attempt hangs until the test lets it go
            return "late"
        return "hedge"

    with capture_events() as events:
        assert lookup() == "hedge"
    release.set()
    assert [type(e) for e in events] == [HedgeStarted]
    totals = resilient.get_breaker("p").get_status()["totals"]
    assert (totals["successes"], totals["failures"]) == (1, 0)


def test_a_sync_first_attempt_that_lost_counts_for_the_quantile() -> None:
    # As in async: the first attempt that a hedge overtook is recorded with the
    # time it had run, or `delay: pNN` would only ever see the fast first attempts.
    load(
        p={
            "hedge": {"delay": "p50", "max_delay": 0.01},
            "bulkhead": {"isolation": "thread_pool", "max_concurrent_requests": 4},
        }
    )
    release = threading.Event()
    calls: list[int] = []

    @resilient.resilient("p")
    def lookup() -> str:
        calls.append(1)
        if len(calls) == 1:
            release.wait(10)
            return "late"
        return "hedge"

    try:
        assert lookup() == "hedge"
    finally:
        release.set()
    assert hedgers()["p"].get_status()["samples"] == 1


def test_a_sync_hedge_waiting_for_admission_does_not_hold_the_caller() -> None:
    # The hedge must wait 1 s for a rate-limit token (max_wait). The first attempt
    # answers meanwhile: the caller gets it at once (the wait is the hedge's, in a
    # thread of its own), and the hedge, admitted after the call, gives back unrun.
    # Real time: the limiter's wait is a real sleep here (virtual time skips it).
    _CLOCK[0].uninstall()
    try:
        load(
            p={
                "hedge": {"delay": 0.01},
                "bulkhead": {"isolation": "thread_pool", "max_concurrent_requests": 4},
                "rate_limit": {"max_rate": 1, "time_period": 1.0, "max_wait": 5},
                "circuit_breaker": {"failure_threshold": 5, "timeout_seconds": 30},
            }
        )
        calls: list[int] = []

        @resilient.resilient("p")
        def lookup() -> str:
            calls.append(1)
            for _ in range(500):  # answer once the hedge has started (and waits)
                if hedgers()["p"].started:
                    break
                threading.Event().wait(0.01)
            return "first"

        began = time.monotonic()
        assert lookup() == "first"
        took = time.monotonic() - began
        for admitter in [t for t in threading.enumerate() if t.name == "resilient-hedge-p"]:
            admitter.join(10)
        assert took < 0.5  # not the hedge's 1 s wait for its token
        assert calls == [1]  # the hedge never ran
        assert resilient.bulkhead_manager.bulkheads()["p"].get_status()["in_use"] == 0
        totals = resilient.get_breaker("p").get_status()["totals"]
        assert (totals["successes"], totals["failures"]) == (1, 0)
    finally:
        _CLOCK[0].install()


def test_a_sync_hedge_refused_after_waiting_gives_its_tokens_back() -> None:
    # Real time: the bulkhead's wait for a slot is a real wait in the hedge's thread.
    _CLOCK[0].uninstall()
    try:
        load(
            p={
                "hedge": {"delay": 0.01, "max_load_amplification": 1.2},
                "bulkhead": {
                    "isolation": "thread_pool",
                    "max_concurrent_requests": 1,
                    "acquire_timeout": 0.02,
                    "enable_auto_scaling": False,
                },
                "retry": {
                    **NO_RETRY,
                    "budget": {"ratio": 0, "min_retries_per_second": 0, "max_tokens": 3},
                },
            }
        )
        calls: list[int] = []

        @resilient.resilient("p")
        def lookup() -> str:
            calls.append(1)
            threading.Event().wait(0.15)  # holds the one slot past the hedge's wait
            return "first"

        for _ in range(3):
            assert lookup() == "first"
        for admitter in [t for t in threading.enumerate() if t.name == "resilient-hedge-p"]:
            admitter.join(10)
        hedger = hedgers()["p"]
        assert (hedger.started, hedger.refused) == (0, 3)
        assert calls == [1, 1, 1]
        assert resilient.retry_budgets()["p"].get_status()["tokens"] == 3.0
        assert hedger.guard is not None
        assert hedger.guard.get_status()["tokens"] == pytest.approx(10.0)
    finally:
        _CLOCK[0].install()


def test_a_delay_that_is_neither_seconds_nor_a_quantile_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "resilience.yaml"
    path.write_text("version: 1\npolicies:\n  api:\n    hedge:\n      delay: fastest\n")
    with pytest.raises(resilient.PolicyError) as caught:
        resilient.load_policies(path)
    message = str(caught.value)
    assert "resilience.yaml:5" in message
    assert "pNN" in message


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"delay": -1}, "delay"),
        ({"delay": "p100"}, "delay"),
        ({"delay": "p999"}, r"got 'p999' \(did you mean 'p99\.9'\?\)"),
        ({"delay": "p9999"}, r"did you mean 'p99\.99'"),
        ({"max_hedged_attempts": 0}, "max_hedged_attempts"),
        ({"max_hedged_attempts": 1_000_000}, "less than or equal to 10"),
        ({"min_delay": 2, "max_delay": 1}, "min_delay"),
        ({"max_load_amplification": 1}, "max_load_amplification"),
        ({"dealy": 0.1}, "delay"),
    ],
)
def test_bad_hedge_sections_are_refused(section: dict[str, Any], needle: str) -> None:
    with pytest.raises(resilient.PolicyError, match=needle):
        load(p={"hedge": section})


def test_the_simulator_counts_hedges_and_shows_the_tail_cut() -> None:
    from resilient.testing import Latency, Scenario, simulate
    from resilient.testing._scenario import Conditions

    heavy_tail = Scenario("heavy_tail", Conditions(0.0, Latency(0.01, 1.0)))
    plain = simulate(resilient.Policy(), heavy_tail, duration=60, rate=100, seed=3)
    hedged = simulate(
        resilient.Policy.model_validate({"hedge": {"delay": "p95", "max_delay": 5}}),
        heavy_tail,
        duration=60,
        rate=100,
        seed=3,
    )
    assert plain.hedged == 0
    assert 0 < hedged.hedged < 0.1 * hedged.attempted
    assert hedged.backend_calls == hedged.attempted + hedged.hedged
    assert hedged.latency.p99 < plain.latency.p99 / 2
    assert "hedges started" in hedged.summary()


def test_the_fallback_sees_the_groups_outcome() -> None:
    load(p={"hedge": {"delay": 0.1}, "fallback": {"value": "cached"}})
    backend = Backend(0.3, 0.3, fail=lambda n: ConnectionError(f"down {n}"))
    assert run(hedged(backend)()) == "cached"
    assert len(backend.started) == 2


def test_a_caller_cancelled_before_the_delay_starts_no_hedge_later() -> None:
    load(p={"hedge": {"delay": 0.1}})
    backend = Backend(10.0)
    call = hedged(backend)

    async def main() -> None:
        task = asyncio.ensure_future(call())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1)  # past the delay: the armed hedge must not start

    run(main())
    assert len(backend.started) == 1
    assert hedgers()["p"].started == 0


def test_a_full_window_is_sorted_at_most_once_per_refresh_period() -> None:
    """A busy service re-estimates its pNN delay at most every REFRESH_SECONDS."""
    from resilient._models import HedgeConfig
    from resilient.hedge import REFRESH_SECONDS, WINDOW, Hedger

    with VirtualClock() as clock:
        hedger = Hedger("p", HedgeConfig(delay="p50", min_delay=0.001, max_delay=10.0))
        for _ in range(WINDOW):
            hedger.record(0.01)
        assert hedger.current == pytest.approx(0.01)
        for _ in range(2 * WINDOW):  # a change, all within one refresh period
            hedger.record(0.5)
        assert hedger.current == pytest.approx(0.01)  # not yet: sorted once, before it
        clock.advance(REFRESH_SECONDS)
        for _ in range(WINDOW // 5):  # the next count step after the period
            hedger.record(0.5)
        assert hedger.current == pytest.approx(0.5)  # followed as soon as allowed

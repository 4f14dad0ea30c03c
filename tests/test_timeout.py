"""Time budgets: per-attempt and total, cancellation, and the deadline queue itself."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import pytest
from conftest import NO_TIMEOUTS, load

import resilient
from resilient import AttemptTimeoutError
from resilient.timeout import deadline_queue, settle


class TestAsyncTimeouts:
    async def test_per_attempt_timeout_raises(self) -> None:
        """A slow attempt is cancelled and becomes AttemptTimeoutError (also a TimeoutError)."""
        load(p={"timeout": {"per_attempt": 0.05}})

        @resilient.resilient("p")
        async def slow() -> None:
            await asyncio.sleep(5)

        started = time.monotonic()
        with pytest.raises(AttemptTimeoutError) as info:
            await slow()
        assert time.monotonic() - started < 1.0
        assert isinstance(info.value, TimeoutError)
        assert info.value.kind == "per_attempt"
        assert info.value.timeout == 0.05
        assert info.value.policy == "p"

    async def test_per_attempt_timeout_is_retried(self) -> None:
        """A timed-out attempt is retried (TimeoutError is transient)."""
        load(
            p={
                "retry": {"max_attempts": 3, "base_delay": 0, **NO_TIMEOUTS},
                "timeout": {"per_attempt": 0.05},
            }
        )
        calls = 0

        @resilient.resilient("p")
        async def slow_then_fast() -> str:
            nonlocal calls
            calls += 1
            if calls < 3:
                await asyncio.sleep(5)
            return "ok"

        assert await slow_then_fast() == "ok"
        assert calls == 3

    async def test_total_timeout(self) -> None:
        """The total budget covers every attempt and sleep."""
        load(
            p={
                "retry": {"max_attempts": 100, "base_delay": 0.01, "jitter": False},
                "timeout": {"total": 0.2},
            }
        )
        calls = 0

        @resilient.resilient("p")
        async def failing() -> None:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.03)
            raise ConnectionError

        started = time.monotonic()
        with pytest.raises((AttemptTimeoutError, ConnectionError)):
            await failing()
        assert time.monotonic() - started < 0.5
        assert 2 <= calls < 100

    async def test_total_timeout_cancels_running_attempt(self) -> None:
        """When the total budget ends during an attempt, the attempt is cancelled."""
        load(p={"timeout": {"total": 0.05}})

        @resilient.resilient("p")
        async def hang() -> None:
            await asyncio.sleep(10)

        with pytest.raises(AttemptTimeoutError) as info:
            await hang()
        assert info.value.kind == "total"

    async def test_total_budget_from_the_call_start_when_armed_at_the_first_retry(
        self,
    ) -> None:
        """
        With a shorter per-attempt budget the total one is armed at the first
        retry: it still counts from the start of the call, covers the backoff
        sleep and cuts the running attempt short.
        """
        load(
            p={
                "retry": {"max_attempts": 100, "base_delay": 0.05, "jitter": False},
                "timeout": {"per_attempt": 0.1, "total": 0.25},
                "circuit_breaker": {"failure_threshold": 1000},
            }
        )
        calls: list[float] = []

        @resilient.resilient("p")
        async def slow() -> None:
            calls.append(time.monotonic())
            await asyncio.sleep(10)

        started = time.monotonic()
        with pytest.raises(AttemptTimeoutError) as info:
            await slow()
        took = time.monotonic() - started
        assert info.value.kind == "total"
        assert 0.24 <= took < 0.5  # 0.1 + 0.05 sleep + the second attempt cut at 0.25
        assert len(calls) == 2
        status = resilient.get_breaker("p").get_status()
        assert status["totals"]["failures"] == 2  # both cut attempts count as timeouts
        await asyncio.sleep(0.3)  # no timer of the total budget is left to fire later

    async def test_total_budget_covers_the_wait_for_a_bulkhead_slot(self) -> None:
        """A call waiting for admission arms the total budget before it waits."""
        load(
            p={
                "bulkhead": {
                    "max_concurrent_requests": 1,
                    "acquire_timeout": 10,
                    "enable_auto_scaling": False,
                },
                "timeout": {"per_attempt": 0.5, "total": 1.0},
            },
        )
        release = asyncio.Event()

        @resilient.resilient("p")
        async def holder() -> None:
            try:
                await release.wait()
            except asyncio.CancelledError:  # ignores its deadline: keeps the slot
                await release.wait()
                raise

        @resilient.resilient("p")
        async def waiter() -> str:
            return "ran"

        held = asyncio.ensure_future(holder())
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(AttemptTimeoutError) as info:
            await waiter()
        assert info.value.kind == "total"
        assert 0.9 <= time.monotonic() - started < 1.5
        release.set()
        with pytest.raises(AttemptTimeoutError):
            await held
        assert await waiter() == "ran"  # the slot came back, no budget left armed

    async def test_a_first_attempt_success_arms_no_total_budget(self) -> None:
        """The common case: the first attempt succeeds, the total budget is never armed."""
        load(p={"timeout": {"per_attempt": 0.5, "total": 1.0}})

        @resilient.resilient("p")
        async def fast() -> str:
            return "ok"

        assert await fast() == "ok"
        _, pipeline = fast.__resilient_handle__.state  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        assert pipeline.total_late
        assert not pipeline.total_queues.get(loop).queue  # nothing armed for the total
        assert len(pipeline.per_attempt_queues.get(loop).queue) == 1  # the attempt's

    async def test_timeout_feeds_fallback(self) -> None:
        """A timeout is an exception like any other for the fallback."""
        load(p={"timeout": {"per_attempt": 0.02}})

        @resilient.resilient("p", fallback=lambda exc: type(exc).__name__)
        async def hang() -> str:
            await asyncio.sleep(10)
            return "never"

        assert await hang() == "AttemptTimeoutError"

    async def test_fast_calls_not_cancelled(self) -> None:
        """Thousands of fast calls under a budget never time out and leave no timers behind."""
        load(p={"timeout": {"per_attempt": 0.5, "total": 1.0}})

        @resilient.resilient("p")
        async def fast(i: int) -> int:
            await asyncio.sleep(0)
            return i

        results = await asyncio.gather(*(fast(i) for i in range(2000)))
        assert results == list(range(2000))

    async def test_external_cancel_passes_through(self) -> None:
        """A cancel from outside is not turned into a timeout, and frees the breaker permit."""
        load(
            p={
                "timeout": {"per_attempt": 5},
                "circuit_breaker": {"failure_threshold": 1},
                "retry": {"max_attempts": 3, **NO_TIMEOUTS},
            }
        )
        started = asyncio.Event()

        @resilient.resilient("p")
        async def hang() -> None:
            started.set()
            await asyncio.sleep(10)

        task = asyncio.create_task(hang())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        breaker = resilient.get_breaker("p")
        assert breaker.state == "closed"  # cancellation is not a failure

    async def test_swallowed_cancel_is_undone(self) -> None:
        """A function that swallows the timeout's cancel leaves the task uncancelled."""
        load(p={"timeout": {"per_attempt": 0.02}})

        @resilient.resilient("p")
        async def stubborn() -> str:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return "swallowed"
            return "never"

        assert await stubborn() == "swallowed"
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0

    async def test_nested_timeouts(self) -> None:
        """An inner resilient call's timeout does not leak into the outer one."""
        load(inner={"timeout": {"per_attempt": 0.02}}, outer={"timeout": {"per_attempt": 1}})

        @resilient.resilient("inner", fallback=lambda exc: "inner-fallback")
        async def inner() -> str:
            await asyncio.sleep(10)
            return "never"

        @resilient.resilient("outer")
        async def outer() -> str:
            return await inner()

        assert await outer() == "inner-fallback"


class TestSyncTimeouts:
    def test_sync_total_budget_between_attempts(self) -> None:
        """For sync functions no new attempt starts after the total budget."""
        load(p={"retry": {"max_attempts": 50, "base_delay": 0, "timeout": 0.1}})
        calls = 0

        @resilient.resilient("p")
        def slowly_failing() -> None:
            nonlocal calls
            calls += 1
            time.sleep(0.03)
            raise ConnectionError

        with pytest.raises(ConnectionError):
            slowly_failing()
        assert 3 <= calls <= 5


class TestDeadlineQueue:
    async def test_fires_in_order_and_rearms(self) -> None:
        """Only live, expired entries are cancelled; finished ones are dropped."""
        loop = asyncio.get_running_loop()
        cache = deadline_queue(0.02)

        async def sleeper(done_early: bool) -> str:
            task = asyncio.current_task()
            assert task is not None
            entry = cache.arm(task)
            try:
                await asyncio.sleep(0 if done_early else 1)
            except asyncio.CancelledError as exc:
                assert settle(entry, exc)
                return "timed out"
            settle(entry, None)
            return "done"

        results = await asyncio.gather(*(sleeper(i % 2 == 0) for i in range(50)))
        assert results.count("done") == 25
        assert results.count("timed out") == 25
        await asyncio.sleep(0.05)
        assert len(cache.get(loop).queue) == 0

    async def test_queue_stays_bounded(self) -> None:
        """Sequential fast calls never let the queue grow."""
        loop = asyncio.get_running_loop()
        cache = deadline_queue(60)
        task: Any = asyncio.current_task()
        for _ in range(10_000):
            settle(cache.arm(task), None)
        assert len(cache.get(loop).queue) <= 1


class TestThreadsWithLoopsOfTheirOwn:
    def test_many_threads_each_with_its_own_loops(self) -> None:
        """
        Threads each running event loop after event loop through one policy's
        budgets, under a tiny switch interval: no KeyError or "dictionary
        changed size" from the per-loop queue cache, every call answers.
        """
        load(p={"timeout": {"per_attempt": 5.0, "total": 10.0}})

        @resilient.resilient("p")
        async def call(i: int) -> int:
            await asyncio.sleep(0)
            return i

        async def batch() -> int:
            results = await asyncio.gather(*(call(i) for i in range(3)))
            return sum(results)

        errors: list[BaseException] = []
        answered = [0]
        start = threading.Barrier(8)

        def body() -> None:
            # Ten loops open at once per thread, used in turn; one is replaced by
            # a new loop every other round, so the cache keeps meeting new loops
            # while it holds many (live and closed) of the other threads.
            runners = [asyncio.Runner() for _ in range(10)]
            start.wait()
            try:
                for round_ in range(800):
                    slot = round_ % len(runners)
                    try:
                        assert runners[slot].run(batch()) == 3
                    except BaseException as exc:  # collected and reported below
                        errors.append(exc)
                    else:
                        answered[0] += 1
                    if round_ % 2:
                        runners[slot].close()
                        runners[slot] = asyncio.Runner()
            finally:
                for runner in runners:
                    runner.close()

        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=body) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(previous)
        assert errors == []
        assert answered[0] == 8 * 800

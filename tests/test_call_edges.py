"""Edges of a call found by trying the library as a user and an attacker would (issue 10)."""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from conftest import Sleeps, load

import resilient
from resilient.events import CallRejected, RetriesExhausted, RetryScheduled, subscribe

RETRY = {"max_attempts": 3, "base_delay": 0.5, "jitter": False, "strategy": "constant"}


class TestRetryAfterHook:
    @pytest.mark.parametrize(
        "hint",
        ["soon", {"seconds": 2}, math.nan, -3.0, object()],
        ids=["word", "dict", "nan", "negative", "object"],
    )
    def test_a_useless_hint_is_ignored_and_the_users_error_survives(
        self, sleeps: Sleeps, hint: Any
    ) -> None:
        load(p={"retry": {**RETRY, "retry_after": lambda _exc: hint}})
        error = ConnectionError("down")

        @resilient.resilient("p")
        def f() -> None:
            raise error

        with pytest.raises(ConnectionError) as caught:
            f()
        assert caught.value is error
        assert sleeps == [0.5, 0.5]  # the policy's own backoff

    def test_http_dates_and_numeric_strings_are_understood(self, sleeps: Sleeps) -> None:
        when = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
        hints = iter([when, "1.5"])
        load(p={"retry": {**RETRY, "retry_after": lambda _exc: next(hints), "max_delay": 60}})

        @resilient.resilient("p")
        def f() -> None:
            raise ConnectionError

        with pytest.raises(ConnectionError):
            f()
        assert 1.5 < sleeps[0] <= 3.0
        assert sleeps[1] == 1.5

    def test_a_hook_that_raises_is_ignored(self, sleeps: Sleeps) -> None:
        def hook(_exc: BaseException) -> float:
            raise KeyError("bug in the hook")

        load(p={"retry": {**RETRY, "retry_after": hook}})

        @resilient.resilient("p")
        def f() -> None:
            raise ConnectionError

        with pytest.raises(ConnectionError):
            f()
        assert sleeps == [0.5, 0.5]


class TestRetriesRespectTheBreaker:
    POLICY = {  # noqa: RUF012
        "retry": {**RETRY, "max_attempts": 5},
        "circuit_breaker": {"failure_threshold": 2, "timeout_seconds": 30},
    }

    def test_no_sleep_into_an_open_breaker(self, sleeps: Sleeps) -> None:
        load(p=self.POLICY)
        events: list[Any] = []
        subscribe(events.append)
        calls = 0

        @resilient.resilient("p")
        def f() -> None:
            nonlocal calls
            calls += 1
            raise ConnectionError("down")

        with pytest.raises(ConnectionError) as caught:
            f()
        # two failures opened the breaker: the caller gets its own error at once
        assert calls == 2
        assert sleeps == [0.5]
        assert "gave up after 2 attempts (circuit_open)" in caught.value.__notes__[-1]
        exhausted = [e for e in events if isinstance(e, RetriesExhausted)]
        assert [e.reason for e in exhausted] == ["circuit_open"]

    async def test_async_too(self, sleeps: Sleeps) -> None:
        load(p=self.POLICY)

        @resilient.resilient("p")
        async def f() -> None:
            raise ConnectionError("down")

        with pytest.raises(ConnectionError):
            await f()
        assert sleeps == [0.5]

    def test_a_refused_call_is_one_rejected_event_and_no_warning(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        load(p=self.POLICY)
        resilient.get_breaker("p").open()
        events: list[Any] = []
        subscribe(events.append)

        @resilient.resilient("p")
        def f() -> None:
            raise AssertionError("not called")

        resilient.enable_logging()
        try:
            with caplog.at_level(logging.INFO, logger="resilient"):
                for _ in range(3):
                    with pytest.raises(resilient.CircuitOpenError):
                        f()
        finally:
            resilient.disable_logging()
        kinds = [type(e) for e in events]
        assert kinds == [CallRejected] * 3
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    def test_a_breaker_that_will_be_closed_by_then_is_waited_for(self, sleeps: Sleeps) -> None:
        load(
            p={
                "retry": {**RETRY, "base_delay": 5},
                "circuit_breaker": {"failure_threshold": 1, "timeout_seconds": 1},
            }
        )
        outcomes = iter([ConnectionError("blip"), "ok"])

        @resilient.resilient("p")
        def f() -> str:
            outcome = next(outcomes)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        # the breaker opens for 1 s, the retry waits 5 s: no reason to give up
        events: list[Any] = []
        subscribe(events.append)
        with pytest.raises((ConnectionError, resilient.CircuitOpenError)):
            f()  # sleeps are not real here, so the breaker is still open at attempt 2
        assert sleeps == [5]
        assert [e for e in events if isinstance(e, RetryScheduled)]


class TestCoroutinesWhereValuesBelong:
    def test_a_sync_function_returning_a_coroutine_is_an_error(self) -> None:
        load(p={"retry": RETRY})

        async def work() -> int:
            return 1

        @resilient.resilient("p")
        def f() -> Any:
            return work()

        with pytest.raises(TypeError, match="returned a coroutine"):
            f()
        with pytest.raises(TypeError, match="returned a coroutine"):
            resilient.call("p", lambda: work())

    async def test_an_async_callers_fallback_may_return_an_awaitable(self) -> None:
        load(p={"retry": {"max_attempts": 1}})

        async def cached() -> str:
            return "cached"

        @resilient.resilient("p", fallback=lambda _exc: cached())
        async def f() -> str:
            raise ConnectionError

        assert await f() == "cached"

    def test_a_sync_fallback_returning_a_coroutine_is_an_error(self) -> None:
        load(p={"retry": {"max_attempts": 2, "base_delay": 0}})

        async def cached() -> str:
            return "cached"

        @resilient.resilient("p", fallback=lambda _exc: cached())
        def f() -> str:
            raise ConnectionError

        with pytest.raises(TypeError, match=r"fallback .* returned a coroutine"):
            f()


def test_one_note_per_exception_however_often_it_is_raised(sleeps: Sleeps) -> None:
    load(p={"retry": {**RETRY, "base_delay": 0}})
    shared = ConnectionError("always the same object")

    @resilient.resilient("p")
    def f() -> None:
        raise shared

    for _ in range(50):
        with pytest.raises(ConnectionError):
            f()
    assert len(shared.__notes__) == 1


def test_a_new_equal_policy_per_call_shares_one_breaker() -> None:
    def fresh() -> resilient.Policy:
        return resilient.Policy(circuit_breaker=resilient.CircuitBreakerConfig(failure_threshold=3))

    for _ in range(2000):
        resilient.call(fresh(), lambda: 1)
    assert len(resilient.breakers()) == 1
    # different contents are different breakers, and the table stays bounded
    for threshold in range(1, 600):
        policy = resilient.Policy(
            circuit_breaker=resilient.CircuitBreakerConfig(failure_threshold=threshold)
        )
        resilient.call(policy, lambda: 1)
    from resilient import decorator

    assert len(decorator._call_handles) <= decorator._MAX_CALL_HANDLES


class TestBlockFormUnderAsyncFor:
    async def test_a_slow_attempt_times_out_and_is_retried(self) -> None:
        load(p={"retry": {**RETRY, "base_delay": 0}, "timeout": {"per_attempt": 0.02}})
        numbers = []
        async for attempt in resilient.attempts("p"):
            with attempt:
                numbers.append(attempt.number)
                if attempt.number < 3:
                    await asyncio.sleep(5)
        assert numbers == [1, 2, 3]

    async def test_the_total_budget_covers_the_loop_and_is_not_retried(self) -> None:
        load(
            p={
                "retry": {**RETRY, "max_attempts": 10, "base_delay": 0.01},
                "timeout": {"per_attempt": 1.0, "total": 0.05},
            }
        )
        numbers = []
        with pytest.raises(resilient.AttemptTimeoutError) as caught:
            async for attempt in resilient.attempts("p"):
                with attempt:
                    numbers.append(attempt.number)
                    await asyncio.sleep(5)
        assert caught.value.kind == "total"
        assert numbers == [1]

    async def test_a_full_bulkhead_refuses_the_block(self) -> None:
        load(
            p={
                "bulkhead": {
                    "max_concurrent_requests": 1,
                    "max_queue": 0,
                    "enable_auto_scaling": False,
                }
            }
        )
        started = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            async for attempt in resilient.attempts("p"):
                with attempt:
                    started.set()
                    await release.wait()

        holder = asyncio.ensure_future(hold())
        await started.wait()
        with pytest.raises(resilient.BulkheadFullError):
            async for attempt in resilient.attempts("p"):
                with attempt:
                    raise AssertionError("ran without a slot")
        release.set()
        await holder
        assert resilient.bulkhead_manager.bulkheads()["p"].get_status()["in_use"] == 0


class TestFoundByTryingIt:
    async def test_async_for_total_budget_survives_a_retried_attempt(self) -> None:
        load(
            p={
                "retry": {"max_attempts": 5, "base_delay": 0},
                "timeout": {"per_attempt": None, "total": 0.1},
            }
        )
        n = 0
        with pytest.raises(resilient.AttemptTimeoutError) as caught:
            async for attempt in resilient.attempts("p"):
                with attempt:
                    n += 1
                    if n == 1:
                        raise ConnectionError
                    await asyncio.sleep(0.5)
        assert caught.value.kind == "total"
        assert n == 2

    def test_a_huge_integer_hint_is_no_hint_and_not_a_hook_error(
        self, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
    ) -> None:
        load(p={"retry": {**RETRY, "retry_after": lambda _exc: 10**400}})

        @resilient.resilient("p")
        def f() -> None:
            raise ConnectionError

        with pytest.raises(ConnectionError):
            f()
        assert sleeps == [0.5, 0.5]
        assert "raised" not in caplog.text

    async def test_manager_call_of_a_sync_callable_returning_a_coroutine(self) -> None:
        async def co() -> int:
            return 1

        manager = await resilient.create_resilience_manager(
            metrics_enabled=False, logging_enabled=False
        )
        try:
            await manager.register_service("q", None, {})
            with pytest.raises(TypeError, match="returned a coroutine"):
                await manager.call("q", lambda: co())
        finally:
            await manager.close()

    def test_closures_of_one_factory_are_two_claimants(self) -> None:
        def make(threshold: int, fail: bool) -> Any:
            policy = resilient.Policy(
                circuit_breaker=resilient.CircuitBreakerConfig(failure_threshold=threshold)
            )

            @resilient.resilient(policy)
            def g() -> str:
                if fail:
                    raise ConnectionError
                return "ok"

            return g

        g1, g2 = make(2, True), make(3, False)
        with pytest.raises(ConnectionError):
            g1()
        with pytest.raises(resilient.PolicyError, match="already used by"):
            g2()  # same name, another breaker: refused, not silently split

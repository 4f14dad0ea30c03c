"""Retry budgets (gRPC/Finagle style) and Retry-After."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import NO_TIMEOUTS, Sleeps, load

import resilient
from resilient import Policy, RateLimitedError, RetryConfig
from resilient._models import RetryBudgetConfig
from resilient.budget import RetryBudget, _reset_budgets, retry_budgets
from resilient.events import RetriesExhausted, RetryBudgetExhausted


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    _reset_budgets()
    yield
    _reset_budgets()


class Outage:
    """A dependency that always fails; counts attempts."""

    def __init__(self) -> None:
        self.attempts = 0

    def __call__(self) -> None:
        self.attempts += 1
        raise ConnectionError("down")


class TestBudget:
    def test_caps_the_retry_ratio_during_an_outage(self, sleeps: Sleeps) -> None:
        """Without a budget 1,000 failing calls make 4,000 attempts; with one, retries ≈ 10%."""
        budget = {"ratio": 0.1, "min_retries_per_second": 0, "max_tokens": 10}
        load(p={"retry": {"max_attempts": 4, "base_delay": 0, "budget": budget, **NO_TIMEOUTS}})
        events: list[Any] = []
        resilient.subscribe(events.append)
        outage = Outage()
        guarded = resilient.resilient("p")(outage)
        calls = 1000
        for _ in range(calls):
            with pytest.raises(ConnectionError):
                guarded()
        retries = outage.attempts - calls
        ratio = retries / calls
        # ratio per call plus the initial bucket of 10 tokens
        assert ratio <= 0.1 + 10 / calls
        assert ratio >= 0.09  # the budget does allow retries
        exhausted = [e for e in events if isinstance(e, RetryBudgetExhausted)]
        assert len(exhausted) == calls - sum(
            1 for e in events if isinstance(e, RetriesExhausted) and e.reason != "budget"
        )
        assert {e.reason for e in events if isinstance(e, RetriesExhausted)} <= {
            "budget",
            "attempts",
        }
        status = retry_budgets()["p"].get_status()
        assert status["calls"] == calls
        assert status["retries"] == retries

    def test_async_callers_share_the_budget(self, sleeps: Sleeps) -> None:
        """The same cap holds for async functions."""
        import asyncio

        budget = {"ratio": 0.2, "min_retries_per_second": 0, "max_tokens": 5}
        load(p={"retry": {"max_attempts": 3, "base_delay": 0, "budget": budget, **NO_TIMEOUTS}})
        attempts = 0

        @resilient.resilient("p")
        async def down() -> None:
            nonlocal attempts
            attempts += 1
            raise ConnectionError

        async def main() -> None:
            for _ in range(500):
                with pytest.raises(ConnectionError):
                    await down()

        asyncio.run(main())
        assert (attempts - 500) / 500 <= 0.2 + 5 / 500

    def test_first_attempt_always_runs(self, sleeps: Sleeps) -> None:
        """An empty budget stops retries, never first attempts; a note says why."""
        budget = {"ratio": 0, "min_retries_per_second": 0, "max_tokens": 1}
        load(p={"retry": {"max_attempts": 5, "base_delay": 0, "budget": budget, **NO_TIMEOUTS}})
        outage = Outage()
        guarded = resilient.resilient("p")(outage)
        with pytest.raises(ConnectionError) as info:
            guarded()
        assert outage.attempts == 2  # one token: one retry
        assert any("(budget)" in note for note in info.value.__notes__)
        for _ in range(10):
            with pytest.raises(ConnectionError):
                guarded()
        assert outage.attempts == 12

    def test_floor_per_second(self) -> None:
        """min_retries_per_second refills the bucket with time, whatever the traffic."""
        now = [0.0]
        config = RetryBudgetConfig(ratio=0, min_retries_per_second=2, max_tokens=4)
        budget = RetryBudget("b", config, clock=lambda: now[0])
        assert sum(budget.try_withdraw() for _ in range(10)) == 4  # starts full
        now[0] += 1.0
        assert sum(budget.try_withdraw() for _ in range(10)) == 2
        now[0] += 100.0
        assert sum(budget.try_withdraw() for _ in range(10)) == 4  # capped

    def test_deposits_are_per_call(self) -> None:
        """Each call adds `ratio` tokens, capped at max_tokens."""
        config = RetryBudgetConfig(ratio=0.5, min_retries_per_second=0, max_tokens=3)
        budget = RetryBudget("b", config, clock=lambda: 0.0)
        assert sum(budget.try_withdraw() for _ in range(5)) == 3
        for _ in range(4):
            budget.deposit()
        assert sum(budget.try_withdraw() for _ in range(5)) == 2
        for _ in range(100):
            budget.deposit()
        assert sum(budget.try_withdraw() for _ in range(10)) == 3
        assert budget.calls == 104


class ServerBusy(Exception):
    def __init__(self, retry_after: float | None) -> None:
        super().__init__("busy")
        self.retry_after = retry_after


class TestRetryAfter:
    def test_hook_reads_the_exception_and_is_capped(self, sleeps: Sleeps) -> None:
        """The server's delay replaces the backoff, capped by max_delay."""
        policy = Policy(
            retry=RetryConfig(
                max_attempts=4,
                base_delay=0.01,
                max_delay=5.0,
                jitter=False,
                retry_on=(ServerBusy,),
                retry_after=lambda exc: getattr(exc, "retry_after", None),
                timeout=None,
                per_attempt_timeout=None,
            )
        )
        outcomes: list[Any] = [ServerBusy(2.0), ServerBusy(30.0), ServerBusy(None), "ok"]

        @resilient.resilient(policy)
        def call() -> Any:
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        assert call() == "ok"
        assert sleeps == [2.0, 5.0, pytest.approx(0.04)]  # hint, capped hint, own backoff

    def test_hook_reads_a_result(self, sleeps: Sleeps) -> None:
        """A rejected result (say an HTTP 503 response) can carry the delay too."""
        responses = [{"status": 503, "retry-after": "1.5"}, {"status": 200}]

        def retry_after(response: Any) -> float | None:
            value = response.get("retry-after") if isinstance(response, dict) else None
            return float(value) if value is not None else None

        policy = Policy(
            retry=RetryConfig(
                max_attempts=3,
                base_delay=0,
                retry_if_result=lambda r: r["status"] == 503,
                retry_after=retry_after,
                timeout=None,
                per_attempt_timeout=None,
            )
        )

        @resilient.resilient(policy)
        def get() -> dict[str, Any]:
            return responses.pop(0)

        assert get() == {"status": 200}
        assert sleeps == [1.5]

    def test_hint_past_the_total_budget_gives_up(self, sleeps: Sleeps) -> None:
        """A retry's sleep never outlives the total timeout, even when the server asks."""
        policy = Policy(
            retry=RetryConfig(
                max_attempts=5,
                base_delay=0,
                max_delay=60,
                retry_on=(ServerBusy,),
                retry_after=lambda exc: getattr(exc, "retry_after", None),
                timeout=10.0,
                per_attempt_timeout=None,
            )
        )

        @resilient.resilient(policy)
        def call() -> None:
            raise ServerBusy(30.0)

        with pytest.raises(ServerBusy) as info:
            call()
        assert sleeps == []
        assert not getattr(info.value, "__notes__", [])  # gave up after the first attempt

    def test_rate_limited_rejection_carries_its_own_delay(self, sleeps: Sleeps) -> None:
        """A retried RateLimitedError waits its retry_after without any hook."""
        load(
            p={
                "rate_limit": {"max_rate": 1, "time_period": 2.0},
                "retry": {
                    "max_attempts": 2,
                    "base_delay": 0,
                    "retry_on": ["RateLimitedError"],
                    **NO_TIMEOUTS,
                },
            }
        )
        calls = 0

        @resilient.resilient("p")
        def call() -> str:
            nonlocal calls
            calls += 1
            return "ok"

        assert call() == "ok"
        with pytest.raises(RateLimitedError):
            call()  # the fake sleep does not let the bucket drain
        assert sleeps == [pytest.approx(2.0, abs=0.01)]
        assert calls == 1


def test_refund_gives_back_a_token_that_was_not_used() -> None:
    config = RetryBudgetConfig(ratio=0.0, min_retries_per_second=0.0, max_tokens=2)
    budget = RetryBudget("r", config, clock=lambda: 0.0)
    assert budget.try_withdraw()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    budget.refund()  # the second retry did not happen after all
    assert budget.get_status()["retries"] == 1
    assert budget.try_withdraw()  # its token is back
    assert not budget.try_withdraw()
    budget.refund()
    budget.refund()
    budget.refund()  # more refunds than tokens taken: capped at max_tokens
    assert budget.get_status()["tokens"] == 2.0
    assert budget.get_status()["retries"] == 0

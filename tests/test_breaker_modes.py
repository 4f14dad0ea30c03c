"""Breaker modes through the public API: a policy's ``mode`` as a user sets it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import load

import resilient
from resilient.events import BreakerStateChanged, CallRejected


def _breaker_policy(**overrides: Any) -> dict[str, Any]:
    breaker = {"failure_threshold": 3, "timeout_seconds": 30, "mode": "metrics_only"}
    breaker.update(overrides)
    return {"circuit_breaker": breaker, "retry": None}


class TestMetricsOnly:
    def test_sync_calls_all_run_and_are_recorded_without_a_trip(self) -> None:
        load(svc=_breaker_policy())
        events: list[Any] = []
        resilient.subscribe(events.append)
        ran = 0

        @resilient.resilient("svc")
        def call(fail: bool) -> str:
            nonlocal ran
            ran += 1
            if fail:
                raise ConnectionError("down")
            return "ok"

        for _ in range(10):
            with pytest.raises(ConnectionError):
                call(True)
        assert call(False) == "ok"

        assert ran == 11  # not one call refused
        breaker = resilient.get_breaker("svc")
        assert breaker.state == "closed"
        status = breaker.get_status()
        assert status["state"] == "closed"
        assert status["trips"] == 0
        assert status["thresholds_exceeded"] is True
        assert status["window"]["calls"] == 11
        assert status["window"]["failures"] == 10
        assert status["window"]["failure_rate"] == pytest.approx(10 / 11)
        assert status["totals"]["calls"] == 11
        assert status["totals"]["failures"] == 10
        assert status["totals"]["rejections"] == 0
        assert not [e for e in events if isinstance(e, BreakerStateChanged | CallRejected)]

    def test_async_calls_all_run_and_are_recorded_without_a_trip(self) -> None:
        load(svc=_breaker_policy(failure_rate_threshold=0.5, min_requests_threshold=4))

        @resilient.resilient("svc")
        async def call(i: int) -> int:
            if i % 2:
                raise TimeoutError
            return i

        async def main() -> list[Any]:
            return await asyncio.gather(*(call(i) for i in range(20)), return_exceptions=True)

        results = asyncio.run(main())
        assert sum(isinstance(r, TimeoutError) for r in results) == 10
        assert sum(isinstance(r, int) for r in results) == 10
        breaker = resilient.get_breaker("svc")
        assert breaker.state == "closed"
        assert breaker.failure_rate == pytest.approx(0.5)
        status = breaker.get_status()
        assert (status["window"]["calls"], status["window"]["failures"]) == (20, 10)
        assert status["totals"]["rejections"] == 0
        assert status["trips"] == 0

    def test_normal_mode_still_trips(self) -> None:
        """The same policy in normal mode opens and refuses: the mode is what differs."""
        load(svc=_breaker_policy(mode="normal"))

        @resilient.resilient("svc")
        def call() -> None:
            raise ConnectionError("down")

        for _ in range(3):
            with pytest.raises(ConnectionError):
                call()
        with pytest.raises(resilient.CircuitOpenError):
            call()
        assert resilient.get_breaker("svc").state == "open"

"""Rate limits: aiolimiter for async callers, the same leaky bucket by hand for threads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Sleeps, load

import resilient
from resilient import PolicyError, RateLimitedError
from resilient.events import CallRejected
from resilient.ratelimit import _reset_limiters, get_rate_limiter


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    _reset_limiters()
    yield
    _reset_limiters()


class TestAsync:
    def test_burst_then_refused_at_once(self) -> None:
        """max_rate calls pass in a burst; with max_wait 0 the next is refused with retry_after."""
        load(p={"rate_limit": {"max_rate": 5, "time_period": 1.0}})
        events: list[Any] = []
        resilient.subscribe(events.append)

        @resilient.resilient("p")
        async def call() -> str:
            return "ok"

        async def main() -> None:
            assert [await call() for _ in range(5)] == ["ok"] * 5
            with pytest.raises(RateLimitedError) as info:
                await call()
            assert info.value.policy == "p"
            assert info.value.retry_after == pytest.approx(0.2)

        asyncio.run(main())
        assert [e.reason for e in events if isinstance(e, CallRejected)] == ["rate_limited"]
        assert get_rate_limiter("p").get_status()["rejected"] == 1

    def test_waits_up_to_max_wait(self) -> None:
        """Callers wait their turn at the configured rate; those that would wait too long don't."""
        load(p={"rate_limit": {"max_rate": 10, "time_period": 0.1, "max_wait": 0.05}})

        @resilient.resilient("p")
        async def call() -> float:
            return time.perf_counter()

        async def main() -> list[Any]:
            return await asyncio.gather(*(call() for _ in range(30)), return_exceptions=True)

        began = time.perf_counter()
        results = asyncio.run(main())
        passed = [r for r in results if isinstance(r, float)]
        refused = [r for r in results if isinstance(r, RateLimitedError)]
        assert len(passed) + len(refused) == 30
        # 10 at once, then one per 10 ms for at most 50 ms: about 15 pass
        assert 11 <= len(passed) <= 17
        assert max(passed) - began < 0.5
        assert all(r.retry_after is not None and r.retry_after > 0 for r in refused)

    def test_limit_holds_over_time(self) -> None:
        """Sustained load runs at the configured rate (measured)."""
        load(p={"rate_limit": {"max_rate": 20, "time_period": 0.1, "max_wait": 10}})

        @resilient.resilient("p")
        async def call() -> None:
            return None

        async def main() -> float:
            began = time.perf_counter()
            await asyncio.gather(*(call() for _ in range(80)))
            return time.perf_counter() - began

        elapsed = asyncio.run(main())
        # 20 in the first burst, then 60 more at 200/s: at least 0.3 s
        assert 0.28 <= elapsed < 1.5

    def test_new_loop_gets_a_working_limiter(self) -> None:
        """aiolimiter is per loop: a policy used from a second asyncio.run() still works."""
        load(p={"rate_limit": {"max_rate": 100}})

        @resilient.resilient("p")
        async def call() -> str:
            return "ok"

        assert asyncio.run(call()) == "ok"
        assert asyncio.run(call()) == "ok"


class TestSync:
    def test_same_bucket_semantics_for_threads(
        self, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Burst of max_rate, then waits of 1/rate each (reserved, FIFO), up to max_wait."""
        now = [100.0]
        monkeypatch.setattr(resilient._clock, "monotonic", lambda: now[0])
        load(p={"rate_limit": {"max_rate": 4, "time_period": 1.0, "max_wait": 0.6}})

        @resilient.resilient("p")
        def call() -> str:
            return "ok"

        for _ in range(4):
            assert call() == "ok"
        assert sleeps == []
        assert call() == "ok"
        assert call() == "ok"
        assert sleeps == [pytest.approx(0.25), pytest.approx(0.5)]
        with pytest.raises(RateLimitedError) as info:
            call()
        assert info.value.retry_after == pytest.approx(0.75)
        now[0] += 1.0  # the bucket drains at 4/s
        assert call() == "ok"
        assert len(sleeps) == 2

    def test_real_threads_respect_the_rate(self) -> None:
        """Four threads, 10 calls/0.1 s, 30 calls: about 0.2 s."""
        import threading

        load(p={"rate_limit": {"max_rate": 10, "time_period": 0.1, "max_wait": 5}})

        @resilient.resilient("p")
        def call() -> None:
            return None

        def body() -> None:
            for _ in range(30 // 3):
                call()

        threads = [threading.Thread(target=body) for _ in range(3)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        assert 0.18 <= elapsed < 1.5


class TestBadInput:
    @pytest.mark.parametrize(
        "section",
        [{"max_rate": 0}, {"max_rate": -1}, {"max_rate": 5, "time_period": 0}, {}],
    )
    def test_policy_error(self, section: dict[str, Any]) -> None:
        """A rate needs a positive max_rate and time_period."""
        with pytest.raises(PolicyError, match=r"policies\.p\.rate_limit"):
            load(p={"rate_limit": section})


def test_aiolimiter_fast_path_is_available() -> None:
    """The success path reads aiolimiter's bucket level; fail loudly if an upgrade renames it."""
    from resilient import ratelimit

    assert ratelimit._FAST_PATH

"""Rate limits: aiolimiter for async callers, the same leaky bucket by hand for threads."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Sleeps, load

import resilient
from resilient import PolicyError, RateLimitedError
from resilient.events import CallRejected
from resilient.ratelimit import _reset_limiters, get_rate_limiter
from resilient.testing import VirtualClock


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
            # the time until one unit has drained: 0.2 s, less what the calls took
            assert 0.15 < info.value.retry_after <= 0.2

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


# Rates under one call per time_period: every call takes one unit of the bucket.
SUB_ONE_RATES = [
    {"max_rate": 0.5},
    {"max_rate": 0.25, "time_period": 0.5},
    {"max_rate": 1, "time_period": 2},
]


class TestSubOneRate:
    @pytest.mark.parametrize("section", SUB_ONE_RATES)
    def test_async_callers_wait_their_turn(self, section: dict[str, Any]) -> None:
        """0.5 calls/s: one call, then one every 2 s (aiolimiter refused such rates)."""
        with VirtualClock() as clock:
            load(p={"rate_limit": {**section, "max_wait": 5}})

            @resilient.resilient("p")
            async def call() -> float:
                return clock.now

            async def main() -> list[float]:
                return [await call() for _ in range(3)]

            assert clock.run(main()) == [0.0, pytest.approx(2.0), pytest.approx(4.0)]

    @pytest.mark.parametrize("section", SUB_ONE_RATES)
    def test_async_refusal_says_when_to_come_back(self, section: dict[str, Any]) -> None:
        """max_wait 0: one call passes, the next is refused with the true retry_after."""
        with VirtualClock() as clock:
            load(p={"rate_limit": section})

            @resilient.resilient("p")
            async def call() -> str:
                return "ok"

            async def main() -> None:
                assert await call() == "ok"
                await asyncio.sleep(0.5)
                with pytest.raises(RateLimitedError) as info:
                    await call()
                assert info.value.retry_after == pytest.approx(1.5)
                await asyncio.sleep(1.5)
                assert await call() == "ok"

            clock.run(main())

    @pytest.mark.parametrize("section", SUB_ONE_RATES)
    def test_threads_wait_their_turn(self, section: dict[str, Any]) -> None:
        with VirtualClock() as clock:
            load(p={"rate_limit": {**section, "max_wait": 5}})

            @resilient.resilient("p")
            def call() -> float:
                return clock.now

            assert [call() for _ in range(3)] == [0.0, pytest.approx(2.0), pytest.approx(4.0)]
            assert clock.sleeps == [pytest.approx(2.0), pytest.approx(2.0)]

    @pytest.mark.parametrize("section", SUB_ONE_RATES)
    def test_threads_refusal_says_when_to_come_back(self, section: dict[str, Any]) -> None:
        with VirtualClock() as clock:
            load(p={"rate_limit": section})

            @resilient.resilient("p")
            def call() -> str:
                return "ok"

            assert call() == "ok"
            clock.advance(0.5)
            with pytest.raises(RateLimitedError) as info:
                call()
            assert info.value.retry_after == pytest.approx(1.5)
            clock.advance(1.5)
            assert call() == "ok"
            assert clock.sleeps == []


class TestRetryAfter:
    def test_async_refusal_counts_the_callers_already_waiting(self) -> None:
        """4/s, max_wait 1: 4 pass, 4 wait their 0.25 s turns, the 9th is told 1.25 s."""
        with VirtualClock() as clock:
            load(p={"rate_limit": {"max_rate": 4, "max_wait": 1}})

            @resilient.resilient("p")
            async def call() -> float:
                return clock.now

            async def main() -> list[Any]:
                return await asyncio.gather(*(call() for _ in range(9)), return_exceptions=True)

            results = clock.run(main())
        assert results[:8] == [0.0] * 4 + [pytest.approx(0.25 * k) for k in range(1, 5)]
        assert isinstance(results[8], RateLimitedError)
        assert results[8].retry_after == pytest.approx(1.25)


def _run_bounded(code: str) -> str:
    """Run *code* in a fresh interpreter; a livelock fails the test instead of hanging it."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("virtual time livelocked: still running after 60 s (killed)")
    assert done.returncode == 0, done.stderr
    return done.stdout


class TestVirtualTime:
    """Callers faster than max_rate with max_wait > 0 used to spin the virtual loop forever."""

    def test_simulate_with_waiting_callers_terminates(self) -> None:
        out = _run_bounded(
            """
            from resilient import Policy
            from resilient.testing import healthy, simulate

            policy = Policy.model_validate({"rate_limit": {"max_rate": 5, "max_wait": 1}})
            for seed in range(3):
                r = simulate(policy, healthy(), duration=10, rate=200, seed=seed)
                print(r.attempted, r.succeeded, r.rejected_rate_limit, r.ended_at)
            """
        )
        for line in out.splitlines():
            attempted, succeeded, refused, ended_at = line.split()
            # a burst of 5, then 5/s until the last waiter (at most 1 s after the end)
            assert int(succeeded) == pytest.approx(5 + 5 * float(ended_at), abs=1)
            assert int(succeeded) + int(refused) == int(attempted)

    def test_virtual_clock_run_with_waiting_callers_terminates(self) -> None:
        out = _run_bounded(
            """
            import asyncio

            import resilient
            from resilient.testing import VirtualClock

            resilient.load_policies(
                {"version": 1, "policies": {"p": {"rate_limit": {"max_rate": 5, "max_wait": 1}}}}
            )
            with VirtualClock() as clock:

                @resilient.resilient("p")
                async def call() -> float:
                    return clock.now

                async def main() -> list[object]:
                    tasks = []
                    for _ in range(2000):  # 200 calls/s for 10 s
                        tasks.append(asyncio.ensure_future(call()))
                        await asyncio.sleep(0.005)
                    return await asyncio.gather(*tasks, return_exceptions=True)

                results = clock.run(main())
            print(sum(isinstance(r, float) for r in results), clock.now)
            """
        )
        served, now = out.split()
        assert int(served) == pytest.approx(5 + 5 * float(now), abs=1)


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

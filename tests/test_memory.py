"""
What many policies share to stay small (equal sections kept once, one deadline queue
and one hedge timer per loop and duration, breaker buckets for failures made at the
first failure) and that sharing never changes what a policy does.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import load
from hypothesis import example, given, settings
from hypothesis import strategies as st

import resilient
from resilient import AttemptTimeoutError
from resilient._models import CircuitBreakerConfig
from resilient.breaker import CircuitBreaker, _TimeWindow
from resilient.hedge import hedgers
from resilient.testing import VirtualClock
from resilient.timeout import deadline_queue

EVERY_SECTION: dict[str, Any] = {
    "retry": {"max_attempts": 3, "base_delay": 0.01, "budget": {}},
    "circuit_breaker": {"failure_threshold": 5},
    "timeout": {"per_attempt": 5.0, "total": 10.0},
    "fallback": {"value": None},
    "bulkhead": {"max_concurrent_requests": 100},
    "rate_limit": {"max_rate": 1000.0, "time_period": 1.0},
    "health": {},
    "hedge": {},
    "http": {},
}


class TestEqualSectionsAreKeptOnce:
    def test_equal_sections_and_policies_are_one_object(self) -> None:
        """Equal sections (and equal policies) of one load are one instance; others not."""
        load(
            a={"retry": {"max_attempts": 4}, "circuit_breaker": {"failure_threshold": 2}},
            b={"retry": {"max_attempts": 4}, "circuit_breaker": {"failure_threshold": 2}},
            c={"retry": {"max_attempts": 4}, "circuit_breaker": {"failure_threshold": 3}},
        )
        a, b, c = (resilient.get_policy(n) for n in "abc")
        assert a is b
        assert a.retry is c.retry
        assert a.circuit_breaker is not c.circuit_breaker
        assert c.circuit_breaker is not None
        assert c.circuit_breaker.failure_threshold == 3
        # the breaker's default adaptive sub-section is one object for all three
        assert a.circuit_breaker is not None
        assert a.circuit_breaker.adaptive is c.circuit_breaker.adaptive

    def test_extends_shares_the_parent_sections(self) -> None:
        """A child policy that keeps a section of its parent keeps the same object."""
        load(
            base={"retry": {"max_attempts": 5}, "timeout": {"per_attempt": 2.0}},
            child={"extends": "base", "timeout": {"per_attempt": 3.0}},
        )
        base, child = resilient.get_policy("base"), resilient.get_policy("child")
        assert base.retry is child.retry
        assert base.timeout is not child.timeout
        assert child.per_attempt_timeout == 3.0

    @pytest.mark.parametrize(
        ("one", "other"),
        [
            pytest.param(1, True, id="int-bool"),
            pytest.param(1, 1.0, id="int-float"),
            pytest.param((1,), (True,), id="tuples"),
            pytest.param("1", 1, id="str-int"),
        ],
    )
    def test_equal_but_different_values_are_not_merged(self, one: Any, other: Any) -> None:
        """Values that are equal for ``==`` but of other types stay each policy's own."""
        load(a={"fallback": {"value": one}}, b={"fallback": {"value": other}})

        def answers(name: str) -> Any:
            @resilient.resilient(name)
            def broken() -> Any:
                raise ValueError(name)

            return broken()

        assert type(answers("a")) is type(one)
        assert type(answers("b")) is type(other)
        assert answers("a") == one
        assert answers("b") == other

    def test_unhashable_values_load_and_answer(self) -> None:
        """A section holding an unhashable value is kept as it is; the others are shared."""
        load(
            a={"fallback": {"value": [1, {"x": 2}]}, "retry": {"retry_on": ["KeyError"]}},
            b={"fallback": {"value": [1, {"x": 2}]}, "retry": {"retry_on": ["KeyError"]}},
        )
        a, b = resilient.get_policy("a"), resilient.get_policy("b")
        assert a.retry is b.retry
        assert a.fallback is not b.fallback

        @resilient.resilient("b")
        def broken() -> Any:
            raise ValueError

        assert broken() == [1, {"x": 2}]

    def test_a_copy_of_a_shared_section_does_not_touch_the_others(self) -> None:
        """``model_copy(update=...)`` of a shared section changes the copy alone."""
        load(
            a={"circuit_breaker": {"failure_threshold": 2}},
            b={"circuit_breaker": {"failure_threshold": 3}},
        )
        a = resilient.get_policy("a").circuit_breaker
        b = resilient.get_policy("b").circuit_breaker
        assert a is not None
        assert b is not None
        assert {"failure_threshold"} == a.model_fields_set == b.model_fields_set
        changed = a.model_copy(update={"timeout_seconds": 9.0})
        assert {"failure_threshold", "timeout_seconds"} == changed.model_fields_set
        assert {"failure_threshold"} == a.model_fields_set == b.model_fields_set
        assert b.model_dump(exclude_unset=True) == {"failure_threshold": 3}

    def test_a_reload_of_one_policy_leaves_the_other(self) -> None:
        """Two equal policies share their sections, not their breakers; a reload of one
        leaves the other's breaker and section as they were."""
        section = {"circuit_breaker": {"failure_threshold": 2, "timeout_seconds": 60}}
        load(a=copy.deepcopy(section), b=copy.deepcopy(section))

        def failing(name: str) -> Callable[[], None]:
            @resilient.resilient(name)
            def call() -> None:
                raise ConnectionError(name)

            return call

        for _ in range(2):
            with pytest.raises(ConnectionError):
                failing("a")()
        assert resilient.get_breaker("a").state == "open"
        assert resilient.get_breaker("b").state == "closed"
        b_breaker = resilient.get_breaker("b")
        with pytest.raises(ConnectionError):
            failing("b")()  # one failure of two: still closed

        load(a={"circuit_breaker": {"failure_threshold": 5}}, b=copy.deepcopy(section))
        with pytest.raises(ConnectionError):
            failing("a")()
        assert resilient.get_policy("a").circuit_breaker.failure_threshold == 5  # type: ignore[union-attr]
        assert resilient.get_policy("b").circuit_breaker.failure_threshold == 2  # type: ignore[union-attr]
        assert resilient.get_breaker("b") is b_breaker  # unchanged section: state kept
        with pytest.raises(ConnectionError):
            failing("b")()
        assert resilient.get_breaker("b").state == "open"  # its second failure
        assert resilient.get_breaker("a").state == "closed"

    def test_loading_many_equal_policies_costs_little(self) -> None:
        """A file of 300 equal policies with every section keeps each section once:
        loading costs well under a kilobyte per policy (each one's own tree was ~9 KB)."""
        count = 300
        doc = {
            "version": 1,
            "policies": {f"p{i}": copy.deepcopy(EVERY_SECTION) for i in range(count)},
        }
        resilient.load_policies({"version": 1, "policies": {"warm": EVERY_SECTION}})
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            policies = resilient.load_policies(doc)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(policies) == count
        assert grown / count < 1000


# --------------------------------------------------------------------------- deadlines


def _sleeper(name: str, seconds: float) -> Callable[[], Awaitable[str]]:
    @resilient.resilient(name)
    async def call() -> str:
        await asyncio.sleep(seconds)
        return name

    return call


class TestSharedDeadlineQueues:
    def test_one_queue_cache_per_duration(self) -> None:
        """Budgets of one duration share one queue cache; other durations have their own."""
        assert deadline_queue(2.5) is deadline_queue(2.5)
        assert deadline_queue(2.5) is deadline_queue(5 / 2)
        assert deadline_queue(2.5) is not deadline_queue(3.0)

    def test_policies_with_one_budget_time_out_independently(
        self, virtual_clock: VirtualClock
    ) -> None:
        """Two policies with the same per-attempt budget on one loop: each call times out
        at its own deadline and names its own policy; a fast call is left alone."""
        no_retry = {"max_attempts": 1, "timeout": None, "per_attempt_timeout": None}
        load(
            a={"timeout": {"per_attempt": 1.0}, "retry": no_retry},
            b={"timeout": {"per_attempt": 1.0}, "retry": no_retry},
        )
        outcomes: list[tuple[str, str, float]] = []

        async def watch(call: Callable[[], Awaitable[str]], start: float) -> None:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(start)
            try:
                answer = await call()
            except AttemptTimeoutError as exc:
                outcomes.append(("timeout", str(exc.policy), loop.time()))
            else:
                outcomes.append(("ok", answer, loop.time()))

        async def main() -> None:
            await asyncio.gather(
                watch(_sleeper("a", 10.0), 0.0),
                watch(_sleeper("b", 10.0), 0.5),
                watch(_sleeper("b", 0.7), 0.1),
                watch(_sleeper("a", 0.2), 0.9),
            )

        virtual_clock.run(main())
        assert [(kind, who) for kind, who, _ in outcomes] == [
            ("ok", "b"),
            ("timeout", "a"),
            ("ok", "a"),
            ("timeout", "b"),
        ]
        assert [at for *_, at in outcomes] == pytest.approx([0.8, 1.0, 1.1, 1.5])

    def test_a_reload_of_one_budget_leaves_the_other(self, virtual_clock: VirtualClock) -> None:
        """After *a*'s budget is reloaded to 2 s, *b* (still 1 s) keeps its own deadline."""
        no_retry = {"max_attempts": 1, "timeout": None, "per_attempt_timeout": None}
        load(
            a={"timeout": {"per_attempt": 1.0}, "retry": no_retry},
            b={"timeout": {"per_attempt": 1.0}, "retry": no_retry},
        )
        slow_a, slow_b = _sleeper("a", 10.0), _sleeper("b", 10.0)

        async def timed_out_after(call: Callable[[], Awaitable[str]]) -> float:
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(AttemptTimeoutError):
                await call()
            return loop.time() - start

        async def main() -> list[float]:
            first = await asyncio.gather(timed_out_after(slow_a), timed_out_after(slow_b))
            load(
                a={"timeout": {"per_attempt": 2.0}, "retry": no_retry},
                b={"timeout": {"per_attempt": 1.0}, "retry": no_retry},
            )
            second = await asyncio.gather(timed_out_after(slow_a), timed_out_after(slow_b))
            return [*first, *second]

        assert virtual_clock.run(main()) == pytest.approx([1.0, 1.0, 2.0, 1.0])


# --------------------------------------------------------------------------- hedging


class TestSharedHedgeTimers:
    def test_policies_with_one_delay_hedge_independently(self, virtual_clock: VirtualClock) -> None:
        """Two policies with the same hedge delay share one timer per loop; only the slow
        call of *a* is hedged, at its own delay, and *b*'s fast call is not."""
        load(a={"hedge": {"delay": 0.1}}, b={"hedge": {"delay": 0.1}})
        started: list[tuple[str, float]] = []

        def backend(name: str, *latencies: float) -> Callable[[], Awaitable[str]]:
            @resilient.resilient(name)
            async def call() -> str:
                loop = asyncio.get_running_loop()
                n = sum(1 for who, _ in started if who == name)
                started.append((name, loop.time()))
                await asyncio.sleep(latencies[min(n, len(latencies) - 1)])
                return f"{name} {n + 1}"

            return call

        async def main() -> list[str]:
            async def later(call: Callable[[], Awaitable[str]], start: float) -> str:
                await asyncio.sleep(start)
                return await call()

            return list(
                await asyncio.gather(
                    later(backend("a", 1.0, 0.05), 0.0), later(backend("b", 0.08), 0.05)
                )
            )

        assert virtual_clock.run(main()) == ["a 2", "b 1"]
        assert [who for who, _ in started] == ["a", "b", "a"]
        assert [at for _, at in started] == pytest.approx([0.0, 0.05, 0.1])
        assert (hedgers()["a"].started, hedgers()["b"].started) == (1, 0)


# --------------------------------------------------------------------------- breaker


class TestTimeWindowBuckets:
    def test_failures_and_slow_calls_count_and_expire_per_bucket(self) -> None:
        """The time window counts failures and slow calls (kept from the first one on)
        per bucket, and drops each bucket's counts when it leaves the window."""
        now = [1000.0]
        cb = CircuitBreaker(
            "svc",
            CircuitBreakerConfig(
                failure_threshold=100,
                failure_rate_threshold=None,
                window_type="time",
                failure_rate_window=10,
                slow_call_duration=1.0,
                slow_call_rate_threshold=1.0,
            ),
            clock=lambda: now[0],
        )

        def ok(duration: float = 0.0) -> None:
            cb.on_success(cb.acquire(), duration)

        def bad(duration: float = 0.0) -> None:
            cb.on_failure(cb.acquire(), ConnectionError("down"), duration)

        def window() -> tuple[int, int, int]:
            w = cb.get_status()["window"]
            return w["calls"], w["failures"], w["slow"]

        for _ in range(5):
            ok()
        assert window() == (5, 0, 0)
        now[0] += 3.0
        bad()
        bad(2.0)  # a slow failure: one of each
        ok(1.5)
        assert window() == (8, 2, 2)
        now[0] += 4.0
        bad()
        assert window() == (9, 3, 2)
        now[0] += 4.5  # the first bucket left the window, failures not yet
        assert window() == (4, 3, 2)
        now[0] += 3.0  # the bucket with two failures and two slow calls left too
        assert window() == (1, 1, 0)
        now[0] += 100.0
        assert window() == (0, 0, 0)
        bad(5.0)
        assert window() == (1, 1, 1)

    @settings(max_examples=300)
    # a bucket that moves into the ring with a failure, then leaves the window
    @example(seconds=7, steps=[(0.0, 1), (10.0, 2), (10.0, 0), (40.0, 0), (10.0, 0)])
    @given(
        seconds=st.sampled_from([1, 7, 60, 3600]),
        steps=st.lists(
            st.tuples(st.floats(min_value=0.0, max_value=90.0), st.sampled_from([0, 1, 2, 3])),
            max_size=60,
        ),
    )
    def test_time_window_matches_a_list_of_every_outcome(
        self, seconds: int, steps: list[tuple[float, int]]
    ) -> None:
        """Whatever the gaps between calls (inside one bucket, across some, past the
        whole window) the totals are those of a plain list of every outcome kept."""
        window = _TimeWindow(seconds)
        n = min(seconds, 60)
        width = seconds / n
        kept: list[tuple[int, int]] = []  # (bucket, outcome)
        now = 5000.0
        for gap, outcome in steps:
            now += gap * width / 10 if gap < 45 else gap * seconds / 30
            window.add(outcome, now)
            head = int(now // width)
            kept = [(b, o) for b, o in kept if b > head - n]
            kept.append((head, outcome))
            assert window.calls == len(kept)
            assert window.failures == sum(o & 1 for _, o in kept)
            assert window.slow == sum(o >> 1 for _, o in kept)

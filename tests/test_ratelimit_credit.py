"""
The async rate limiter's credit (calls taken from the bucket in one go when calls are
dense), checked on the virtual clock against an exact leaky bucket:

* never more than the bucket allows: over any window of length ``w``, at most
  ``burst + rate x w`` calls start (the leaky bucket's promise, docs/rate-limits.md);
* never more than ``_CREDIT_S`` late: a call refused at once would also be refused by
  an exact bucket holding ``rate x _CREDIT_S`` units less, and its ``retry_after`` is
  the exact one, plus at most ``_CREDIT_S``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import load
from hypothesis import example, given, settings
from hypothesis import strategies as st

import resilient
from resilient import RateLimitedError
from resilient.ratelimit import _CREDIT_S, _EARLY_S, _reset_limiters, get_rate_limiter
from resilient.testing import VirtualClock

EPS = 1e-9


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    _reset_limiters()
    yield
    _reset_limiters()


@dataclass
class Log:
    """What the calls saw, in the order the limiter decided."""

    events: list[tuple[str, float, float]] = field(default_factory=list)  # kind, at, retry_after

    def admitted(self) -> list[float]:
        return [at for kind, at, _ in self.events if kind == "ok"]


@dataclass(frozen=True)
class Step:
    gap: float  # virtual seconds slept before the step
    calls: int  # calls started at that instant
    spawned: bool  # as tasks (concurrent) or awaited one after the other


def run_schedule(section: dict[str, Any], steps: list[Step]) -> Log:
    """Run *steps* through ``@resilient`` with only *section* as ``rate_limit``."""
    log = Log()
    with VirtualClock() as clock:
        load(p={"rate_limit": section})

        @resilient.resilient("p")
        async def work() -> None:
            log.events.append(("ok", clock.now, 0.0))

        async def call() -> None:
            try:
                await work()
            except RateLimitedError as refused:
                assert refused.retry_after is not None
                log.events.append(("refused", clock.now, refused.retry_after))

        async def main() -> None:
            tasks = []
            for step in steps:
                await asyncio.sleep(step.gap)
                for _ in range(step.calls):
                    if step.spawned:
                        tasks.append(asyncio.ensure_future(call()))
                    else:
                        await call()
            await asyncio.gather(*tasks)

        clock.run(main())
    return log


def shape(section: dict[str, Any]) -> tuple[float, float]:
    """``(burst, rate per second)`` of the bucket, as docs/rate-limits.md defines it."""
    max_rate, period = section["max_rate"], section.get("time_period", 1.0)
    if max_rate >= 1:
        return max_rate, max_rate / period
    return 1.0, max_rate / period


def assert_within_rate(admitted: list[float], burst: float, rate: float) -> None:
    """
    At most ``burst + rate x w`` calls in every window of length ``w`` (a waiter may be
    let in up to ``_EARLY_S`` early, to absorb the rounding of its wake-up time).
    """
    for i, j in itertools.combinations(range(len(admitted)), 2):
        window = admitted[j] - admitted[i] + _EARLY_S
        assert j - i + 1 <= burst + rate * window + 1e-6, (i, j, admitted[i], admitted[j])


def assert_refusals_justified(log: Log, burst: float, rate: float) -> None:
    """
    Replay the admitted calls through an exact leaky bucket: each refusal (max_wait 0)
    must be one that bucket makes too once ``rate x _CREDIT_S`` units are taken off its
    room, and its retry_after the exact wait plus at most ``_CREDIT_S``.
    """
    level, last = 0.0, 0.0
    slack = rate * _CREDIT_S
    for kind, at, retry_after in log.events:
        level = max(level - (at - last) * rate, 0.0)
        last = at
        if kind == "ok":
            level += 1.0
            continue
        assert level + 1.0 > burst - slack - 1e-6, (at, level)
        exact = max(level + 1.0 - burst, 0.0) / rate
        assert exact - 1e-6 <= retry_after <= exact + _CREDIT_S + 1e-6, (at, level)


sections = st.fixed_dictionaries(
    {
        "max_rate": st.one_of(
            st.integers(min_value=1, max_value=60), st.floats(min_value=0.5, max_value=60)
        ),
        "time_period": st.sampled_from([0.001, 0.004, 0.01, 0.05, 0.5, 2.0]),
    }
)
# gaps around the credit's life (1 ms), and some long ones
gaps = st.one_of(
    st.sampled_from([0.0, 0.0, _CREDIT_S / 2, 0.9 * _CREDIT_S, _CREDIT_S, 2 * _CREDIT_S, 0.5]),
    st.floats(min_value=0.0, max_value=3 * _CREDIT_S),
    st.floats(min_value=0.0, max_value=0.05),
)
steps = st.lists(
    st.builds(Step, gap=gaps, calls=st.integers(min_value=1, max_value=12), spawned=st.booleans()),
    min_size=1,
    max_size=25,
)


class TestProperties:
    @settings(max_examples=150, deadline=None)
    @given(section=sections, schedule=steps)
    @example(  # credit calls late in the credit's life, then a burst at that instant
        section={"max_rate": 10, "time_period": 0.001},
        schedule=[Step(0.0, 2, False), Step(0.9 * _CREDIT_S, 12, False), Step(0.0, 12, True)],
    )
    def test_refusing_at_once(self, section: dict[str, Any], schedule: list[Step]) -> None:
        """max_wait 0: the window bound holds, and every refusal is one within 1 ms."""
        log = run_schedule(section, schedule)
        burst, rate = shape(section)
        assert len(log.events) == sum(s.calls for s in schedule)
        assert_within_rate(log.admitted(), burst, rate)
        assert_refusals_justified(log, burst, rate)

    @settings(max_examples=100, deadline=None)
    @given(
        section=sections,
        max_wait=st.sampled_from([0.0005, 0.002, 0.05, 1.0]),
        schedule=steps,
    )
    def test_with_waiters(
        self, section: dict[str, Any], max_wait: float, schedule: list[Step]
    ) -> None:
        """Callers that wait in aiolimiter's queue never push the rate over the bucket's."""
        log = run_schedule({**section, "max_wait": max_wait}, schedule)
        burst, rate = shape(section)
        assert len(log.events) == sum(s.calls for s in schedule)
        assert_within_rate(log.admitted(), burst, rate)


# 10,000 calls/s, a burst of 100: 1 ms of drain is 10 calls
SECTION: dict[str, Any] = {"max_rate": 100, "time_period": 0.01}


class TestCredit:
    def test_a_full_burst_after_credits_spent_long_ago(self) -> None:
        """Dense calls, a long pause, then a burst of max_rate: all of it passes at once."""
        log = run_schedule(SECTION, [Step(0.0, 30, False), Step(5.0, 100, False)])
        assert [kind for kind, _, _ in log.events] == ["ok"] * 130

    def test_a_burst_is_cut_at_max_rate(self) -> None:
        """Dense calls at one instant: exactly max_rate pass, as with the exact bucket."""
        log = run_schedule(SECTION, [Step(0.0, 130, False)])
        kinds = [kind for kind, _, _ in log.events]
        assert kinds == ["ok"] * 100 + ["refused"] * 30
        # the bucket drains one unit in 0.1 ms: the refusals say so, exactly
        assert log.events[100][2] == pytest.approx(1e-4)

    def test_a_waiter_sees_the_calls_of_the_credit(self) -> None:
        """Calls served from a credit count for the callers that must wait after them."""
        log = run_schedule(
            {**SECTION, "max_wait": 1.0}, [Step(0.0, 100, False), Step(0.0, 3, True)]
        )
        # 100 at once, then one per 0.1 ms
        assert log.admitted()[100:] == [pytest.approx(k * 1e-4) for k in (1, 2, 3)]

    def test_the_credit_ends_and_leaves_the_bucket_exact(self) -> None:
        """Some credit calls, 1 ms on: the bucket holds what an exact bucket would, or less room."""
        limiter_level: list[float] = []
        with VirtualClock() as clock:
            load(p={"rate_limit": SECTION})

            @resilient.resilient("p")
            async def work() -> None:
                return None

            async def main() -> None:
                for _ in range(20):
                    await work()
                await asyncio.sleep(0.01)  # the credit's timer has fired
                loop_limiter = get_rate_limiter("p").for_loop()
                assert loop_limiter.credit == 0
                bucket = loop_limiter.bucket
                bucket.has_capacity()
                limiter_level.append(bucket._level)

            clock.run(main())
        # 20 units at t=0, drained at 10,000/s for 10 ms: empty
        assert limiter_level == [0.0]

    def test_sparse_calls_take_no_credit(self) -> None:
        """Calls further apart than 1 ms use the exact path and arm no timer."""
        with VirtualClock() as clock:
            load(p={"rate_limit": SECTION})

            @resilient.resilient("p")
            async def work() -> None:
                return None

            async def main() -> list[int]:
                granted = []
                await asyncio.sleep(1.0)
                for _ in range(5):
                    await work()
                    lim = get_rate_limiter("p").for_loop()
                    granted.append(lim.granted)
                    await asyncio.sleep(0.01)
                return granted

            assert clock.run(main()) == [0, 0, 0, 0, 0]

    def test_each_loop_has_its_own_credit(self) -> None:
        """A second asyncio.run() gets a bucket (and credit) of its own, full."""
        load(p={"rate_limit": {"max_rate": 50, "time_period": 10.0}})

        @resilient.resilient("p")
        async def work() -> str:
            return "ok"

        async def burst() -> list[str]:
            return [await work() for _ in range(50)]

        assert asyncio.run(burst()) == ["ok"] * 50
        assert asyncio.run(burst()) == ["ok"] * 50

"""
Bulkheads: the limit holds under mixed async and thread load, every permit
comes back after cancellations, priorities order the waiters, thread-pool
isolation frees the caller, auto-scaling finds the knee, and bad input is a
clear PolicyError.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import load

import resilient
from resilient import AttemptTimeoutError, BulkheadConfig, BulkheadFullError, PolicyError
from resilient.bulkhead import Bulkhead, bulkhead_manager, get_bulkhead
from resilient.events import CallRejected


@pytest.fixture(autouse=True)
def _reset_bulkheads() -> Iterator[None]:
    bulkhead_manager.reset()
    yield
    bulkhead_manager.reset()


FIXED = {"enable_auto_scaling": False}


class InFlight:
    """Counts calls inside the guarded function, from tasks and threads alike."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.calls = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


class TestLimit:
    def test_tasks_and_threads_never_exceed_the_limit(self) -> None:
        """1,000 tasks plus 16 threads on one bulkhead: never more than 10 inside (measured)."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 10, "max_queue": 5000}})
        seen = InFlight()

        @resilient.resilient("p")
        async def async_call() -> None:
            seen.enter()
            await asyncio.sleep(0.001)
            seen.leave()

        @resilient.resilient("p")
        def sync_call() -> None:
            seen.enter()
            time.sleep(0.0005)
            seen.leave()

        def thread_body() -> None:
            for _ in range(40):
                sync_call()

        threads = [threading.Thread(target=thread_body) for _ in range(16)]

        async def main() -> None:
            for thread in threads:
                thread.start()
            await asyncio.gather(*(async_call() for _ in range(1000)))

        asyncio.run(main())
        for thread in threads:
            thread.join()
        assert seen.calls == 1000 + 16 * 40
        assert seen.peak <= 10
        assert seen.peak == 10  # the limit was actually reached: the test measured something
        status = get_bulkhead("p").get_status()
        assert status["in_use"] == 0
        assert status["queued"] == 0
        assert status["rejected"] == 0

    def test_full_queue_rejects_at_once_and_says_so(self) -> None:
        """With the queue full the next caller gets BulkheadFullError immediately, plus an event."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 1, "max_queue": 1}})
        events: list[Any] = []
        resilient.subscribe(events.append)
        gate = asyncio.Event

        async def main() -> None:
            release = gate()

            @resilient.resilient("p")
            async def hold() -> None:
                await release.wait()

            first = asyncio.create_task(hold())
            second = asyncio.create_task(hold())
            await asyncio.sleep(0.01)
            began = time.perf_counter()
            with pytest.raises(BulkheadFullError) as info:
                await hold()
            assert time.perf_counter() - began < 0.05
            assert info.value.policy == "p"
            release.set()
            await asyncio.gather(first, second)

        asyncio.run(main())
        rejected = [e for e in events if isinstance(e, CallRejected)]
        assert [e.reason for e in rejected] == ["bulkhead_full"]
        assert get_bulkhead("p").get_status()["rejected"] == 1

    def test_waits_up_to_acquire_timeout(self) -> None:
        """A waiter gives up after acquire_timeout; a sync waiter too."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 1, "acquire_timeout": 0.05}})
        bulkhead = get_bulkhead("p")
        assert bulkhead.try_acquire()
        began = time.perf_counter()
        with pytest.raises(BulkheadFullError, match=r"no slot within 0\.05s"):
            asyncio.run(bulkhead.acquire_async())
        with pytest.raises(BulkheadFullError):
            bulkhead.acquire_sync()
        assert time.perf_counter() - began >= 0.1
        bulkhead.release()
        assert bulkhead.get_status() | {"utilisation": 0} == {
            **bulkhead.get_status(),
            "in_use": 0,
            "queued": 0,
            "rejected": 2,
            "utilisation": 0,
        }

    def test_each_waiter_keeps_its_own_deadline(self) -> None:
        """
        The waiters share one timer per loop, yet each gives up exactly
        acquire_timeout after it queued; one handed a slot before its deadline
        keeps it; a reload of acquire_timeout applies to the waiters that
        queue after it (virtual time).
        """
        from resilient.testing import VirtualClock

        section = {**FIXED, "max_concurrent_requests": 1, "acquire_timeout": 1.0}
        load(p={"bulkhead": section})
        outcome: dict[str, tuple[str, float]] = {}

        @resilient.resilient(policy="p")
        async def hold(seconds: float) -> None:
            await asyncio.sleep(seconds)

        async def caller(name: str, start: float, seconds: float) -> None:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(start)
            try:
                await hold(seconds)
            except BulkheadFullError:
                outcome[name] = ("full", round(loop.time(), 6))
            else:
                outcome[name] = ("ran", round(loop.time(), 6))

        async def reload_at(when: float) -> None:
            await asyncio.sleep(when)
            load(p={"bulkhead": {**section, "acquire_timeout": 3.0}})

        async def main() -> None:
            await asyncio.gather(
                caller("holder", 0.0, 1.2),  # holds the only slot until 1.2
                caller("first", 0.1, 0.1),  # deadline 1.1: gives up
                caller("second", 0.5, 2.0),  # deadline 1.5: gets the slot at 1.2, runs to 3.2
                caller("third", 0.8, 0.1),  # deadline 1.8: gives up
                reload_at(1.9),
                caller("fourth", 2.0, 0.1),  # queued after the reload: deadline 5.0, slot at 3.2
            )

        with VirtualClock() as clock:
            clock.run(main())
            assert get_bulkhead("p").rejected == 2
        assert outcome == {
            "holder": ("ran", 1.2),
            "first": ("full", 1.1),
            "second": ("ran", 3.2),
            "third": ("full", 1.8),
            "fourth": ("ran", 3.3),
        }

    def test_rejection_is_not_a_breaker_failure(self) -> None:
        """A full bulkhead says nothing about the dependency: the breaker does not count it."""
        load(
            p={
                "bulkhead": {**FIXED, "max_concurrent_requests": 1, "acquire_timeout": 0},
                "circuit_breaker": {"failure_threshold": 1},
            }
        )

        @resilient.resilient("p")
        def call() -> str:
            return "ok"

        bulkhead = get_bulkhead("p")
        assert bulkhead.try_acquire()
        for _ in range(3):
            with pytest.raises(BulkheadFullError):
                call()
        bulkhead.release()
        assert resilient.get_breaker("p").state == "closed"
        assert call() == "ok"


class TestCancellation:
    def test_ten_thousand_cancelled_waiters_and_callers_give_every_permit_back(self) -> None:
        """Cancel callers inside and waiters in the queue, racing with hand-overs: in_use -> 0."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 50, "max_queue": 20000}})
        rng = random.Random(7)

        async def main() -> None:
            release = asyncio.Event()

            @resilient.resilient("p")
            async def hold() -> None:
                await release.wait()

            tasks = [asyncio.create_task(hold()) for _ in range(10_000)]
            await asyncio.sleep(0)
            bulkhead = get_bulkhead("p")
            assert bulkhead.in_use == 50
            assert bulkhead.queued == 10_000 - 50
            doomed = rng.sample(tasks, 9_000)
            for task in doomed[:4_500]:
                task.cancel()
            release.set()  # holders finish and hand slots to waiters ...
            for task in doomed[4_500:]:
                task.cancel()  # ... some of which are cancelled before they wake
            results = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
            assert 4_500 <= cancelled <= 9_000
            assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)

        asyncio.run(main())
        status = get_bulkhead("p").get_status()
        assert status["in_use"] == 0
        assert status["queued"] == 0
        assert len(get_bulkhead("p")._heap) < 100  # dead entries were compacted away

    def test_thread_waiter_interrupted_gives_its_slot_back(self) -> None:
        """A waiter whose slot arrives as it times out keeps the slot, or passes it on."""
        bulkhead = Bulkhead("b", BulkheadConfig(max_concurrent_requests=1, **FIXED))
        for _ in range(200):
            assert bulkhead.try_acquire()
            bulkhead.acquire_timeout = 0.0005
            releaser = threading.Timer(0.0005, bulkhead.release)
            releaser.start()
            try:
                bulkhead.acquire_sync()
            except BulkheadFullError:
                releaser.join()
            else:
                releaser.join()
                bulkhead.release()
            assert bulkhead.in_use == 0
            assert bulkhead.queued == 0


class TestPriority:
    def test_highest_first_fifo_within(self) -> None:
        """Waiters are served critical > high > normal > low, in arrival order within one."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 1}})
        order: list[str] = []

        async def main() -> None:
            release = asyncio.Event()

            @resilient.resilient("p")
            async def hold() -> None:
                await release.wait()

            @resilient.resilient("p")
            async def work(tag: str) -> None:
                order.append(tag)

            @resilient.resilient("p", priority="low")
            async def background(tag: str) -> None:
                order.append(tag)

            holder = asyncio.create_task(hold())
            await asyncio.sleep(0)
            tasks = []
            plan = [
                ("low", "low-1"),
                ("normal", "normal-1"),
                ("critical", "critical-1"),
                ("low", "low-2"),
                ("high", "high-1"),
                ("normal", "normal-2"),
                ("high", "high-2"),
            ]
            for level, tag in plan:
                if level == "low":
                    tasks.append(asyncio.create_task(background(tag)))
                else:
                    with resilient.priority(level):
                        tasks.append(asyncio.create_task(work(tag)))
                await asyncio.sleep(0)
            release.set()
            await asyncio.gather(holder, *tasks)

        asyncio.run(main())
        assert order == [
            "critical-1",
            "high-1",
            "high-2",
            "normal-1",
            "normal-2",
            "low-1",
            "low-2",
        ]

    def test_context_wins_over_the_decorator(self) -> None:
        """A `resilient.priority` block overrides the decorator's priority."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 1}})
        order: list[str] = []

        async def main() -> None:
            release = asyncio.Event()

            @resilient.resilient("p")
            async def hold() -> None:
                await release.wait()

            @resilient.resilient("p", priority="low")
            async def work(tag: str) -> None:
                order.append(tag)

            holder = asyncio.create_task(hold())
            await asyncio.sleep(0)
            first = asyncio.create_task(work("plain-low"))
            await asyncio.sleep(0)
            with resilient.priority("critical"):
                assert resilient.current_priority() == "critical"
                second = asyncio.create_task(work("critical"))
            assert resilient.current_priority() is None
            await asyncio.sleep(0)
            release.set()
            await asyncio.gather(holder, first, second)

        asyncio.run(main())
        assert order == ["critical", "plain-low"]

    def test_aging_lets_low_priority_through(self) -> None:
        """With priority_aging a low waiter that waited long enough beats a fresh high one."""
        now = [0.0]
        config = BulkheadConfig(max_concurrent_requests=1, priority_aging=1.0, **FIXED)
        bulkhead = Bulkhead("b", config, clock=lambda: now[0])
        order: list[str] = []

        async def waiter(tag: str, level: str) -> None:
            await bulkhead.acquire_async(resilient.bulkhead.priority_level(level))
            order.append(tag)
            bulkhead.release()

        async def main() -> None:
            assert bulkhead.try_acquire()
            old_low = asyncio.create_task(waiter("old-low", "low"))
            await asyncio.sleep(0)
            now[0] = 3.5  # low has aged 3.5 levels: above a fresh "high" (2), below "critical"+
            fresh_high = asyncio.create_task(waiter("fresh-high", "high"))
            await asyncio.sleep(0)
            bulkhead.release()
            await asyncio.gather(old_low, fresh_high)

        asyncio.run(main())
        assert order == ["old-low", "fresh-high"]

    def test_fifo_when_priority_queuing_is_off(self) -> None:
        """priority_queuing: false serves waiters in arrival order."""
        config = BulkheadConfig(max_concurrent_requests=1, priority_queuing=False, **FIXED)
        bulkhead = Bulkhead("b", config)
        order: list[str] = []

        async def waiter(tag: str, level: str) -> None:
            await bulkhead.acquire_async(resilient.bulkhead.priority_level(level))
            order.append(tag)
            bulkhead.release()

        async def main() -> None:
            assert bulkhead.try_acquire()
            tasks = []
            for tag, level in [("a", "low"), ("b", "critical"), ("c", "normal")]:
                tasks.append(asyncio.create_task(waiter(tag, level)))
                await asyncio.sleep(0)
            bulkhead.release()
            await asyncio.gather(*tasks)

        asyncio.run(main())
        assert order == ["a", "b", "c"]


POOLED: dict[str, Any] = {
    "bulkhead": {
        **FIXED,
        "isolation": "thread_pool",
        "max_thread_pool_size": 2,
        "acquire_timeout": 0,
    },
    "timeout": {"per_attempt": 0.1},
}


class TestThreadPool:
    def test_hung_dependency_exhausts_its_pool_not_the_caller(self) -> None:
        """The caller's thread is back after the per-attempt budget; the pool fills up."""
        load(p=POOLED)
        hang = threading.Event()
        ran_in: list[str] = []

        @resilient.resilient("p")
        def stuck() -> None:
            ran_in.append(threading.current_thread().name)
            hang.wait(10)

        try:
            for _ in range(2):
                began = time.perf_counter()
                with pytest.raises(AttemptTimeoutError):
                    stuck()
                assert time.perf_counter() - began < 1.0  # the caller was not held by the hang
            assert get_bulkhead("p").in_use == 2  # the hung calls keep their slots
            with pytest.raises(BulkheadFullError):
                stuck()
            assert all(name.startswith("resilient-p-") for name in ran_in)
            assert threading.current_thread().name not in ran_in
        finally:
            hang.set()
        deadline = time.monotonic() + 5
        while get_bulkhead("p").in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        assert get_bulkhead("p").in_use == 0

    def test_results_and_errors_come_back_unchanged(self) -> None:
        """A pooled call returns its value, or raises the very exception object it raised."""
        load(p=POOLED)
        error = KeyError("boom")

        @resilient.resilient("p")
        def compute(x: int) -> int:
            if x < 0:
                raise error
            return x * 2

        assert compute(21) == 42
        with pytest.raises(KeyError) as info:
            compute(-1)
        assert info.value is error

    def test_async_callers_await_without_blocking_the_loop(self) -> None:
        """acall_sync runs a sync function off the loop; the loop keeps ticking meanwhile."""
        load(p={**POOLED, "timeout": {"per_attempt": 1.0}})

        def slow(x: int) -> int:
            time.sleep(0.2)
            return x + 1

        async def main() -> tuple[int, int]:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            tick = asyncio.create_task(ticker())
            with resilient.priority("high"):
                result = await resilient.acall_sync("p", slow, 1)
            tick.cancel()
            return result, ticks

        result, ticks = asyncio.run(main())
        assert result == 2
        assert ticks >= 5


def simulate_knee(knee: int, *, seconds: float, clients: int = 200, seed: int = 1) -> list[int]:
    """
    Closed-loop clients against a dependency that serves `knee` calls at once:
    latency is flat up to the knee and grows linearly past it (a saturated
    server queues). Runs in virtual time; returns the limit after each call.
    """
    rng = random.Random(seed)
    now = [0.0]
    config = BulkheadConfig(max_concurrent_requests=clients, max_queue=10 * clients)
    bulkhead = Bulkhead("sim", config, clock=lambda: now[0])
    base = 0.05
    finishing: list[tuple[float, int, float]] = []
    waiting = 0
    seq = 0

    def start() -> None:
        nonlocal seq
        latency = base * max(1.0, bulkhead.in_use / knee) * rng.uniform(0.95, 1.05)
        seq += 1
        heapq.heappush(finishing, (now[0] + latency, seq, latency))

    for _ in range(clients):
        if bulkhead.try_acquire():
            start()
        else:
            waiting += 1
    limits: list[int] = []
    while now[0] < seconds:
        done_at, _, latency = heapq.heappop(finishing)
        now[0] = done_at
        bulkhead.release_timed(latency)
        waiting += 1  # the client comes straight back
        while waiting and bulkhead.try_acquire():
            waiting -= 1
            start()
        limits.append(bulkhead.limit)
    return limits


class TestAutoScaling:
    @pytest.mark.parametrize(("knee", "seed"), [(10, 1), (40, 2), (60, 3)])
    def test_settles_near_the_knee(self, knee: int, seed: int) -> None:
        """Starting at 200, the limit settles within ±25% of the knee (virtual time)."""
        limits = simulate_knee(knee, seconds=240.0, seed=seed)
        tail = limits[len(limits) // 2 :]
        tail_sorted = sorted(tail)
        median = tail_sorted[len(tail) // 2]
        in_band = sum(0.75 * knee <= x <= 1.25 * knee for x in tail) / len(tail)
        assert 0.75 * knee <= median <= 1.25 * knee, median
        assert in_band >= 0.9, in_band  # short no-load probes aside

    @pytest.mark.parametrize("scenario", ["healthy", "healthy_noisy"])
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_healthy_backend_is_not_throttled(self, scenario: str, seed: int) -> None:
        """
        Regression: 200 calls/s against a healthy backend (20 ms median, 100 ms
        p99; healthy_noisy: 400 ms p99 and 5% errors) through max 10 slots. The
        load needs ~5 (~9 noisy) slots on average; latency noise used to be read
        as a gradient and the limit collapsed to 1, rejecting 60-77% of calls.
        Auto-scaling (the default) must reject no more than a fixed limit.
        """
        from resilient.testing import healthy, healthy_noisy, simulate

        backend = healthy() if scenario == "healthy" else healthy_noisy()
        results = {}
        for auto in (True, False):
            section = BulkheadConfig(max_concurrent_requests=10, enable_auto_scaling=auto)
            policy = resilient.Policy(bulkhead=section)
            results[auto] = simulate(policy, backend, duration=60, rate=200, seed=seed)
        scaled, fixed = results[True], results[False]
        assert scaled.attempted > 10_000
        assert scaled.rejected_bulkhead / scaled.attempted <= 0.01
        assert scaled.rejected_bulkhead <= fixed.rejected_bulkhead + 0.001 * fixed.attempted
        if scenario == "healthy":  # (at ~90% busy, healthy_noisy queues either way)
            assert scaled.latency.p99 <= 1.5 * fixed.latency.p99

    def test_idle_limit_shrinks_and_busy_limit_grows(self) -> None:
        """Low utilisation shrinks the limit; full utilisation at flat latency grows it back."""
        now = [0.0]
        config = BulkheadConfig(max_concurrent_requests=100)
        bulkhead = Bulkhead("b", config, clock=lambda: now[0])
        for _ in range(2000):  # one call at a time: utilisation 1%
            assert bulkhead.try_acquire()
            now[0] += 0.01
            bulkhead.release_timed(0.01)
        low = bulkhead.limit
        assert low < 50
        held = 0
        for _ in range(2000):  # keep it full at the same latency
            while bulkhead.try_acquire():
                held += 1
            now[0] += 0.01
            bulkhead.release_timed(0.01)
            held -= 1
        assert bulkhead.limit > low * 2

    def test_a_busy_event_loop_is_not_read_as_a_slow_dependency(self) -> None:
        """
        Regression (issue #15): tasks doing fast I/O through an auto-scaling
        bulkhead of 600. Each call's latency is mostly the wait of its task in
        the loop's ready queue, which grows with the number of tasks like a
        dependency past a knee at 1. The limit used to be cut to 1 or 2 (a 2x
        throughput collapse, every waiter with a timer of its own). Now 50
        tasks let the limit shrink to what they use, 500 tasks then grow it
        back, and once it has grown nobody waits.
        """
        load(io={"bulkhead": {"max_concurrent_requests": 600}})
        limits: list[int] = []
        queued: list[int] = []

        @resilient.resilient(policy="io")
        async def fetch() -> int:
            await asyncio.sleep(0)  # one turn of the loop, as any real I/O
            return 1

        async def worker(calls: int) -> int:
            total = 0
            for _ in range(calls):
                total += await fetch()
                status = get_bulkhead("io").get_status()
                limits.append(status["limit"])
                queued.append(status["queued"])
            return total

        async def main() -> None:
            assert await asyncio.gather(*(worker(120) for _ in range(50))) == [120] * 50
            shrunk = get_bulkhead("io").limit
            assert shrunk < 200, shrunk  # idle headroom was given back
            del limits[:], queued[:]
            assert await asyncio.gather(*(worker(40) for _ in range(500))) == [40] * 500

        asyncio.run(main())
        bulkhead = get_bulkhead("io")
        assert bulkhead.controller is not None
        assert bulkhead.controller.lag_loop is not None  # the loop was watched
        assert bulkhead.rejected == 0
        later = len(limits) // 2
        assert min(limits[later:]) >= 500, min(limits[later:])
        assert max(queued[later:]) == 0

    @pytest.mark.parametrize("knee", [10, 40])
    def test_on_an_event_loop_the_knee_is_still_found(self, knee: int) -> None:
        """
        The loop's delay is measured on the loop the calls run on (virtual time
        here: it is zero): a dependency past its knee is still cut to it, from
        200 tasks through a bulkhead of 200.
        """
        from resilient.testing import VirtualClock

        clients = 200
        load(dep={"bulkhead": {"max_concurrent_requests": clients, "max_queue": 10 * clients}})
        rng = random.Random(knee)
        running = 0
        limits: list[int] = []

        @resilient.resilient(policy="dep")
        async def call() -> None:
            nonlocal running
            running += 1
            try:
                await asyncio.sleep(0.05 * max(1.0, running / knee) * rng.uniform(0.95, 1.05))
            finally:
                running -= 1

        async def client(loop: asyncio.AbstractEventLoop, until: float) -> None:
            while loop.time() < until:
                await call()
                limits.append(get_bulkhead("dep").limit)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(client(loop, 120.0) for _ in range(clients)))

        with VirtualClock() as clock:
            clock.run(main())
            controller = get_bulkhead("dep").controller
            assert controller is not None
            assert controller.lag_loop is not None  # the loop was watched
        tail = sorted(limits[len(limits) // 2 :])
        median = tail[len(tail) // 2]
        assert 0.75 * knee <= median <= 1.25 * knee, median


class TestConnectionPool:
    def test_bounded_reused_validated_and_discarded(self) -> None:
        """At most max_size resources; reused; invalid or failed ones are closed and replaced."""
        made: list[dict[str, Any]] = []
        closed: list[dict[str, Any]] = []

        async def connect() -> dict[str, Any]:
            conn = {"id": len(made), "ok": True}
            made.append(conn)
            return conn

        pool = bulkhead_manager.connection_pool(
            "db", connect, max_size=2, validate=lambda c: c["ok"], close=closed.append
        )
        peak = InFlight()

        async def use(i: int) -> None:
            async with resilient.bulkhead_manager.connection("db") as conn:
                peak.enter()
                await asyncio.sleep(0.001)
                peak.leave()
                if i == 3:
                    conn["ok"] = False  # goes back, fails validation next time
                if i == 7:
                    raise ConnectionError("broken")

        async def main() -> None:
            results = await asyncio.gather(*(use(i) for i in range(20)), return_exceptions=True)
            assert sum(isinstance(r, ConnectionError) for r in results) == 1

        asyncio.run(main())
        assert peak.peak == 2
        assert len(made) <= 4
        assert len(closed) == 2  # the invalid one and the broken one
        status = bulkhead_manager.get_all_pools_status()["db"]
        assert status["kind"] == "connection_pool"
        assert status["in_use"] == 0
        assert status["max_size"] == 2
        assert status["size"] == len(made) - len(closed)
        asyncio.run(pool.aclose())


class TestStatus:
    def test_all_pools_status(self) -> None:
        """get_all_pools_status reports in_use, queued, limit, rejected and utilisation."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 4}})
        bulkhead = get_bulkhead("p")
        assert bulkhead.try_acquire()
        status = resilient.bulkhead_manager.get_all_pools_status()["p"]
        assert status["in_use"] == 1
        assert status["queued"] == 0
        assert status["limit"] == 4
        assert status["rejected"] == 0
        assert status["utilisation"] == 0.25
        bulkhead.release()

    def test_shared_per_policy_and_own_with_name(self) -> None:
        """Functions of one policy share a bulkhead; name= gives one of its own."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 4}})

        @resilient.resilient("p")
        def a() -> None: ...

        @resilient.resilient("p", name="mine")
        def b() -> None: ...

        a()
        b()
        assert set(bulkhead_manager.bulkheads()) == {"p", "mine"}


class TestBadInput:
    @pytest.mark.parametrize(
        ("section", "fragment"),
        [
            ({"max_concurrent_requests": -1}, "greater than 0"),
            ({"max_thread_pool_size": 0}, "greater than 0"),
            ({"max_queue": -5}, "greater than or equal to 0"),
            ({"acquire_timeout": -1}, "greater than or equal to 0"),
            (
                {"scale_down_threshold": 0.8, "scale_up_threshold": 0.5},
                "scale_down_threshold (0.8) must be smaller than scale_up_threshold (0.5)",
            ),
            ({"default_priority": "urgent"}, "urgent"),
            ({"isolation": "process"}, "process"),
            ({"min_concurrent_requests": 10, "max_concurrent_requests": 5}, "is larger than"),
        ],
    )
    def test_policy_error_names_file_line_and_key(
        self, tmp_path: Path, section: dict[str, Any], fragment: str
    ) -> None:
        """Bad bulkhead values are PolicyErrors with the file, the line and the key."""
        import yaml

        path = tmp_path / "resilience.yaml"
        text = yaml.safe_dump({"version": 1, "policies": {"p": {"bulkhead": section}}})
        path.write_text(text)
        with pytest.raises(PolicyError) as info:
            resilient.load_policies(path)
        message = str(info.value)
        assert fragment in message
        assert str(path) in message
        assert "policies.p.bulkhead" in message
        assert info.value.line is not None

    def test_unknown_priority_names(self) -> None:
        """Unknown priority names fail loudly, with a suggestion, at decoration or entry."""
        with pytest.raises(PolicyError, match=r"unknown priority 'hihg' \(did you mean 'high'\?\)"):
            resilient.priority("hihg")
        with pytest.raises(PolicyError, match="known priorities: low, normal, high, critical"):

            @resilient.resilient("p", priority="urgent")
            def f() -> None: ...

    def test_env_overrides(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """RESILIENCE_MAX_CONCURRENT_REQUESTS and RESILIENCE_BULKHEAD_ENABLED (the seed's)."""
        policies = {"version": 1, "policies": {"p": {"bulkhead": {"max_concurrent_requests": 5}}}}
        env = {"RESILIENCE_MAX_CONCURRENT_REQUESTS": "7"}
        loaded = resilient.load_policies(policies, env=env)
        assert loaded["p"].bulkhead is not None
        assert loaded["p"].bulkhead.max_concurrent_requests == 7
        loaded = resilient.load_policies(policies, env={"RESILIENCE_BULKHEAD_ENABLED": "false"})
        assert loaded["p"].bulkhead is None

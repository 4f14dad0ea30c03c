"""
Bulkheads under hostile concurrency (issue 10): connection pools cancelled at
every await, one priority object shared by many tasks and threads, and a
reload that changes a bulkhead while calls are in flight and waiting.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import load

import resilient
from resilient.bulkhead import bulkhead_manager, get_bulkhead

FIXED = {"enable_auto_scaling": False}


@pytest.fixture(autouse=True)
def _reset_bulkheads() -> Iterator[None]:
    bulkhead_manager.reset()
    yield
    bulkhead_manager.reset()


class Conn:
    """A fake resource that knows whether it was closed."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False


class TestConnectionPoolCancellation:
    def test_cancelled_during_async_validate_closes_the_connection(self) -> None:
        """A checkout cancelled while validate awaits: the popped connection is closed, not lost."""
        made: list[Conn] = []

        async def connect() -> Conn:
            made.append(Conn(len(made)))
            return made[-1]

        async def validate(conn: Conn) -> bool:
            await asyncio.Event().wait()  # a health check that never answers in time
            return True

        async def close(conn: Conn) -> None:
            await asyncio.sleep(0)
            conn.closed = True

        pool = bulkhead_manager.connection_pool(
            "db", connect, max_size=5, validate=validate, close=close
        )

        async def main() -> None:
            for _ in range(100):
                # one idle connection, then a checkout cancelled inside validate
                if pool.get_status()["idle"] == 0:
                    async with pool.connection():
                        pass
                task = asyncio.create_task(_use(pool))
                await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                status = pool.get_status()
                assert status["size"] <= 5
                assert status["in_use"] == 0
            await pool.aclose()

        asyncio.run(main())
        assert all(conn.closed for conn in made)
        assert pool.get_status()["size"] == 0

    def test_cancellation_storm_at_every_await_point(self) -> None:
        """Checkouts, validations, user blocks and closes cancelled at random: nothing leaks."""
        rng = random.Random(11)
        made: list[Conn] = []
        open_now = [0]
        peak = [0]

        async def connect() -> Conn:
            await asyncio.sleep(rng.random() * 0.001)
            made.append(Conn(len(made)))
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
            return made[-1]

        async def validate(conn: Conn) -> bool:
            await asyncio.sleep(rng.random() * 0.001)
            return rng.random() < 0.8

        async def close(conn: Conn) -> None:
            # counted from the moment the pool hands it over for closing: a close is
            # asynchronous, and the pool may open a replacement meanwhile
            open_now[0] -= 1
            await asyncio.sleep(rng.random() * 0.001)
            conn.closed = True

        pool = bulkhead_manager.connection_pool(
            "db", connect, max_size=5, validate=validate, close=close, discard_on_error=True
        )

        async def user(i: int) -> None:
            async with pool.connection() as conn:
                assert not conn.closed
                await asyncio.sleep(rng.random() * 0.002)
                if i % 7 == 0:
                    raise ConnectionError("broken")

        async def main() -> None:
            tasks = [asyncio.create_task(user(i)) for i in range(600)]
            for _ in range(300):
                await asyncio.sleep(rng.random() * 0.0005)
                rng.choice(tasks).cancel()
                assert pool.get_status()["size"] <= 5
            await asyncio.gather(*tasks, return_exceptions=True)
            # closes started by cancelled checkouts finish on their own
            for _ in range(100):
                if all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task()):
                    break
                await asyncio.sleep(0.001)
            assert pool.get_status()["in_use"] == 0
            assert pool.get_status()["size"] == pool.get_status()["idle"] <= 5
            await pool.aclose()

        asyncio.run(main())
        assert peak[0] <= 5
        assert open_now[0] == 0
        assert [c.number for c in made if not c.closed] == []
        assert pool.get_status()["size"] == 0


async def _use(pool: Any) -> None:
    async with pool.connection():
        pass


class TestSharedPriority:
    def test_one_priority_object_shared_by_tasks(self) -> None:
        """One resilient.priority object entered by 200 overlapping tasks: no ValueError."""
        high = resilient.priority("high")
        seen: list[str | None] = []

        async def worker(i: int) -> None:
            with high:
                await asyncio.sleep(random.random() * 0.001)
                with high:  # re-entrant as well
                    await asyncio.sleep(0)
                    seen.append(resilient.current_priority())
                seen.append(resilient.current_priority())
            seen.append(resilient.current_priority())

        async def main() -> None:
            await asyncio.gather(*(worker(i) for i in range(200)))

        asyncio.run(main())
        assert seen.count("high") == 400
        assert seen.count(None) == 200

    def test_one_priority_object_shared_by_threads(self) -> None:
        """Threads entering and leaving one priority object at once each see their own state."""
        critical = resilient.priority("critical")
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def body() -> None:
            try:
                barrier.wait()
                for _ in range(2000):
                    with critical:
                        time.sleep(0)  # let the other threads enter meanwhile
                        assert resilient.current_priority() == "critical"
                    assert resilient.current_priority() is None
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=body) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []

    def test_shared_priority_orders_the_waiters(self) -> None:
        """Waiters in blocks of one shared object are served before normal ones."""
        load(p={"bulkhead": {**FIXED, "max_concurrent_requests": 1}})
        high = resilient.priority("high")
        order: list[str] = []

        async def main() -> None:
            release = asyncio.Event()

            @resilient.resilient("p")
            async def hold() -> None:
                await release.wait()

            @resilient.resilient("p")
            async def work(tag: str) -> None:
                order.append(tag)

            async def urgent(tag: str) -> None:
                with high:
                    await work(tag)

            holder = asyncio.create_task(hold())
            await asyncio.sleep(0)
            tasks = [asyncio.create_task(work("normal-1"))]
            tasks += [asyncio.create_task(urgent(f"high-{i}")) for i in range(3)]
            await asyncio.sleep(0)
            release.set()
            await asyncio.gather(holder, *tasks)

        asyncio.run(main())
        assert order == ["high-0", "high-1", "high-2", "normal-1"]


class TestReload:
    def test_reload_4_to_5_never_runs_more_than_5(self) -> None:
        """Calls in flight and waiting on the old bulkhead count against the new one."""
        section = {**FIXED, "max_queue": 100, "acquire_timeout": 30}
        load(p={"bulkhead": {**section, "max_concurrent_requests": 4}})
        state = {"now": 0, "peak": 0}

        async def main() -> None:
            release = asyncio.Event()

            @resilient.resilient("p")
            async def call() -> None:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
                try:
                    await release.wait()
                finally:
                    state["now"] -= 1

            first = [asyncio.create_task(call()) for _ in range(6)]  # 4 run, 2 wait
            await asyncio.sleep(0.01)
            assert state["now"] == 4
            load(p={"bulkhead": {**section, "max_concurrent_requests": 5}})
            second = [asyncio.create_task(call()) for _ in range(6)]
            await asyncio.sleep(0.01)
            assert state["now"] == 5  # one more than before, not 4 + 5
            status = get_bulkhead("p").get_status()
            assert status["limit"] == 5
            assert status["in_use"] == 5
            assert status["queued"] == 7
            release.set()
            await asyncio.gather(*first, *second)

        asyncio.run(main())
        assert state["peak"] == 5
        assert state["now"] == 0
        status = get_bulkhead("p").get_status()
        assert status["in_use"] == 0
        assert status["queued"] == 0

    def test_reload_to_a_smaller_limit_drains_first(self) -> None:
        """5 -> 2 with 5 in flight: no new call starts until fewer than 2 run."""
        section = {**FIXED, "max_queue": 100, "acquire_timeout": 30}
        load(p={"bulkhead": {**section, "max_concurrent_requests": 5}})
        state = {"now": 0, "peak_after": 0}
        reloaded = [False]

        async def main() -> None:
            gates = [asyncio.Event() for _ in range(10)]

            @resilient.resilient("p")
            async def call(i: int) -> None:
                state["now"] += 1
                if reloaded[0]:
                    state["peak_after"] = max(state["peak_after"], state["now"])
                try:
                    await gates[i].wait()
                finally:
                    state["now"] -= 1

            tasks = [asyncio.create_task(call(i)) for i in range(5)]
            await asyncio.sleep(0.01)
            load(p={"bulkhead": {**section, "max_concurrent_requests": 2}})
            reloaded[0] = True
            tasks += [asyncio.create_task(call(i)) for i in range(5, 10)]
            await asyncio.sleep(0.01)
            assert state["now"] == 5
            for i in range(10):
                gates[i].set()
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)

        asyncio.run(main())
        assert state["peak_after"] <= 5
        assert get_bulkhead("p").get_status()["in_use"] == 0

    def test_reload_with_thread_callers(self) -> None:
        """Sync callers in flight across a reload count too; permits return to zero."""
        section = {**FIXED, "max_queue": 100, "acquire_timeout": 30}
        load(p={"bulkhead": {**section, "max_concurrent_requests": 3}})
        lock = threading.Lock()
        state = {"now": 0, "peak": 0}
        release = threading.Event()

        @resilient.resilient("p")
        def call() -> None:
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            release.wait(10)
            with lock:
                state["now"] -= 1

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
        _wait_for(lambda: state["now"] == 3)
        load(p={"bulkhead": {**section, "max_concurrent_requests": 4}})
        more = [threading.Thread(target=call) for _ in range(5)]
        for t in more:
            t.start()
        _wait_for(lambda: get_bulkhead("p").get_status()["queued"] == 6)
        _wait_for(lambda: state["now"] == 4)  # the waiter admitted by the new limit
        assert get_bulkhead("p").get_status()["in_use"] == 4
        release.set()
        for t in threads + more:
            t.join()
        assert state["peak"] == 4
        assert get_bulkhead("p").get_status()["in_use"] == 0


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.001)


class TestReloadKeepsState:
    def test_waiters_are_ordered_again_when_priorities_are_turned_on(self) -> None:
        """FIFO waiters of the old section are served by priority once a reload enables it."""
        section = {**FIXED, "max_concurrent_requests": 1, "acquire_timeout": 30}
        load(p={"bulkhead": {**section, "priority_queuing": False}})
        order: list[str] = []

        async def main() -> None:
            release = asyncio.Event()

            @resilient.resilient("p")
            async def hold() -> None:
                await release.wait()

            @resilient.resilient("p")
            async def work(tag: str) -> None:
                order.append(tag)

            async def at(level: str, tag: str) -> None:
                with resilient.priority(level):
                    await work(tag)

            holder = asyncio.create_task(hold())
            await asyncio.sleep(0)
            plan = [("low", "low-1"), ("normal", "normal-1"), ("critical", "critical-1")]
            tasks = [asyncio.create_task(at(level, tag)) for level, tag in plan]
            await asyncio.sleep(0)
            assert get_bulkhead("p").get_status()["queued"] == 3
            load(p={"bulkhead": {**section, "priority_queuing": True}})
            tasks.append(asyncio.create_task(at("high", "high-1")))  # rebuilds the bulkhead
            await asyncio.sleep(0)
            release.set()
            await asyncio.gather(holder, *tasks)

        asyncio.run(main())
        assert order == ["critical-1", "high-1", "normal-1", "low-1"]

    def test_auto_scaling_keeps_its_limit_when_only_other_settings_change(self) -> None:
        """A reload of acquire_timeout keeps what the controller learnt; a new ceiling does not."""
        section = {"max_concurrent_requests": 40, "min_concurrent_requests": 2}
        load(p={"bulkhead": {**section, "acquire_timeout": 5}})

        @resilient.resilient("p")
        def call() -> None: ...

        call()
        bulkhead = get_bulkhead("p")
        controller = bulkhead.controller
        assert controller is not None
        with bulkhead._lock:  # what a cut by the controller leaves behind
            controller._set(12, 0)
            bulkhead.limit = controller.effective
        load(p={"bulkhead": {**section, "acquire_timeout": 9}})
        call()
        assert get_bulkhead("p") is bulkhead
        assert bulkhead.controller is controller
        assert bulkhead.limit == 12
        assert bulkhead.acquire_timeout == 9
        load(p={"bulkhead": {**section, "max_concurrent_requests": 30, "acquire_timeout": 9}})
        call()
        assert bulkhead.controller is not controller
        assert bulkhead.limit == 30
        assert bulkhead.get_status()["in_use"] == 0

"""Health monitoring (issue 11): checks, hysteresis, scores, recovery, passive health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

import pytest
from conftest import load
from pydantic import ValidationError

import resilient
from resilient import HealthCheckConfig, PolicyError
from resilient.errors import ServiceNotFoundError
from resilient.events import HealthChanged
from resilient.health import HealthMonitor, HealthStatus, health_score

FAST = HealthCheckConfig(
    check_interval=0.02, timeout=0.5, failure_threshold=3, recovery_threshold=2
)


class Flag:
    """A dependency that is up or down."""

    def __init__(self) -> None:
        self.up = True
        self.calls = 0

    def probe(self) -> bool:
        self.calls += 1
        return self.up


class TestStatus:
    async def test_unknown_before_the_first_result_then_healthy(self) -> None:
        monitor = HealthMonitor(FAST)
        monitor.add_check("db", lambda: True)
        assert monitor.get_service_health("db")["status"] == "unknown"
        assert monitor.get_service_health("db")["score"] is None
        health = await monitor.run_check("db")
        assert health["status"] == HealthStatus.HEALTHY == "healthy"
        assert health["score"] == pytest.approx(100.0, abs=0.5)
        json.dumps(monitor.get_system_health_summary())

    async def test_hysteresis_a_flapping_check_does_not_flap_the_status(self) -> None:
        monitor = HealthMonitor(FAST)
        flag = Flag()
        monitor.add_check("db", flag.probe)
        changes: list[HealthChanged] = []
        monitor.on_change(changes.append)
        statuses = []
        for i in range(11):
            flag.up = i % 2 == 0  # pass, fail, pass, fail ...
            statuses.append((await monitor.run_check("db"))["status"])
        assert set(statuses) == {"healthy"}
        assert [(c.old_status, c.new_status) for c in changes] == [("unknown", "healthy")]
        # failure_threshold failures in a row make it unhealthy, recovery_threshold passes heal it
        flag.up = False
        assert [(await monitor.run_check("db"))["status"] for _ in range(3)] == [
            "healthy",
            "healthy",
            "unhealthy",
        ]
        flag.up = True
        assert [(await monitor.run_check("db"))["status"] for _ in range(2)] == [
            "unhealthy",
            "healthy",
        ]
        assert [c.new_status for c in changes] == ["healthy", "unhealthy", "healthy"]

    async def test_non_critical_failure_and_slowness_degrade(self) -> None:
        monitor = HealthMonitor(
            HealthCheckConfig(failure_threshold=1, response_time_threshold=0.05, timeout=1.0)
        )
        monitor.add_check("db", lambda: True)
        monitor.add_check("db", lambda: False, critical=False, name="replica")
        health = await monitor.run_check("db")
        assert health["status"] == "degraded"
        assert "replica" in health["reason"]
        assert health["critical"] is True

        async def slow() -> bool:
            await asyncio.sleep(0.08)
            return True

        monitor.add_check("api", slow)
        health = await monitor.run_check("api")
        assert health["status"] == "degraded"
        assert "response time" in health["reason"]

    def test_score_is_monotone_and_documented(self) -> None:
        cfg = HealthCheckConfig(response_time_threshold=2.0, error_rate_threshold=0.1)
        assert health_score(0.0, 0.0, cfg) == 100.0
        assert health_score(2.0, 0.0, cfg) == 50.0  # at its threshold: halved
        assert health_score(0.0, 0.1, cfg) == 50.0
        assert health_score(2.0, 0.1, cfg) == 25.0
        assert health_score(4.0, 0.0, cfg) == 0.0  # twice the threshold: zero
        rts = [0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0]
        ers = [0.0, 0.01, 0.05, 0.1, 0.15, 0.5, 1.0]
        for er in ers:
            scores = [health_score(rt, er, cfg) for rt in rts]
            assert scores == sorted(scores, reverse=True)
        for rt in rts:
            scores = [health_score(rt, er, cfg) for er in ers]
            assert scores == sorted(scores, reverse=True)

    async def test_overall_status_comes_from_the_critical_services(self) -> None:
        monitor = HealthMonitor(HealthCheckConfig(failure_threshold=1))
        monitor.add_check("db", lambda: True)
        monitor.add_check("cache", lambda: False, critical=False)
        await monitor.run_checks()
        summary = monitor.get_system_health_summary()
        assert summary["critical"] == ["db"]
        assert summary["status"] == "degraded"  # a non-critical service is down
        monitor.add_check("queue", lambda: False)
        await monitor.run_check("queue")
        summary = monitor.get_system_health_summary()
        assert summary["status"] == "unhealthy"
        assert summary["counts"] == {"healthy": 1, "degraded": 1, "unhealthy": 1, "unknown": 0}
        assert set(summary) >= {"status", "score", "counts", "services", "timestamp"}

    async def test_events_and_alert_hook_on_transitions_only(self) -> None:
        events: list[object] = []
        resilient.subscribe(events.append)
        monitor = HealthMonitor(HealthCheckConfig(failure_threshold=1))
        flag = Flag()
        monitor.add_check("db", flag.probe)
        alerts: list[HealthChanged] = []

        async def alert(event: HealthChanged) -> None:
            alerts.append(event)

        remove = monitor.on_change(alert)
        for _ in range(5):
            await monitor.run_check("db")
        flag.up = False
        for _ in range(5):
            await monitor.run_check("db")
        await asyncio.sleep(0)
        changes = [e for e in events if isinstance(e, HealthChanged)]
        assert [(e.old_status, e.new_status) for e in changes] == [
            ("unknown", "healthy"),
            ("healthy", "unhealthy"),
        ]
        assert changes[0].score == pytest.approx(1.0, abs=0.01)  # the event's scale is 0-1
        assert [a.new_status for a in alerts] == ["healthy", "unhealthy"]
        remove()
        flag.up = True
        await monitor.run_check("db")
        await asyncio.sleep(0)
        assert len(alerts) == 2


class TestScheduler:
    async def test_a_hanging_check_is_cut_at_its_timeout_while_others_run(self) -> None:
        release = threading.Event()
        monitor = HealthMonitor(HealthCheckConfig(check_interval=0.02, failure_threshold=1))
        fast = Flag()

        async def hangs() -> bool:
            await asyncio.sleep(3600)
            return True

        def hangs_in_a_thread() -> bool:
            release.wait(10)
            return True

        monitor.add_check("slow", hangs, timeout=0.05)
        monitor.add_check("slow_sync", hangs_in_a_thread, timeout=0.05)
        monitor.add_check("fast", fast.probe)
        try:
            async with monitor:
                await asyncio.sleep(0.3)
                assert fast.calls >= 5  # kept running while the others hung
                for name in ("slow", "slow_sync"):
                    health = monitor.get_service_health(name)
                    assert health["status"] == "unhealthy"
                    (check,) = health["checks"].values()
                    assert "timed out after 0.05s" in check["error"] or "hung" in check["error"]
                assert monitor.get_service_health("fast")["status"] == "healthy"
        finally:
            release.set()
        assert not monitor.running

    async def test_a_raising_check_never_stops_the_scheduler(self) -> None:
        monitor = HealthMonitor(HealthCheckConfig(check_interval=0.02, failure_threshold=2))
        raised = Flag()

        def broken() -> bool:
            raised.calls += 1
            raise RuntimeError("probe bug")

        async def broken_async() -> bool:
            raise ConnectionError("refused")

        monitor.add_check("a", broken)
        monitor.add_check("b", broken_async)
        ok = Flag()
        monitor.add_check("c", ok.probe)
        async with monitor:
            await asyncio.sleep(0.25)
            assert monitor.running
        assert raised.calls >= 4
        assert ok.calls >= 4
        assert monitor.get_service_health("a")["status"] == "unhealthy"
        check = monitor.get_service_health("b")["checks"]["broken_async"]
        assert check["error"] == "ConnectionError: refused"
        assert monitor.get_service_health("c")["status"] == "healthy"

    async def test_sync_checks_run_in_a_worker_thread(self) -> None:
        monitor = HealthMonitor()
        seen: list[int] = []
        monitor.add_check("db", lambda: seen.append(threading.get_ident()))
        await monitor.run_check("db")
        assert seen
        assert seen[0] != threading.get_ident()

    async def test_concurrent_runs_are_coalesced(self) -> None:
        monitor = HealthMonitor()
        runs = Flag()

        async def probe() -> bool:
            runs.calls += 1
            await asyncio.sleep(0.02)
            return True

        monitor.add_check("db", probe)
        await asyncio.gather(*(monitor.run_check("db") for _ in range(20)))
        assert runs.calls == 1
        await monitor.run_check("db")
        assert runs.calls == 2


class TestRecoveryCoordination:
    async def test_passing_deep_checks_half_open_an_open_breaker_and_trials_close_it(
        self,
    ) -> None:
        load(
            db={
                "circuit_breaker": {"timeout_seconds": 600, "success_threshold": 2},
                "health": {"recovery_threshold": 2, "check_interval": 60},
            }
        )
        breaker = resilient.get_breaker("db")
        breaker.open()
        monitor = HealthMonitor()
        monitor.add_check("db", lambda: True, kind="deep")
        health = await monitor.run_check("db")
        assert health["status"] == "degraded"  # an open breaker degrades, it does not fail
        assert "circuit_breaker:open" in health["reason"]
        assert breaker.state == "open"  # one pass is not enough
        await monitor.run_check("db")
        assert breaker.state == "half-open"
        for _ in range(3):  # more passing checks never close it
            await monitor.run_check("db")
        assert breaker.state == "half-open"

        @resilient.resilient("db")
        def trial() -> int:
            return 1

        trial()
        assert breaker.state == "half-open"
        trial()
        assert breaker.state == "closed"  # the breaker's own trial calls closed it
        assert (await monitor.run_check("db"))["status"] == "healthy"

    async def test_shallow_checks_and_auto_recovery_off_leave_the_breaker_alone(self) -> None:
        load(
            a={"circuit_breaker": {"timeout_seconds": 600}, "health": {}},
            b={"circuit_breaker": {"timeout_seconds": 600}, "health": {"auto_recovery": False}},
        )
        monitor = HealthMonitor()
        monitor.add_check("a", lambda: True, kind="shallow")
        monitor.add_check("b", lambda: True, kind="deep")
        for name in ("a", "b"):
            resilient.get_breaker(name).open()
            for _ in range(4):
                await monitor.run_check(name)
            assert resilient.get_breaker(name).state == "open"

    async def test_an_open_breaker_opted_into_readiness_is_unhealthy(self) -> None:
        load(db={"circuit_breaker": {}, "health": {"open_breaker": "unhealthy"}})
        resilient.get_breaker("db").open()
        monitor = HealthMonitor()
        assert monitor.get_service_health("db")["status"] == "unhealthy"


class TestPassive:
    async def test_an_outage_makes_it_unhealthy_with_no_probe_traffic_and_it_recovers(
        self,
    ) -> None:
        load(
            orders={
                "health": {
                    "check_interval": 0.03,
                    "failure_threshold": 2,
                    "recovery_threshold": 2,
                    "min_calls": 5,
                }
            }
        )
        dependency = Flag()

        @resilient.resilient("orders")
        async def place() -> int:
            if not dependency.up:
                raise ConnectionError("down")
            return 1

        async def traffic(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                with contextlib.suppress(ConnectionError):
                    await place()
                await asyncio.sleep(0.002)

        monitor = HealthMonitor()  # no checks added: the policy's health: section is enough
        assert "orders" in monitor.services
        async with monitor:
            await traffic(0.2)
            assert monitor.get_service_health("orders")["status"] == "healthy"
            dependency.up = False
            await traffic(0.3)
            health = monitor.get_service_health("orders")
            assert health["status"] == "unhealthy"
            assert health["checks"]["live_calls"]["kind"] == "passive"
            assert health["error_rate"] == 1.0
            assert health["score"] == 0.0
            dependency.up = True
            await traffic(0.3)
            assert monitor.get_service_health("orders")["status"] == "healthy"
        assert dependency.calls == 0  # the monitor sent nothing itself

    async def test_live_errors_degrade_when_active_checks_pass(self) -> None:
        load(api={"health": {"failure_threshold": 1, "min_calls": 3}})
        calls = resilient.resilient("api")(lambda fail: 1 / 0 if fail else 1)
        monitor = HealthMonitor()
        monitor.add_check("api", lambda: True)
        await monitor.run_check("api")  # the passive check starts watching
        for fail in (True, True, False, True):
            with contextlib.suppress(ZeroDivisionError):
                calls(fail)
        health = await monitor.run_check("api")
        assert health["status"] == "degraded"
        assert "live_calls" in health["reason"]
        assert health["checks"]["live_calls"]["critical"] is False

    def test_policies_without_a_health_section_keep_no_observer(self) -> None:
        load(plain={"circuit_breaker": {}}, watched={"circuit_breaker": {}, "health": {}})
        plain = resilient.resilient("plain")(lambda: 1)
        watched = resilient.resilient("watched")(lambda: 1)
        assert plain() == watched() == 1
        from resilient.pipeline import LANE_FULL

        assert plain.__resilient_handle__.get().observer is None  # type: ignore[attr-defined]
        assert plain.__resilient_handle__.get().lane != LANE_FULL  # type: ignore[attr-defined]
        assert watched.__resilient_handle__.get().observer is not None  # type: ignore[attr-defined]


class TestBadInput:
    def test_bad_checks_are_refused_clearly(self) -> None:
        monitor = HealthMonitor()
        with pytest.raises(TypeError, match="must be callable"):
            monitor.add_check("db", "SELECT 1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"unknown health check kind 'dep'.*'deep'"):
            monitor.add_check("db", lambda: True, kind="dep")
        for bad in (0, -1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="interval must be more than 0"):
                monitor.add_check("db", lambda: True, interval=bad)
            with pytest.raises(ValueError, match="timeout must be more than 0"):
                monitor.add_check("db", lambda: True, timeout=bad)
        with pytest.raises(TypeError, match="number of seconds"):
            monitor.add_check("db", lambda: True, interval=True)
        monitor.add_check("db", lambda: True, name="ping")
        with pytest.raises(ValueError, match="already has a health check named 'ping'"):
            monitor.add_check("db", lambda: True, name="ping")
        with pytest.raises(ServiceNotFoundError, match="'db'"):
            monitor.get_service_health("bd")

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("check_interval", 0),
            ("timeout", -1.0),
            ("failure_threshold", 0),
            ("recovery_threshold", -2),
            ("response_time_threshold", 0),
            ("error_rate_threshold", 0),
            ("error_rate_threshold", 1.5),
            ("failure_threshold", True),
            ("open_breaker", "closed"),
        ],
    )
    def test_thresholds_out_of_range(self, field: str, value: Any) -> None:
        with pytest.raises(ValidationError, match=field):
            HealthCheckConfig(**{field: value})

    def test_the_policy_section_is_validated_like_the_others(self, tmp_path: Any) -> None:
        path = tmp_path / "resilience.yaml"
        path.write_text(
            "version: 1\npolicies:\n  db:\n    health:\n      check_intervl: 5\n"
            "      error_rate_threshold: 2\n"
        )
        with pytest.raises(PolicyError) as info:
            resilient.load_policies(path)
        text = str(info.value)
        assert "check_intervl" in text
        assert "did you mean 'check_interval'" in text
        assert "error_rate_threshold" in text
        assert "resilience.yaml:" in text
        schema = resilient._models.policy_file_schema()
        assert "HealthCheckConfig" in schema["$defs"]

    def test_the_decorator_form_returns_the_function(self) -> None:
        monitor = HealthMonitor()

        @monitor.check("db", kind="deep", tags=("sql",))
        def select_one() -> bool:
            return True

        assert select_one() is True
        check = monitor.get_service_health("db")["checks"]["select_one"]
        assert (check["kind"], check["tags"]) == ("deep", ["sql"])


class TestBreakerHalfOpen:
    def test_half_open_moves_only_an_open_breaker(self) -> None:
        load(db={"circuit_breaker": {"timeout_seconds": 600, "success_threshold": 1}})
        breaker = resilient.get_breaker("db")
        assert breaker.half_open() is False  # closed: nothing to do
        assert breaker.state == "closed"
        breaker.open()
        assert breaker.half_open() is True
        assert breaker.state == "half-open"
        assert breaker.half_open() is False  # already half-open
        breaker.open()
        breaker.force_open()
        assert breaker.half_open() is False  # forced open stays so
        breaker.normal()
        assert breaker.half_open() is True
        resilient.call("db", lambda: 1)
        assert breaker.state == "closed"


# --------------------------------------------------------------------------- review fixes (H9)


class TestOverlappingRuns:
    async def test_a_run_check_during_a_scheduled_run_joins_it(self) -> None:
        monitor = HealthMonitor(
            HealthCheckConfig(failure_threshold=1, timeout=5, check_interval=60)
        )
        runs = []
        started = asyncio.Event()

        @monitor.check("db")
        async def slow_ok() -> bool:
            runs.append(1)
            started.set()
            await asyncio.sleep(0.3)
            return True

        changes: list[HealthChanged] = []
        monitor.on_change(changes.append)
        async with monitor:
            await asyncio.wait_for(started.wait(), 5)  # the scheduler's run is in flight
            health = await monitor.run_check("db")
        assert health["status"] == "healthy", health["reason"]
        assert health["checks"]["slow_ok"]["error"] is None
        assert len(runs) == 1  # joined, not run twice
        assert [c.new_status for c in changes] == ["healthy"]

    async def test_a_run_from_another_event_loop_joins_too(self) -> None:
        monitor = HealthMonitor(HealthCheckConfig(failure_threshold=1, timeout=5))
        runs = []

        @monitor.check("db")
        async def slow_ok() -> bool:
            runs.append(1)
            await asyncio.sleep(0.3)
            return True

        first = asyncio.ensure_future(monitor.run_check("db"))
        await asyncio.sleep(0.05)
        other = await asyncio.to_thread(asyncio.run, monitor.run_check("db"))
        assert other["status"] == "healthy", other["reason"]
        assert (await first)["status"] == "healthy"
        assert len(runs) == 1


class TestThreads:
    async def test_hung_sync_checks_starve_neither_other_checks_nor_to_thread(self) -> None:
        release = threading.Event()
        monitor = HealthMonitor(
            HealthCheckConfig(
                failure_threshold=1, recovery_threshold=1, timeout=0.2, check_interval=0.1
            )
        )
        for i in range(12):  # more than the default executor's workers on a small machine
            monitor.add_check(f"hung{i}", release.wait, name="h")
        good = Flag()
        monitor.add_check("good", good.probe)
        try:
            async with monitor:
                await asyncio.sleep(0.8)
                assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5) == 42
                health = monitor.get_service_health("good")
                assert health["status"] == "healthy", health["reason"]
                assert good.calls >= 3
                assert monitor.get_service_health("hung0")["status"] == "unhealthy"
                ours = {f"resilient-health:hung{i}:h" for i in range(12)}
                names = [t.name for t in threading.enumerate() if t.name in ours]
                # one thread per hung check, never a second (threads of other tests'
                # checks may still be finishing: only this test's names are counted)
                assert len(names) == 12
                assert all(t.daemon for t in threading.enumerate() if t.name in names)
                release.set()
                await asyncio.sleep(0.6)
                assert monitor.get_service_health("hung0")["status"] == "healthy"
        finally:
            release.set()

    def test_a_hung_sync_check_never_holds_up_the_process_exit(self, tmp_path: Any) -> None:
        import subprocess
        import sys

        script = tmp_path / "hung.py"
        script.write_text(
            "import asyncio, threading\n"
            "import resilient\n"
            "from resilient.health import HealthMonitor\n"
            "async def main():\n"
            "    m = HealthMonitor(resilient.HealthCheckConfig(timeout=0.1, check_interval=0.1))\n"
            "    m.add_check('db', threading.Event().wait)\n"
            "    async with m:\n"
            "        await asyncio.sleep(0.3)\n"
            "asyncio.run(main())\n"
            "print('exited')\n"
        )
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "exited"


class TestStop:
    async def test_stop_cancels_an_async_check_in_flight(self) -> None:
        state = {"cancelled": False, "finished": False}
        started = asyncio.Event()
        monitor = HealthMonitor(HealthCheckConfig(timeout=60, check_interval=100))

        @monitor.check("db")
        async def long() -> bool:
            started.set()
            try:
                await asyncio.sleep(30)
                state["finished"] = True
            except asyncio.CancelledError:
                state["cancelled"] = True
                raise
            return True

        await monitor.start()
        await asyncio.wait_for(started.wait(), 5)
        await monitor.stop()
        assert state == {"cancelled": True, "finished": False}

    def test_stop_from_another_event_loop_stops_the_scheduler(self) -> None:
        monitor = HealthMonitor(HealthCheckConfig(check_interval=0.05, failure_threshold=1))
        runs = []
        monitor.add_check("db", lambda: runs.append(1) is None)
        started, leave = threading.Event(), threading.Event()

        def loop_a() -> None:
            async def main() -> None:
                await monitor.start()
                started.set()
                while not leave.is_set():
                    await asyncio.sleep(0.02)

            asyncio.run(main())

        thread = threading.Thread(target=loop_a)
        thread.start()
        try:
            assert started.wait(5)
            asyncio.run(asyncio.wait_for(monitor.stop(), 5))
            assert not monitor.running
            time.sleep(0.2)
            before = len(runs)
            time.sleep(0.3)
            assert len(runs) == before  # nothing scheduled any more
        finally:
            leave.set()
            thread.join(5)


class TestRounds:
    async def test_two_critical_checks_failing_in_turn_make_it_unhealthy(self) -> None:
        monitor = HealthMonitor(HealthCheckConfig(failure_threshold=2, recovery_threshold=2))
        turn = [0]
        monitor.add_check("svc", lambda: turn[0] % 2 == 0, name="a")
        monitor.add_check("svc", lambda: turn[0] % 2 == 1, name="b")
        statuses = []
        for _ in range(4):
            statuses.append((await monitor.run_check("svc"))["status"])
            turn[0] += 1
        assert statuses == ["degraded", "unhealthy", "unhealthy", "unhealthy"]

    async def test_a_service_failing_from_the_start_is_not_unknown(self) -> None:
        monitor = HealthMonitor(HealthCheckConfig(failure_threshold=3))
        monitor.add_check("y", lambda: False, name="ping")
        healths = [await monitor.run_check("y") for _ in range(3)]
        assert [h["status"] for h in healths] == ["degraded", "degraded", "unhealthy"]
        assert "check 'ping' failing: returned False" in healths[0]["reason"]
        assert [h["ready"] for h in healths] == [False, False, False]
        one = HealthMonitor(HealthCheckConfig(failure_threshold=1))
        one.add_check("y", lambda: False)
        assert (await one.run_check("y"))["status"] == "unhealthy"

    async def test_the_reason_is_the_failure_that_set_the_status(self) -> None:
        monitor = HealthMonitor(HealthCheckConfig(failure_threshold=1, recovery_threshold=2))
        results = iter([False, True])
        monitor.add_check("x", lambda: next(results), name="ping")
        await monitor.run_check("x")
        health = await monitor.run_check("x")  # one pass: still unhealthy (hysteresis)
        assert health["status"] == "unhealthy"
        assert health["reason"] == "check 'ping' failing: returned False"


class TestCheckInput:
    def test_generator_functions_are_refused(self) -> None:
        monitor = HealthMonitor()

        def gen() -> Any:
            yield True

        async def agen() -> Any:
            yield True

        for fn in (gen, agen):
            with pytest.raises(TypeError, match="generator function"):
                monitor.add_check("db", fn)
        assert monitor.services == []

    def test_critical_must_be_a_bool_and_tags_a_sequence(self) -> None:
        monitor = HealthMonitor()
        with pytest.raises(TypeError, match="critical must be True or False"):
            monitor.add_check("db", lambda: True, critical="no")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="tags must be a string or a sequence"):
            monitor.add_check("db", lambda: True, tags=5)  # type: ignore[arg-type]


class TestSyntheticRecovery:
    async def test_a_synthetic_check_calling_the_dependency_directly_half_opens(self) -> None:
        load(
            pay={
                "retry": {"max_attempts": 1},
                "circuit_breaker": {"failure_threshold": 1, "timeout_seconds": 600},
                "health": {"recovery_threshold": 2, "check_interval": 60, "min_calls": 100},
            }
        )
        down = [True]

        def backend() -> int:
            if down[0]:
                raise ConnectionError("down")
            return 1

        with pytest.raises(ConnectionError):
            resilient.call("pay", backend)
        breaker = resilient.get_breaker("pay")
        assert breaker.state == "open"
        monitor = HealthMonitor()
        monitor.add_check("pay", lambda: backend() == 1, kind="synthetic", name="roundtrip")
        down[0] = False
        for _ in range(2):
            await monitor.run_check("pay")
        assert breaker.state == "half-open"


class TestSecondTrial:
    """Cases found by trying the fixed monitor again (each failed before its fix)."""

    async def test_a_flapping_check_among_siblings_does_not_flap_under_the_scheduler(
        self,
    ) -> None:
        import itertools

        monitor = HealthMonitor(HealthCheckConfig(check_interval=0.05, timeout=1))
        flip = itertools.cycle([True, False])
        monitor.add_check("db", lambda: next(flip), name="flappy")
        for name in "bcd":
            monitor.add_check("db", lambda: True, name=name)
        changes: list[str] = []
        monitor.on_change(lambda event: changes.append(event.new_status))
        async with monitor:
            await asyncio.sleep(1.0)
        assert "unhealthy" not in changes, changes

    async def test_one_failure_of_a_slow_check_is_not_counted_again_by_fast_siblings(
        self,
    ) -> None:
        monitor = HealthMonitor(HealthCheckConfig(check_interval=0.05, timeout=1))
        results = iter([False] + [True] * 100)
        monitor.add_check("db", lambda: next(results), name="slow", interval=0.4)
        monitor.add_check("db", lambda: True, name="fast", interval=0.02)
        changes: list[str] = []
        monitor.on_change(lambda event: changes.append(event.new_status))
        async with monitor:
            await asyncio.sleep(1.0)
        assert "unhealthy" not in changes, changes

    async def test_a_hung_check_keeps_its_timeout_as_its_reading(self) -> None:
        gate = threading.Event()
        monitor = HealthMonitor(HealthCheckConfig(timeout=0.1, failure_threshold=1))
        monitor.add_check("s", lambda: gate.wait(), name="hang", critical=False)
        try:
            for _ in range(3):
                await monitor.run_check("s")
            checks = monitor.get_service_health("s")["checks"]
            assert checks["hang"]["duration"] >= 0.1
        finally:
            gate.set()

    def test_running_is_false_for_a_scheduler_on_a_loop_that_was_left(self) -> None:
        monitor = HealthMonitor(HealthCheckConfig(check_interval=0.05))
        monitor.add_check("s", lambda: True)
        first = asyncio.new_event_loop()
        try:
            first.run_until_complete(monitor.start())
        finally:
            first.close()  # left without stop(): `resilient serve` of such a module

        async def serve() -> None:
            assert not monitor.running  # its loop no longer runs
            await monitor.start()  # so it starts here
            assert monitor.running
            await monitor.run_check("s")
            await monitor.stop()

        asyncio.run(serve())

    def test_a_callable_object_whose_call_is_a_generator_is_refused(self) -> None:
        class Gen:
            def __call__(self) -> Any:
                yield False

        monitor = HealthMonitor()
        with pytest.raises(TypeError, match="generator"):
            monitor.add_check("s", Gen())


async def test_passive_health_of_an_isolated_block_does_not_leak() -> None:
    """A policy's health: section used inside isolated_registry() is gone after it."""
    from resilient.testing import isolated_registry

    with isolated_registry():
        inline = resilient.Policy(health=HealthCheckConfig(response_time_threshold=5.0))
        assert resilient.resilient(inline, name="api")(lambda: 1)() == 1

    monitor = HealthMonitor(HealthCheckConfig(failure_threshold=1, response_time_threshold=0.05))

    async def slow() -> bool:
        await asyncio.sleep(0.08)
        return True

    monitor.add_check("api", slow)
    health = await monitor.run_check("api")
    assert health["status"] == "degraded"  # judged by this monitor's 0.05 s, not the 5 s

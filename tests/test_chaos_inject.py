"""
Fault injection (issue 12, the injection half): the ``chaos:`` section,
``resilient.chaos.inject()``, the guards and the emergency stop.

Time-based behaviour runs on the virtual clock; the fleet-wide stop on a real
redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import resilient
from resilient import chaos
from resilient._models import policy_file_schema
from resilient.chaos import _inject
from resilient.events import ChaosInjected, Event, subscribe
from resilient.pipeline import LANE_BREAKER, LANE_DIRECT, LANE_FULL
from resilient.runtime import runtime
from resilient.testing import VirtualClock


@pytest.fixture(autouse=True)
def _chaos_defaults() -> Iterator[None]:
    _inject._reset_for_tests()
    yield
    _inject._reset_for_tests()


def load(**policies: dict[str, Any]) -> None:
    resilient.load_policies({"version": 1, "policies": policies})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "resilience.yaml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def injected(events: list[Event]) -> list[str]:
    return [e.fault for e in events if isinstance(e, ChaosInjected)]


@pytest.fixture(name="events")
def _events() -> Iterator[list[Event]]:
    seen: list[Event] = []
    unsubscribe = subscribe(seen.append)
    yield seen
    unsubscribe()


# --------------------------------------------------------------------------- call forms

Calls = list[str]
Form = Callable[[Calls], Any]  # runs one call of policy "p"; returns its result


def _decorator_sync(calls: Calls) -> Any:
    @resilient.resilient("p")
    def guarded() -> str:
        calls.append("run")
        return "ok"

    return guarded()


def _call(calls: Calls) -> Any:
    def guarded() -> str:
        calls.append("run")
        return "ok"

    return resilient.call("p", guarded)


def _attempts_sync(calls: Calls) -> Any:
    for attempt in resilient.attempts("p"):
        with attempt:
            calls.append("run")
            return "ok"
    return "skipped"  # error_result: the block did not run


async def _decorator_async(calls: Calls) -> Any:
    @resilient.resilient("p")
    async def guarded() -> str:
        calls.append("run")
        return "ok"

    return await guarded()


async def _acall(calls: Calls) -> Any:
    async def guarded() -> str:
        calls.append("run")
        return "ok"

    return await resilient.acall("p", guarded)


async def _acall_sync(calls: Calls) -> Any:
    def guarded() -> str:
        calls.append("run")
        return "ok"

    return await resilient.acall_sync("p", guarded)


async def _attempts_async(calls: Calls) -> Any:
    async for attempt in resilient.attempts("p"):
        with attempt:
            calls.append("run")
            return "ok"
    return "skipped"


SYNC_FORMS = {"decorator": _decorator_sync, "call": _call, "attempts": _attempts_sync}
ASYNC_FORMS = {
    "decorator_async": _decorator_async,
    "acall": _acall,
    "acall_sync": _acall_sync,
    "attempts_async": _attempts_async,
}
ALL_FORMS = [*SYNC_FORMS, *ASYNC_FORMS]


def run_form(name: str, clock: VirtualClock, calls: Calls) -> tuple[Any, BaseException | None]:
    """One call of policy p through form *name* on the virtual clock: (result, error)."""
    try:
        if name in SYNC_FORMS:
            return SYNC_FORMS[name](calls), None
        form: Callable[[Calls], Awaitable[Any]] = ASYNC_FORMS[name]
        return clock.run(form(calls)), None
    except Exception as exc:
        return None, exc


class TestModesInEveryForm:
    """Each failure mode, through each call form, behaves as the same real fault would."""

    @pytest.mark.parametrize("form", ALL_FORMS)
    def test_network_delay_delays_then_calls(self, form: str, events: list[Event]) -> None:
        load(p={"timeout": {"per_attempt": 5.0}})
        chaos.enable()
        chaos.inject("p", chaos.Fault("network_delay", delay=0.25))
        calls: Calls = []
        with VirtualClock() as clock:
            result, error = run_form(form, clock, calls)
            assert error is None
            assert result == "ok"
            assert calls == ["run"]
            assert clock.now == pytest.approx(0.25)
        assert injected(events) == ["network_delay"]

    @pytest.mark.parametrize("form", ALL_FORMS)
    def test_latency_spike_is_a_long_delay(self, form: str) -> None:
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        chaos.inject("p", "latency_spike")  # default spike: 2 s
        calls: Calls = []
        with VirtualClock() as clock:
            result, error = run_form(form, clock, calls)
            assert (result, error, calls) == ("ok", None, ["run"])
            assert clock.now == pytest.approx(2.0)

    @pytest.mark.parametrize("form", ALL_FORMS)
    def test_exception_replaces_the_call(self, form: str, events: list[Event]) -> None:
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        chaos.inject("p", chaos.Fault("exception", error="ConnectionResetError", message="boom"))
        calls: Calls = []
        with VirtualClock() as clock:
            _result, error = run_form(form, clock, calls)
        assert type(error) is ConnectionResetError
        assert str(error) == "boom"
        assert any("injected by chaos" in note for note in getattr(error, "__notes__", []))
        assert calls == []  # the function never ran
        assert injected(events) == ["exception"]

    @pytest.mark.parametrize("form", ALL_FORMS)
    def test_error_result_returns_the_value_without_calling(self, form: str) -> None:
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        chaos.inject("p", chaos.Fault("error_result", value={"status": 503}))
        calls: Calls = []
        with VirtualClock() as clock:
            result, error = run_form(form, clock, calls)
        assert error is None
        assert calls == []
        block = form.startswith("attempts")
        assert result == ("skipped" if block else {"status": 503})

    @pytest.mark.parametrize("form", ALL_FORMS)
    def test_timeout_hangs_until_the_per_attempt_deadline(self, form: str) -> None:
        load(p={"timeout": {"per_attempt": 0.5}, "retry": {"max_attempts": 1}})
        chaos.enable()
        chaos.inject("p", "timeout")
        calls: Calls = []
        with VirtualClock() as clock:
            _result, error = run_form(form, clock, calls)
            assert isinstance(error, resilient.AttemptTimeoutError)
            assert error.kind == "per_attempt"
            assert clock.now == pytest.approx(0.5)
        assert calls == []

    @pytest.mark.parametrize("form", ALL_FORMS)
    def test_timeout_with_a_shorter_hang_raises_chaos_timeout(self, form: str) -> None:
        load(p={"timeout": {"per_attempt": 5.0}, "retry": {"max_attempts": 1}})
        chaos.enable()
        chaos.inject("p", chaos.Fault("timeout", hang=1.5))
        with VirtualClock() as clock:
            _result, error = run_form(form, clock, [])
            assert isinstance(error, chaos.ChaosTimeoutError)
            assert isinstance(error, TimeoutError)
            assert clock.now == pytest.approx(1.5)

    @pytest.mark.parametrize("form", ALL_FORMS)
    def test_timeout_under_only_a_total_budget_hangs_no_longer_than_it(self, form: str) -> None:
        """A hang with no per-attempt timeout ends when the call's total budget does
        (sync code included: it does not sleep the default 30 s)."""
        load(p={"timeout": {"total": 2.0}, "retry": {"max_attempts": 1}})
        chaos.enable()
        chaos.inject("p", "timeout")
        with VirtualClock() as clock:
            _result, error = run_form(form, clock, [])
            assert isinstance(error, resilient.AttemptTimeoutError)
            assert error.kind == "total"
            assert clock.now == pytest.approx(2.0)

    @pytest.mark.parametrize("form", ALL_FORMS)
    def test_retries_see_injected_faults_like_real_ones(self, form: str) -> None:
        """The default ChaosError is a ConnectionError: retried by the default retry_on."""
        load(p={"retry": {"max_attempts": 3, "base_delay": 0.1, "jitter": False}})
        chaos.enable()
        injection = chaos.inject("p", "exception", first=2)
        calls: Calls = []
        with VirtualClock() as clock:
            result, error = run_form(form, clock, calls)
        assert (result, error) == ("ok", None)
        assert calls == ["run"]  # attempts 1 and 2 faulted, 3 ran
        assert (injection.faults, injection.attempts) == (2, 3)


# --------------------------------------------------------------------------- reactions


class TestPipelineReacts:
    def test_breaker_opens_under_injected_faults_and_closes_after_stop(self) -> None:
        load(
            p={
                "circuit_breaker": {"failure_threshold": 3, "timeout_seconds": 10},
            }
        )
        chaos.enable()

        @resilient.resilient("p")
        def work() -> str:
            return "ok"

        with VirtualClock() as clock:
            assert work() == "ok"
            injection = chaos.inject("p", "exception")
            for _ in range(3):
                with pytest.raises(chaos.ChaosError):
                    work()
            breaker = resilient.get_breaker("p")
            assert breaker.state == "open"
            with pytest.raises(resilient.CircuitOpenError):
                work()
            injection.stop()
            assert not injection.active
            clock.advance(10.5)
            # the half-open trials go through: no more faults
            assert [work() for _ in range(5)] == ["ok"] * 5
            assert breaker.state == "closed"
        assert injection.faults == 3

    def test_the_fault_is_innermost_the_fallback_sees_it(self) -> None:
        load(p={"retry": {"max_attempts": 2, "base_delay": 0}, "fallback": "cached"})
        chaos.enable()
        chaos.inject("p", "exception")

        @resilient.resilient("p")
        def work() -> str:
            return "fresh"

        assert work() == "cached"

    async def test_passive_health_sees_injected_faults(self) -> None:
        from resilient.health import HealthMonitor

        load(api={"health": {"failure_threshold": 1, "min_calls": 3}})
        chaos.enable()
        calls = resilient.resilient("api")(lambda: 1)
        monitor = HealthMonitor()
        monitor.add_check("api", lambda: True)
        await monitor.run_check("api")  # the passive check starts watching
        with chaos.inject("api", "exception", every=2):
            for _ in range(6):
                with contextlib.suppress(chaos.ChaosError):
                    calls()
        health = await monitor.run_check("api")
        assert health["status"] == "degraded"
        assert "live_calls" in health["reason"]

    def test_events_and_prometheus_counter(self, events: list[Event]) -> None:
        prometheus_client = pytest.importorskip("prometheus_client")
        from resilient import metrics

        registry = prometheus_client.CollectorRegistry()
        metrics.enable(registry=registry)
        try:
            load(p={"retry": {"max_attempts": 1}})
            chaos.enable()
            chaos.inject("p", "exception", experiment="db-outage", max_faults=2)

            @resilient.resilient("p")
            def work() -> str:
                return "ok"

            for _ in range(3):
                with contextlib.suppress(chaos.ChaosError):
                    work()
            counted = registry.get_sample_value(
                "resilient_chaos_injections_total", {"policy": "p", "fault": "exception"}
            )
            assert counted == 2
        finally:
            metrics.disable()
        chaos_events = [e for e in events if isinstance(e, ChaosInjected)]
        assert [(e.policy, e.fault, e.experiment) for e in chaos_events] == [
            ("p", "exception", "db-outage")
        ] * 2
        assert chaos_events[0].callable.endswith("work")


# --------------------------------------------------------------------------- guards


class TestGuards:
    def test_off_by_default_refused_and_section_inert(self) -> None:
        load(
            p={"circuit_breaker": {}, "chaos": {"failure_modes": ["exception"], "rate": 1.0}},
            q={"circuit_breaker": {}},
        )
        assert not chaos.enabled()

        @resilient.resilient("p")
        def work() -> str:
            return "ok"

        assert [work() for _ in range(5)] == ["ok"] * 5
        handle = work.__resilient_handle__  # type: ignore[attr-defined]
        assert handle.get().chaos is None
        # the inert section keeps today's fast lane: the same as the policy without it
        assert handle.get().lane == LANE_BREAKER
        with pytest.raises(chaos.ChaosRefusedError) as refused:
            chaos.inject("p", "exception")
        assert refused.value.reason == "disabled"
        assert "RESILIENCE_CHAOS_ENGINEERING_ENABLED" in str(refused.value)

    def test_policy_section_injects_when_switched_on(self) -> None:
        load(p={"chaos": {"failure_modes": ["exception"], "rate": 1.0}})

        @resilient.resilient("p")
        def work() -> str:
            return "ok"

        assert work() == "ok"
        chaos.enable()
        with pytest.raises(chaos.ChaosError):
            work()
        assert work.__resilient_handle__.get().lane == LANE_FULL  # type: ignore[attr-defined]
        chaos.disable()
        assert work() == "ok"
        assert work.__resilient_handle__.get().lane == LANE_DIRECT  # type: ignore[attr-defined]

    def test_environment_variable_switches_on(self, monkeypatch: pytest.MonkeyPatch) -> None:
        load(p={"chaos": {"error_result": {"value": "chaos"}, "rate": 1.0}})
        monkeypatch.setenv("RESILIENCE_CHAOS_ENGINEERING_ENABLED", "true")
        assert resilient.call("p", lambda: "ok") == "chaos"
        monkeypatch.setenv("RESILIENCE_CHAOS_ENGINEERING_ENABLED", "maybe")
        with pytest.raises(resilient.PolicyError, match="RESILIENCE_CHAOS_ENGINEERING_ENABLED"):
            chaos.enabled()
        runtime.touch()
        # a bad setting never breaks a call: chaos stays off
        assert resilient.call("p", lambda: "ok") == "ok"

    def test_claims_of_owners(self) -> None:
        owner = object()
        chaos.allow(owner)
        assert chaos.enabled()
        injection = chaos.inject("p", "exception", strict=False)
        chaos.disallow(owner)
        assert not chaos.enabled()
        assert not injection.active  # the last claim gone: stopped

    def test_production_guard(self, monkeypatch: pytest.MonkeyPatch) -> None:
        load(p={"chaos": {"failure_modes": ["exception"], "rate": 1.0}})
        chaos.enable()
        monkeypatch.setenv("RESILIENCE_ENVIRONMENT", "production")
        assert chaos.is_production()
        with pytest.raises(chaos.ChaosRefusedError) as refused:
            chaos.inject("p", "error_result")
        assert refused.value.reason == "production"
        assert "allow_production" in str(refused.value)
        # the policy section never injects in production
        assert resilient.call("p", lambda: "ok") == "ok"
        # an injection that allows production does
        injection = chaos.inject("p", chaos.Fault("error_result", value="x"), allow_production=True)
        assert resilient.call("p", lambda: "ok") == "x"
        injection.stop()
        # the manager's word wins over the variable
        owner = object()
        chaos.set_environment("staging", owner)
        assert chaos.environment() == "staging"
        assert not chaos.is_production()
        chaos.set_environment(None, owner)
        assert chaos.is_production()

    def test_unknown_target_did_you_mean(self) -> None:
        load(database={"retry": {}})
        chaos.enable()
        with pytest.raises(chaos.ChaosRefusedError) as refused:
            chaos.inject("databse", "exception")
        assert refused.value.reason == "unknown_target"
        assert "did you mean 'database'?" in str(refused.value)
        chaos.register_target("payments")
        chaos.inject("payments", "exception").stop()
        chaos.inject("not-yet", "exception", strict=False).stop()


class TestEmergencyStop:
    def test_stops_every_injection_at_once_even_mid_call(self, events: list[Event]) -> None:
        load(p={"retry": {"max_attempts": 3, "base_delay": 0}})
        chaos.enable()
        first = chaos.inject("p", "exception", first=10)
        other = chaos.inject("p", "network_delay")

        def stop_on_first_fault(event: Event) -> None:
            if isinstance(event, ChaosInjected):
                chaos.emergency_stop("error budget burnt")

        unsubscribe = subscribe(stop_on_first_fault)
        calls: Calls = []
        try:
            assert _call(calls) == "ok"  # attempt 1 faulted, the stop ended it before attempt 2
        finally:
            unsubscribe()
        assert calls == ["run"]
        assert injected(events) == ["exception"]
        assert chaos.is_stopped()
        assert chaos.stop_reason() == "error budget burnt"
        assert not first.active
        assert not other.active
        assert first.stop_reason == "emergency stop: error budget burnt"
        with pytest.raises(chaos.ChaosRefusedError) as refused:
            chaos.inject("p", "exception")
        assert refused.value.reason == "stopped"
        chaos.resume()
        assert not chaos.is_stopped()
        chaos.inject("p", "exception").stop()

    def test_halts_policy_sections(self) -> None:
        load(p={"chaos": {"failure_modes": ["exception"], "rate": 1.0}})
        chaos.enable()
        with pytest.raises(chaos.ChaosError):
            resilient.call("p", lambda: "ok")
        chaos.emergency_stop("drill")
        assert resilient.call("p", lambda: "ok") == "ok"
        chaos.resume()
        with pytest.raises(chaos.ChaosError):
            resilient.call("p", lambda: "ok")


class TestFleetStop:
    """The emergency stop crosses processes through the Redis backend."""

    def test_stop_reaches_the_fleet_within_a_check_interval(self, server: Any) -> None:
        import redis

        from resilient.backends import BackendConfig
        from resilient.backends.redis import RedisBackend

        prefix = f"chaos-{time.monotonic_ns()}"
        config = BackendConfig(redis_url=server.url, key_prefix=prefix)
        resilient.backends.configure(config=config)
        client = redis.Redis.from_url(server.url)
        other = RedisBackend(config)  # another replica of the fleet
        try:
            load(p={"retry": {"max_attempts": 1}})
            chaos.enable()
            chaos.set_check_interval(0.05)
            # this process stops: the key is in Redis for the others
            chaos.emergency_stop("from here")
            assert client.get(f"{prefix}:chaos:stop") == b"from here"
            assert other.chaos_stopped() == "from here"
            chaos.resume()
            assert client.get(f"{prefix}:chaos:stop") is None

            # another replica stops: this process's injection ends within the interval
            injection = chaos.inject("p", "exception")
            with pytest.raises(chaos.ChaosError):
                resilient.call("p", lambda: "ok")
            other.chaos_stop("from another replica")
            deadline = time.monotonic() + 5
            while injection.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not injection.active
            assert injection.stop_reason == "emergency stop: fleet: from another replica"
            assert chaos.is_stopped()
            assert resilient.call("p", lambda: "ok") == "ok"
            # lifted by another replica: this process follows within the interval,
            # and its policy chaos section injects again without an inject()/resume()
            other.chaos_stop(None)
            deadline = time.monotonic() + 5
            while chaos.is_stopped() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not chaos.is_stopped()
            load(
                p={
                    "retry": {"max_attempts": 1},
                    "chaos": {"failure_modes": ["exception"], "rate": 1},
                }
            )
            with pytest.raises(chaos.ChaosError):
                resilient.call("p", lambda: "ok")
            # a policy section alone keeps the poller: a fleet stop reaches it too
            other.chaos_stop("again")
            deadline = time.monotonic() + 5
            while not chaos.is_stopped() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert chaos.stop_reason() == "fleet: again"
            assert resilient.call("p", lambda: "ok") == "ok"
            other.chaos_stop(None)
            deadline = time.monotonic() + 5
            while chaos.is_stopped() and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(chaos.ChaosError):
                resilient.call("p", lambda: "ok")
        finally:
            other.close()
            client.close()
            resilient.backends.reset()


# --------------------------------------------------------------------------- caps and sequences


class TestBlastRadius:
    def test_max_faults_holds(self) -> None:
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        injection = chaos.inject("p", chaos.Fault("error_result", value="bad"), max_faults=3)
        results = [resilient.call("p", lambda: "ok") for _ in range(10)]
        assert results == ["bad"] * 3 + ["ok"] * 7
        assert injection.faults == 3
        assert injection.capped == "max_faults=3 reached"

    def test_max_share_holds(self) -> None:
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        injection = chaos.inject(
            "p", chaos.Fault("error_result", value="bad"), max_share=0.2, seed=7
        )
        results = [resilient.call("p", lambda: "ok") for _ in range(200)]
        bad = results.count("bad")
        assert bad == injection.faults
        assert 0 < bad <= 40
        # the share holds at every point, not only at the end
        for n in range(1, 201):
            assert results[:n].count("bad") <= 0.2 * n

    def test_cohorts_treated_and_control(self) -> None:
        load(p={"retry": {"max_attempts": 1}, "fallback": "stale"})
        chaos.enable()
        injection = chaos.inject("p", "exception", cohort=0.5, seed=3)
        for _ in range(200):
            resilient.call("p", lambda: "ok")
        treated, control = injection.treated, injection.control
        assert treated.calls + control.calls == 200
        assert 60 < treated.calls < 140
        assert injection.faults == treated.calls  # rate 1 within the cohort
        assert treated.success_rate == 0.0
        assert treated.fallbacks == treated.calls
        assert treated.served_rate == 1.0
        assert control.success_rate == 1.0
        reason = injection.diverged(success_rate=0.1)
        assert reason is not None
        assert "success rate" in reason
        assert injection.diverged(success_rate=1.0) is None
        snapshot = injection.snapshot()
        assert snapshot["treated"]["calls"] == treated.calls
        assert snapshot["faults_spec"][0]["mode"] == "exception"
        assert snapshot["faults_spec"][0]["error"] == "resilient.errors.ChaosError"

    def test_snapshot_is_json_whatever_the_error_result_value(self) -> None:
        """An error_result value JSON cannot hold (bytes, an object) is shown by its repr."""
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        body = b"<html>503</html>"
        with chaos.inject("p", [chaos.Fault("error_result", value=body), "exception"]) as inj:
            text = json.dumps(inj.snapshot())
        assert repr(body) in text
        spec = json.loads(text)["faults_spec"]
        assert spec[1] == {
            "mode": "exception",
            "error": "resilient.errors.ChaosError",
            "message": "fault injected by chaos",
        }

    def test_cohort_latency_on_the_virtual_clock(self) -> None:
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        injection = chaos.inject("p", chaos.Fault("network_delay", delay=0.3), cohort=0.5, seed=1)
        with VirtualClock():
            for _ in range(100):
                resilient.call("p", lambda: "ok")
        assert injection.treated.p95_latency == pytest.approx(0.3)
        assert injection.control.p95_latency == pytest.approx(0.0)
        reason = injection.diverged(p95_latency=0.1)
        assert reason is not None
        assert "p95 latency" in reason

    def test_rate_can_be_ramped_while_running(self) -> None:
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        injection = chaos.inject("p", chaos.Fault("error_result", value="bad"), rate=0.0)
        assert resilient.call("p", lambda: "ok") == "ok"
        injection.rate = 1.0
        assert resilient.call("p", lambda: "ok") == "bad"
        with pytest.raises(resilient.PolicyError, match="from 0 to 1"):
            injection.rate = 1.5


class TestSequences:
    """Deterministic sequences fail exactly the attempts they name."""

    @pytest.mark.parametrize(
        ("spec", "failed"),
        [
            ({"first": 3}, [1, 2, 3]),
            ({"every": 4}, [4, 8, 12]),
            ({"calls": [2, 5, 11]}, [2, 5, 11]),
        ],
    )
    def test_exactly_the_named_attempts(self, spec: dict[str, Any], failed: list[int]) -> None:
        load(p={"retry": {"max_attempts": 1}})
        chaos.enable()
        chaos.inject("p", chaos.Fault("error_result", value="bad"), **spec)
        results = [resilient.call("p", lambda: "ok") for _ in range(12)]
        assert [n for n, r in enumerate(results, 1) if r == "bad"] == failed

    def test_retries_exactly(self) -> None:
        """first=2 under three attempts: the call succeeds on its third attempt."""
        load(p={"retry": {"max_attempts": 3, "base_delay": 0}})
        chaos.enable()
        seen: list[int] = []
        injection = chaos.inject("p", "exception", first=2)
        attempts: list[int] = []

        def work() -> str:
            attempts.append(1)
            return "ok"

        assert resilient.call("p", work) == "ok"
        seen.append(injection.attempts)
        assert attempts == [1]
        assert seen == [3]

    def test_sequence_and_rate_do_not_mix(self) -> None:
        chaos.enable()
        with pytest.raises(resilient.PolicyError, match="leave rate out"):
            chaos.inject("p", "exception", first=2, rate=0.5, strict=False)
        with pytest.raises(resilient.PolicyError, match="at most one"):
            chaos.inject("p", "exception", first=2, every=3, strict=False)


# --------------------------------------------------------------------------- the section


class TestPolicySection:
    def test_rate_and_operations(self) -> None:
        load(
            p={
                "chaos": {
                    "error_result": {"value": "chaos"},
                    "rate": 1.0,
                    "operations": {"quiet": 0},
                }
            }
        )
        chaos.enable()

        @resilient.resilient("p")
        def loud() -> str:
            return "ok"

        @resilient.resilient("p")
        def quiet() -> str:
            return "ok"

        assert (loud(), quiet()) == ("chaos", "ok")

    def test_delay_distributions(self) -> None:
        import random

        rng = random.Random(1)
        uniform = chaos.Fault("network_delay", distribution="uniform", min=0.1, max=0.2)
        assert all(0.1 <= uniform.draw_delay(rng) <= 0.2 for _ in range(100))
        capped = chaos.Fault("latency_spike", distribution="exponential", delay=3, max=5)
        draws = [capped.draw_delay(rng) for _ in range(200)]
        assert max(draws) <= 5
        assert min(draws) >= 0
        normal = chaos.Fault("network_delay", distribution="normal", delay=1.0, stddev=0.1)
        mean = sum(normal.draw_delay(rng) for _ in range(500)) / 500
        assert mean == pytest.approx(1.0, abs=0.05)

    def test_shorthands_and_defaults(self) -> None:
        policy = resilient.Policy.model_validate(
            {"chaos": {"network_delay": 0.2, "exception": {"error": "TimeoutError"}}}
        )
        assert policy.chaos is not None
        assert policy.chaos.failure_modes == ("network_delay", "exception")
        assert policy.chaos.rate == 0.1
        faults = chaos.faults_from_config(policy.chaos)
        assert [f.mode for f in faults] == ["network_delay", "exception"]
        assert faults[0].config.delay == 0.2
        assert faults[1].config.error is TimeoutError

    def test_schema_has_the_section(self) -> None:
        schema = policy_file_schema()
        props = schema["$defs"]["ChaosConfig"]["properties"]
        assert set(props) >= {"failure_modes", "rate", "network_delay", "exception", "operations"}
        assert "chaos" in schema["$defs"]["Policy"]["properties"]


class TestBadInput:
    def test_unknown_mode_did_you_mean_with_line(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            """
            version: 1
            policies:
              db:
                chaos:
                  failure_modes:
                    - network_delay
                    - netwrok_timeout
            """,
        )
        with pytest.raises(resilient.PolicyError) as err:
            resilient.load_policies(path)
        text = str(err.value)
        assert "resilience.yaml:7" in text
        assert "did you mean 'timeout'?" in text or "did you mean 'network_delay'?" in text

    def test_rate_out_of_range_with_line(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            """
            version: 1
            policies:
              db:
                chaos:
                  failure_modes: [exception]
                  rate: 1.5
            """,
        )
        with pytest.raises(resilient.PolicyError) as err:
            resilient.load_policies(path)
        assert "resilience.yaml:6" in str(err.value)
        assert "1.5" in str(err.value)

    def test_operation_rate_error_names_the_function(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            """
            version: 1
            policies:
              db:
                chaos:
                  failure_modes: [exception]
                  operations:
                    get_user: 0.5
                    save: 1.5
            """,
        )
        with pytest.raises(resilient.PolicyError) as err:
            resilient.load_policies(path)
        text = str(err.value)
        assert "resilience.yaml:6: policies.db.chaos.operations: rate of 'save'" in text
        assert "1.5" in text
        assert "[1]" not in text

    @pytest.mark.parametrize(
        ("section", "message"),
        [
            ({}, "at least one failure mode"),
            ({"failure_modes": ["timeout"], "exception": {}}, "which failure_modes does not list"),
            ({"exception": {"error": "KeyboardInterrupt"}}, "not an Exception subclass"),
            ({"exception": {"error": "ConectionError"}}, "did you mean 'ConnectionError'?"),
            ({"network_delay": {"min": 2, "max": 1}}, "larger than max"),
            ({"network_delay": {"distribution": "uniforn"}}, "did you mean 'uniform'"),
            ({"failure_modes": ["exception"], "operations": {"f": 2}}, "less than or equal to 1"),
        ],
    )
    def test_section_problems(self, section: dict[str, Any], message: str) -> None:
        with pytest.raises(resilient.PolicyError, match=message):
            load(db={"chaos": section})

    def test_python_api_errors(self) -> None:
        with pytest.raises(resilient.PolicyError, match="did you mean 'network_delay'"):
            chaos.Fault("netwrk_delay")
        with pytest.raises(resilient.PolicyError, match="hang"):
            chaos.Fault("timeout", hang=-1)
        chaos.enable()
        with pytest.raises(resilient.PolicyError, match="from 0 to 1"):
            chaos.inject("p", "exception", rate=1.5, strict=False)
        with pytest.raises(resilient.PolicyError, match="did you mean 'latency_spike'"):
            chaos.inject("p", ["exception", "latency_spik"], strict=False)
        with pytest.raises(resilient.PolicyError, match="max_faults"):
            chaos.inject("p", "exception", max_faults=0, strict=False)
        with pytest.raises(resilient.PolicyError, match="unknown failure mode 'oops'"):
            chaos.check_modes(["exception", "oops"], where="service_config['failure_modes']")


def test_injection_as_context_manager_and_threads() -> None:
    """Concurrent callers in threads: every attempt counted once, the cap exact."""
    import concurrent.futures

    load(p={"retry": {"max_attempts": 1}})
    chaos.enable()
    with chaos.inject("p", chaos.Fault("error_result", value="bad"), max_faults=50) as inj:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: resilient.call("p", lambda: "ok"), range(400)))
        assert results.count("bad") == 50 == inj.faults
        assert inj.attempts == 400
    assert not inj.active
    assert chaos.active_injections() == ()


def test_async_concurrent_cohorts_do_not_mix() -> None:
    load(p={"retry": {"max_attempts": 1}, "fallback": "fb"})
    chaos.enable()
    injection = chaos.inject("p", chaos.Fault("network_delay", delay=1.0), cohort=0.5, seed=5)

    async def work() -> str:
        await asyncio.sleep(0)
        return "ok"

    async def main() -> list[Any]:
        return await asyncio.gather(*(resilient.acall("p", work) for _ in range(50)))

    with VirtualClock() as clock:
        assert clock.run(main()) == ["ok"] * 50
    assert injection.treated.calls + injection.control.calls == 50
    # each call counted in its own cohort, with its own latency
    assert injection.treated.p95_latency == pytest.approx(1.0)
    assert injection.control.p95_latency == pytest.approx(0.0)

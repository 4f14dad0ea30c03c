"""Chaos experiments: model and loader, runs in virtual time, guards, reports, CLI, manager."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import resilient
from resilient import chaos
from resilient.chaos import _inject
from resilient.chaos._runner import history
from resilient.cli import main
from resilient.errors import ChaosRefusedError, PolicyError
from resilient.events import ChaosInjected, subscribe
from resilient.manager import FeatureDisabledError, create_resilience_manager
from resilient.testing import VirtualClock

#: A Wednesday, 10:00 UTC: inside the usual business hours.
WEDNESDAY = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
#: A Saturday, 10:00 UTC.
SATURDAY = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _chaos_state() -> Iterator[None]:
    _inject._reset_for_tests()
    history.clear()
    yield
    _inject._reset_for_tests()
    history.clear()


def load(**policies: dict[str, Any]) -> None:
    resilient.load_policies({"version": 1, "policies": policies})


DB_POLICY: dict[str, Any] = {
    "circuit_breaker": {
        "failure_threshold": 5,
        "timeout_seconds": 5,
        "success_threshold": 2,
        "failure_rate_threshold": None,
    },
    "retry": {"max_attempts": 2, "base_delay": 0.05, "per_attempt_timeout": None, "timeout": None},
}


def experiment(**overrides: Any) -> chaos.Experiment:
    """An experiment against policy 'db': exceptions at 0.8 for 20 s, 20 calls/s."""
    body: dict[str, Any] = {
        "title": "db errors",
        "steady_state_hypothesis": {
            "window": 5,
            "recovery_timeout": 30,
            "probes": [
                {"type": "success_rate", "tolerance": 0.9},
                {"type": "breaker_state", "service": "db", "tolerance": "closed"},
            ],
        },
        "method": [{"service": "db", "mode": "exception", "intensity": 0.8, "duration": 20}],
        "load": {"rate": 20},
    }
    body.update(overrides)
    return chaos.Experiment.model_validate(body)


def run_virtual(
    make: Callable[[], tuple[chaos.Experiment, Callable[..., Any]]], **kwargs: Any
) -> chaos.ExperimentResult:
    """Build the target under a virtual clock and run the experiment on it."""
    with VirtualClock() as clock:
        exp, target = make()
        return clock.run(chaos.run_experiment(exp, target=target, seed=1, **kwargs))


def db_target() -> Callable[..., Any]:
    @resilient.resilient(policy="db")
    async def query() -> int:
        await asyncio.sleep(0.01)
        return 1

    return query


class TestRun:
    def test_breaker_opens_under_faults_and_closes_after_rollback(self) -> None:
        """The journal shows the breaker open under the faults, closed after; so does the report."""
        load(db=DB_POLICY)
        chaos.enable()
        result = run_virtual(lambda: (experiment(), db_target()))
        assert result.status == "completed"
        assert result.held is True
        moves = [(t["old"], t["new"]) for t in result.transitions]
        assert moves[0] == ("closed", "open")
        assert moves[-1] == ("half-open", "closed")
        opened = result.transitions[0]["at"]
        step = result.steps[0]
        assert step["started"] <= opened <= step["ended"]
        assert result.transitions[-1]["at"] > step["ended"]
        states = {s.phase: s.breakers["db"] for s in result.timeline}
        assert states["baseline"] == "closed"
        assert any(s.breakers["db"] == "open" for s in result.timeline if s.phase == "method")
        assert result.timeline[-1].breakers["db"] == "closed"
        assert result.totals["faults"] > 0
        report = chaos.render_markdown(result)
        assert "The breaker of 'db' opened" in report
        assert "closed again" in report
        json.dumps(result.to_dict())  # the journal is JSON

    def test_two_runs_at_once_each_see_their_own_service(self) -> None:
        """Two experiments running together (two services) each keep their call observer."""
        load(db=DB_POLICY, cache=DB_POLICY)

        def on(service: str, duration: float) -> chaos.Experiment:
            return experiment(
                title=f"errors in {service}",
                steady_state_hypothesis={
                    "window": 5,
                    "probes": [{"type": "success_rate", "service": service, "tolerance": 0.5}],
                },
                method=[{"service": service, "mode": "exception", "duration": duration}],
            )

        chaos.enable()
        with VirtualClock() as clock:

            @resilient.resilient(policy="cache")
            async def lookup() -> int:
                return 1

            async def both() -> list[chaos.ExperimentResult]:
                return list(
                    await asyncio.gather(
                        chaos.run_experiment(on("db", 10), target=db_target(), seed=1),
                        chaos.run_experiment(on("cache", 20), target=lookup, seed=2),
                    )
                )

            first, second = clock.run(both())
        for result in (first, second):
            assert result.status == "completed", result.abort_reason
            assert result.before is not None
            assert result.before[0].value == 1.0
            assert result.after is not None
            assert result.after[0].value is not None  # None: the run saw none of its calls

    def test_a_run_rolls_back_only_its_own_injections(self) -> None:
        """The same experiment on two services: the shorter run's rollback leaves the other be."""
        load(db={"retry": {"max_attempts": 1}}, cache={"retry": {"max_attempts": 1}})

        def on(service: str, duration: float) -> chaos.Experiment:
            return experiment(
                title="exception_test",  # as the manager's templates: one title, many services
                steady_state_hypothesis=None,
                method=[{"service": service, "mode": "exception", "duration": duration}],
                load={"rate": 10},
            )

        chaos.enable()
        with VirtualClock() as clock:

            @resilient.resilient(policy="cache")
            async def lookup() -> int:
                return 1

            async def both() -> list[chaos.ExperimentResult]:
                return list(
                    await asyncio.gather(
                        chaos.run_experiment(on("db", 10), target=db_target()),
                        chaos.run_experiment(on("cache", 30), target=lookup),
                    )
                )

            short, long = clock.run(both())
        assert short.steps[0]["stop_reason"] == "step ended"
        assert long.steps[0]["stop_reason"] == "step ended"  # not "rollback" at 10 s
        assert long.steps[0]["faults"] == 300  # 30 s x 10 calls/s, every one faulted

    def test_ramp_raises_the_intensity_step_by_step(self) -> None:
        """A ramped step goes from its start intensity to the step's over the ramp."""
        load(db=DB_POLICY)
        chaos.enable()
        step = {
            "service": "db",
            "mode": "network_delay",
            "intensity": 0.8,
            "duration": 10,
            "ramp": {"start": 0.0, "over": 8},
        }
        result = run_virtual(
            lambda: (experiment(method=[step], steady_state_hypothesis=None), db_target())
        )
        levels = [s.intensity for s in result.timeline if s.phase == "method"]
        assert levels == sorted(levels)
        assert levels[0] == pytest.approx(0.0)
        assert levels[-1] == pytest.approx(0.8)

    def test_abort_is_an_emergency_stop_and_rollbacks_run(self) -> None:
        """A success-rate floor aborts the run, stops every injection; the rollbacks still run."""
        load(db={"retry": {"max_attempts": 1}})
        chaos.enable()
        calls: list[str] = []
        module = type(sys)("chaos_rollbacks_abort")
        module.undo = lambda: calls.append("undo")  # type: ignore[attr-defined]
        sys.modules["chaos_rollbacks_abort"] = module
        exp = experiment(
            steady_state_hypothesis=None,
            method=[{"service": "db", "mode": "exception", "intensity": 1.0, "duration": 60}],
            rollbacks=[{"action": "call", "function": "chaos_rollbacks_abort:undo"}],
            safety={"check_interval": 1, "abort_on": {"success_rate_below": 0.5}},
        )
        # (the emergency stop is read inside the virtual clock: leaving it puts the
        # runtime's state back, chaos's included)
        try:
            with VirtualClock() as clock:
                target = db_target()
                result = clock.run(chaos.run_experiment(exp, target=target, seed=1))
                assert chaos.is_stopped()
                assert "db errors" in (chaos.stop_reason() or "")
                assert chaos.active_injections() == ()
                with pytest.raises(ChaosRefusedError) as refused:  # stopped until resume()
                    clock.run(chaos.run_experiment(exp, target=target, seed=1))
                assert refused.value.reason == "stopped"
                chaos.resume()
        finally:
            del sys.modules["chaos_rollbacks_abort"]
        assert result.status == "aborted"
        assert result.aborted
        assert "fell below the floor" in (result.abort_reason or "")
        assert result.steps[0]["ended"] < 5  # stopped within a few check intervals, not at 60 s
        assert calls == ["undo"]
        assert [r["action"] for r in result.rollbacks] == ["stop_injections", "call"]
        assert all(r["ok"] for r in result.rollbacks)

    def test_an_emergency_stop_during_a_pause_aborts_the_run(self) -> None:
        """A stop between two steps ends the run `aborted` (not `error`) before the next step."""
        load(db=DB_POLICY)
        chaos.enable()
        exp = experiment(
            method=[
                {
                    "service": "db",
                    "mode": "exception",
                    "intensity": 0.2,
                    "duration": 5,
                    "pause_after": 10,
                },
                {"service": "db", "mode": "exception", "duration": 5},
            ]
        )

        async def main() -> chaos.ExperimentResult:
            run = chaos.ExperimentRun(exp, target=db_target(), seed=1)
            task = asyncio.ensure_future(run.execute())
            await asyncio.sleep(13)  # 5 s baseline, 5 s first step, 3 s into the pause
            chaos.emergency_stop("the pager went off")
            return await task

        with VirtualClock() as clock:
            result = clock.run(main())
            chaos.resume()
        assert result.status == "aborted"
        assert result.error is None
        assert result.abort_reason == "emergency stop (the pager went off)"
        assert len(result.steps) == 1  # the second step never started

    def test_chaos_switched_off_mid_step_aborts_without_an_emergency_stop(self) -> None:
        """A manager closing (its claim given back) mid-step: `aborted` at once, no stop left."""
        load(db=DB_POLICY)

        async def main() -> chaos.ExperimentResult:
            with chaos.allowed():  # as a manager with chaos_engineering_enabled holds it
                task = asyncio.ensure_future(
                    chaos.run_experiment(experiment(), target=db_target(), seed=1)
                )
                await asyncio.sleep(8)  # 3 s into the method
            return await task

        with VirtualClock() as clock:
            result = clock.run(main())
            assert not chaos.is_stopped()  # nothing for anyone to resume()
        assert result.status == "aborted"
        assert result.abort_reason == "the injection was stopped (chaos switched off)"
        assert result.steps[0]["ended"] < 10  # not the 20 s of the step with no faults

    def test_cancellation_runs_the_rollbacks(self) -> None:
        """Cancelling a run (as Ctrl-C does to the main task) stops the faults, runs rollbacks."""
        load(db=DB_POLICY)
        chaos.enable()
        waits: list[float] = []

        async def main(clock: VirtualClock) -> chaos.ExperimentRun:
            exp = experiment(rollbacks=[{"action": "wait", "seconds": 3}])
            run = chaos.ExperimentRun(exp, target=db_target(), seed=1)
            task = asyncio.ensure_future(run.execute())
            await asyncio.sleep(12)  # baseline (5 s) done, 7 s into the method
            assert chaos.active_injections() != ()
            task.cancel()
            began = clock.now
            with pytest.raises(asyncio.CancelledError):
                await task
            waits.append(clock.now - began)
            return run

        with VirtualClock() as clock:
            run = clock.run(main(clock))
        result = run.result
        assert result.status == "cancelled"
        assert chaos.active_injections() == ()
        assert [r["action"] for r in result.rollbacks] == ["stop_injections", "wait"]
        assert waits[0] == pytest.approx(3, abs=0.1)  # the wait rollback really ran
        assert result.after is None  # no recovery check after a cancellation
        json.dumps(result.to_dict())

    def test_a_cancellation_during_the_rollbacks_is_not_swallowed(self) -> None:
        """Cancelled while a rollback runs: the other rollbacks run, then the run is cancelled."""
        load(db=DB_POLICY)
        chaos.enable()
        rollbacks = [{"action": "wait", "seconds": 10}, {"action": "wait", "seconds": 1}]

        async def main() -> chaos.ExperimentRun:
            exp = experiment(rollbacks=rollbacks)  # 5 s baseline, 20 s method, then rollbacks
            run = chaos.ExperimentRun(exp, target=db_target(), seed=1)
            task = asyncio.ensure_future(run.execute())
            await asyncio.sleep(27)  # 2 s into the first wait
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return run

        with VirtualClock() as clock:
            result = clock.run(main()).result
        assert result.status == "cancelled"
        assert [(r["action"], r["ok"]) for r in result.rollbacks] == [
            ("stop_injections", True),
            ("wait", False),  # the one the cancellation interrupted
            ("wait", True),  # rollbacks always run
        ]
        assert result.after is None  # no recovery phase after a cancellation

    def test_steady_state_not_holding_before_skips_the_method(self) -> None:
        """When the hypothesis fails at the baseline nothing is injected, and the run failed."""
        load(db=DB_POLICY)
        chaos.enable()
        exp = experiment(
            steady_state_hypothesis={"probes": [{"type": "latency_p95", "tolerance": 0.001}]}
        )
        result = run_virtual(lambda: (exp, db_target()))
        assert result.status == "failed"
        assert result.held is False
        assert result.steps == []
        assert result.totals["faults"] == 0
        # no recovery phase (it would measure for recovery_timeout=60 s, then blame recovery)
        assert result.after is None
        assert result.duration < 6
        assert not any("did not come back" in text for text in result.recommendations)
        assert any("did not hold before any fault" in text for text in result.recommendations)

    def test_cohort_divergence_aborts(self) -> None:
        """With a cohort, the run stops when the treated success rate departs from the control's."""
        load(db={"retry": {"max_attempts": 1}})
        chaos.enable()
        exp = experiment(
            steady_state_hypothesis=None,
            method=[
                {
                    "service": "db",
                    "mode": "exception",
                    "intensity": 1.0,
                    "duration": 60,
                    "cohort": 0.5,
                }
            ],
            safety={"abort_on": {"cohort_divergence": 0.3, "health_unhealthy": False}},
        )
        result = run_virtual(lambda: (exp, db_target()))
        assert result.status == "aborted"
        assert "cohorts diverged" in (result.abort_reason or "")
        cohorts = result.steps[0]["cohorts"]
        assert cohorts["control"]["success_rate"] == 1.0
        assert cohorts["treated"]["success_rate"] == 0.0

    def test_recommendations_read_the_policy_and_the_run(self) -> None:
        """Retries that multiply the load, and delays with no per-attempt timeout, are named."""
        load(db={"retry": {"max_attempts": 4, "base_delay": 0.01, "per_attempt_timeout": None}})
        chaos.enable()
        exp = experiment(
            steady_state_hypothesis={
                "window": 3,
                "probes": [{"type": "success_rate", "tolerance": 0}],
            },
            method=[
                {"service": "db", "mode": "exception", "intensity": 0.7, "duration": 10},
                {
                    "service": "db",
                    "mode": "network_delay",
                    "intensity": 1.0,
                    "duration": 10,
                    "parameters": {"network_delay": 0.5},
                },
            ],
        )
        result = run_virtual(lambda: (exp, db_target()))
        text = "\n".join(result.recommendations)
        assert "Retries multiplied the load" in text
        assert "max_attempts=4" in text
        assert "no per-attempt timeout" in text


class TestObserve:
    def test_without_a_target_the_run_observes_real_traffic(self) -> None:
        """With no load of its own, the experiment measures the service's live calls."""
        load(db=DB_POLICY)
        chaos.enable()
        exp = experiment(
            steady_state_hypothesis={
                "window": 3,
                "probes": [{"type": "success_rate", "service": "db", "tolerance": 0.9}],
            },
            method=[{"service": "db", "mode": "exception", "intensity": 1.0, "duration": 5}],
        )

        async def main() -> chaos.ExperimentResult:
            query = db_target()

            async def traffic() -> None:  # the application's own callers
                while True:
                    with contextlib.suppress(Exception):
                        await query()
                    await asyncio.sleep(0.1)

            caller = asyncio.ensure_future(traffic())
            try:
                return await chaos.run_experiment(exp, seed=1)
            finally:
                caller.cancel()

        with VirtualClock() as clock:
            result = clock.run(main())
        assert result.status == "completed"
        assert result.before is not None
        assert result.before[0].value == 1.0
        during = [s for s in result.timeline if s.phase == "method"]
        assert sum(s.calls for s in during) > 30
        assert any(s.success_rate == 0.0 for s in during)  # the faults reached the callers
        assert result.totals["faults"] > 0


class TestGuards:
    def test_switched_off_refuses(self) -> None:
        """Without chaos allowed in the process, nothing runs."""
        load(db=DB_POLICY)
        with pytest.raises(ChaosRefusedError, match="switched off") as refused:
            run_virtual(lambda: (experiment(), db_target()))
        assert refused.value.reason == "disabled"

    def test_a_fleet_stop_refuses_the_run_at_the_guards(self, server: Any) -> None:
        """Another replica's emergency stop (Redis) refuses the run before any load or baseline."""
        from resilient.backends import BackendConfig
        from resilient.backends.redis import RedisBackend

        config = BackendConfig(redis_url=server.url, key_prefix=f"chaos-run-{id(self)}")
        resilient.backends.configure(config=config)
        other = RedisBackend(config)  # another replica of the fleet
        try:
            load(db=DB_POLICY)
            chaos.enable()
            other.chaos_stop("replica 2 stopped everything")
            calls: list[int] = []

            async def query() -> int:
                calls.append(1)
                return 1

            with pytest.raises(ChaosRefusedError, match="replica 2") as refused:
                run_virtual(lambda: (experiment(), query))
            assert refused.value.reason == "stopped"
            assert calls == []
        finally:
            other.chaos_stop(None)
            other.close()
            resilient.backends.reset()

    def test_business_hours_refuse_outside_and_allow_inside(self) -> None:
        """Outside the window (a Saturday) the run is refused; inside (Wednesday 10:00) it runs."""
        load(db=DB_POLICY)
        chaos.enable()
        safety = {
            "business_hours": {
                "timezone": "Europe/Berlin",
                "start": "09:00",
                "end": "17:00",
                "days": ["mon", "tue", "wed", "thu", "fri"],
            }
        }
        exp = experiment(safety=safety, steady_state_hypothesis=None)
        with pytest.raises(ChaosRefusedError, match="outside business hours") as refused:
            run_virtual(lambda: (exp, db_target()), now=SATURDAY)
        assert refused.value.reason == "business_hours"
        late = WEDNESDAY.replace(hour=16, minute=30)  # 17:30 in Berlin
        with pytest.raises(ChaosRefusedError, match="Wed 17:30 in Europe/Berlin"):
            run_virtual(lambda: (exp, db_target()), now=late)
        result = run_virtual(lambda: (exp, db_target()), now=WEDNESDAY)
        assert result.status == "completed"

    def test_min_interval_between_runs(self, tmp_path: Path) -> None:
        """A second run within min_interval is refused, also from another process (history file)."""
        load(db=DB_POLICY)
        chaos.enable()
        history_file = tmp_path / "runs.json"
        exp = experiment(
            steady_state_hypothesis=None,
            safety={"min_interval": 3600, "history_file": str(history_file)},
        )
        run_virtual(lambda: (exp, db_target()), now=WEDNESDAY)
        with pytest.raises(ChaosRefusedError, match="min_interval is 3600") as refused:
            run_virtual(lambda: (exp, db_target()), now=WEDNESDAY + timedelta(minutes=30))
        assert refused.value.reason == "min_interval"
        history.clear()  # a new process: only the file remembers
        with pytest.raises(ChaosRefusedError):
            run_virtual(lambda: (exp, db_target()), now=WEDNESDAY + timedelta(minutes=59))
        result = run_virtual(lambda: (exp, db_target()), now=WEDNESDAY + timedelta(hours=2))
        assert result.status == "completed"

    def test_production_needs_allow_production(self) -> None:
        """In production the run is refused unless the experiment sets allow_production."""
        load(db=DB_POLICY)
        chaos.enable()
        chaos.set_environment("production")
        with pytest.raises(ChaosRefusedError) as refused:
            run_virtual(lambda: (experiment(steady_state_hypothesis=None), db_target()))
        assert refused.value.reason == "production"
        exp = experiment(steady_state_hypothesis=None, allow_production=True)
        assert run_virtual(lambda: (exp, db_target())).status == "completed"

    def test_blast_radius_caps_the_faults_of_each_step(self) -> None:
        """safety.max_faults holds for every step, whatever the intensity and duration."""
        load(db={"retry": {"max_attempts": 1}})
        chaos.enable()
        step = {"service": "db", "mode": "exception", "intensity": 1.0, "duration": 10}
        exp = experiment(
            steady_state_hypothesis=None, method=[step, step], safety={"max_faults": 7}
        )
        result = run_virtual(lambda: (exp, db_target()))
        assert [s["faults"] for s in result.steps] == [7, 7]
        assert result.totals["faults"] == 14

    def test_the_run_stops_when_business_hours_end(self) -> None:
        """A run that reaches the end of the window is aborted there, not left running."""
        load(db=DB_POLICY)
        chaos.enable()
        hours = {"timezone": "UTC", "start": "09:00", "end": "10:00"}
        exp = experiment(
            steady_state_hypothesis=None,
            method=[{"service": "db", "mode": "network_delay", "duration": 600}],
            safety={"business_hours": hours},
        )
        result = run_virtual(lambda: (exp, db_target()), now=WEDNESDAY - timedelta(seconds=30))
        assert result.status == "aborted"
        assert "business hours ended" in (result.abort_reason or "")
        assert 29 <= result.steps[0]["ended"] <= 32

    def test_dry_run_injects_and_calls_nothing(self) -> None:
        """A dry run plans and judges the guards; it calls no target and injects no fault."""
        load(db=DB_POLICY)
        calls = []
        seen: list[object] = []
        unsubscribe = subscribe(seen.append)

        async def target() -> None:
            calls.append(1)

        try:
            result = run_virtual(lambda: (experiment(), target), dry_run=True)
        finally:
            unsubscribe()
        assert result.status == "dry_run"
        assert calls == []
        assert not [e for e in seen if isinstance(e, ChaosInjected)]
        assert any("inject exception into 'db' at intensity 0.8 for 20 s" in p for p in result.plan)
        assert result.guards["disabled"] is not None  # a real run would be refused: chaos is off
        json.dumps(result.to_dict())

    def test_unknown_service_in_python(self) -> None:
        """An experiment built in Python naming an unknown service fails before anything runs."""
        load(db=DB_POLICY)
        chaos.enable()
        exp = experiment(method=[{"service": "dbb", "mode": "exception", "duration": 5}])
        with pytest.raises(PolicyError, match=r"method\[0\]\.service: unknown service .*'db'"):
            run_virtual(lambda: (exp, db_target()))


def write(tmp_path: Path, text: str, name: str = "experiment.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


GOOD = """\
    title: checkout
    policies: resilience.yaml
    load: {target: "chaos_target:call", rate: 20}
    steady_state_hypothesis:
      window: 3
      probes:
        - {type: success_rate, tolerance: 0.9}
        - {type: breaker_state, service: db, tolerance: closed}
    method:
      - {service: db, mode: exception, intensity: 0.8, duration: 10}
    rollbacks:
      - {action: wait, seconds: 1}
    """

POLICIES = """\
    version: 1
    policies:
      db:
        retry: {max_attempts: 1}
        circuit_breaker: {failure_threshold: 3, timeout_seconds: 2, success_threshold: 1}
    """

TARGET = """\
    import asyncio
    from resilient import resilient

    @resilient(policy="db")
    async def call():
        await asyncio.sleep(0.01)
    """


class TestLoad:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            pytest.param(
                "title: x\nmethod:\n  - {service: db, mode: network_dleay, duration: 1}\n",
                "experiment.yaml:3: method[0].mode[0]: 'network_dleay' is not one of "
                "network_delay, timeout, exception, error_result, latency_spike "
                "(did you mean 'network_delay'?)",
                id="unknown-mode",
            ),
            pytest.param(
                "title: x\nmethod:\n  - service: db\n    mode: timeout\n    intensity: 1.5\n"
                "    duration: 1\n",
                "experiment.yaml:5: method[0].intensity: Input should be less than or equal "
                "to 1 (got 1.5)",
                id="intensity",
            ),
            pytest.param(
                "title: x\nmethod: [{service: db, mode: timeout, duration: 1}]\nsafty: {}\n",
                "experiment.yaml:3: safty: unknown key (did you mean 'safety'?)",
                id="unknown-key",
            ),
            pytest.param(
                "title: x\nmethod: [{service: dbx, mode: timeout, duration: 1}]\n",
                "experiment.yaml:2: method[0].service: unknown service or policy 'dbx' "
                "(did you mean 'db'?)",
                id="unknown-service",
            ),
            pytest.param(
                "title: x\nmethod: [{service: db, mode: timeout, duration: 1}\n",
                "experiment.yaml:3: invalid YAML",
                id="yaml",
            ),
            pytest.param(
                "title: x\nmethod: [{service: db, mode: timeout, duration: 1}]\n"
                "steady_state_hypothesis:\n  probes:\n    - {type: health, tolerance: helthy}\n",
                "experiment.yaml:5: steady_state_hypothesis.probes[0]: 'helthy' is not one of "
                "healthy, degraded, unhealthy, unknown (did you mean 'healthy'?)",
                id="probe-tolerance",
            ),
            pytest.param(
                "title: x\nmethod: [{service: db, mode: timeout, duration: 1}]\nsafety:\n"
                "  business_hours: {timezone: Europe/Berln}\n",
                "experiment.yaml:4: safety.business_hours: unknown time zone 'Europe/Berln'",
                id="timezone",
            ),
            pytest.param(
                "title: x\nmethod:\n  - service: db\n    mode: network_delay\n"
                "    parameters: {network_delay: {dealy: 0.3}}\n    duration: 1\n",
                "experiment.yaml:3: method[0]: parameters: fault 'network_delay': dealy: Extra "
                "inputs are not permitted",
                id="parameters-typo",  # found at load time, not after the baseline
            ),
            pytest.param(
                "title: x\nmethod:\n  - service: db\n    mode: exception\n"
                "    parameters: {exeption: {error: ConnectionResetError}}\n    duration: 1\n",
                "experiment.yaml:3: method[0]: parameters: 'exeption' is not a failure mode of "
                "this step (exception) (did you mean 'exception'?)",
                id="parameters-mode",
            ),
        ],
    )
    def test_bad_files_name_file_line_and_key(
        self, tmp_path: Path, text: str, expected: str
    ) -> None:
        """Every mistake is a PolicyError with file:line, the key and a did-you-mean."""
        load(db=DB_POLICY)
        path = write(tmp_path, text)
        with pytest.raises(PolicyError) as raised:
            chaos.load_experiment(path)
        assert expected in str(raised.value)
        assert str(raised.value).startswith(str(path))

    def test_all_problems_at_once(self, tmp_path: Path) -> None:
        """Several mistakes are reported together, each at its line."""
        load(db=DB_POLICY)
        path = write(
            tmp_path,
            "title: x\nmethod:\n  - {service: db, mode: boom, duration: -1}\nload: {rate: 0}\n",
        )
        with pytest.raises(PolicyError, match="3 problems in the experiment") as raised:
            chaos.load_experiment(path)
        assert len(raised.value.problems) == 3

    def test_policies_file_names_the_services(self, tmp_path: Path) -> None:
        """Services are checked against the experiment's own policy file."""
        write(tmp_path, POLICIES, "resilience.yaml")
        path = write(tmp_path, GOOD)
        exp = chaos.load_experiment(path)
        assert exp.title == "checkout"
        assert Path(exp.policies or "").is_absolute()
        assert exp.method[0].mode == ["exception"]


class TestReports:
    def test_journal_of_a_python_built_experiment_with_objects_in_parameters(
        self, tmp_path: Path
    ) -> None:
        """Parameters JSON cannot hold (a class, any object) are written as text, not an error."""

        class Marker:
            def __repr__(self) -> str:
                return "<Marker>"

        load(db=DB_POLICY)
        chaos.enable()
        steps = [
            {"service": "db", "mode": "error_result", "intensity": 0.5, "duration": 2},
            {"service": "db", "mode": "exception", "intensity": 0.5, "duration": 2},
        ]
        steps[0]["parameters"] = {"error_result": {"value": Marker()}}
        steps[1]["parameters"] = {"exception": {"error": ConnectionResetError}}
        exp = experiment(steady_state_hypothesis=None, method=steps)
        result = run_virtual(lambda: (exp, db_target()))
        chaos.write_journal(result, tmp_path / "j.json")
        journal = json.loads((tmp_path / "j.json").read_text(encoding="utf-8"))
        written = [step["parameters"] for step in journal["experiment"]["method"]]
        assert written == [
            {"error_result": {"value": "<Marker>"}},
            {"exception": {"error": "builtins.ConnectionResetError"}},
        ]

    def test_cli_run_writes_journal_report_and_plot(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`resilient chaos run` drives the load, writes every output and exits 0 when it held."""
        pytest.importorskip("matplotlib")
        write(tmp_path, POLICIES, "resilience.yaml")
        write(tmp_path, TARGET, "chaos_target.py")
        path = write(tmp_path, GOOD)
        sys.modules.pop("chaos_target", None)
        argv = ["chaos", "run", str(path), "--virtual-time", "--journal", "j.json"]
        argv += ["--report", "r.html", "--plot", "p.png", "--seed", "3"]
        try:
            assert main(argv) == 0
        finally:
            sys.modules.pop("chaos_target", None)
        out = capsys.readouterr()
        assert "checkout: completed" in out.out
        assert "phase: method" in out.err  # plain lines: stderr is not a terminal
        journal = json.loads((tmp_path / "j.json").read_text())
        assert journal["status"] == "completed"
        assert journal["held"] is True
        assert any(t["new"] == "open" for t in journal["breaker_transitions"])
        html = (tmp_path / "r.html").read_text()
        assert html.startswith("<!DOCTYPE html>")
        assert '<img src="p.png"' in html
        assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the report command renders a saved journal again
        assert main(["chaos", "report", "j.json", "--report", "again.md"]) == 0
        assert "# Chaos experiment: checkout" in (tmp_path / "again.md").read_text()

    def test_cli_exit_codes(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """2 for a bad file, 1 when the hypothesis does not hold, 0 for a clean dry run."""
        write(tmp_path, POLICIES, "resilience.yaml")
        write(tmp_path, TARGET, "chaos_target.py")
        bad = write(tmp_path, GOOD.replace("exception", "exceptoin"), "bad.yaml")
        assert main(["chaos", "run", str(bad)]) == 2
        assert "bad.yaml:" in capsys.readouterr().err
        # 1 ms for the median: the 10 ms target can never meet it
        strict = GOOD.replace(
            "{type: success_rate, tolerance: 0.9}", "{type: latency_p50, tolerance: 0.001}"
        )
        failing = write(tmp_path, strict, "failing.yaml")
        sys.modules.pop("chaos_target", None)
        try:
            assert main(["chaos", "run", str(failing), "--virtual-time"]) == 1
            assert main(["chaos", "run", str(write(tmp_path, GOOD)), "--dry-run"]) == 0
        finally:
            sys.modules.pop("chaos_target", None)
        out = capsys.readouterr().out
        assert "dry run of 'checkout': nothing injected" in out

    def test_cli_shows_a_progress_bar_in_a_terminal(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """In a terminal the command redraws one status line with a progress bar."""

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        write(tmp_path, POLICIES, "resilience.yaml")
        write(tmp_path, TARGET, "chaos_target.py")
        path = write(tmp_path, GOOD)
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        sys.modules.pop("chaos_target", None)
        try:
            assert main(["chaos", "run", str(path), "--virtual-time"]) == 0
        finally:
            sys.modules.pop("chaos_target", None)
        shown = terminal.getvalue()
        assert shown.startswith("\r[")
        assert shown.count("\r[") >= 10  # one redraw per sample
        assert "]  99% " in shown
        assert "phase:" not in shown  # no plain lines in a terminal
        assert "db=open" in shown

    def test_plot_without_matplotlib_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without matplotlib the plot is an ImportError that says which extra to install."""
        load(db=DB_POLICY)
        result = run_virtual(lambda: (experiment(), db_target()), dry_run=True)
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(ImportError, match=r"resilient-policies\[plot\]"):
            chaos.write_plot(result, "x.png")


class TestSchedule:
    def test_every_n_seconds_with_the_same_guards(self) -> None:
        """A schedule runs on time; a run inside min_interval is skipped, not run."""
        load(db=DB_POLICY)
        chaos.enable()
        exp = experiment(
            steady_state_hypothesis=None,
            method=[{"service": "db", "mode": "exception", "intensity": 0.5, "duration": 5}],
            safety={"min_interval": 250},
        )
        with VirtualClock() as clock:
            target = db_target()
            sched = chaos.schedule(exp, every=120, runs=4, now=WEDNESDAY, target=target)
            clock.run(sched.run())
        assert [r.status for r in sched.results] == ["completed", "completed"]
        assert [s["reason"] for s in sched.skipped] == ["min_interval", "min_interval"]
        starts = [datetime.fromisoformat(r.started_at or "") for r in sched.results]
        assert starts[1] - starts[0] == timedelta(seconds=360)

    def test_a_run_that_errors_does_not_end_the_schedule(self) -> None:
        """An error of a run (here: its target cannot be imported) is recorded in
        ``failed`` and the schedule keeps its due times."""
        load(db=DB_POLICY)
        chaos.enable()
        exp = experiment(
            steady_state_hypothesis=None,
            method=[{"service": "db", "mode": "exception", "intensity": 0.5, "duration": 5}],
            load={"target": "no_such_module_r4:call", "rate": 10},
        )
        with VirtualClock() as clock:
            sched = chaos.schedule(exp, every=120, runs=3, now=WEDNESDAY)
            clock.run(sched.run())
        assert sched.results == []
        assert [f["error"] for f in sched.failed] == ["PolicyError"] * 3
        assert "no_such_module_r4" in sched.failed[0]["why"]

    def test_importing_the_load_target_leaves_sys_path_alone(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``load.target`` is imported from the current directory, which is not left on sys.path."""
        (tmp_path / "r4_target_mod.py").write_text(
            "import resilient\n\n@resilient.resilient(policy='db')\n"
            "async def call() -> int:\n    return 1\n",
            encoding="utf-8",
        )
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
        monkeypatch.delitem(sys.modules, "r4_target_mod", raising=False)
        before = list(sys.path)
        load(db=DB_POLICY)
        chaos.enable()
        exp = experiment(
            steady_state_hypothesis=None,
            method=[{"service": "db", "mode": "exception", "intensity": 0.5, "duration": 2}],
            load={"target": "r4_target_mod:call", "rate": 10},
        )
        try:
            with VirtualClock() as clock:
                result = clock.run(chaos.run_experiment(exp, seed=1))
        finally:
            sys.modules.pop("r4_target_mod", None)
        assert result.status == "completed"
        assert sys.path == before

    def test_cron_spec(self) -> None:
        """The cron spec finds the next matching minute in its time zone."""
        from resilient.chaos._schedule import CronSpec

        spec = CronSpec.parse("*/15 9-16 * * mon-fri")
        assert spec.next_after(SATURDAY) == datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
        assert spec.next_after(WEDNESDAY) == WEDNESDAY + timedelta(minutes=15)
        assert CronSpec.parse("0 3 1 * *").next_after(WEDNESDAY) == datetime(
            2027, 1, 1, 3, 0, tzinfo=UTC
        )
        with pytest.raises(ValueError, match="5 fields"):
            CronSpec.parse("* * *")
        with pytest.raises(ValueError, match="did you mean 'mon'"):
            CronSpec.parse("0 9 * * mom")
        with pytest.raises(ValueError, match="exactly one of every"):
            chaos.schedule(experiment())


class DB:
    """The seed's database client."""

    async def query(self, sql: str) -> list[tuple[int]]:
        await asyncio.sleep(0.005)
        return [(1,)]

    async def health_check(self) -> bool:
        return await self.query("SELECT 1") == [(1,)]


SEED_CONFIG = {
    "failure_threshold": 5,
    "timeout_seconds": 30,
    "max_retry_attempts": 3,
    "retry_base_delay": 1.0,
    "failure_modes": ["network_delay", "timeout", "exception"],
}


class TestManager:
    def test_seed_network_delay_test_runs_with_chaos_enabled(self) -> None:
        """The seed's call works on a manager with chaos enabled and returns a JSON journal."""

        async def main() -> tuple[dict[str, Any], dict[str, Any]]:
            manager = await create_resilience_manager(
                service_name="trading_app", chaos_engineering_enabled=True
            )
            await manager.register_service("database", DB(), SEED_CONFIG)
            journal = await manager.run_chaos_experiment("network_delay_test", "database")
            status = manager.get_system_status()
            await manager.close()
            return journal, status

        with VirtualClock() as clock:
            journal, status = clock.run(main())
        json.dumps(journal)
        assert journal["status"] == "completed"
        assert journal["held"] is True
        assert journal["totals"]["faults_by_mode"]["network_delay"] > 0
        assert status["chaos"]["last_experiment"]["status"] == "completed"
        assert not chaos.enabled()  # the manager's claim ended with it

    def test_refused_without_chaos_enabled(self) -> None:
        """Without chaos_engineering_enabled the call is refused with a clear error."""

        async def main() -> None:
            manager = await create_resilience_manager(service_name="t")
            await manager.register_service("database", DB(), SEED_CONFIG)
            try:
                with pytest.raises(FeatureDisabledError, match="chaos engineering is switched off"):
                    await manager.run_chaos_experiment("network_delay_test", "database")
            finally:
                await manager.close()

        asyncio.run(main())

    def test_templates_follow_failure_modes_and_registered_experiments_run(self) -> None:
        """A mode the service does not list is refused; a registered experiment runs by name."""

        async def main() -> dict[str, Any]:
            manager = await create_resilience_manager(chaos_engineering_enabled=True)
            await manager.register_service("database", DB(), SEED_CONFIG)
            try:
                with pytest.raises(ValueError, match="does not allow the failure mode"):
                    await manager.run_chaos_experiment("error_result_test", "database")
                with pytest.raises(ValueError, match="did you mean 'timeout_test'"):
                    await manager.run_chaos_experiment("timeout_tst", "database")
                exp = chaos.Experiment.model_validate(
                    {
                        "title": "short",
                        "method": [{"service": "database", "mode": "exception", "duration": 3}],
                    }
                )
                assert manager.register_experiment(exp, name="short") == "short"
                return await manager.run_chaos_experiment("short", "database")
            finally:
                await manager.close()

        with VirtualClock() as clock:
            journal = clock.run(main())
        assert journal["title"] == "short"
        assert journal["status"] == "completed"

    def test_registered_experiments_follow_failure_modes_and_the_service(self) -> None:
        """A registered experiment injects only the service's failure_modes, into that service."""

        def into(service: str, mode: str) -> chaos.Experiment:
            return chaos.Experiment.model_validate(
                {
                    "title": f"{mode} into {service}",
                    "method": [{"service": service, "mode": mode, "duration": 3}],
                }
            )

        async def main() -> None:
            manager = await create_resilience_manager(chaos_engineering_enabled=True)
            try:
                await manager.register_service("database", DB(), SEED_CONFIG)
                await manager.register_service("cache", DB(), {})
                with pytest.raises(ValueError, match="injects error_result into service"):
                    manager.register_experiment(into("database", "error_result"))
                # registered before its service: checked when it runs
                manager.register_experiment(into("queue", "error_result"), name="late")
                await manager.register_service("queue", DB(), {"failure_modes": ["network_delay"]})
                with pytest.raises(ValueError, match="whose failure_modes are network_delay"):
                    await manager.run_chaos_experiment("late", "queue")
                manager.register_experiment(into("database", "exception"), name="db")
                with pytest.raises(ValueError, match="injects into 'database', not into 'cache'"):
                    await manager.run_chaos_experiment("db", "cache")
                assert chaos.active_injections() == ()
            finally:
                await manager.close()

        with VirtualClock() as clock:
            clock.run(main())

    def test_bad_failure_modes_are_refused_at_registration(self) -> None:
        """A misspelt failure mode in service_config is a did-you-mean error."""

        async def main() -> None:
            manager = await create_resilience_manager()
            try:
                with pytest.raises(PolicyError, match="did you mean 'network_delay'"):
                    await manager.register_service(
                        "database", DB(), {"failure_modes": ["network_dlay"]}
                    )
            finally:
                await manager.close()

        asyncio.run(main())


class TestHealthAndExamples:
    def test_unhealthy_overall_health_aborts(self) -> None:
        """A health check that fails while faults are injected makes the run stop (UNHEALTHY)."""
        from resilient.health import HealthMonitor

        load(db=DB_POLICY)
        chaos.enable()
        monitor = HealthMonitor()
        monitor.add_check("db", lambda: not chaos.active_injections(), kind="deep")
        exp = experiment(
            steady_state_hypothesis={
                "window": 3,
                "probes": [{"type": "health", "tolerance": ["healthy", "unknown"]}],
            },
            method=[{"service": "db", "mode": "network_delay", "duration": 60}],
        )
        with VirtualClock() as clock:
            run = chaos.run_experiment(exp, target=db_target(), seed=1, monitor=monitor)
            result = clock.run(run)
            assert chaos.is_stopped()  # (leaving the virtual clock puts the state back)
        assert result.status == "aborted"
        assert result.abort_reason == "the overall health is UNHEALTHY"
        assert result.steps[0]["ended"] - result.steps[0]["started"] < 6
        assert [s.health for s in result.timeline if s.phase == "baseline"] == ["healthy"] * 3

    def test_docs_show_the_example_files_verbatim(self) -> None:
        """docs/chaos.md shows examples/chaos/*.yaml exactly as they are."""
        root = Path(__file__).resolve().parent.parent
        page = (root / "docs" / "chaos.md").read_text(encoding="utf-8")
        for name in ("experiment.yaml", "resilience.yaml"):
            text = (root / "examples" / "chaos" / name).read_text(encoding="utf-8")
            assert f"```yaml\n{text}```" in page, name

    def test_the_example_experiment_runs(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """examples/chaos/experiment.yaml runs (in virtual time) and its steady state holds."""
        root = Path(__file__).resolve().parent.parent
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.delitem(sys.modules, "inventory", raising=False)
        path = root / "examples" / "chaos" / "experiment.yaml"
        try:
            assert main(["chaos", "run", str(path), "--virtual-time", "--journal", "j.json"]) == 0
        finally:
            sys.modules.pop("inventory", None)
        journal = json.loads(Path("j.json").read_text())
        assert journal["held"] is True
        assert [t["new"] for t in journal["breaker_transitions"]][-1] == "closed"
        assert "Inventory survives" in capsys.readouterr().out

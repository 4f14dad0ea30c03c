"""The adaptive circuit breaker (issue #13): policy, behaviour, model, throttling, status."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import resilient
from resilient import Policy, PolicyError
from resilient._adaptive_bootstrap import bootstrap_model, suite
from resilient._models import CircuitBreakerConfig, TimeoutConfig
from resilient.adaptive import (
    FEATURES,
    AdaptiveCircuitBreaker,
    Forest,
    ThrottlingCircuitBreaker,
    load_model,
    recording,
    save_model,
    train,
)
from resilient.cli import main
from resilient.errors import CircuitOpenError
from resilient.events import PredictionCrossed
from resilient.manager import ResilienceManager
from resilient.pipeline import get_breaker
from resilient.testing import VirtualClock, capture_events, simulate
from resilient.testing._scenario import errors_ramp, healthy_noisy, load_spike, outage

BASE: dict[str, Any] = {
    "failure_threshold": 5,
    "timeout_seconds": 10.0,
    "failure_rate_window": 10,
    "min_requests_threshold": 10,
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _policy(**cb: Any) -> Policy:
    return Policy(
        circuit_breaker=CircuitBreakerConfig(**BASE, **cb),
        timeout=TimeoutConfig(per_attempt=1.0),
    )


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small model trained on simulated histories (training seeds only)."""
    path = str(tmp_path_factory.mktemp("model") / "model.joblib")
    cfg = CircuitBreakerConfig(**BASE, type="adaptive", adaptive={"n_estimators": 8})
    bootstrap_model(path, seeds=(101,), duration=120, rate=40, config=cfg)
    return path


def _outcomes(policy: Policy, scenario: Any, seed: int) -> tuple[Any, ...]:
    r = simulate(policy, scenario, duration=120, rate=40, seed=seed)
    return (r.succeeded, r.failed, r.rejected_breaker, r.backend_calls, r.transitions, r.timeline)


# --------------------------------------------------------------------------- policy


def test_basic_is_the_default_and_ignores_the_adaptive_fields() -> None:
    cfg = CircuitBreakerConfig(adaptive={"mode": "active"})
    assert cfg.type == "basic"
    resilient.load_policies(
        {"policies": {"db": {"circuit_breaker": {"prediction_threshold": 0.9}}}}
    )

    @resilient.resilient(policy="db")
    def f() -> int:
        return 1

    assert f() == 1
    assert type(get_breaker("db")) is resilient.CircuitBreaker


def test_unknown_mode_is_a_policy_error_with_file_line_and_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "resilience.yaml"
    path.write_text(
        "version: 1\npolicies:\n  db:\n    circuit_breaker:\n      type: adaptive\n"
        "      adaptive:\n        mode: activ\n"
    )
    with pytest.raises(PolicyError) as info:
        resilient.load_policies(str(path))
    text = str(info.value)
    assert f"{path}:7" in text
    assert "did you mean 'active'" in text


def test_unknown_type_and_adaptive_key(tmp_path: Path) -> None:
    path = tmp_path / "resilience.yaml"
    path.write_text(
        "version: 1\npolicies:\n  db:\n    circuit_breaker:\n      type: adaptiv\n"
        "      adaptive:\n        horizon_second: 5\n"
    )
    with pytest.raises(PolicyError) as info:
        resilient.load_policies(str(path))
    text = str(info.value)
    assert "did you mean 'adaptive'" in text
    assert "did you mean 'horizon_seconds'" in text


def test_missing_scikit_learn_is_a_policy_error_naming_the_ml_extra(tmp_path: Path) -> None:
    path = tmp_path / "resilience.yaml"
    path.write_text(
        "version: 1\npolicies:\n  db:\n    circuit_breaker:\n      type: adaptive\n"
        "  throttled:\n    circuit_breaker:\n      type: adaptive\n"
        "      adaptive: {mode: throttle}\n"
    )
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["sklearn"] = None  # as if scikit-learn were not installed
        import resilient
        try:
            resilient.load_policies({str(path)!r})
        except resilient.PolicyError as exc:
            print(exc)
        else:
            print("loaded")
        resilient.load_policies({{"policies": {{
            "t": {{"circuit_breaker": {{"type": "adaptive", "adaptive": {{"mode": "throttle"}}}}}},
            "n": {{"circuit_breaker": {{"type": "adaptive", "enable_ml_prediction": False}}}},
        }}}})
        print("throttle and no-ML load")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert f"{path}:4" in out
    assert "resilient-policies[ml]" in out
    assert "throttled" not in out.splitlines()[0]  # only the ML policy is refused
    assert "throttle and no-ML load" in out


# --------------------------------------------------------------------------- behaviour


def test_shadow_mode_never_changes_an_outcome(model_path: str) -> None:
    basic = _policy()
    shadow = _policy(
        type="adaptive", adaptive={"mode": "shadow", "model_path": model_path, "min_samples": 10}
    )
    for scenario in (errors_ramp(start=30, duration=20, hold=20), load_spike(start=40)):
        with recording() as made:
            got = _outcomes(shadow, scenario, seed=11)
        assert got == _outcomes(basic, scenario, seed=11)
        # and it did predict, and crossed the threshold, all the same
        status = made[0].get_status()["adaptive"]
        assert status["predictions"] > 50
        assert status["model_samples"] >= 10
        assert any(above for _, _, above in made[0].crossings)


def test_too_few_samples_is_exactly_the_basic_breaker(model_path: str) -> None:
    scenario = errors_ramp(start=30, duration=20, hold=20)
    active = _policy(
        type="adaptive",
        adaptive={"mode": "active", "model_path": model_path, "min_samples": 10**8},
    )
    with recording() as made:
        got = _outcomes(active, scenario, seed=5)
    assert got == _outcomes(_policy(), scenario, seed=5)
    status = made[0].get_status()["adaptive"]
    assert status["predicting"] is False
    assert status["predicted_risk"] is None
    assert status["predictions"] == 0


@pytest.mark.parametrize("action", ["shed", "open"])
def test_active_mode_acts_before_the_basic_breaker(model_path: str, action: str) -> None:
    scenario = errors_ramp(start=30, duration=30, hold=20)
    active = _policy(
        type="adaptive",
        adaptive={"mode": "active", "action": action, "model_path": model_path, "min_samples": 10},
    )
    basic = simulate(_policy(), scenario, duration=120, rate=40, seed=3)
    with recording() as made:
        got = simulate(active, scenario, duration=120, rate=40, seed=3)

    def first_refusal(r: Any) -> int:
        return next(s.second for s in r.timeline if s.rejected)

    assert first_refusal(got) < first_refusal(basic)
    assert got.failed < basic.failed
    assert made[0].crossings


def test_active_mode_leaves_a_healthy_noisy_service_alone(model_path: str) -> None:
    active = _policy(
        type="adaptive", adaptive={"mode": "active", "model_path": model_path, "min_samples": 10}
    )
    r = simulate(active, healthy_noisy(error_rate=0.05), duration=120, rate=40, seed=8)
    assert r.rejected_breaker == 0


def test_the_prediction_crossing_is_an_event(model_path: str) -> None:
    clock = Clock()
    cfg = CircuitBreakerConfig(
        **BASE,
        type="adaptive",
        adaptive={"mode": "shadow", "model_path": model_path, "min_samples": 10},
    )
    breaker = AdaptiveCircuitBreaker("db", cfg, clock=clock)
    with capture_events() as events:
        for second in range(40):
            failing = max(0, second - 20) * 2  # a ramp: 2 more failures each second
            for k in range(40):
                clock.now = second + k / 40
                try:
                    token = breaker.acquire()
                except CircuitOpenError:
                    continue
                if k < failing and k % 2:  # spread, never 5 in a row
                    breaker.on_failure(token, ConnectionError(), 0.002)
                else:
                    breaker.on_success(token, 0.02)
    crossed = [e for e in events if isinstance(e, PredictionCrossed)]
    assert crossed
    assert crossed[0].above
    assert crossed[0].policy == "db"
    assert crossed[0].risk > crossed[0].threshold == 0.7
    assert crossed[0].mode == "shadow"


def test_counters_are_per_call_and_exceptions_pass_unchanged() -> None:
    clock = Clock()
    cfg = CircuitBreakerConfig(
        **BASE,
        type="adaptive",
        ignore_exceptions=(KeyError,),
        record_exceptions=(ConnectionError,),
    )
    breaker = AdaptiveCircuitBreaker("db", cfg, clock=clock)
    t = breaker.acquire()
    breaker.on_failure(t, KeyError("x"), 0.01)  # ignored
    t = breaker.acquire()
    breaker.on_failure(t, ValueError("x"), 0.01)  # not recorded: a success
    t = breaker.acquire()
    breaker.on_failure(t, ConnectionError("x"), 0.01)
    t = breaker.acquire()
    breaker.on_cancel(t)
    status = breaker.get_status()
    assert status["totals"] == {
        "calls": 3,
        "successes": 1,
        "failures": 1,
        "ignored": 1,
        "rejections": 0,
    }
    # the bucket's row counts the same calls: one success and one failure settled
    # (the ignored and the cancelled call are neither), nothing refused
    clock.now += cfg.adaptive.bucket_seconds
    breaker.on_success(breaker.acquire(), 0.01)
    (_, row), *_ = breaker._rows
    named = dict(zip(FEATURES, row, strict=True))
    assert named["error_rate"] == 0.5
    assert named["rejection_share"] == 0.0


def test_latency_is_sampled_per_bucket_and_the_rest_take_the_basic_path() -> None:
    """The first calls of each bucket are measured; the others cost what basic costs."""
    clock = Clock()
    cfg = CircuitBreakerConfig(**BASE, type="adaptive", enable_ml_prediction=False)
    breaker = AdaptiveCircuitBreaker("db", cfg, clock=clock)

    def bucket(start: float, latency: float, calls: int) -> int:
        measured = 0
        for i in range(calls):
            clock.now = start + i * 0.5 / calls
            token = breaker.acquire()
            began = clock.now if breaker.needs_duration else -1.0  # what the lanes do
            clock.now += latency
            measured += began >= 0
            duration = clock.now - began if began >= 0 else -1.0
            if i % 20 == 19:
                breaker.on_failure(token, ConnectionError(), duration)
            else:
                breaker.on_success(token, duration)
        return measured

    # 400 calls in a bucket, one in 20 failing: 64 measured (the failures in
    # them included), then successes are counted by the basic breaker alone
    assert bucket(0.0, 0.010, 400) == 64
    assert bucket(1.0, 0.200, 400) == 64  # a new bucket samples again
    bucket(2.0, 0.010, 10)  # closes the second bucket
    rows = [dict(zip(FEATURES, row, strict=True)) for _, row in breaker._rows]
    assert [row["error_rate"] for row in rows] == [0.05, 0.05]  # every call counted
    assert rows[0]["throughput"] == 0.0  # the baseline is the first healthy bucket
    # latencies 20x higher: log2(0.2 / 0.01) = 4.3, less the baseline's 1/30 step
    # towards it (a healthy bucket) and within the histogram's half-octave
    assert 3.0 <= rows[1]["latency_p50"] <= 4.8
    assert 3.0 <= rows[1]["concurrency"] <= 4.8  # Little's law: 20x the time in flight
    assert breaker.get_status()["totals"]["successes"] == 2 * 380 + 10


def test_slow_call_tracking_still_times_every_call() -> None:
    """The latency sampling never turns off the durations the basic breaker needs."""
    clock = Clock()
    cfg = CircuitBreakerConfig(
        failure_threshold=1000,
        failure_rate_window=10,
        min_requests_threshold=10,
        slow_call_duration=0.5,
        slow_call_rate_threshold=0.5,
        type="adaptive",
        enable_ml_prediction=False,
    )
    breaker = AdaptiveCircuitBreaker("db", cfg, clock=clock)
    for i in range(200):  # far past the 64 samples of the bucket
        clock.now = i * 0.001
        token = breaker.acquire()
        assert breaker.needs_duration
        slow = i >= 100
        breaker.on_success(token, 1.0 if slow else 0.01)
        if breaker.state != "closed":
            break
    assert breaker.state == "open"  # the slow calls after the samples counted
    assert 100 < i < 200


# --------------------------------------------------------------------------- the model


def test_a_saved_model_loads_and_predicts_like_scikit_learn(
    model_path: str, tmp_path: Path
) -> None:
    model = load_model(model_path)
    assert isinstance(model, Forest)
    assert model.samples > 100
    rng = random.Random(0)
    rows = [[rng.uniform(-1, 3) for _ in FEATURES] for _ in range(50)]
    expected = model.classifier.predict_proba(rows)[:, 1]
    for row, want in zip(rows, expected, strict=True):
        assert model.risk(row) == pytest.approx(want, abs=1e-9)
    copy = tmp_path / "copy.joblib"
    save_model(model, str(copy))
    assert load_model(str(copy)).samples == model.samples
    cfg = CircuitBreakerConfig(**BASE, type="adaptive", adaptive={"model_path": str(copy)})
    breaker = AdaptiveCircuitBreaker("db", cfg)
    assert breaker.model is not None
    assert breaker.get_status()["adaptive"]["model_samples"] == model.samples


def test_a_bad_model_file_is_reported_not_raised(tmp_path: Path) -> None:
    bad = tmp_path / "bad.joblib"
    bad.write_bytes(b"not a model")
    cfg = CircuitBreakerConfig(**BASE, type="adaptive", adaptive={"model_path": str(bad)})
    breaker = AdaptiveCircuitBreaker("db", cfg)
    token = breaker.acquire()
    breaker.on_success(token, 0.01)
    status = breaker.get_status()["adaptive"]
    assert status["model_error"]
    assert status["model_samples"] == 0


def test_other_files_are_refused_by_load_model(tmp_path: Path) -> None:
    import joblib

    path = tmp_path / "x.joblib"
    joblib.dump({"format": 1, "features": ("a",), "classifier": None}, path)
    with pytest.raises(ValueError, match="other features"):
        load_model(str(path))
    with pytest.raises(ValueError, match="needs 12 features"):
        train([(1.0, 2.0)], [0])


def test_it_learns_online_from_its_own_history() -> None:
    """Without a saved model it is the basic breaker until min_samples, then predicts."""
    policy = _policy(
        type="adaptive",
        adaptive={"mode": "shadow", "min_samples": 60, "retrain_seconds": 30, "n_estimators": 5},
    )
    scenario = errors_ramp(start=20, duration=10, hold=10).then(
        errors_ramp(start=0, duration=10, hold=10), gap=30
    )
    with recording() as made:
        simulate(policy, scenario, duration=150, rate=30, seed=2)
    breaker = made[0]
    assert breaker.model is not None
    assert breaker.model.samples >= 60
    assert breaker.get_status()["adaptive"]["predictions"] > 0
    xs, ys = breaker.dataset()
    assert len(xs) == len(ys) > 100
    assert 0 < sum(ys) < len(ys)


def test_training_runs_in_a_background_thread_outside_recording() -> None:
    clock = Clock()
    cfg = CircuitBreakerConfig(
        **BASE,
        type="adaptive",
        adaptive={"min_samples": 20, "retrain_seconds": 50, "n_estimators": 3},
    )
    breaker = AdaptiveCircuitBreaker("db", cfg, clock=clock)
    for second in range(60):
        for k in range(10):
            clock.now = second + k / 10
            token = breaker.acquire()
            if 30 <= second < 35 and k % 2:
                breaker.on_failure(token, ConnectionError(), 0.01)
            else:
                breaker.on_success(token, 0.01)
        if breaker.state != "closed":
            breaker.reset()
    thread = breaker._training
    assert thread is not None
    assert thread.name == "resilient-adaptive-db"
    thread.join(30)
    assert breaker.model is not None


# --------------------------------------------------------------------------- throttle


def test_throttle_probability_follows_the_sre_formula() -> None:
    clock = Clock()
    cfg = CircuitBreakerConfig(
        failure_threshold=10**6,
        failure_rate_threshold=None,
        type="adaptive",
        enable_ml_prediction=False,
        adaptive={"mode": "throttle", "k": 2.0, "throttle_window": 60},
    )
    breaker = ThrottlingCircuitBreaker("db", cfg, clock=clock)
    random.seed(1)
    for i in range(100):
        clock.now = i * 0.01
        try:
            token = breaker.acquire()  # a refused request counts as a request too
        except CircuitOpenError:
            continue
        if i < 20:
            breaker.on_success(token, 0.01)
        else:
            breaker.on_failure(token, ConnectionError(), 0.01)
    # the window is the finished buckets: nothing changes before this one ends
    assert breaker.throttle_probability() == 0.0
    clock.now = 1.0  # the next bucket's first call closes it
    breaker.on_failure(breaker.acquire(), ConnectionError(), 0.01)
    # 100 requests, 20 accepts: p = (100 - 2 * 20) / 101
    assert breaker.throttle_probability() == pytest.approx(60 / 101)
    status = breaker.get_status()["adaptive"]["throttle"]
    assert (status["requests"], status["accepts"], status["k"]) == (100, 20, 2.0)
    refused = 0
    for i in range(2000):
        clock.now = 1.0 + i * 0.0001
        try:
            token = breaker.acquire()
        except CircuitOpenError:
            refused += 1
        else:
            breaker.on_failure(token, ConnectionError(), 0.01)
    assert refused > 1000  # the probability grows towards 1 as nothing is accepted
    # the window forgets: after throttle_window seconds the counts start again
    clock.now = 100.0
    breaker.acquire()
    assert breaker.throttle_probability() == 0.0
    assert breaker.get_status()["adaptive"]["throttle"]["requests"] == 0


# --------------------------------------------------------------------------- call forms


def test_type_adaptive_works_in_resilient_simulate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "resilience.yaml"
    path.write_text(
        "version: 1\npolicies:\n  broker:\n"
        "    circuit_breaker: {failure_threshold: 3, timeout_seconds: 5, type: adaptive,\n"
        "                      adaptive: {mode: active, min_samples: 30, retrain_seconds: 20,\n"
        "                                 n_estimators: 3}}\n"
    )
    code = main(
        ["simulate", str(path), "--policy", "broker", "--scenario", "outage", "--duration", "60"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "closed -> open" in out


async def test_type_adaptive_works_in_the_manager(model_path: str) -> None:
    cfg = CircuitBreakerConfig(adaptive={"mode": "active", "model_path": model_path})
    manager = ResilienceManager(
        resilient.ResilienceConfig(
            adaptive_circuit_breaker_enabled=True,
            circuit_breaker_config=cfg,
            health_monitoring_enabled=False,
            logging_enabled=False,
            metrics_enabled=False,
        )
    )
    await manager.initialize()
    try:

        class DB:
            async def query(self) -> int:
                return 1

        db = DB()
        await manager.register_service("db", db, {"failure_threshold": 3})
        async with manager.resilient_call("db", "query"):
            assert await db.query() == 1
        breaker = manager.circuit_breakers["db"]
        assert isinstance(breaker, AdaptiveCircuitBreaker)
        assert breaker.wait_for_model(30)  # loaded in a background thread
        service = manager.get_service_status("db")["circuit_breaker"]
        assert service["adaptive"]["mode"] == "active"
        assert service["adaptive"]["model_samples"] > 0
        system = manager.get_system_status()
        assert system["features"]["adaptive_circuit_breaker"] is True
        assert "adaptive_circuit_breaker" not in system["unavailable"]
        json.dumps(system)
    finally:
        await manager.close()


def test_manager_reads_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESILIENCE_ADAPTIVE_CIRCUIT_BREAKER_ENABLED", "true")
    assert resilient.ResilienceConfig().adaptive_circuit_breaker_enabled is True


def test_metrics_export_the_predicted_risk(model_path: str) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from resilient import metrics

    registry = prometheus_client.CollectorRegistry()
    metrics.enable(registry)
    try:
        clock = Clock()
        resilient.load_policies(
            {
                "policies": {
                    "db": {
                        "circuit_breaker": {
                            **BASE,
                            "type": "adaptive",
                            "adaptive": {"model_path": model_path, "min_samples": 10},
                        }
                    }
                }
            }
        )
        breaker = get_breaker("db")
        assert isinstance(breaker, AdaptiveCircuitBreaker)
        assert breaker.wait_for_model(30)
        breaker._clock = clock  # drive it by hand
        for second in range(6):
            for k in range(20):
                clock.now = second + k / 20
                breaker.on_success(breaker.acquire(), 0.02)
        risk = breaker.predicted_risk
        assert risk is not None
        text = prometheus_client.generate_latest(registry).decode()
        assert f'resilient_circuit_breaker_predicted_risk{{policy="db"}} {risk}' in text
    finally:
        metrics.disable()


def test_the_suite_never_shares_seeds_between_training_and_evaluation() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "adaptive"))
    try:
        import suite as bench  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    assert not set(bench.TRAIN_SEEDS) & set(bench.EVAL_SEEDS)
    # and a seed changes the scenarios themselves, not only the random draws
    assert [c.onset for c in suite(1)] != [c.onset for c in suite(2)]


def test_errors_ramp_and_load_spike_scenarios() -> None:
    ramp = errors_ramp(start=10, duration=10, hold=5, to=0.8)
    assert ramp.conditions_at(5).error_rate == 0.0
    assert ramp.conditions_at(15).error_rate == pytest.approx(0.4)
    assert ramp.conditions_at(22).error_rate == pytest.approx(0.8)
    assert ramp.conditions_at(26).error_rate == 0.0
    spike = load_spike(start=10, rise=4, duration=10, error_rate=0.6)
    assert spike.conditions_at(12).error_rate == pytest.approx(0.3)
    assert spike.conditions_at(20).latency.median == pytest.approx(0.4)
    assert spike.conditions_at(25).error_rate == 0.0
    with pytest.raises(ValueError, match="0 <= to <= 1"):
        errors_ramp(to=2.0)
    assert outage(start=1, duration=1).name == "outage"


# --------------------------------------------------------------------------- review (R2)


def _adaptive_policies(mode: str, **adaptive: Any) -> dict[str, Any]:
    cb = {**BASE, "type": "adaptive", "adaptive": {"mode": mode, **adaptive}}
    return {"policies": {"p": {"circuit_breaker": cb}}}


def test_a_reload_keeps_what_the_breaker_learned() -> None:
    """shadow -> active (the documented way to turn it on) keeps the model and history."""
    learn = {"min_samples": 50, "retrain_seconds": 60, "n_estimators": 5}
    rng = random.Random(0)
    with VirtualClock() as clock, recording():
        resilient.load_policies(_adaptive_policies("shadow", **learn))

        @resilient.resilient(policy="p")
        def call(fail: bool) -> int:
            if fail:
                raise ConnectionError
            return 1

        for second in range(200):
            bad = second % 50 > 40
            for _ in range(20):
                clock.advance(0.05)
                with contextlib.suppress(ConnectionError, CircuitOpenError):
                    call(bad and rng.random() < 0.6)
        learned = get_breaker("p")
        assert isinstance(learned, AdaptiveCircuitBreaker)
        assert learned.model is not None
        resilient.load_policies(_adaptive_policies("active", action="shed", **learn))
        assert call(False) == 1
        now = get_breaker("p")
        assert isinstance(now, AdaptiveCircuitBreaker)
        assert now is not learned
        assert now.get_status()["adaptive"]["mode"] == "active"
        assert now.model is learned.model
        assert now.get_status()["adaptive"]["history_buckets"] >= 200
        # a new bucket width changes what a row means: learning starts again
        resilient.load_policies(_adaptive_policies("active", bucket_seconds=2.0, **learn))
        assert call(False) == 1
        assert get_breaker("p").get_status()["adaptive"]["history_buckets"] == 0


def test_a_policy_loads_its_saved_model_in_the_background(model_path: str) -> None:
    """The first call does not wait for scikit-learn and the unpickling of the model."""
    resilient.load_policies(_adaptive_policies("shadow", model_path=model_path))

    @resilient.resilient(policy="p")
    def call() -> int:
        return 1

    assert call() == 1
    breaker = get_breaker("p")
    assert isinstance(breaker, AdaptiveCircuitBreaker)
    assert breaker._training is not None
    assert breaker._training.name == "resilient-adaptive-p-load"
    assert breaker.wait_for_model(30)
    status = breaker.get_status()["adaptive"]
    assert status["model_loading"] is False
    assert status["model_samples"] == load_model(model_path).samples


@pytest.mark.parametrize("mode", ["metrics_only", "disabled"])
def test_shedding_never_refuses_in_a_mode_that_never_rejects(model_path: str, mode: str) -> None:
    """metrics_only and disabled let every call through, shedding included."""
    scenario = errors_ramp(start=30, duration=20, hold=20)
    policy = _policy(
        mode=mode,
        type="adaptive",
        adaptive={"mode": "active", "action": "shed", "model_path": model_path, "min_samples": 10},
    )
    with recording() as made:
        r = simulate(policy, scenario, duration=120, rate=40, seed=3)
    assert any(above for _, _, above in made[0].crossings)  # it did predict a failure
    assert r.rejected_breaker == 0


def test_switching_to_metrics_only_stops_the_shedding_at_once(model_path: str) -> None:
    clock = Clock()
    cfg = CircuitBreakerConfig(
        **BASE,
        type="adaptive",
        prediction_threshold=0.01,
        adaptive={"mode": "active", "action": "shed", "model_path": model_path, "min_samples": 10},
    )
    breaker = AdaptiveCircuitBreaker("db", cfg, clock=clock)
    for second in range(60):
        for k in range(40):
            clock.now = second + k / 40
            with contextlib.suppress(CircuitOpenError):
                token = breaker.acquire()
                if second > 20 and k % 3 == 0:
                    breaker.on_failure(token, ConnectionError(), 0.3)
                else:
                    breaker.on_success(token, 0.02)
        if breaker.shed_share:
            break
    assert breaker.shed_share > 0
    breaker.metrics_only()
    assert breaker.shed_share == 0
    for _ in range(200):
        breaker.on_success(breaker.acquire(), 0.02)  # no CircuitOpenError


def test_it_trains_as_soon_as_it_has_min_samples_buckets() -> None:
    """Not a whole retrain period later (300 s by default): min_samples is the wait."""
    clock = Clock()
    cfg = CircuitBreakerConfig(
        **BASE, type="adaptive", adaptive={"min_samples": 50, "n_estimators": 3}
    )
    rng = random.Random(1)
    with recording():
        breaker = AdaptiveCircuitBreaker("db", cfg, clock=clock)
        first = None
        for second in range(120):
            for k in range(10):
                clock.now = second + k / 10
                with contextlib.suppress(CircuitOpenError):
                    token = breaker.acquire()
                    if second % 30 > 24 and rng.random() < 0.7:
                        breaker.on_failure(token, ConnectionError(), 0.01)
                    else:
                        breaker.on_success(token, 0.01)
            if first is None and breaker.model is not None:
                first = second
    assert first is not None
    assert first <= 60  # 50 labelled buckets + the 5 s horizon
    assert breaker.model is not None
    assert breaker.model.samples >= 50


@pytest.mark.parametrize("mode", ["metrics_only", "disabled"])
def test_throttling_never_refuses_in_a_mode_that_never_rejects(mode: str) -> None:
    scenario = errors_ramp(start=10, duration=5, hold=100)
    throttled = _policy(mode=mode, type="adaptive", adaptive={"mode": "throttle"})
    assert simulate(throttled, scenario, duration=120, rate=40, seed=3).rejected_breaker == 0
    normal = _policy(type="adaptive", adaptive={"mode": "throttle"})
    assert simulate(normal, scenario, duration=120, rate=40, seed=3).rejected_breaker > 0


def test_a_history_too_short_for_min_samples_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "resilience.yaml"
    path.write_text(
        "version: 1\npolicies:\n  db:\n    circuit_breaker:\n      type: adaptive\n"
        "      adaptive:\n        history_buckets: 200\n"
    )
    with pytest.raises(PolicyError, match="never predict") as info:
        resilient.load_policies(str(path))
    assert str(path) in str(info.value)
    # a saved model, or no model at all, makes it a valid choice
    CircuitBreakerConfig(type="adaptive", adaptive={"history_buckets": 200, "model_path": "m"})
    CircuitBreakerConfig(
        type="adaptive", enable_ml_prediction=False, adaptive={"history_buckets": 200}
    )


def test_an_outage_since_start_up_does_not_teach_it_that_everything_fails() -> None:
    """A history of failures only trains no model (it would refuse every call after)."""
    scenario = outage(start=0, duration=120)
    active = _policy(
        type="adaptive",
        adaptive={"mode": "active", "min_samples": 50, "retrain_seconds": 120, "n_estimators": 5},
    )
    basic = simulate(_policy(), scenario, duration=300, rate=20, seed=1)
    with recording() as made:
        got = simulate(active, scenario, duration=300, rate=20, seed=1)
    after = [s.rejected for s in got.timeline if s.second >= 140]
    assert sum(after) == sum(s.rejected for s in basic.timeline if s.second >= 140) == 0
    assert made[0].model is not None  # learned once it had seen the service healthy
    with pytest.raises(ValueError, match="both labels"):
        train([tuple(0.0 for _ in FEATURES)] * 10, [1] * 10)


def test_a_listener_of_an_early_opening_may_use_the_breaker(model_path: str) -> None:
    """Listeners run after the bucket's lock is released (one reading the history hung)."""
    clock = Clock()
    cfg = CircuitBreakerConfig(
        **BASE,
        type="adaptive",
        prediction_threshold=0.01,
        adaptive={"mode": "active", "model_path": model_path, "min_samples": 10},
    )
    breaker = AdaptiveCircuitBreaker("db", cfg, clock=clock)
    seen: list[tuple[str, str, int]] = []

    class Listener:
        def state_change(self, cb: Any, old: Any, new: Any) -> None:
            seen.append((old.name, new.name, len(breaker.dataset()[0])))

        def failure(self, cb: Any, exc: BaseException) -> None:
            pass

        def success(self, cb: Any) -> None:
            pass

    breaker.add_listener(Listener())

    def drive() -> None:
        for second in range(40):
            for k in range(40):
                clock.now = second + k / 40
                with contextlib.suppress(CircuitOpenError):
                    token = breaker.acquire()
                    if second > 20 and k % 3 == 0:
                        breaker.on_failure(token, ConnectionError(), 0.3)
                    else:
                        breaker.on_success(token, 0.02)

    worker = threading.Thread(target=drive, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "deadlock: a listener ran under the roll lock"
    assert seen[0][:2] == ("closed", "open")
    assert breaker.crossings  # the model opened it


# --------------------------------------------------------------------------- Redis backend


def _calls(breaker: AdaptiveCircuitBreaker, clock: Clock, second: int, failures: int = 0) -> None:
    """20 calls in *second*; *failures* of them fail, spread (never 5 in a row)."""
    for k in range(20):
        clock.now = second + k / 20
        try:
            token = breaker.acquire()
        except CircuitOpenError:
            continue
        if k % 3 == 0 and k // 3 < failures:
            breaker.on_failure(token, ConnectionError(), 0.01)
        else:
            breaker.on_success(token, 0.01)


@pytest.mark.parametrize("cause", ["predicted", "failures"])
def test_an_opening_adopted_from_another_process_is_learned_only_if_seen(
    server: Any, cause: str
) -> None:
    """
    Two breakers sharing a real Redis: A opens, B adopts the opening. A's model
    opening early (the service fine for B) must not teach B's model a failure;
    a trip B saw coming in its own calls is still a failure label.
    """
    redis = pytest.importorskip("redis")
    from resilient import backends
    from resilient.backends.redis import RedisBackend

    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    # a model that calls every healthy bucket a coming failure: A opens early at once
    rows = [tuple([float(i % 2)] + [0.0] * (len(FEATURES) - 1)) for i in range(100)]
    eager = train(rows, [1 - i % 2 for i in range(100)], n_estimators=3)
    cfg = {**BASE, "type": "adaptive"}
    one = RedisBackend(backends.BackendConfig(redis_url=server.url, flush_interval=0.05))
    two = RedisBackend(backends.BackendConfig(redis_url=server.url, flush_interval=0.05))
    try:
        clock_a, clock_b = Clock(), Clock()
        a = AdaptiveCircuitBreaker(
            "fleet-adaptive",
            CircuitBreakerConfig(**cfg, adaptive={"mode": "active", "min_samples": 10}),
            clock=clock_a,
            backend=one,
            model=eager if cause == "predicted" else None,
        )
        b = AdaptiveCircuitBreaker(
            "fleet-adaptive", CircuitBreakerConfig(**cfg), clock=clock_b, backend=two
        )
        assert one.wait_ready()
        assert two.wait_ready()
        second = 0
        while a.state == "closed" and second < 10:
            _calls(b, clock_b, second, failures=6 if cause == "failures" and second > 2 else 0)
            if cause == "failures" and second > 3:
                for _ in range(5):  # A's calls fail: the basic breaker trips
                    a.on_failure(a.acquire(), ConnectionError(), 0.01)
            else:
                _calls(a, clock_a, second)
            second += 1
        assert a.state == "open"
        assert b.state == "closed"  # 6 failures in 20 (30 %): B alone does not trip
        deadline = time.monotonic() + 5.0
        while b.state != "open" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.state == "open"
        for s in range(second, second + 8):
            _calls(b, clock_b, s)  # refused: B's breaker is the fleet's, open
        _, labels = b.dataset()
        if cause == "predicted":
            assert labels
            assert not any(labels)
        else:
            assert labels[-1] == 1  # the open buckets after B's failures still teach
    finally:
        one.close()
        two.close()


def test_simulate_uses_the_saved_model_from_the_first_call(model_path: str) -> None:
    """
    In virtual time the model loads (and training runs) on the calling thread: in a
    fresh process a background load finished after the simulated run (which then
    was the basic breaker's), and the same seed could give another result.
    """
    code = textwrap.dedent(
        f"""
        from resilient import Policy
        from resilient._models import CircuitBreakerConfig, TimeoutConfig
        from resilient.testing import simulate
        from resilient.testing._scenario import errors_ramp

        def policy(**cb):
            return Policy(
                circuit_breaker=CircuitBreakerConfig(**{BASE!r}, **cb),
                timeout=TimeoutConfig(per_attempt=1.0),
            )

        adaptive = {{"mode": "active", "model_path": {model_path!r}, "min_samples": 10}}
        scenario = errors_ramp(start=30, duration=30, hold=20)
        runs = [
            simulate(p, scenario, duration=120, rate=40, seed=3)
            for p in (policy(), policy(type="adaptive", adaptive=adaptive))
        ]
        print(runs[0].failed, runs[1].failed)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    basic, adaptive = map(int, out.stdout.split())
    assert adaptive < basic
    with recording():  # deterministic: as inside recording(), where training is inline
        recorded = simulate(
            _policy(
                type="adaptive",
                adaptive={"mode": "active", "model_path": model_path, "min_samples": 10},
            ),
            errors_ramp(start=30, duration=30, hold=20),
            duration=120,
            rate=40,
            seed=3,
        )
    assert recorded.failed == adaptive


def test_resilient_simulate_reports_the_adaptive_breaker(tmp_path: Path, model_path: str) -> None:
    """
    A fresh process, as a user runs it: importing scikit-learn takes longer than
    the whole simulated run, so a model loading in a background thread came too late.
    """
    path = tmp_path / "resilience.yaml"
    cb = "failure_threshold: 5, timeout_seconds: 10, failure_rate_window: 10"
    path.write_text(
        "version: 1\npolicies:\n"
        f"  basic:\n    circuit_breaker: {{{cb}}}\n"
        f"  pay:\n    circuit_breaker: {{{cb}, type: adaptive,\n"
        f"      adaptive: {{mode: active, min_samples: 10, model_path: '{model_path}'}}}}\n"
    )

    def run(name: str, *more: str) -> str:
        argv = [sys.executable, "-m", "resilient", "simulate", str(path), "--policy", name]
        argv += ["--scenario", "errors_ramp", "--rate", "40", *more]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    basic = json.loads(run("basic", "--json"))
    adaptive = json.loads(run("pay", "--json"))
    assert adaptive["failed"] < basic["failed"]  # the saved model acted in the run
    assert adaptive["adaptive"]["mode"] == "active"
    assert adaptive["adaptive"]["predictions"] > 0
    assert "adaptive breaker (active, action open): model trained on" in run("pay")


# --------------------------------------------------------------------------- low traffic


def test_a_service_called_less_than_once_a_bucket_still_predicts() -> None:
    """Buckets without a call between two calls do not reset the trends (only a long idle)."""
    rows = [tuple([float(i % 2)] + [0.0] * (len(FEATURES) - 1)) for i in range(100)]
    model = train(rows, [i % 2 for i in range(100)], n_estimators=3)
    clock = Clock()
    cfg = CircuitBreakerConfig(**BASE, type="adaptive", adaptive={"min_samples": 10})
    breaker = AdaptiveCircuitBreaker("rare", cfg, clock=clock, model=model)
    for i in range(40):
        clock.now = i * 2.5  # one call every 2.5 buckets
        breaker.on_success(breaker.acquire(), 0.01)
    status = breaker.get_status()["adaptive"]
    assert status["predicting"]
    assert status["predictions"] >= 30
    clock.now = 40 * 2.5 + 11  # idle for longer than the trends look back: they restart
    breaker.on_success(breaker.acquire(), 0.01)
    assert not breaker.get_status()["adaptive"]["predicting"]


def test_throttling_a_service_called_less_than_once_a_bucket() -> None:
    """The SRE window slides over empty buckets; they do not empty it."""
    clock = Clock()
    cfg = CircuitBreakerConfig(
        failure_threshold=10**6,
        failure_rate_threshold=None,
        type="adaptive",
        enable_ml_prediction=False,
        adaptive={"mode": "throttle", "k": 2.0, "throttle_window": 60},
    )
    breaker = ThrottlingCircuitBreaker("rare", cfg, clock=clock)
    random.seed(2)
    for i in range(20):
        clock.now = i * 1.5  # every call fails, one every 1.5 s: all within 60 s
        with contextlib.suppress(CircuitOpenError):
            breaker.on_failure(breaker.acquire(), ConnectionError(), 0.01)
    clock.now = 30.0
    # 19 finished buckets with one refused or failed request each (the last
    # call's bucket is not over yet): p = (19 - 0) / 20
    assert breaker.throttle_probability() == pytest.approx(19 / 20)
    clock.now = 100.0  # 60 s after the last call: the window is empty again
    breaker.acquire()
    assert breaker.throttle_probability() == 0.0

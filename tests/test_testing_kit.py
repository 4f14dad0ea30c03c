"""resilient.testing: virtual clock and loop, helpers, scenarios, simulate, CLI, pytest plugin."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load

import resilient
from resilient import _clock
from resilient.events import BreakerStateChanged, RetryScheduled, bus
from resilient.pipeline import breakers, get_breaker
from resilient.policy import registry
from resilient.testing import (
    CapturedEvents,
    Conditions,
    IsolatedRegistry,
    Latency,
    Phase,
    Scenario,
    ScriptedBackend,
    Step,
    VirtualClock,
    VirtualTimeEventLoop,
    brownout,
    capture_events,
    compose,
    flapping,
    healthy,
    healthy_noisy,
    isolated_registry,
    latency_creep,
    outage,
    simulate,
    testing_mode,
)
from resilient.testing._cli import add_simulate_parser, run_simulate, scenario_for
from resilient.testing.pytest_plugin import find_redis_server

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

FULL = resilient.Policy(
    retry=resilient.RetryConfig(max_attempts=3, base_delay=0.1, max_delay=2.0),
    circuit_breaker=resilient.CircuitBreakerConfig(failure_threshold=5, timeout_seconds=10),
    timeout=resilient.TimeoutConfig(per_attempt=1.0, total=5.0),
)
RETRY_ONLY = resilient.Policy(
    retry=resilient.RetryConfig(
        max_attempts=4, base_delay=0.2, jitter="none", timeout=None, per_attempt_timeout=None
    )
)
BARE = resilient.Policy()


# --------------------------------------------------------------------------- virtual clock


class TestVirtualClock:
    def test_sleep_advances_and_records(self) -> None:
        clock = VirtualClock(start=5.0)
        clock.sleep(1.5)
        clock.sleep(0)
        assert clock.now == clock.monotonic() == 6.5
        assert clock.sleeps == [1.5, 0]

    def test_advance_rejects_going_back(self) -> None:
        with pytest.raises(ValueError, match="forward"):
            VirtualClock().advance(-1)

    def test_install_swaps_the_seam_and_restores_it(self) -> None:
        before = (_clock.monotonic, _clock.sleep, _clock.asleep)
        with VirtualClock() as clock:
            assert clock.installed
            assert _clock.monotonic() == 0.0
            _clock.sleep(3600)
            assert _clock.monotonic() == 3600.0
        assert not clock.installed
        assert (_clock.monotonic, _clock.sleep, _clock.asleep) == before

    def test_nested_install_is_undone_by_the_outer_exit(self) -> None:
        clock = VirtualClock()
        with clock:
            with clock:
                pass
            assert _clock.monotonic == clock.monotonic
        assert _clock.monotonic is time.monotonic

    def test_retry_sleeps_take_no_real_time(self) -> None:
        backend = ScriptedBackend([True, True, True])
        began = time.perf_counter()
        with VirtualClock() as clock:
            assert resilient.call(RETRY_ONLY, backend) == "ok"
        assert time.perf_counter() - began < 0.5
        assert clock.sleeps == pytest.approx([0.2, 0.4, 0.8])
        assert clock.now == pytest.approx(1.4)
        assert backend.started == pytest.approx([0.0, 0.2, 0.6, 1.4])

    def test_sync_total_budget_is_measured_in_virtual_time(self) -> None:
        policy = resilient.Policy(
            retry=resilient.RetryConfig(
                max_attempts=50, base_delay=1.0, strategy="constant", jitter="none", timeout=3.5
            )
        )
        backend = ScriptedBackend([], then=Step(ConnectionError))
        with VirtualClock() as clock, pytest.raises(ConnectionError):
            resilient.call(policy, backend)
        # attempts at 0, 1, 2, 3; a sleep to 4 would outlive the 3.5 s budget
        assert backend.calls == 4
        assert clock.now == 3.0

    def test_breakers_built_under_the_clock_live_in_virtual_time(self) -> None:
        load(broker={"circuit_breaker": {"failure_threshold": 1, "timeout_seconds": 30}})
        real = get_breaker("broker")
        with VirtualClock() as clock:
            breaker = get_breaker("broker")
            assert breaker is not real
            with pytest.raises(ConnectionError):
                resilient.call("broker", ScriptedBackend([True]))
            assert breaker.state == "open"
            clock.advance(30)
            assert breaker.state == "half-open"
        assert breakers()["broker"] is real


class TestVirtualTimeEventLoop:
    def test_an_hour_of_sleep_takes_no_real_time(self) -> None:
        clock = VirtualClock()

        async def main() -> float:
            await asyncio.sleep(3600)
            return asyncio.get_running_loop().time()

        began = time.perf_counter()
        assert clock.run(main()) == 3600.0
        assert clock.now == 3600.0
        assert time.perf_counter() - began < 0.5

    def test_concurrent_sleepers_interleave_as_in_real_time(self) -> None:
        clock = VirtualClock()
        order: list[tuple[str, float]] = []

        async def sleeper(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            order.append((name, asyncio.get_running_loop().time()))

        async def main() -> None:
            await asyncio.gather(sleeper("c", 3), sleeper("a", 1), sleeper("b", 2))

        clock.run(main())
        assert order == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
        assert clock.now == 3.0

    def test_asyncio_timeout_is_virtual(self) -> None:
        clock = VirtualClock()

        async def main() -> None:
            async with asyncio.timeout(5):
                await asyncio.sleep(60)

        with pytest.raises(TimeoutError):
            clock.run(main())
        assert clock.now == 5.0

    def test_per_attempt_and_total_timeouts_fire_in_virtual_time(self) -> None:
        policy = resilient.Policy(
            retry=resilient.RetryConfig(
                max_attempts=10, base_delay=0.5, strategy="constant", jitter="none"
            ),
            timeout=resilient.TimeoutConfig(per_attempt=1.0, total=4.0),
        )
        backend = ScriptedBackend([], then=Step(None, latency=60.0))
        with VirtualClock() as clock:
            guarded = resilient.resilient(policy)(backend.acall)
            with pytest.raises(resilient.AttemptTimeoutError) as info:
                clock.run(guarded())
        assert info.value.kind == "total"
        assert clock.now == pytest.approx(4.0)
        assert backend.started == pytest.approx([0.0, 1.5, 3.0])

    def test_asleep_off_the_virtual_loop_advances_the_clock(self) -> None:
        clock = VirtualClock()

        async def main() -> None:
            await clock.asleep(2.5)

        asyncio.run(main())
        assert clock.now == 2.5
        assert clock.sleeps == [2.5]

    def test_threads_still_wake_the_loop(self) -> None:
        clock = VirtualClock()

        async def main() -> str:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, lambda: "from a thread")

        assert clock.run(main()) == "from a thread"
        assert clock.run(main(), poll_io=False) == "from a thread"

    def test_loop_without_a_clock_gets_its_own(self) -> None:
        loop = VirtualTimeEventLoop()
        try:
            assert loop.time() == 0.0
            loop.run_until_complete(asyncio.sleep(10))
            assert loop.time() == 10.0
        finally:
            loop.close()


# --------------------------------------------------------------------------- helpers


class TestTestingMode:
    def test_caps_attempts_and_does_not_sleep(self) -> None:
        load(broker={"retry": {"max_attempts": 5, "base_delay": 10}})
        backend = ScriptedBackend([True, True, True, True, True])
        began = time.perf_counter()
        with testing_mode(attempts=1) as clock, pytest.raises(ConnectionError) as info:
            resilient.call("broker", backend)
        assert backend.calls == 1
        assert clock.sleeps == []
        assert time.perf_counter() - began < 0.5
        assert "gave up" not in " ".join(getattr(info.value, "__notes__", []))

    def test_attempts_none_keeps_the_policy_and_skips_sleeps(self) -> None:
        load(broker={"retry": {"max_attempts": 3, "base_delay": 10, "jitter": False}})
        backend = ScriptedBackend([True, True])
        with testing_mode(attempts=None) as clock:
            assert resilient.call("broker", backend) == "ok"
        assert backend.calls == 3
        assert clock.sleeps == [10, 20]

    def test_restores_on_exit(self, sleeps: list[float]) -> None:
        load(broker={"retry": {"max_attempts": 3, "base_delay": 1, "jitter": False}})
        with testing_mode(attempts=2):
            pass
        backend = ScriptedBackend([True, True])
        assert resilient.call("broker", backend) == "ok"
        assert backend.calls == 3
        assert sleeps == [1, 2]

    def test_rejects_zero_attempts(self) -> None:
        with pytest.raises(ValueError, match="at least 1"), testing_mode(attempts=0):
            pass

    def test_is_not_collected_as_a_test(self) -> None:
        assert testing_mode.__test__ is False  # type: ignore[attr-defined]


class TestCaptureEvents:
    def test_records_in_order_and_filters(self) -> None:
        with VirtualClock(), capture_events() as events:
            resilient.call(RETRY_ONLY, ScriptedBackend([True]))
        assert isinstance(events, CapturedEvents)
        assert events.names() == ["RetryScheduled"]
        assert events.of_type(RetryScheduled)[0].delay == pytest.approx(0.2)
        assert events.of_type(BreakerStateChanged) == []
        assert not bus.active


class TestIsolatedRegistry:
    def test_isolates_policies_breakers_and_subscribers(self) -> None:
        load(outer={"circuit_breaker": {}})
        outer_breaker = get_breaker("outer")
        subscriber = lambda event: None  # noqa: E731
        bus.subscribe(subscriber)
        with isolated_registry({"version": 1, "policies": {"inner": {}}}) as policies:
            assert isinstance(policies, IsolatedRegistry)
            assert policies.names() == ["inner"]
            assert breakers() == {}
            assert bus._subscribers == ()
            bus.subscribe(lambda event: None)
        assert resilient.policy_names() == ["outer"]
        assert breakers() == {"outer": outer_breaker}
        assert bus._subscribers == (subscriber,)

    def test_accepts_policy_objects_and_restores_an_unloaded_registry(self) -> None:
        assert not registry.loaded
        with isolated_registry() as policies:
            assert policies.load({"p": FULL}) == {"p": FULL}
            assert policies.get("p") is FULL
            policies.reset_breakers()
        assert not registry.loaded


# --------------------------------------------------------------------------- scenarios


class TestScenarios:
    def test_latency_distribution(self) -> None:
        rng = random.Random(1)
        samples = sorted(Latency(0.02, 0.1).sample(rng) for _ in range(20_000))
        assert samples[10_000] == pytest.approx(0.02, rel=0.05)
        assert samples[19_800] == pytest.approx(0.1, rel=0.1)
        assert Latency(0.5, 0.5).sample(rng) == 0.5
        with pytest.raises(ValueError, match="at least the median"):
            Latency(1.0, 0.5)

    def test_outage_schedule(self) -> None:
        sc = outage(start=10, duration=5)
        assert sc.conditions_at(9.99).error_rate == 0.0
        assert sc.conditions_at(10).error_rate == 1.0
        assert sc.conditions_at(15).error_rate == 0.0
        assert sc.end == 15

    def test_later_phases_win_when_composed(self) -> None:
        sc = outage(start=10, duration=20) | brownout(start=0, duration=15, error_rate=0.3)
        assert [sc.conditions_at(t).error_rate for t in (5, 12, 20, 40)] == [0.3, 0.3, 1.0, 0.0]
        assert sc.name == "outage|brownout"
        reverse = compose(brownout(start=0, duration=15, error_rate=0.3), outage(start=10))
        assert reverse.conditions_at(12).error_rate == 1.0

    def test_ramps_and_their_slices(self) -> None:
        sc = latency_creep(start=0, duration=100, to=Latency(1.0, 2.0))
        assert sc.conditions_at(50).latency.median == pytest.approx(0.51)
        assert sc.conditions_at(500).latency == Latency(1.0, 2.0)
        cut = sc | outage(start=40, duration=20)
        assert cut.conditions_at(70).latency.median == pytest.approx(0.0198 + 0.7 * 0.98, rel=0.01)

    def test_flapping_shift_and_then(self) -> None:
        sc = flapping(start=0, duration=20, period=10, down=0.3)
        assert [sc.conditions_at(t).error_rate for t in (1, 4, 11, 14)] == [1.0, 0.0, 1.0, 0.0]
        later = sc.shift(100)
        assert later.conditions_at(101).error_rate == 1.0
        both = outage(start=0, duration=10).then(outage(start=0, duration=10), gap=5)
        assert [both.conditions_at(t).error_rate for t in (5, 12, 18)] == [1.0, 0.0, 1.0]

    def test_noisy_and_healthy_have_no_phases(self) -> None:
        assert healthy_noisy().conditions_at(1e6).error_rate == 0.05
        assert healthy().phases == ()

    def test_invalid_values(self) -> None:
        with pytest.raises(ValueError, match="error_rate"):
            Conditions(error_rate=2)
        with pytest.raises(ValueError, match="start < end"):
            Phase(5, 5, Conditions())
        with pytest.raises(ValueError, match="period"):
            flapping(period=0)
        with pytest.raises(ValueError, match="at least one"):
            compose()

    def test_custom_scenario(self) -> None:
        sc = Scenario("custom", Conditions(0.1), (Phase(0, 10, Conditions(0.0), Conditions(1.0)),))
        assert sc.conditions_at(5).error_rate == pytest.approx(0.5)
        assert sc.conditions_at(11).error_rate == 0.1


class TestScriptedBackend:
    def test_plays_steps_then_the_default(self) -> None:
        backend = ScriptedBackend([Step(ValueError), False], value=42)
        with pytest.raises(ValueError, match="scripted failure"):
            backend()
        assert backend() == 42
        assert backend() == 42
        assert backend.calls == 3
        assert Step(KeyError).failed
        assert not Step().failed


# --------------------------------------------------------------------------- simulate


class TestSimulate:
    def test_same_seed_same_result_other_seed_other_result(self) -> None:
        sc = brownout(start=10, duration=20) | outage(start=20, duration=10)
        first = simulate(FULL, sc, duration=40, rate=100, seed=7)
        second = simulate(FULL, sc, duration=40, rate=100, seed=7)
        assert first == second
        assert first.to_dict() == second.to_dict()
        assert simulate(FULL, sc, duration=40, rate=100, seed=8) != first

    def test_counts_add_up(self) -> None:
        result = simulate(FULL, outage(start=10, duration=20), duration=40, rate=50, seed=1)
        outcomes = result.succeeded + result.failed + result.rejected
        assert outcomes == result.attempted > 1500
        assert result.fallback == 0  # FULL has no fallback
        assert sum(s.arrivals for s in result.timeline) == result.attempted
        assert sum(s.backend_calls for s in result.timeline) == result.backend_calls
        assert sum(s.succeeded for s in result.timeline) == result.succeeded
        assert sum(s.rejected for s in result.timeline) == result.rejected
        assert sum(result.backend_calls_by_state.values()) == result.backend_calls
        assert result.backend_calls <= result.attempted + result.retried

    def test_breaker_keeps_calls_off_the_backend_during_an_outage(self) -> None:
        sc = outage(start=10, duration=60)
        guarded = simulate(FULL, sc, duration=90, rate=100, seed=3)
        naive = simulate(RETRY_ONLY, sc, duration=90, rate=100, seed=3)
        assert guarded.backend_calls_by_state.get("open", 0) == 0
        assert guarded.rejected_breaker > 4000
        assert [t.new for t in guarded.transitions[:3]] == ["open", "half-open", "open"]
        assert guarded.transitions[0].at == pytest.approx(10, abs=0.2)
        assert naive.load_amplification > 2.0 > 0.9 > guarded.load_amplification
        assert naive.rejected_breaker == 0
        assert naive.transitions == ()
        # the timeline shows the breaker open in the middle of the outage
        assert guarded.timeline[40].breaker_state in ("open", "half-open")
        assert guarded.timeline[5].breaker_state == "closed"
        assert naive.timeline[40].breaker_state is None

    def test_timeouts_bound_caller_latency(self) -> None:
        policy = FULL.model_copy(update={"circuit_breaker": None})
        sc = outage(start=0, duration=30, hang=1.0, hang_for=30.0)
        result = simulate(policy, sc, duration=25, rate=20, seed=2)  # all within the outage
        assert result.timed_out == result.failed == result.attempted
        assert result.retried == 2 * result.attempted
        assert 3.0 <= result.latency.p50 <= result.latency.max <= 5.0 + 1e-9
        assert result.latency.p50 <= result.latency.p90 <= result.latency.p99 <= result.latency.max

    def test_bare_policy_matches_the_reference(self) -> None:
        result = simulate(BARE, healthy_noisy(error_rate=0.2), duration=30, rate=40, seed=5)
        assert result.backend_calls == result.attempted
        assert result.backend_failures == result.failed
        assert result.succeeded == result.attempted - result.failed
        assert result.load_amplification == 1.0

    def test_fallback_answers_instead_of_failing(self) -> None:
        policy = resilient.Policy(fallback="cached")
        result = simulate(policy, outage(start=0, duration=10), duration=10, rate=20, seed=1)
        assert result.fallback == result.attempted
        # the calls still failed: the fallback answered them
        assert result.failed == result.attempted
        assert result.succeeded == 0

    def test_fallback_does_not_hide_why_calls_were_refused(self) -> None:
        # Issue 10: with a fallback, the summary showed 0 rejections by the breaker
        # and the rate limit. The fallback changes what callers get, not what the
        # breaker and the rate limiter did: the counts must be those of the same run
        # without a fallback.
        limited = FULL.model_copy(
            update={"rate_limit": resilient.RateLimitConfig(max_rate=40, max_wait=0)}
        )
        sc = outage(start=10, duration=30)
        for policy, counted in ((FULL, "rejected_breaker"), (limited, "rejected_rate_limit")):
            plain = simulate(policy, sc, duration=50, rate=60, seed=4)
            covered = simulate(
                policy.model_copy(update={"fallback": resilient.FallbackConfig(value="stale")}),
                sc,
                duration=50,
                rate=60,
                seed=4,
            )
            assert getattr(plain, counted) > 100
            for name in (
                "succeeded",
                "failed",
                "timed_out",
                "rejected_breaker",
                "rejected_bulkhead",
                "rejected_rate_limit",
                "rejected_other",
                "backend_calls",
            ):
                assert getattr(covered, name) == getattr(plain, name), name
            assert [s.rejected for s in covered.timeline] == [s.rejected for s in plain.timeline]
            assert plain.fallback == 0
            assert covered.fallback == covered.failed + covered.rejected
            assert covered.answered == covered.attempted > plain.answered
            assert sum(s.fallback for s in covered.timeline) == covered.fallback
            text = covered.summary()
            assert f"answered by fallback{covered.fallback:>13}" in text
            by_breaker = f"rejected by breaker{covered.rejected_breaker:>14}"
            assert by_breaker in text

    def test_fallback_of_a_timed_out_call_counts_as_timed_out(self) -> None:
        policy = FULL.model_copy(
            update={"circuit_breaker": None, "fallback": resilient.FallbackConfig(value=0)}
        )
        sc = outage(start=0, duration=30, hang=1.0, hang_for=30.0)
        result = simulate(policy, sc, duration=10, rate=10, seed=2)
        assert result.timed_out == result.failed == result.fallback == result.attempted

    def test_warns_when_retry_on_misses_the_simulated_error(self) -> None:
        # Issue 10: a retry_on without ConnectionError silently showed 0 retries.
        policy = FULL.model_copy(
            update={"retry": FULL.retry.model_copy(update={"retry_on": (KeyError,)})}
        )
        sc = outage(start=0, duration=10)
        with pytest.warns(UserWarning, match=r"never retries .*retry_on \(KeyError\)"):
            result = simulate(policy, sc, duration=10, rate=10, seed=1, name="broker")
        assert result.retried == 0
        assert len(result.warnings) == 1
        assert "policy 'broker'" in result.warnings[0]
        assert result.summary().splitlines()[2] == f"  warning: {result.warnings[0]}"
        assert json.loads(json.dumps(result.to_dict()))["warnings"] == list(result.warnings)
        # give_up_on that stops it is reported too
        stopped = FULL.model_copy(
            update={"retry": FULL.retry.model_copy(update={"give_up_on": (ConnectionError,)})}
        )
        with pytest.warns(UserWarning, match="give_up_on"):
            simulate(stopped, sc, duration=2, rate=5, seed=1)

    def test_no_warning_when_the_simulated_error_is_retried(self) -> None:
        by_predicate = FULL.model_copy(
            update={
                "retry": FULL.retry.model_copy(
                    update={
                        "retry_on": (KeyError,),
                        "retry_if_exception": lambda exc: isinstance(exc, OSError),
                    }
                )
            }
        )
        single = FULL.model_copy(
            update={"retry": FULL.retry.model_copy(update={"max_attempts": 1, "retry_on": ()})}
        )
        sc = outage(start=0, duration=5)
        for policy in (FULL, by_predicate, single, BARE):
            # pytest turns warnings into errors (filterwarnings = error)
            result = simulate(policy, sc, duration=5, rate=10, seed=1)
            assert result.warnings == ()
            assert "warning:" not in result.summary()

    def test_policy_by_name_and_isolation(self) -> None:
        load(broker={"retry": {"max_attempts": 2, "base_delay": 0.1}, "circuit_breaker": {}})
        real_breaker = get_breaker("broker")
        subscriber = lambda event: None  # noqa: E731
        bus.subscribe(subscriber)
        random.seed(99)
        expected_next = random.Random(99).random()
        result = simulate("broker", outage(start=5, duration=10), duration=20, rate=30, seed=1)
        assert result.policy == "broker"
        assert random.random() == expected_next
        assert get_breaker("broker") is real_breaker
        assert real_breaker.state == "closed"
        assert bus._subscribers == (subscriber,)
        assert _clock.monotonic is time.monotonic

    def test_summary_and_json(self) -> None:
        result = simulate(FULL, flapping(start=5, duration=20), duration=30, rate=30, seed=1)
        text = result.summary()
        assert "rejected by breaker" in text
        assert "load amplification" in text
        data = json.loads(json.dumps(result.to_dict()))
        assert data["attempted"] == result.attempted
        assert len(data["timeline"]) == len(result.timeline)

    def test_rejects_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="duration"):
            simulate(FULL, healthy(), duration=0)
        with pytest.raises(ValueError, match="rate"):
            simulate(FULL, healthy(), duration=1, rate=-1)
        with pytest.raises(TypeError, match="Policy"):
            simulate(42, healthy(), duration=1)  # type: ignore[arg-type]

    def test_speed(self) -> None:
        # 60 s at 200 calls/s (12 000 calls) through a full policy; the
        # 10-minute acceptance run is test_ten_minutes_at_200_per_second (slow).
        began = time.perf_counter()
        result = simulate(FULL, latency_creep(start=0, duration=60), duration=60, rate=200, seed=1)
        assert result.attempted > 11_000
        assert time.perf_counter() - began < 5.0

    @pytest.mark.slow
    def test_ten_minutes_at_200_per_second(self) -> None:
        sc = brownout(start=120, duration=240) | outage(start=300, duration=60)
        began = time.perf_counter()
        first = simulate(FULL, sc, duration=600, rate=200, seed=1)
        took = time.perf_counter() - began
        assert first.attempted > 115_000
        assert took < 15.0, f"10 minutes at 200/s took {took:.1f} s"
        assert simulate(FULL, sc, duration=600, rate=200, seed=1) == first


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="resilient")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status


POLICY_FILE = """\
version: 1
policies:
  broker:
    retry: {max_attempts: 2, base_delay: 0.1}
    circuit_breaker: {failure_threshold: 3, timeout_seconds: 5}
    timeout: {per_attempt: 1.0, total: 3.0}
"""


class TestCli:
    def test_table(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "resilience.yaml").write_text(POLICY_FILE)
        argv = ["simulate", "resilience.yaml", "--policy", "broker", "--duration", "20"]
        assert _cli([*argv, "--rate", "20"]) == 0
        out = capsys.readouterr().out
        assert "policy 'broker' vs scenario 'outage'" in out
        assert "breaker transitions" in out

    def test_json_is_deterministic(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "resilience.yaml").write_text(POLICY_FILE)
        argv = ["simulate", "resilience.yaml", "--policy", "broker", "--duration", "20"]
        argv += ["--scenario", "brownout,outage", "--rate", "20", "--seed", "3", "--json"]
        assert _cli(argv) == 0
        first = json.loads(capsys.readouterr().out)
        assert _cli(argv) == 0
        assert json.loads(capsys.readouterr().out) == first
        assert first["scenario"] == "brownout|outage"
        assert first["seed"] == 3

    def test_errors(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "resilience.yaml").write_text(POLICY_FILE)
        assert _cli(["simulate", "resilience.yaml", "--policy", "brokr"]) == 1
        assert "did you mean 'broker'" in capsys.readouterr().err
        argv = ["simulate", "resilience.yaml", "--policy", "broker", "--scenario", "outgae"]
        assert _cli(argv) == 1
        assert "did you mean 'outage'" in capsys.readouterr().err
        assert _cli(["simulate", "missing.yaml", "--policy", "broker"]) == 1
        assert "missing.yaml" in capsys.readouterr().err

    def test_every_builtin_scenario_name(self) -> None:
        for name in ("outage", "brownout", "latency-creep", "flapping", "healthy_noisy", "healthy"):
            assert scenario_for(name, 120).conditions_at(0) is not None

    def test_plot(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        pytest.importorskip("matplotlib")
        (tmp_path / "resilience.yaml").write_text(POLICY_FILE)
        argv = ["simulate", "resilience.yaml", "--policy", "broker", "--duration", "20"]
        assert _cli([*argv, "--rate", "10", "--plot", "out.png"]) == 0
        assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "out.png" in capsys.readouterr().out

    def test_warning_in_the_summary(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "resilience.yaml").write_text(
            POLICY_FILE.replace("base_delay: 0.1}", "base_delay: 0.1, retry_on: [KeyError]}")
        )
        argv = ["simulate", "resilience.yaml", "--policy", "broker", "--duration", "10"]
        with pytest.warns(UserWarning, match="never retries"):
            assert _cli([*argv, "--rate", "10"]) == 0
        out = capsys.readouterr().out
        assert "  warning: policy 'broker' never retries the simulated backend's failures" in out
        assert "retries scheduled               0" in out

    def test_plot_with_a_fallback_shows_rejections(self, tmp_path: Path) -> None:
        pytest.importorskip("matplotlib")
        from resilient.testing._plot import plot_timeline

        policy = FULL.model_copy(update={"fallback": resilient.FallbackConfig(value=None)})
        result = simulate(policy, outage(start=5, duration=20), duration=30, rate=20, seed=1)
        assert result.rejected_breaker > 0
        plot_timeline(result, tmp_path / "plot.svg")
        svg = (tmp_path / "plot.svg").read_text()
        # matplotlib writes each text it draws as a comment in the SVG
        assert "<!-- rejected -->" in svg
        assert "<!-- answered by fallback -->" in svg

    def test_run_simulate_is_the_handler(self) -> None:
        parser = argparse.ArgumentParser()
        sub = add_simulate_parser(parser.add_subparsers())
        assert sub.get_default("handler") is run_simulate


# --------------------------------------------------------------------------- pytest plugin


class TestPlugin:
    def test_fixtures(
        self,
        virtual_clock: VirtualClock,
        policy_registry: IsolatedRegistry,
        captured_events: CapturedEvents,
    ) -> None:
        policy_registry.load({"version": 1, "policies": {"db": {"retry": {"base_delay": 1}}}})
        assert resilient.call("db", ScriptedBackend([True])) == "ok"
        assert virtual_clock.now > 0
        assert captured_events.names() == ["RetryScheduled"]

    def test_redis_server_answers(self, redis_server: str) -> None:
        redis = pytest.importorskip("redis")
        client = redis.Redis.from_url(redis_server)
        try:
            assert client.ping() is True
            client.set("k", "v")
            assert client.get("k") == b"v"
        finally:
            client.close()

    def test_redis_binary_is_found(self) -> None:
        found = find_redis_server()
        assert found is None or os.access(found, os.X_OK)

    def test_importing_the_plugin_is_light(self) -> None:
        # What the plugin adds to `import resilient` (which pytest pays for
        # every session of a project that installed us): no Hypothesis, no
        # matplotlib, no redis client of our own.
        code = (
            "import sys; import resilient; before = set(sys.modules); "
            "import resilient.testing.pytest_plugin; "
            "added = set(sys.modules) - before; "
            "print(sorted(m for m in added if not m.startswith(('resilient', '_')) "
            "and m.split('.')[0] in ('hypothesis', 'redis', 'matplotlib', 'numpy')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == "[]"

    def test_resilient_testing_does_not_need_hypothesis(self) -> None:
        code = "import sys, resilient.testing; print('hypothesis' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == "False"

    def test_fixtures_in_a_fresh_project(self, pytester: pytest.Pytester) -> None:
        pytester.makefile(
            ".yaml",
            resilience="""
            version: 1
            policies:
              broker:
                retry: {max_attempts: 3, base_delay: 0.5, jitter: false}
                circuit_breaker: {failure_threshold: 3, timeout_seconds: 10}
            """,
        )
        pytester.makepyfile(
            """
            import resilient
            from resilient.testing import ScriptedBackend, outage, simulate

            def test_fixtures(virtual_clock, policy_registry, captured_events):
                policy_registry.load("resilience.yaml")
                backend = ScriptedBackend([True, True])
                assert resilient.call("broker", backend) == "ok"
                assert virtual_clock.sleeps == [0.5, 1.0]
                assert captured_events.names() == ["RetryScheduled", "RetryScheduled"]

            def test_simulate(policy_registry):
                policy_registry.load("resilience.yaml")
                result = simulate("broker", outage(start=5, duration=20), duration=30,
                                  rate=20, seed=1)
                assert result.backend_calls_by_state.get("open", 0) == 0

            def test_registry_is_restored():
                assert not resilient.policy.registry.loaded
            """
        )
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(passed=3)


def test_example_policy_tests_pass(pytester: pytest.Pytester) -> None:
    example = ROOT / "examples" / "policy-tests"
    for name in ("resilience.yaml", "test_policies.py", "conftest.py"):
        pytester.path.joinpath(name).write_text((example / name).read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=len(_test_names(example / "test_policies.py")))


def _test_names(path: Path) -> list[str]:
    return [
        line.split("(")[0].removeprefix("def ")
        for line in path.read_text().splitlines()
        if line.startswith("def test_")
    ]


def test_simulated_calls_reach_no_call_observer() -> None:
    """Metrics and passive health watch the process's calls, not the simulator's."""
    from resilient.runtime import runtime
    from resilient.testing import outage

    seen: list[str] = []

    class Recorder:
        def record(self, outcome: str, duration: float) -> None:
            seen.append(outcome)

    runtime.add_observer_factory("test-recorder", lambda pipeline: Recorder())
    try:
        policy = resilient.Policy(
            circuit_breaker=resilient.CircuitBreakerConfig(), health=resilient.HealthCheckConfig()
        )
        result = simulate(policy, outage(start=1, duration=2), duration=5, rate=20, seed=1)
        assert result.attempted > 0
        assert seen == []
    finally:
        runtime.remove_observer_factory("test-recorder")

"""Backoff maths, checked with hypothesis: bounds for every strategy and jitter, exact sequences."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from resilient import RetryConfig, RetryStrategy
from resilient.retry import RetryPlan, build_wait

strategies = st.sampled_from(list(RetryStrategy))
jitters = st.sampled_from(["none", "full", "equal", "decorrelated"])


@st.composite
def retry_configs(draw: st.DrawFn) -> RetryConfig:
    base = draw(st.floats(min_value=0, max_value=100, allow_nan=False))
    cap = draw(st.floats(min_value=base, max_value=1000, allow_nan=False))
    return RetryConfig(
        max_attempts=draw(st.integers(min_value=2, max_value=60)),
        base_delay=base,
        max_delay=cap,
        multiplier=draw(st.floats(min_value=0.1, max_value=10, allow_nan=False)),
        jitter=draw(jitters),
        strategy=draw(strategies),
        timeout=None,
        per_attempt_timeout=None,
    )


def delays(cfg: RetryConfig, rate: float = 0.0) -> list[float]:
    plan = RetryPlan(cfg, total=None, rate=lambda: rate)
    state = plan.new_state(time.monotonic())
    out = []
    for attempt in range(1, cfg.max_attempts):
        delay, _ = plan.decide(state, attempt, ConnectionError())
        out.append(delay)
    return out


@settings(max_examples=300, deadline=None)
@given(cfg=retry_configs(), rate=st.floats(min_value=0, max_value=1))
def test_delays_never_negative_nor_above_max(cfg: RetryConfig, rate: float) -> None:
    """Every strategy and jitter gives delays in [0, max_delay]."""
    for delay in delays(cfg, rate):
        assert 0.0 <= delay <= cfg.max_delay + 1e-9


@settings(max_examples=200, deadline=None)
@given(cfg=retry_configs())
def test_attempts_bounded(cfg: RetryConfig) -> None:
    """The plan gives up exactly at max_attempts."""
    plan = RetryPlan(cfg, total=None)
    state = plan.new_state(time.monotonic())
    delay, reason = plan.decide(state, cfg.max_attempts, ConnectionError())
    assert delay < 0
    assert reason == "attempts"


@settings(max_examples=100, deadline=None)
@given(
    base=st.floats(min_value=0.01, max_value=5),
    cap=st.floats(min_value=5, max_value=500),
    mult=st.floats(min_value=1, max_value=4),
)
def test_exact_sequences_without_jitter(base: float, cap: float, mult: float) -> None:
    """Without jitter each strategy follows its formula, capped at max_delay."""
    expected = {
        RetryStrategy.EXPONENTIAL_BACKOFF: [min(cap, base * mult**n) for n in range(6)],
        RetryStrategy.LINEAR: [min(cap, base * (n + 1)) for n in range(6)],
        RetryStrategy.FIBONACCI: [min(cap, base * f) for f in (1, 1, 2, 3, 5, 8)],
        RetryStrategy.CONSTANT: [base] * 6,
        RetryStrategy.ADAPTIVE: [min(cap, base * mult**n) for n in range(6)],
    }
    for strategy, want in expected.items():
        cfg = RetryConfig(
            max_attempts=7,
            base_delay=base,
            max_delay=cap,
            multiplier=mult,
            jitter=False,
            strategy=strategy,
        )
        got = delays(cfg)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert abs(g - w) <= 1e-9 * max(1.0, w)


def test_adaptive_grows_with_failure_rate() -> None:
    """ADAPTIVE waits longer when the policy fails more, up to 10x at >= 90%."""
    cfg = RetryConfig(base_delay=1, max_delay=100, jitter=False, strategy="adaptive")
    assert delays(cfg, 0.0)[0] == 1
    assert delays(cfg, 0.5)[0] == 2
    assert abs(delays(cfg, 0.99)[0] - 10) < 1e-9


@settings(max_examples=100, deadline=None)
@given(base=st.floats(min_value=0.01, max_value=10), cap=st.floats(min_value=10, max_value=100))
def test_equal_jitter_keeps_half(base: float, cap: float) -> None:
    """Equal jitter never goes below half of the un-jittered delay."""
    cfg = RetryConfig(base_delay=base, max_delay=cap, jitter="equal", strategy="constant")
    wait = build_wait(cfg)
    plan = RetryPlan(cfg, total=None)
    state = plan.new_state(time.monotonic())
    for _ in range(20):
        assert base / 2 - 1e-9 <= wait(state) <= base + 1e-9


@settings(max_examples=100, deadline=None)
@given(base=st.floats(min_value=0.01, max_value=10), cap=st.floats(min_value=10, max_value=100))
def test_decorrelated_jitter_bounds(base: float, cap: float) -> None:
    """Decorrelated jitter stays in [base_delay, max_delay]."""
    cfg = RetryConfig(max_attempts=30, base_delay=base, max_delay=cap, jitter="decorrelated")
    for delay in delays(cfg):
        assert base - 1e-9 <= delay <= cap + 1e-9


def test_total_budget_stops_before_sleep_overruns() -> None:
    """With a total budget the plan gives up when the next sleep would cross it."""
    cfg = RetryConfig(max_attempts=10, base_delay=1, jitter=False, strategy="constant")
    plan = RetryPlan(cfg, total=2.5)
    state = plan.new_state(time.monotonic())
    assert plan.decide(state, 1, ConnectionError())[0] == 1
    state.start_time -= 2.0  # pretend two seconds went by
    delay, reason = plan.decide(state, 2, ConnectionError())
    assert delay < 0
    assert reason == "total_timeout"

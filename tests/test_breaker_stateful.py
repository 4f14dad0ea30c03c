"""
Stateful test of resilient.breaker against a small reference model.

The model keeps plain lists (every outcome with its time) and recomputes the
window from scratch at each step, so it shares no code with the ring buffers.
Time is a fake clock moved by a rule; every step compares state, whether
``acquire`` is allowed, and the counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from resilient._models import CircuitBreakerConfig
from resilient.breaker import CircuitBreaker
from resilient.errors import CircuitOpenError

SLOW = 1.0  # slow_call_duration when slow calls are tracked
MAX_BUCKETS = 60  # the breaker's bucket count for long time windows


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Outcome:
    at: float
    failed: bool
    slow: bool


@dataclass
class Model:
    """The breaker's rules, written as plainly as possible."""

    cfg: CircuitBreakerConfig
    state: str = "closed"
    gen: int = 0
    consecutive: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    trips: int = 0
    open_until: float = 0.0
    half_open_until: float = math.inf
    permits: int = 0
    trial_successes: int = 0
    successes: int = 0
    failures: int = 0
    ignored: int = 0
    rejections: int = 0
    mode: str = "normal"  # or "metrics_only": all calls pass and count, the state is frozen

    # -- window
    def window(self, now: float) -> list[Outcome]:
        size = self.cfg.failure_rate_window
        if self.cfg.window_type == "count":
            return self.outcomes[-size:]
        n = min(size, MAX_BUCKETS)
        width = size / n
        head = int(now // width)
        return [o for o in self.outcomes if int(o.at // width) > head - n]

    def window_trips(self, now: float) -> bool:
        w = self.window(now)
        calls = len(w)
        if calls < self.cfg.min_requests_threshold:
            return False
        fails = sum(o.failed for o in w)
        slow = sum(o.slow for o in w)
        rate = self.cfg.failure_rate_threshold
        if rate is not None and fails / calls >= rate:
            return True
        return self.cfg.slow_call_duration is not None and (
            slow / calls >= self.cfg.slow_call_rate_threshold
        )

    # -- transitions
    def go(self, new: str, at: float) -> None:
        self.gen += 1
        self.state = new
        self.consecutive = 0
        self.outcomes = []
        self.permits = 0
        self.trial_successes = 0
        if new == "open":
            self.trips += 1
            grown = self.cfg.timeout_seconds * self.cfg.open_duration_multiplier ** (self.trips - 1)
            self.open_until = at + min(self.cfg.max_open_duration, grown)
        elif new == "half-open":
            hot = self.cfg.half_open_timeout
            self.half_open_until = at + hot if hot is not None else math.inf
        else:
            self.trips = 0

    def advance(self, now: float) -> None:
        if self.mode != "normal":
            return
        if self.state == "half-open" and now >= self.half_open_until:
            self.go("open", self.half_open_until)
        if self.state == "open" and now >= self.open_until:
            self.go("half-open", now)

    # -- calls
    def acquire(self, now: float) -> tuple[str, int] | None:
        self.advance(now)
        if self.state == "closed" or self.mode == "metrics_only":
            return ("closed", self.gen)
        if self.state == "half-open" and self.permits < self.cfg.trial_calls:
            self.permits += 1
            return ("trial", self.gen)
        self.rejections += 1
        return None

    def current(self, token: tuple[str, int], now: float) -> bool:
        kind, gen = token
        if kind == "trial":
            self.advance(now)
            return gen == self.gen and self.state == "half-open"
        return gen == self.gen and (self.state == "closed" or self.mode == "metrics_only")

    def trips_now(self, now: float) -> bool:
        return self.consecutive >= self.cfg.failure_threshold or self.window_trips(now)

    def success(self, token: tuple[str, int], slow: bool, now: float) -> None:
        self.successes += 1
        if not self.current(token, now):
            return
        slow = slow and self.cfg.slow_call_duration is not None
        if token[0] == "closed":
            self.consecutive = 0
            self.outcomes.append(Outcome(now, failed=False, slow=slow))
            if self.mode == "normal" and self.window_trips(now):
                self.go("open", now)
        elif self.mode != "normal":
            self.permits -= 1  # frozen: a trial's verdict is not taken, its permit comes back
        elif slow:
            self.go("open", now)
        else:
            self.trial_successes += 1
            if self.trial_successes >= self.cfg.success_threshold:
                self.go("closed", now)

    def failure(self, token: tuple[str, int], slow: bool, now: float) -> None:
        self.failures += 1
        if not self.current(token, now):
            return
        slow = slow and self.cfg.slow_call_duration is not None
        if token[0] == "closed":
            self.consecutive += 1
            self.outcomes.append(Outcome(now, failed=True, slow=slow))
            if self.mode == "normal" and self.trips_now(now):
                self.go("open", now)
        elif self.mode != "normal":
            self.permits -= 1
        else:
            self.go("open", now)

    def release(self, token: tuple[str, int], *, ignored: bool) -> None:
        self.ignored += ignored
        kind, gen = token
        if kind == "trial" and gen == self.gen and self.state == "half-open" and self.permits:
            self.permits -= 1


configs = st.builds(
    lambda ft, st_, extra, timeout, hot, window, wtype, minreq, rate, slow, slow_rate, mult, cap: (
        CircuitBreakerConfig(
            failure_threshold=ft,
            success_threshold=st_,
            half_open_max_calls=st_ + extra if extra else None,
            timeout_seconds=timeout,
            half_open_timeout=hot,
            # a count window must be able to hold min_requests_threshold calls
            failure_rate_window=max(window, minreq) if wtype == "count" else window,
            window_type=wtype,
            min_requests_threshold=minreq,
            failure_rate_threshold=rate,
            slow_call_duration=SLOW if slow else None,
            slow_call_rate_threshold=slow_rate,
            open_duration_multiplier=mult,
            max_open_duration=timeout * cap,
            ignore_exceptions=(KeyError,),
            record_exceptions=(OSError,),
        )
    ),
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(0, 2),
    st.sampled_from([1.0, 2.0, 5.0]),
    st.sampled_from([None, 1.0, 3.0]),
    st.integers(1, 8),
    st.sampled_from(["count", "time"]),
    st.integers(1, 6),
    st.sampled_from([None, 0.25, 0.5, 0.75, 1.0]),
    st.booleans(),
    st.sampled_from([0.5, 1.0]),
    st.sampled_from([1.0, 2.0, 3.0]),
    st.sampled_from([1.0, 4.0]),
)


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.cb: CircuitBreaker
        self.model: Model
        self.held: list[tuple[int, tuple[str, int]]] = []

    @initialize(cfg=configs)
    def setup(self, cfg: CircuitBreakerConfig) -> None:
        self.cb = CircuitBreaker("m", cfg, clock=self.clock)
        self.model = Model(cfg)

    # -- helpers
    def _acquire(self) -> tuple[int, tuple[str, int]] | None:
        expected = self.model.acquire(self.clock.now)
        rejected: CircuitOpenError | None = None
        token = -1
        try:
            token = self.cb.acquire()
        except CircuitOpenError as err:
            rejected = err
        if rejected is not None:
            assert expected is None, f"rejected, model allowed {expected}"
            assert rejected.policy == "m"
            assert rejected.retry_after is not None
            assert rejected.retry_after > 0
            return None
        assert expected is not None, f"allowed as {token}, model rejects"
        assert token >= 0
        assert bool(token & 1) == (expected[0] == "trial")
        return token, expected

    def _finish(self, pair: tuple[int, tuple[str, int]], outcome: str) -> None:
        token, mtoken = pair
        now = self.clock.now
        duration = 2 * SLOW if outcome.startswith("slow") else 0.0
        if outcome in ("success", "slow_success"):
            self.cb.on_success(token, duration)
            self.model.success(mtoken, outcome == "slow_success", now)
        elif outcome in ("failure", "slow_failure"):
            self.cb.on_failure(token, ConnectionError("x"), duration)
            self.model.failure(mtoken, outcome == "slow_failure", now)
        elif outcome == "unrecorded":  # not in record_exceptions: a success
            self.cb.on_failure(token, ValueError("x"), duration)
            self.model.success(mtoken, False, now)
        elif outcome == "ignored":
            self.cb.on_failure(token, KeyError("x"), duration)
            self.model.release(mtoken, ignored=True)
        else:
            self.cb.on_cancel(token)
            self.model.release(mtoken, ignored=False)

    outcomes = st.sampled_from(
        ["success", "failure", "slow_success", "slow_failure", "unrecorded", "ignored", "cancel"]
    )

    # -- rules
    @rule(outcome=outcomes)
    def call(self, outcome: str) -> None:
        pair = self._acquire()
        if pair is not None:
            self._finish(pair, outcome)

    @rule(outcome=st.sampled_from(["success", "failure"]), n=st.integers(2, 6))
    def burst(self, outcome: str, n: int) -> None:
        for _ in range(n):
            self.call(outcome)

    @precondition(lambda self: len(self.held) < 8)
    @rule()
    def start(self) -> None:
        pair = self._acquire()
        if pair is not None:
            self.held.append(pair)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), outcome=outcomes)
    def finish(self, data: st.DataObject, outcome: str) -> None:
        index = data.draw(st.integers(0, len(self.held) - 1))
        self._finish(self.held.pop(index), outcome)

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]))
    def advance_time(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def force_open(self) -> None:
        self.cb.open()
        self.model.go("open", self.clock.now)

    @rule()
    def close(self) -> None:
        self.cb.close()
        self.model.go("closed", self.clock.now)

    @rule(mode=st.sampled_from(["normal", "metrics_only"]))
    def set_mode(self, mode: str) -> None:
        if mode == "normal":
            self.cb.normal()
        else:
            self.cb.metrics_only()
        self.model.mode = mode

    @rule()
    def reset(self) -> None:
        self.cb.reset()
        self.model.go("closed", self.clock.now)
        self.model.successes = self.model.failures = 0
        self.model.ignored = self.model.rejections = 0

    # -- checks
    @invariant()
    def agrees_with_model(self) -> None:
        now = self.clock.now
        model = self.model
        model.advance(now)
        status = self.cb.get_status()
        assert status["state"] == model.state
        assert self.cb.state == model.state
        assert status["trips"] == model.trips
        assert status["mode"] == model.mode
        assert status["thresholds_exceeded"] == model.trips_now(now)
        assert status["failure_count"] == model.consecutive
        assert status["success_count"] == model.trial_successes
        assert status["trial_permits_issued"] == model.permits
        window = model.window(now)
        w = status["window"]
        assert w["calls"] == len(window)
        assert w["failures"] == sum(o.failed for o in window)
        assert w["slow"] == sum(o.slow for o in window)
        expected_rate = w["failures"] / w["calls"] if w["calls"] else 0.0
        assert self.cb.failure_rate == expected_rate
        totals = status["totals"]
        assert totals["successes"] == model.successes
        assert totals["failures"] == model.failures
        assert totals["ignored"] == model.ignored
        assert totals["rejections"] == model.rejections
        if model.state == "open":
            assert status["retry_after"] == max(model.open_until - now, 0.0)

    @invariant()
    def acquire_allowed_matches(self) -> None:
        model = self.model
        model.advance(self.clock.now)
        passes_all = model.state == "closed" or model.mode == "metrics_only"
        would_allow = passes_all or (
            model.state == "half-open" and model.permits < model.cfg.trial_calls
        )
        assert (self.cb._fast_token >= 0) == passes_all
        if not would_allow:
            return
        # Probe without changing anything: take a permit and give it back.
        pair = self._acquire()
        assert pair is not None
        self._finish(pair, "cancel")


BreakerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBreakerMachine = BreakerMachine.TestCase


def test_model_sanity() -> None:
    """The reference model itself trips on consecutive failures."""
    model = Model(CircuitBreakerConfig(failure_threshold=2, failure_rate_threshold=None))
    token = model.acquire(0.0)
    assert token is not None
    model.failure(token, False, 0.0)
    model.failure(token, False, 0.0)
    assert model.state == "open"
    assert model.open_until == 60.0

"""
Properties of the real pipeline, checked through resilient.testing in virtual time.

The breaker's own state machine is checked against a reference model in
test_breaker_stateful.py; here the whole pipeline is under test.
"""

from __future__ import annotations

import contextlib
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import assume, given, settings

import resilient
from resilient.testing import (
    ScriptedBackend,
    Step,
    VirtualClock,
    circuit_breaker_configs,
    failure_sequences,
    isolated_registry,
    policies,
    retry_configs,
    scenarios,
    simulate,
    timeout_configs,
)

EPSILON = 1e-9

# Retry sections whose total budget comes from the retry section itself.
retry_with_budget = policies(
    retry=retry_configs(max_attempts=st.integers(2, 8), timeout=st.floats(0.1, 20)),
    timeout=False,
)


@given(
    policy=retry_with_budget,
    steps=failure_sequences(min_size=1, max_size=10, max_latency=3.0),
)
def test_sync_retry_never_sleeps_or_starts_an_attempt_past_its_total_budget(
    policy: resilient.Policy, steps: list[Step]
) -> None:
    total = policy.total_timeout
    assert total is not None
    backend = ScriptedBackend(steps, then=Step(ConnectionError))
    with (
        isolated_registry(),
        VirtualClock(),
        contextlib.suppress(ConnectionError, resilient.CircuitOpenError),
    ):
        resilient.call(policy, backend)
    # A sync attempt cannot be interrupted, but no retry sleep may end (and so
    # no new attempt start) after the budget: every sleep is followed by an attempt.
    assert all(start < total + EPSILON for start in backend.started[1:])
    assert backend.calls <= policy.retry.max_attempts  # type: ignore[union-attr]


@given(
    policy=policies(
        retry=retry_configs(max_attempts=st.integers(2, 8)),
        timeout=timeout_configs(total=st.floats(0.1, 20)),
    ),
    steps=failure_sequences(min_size=1, max_size=10, max_latency=30.0),
)
def test_async_call_never_outlives_its_total_timeout(
    policy: resilient.Policy, steps: list[Step]
) -> None:
    total = policy.total_timeout
    assert total is not None
    backend = ScriptedBackend(steps, then=Step(ConnectionError, latency=1.0))
    clock = VirtualClock()

    async def call() -> None:
        with contextlib.suppress(
            ConnectionError, resilient.AttemptTimeoutError, resilient.CircuitOpenError
        ):
            await resilient.acall(policy, backend.acall)

    with isolated_registry(), clock:
        clock.run(call())
    assert clock.now <= total + EPSILON


# Policies whose half-open trial permits are never handed back by a
# cancellation (no total budget, which is the only thing that cancels here).
breaker_policies = policies(
    circuit_breaker=circuit_breaker_configs(mode="normal"),
    retry=None,
    timeout=timeout_configs(total=None),
)


@given(policy=breaker_policies, scenario=scenarios(max_duration=40), seed=st.integers(0, 999))
def test_no_call_reaches_the_backend_while_the_breaker_is_open(
    policy: resilient.Policy, scenario: resilient.testing.Scenario, seed: int
) -> None:
    result = simulate(policy, scenario, duration=40, rate=25, seed=seed)
    assert result.backend_calls_by_state.get("open", 0) == 0
    cb = policy.circuit_breaker
    assert cb is not None
    for transition in result.transitions:
        if transition.old == "open":
            assert transition.backend_calls == 0
        elif transition.old == "half-open":
            assert transition.backend_calls <= cb.trial_calls


@given(
    policy=policies(fallback=None),
    scenario=scenarios(max_duration=30),
    seed=st.integers(0, 999),
)
def test_simulation_invariants(
    policy: resilient.Policy, scenario: resilient.testing.Scenario, seed: int
) -> None:
    result = simulate(policy, scenario, duration=30, rate=20, seed=seed)
    # every call has exactly one outcome, and the timeline adds up to the totals
    outcomes = result.succeeded + result.failed + result.rejected
    assert outcomes == result.attempted
    assert sum(s.fallback for s in result.timeline) == result.fallback
    assert sum(s.arrivals for s in result.timeline) == result.attempted
    assert sum(s.backend_calls for s in result.timeline) == result.backend_calls
    assert sum(s.failed for s in result.timeline) == result.failed
    # each attempt reaches the backend at most once; a success needs a good backend call
    assert result.backend_calls <= result.attempted + result.retried
    assert result.succeeded <= result.backend_calls - result.backend_failures
    assert result.timed_out <= result.failed
    # the strategies a policy leaves out do nothing
    retry = policy.retry
    if retry is None or retry.max_attempts == 1:
        assert result.retried == 0
    else:
        assert result.retried <= result.attempted * (retry.max_attempts - 1)
    if policy.circuit_breaker is None:
        assert result.rejected_breaker == 0
        assert result.transitions == ()
        assert result.backend_calls == result.attempted + result.retried
    if policy.fallback is not None:  # the default `on` is every Exception
        assert result.fallback == result.failed + result.rejected
        assert result.answered == result.attempted
    else:
        assert result.fallback == 0
    if policy.total_timeout is not None:
        assert result.latency.max <= policy.total_timeout + EPSILON
    # breaker transitions form one chain in time order
    state = "closed"
    last = 0.0
    for transition in result.transitions:
        assert transition.old == state
        assert transition.at >= last
        state, last = transition.new, transition.at


@given(scenario=scenarios(max_duration=20), seed=st.integers(0, 999))
def test_without_strategies_the_pipeline_is_the_backend(
    scenario: resilient.testing.Scenario, seed: int
) -> None:
    # The reference model of a bare policy: one backend call per caller call,
    # whose outcome the caller gets unchanged.
    result = simulate(resilient.Policy(), scenario, duration=20, rate=20, seed=seed)
    assert result.backend_calls == result.attempted
    assert result.failed == result.backend_failures
    assert result.succeeded == result.attempted - result.backend_failures
    assert result.retried == 0
    assert result.rejected == 0


@pytest.mark.parametrize("seed", [0, 1])
@given(data=st.data())
def test_same_seed_same_result(seed: int, data: st.DataObject) -> None:
    policy = data.draw(policies(circuit_breaker=True, retry=True))
    scenario = data.draw(scenarios(max_duration=20))
    assume(policy.retry is not None)
    first = simulate(policy, scenario, duration=20, rate=20, seed=seed)
    assert simulate(policy, scenario, duration=20, rate=20, seed=seed) == first


@settings(deadline=None, max_examples=25)
@given(
    limit=st.integers(1, 12),
    tasks=st.integers(1, 80),
    threads=st.integers(0, 4),
    per_thread=st.integers(1, 15),
    waits=st.lists(st.sampled_from([0.0, 0.0, 0.0005, 0.002]), min_size=1, max_size=8),
    auto_scaling=st.booleans(),
)
def test_the_bulkhead_bound_holds(
    limit: int,
    tasks: int,
    threads: int,
    per_thread: int,
    waits: list[float],
    auto_scaling: bool,
) -> None:
    # Counted inside the guarded function, from tasks and threads at once. A
    # call is admitted only while in_use < limit, so the calls inside never
    # outnumber the limit: the fixed one, or (auto-scaling) its ceiling; a
    # falling limit admits nobody until the calls inside are below it.
    import asyncio
    import threading
    import time

    section = resilient.BulkheadConfig(
        max_concurrent_requests=limit, enable_auto_scaling=auto_scaling, max_queue=10_000
    )
    lock = threading.Lock()
    inside = [0, 0, 0]  # now, peak, calls
    over: list[tuple[int, int]] = []

    def enter(bulkhead: Any) -> None:
        with lock:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
            inside[2] += 1
            if not auto_scaling and inside[0] > bulkhead.limit:
                over.append((inside[0], bulkhead.limit))

    def leave() -> None:
        with lock:
            inside[0] -= 1

    with isolated_registry({"p": resilient.Policy(bulkhead=section)}):
        from resilient.bulkhead import get_bulkhead

        @resilient.resilient("p")
        async def async_call(i: int) -> None:
            enter(get_bulkhead("p"))
            await asyncio.sleep(waits[i % len(waits)])
            leave()

        @resilient.resilient("p")
        def sync_call(i: int) -> None:
            enter(get_bulkhead("p"))
            time.sleep(waits[i % len(waits)])
            leave()

        def thread_body() -> None:
            for i in range(per_thread):
                sync_call(i)

        async def main() -> None:
            pool = [threading.Thread(target=thread_body) for _ in range(threads)]
            for thread in pool:
                thread.start()
            await asyncio.gather(*(async_call(i) for i in range(tasks)))
            for thread in pool:
                await asyncio.to_thread(thread.join)

        asyncio.run(main())
        bulkhead = get_bulkhead("p")
        assert (bulkhead.in_use, bulkhead.queued) == (0, 0)
    assert inside[2] == tasks + threads * per_thread
    assert over == []
    assert inside[1] <= limit

"""
Property-based tests of resilience.yaml: the promises our policies make, checked
against the real resilient pipeline in virtual time.

Run with `pytest` (the fixtures come from resilient's pytest plugin).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import resilient
from resilient.testing import (
    ScriptedBackend,
    VirtualClock,
    failure_sequences,
    isolated_registry,
    outage,
    scenarios,
    simulate,
)

POLICY_FILE = Path(__file__).with_name("resilience.yaml")


@pytest.fixture
def policies(policy_registry):
    """The test sees exactly the policies of resilience.yaml, and nothing else."""
    policy_registry.load(POLICY_FILE)
    return policy_registry


# Hypothesis runs a test body many times per fixture set-up, so the property
# tests isolate each example themselves with the context-manager form.


def test_during_an_outage_the_broker_sees_at_most_a_dozen_calls(policies):
    # 60 s outage at 100 calls/s: without a breaker that is 6 000+ calls.
    result = simulate("broker", outage(start=30, duration=60), duration=120, rate=100, seed=1)
    during = sum(s.backend_calls for s in result.timeline[31:90])
    assert during <= 12
    assert result.backend_calls_by_state.get("open", 0) == 0


@given(scenario=scenarios(max_duration=60), seed=st.integers(0, 2**16))
def test_a_broker_call_never_waits_more_than_5_seconds(scenario, seed):
    with isolated_registry(POLICY_FILE):
        result = simulate("broker", scenario, duration=60, rate=20, seed=seed)
    assert result.latency.max <= 5.0 + 1e-9


@given(scenario=scenarios(max_duration=60), seed=st.integers(0, 2**16))
def test_catalogue_readers_always_get_an_answer(scenario, seed):
    with isolated_registry(POLICY_FILE):
        result = simulate("catalogue", scenario, duration=60, rate=20, seed=seed)
    assert result.answered == result.attempted  # by the service or by the fallback
    assert result.latency.max <= 2.0 + 1e-9


@given(steps=failure_sequences(max_size=6))
def test_the_broker_tries_at_most_twice(steps):
    backend = ScriptedBackend(steps)
    with (
        isolated_registry(POLICY_FILE),
        VirtualClock(),
        contextlib.suppress(ConnectionError, resilient.CircuitOpenError),
    ):
        resilient.call("broker", backend)
    assert 1 <= backend.calls <= 2


def test_same_seed_same_story(policies):
    first = simulate("broker", outage(start=10, duration=30), duration=60, rate=50, seed=7)
    again = simulate("broker", outage(start=10, duration=30), duration=60, rate=50, seed=7)
    assert first == again

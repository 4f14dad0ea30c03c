"""The exception tree: builtin bases, attributes, messages, pickling."""

from __future__ import annotations

import pickle

import pytest

from resilient import (
    AttemptTimeoutError,
    BulkheadFullError,
    CircuitOpenError,
    PolicyError,
    RateLimitedError,
    RejectedError,
    ResilienceError,
)


def test_tree() -> None:
    """Every library error descends from ResilienceError and the builtin that fits."""
    assert issubclass(PolicyError, ResilienceError)
    assert issubclass(PolicyError, ValueError)
    assert issubclass(AttemptTimeoutError, TimeoutError)
    for rejected in (CircuitOpenError, BulkheadFullError, RateLimitedError):
        assert issubclass(rejected, RejectedError)
        assert issubclass(rejected, ResilienceError)


def test_fast_rejection_message() -> None:
    """A rejection built on the hot path still reads well."""
    error = CircuitOpenError.fast("broker", 2.5, "open")
    assert str(error) == "circuit breaker of policy 'broker' is open; retry after 2.5s"
    assert error.policy == "broker"
    assert error.retry_after == 2.5
    assert "broker" in repr(error)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(CircuitOpenError.fast("p", 1.0, "open"), id="fast"),
        pytest.param(CircuitOpenError("m", policy="p", retry_after=3.0), id="init"),
        pytest.param(RateLimitedError("m", policy="p", retry_after=0.5), id="rate"),
        pytest.param(BulkheadFullError("m", policy="p"), id="bulkhead"),
        pytest.param(AttemptTimeoutError("m", policy="p", timeout=1.0, kind="total"), id="timeout"),
        pytest.param(PolicyError("m", source="f.yaml", line=3, key="a.b"), id="policy"),
    ],
)
def test_pickle_round_trip(error: ResilienceError) -> None:
    """Errors survive pickling (multiprocessing, task queues) with their attributes."""
    error.add_note("a note")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.policy == error.policy
    assert copy.__notes__ == ["a note"]
    if isinstance(error, RejectedError):
        assert isinstance(copy, RejectedError)
        assert copy.retry_after == error.retry_after


@pytest.mark.parametrize(
    ("word", "options", "expected"),
    [
        pytest.param("failure_treshold", ["failure_threshold", "timeout"], "failure_threshold"),
        pytest.param("BROKR", ["broker", "default"], "broker", id="case-insensitive"),
        pytest.param("CircuitOpenErorr", ["CircuitOpenError", "KeyError"], "CircuitOpenError"),
        pytest.param("zzz", ["broker", "default"], None, id="nothing-close"),
        pytest.param("x", [], None, id="no-options"),
    ],
)
def test_did_you_mean(word: str, options: list[str], expected: str | None) -> None:
    """One did-you-mean helper: the closest option as spelt, or nothing."""
    from resilient.errors import did_you_mean

    hint = did_you_mean(word, options)
    assert hint == (f" (did you mean '{expected}'?)" if expected else "")

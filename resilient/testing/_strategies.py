"""
Hypothesis strategies for policies, failure sequences and scenarios, and the
``ci``/``nightly`` settings profiles.

Every strategy takes keyword overrides: a plain value fixes a field, a
strategy draws it, and for policy sections ``True`` requires the section,
``False`` leaves it out and ``None`` (the default) lets Hypothesis choose::

    @given(policies(retry=retry_configs(max_attempts=st.integers(2, 4)),
                    circuit_breaker=True, fallback=False))
    def test_something(policy): ...
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import hypothesis.strategies as st
from hypothesis import HealthCheck, reject, settings
from hypothesis.errors import InvalidArgument
from pydantic import BaseModel, ValidationError

from resilient._models import (
    CircuitBreakerConfig,
    FallbackConfig,
    Policy,
    RetryConfig,
    RetryStrategy,
    TimeoutConfig,
)
from resilient.testing._scenario import (
    Latency,
    Scenario,
    brownout,
    compose,
    flapping,
    healthy_noisy,
    latency_creep,
    outage,
)
from resilient.testing._steps import Step

__all__ = [
    "PROFILES",
    "circuit_breaker_configs",
    "failure_sequences",
    "load_hypothesis_profile",
    "policies",
    "retry_configs",
    "scenarios",
    "timeout_configs",
]

M = TypeVar("M", bound=BaseModel)
Section = bool | st.SearchStrategy[Any] | BaseModel | None


def _seconds(low: float, high: float) -> st.SearchStrategy[float]:
    """Seconds in [low, high], rounded to milliseconds (readable counterexamples)."""
    return st.floats(low, high, allow_nan=False, allow_infinity=False).map(
        lambda x: max(low, round(x, 3))
    )


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def _as_strategy(value: Any) -> st.SearchStrategy[Any]:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def _model(
    model: type[M],
    fields: Mapping[str, st.SearchStrategy[Any] | Callable[[dict[str, Any]], Any]],
    overrides: Mapping[str, Any],
) -> st.SearchStrategy[M]:
    unknown = set(overrides) - set(model.model_fields)
    if unknown:
        msg = f"{model.__name__} has no field(s) {sorted(unknown)}"
        raise InvalidArgument(msg)

    @st.composite
    def build(draw: st.DrawFn) -> M:
        values: dict[str, Any] = {}
        for name, spec in fields.items():
            if name in overrides:
                values[name] = draw(_as_strategy(overrides[name]))
            elif isinstance(spec, st.SearchStrategy):
                values[name] = draw(spec)
            else:  # depends on fields drawn before it
                values[name] = draw(spec(values))
        for name, value in overrides.items():
            if name not in values:
                values[name] = draw(_as_strategy(value))
        try:
            return model(**values)
        except ValidationError:
            reject()  # an override made this combination invalid

    return build()


def retry_configs(**overrides: Any) -> st.SearchStrategy[RetryConfig]:
    """
    Valid ``retry`` sections with small delays (a property test stays fast even
    in real time). Override any :class:`~resilient.RetryConfig` field.
    """
    fields: dict[str, Any] = {
        "max_attempts": st.integers(1, 6),
        "base_delay": _seconds(0.0, 1.0),
        "max_delay": lambda v: _seconds(v["base_delay"], v["base_delay"] + 10.0),
        "multiplier": _seconds(1.0, 3.0),
        "jitter": st.sampled_from(["none", "full", "equal", "decorrelated"]),
        "strategy": st.sampled_from(list(RetryStrategy)),
        "timeout": _optional(_seconds(0.5, 30.0)),
        "per_attempt_timeout": _optional(_seconds(0.05, 10.0)),
    }
    return _model(RetryConfig, fields, overrides)


def circuit_breaker_configs(**overrides: Any) -> st.SearchStrategy[CircuitBreakerConfig]:
    """Valid ``circuit_breaker`` sections. Override any field."""
    fields: dict[str, Any] = {
        "failure_threshold": st.integers(1, 10),
        "success_threshold": st.integers(1, 3),
        "timeout_seconds": _seconds(0.5, 30.0),
        "half_open_timeout": _optional(_seconds(1.0, 30.0)),
        "failure_rate_window": st.integers(1, 60),
        "min_requests_threshold": st.integers(1, 20),
        "failure_rate_threshold": _optional(_seconds(0.1, 1.0)),
        "window_type": st.sampled_from(["time", "count"]),
        "slow_call_duration": _optional(_seconds(0.05, 5.0)),
        "slow_call_rate_threshold": _seconds(0.1, 1.0),
        "half_open_max_calls": lambda v: _optional(
            st.integers(v.get("success_threshold", 3), v.get("success_threshold", 3) + 3)
        ),
        "open_duration_multiplier": _seconds(1.0, 3.0),
        "max_open_duration": lambda v: _seconds(
            v.get("timeout_seconds", 60.0), v.get("timeout_seconds", 60.0) * 20
        ),
    }
    return _model(CircuitBreakerConfig, fields, overrides)


def timeout_configs(**overrides: Any) -> st.SearchStrategy[TimeoutConfig]:
    """Valid ``timeout`` sections (each budget may be off). Override ``per_attempt``/``total``."""
    fields: dict[str, Any] = {
        "per_attempt": _optional(_seconds(0.01, 10.0)),
        "total": _optional(_seconds(0.1, 60.0)),
    }
    return _model(TimeoutConfig, fields, overrides)


def _section(value: Section, default: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    if value is None:
        return st.none() | default
    if value is True:
        return default
    if value is False:
        return st.none()
    return _as_strategy(value)


def _section_model(name: str) -> type[BaseModel]:
    annotation = Policy.model_fields[name].annotation
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    msg = f"Policy.{name} is not a policy section"
    raise InvalidArgument(msg)


def policies(
    *,
    retry: Section = None,
    circuit_breaker: Section = None,
    timeout: Section = None,
    fallback: Section = False,
    **sections: Section,
) -> st.SearchStrategy[Policy]:
    """
    Valid :class:`~resilient.Policy` objects.

    Each section is ``None`` (maybe present), ``True`` (present, drawn from the
    default strategy), ``False`` (absent), a config object, or a strategy of
    config objects (e.g. ``retry_configs(max_attempts=3)``). The fallback is
    off unless asked for (``True`` draws a static value).

    Other sections of the policy (``bulkhead=``, ``rate_limit=`` ...) are off
    unless given; for them ``True`` means the section with its defaults.
    """
    fallbacks = st.builds(FallbackConfig, value=st.sampled_from([None, "fallback", 0, {}]))
    kwargs: dict[str, st.SearchStrategy[Any]] = {
        "retry": _section(retry, retry_configs()),
        "circuit_breaker": _section(circuit_breaker, circuit_breaker_configs()),
        "timeout": _section(timeout, timeout_configs()),
        "fallback": _section(fallback, fallbacks),
    }
    for name, value in sections.items():
        if name not in Policy.model_fields or name == "description":
            msg = f"Policy has no section {name!r}"
            raise InvalidArgument(msg)
        kwargs[name] = _section(value, st.builds(_section_model(name)))
    return st.builds(Policy, **kwargs)


def failure_sequences(
    *,
    min_size: int = 0,
    max_size: int = 20,
    errors: tuple[type[Exception], ...] = (ConnectionError,),
    failure_probability: float | None = None,
    max_latency: float = 0.0,
) -> st.SearchStrategy[list[Step]]:
    """
    Lists of :class:`Step` for a :class:`ScriptedBackend`: each step succeeds or
    raises one of *errors*, after up to *max_latency* seconds.

    *failure_probability* biases the draw (``None``: Hypothesis chooses freely,
    which includes long runs of failures and of successes).
    """
    if failure_probability is None:
        fails: st.SearchStrategy[bool] = st.booleans()
    else:
        p = float(failure_probability)
        fails = st.floats(0, 1, exclude_max=True).map(lambda u: u < p)
    latency = _seconds(0.0, max_latency) if max_latency > 0 else st.just(0.0)
    step = st.builds(
        lambda failed, error, delay: Step(error if failed else None, delay),
        fails,
        st.sampled_from(errors),
        latency,
    )
    return st.lists(step, min_size=min_size, max_size=max_size)


def _latencies(max_median: float) -> st.SearchStrategy[Latency]:
    return st.builds(
        lambda median, spread: Latency(median, round(median * spread, 6)),
        _seconds(0.001, max_median),
        st.floats(1.0, 20.0),
    )


def scenarios(*, max_duration: float = 120.0, max_parts: int = 3) -> st.SearchStrategy[Scenario]:
    """
    Scenarios made of one to *max_parts* built-ins (outage, brownout,
    latency_creep, flapping, healthy_noisy) with random parameters, composed
    with ``|``, all happening within ``[0, max_duration]``.
    """

    @st.composite
    def part(draw: st.DrawFn) -> Scenario:
        start = draw(_seconds(0.0, max_duration * 0.9))
        duration = draw(_seconds(min(1.0, max_duration - start), max_duration - start))
        kind = draw(
            st.sampled_from(["outage", "brownout", "latency_creep", "flapping", "healthy_noisy"])
        )
        if kind == "outage":
            hang = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))
            return outage(
                start=start, duration=duration, hang=hang, hang_for=draw(_seconds(0.5, 30.0))
            )
        if kind == "brownout":
            return brownout(
                start=start,
                duration=duration,
                error_rate=draw(_seconds(0.0, 1.0)),
                latency=draw(_latencies(2.0)),
                hang=draw(_seconds(0.0, 1.0)),
                hang_for=draw(_seconds(0.5, 30.0)),
            )
        if kind == "latency_creep":
            return latency_creep(start=start, duration=duration, to=draw(_latencies(5.0)))
        if kind == "flapping":
            return flapping(
                start=start,
                duration=duration,
                period=draw(_seconds(0.5, 30.0)),
                down=draw(st.floats(0.1, 0.9)),
            )
        error_rate = draw(_seconds(0.0, 0.2))
        return healthy_noisy(error_rate=error_rate, latency=draw(_latencies(0.5)))

    @st.composite
    def build(draw: st.DrawFn) -> Scenario:
        parts = draw(st.lists(part(), min_size=1, max_size=max_parts))
        if len(parts) == 1:
            return parts[0]
        return compose(*parts)

    return build()


# --------------------------------------------------------------------------- profiles

#: The settings profiles :func:`load_hypothesis_profile` registers.
PROFILES: dict[str, dict[str, Any]] = {
    # Fast enough for every CI run and every local `pytest`.
    "ci": {
        "max_examples": 25,
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow],
        "print_blob": True,
    },
    # Thorough: a nightly job or a release check (minutes, not seconds).
    "nightly": {
        "max_examples": 1000,
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow],
        "print_blob": True,
    },
}


def load_hypothesis_profile(name: str | None = None) -> str:
    """
    Register the ``ci`` and ``nightly`` Hypothesis profiles and load *name*,
    else ``$HYPOTHESIS_PROFILE``, else ``ci``. Returns the name loaded. Call it
    from ``conftest.py``.

    A profile of the same name that exists already (Hypothesis ships a ``ci``
    profile: derandomized, no example database) is kept as the parent: only
    the options above are set on top of it.
    """
    for profile, options in PROFILES.items():
        try:
            parent: settings | None = settings.get_profile(profile)
        except InvalidArgument:
            parent = None
        settings.register_profile(profile, parent=parent, **options)
    chosen = name or os.environ.get("HYPOTHESIS_PROFILE") or "ci"
    settings.load_profile(chosen)
    return chosen

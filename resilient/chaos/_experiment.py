"""
The experiment model: what a chaos experiment file says, validated like a policy file.

An experiment has the shape of a Chaos Toolkit experiment (title, steady-state
hypothesis, method, rollbacks) plus the safety settings that make it fit to run
against a live service (abort conditions, business hours, blast radius, minimum
interval). :func:`load_experiment` reads one from YAML with the policy loader's
machinery, so a mistake is reported as ``file:line: key: problem`` with a
did-you-mean, exactly like a mistake in a policy file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from resilient._models import (
    Fraction,
    NonNegativeFloat,
    PositiveAmount,
    PositiveFloat,
    PositiveInt,
    _Model,
    _one_of,
)
from resilient.chaos._inject import Fault
from resilient.errors import PolicyError, did_you_mean

__all__ = [
    "FAILURE_MODES",
    "AbortConditions",
    "BusinessHours",
    "Experiment",
    "Hypothesis",
    "InjectStep",
    "Load",
    "Probe",
    "Ramp",
    "Rollback",
    "Safety",
    "SequenceSpec",
    "load_experiment",
]

#: The failure modes an injection can use (issue #12 pins these names).
FAILURE_MODES: tuple[str, ...] = (
    "network_delay",
    "timeout",
    "exception",
    "error_result",
    "latency_spike",
)
PROBE_TYPES: tuple[str, ...] = (
    "success_rate",
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "health",
    "breaker_state",
)
HEALTH_STATUSES: tuple[str, ...] = ("healthy", "degraded", "unhealthy", "unknown")
BREAKER_STATES: tuple[str, ...] = ("closed", "half-open", "open")
DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


FailureMode = Annotated[
    Literal["network_delay", "timeout", "exception", "error_result", "latency_spike"],
    _one_of(*FAILURE_MODES),
]
Intensity = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def _names(value: object) -> object:
    """One name or a list of names: always a list."""
    return [value] if isinstance(value, str) else value


class Probe(_Model):
    """
    One probe of the steady-state hypothesis: a measurement and its tolerance.

    ``success_rate``: the share of calls that succeeded is at least *tolerance*
    (0-1). ``latency_p50`` / ``latency_p95`` / ``latency_p99``: that percentile of
    the call latency is at most *tolerance* seconds. ``health``: the health status
    (of *service*, else the overall status) is one of *tolerance* (a status or a
    list). ``breaker_state``: the circuit breaker of *service* is in one of
    *tolerance* (a state or a list).
    """

    type: Annotated[
        Literal[
            "success_rate", "latency_p50", "latency_p95", "latency_p99", "health", "breaker_state"
        ],
        _one_of(*PROBE_TYPES),
    ]
    """What is measured."""
    tolerance: Any
    """The bound the measurement must keep (its meaning depends on *type*)."""
    service: str | None = None
    """The service or policy measured; default: every call the experiment sees (for
    ``breaker_state``: required)."""
    name: str | None = None
    """A name for the report (default: derived from type and tolerance)."""

    @model_validator(mode="after")
    def _check(self) -> Probe:
        tol = self.tolerance
        if self.type in {"success_rate", "latency_p50", "latency_p95", "latency_p99"}:
            if isinstance(tol, bool) or not isinstance(tol, int | float):
                msg = f"tolerance of a {self.type} probe must be a number, got {tol!r}"
                raise ValueError(msg)
            if self.type == "success_rate" and not 0 <= tol <= 1:
                msg = f"tolerance of a success_rate probe is a share 0-1, got {tol!r}"
                raise ValueError(msg)
            if self.type != "success_rate" and not 0 < tol <= 3600:
                msg = f"tolerance of a {self.type} probe is seconds (0-3600], got {tol!r}"
                raise ValueError(msg)
            return self
        options = HEALTH_STATUSES if self.type == "health" else BREAKER_STATES
        values = _names(tol)
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) for v in values)
        ):
            msg = f"tolerance of a {self.type} probe is one of {', '.join(options)}, or a list"
            raise ValueError(msg)
        for value in values:
            if value not in options:
                hint = did_you_mean(value, options)
                msg = f"{value!r} is not one of {', '.join(options)}{hint}"
                raise ValueError(msg)
        if self.type == "breaker_state" and self.service is None:
            msg = "a breaker_state probe needs a service (whose breaker to read)"
            raise ValueError(msg)
        return self

    @property
    def accepted(self) -> tuple[str, ...]:
        """The accepted statuses or states (``health`` and ``breaker_state`` probes)."""
        values = _names(self.tolerance)
        return tuple(values) if isinstance(values, list) else ()

    @property
    def label(self) -> str:
        """The probe's name, or a description of it."""
        if self.name:
            return self.name
        where = f" of {self.service}" if self.service else ""
        if self.type == "success_rate":
            return f"success rate{where} >= {self.tolerance:g}"
        if self.type.startswith("latency_"):
            return f"{self.type[8:]} latency{where} <= {self.tolerance:g} s"
        return f"{self.type.replace('_', ' ')}{where} in {list(self.accepted)}"


class Hypothesis(_Model):
    """The steady state: checked before the method and again after the rollbacks."""

    title: str = "steady state"
    """A name for the report."""
    probes: Annotated[list[Probe], Field(min_length=1)]
    """Every probe must hold for the hypothesis to hold."""
    window: PositiveFloat = 5.0
    """Seconds of traffic one check measures."""
    recovery_timeout: NonNegativeFloat = 60.0
    """After the rollbacks, how long the hypothesis may take to hold again (checked
    once per *window*); 0 checks once."""


class Ramp(_Model):
    """Raise the intensity gradually: from *start* to the step's intensity over *over* s."""

    start: Intensity = 0.0
    """Intensity at the beginning of the step."""
    over: PositiveFloat
    """Seconds to reach the step's intensity (then it stays there)."""


class SequenceSpec(_Model):
    """A deterministic fault sequence: fail exactly the calls it names."""

    first: PositiveInt | None = None
    """Fail the first N calls, then none."""
    every: PositiveInt | None = None
    """Fail every k-th call (the k-th, 2k-th ...)."""

    @model_validator(mode="after")
    def _check(self) -> SequenceSpec:
        if (self.first is None) == (self.every is None):
            msg = "give exactly one of 'first' (fail the first N calls) or 'every' (every k-th)"
            raise ValueError(msg)
        return self


class InjectStep(_Model):
    """One step of the method: inject *mode* into *service* at *intensity* for *duration*."""

    service: str
    """The service (a manager's) or policy whose calls get the fault."""
    mode: Annotated[list[FailureMode], BeforeValidator(_names), Field(min_length=1)]
    """A failure mode, or a list of them (each injected fault picks one)."""
    intensity: Intensity = 1.0
    """Share of calls (0-1) that get the fault."""
    duration: PositiveFloat
    """Seconds the injection lasts."""
    name: str | None = None
    """A name for the report."""
    ramp: Ramp | None = None
    """Raise the intensity gradually."""
    cohort: Fraction | None = None
    """Share of calls in the experiment cohort (the rest is the control, never injected)."""
    sequence: SequenceSpec | None = None
    """A deterministic sequence instead of random draws."""
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Per-mode parameters, as in a policy's ``chaos:`` section (``delay``,
    ``exception``, ``value`` ...)."""
    pause_after: NonNegativeFloat = 0.0
    """Seconds of plain traffic after the step, before the next one."""

    @property
    def label(self) -> str:
        """The step's name, or a description of it."""
        return self.name or f"{'+'.join(self.mode)} into {self.service} at {self.intensity:g}"

    @model_validator(mode="after")
    def _check_parameters(self) -> InjectStep:
        # checked when the file is loaded, not when the step starts (after the baseline)
        self.faults()
        return self

    def faults(self) -> list[Fault]:
        """
        The faults of the step, one per mode, with its ``parameters``.

        Raises:
            ValueError: Parameters for a mode that is not a failure mode (did-you-mean) or
                that the step does not inject, or invalid parameters.
        """
        for key in self.parameters:
            if key not in self.mode:
                hint = did_you_mean(key, FAILURE_MODES) if key not in FAILURE_MODES else ""
                msg = (
                    f"parameters: {key!r} is not a failure mode of this step "
                    f"({', '.join(self.mode)}){hint}"
                )
                raise ValueError(msg)
        faults = []
        for mode in self.mode:
            try:
                faults.append(Fault.of({"mode": mode, **_mode_parameters(self, mode)}))
            except PolicyError as exc:
                raise ValueError(f"parameters: {exc}") from None
        return faults


def _mode_parameters(step: InjectStep, mode: str) -> dict[str, Any]:
    """The parameters of *mode* in a step: ``parameters: {network_delay: {delay: 0.2}}``."""
    value = step.parameters.get(mode)
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if mode in {"network_delay", "latency_spike"}:
        return {"delay": value}
    if mode == "timeout":
        return {"hang": value}
    if mode == "exception":
        return {"error": value}
    return {"value": value}


class Rollback(_Model):
    """
    One rollback action. Injections always stop first (an implicit
    ``stop_injections``); these run after, in order, each one even if an
    earlier one failed.
    """

    action: Annotated[
        Literal["stop_injections", "reset_breaker", "call", "wait"],
        _one_of("stop_injections", "reset_breaker", "call", "wait"),
    ]
    """``reset_breaker``: close *service*'s breaker; ``call``: call *function*
    (``module:function``, sync or async); ``wait``: pause *seconds*."""
    service: str | None = None
    function: str | None = None
    seconds: NonNegativeFloat | None = None

    @model_validator(mode="after")
    def _check(self) -> Rollback:
        need = {"reset_breaker": "service", "call": "function", "wait": "seconds"}.get(self.action)
        if need is not None and getattr(self, need) is None:
            msg = f"a {self.action} rollback needs '{need}'"
            raise ValueError(msg)
        if self.function is not None and not _is_spec(self.function):
            msg = f"function must be 'module:function', got {self.function!r}"
            raise ValueError(msg)
        return self


class AbortConditions(_Model):
    """What stops the experiment at once (an emergency stop), checked every interval."""

    health_unhealthy: bool = True
    """Abort when the overall health (resilient.health) is UNHEALTHY."""
    success_rate_below: Fraction | None = None
    """Abort when the success rate of the last interval falls below this."""
    cohort_divergence: Fraction | None = None
    """Abort when the success rates of the experiment and control cohorts differ by
    more than this (steps with a ``cohort``)."""
    latency_p95_above: PositiveFloat | None = None
    """Abort when the p95 latency of the last interval exceeds this many seconds."""


class BusinessHours(_Model):
    """The experiment runs only inside this weekly window, in *timezone*."""

    timezone: str = "UTC"
    """An IANA time zone name, e.g. ``Europe/Berlin``."""
    start: str = "09:00"
    """``HH:MM``, local time."""
    end: str = "17:00"
    """``HH:MM``, local time (after *start*)."""
    days: Annotated[list[Annotated[str, _one_of(*DAYS)]], Field(min_length=1)] = Field(
        default_factory=lambda: list(DAYS[:5])
    )
    """Days of the week (``mon`` ... ``sun``)."""

    @model_validator(mode="after")
    def _check(self) -> BusinessHours:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            msg = f"unknown time zone {self.timezone!r} (use an IANA name such as Europe/Berlin)"
            raise ValueError(msg) from None
        for text in (self.start, self.end):
            if not _CLOCK.match(text):
                msg = f"times are HH:MM (24 h), got {text!r}"
                raise ValueError(msg)
        if _minutes(self.end) <= _minutes(self.start):
            msg = f"end ({self.end}) must be after start ({self.start})"
            raise ValueError(msg)
        return self


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


class Safety(_Model):
    """The guards of a run."""

    check_interval: PositiveFloat = 1.0
    """Seconds between two checks of the abort conditions (and two timeline samples)."""
    abort_on: AbortConditions = Field(default_factory=AbortConditions)
    business_hours: BusinessHours | None = None
    """Refuse to run outside this window (default: any time)."""
    max_faults: PositiveInt | None = None
    """Blast radius: at most this many injected faults per step."""
    max_share: Fraction | None = None
    """Blast radius: at most this share of the calls of a step gets a fault."""
    min_interval: NonNegativeFloat = 0.0
    """Seconds that must pass between two runs of this experiment."""
    history_file: str | None = None
    """A JSON file remembering past runs, so *min_interval* holds across processes
    (default: this process only)."""


class Load(_Model):
    """Where the traffic comes from: the experiment's own calls, or real traffic."""

    target: str | None = None
    """``module:function`` to call (sync or async, no arguments); a target passed to
    ``run_experiment`` wins. Without a target the experiment observes real traffic."""
    rate: PositiveAmount = 10.0
    """Calls per second the experiment makes."""
    max_in_flight: PositiveInt = 100
    """Most calls in flight at once; calls beyond it are skipped (and counted)."""

    @model_validator(mode="after")
    def _check(self) -> Load:
        if self.target is not None and not _is_spec(self.target):
            msg = f"target must be 'module:function', got {self.target!r}"
            raise ValueError(msg)
        return self


class Experiment(_Model):
    """
    A chaos experiment (see docs/chaos.md for a complete file).

    Build it in Python (``Experiment(title=..., method=[InjectStep(...)])``) or
    load it from YAML with :func:`load_experiment`.
    """

    version: Literal[1] = 1
    """Format version of the experiment file."""
    title: str
    """What the experiment is about."""
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    policies: str | None = None
    """A policy file to load before the run (relative to the experiment file)."""
    steady_state_hypothesis: Hypothesis | None = None
    """Checked before the method and again after the rollbacks (recovery validation)."""
    method: Annotated[list[InjectStep], Field(min_length=1)]
    """The injections, run one after another."""
    rollbacks: list[Rollback] = Field(default_factory=list)
    """Run after the method, always: also after an abort, an error or a cancellation."""
    safety: Safety = Field(default_factory=Safety)
    load: Load = Field(default_factory=Load)
    allow_production: bool = False
    """Allow the run when the environment is ``production``."""

    def services(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Every service the experiment names, with its key path (for error messages)."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        for i, step in enumerate(self.method):
            found.append((("method", i, "service"), step.service))
        if self.steady_state_hypothesis is not None:
            for i, probe in enumerate(self.steady_state_hypothesis.probes):
                if probe.service is not None:
                    path = ("steady_state_hypothesis", "probes", i, "service")
                    found.append((path, probe.service))
        for i, rollback in enumerate(self.rollbacks):
            if rollback.service is not None:
                found.append((("rollbacks", i, "service"), rollback.service))
        return found

    def watched(self) -> list[str]:
        """The services whose calls the experiment measures, in order, each once."""
        return list(dict.fromkeys(name for _, name in self.services()))

    def unknown_services(
        self, known: Collection[str]
    ) -> Iterable[tuple[tuple[str | int, ...], str]]:
        """``(key path, problem)`` for every service not in *known*."""
        shown = ", ".join(sorted(known)) or "(none)"
        for path, name in self.services():
            if name not in known:
                hint = did_you_mean(name, known)
                yield path, f"unknown service or policy {name!r}{hint}; known: {shown}"


def _is_spec(text: str) -> bool:
    module, sep, attribute = text.partition(":")
    return bool(sep and module and attribute)


def known_services(
    extra: Iterable[str] = (), policies: Mapping[str, Any] | None = None
) -> set[str]:
    """
    The names an experiment may target: the policies (the active ones, or
    *policies*), the names of existing breakers and other shared objects
    (``@resilient(name=...)``, manager services), and *extra*.
    """
    from resilient import _shared
    from resilient.policy import registry

    names = set(extra)
    names.update(policies if policies is not None else registry.policies())
    for table in _shared.TABLES:
        names.update(table.all())
    return names


def load_experiment(path: str | os.PathLike[str], *, services: Iterable[str] = ()) -> Experiment:
    """
    Read and validate an experiment file (YAML).

    Every service the experiment names must be a policy (of the experiment's
    ``policies:`` file when it has one, else the active policies), an existing
    breaker or other named object, or one of *services*.

    Args:
        path: The experiment file.
        services: More names that exist (a manager's services).

    Raises:
        PolicyError: Every problem found, each with ``file:line``, key and did-you-mean.
    """
    from resilient.policy import load_file, read_yaml_file, validate_model

    source = str(path)
    data, lines = read_yaml_file(path)
    experiment = validate_model(Experiment, data, source=source, lines=lines, what="experiment")
    policies = None
    if experiment.policies is not None:
        policy_path = resolve_relative(experiment.policies, path)
        try:
            policies = load_file(policy_path, env=os.environ)
        except PolicyError as exc:
            line = lines.get(("policies",))
            msg = f"{source}:{line}: policies: {exc}"
            raise PolicyError(msg, source=source, line=line, key="policies") from None
    known = known_services(services, policies)
    experiment = validate_model(
        Experiment,
        data,
        source=source,
        lines=lines,
        check=lambda exp: exp.unknown_services(known),
        what="experiment",
    )
    if experiment.policies is not None:  # the run loads it: make it independent of the cwd
        absolute = str(resolve_relative(experiment.policies, path).resolve())
        experiment = experiment.model_copy(update={"policies": absolute})
    return experiment


def resolve_relative(name: str, base: str | os.PathLike[str]) -> Path:
    """*name* relative to the directory of the file *base* (unless absolute)."""
    target = Path(name)
    return target if target.is_absolute() else Path(base).parent / target

"""
Running an experiment: guards, load, hypothesis, method, safety checks, rollbacks.

``await run_experiment(experiment)`` goes through these phases, sampling a
timeline every ``safety.check_interval`` seconds of the library's clock (so a
:class:`resilient.testing.VirtualClock` makes a ten-minute experiment take
milliseconds in a test):

1. **guards**: chaos allowed (``resilient.chaos.enabled()``), no emergency stop,
   not production unless ``allow_production``, inside the business hours, and
   ``safety.min_interval`` since the last run; a refusal is a
   :class:`resilient.ChaosRefusedError` and nothing runs.
2. **baseline**: the steady-state hypothesis is measured over one window; if it
   does not hold, the method is skipped (there is nothing to learn).
3. **method**: each step injects its faults (through ``resilient.chaos.inject``)
   for its duration, ramping the intensity; every interval the abort conditions
   are checked, and one that trips is an **emergency stop**.
4. **rollbacks**: always, in a ``finally``: after an abort, an error, a
   cancellation or Ctrl-C too. Injections stop first.
5. **recovery**: the hypothesis is measured again until it holds or
   ``recovery_timeout`` runs out.

Calls are counted by a call observer of the runtime (key ``"chaos-experiment"``)
on the services the experiment names, and by the load driver for its own calls;
breaker moves, retries and injected faults come from the event bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from resilient import _clock
from resilient.chaos._experiment import (
    BusinessHours,
    Experiment,
    Hypothesis,
    InjectStep,
    Probe,
    known_services,
)
from resilient.errors import ChaosRefusedError, PolicyError, RejectedError

__all__ = [
    "ExperimentResult",
    "ExperimentRun",
    "ProbeResult",
    "Sample",
    "run_experiment",
]

_log = logging.getLogger("resilient.chaos")
#: The key of a run's call observer: each run gets its own (``itertools.count``), so
#: runs going on at the same time (two services, a schedule and a manual run) do not
#: replace, then remove, each other's observer.
_OBSERVER_KEYS = itertools.count(1)
#: Latencies kept per window for its percentiles (a window of a busy service is trimmed).
_MAX_LATENCIES = 20_000

ProgressCallback = Callable[["ExperimentResult", "Sample | None"], Any]


# --------------------------------------------------------------------------- counting


class _Counts:
    """Outcomes and latencies of calls over one window."""

    __slots__ = ("calls", "failures", "fallbacks", "latencies", "rejected", "successes", "timeouts")

    def __init__(self) -> None:
        self.calls = self.successes = self.failures = 0
        self.fallbacks = self.rejected = self.timeouts = 0
        self.latencies: list[float] = []

    def add(self, outcome: str, latency: float | None) -> None:
        self.calls += 1
        if outcome == "success":
            self.successes += 1
        elif outcome == "fallback":
            self.fallbacks += 1
        elif outcome == "rejected":
            self.rejected += 1
        elif outcome == "timeout":
            self.timeouts += 1
            self.failures += 1
        else:
            self.failures += 1
        if latency is not None and len(self.latencies) < _MAX_LATENCIES:
            self.latencies.append(latency)

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.calls if self.calls else None

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class _Recorder:
    """
    What the experiment sees: calls per service (a call observer), its own calls
    (the load driver), and events (breaker moves, retries, injected faults).
    Windows are swapped, never cleared in place, so a call recorded from another
    thread lands in one window or the next, never nowhere.
    """

    def __init__(self, watched: Iterable[str], *, driven: bool, started: float) -> None:
        self.watched = frozenset(watched)
        self.driven = driven
        self.started = started
        self.overall = _Counts()  # since the last reset: the driver's calls, or all observed
        self.services: dict[str, _Counts] = {name: _Counts() for name in self.watched}
        self.total = _Counts()
        self.policies: dict[str, Any] = {}
        self.transitions: list[dict[str, Any]] = []
        self.retries: dict[str, int] = dict.fromkeys(self.watched, 0)
        self.faults = 0
        self.faults_by_mode: dict[str, int] = {}
        self.window_faults = 0
        self.window_retries = 0
        self.first_fault_at: float | None = None

    # the observer factory and its observers
    def observer_for(self, pipeline: Any) -> _ServiceObserver | None:
        name = getattr(pipeline, "name", None)
        if name not in self.watched:
            return None
        self.policies[name] = pipeline.policy
        return _ServiceObserver(self, name)

    def record_service(self, name: str, outcome: str, latency: float | None) -> None:
        if outcome == "cancelled":
            return
        self.services[name].add(outcome, latency)
        if not self.driven:
            self.overall.add(outcome, latency)
            self.total.add(outcome, latency)

    def record_driven(self, outcome: str, latency: float) -> None:
        self.overall.add(outcome, latency)
        self.total.add(outcome, latency)

    def on_event(self, event: object) -> None:
        from resilient import events

        policy = getattr(event, "policy", None)
        if policy not in self.watched:
            return
        now = _clock.monotonic() - self.started
        if isinstance(event, events.BreakerStateChanged):
            self.transitions.append(
                {
                    "at": round(now, 3),
                    "service": policy,
                    "old": event.old_state,
                    "new": event.new_state,
                }
            )
        elif isinstance(event, events.RetryScheduled):
            self.retries[policy] += 1
            self.window_retries += 1
        elif isinstance(event, events.ChaosInjected):
            self.faults += 1
            self.window_faults += 1
            self.faults_by_mode[event.fault] = self.faults_by_mode.get(event.fault, 0) + 1
            if self.first_fault_at is None:
                self.first_fault_at = now

    def take_window(self) -> tuple[_Counts, dict[str, _Counts], int, int]:
        overall, self.overall = self.overall, _Counts()
        services = self.services
        self.services = {name: _Counts() for name in self.watched}
        faults, self.window_faults = self.window_faults, 0
        retries, self.window_retries = self.window_retries, 0
        return overall, services, faults, retries


class _ServiceObserver:
    __slots__ = ("name", "recorder")

    def __init__(self, recorder: _Recorder, name: str) -> None:
        self.recorder = recorder
        self.name = name

    def record(self, outcome: str, duration: float) -> None:
        self.recorder.record_service(self.name, outcome, duration)


# --------------------------------------------------------------------------- results


@dataclass
class ProbeResult:
    """One probe's verdict: what was measured against its tolerance."""

    probe: str
    type: str
    service: str | None
    tolerance: Any
    value: Any
    held: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "type": self.type,
            "service": self.service,
            "tolerance": self.tolerance,
            "value": self.value,
            "held": self.held,
        }


@dataclass
class Sample:
    """One point of the timeline (one check interval)."""

    at: float
    """Seconds since the start of the run."""
    phase: str
    """``baseline``, ``method``, ``pause``, ``rollback`` or ``recovery``."""
    step: str | None
    intensity: float
    """The injection rate in force (0 outside the method)."""
    calls: int
    injected: int
    """Faults injected during the interval."""
    retries: int
    success_rate: float | None
    latency_p50: float | None
    latency_p95: float | None
    breakers: dict[str, str]
    health: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "phase": self.phase,
            "step": self.step,
            "intensity": round(self.intensity, 4),
            "calls": self.calls,
            "injected": self.injected,
            "retries": self.retries,
            "success_rate": _round(self.success_rate),
            "latency_p50": _round(self.latency_p50),
            "latency_p95": _round(self.latency_p95),
            "breakers": dict(self.breakers),
            "health": self.health,
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class ExperimentResult:
    """
    The journal of one run. ``to_dict()`` is JSON-serialisable; the reports
    (:mod:`resilient.chaos` ``write_report``/``write_plot``) are drawn from it.
    """

    experiment: Experiment
    status: str = "pending"
    """``completed`` (the hypothesis held before and after), ``failed`` (it did
    not), ``aborted`` (a safety stop), ``cancelled``, ``error`` or ``dry_run``."""
    started_at: str | None = None
    ended_at: str | None = None
    duration: float = 0.0
    environment: str | None = None
    abort_reason: str | None = None
    error: str | None = None
    before: list[ProbeResult] | None = None
    after: list[ProbeResult] | None = None
    recovery_time: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[Sample] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    recommendations: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    guards: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.experiment.title

    @property
    def aborted(self) -> bool:
        """Whether a safety condition stopped the run."""
        return self.status == "aborted"

    @property
    def held(self) -> bool | None:
        """Whether the hypothesis held before and after (``None``: no hypothesis, or not run)."""
        if self.experiment.steady_state_hypothesis is None or self.status == "dry_run":
            return None
        if self.before is None:
            return None
        if not all(p.held for p in self.before):
            return False
        if self.after is None:
            return None if self.status == "cancelled" else False
        return all(p.held for p in self.after)

    @property
    def succeeded(self) -> bool:
        """Whether the run ended well: completed and the hypothesis (if any) held."""
        return self.status in {"completed", "dry_run"}

    def to_dict(self) -> dict[str, Any]:
        """The journal as plain JSON types."""
        return {
            "title": self.experiment.title,
            "description": self.experiment.description,
            "status": self.status,
            "held": self.held,
            "aborted": self.aborted,
            "abort_reason": self.abort_reason,
            "error": self.error,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration": round(self.duration, 3),
            "environment": self.environment,
            "hypothesis": {
                "title": (
                    self.experiment.steady_state_hypothesis.title
                    if self.experiment.steady_state_hypothesis is not None
                    else None
                ),
                "before": None if self.before is None else [p.to_dict() for p in self.before],
                "after": None if self.after is None else [p.to_dict() for p in self.after],
                "recovery_time": _round(self.recovery_time, 3),
            },
            "steps": self.steps,
            "timeline": [s.to_dict() for s in self.timeline],
            "breaker_transitions": self.transitions,
            "rollbacks": self.rollbacks,
            "totals": self.totals,
            "recommendations": self.recommendations,
            "plan": self.plan,
            "guards": self.guards,
            "experiment": self.experiment.model_dump(mode="json", fallback=_json_name),
        }

    def to_json(self, **kwargs: Any) -> str:
        """The journal as JSON text."""
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})


# --------------------------------------------------------------------------- guards


class RunHistory:
    """
    When each experiment last ran (by title), for ``safety.min_interval``: in this
    process, and in a JSON file when the experiment names one.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def last(self, title: str, path: str | None) -> float | None:
        known = self._last.get(title)
        if path is not None:
            stored = _read_history(path).get(title)
            if isinstance(stored, int | float) and (known is None or stored > known):
                known = float(stored)
        return known

    def record(self, title: str, at: float, path: str | None) -> None:
        self._last[title] = at
        if path is not None:
            data = _read_history(path)
            data[title] = at
            try:
                Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            except OSError as exc:
                _log.warning("chaos run history %s not written: %s", path, exc)

    def clear(self) -> None:
        """Forget the runs of this process (the files are left alone)."""
        self._last.clear()


def _read_history(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


#: The process's run history (``safety.min_interval``).
history = RunHistory()

_DAY_INDEX = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


def outside_business_hours(hours: BusinessHours, at: datetime) -> str | None:
    """Why *at* is outside the window (``None``: inside)."""
    from zoneinfo import ZoneInfo

    local = at.astimezone(ZoneInfo(hours.timezone))
    day = local.weekday()
    minutes = local.hour * 60 + local.minute
    start = _hm(hours.start)
    end = _hm(hours.end)
    if day not in {_DAY_INDEX[d] for d in hours.days} or not start <= minutes < end:
        return (
            f"outside business hours: it is {local:%a %H:%M} in {hours.timezone}; experiments "
            f"run {','.join(hours.days)} {hours.start}-{hours.end}"
        )
    return None


def _hm(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _wall_clock(now: datetime | Callable[[], datetime] | None) -> Callable[[], datetime]:
    """
    The wall clock of a run: *now* when it is a function; else a start time
    (*now*, or the real time) that moves with the library's clock, so a virtual
    clock moves the business-hours check too.
    """
    if callable(now):
        return now
    start = now if now is not None else datetime.now(UTC)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    origin = _clock.monotonic()
    return lambda: start + timedelta(seconds=_clock.monotonic() - origin)


# --------------------------------------------------------------------------- the run


def _json_name(value: Any) -> Any:
    """A value of a Python-built experiment JSON cannot hold, as text: a class by its
    dotted name (``builtins.ConnectionResetError``), anything else by its ``repr``."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def _import_spec(spec: str) -> Callable[..., Any]:
    """The callable *spec* (``module:function``) names; the current directory is importable
    while it is imported (``sys.path`` is left as it was)."""
    module_name, _, attribute = spec.partition(":")
    here = os.getcwd()
    added = "" not in sys.path and here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"cannot import {module_name!r} for {spec!r}: {exc}"
        raise PolicyError(msg) from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(here)
    for part in attribute.split("."):
        if not hasattr(target, part):
            from resilient.errors import did_you_mean

            names = [n for n in dir(target) if not n.startswith("_")]
            msg = f"{spec!r}: {module_name} has no attribute {part!r}{did_you_mean(part, names)}"
            raise PolicyError(msg)
        target = getattr(target, part)
    if not callable(target):
        msg = f"{spec!r} is not callable"
        raise PolicyError(msg)
    return target  # type: ignore[no-any-return]


def _virtual_time() -> bool:
    """Whether the library's time seam is replaced (a virtual clock is installed)."""
    return _clock.sleep is not time.sleep


class ExperimentRun:
    """
    One run of an experiment. ``await run.execute()`` runs it; :attr:`result`
    is the journal so far at any moment (also after a cancellation).

    Use :func:`run_experiment` unless you need the journal of a run that was
    interrupted (the ``resilient chaos run`` command does).
    """

    def __init__(
        self,
        experiment: Experiment,
        *,
        target: Callable[..., Any] | None = None,
        dry_run: bool = False,
        now: datetime | Callable[[], datetime] | None = None,
        on_progress: ProgressCallback | None = None,
        monitor: Any = None,
        services: Iterable[str] = (),
        seed: int | None = None,
        breakers: Callable[[str], Any] | None = None,
    ) -> None:
        if not isinstance(experiment, Experiment):
            msg = (
                f"experiment must be a resilient.chaos.Experiment, not {type(experiment).__name__}"
            )
            raise TypeError(msg)
        self.experiment = experiment
        self.target = target
        self.dry_run = dry_run
        self.wall = _wall_clock(now)
        self.on_progress = on_progress
        if monitor is None and experiment.safety.abort_on.health_unhealthy:
            from resilient.health import HealthMonitor

            monitor = HealthMonitor()  # the policies with a health: section
        self.monitor = monitor
        self.services = tuple(services)
        self.seed = seed
        self._breakers = breakers
        self.result = ExperimentResult(experiment)
        self._started = 0.0
        self._recorder: _Recorder | None = None
        self._injection: Any = None
        self._injections: list[Any] = []  # every injection this run started
        self._phase = "baseline"
        self._step: str | None = None
        self._intensity = 0.0
        self._health: str | None = None
        self._in_flight = 0
        self._skipped = 0
        self._callbacks: set[asyncio.Future[Any]] = set()  # async on_progress calls running

    # ------------------------------------------------------------ guards

    def check_guards(self, *, raise_: bool = True) -> dict[str, Any]:
        """
        Judge every guard; returns ``{guard: None or why it refuses}``. With
        *raise_*, the first refusal is raised as :class:`ChaosRefusedError`.
        """
        from resilient.chaos import _inject

        exp = self.experiment
        safety = exp.safety
        _inject._fleet_check()  # Redis backend: adopt the fleet's stop (one read), as inject()
        guards: dict[str, str | None] = {}
        guards["disabled"] = (
            None
            if _inject.enabled()
            else (
                "chaos is switched off: resilient.chaos.enable(), "
                "RESILIENCE_CHAOS_ENGINEERING_ENABLED=true, or a manager with "
                "chaos_engineering_enabled=True"
            )
        )
        guards["stopped"] = (
            f"an emergency stop is in force ({_inject.stop_reason()}); "
            "resilient.chaos.resume() after investigating"
            if _inject.is_stopped()
            else None
        )
        guards["production"] = (
            f"the environment is {_inject.environment()!r} and the experiment does not set "
            "allow_production: true"
            if _inject.is_production() and not exp.allow_production
            else None
        )
        at = self.wall()
        guards["business_hours"] = (
            outside_business_hours(safety.business_hours, at)
            if safety.business_hours is not None
            else None
        )
        why_interval = None
        if safety.min_interval > 0:
            last = history.last(exp.title, safety.history_file)
            if last is not None:
                since = at.timestamp() - last
                if since < safety.min_interval:
                    why_interval = (
                        f"the experiment ran {since:.0f} s ago; safety.min_interval is "
                        f"{safety.min_interval:g} s (next run allowed in "
                        f"{safety.min_interval - since:.0f} s)"
                    )
        guards["min_interval"] = why_interval
        if raise_:
            for reason, why in guards.items():
                if why is not None:
                    msg = f"chaos experiment {exp.title!r} refused: {why}"
                    raise ChaosRefusedError(msg, reason=reason)
        return guards

    def check_names(self) -> None:
        """Every service the experiment names exists (else a ``PolicyError``)."""
        policies = None
        if self.experiment.policies is not None:
            from resilient.policy import load_file

            policies = load_file(self.experiment.policies, env=os.environ)
        known = known_services(self.services, policies)
        problems = list(self.experiment.unknown_services(known))
        if problems:
            from resilient.policy import validate_model

            validate_model(
                Experiment,
                self.experiment.model_dump(),
                source=f"experiment {self.experiment.title!r}",
                check=lambda _exp: problems,
                what="experiment",
            )

    def plan(self) -> list[str]:
        """What the run would do, step by step, in words."""
        exp = self.experiment
        lines: list[str] = []
        target = self._target_name()
        if target is not None:
            lines.append(f"drive load: call {target} {exp.load.rate:g} times per second")
        else:
            lines.append(f"observe real traffic of {', '.join(exp.watched())}")
        hyp = exp.steady_state_hypothesis
        if hyp is not None:
            probes = "; ".join(p.label for p in hyp.probes)
            lines.append(f"check the steady state over {hyp.window:g} s: {probes}")
        at = 0.0
        for step in exp.method:
            modes = "/".join(step.mode)
            what = f"inject {modes} into {step.service!r} at intensity {step.intensity:g}"
            if step.ramp is not None:
                what += f" (ramped from {step.ramp.start:g} over {step.ramp.over:g} s)"
            if step.cohort is not None:
                what += f", cohort {step.cohort:g} of calls"
            if step.sequence is not None:
                seq = step.sequence
                what += f", failing the first {seq.first} calls" if seq.first else ""
                what += f", failing every {seq.every}th call" if seq.every else ""
            lines.append(f"t+{at:g} s: {what} for {step.duration:g} s")
            at += step.duration
            if step.pause_after:
                lines.append(f"t+{at:g} s: pause {step.pause_after:g} s")
                at += step.pause_after
        safety = exp.safety
        conditions = []
        abort = safety.abort_on
        if abort.health_unhealthy:
            conditions.append("overall health UNHEALTHY")
        if abort.success_rate_below is not None:
            conditions.append(f"success rate < {abort.success_rate_below:g}")
        if abort.latency_p95_above is not None:
            conditions.append(f"p95 latency > {abort.latency_p95_above:g} s")
        if abort.cohort_divergence is not None:
            conditions.append(f"cohorts' success rates differ by > {abort.cohort_divergence:g}")
        if conditions:
            lines.append(
                f"every {safety.check_interval:g} s: emergency stop if " + " or ".join(conditions)
            )
        caps = []
        if safety.max_faults is not None:
            caps.append(f"at most {safety.max_faults} faults per step")
        if safety.max_share is not None:
            caps.append(f"at most {safety.max_share:.0%} of calls faulted")
        if caps:
            lines.append("blast radius: " + ", ".join(caps))
        rollbacks = ["stop injections"] + [_describe_rollback(r) for r in exp.rollbacks]
        lines.append("rollbacks (always): " + "; ".join(rollbacks))
        if hyp is not None:
            lines.append(
                f"recovery: the steady state must hold again within {hyp.recovery_timeout:g} s"
            )
        return lines

    def _target_name(self) -> str | None:
        if self.target is not None:
            return getattr(self.target, "__qualname__", None) or repr(self.target)
        return self.experiment.load.target

    # ------------------------------------------------------------ execute

    async def execute(self) -> ExperimentResult:
        """Run the experiment (see the module docstring); returns :attr:`result`."""
        exp = self.experiment
        result = self.result
        if exp.policies is not None and not self.dry_run:
            from resilient.policy import load_policies

            load_policies(exp.policies)
        self.check_names()
        if self.target is None and exp.load.target is not None:
            self.target = _import_spec(exp.load.target)
        result.plan = self.plan()
        from resilient.chaos import _inject

        result.environment = _inject.environment()
        if self.dry_run:
            result.guards = self.check_guards(raise_=False)
            result.status = "dry_run"
            result.started_at = result.ended_at = self.wall().isoformat()
            return result
        result.guards = self.check_guards()
        self._started = _clock.monotonic()
        start_wall = self.wall()
        result.started_at = start_wall.isoformat()
        history.record(exp.title, start_wall.timestamp(), exp.safety.history_file)
        recorder = self._recorder = _Recorder(
            exp.watched(), driven=self.target is not None, started=self._started
        )
        from resilient.events import bus
        from resilient.runtime import runtime

        unsubscribe = bus.subscribe(recorder.on_event)
        observer_key = f"chaos-experiment-{next(_OBSERVER_KEYS)}"
        runtime.add_observer_factory(observer_key, recorder.observer_for)
        driver = (
            asyncio.ensure_future(self._drive(self.target)) if self.target is not None else None
        )
        cancelled: BaseException | None = None
        try:
            await self._body()
        except (asyncio.CancelledError, KeyboardInterrupt) as exc:
            cancelled = exc
            result.status = "cancelled"
        except Exception as exc:
            result.status = "error"
            result.error = f"{type(exc).__name__}: {exc}"
            _log.exception("chaos experiment %r failed", exp.title)
        finally:
            try:
                try:
                    await self._rollback()
                    if cancelled is None:
                        await self._recover()
                except (asyncio.CancelledError, KeyboardInterrupt) as exc:
                    # cancelled during the rollbacks (every one still ran) or the recovery
                    if cancelled is None:
                        cancelled = exc
                        result.status = "cancelled"
            finally:
                if driver is not None:
                    driver.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await driver
                runtime.remove_observer_factory(observer_key)
                unsubscribe()
                self._finish()
        if cancelled is not None:
            raise cancelled
        return result

    async def _body(self) -> None:
        exp = self.experiment
        result = self.result
        hyp = exp.steady_state_hypothesis
        if hyp is not None:
            self._phase = "baseline"
            result.before = await self._measure(hyp)
            if not all(p.held for p in result.before):
                result.status = "failed"
                result.abort_reason = (
                    "the steady state did not hold before the method; nothing injected"
                )
                return
        for step in exp.method:
            if not await self._run_step(step):
                return
        result.status = "running"

    async def _run_step(self, step: InjectStep) -> bool:
        """Run one step; false when the run was aborted."""
        from resilient.chaos import _inject

        exp = self.experiment
        safety = exp.safety
        faults = step.faults()
        start_rate = step.ramp.start if step.ramp is not None else step.intensity
        kwargs: dict[str, Any] = {}
        if step.sequence is not None:
            kwargs = {"first": step.sequence.first, "every": step.sequence.every}
        else:
            kwargs = {"rate": start_rate}
        try:
            injection = _inject.inject(
                step.service,
                faults,
                cohort=step.cohort,
                max_faults=safety.max_faults,
                max_share=safety.max_share,
                allow_production=exp.allow_production,
                experiment=exp.title,
                seed=self.seed,
                **kwargs,
            )
        except ChaosRefusedError as exc:
            # the guards held at the start: a safety mechanism stopped chaos since then
            # (an emergency stop during a pause, chaos switched off): an abort, not an error
            self.result.status = "aborted"
            self.result.abort_reason = (
                f"emergency stop ({_inject.stop_reason()})"
                if exc.reason == "stopped"
                else f"step {step.label!r} refused: {exc}"
            )
            return False
        self._injection = injection
        self._injections.append(injection)
        self._phase, self._step = "method", step.label
        began = _clock.monotonic()
        record: dict[str, Any] = {
            "name": step.label,
            "service": step.service,
            "modes": list(step.mode),
            "intensity": step.intensity,
            "started": round(began - self._started, 3),
        }
        self.result.steps.append(record)
        aborted = None
        try:
            while True:
                elapsed = _clock.monotonic() - began
                if elapsed >= step.duration - 1e-9:
                    break
                rate = _ramp(step, elapsed)
                self._intensity = rate if step.sequence is None else 1.0
                if step.sequence is None:
                    injection.rate = rate
                await _clock.asleep(min(safety.check_interval, step.duration - elapsed))
                sample = await self._sample()
                aborted = self._abort_reason(sample, injection)
                if aborted is not None:
                    break
        finally:
            # (an injection stopped from outside, chaos switched off, needs no stop)
            if aborted is not None and not _inject.is_stopped() and injection.active:
                _inject.emergency_stop(f"chaos experiment {exp.title!r}: {aborted}")
            injection.stop("step ended" if aborted is None else f"aborted: {aborted}")
            self._injection = None
            self._intensity = 0.0
            record["ended"] = round(_clock.monotonic() - self._started, 3)
            record["faults"] = injection.faults
            record["attempts"] = injection.attempts
            record["by_mode"] = dict(injection.by_mode)
            record["stop_reason"] = injection.stop_reason
            if step.cohort is not None:
                record["cohorts"] = {
                    "treated": injection.treated.as_dict(),
                    "control": injection.control.as_dict(),
                }
        if aborted is not None:
            self.result.status = "aborted"
            self.result.abort_reason = aborted
            return False
        if step.pause_after:
            self._phase = "pause"
            await self._sample_for(step.pause_after)
        return True

    def _abort_reason(self, sample: Sample, injection: Any) -> str | None:
        from resilient.chaos import _inject

        abort = self.experiment.safety.abort_on
        if _inject.is_stopped():
            return f"emergency stop ({_inject.stop_reason()})"
        if not injection.active:  # chaos switched off (a manager closed, disable()) ...
            return f"the injection was stopped ({injection.stop_reason})"
        if abort.health_unhealthy and sample.health == "unhealthy":
            return "the overall health is UNHEALTHY"
        hours = self.experiment.safety.business_hours
        if hours is not None:
            outside = outside_business_hours(hours, self.wall())
            if outside is not None:
                return f"the business hours ended ({outside})"
        if (
            abort.success_rate_below is not None
            and sample.success_rate is not None
            and sample.success_rate < abort.success_rate_below
        ):
            return (
                f"success rate {sample.success_rate:.1%} fell below the floor "
                f"{abort.success_rate_below:.1%}"
            )
        if (
            abort.latency_p95_above is not None
            and sample.latency_p95 is not None
            and sample.latency_p95 > abort.latency_p95_above
        ):
            return f"p95 latency {sample.latency_p95:.3f} s exceeded {abort.latency_p95_above:g} s"
        if abort.cohort_divergence is not None:
            diverged = injection.diverged(success_rate=abort.cohort_divergence)
            if diverged:
                return f"the cohorts diverged: {diverged}"
        return None

    async def _sample_for(self, seconds: float) -> None:
        interval = self.experiment.safety.check_interval
        end = _clock.monotonic() + seconds
        while True:
            left = end - _clock.monotonic()
            if left <= 1e-9:
                return
            await _clock.asleep(min(interval, left))
            await self._sample()

    async def _sample(self) -> Sample:
        recorder = self._recorder
        assert recorder is not None
        overall, _services, faults, retries = recorder.take_window()
        self._health = await self._read_health()
        sample = Sample(
            at=_clock.monotonic() - self._started,
            phase=self._phase,
            step=self._step if self._phase == "method" else None,
            intensity=self._intensity,
            calls=overall.calls,
            injected=faults,
            retries=retries,
            success_rate=overall.success_rate,
            latency_p50=overall.percentile(0.5),
            latency_p95=overall.percentile(0.95),
            breakers=self._breaker_states(),
            health=self._health,
        )
        self.result.timeline.append(sample)
        self._progress(sample)
        return sample

    def _progress(self, sample: Sample | None) -> None:
        if self.on_progress is None:
            return
        try:
            outcome = self.on_progress(self.result, sample)
            if inspect.isawaitable(outcome):
                task = asyncio.ensure_future(outcome)
                self._callbacks.add(task)
                task.add_done_callback(self._callbacks.discard)
        except Exception:
            _log.exception("on_progress callback raised; ignoring it")

    def _breaker_states(self) -> dict[str, str]:
        from resilient import pipeline

        states: dict[str, str] = {}
        for name in self.experiment.watched():
            breaker = self._breakers(name) if self._breakers is not None else None
            if breaker is None:
                breaker = pipeline.breakers().get(name)
            if breaker is not None:
                states[name] = str(breaker.state)
        return states

    async def _read_health(self) -> str | None:
        monitor = self.monitor
        if monitor is None:
            return None
        try:
            if getattr(monitor, "running", False):
                summary = monitor.get_system_health_summary()
            else:
                summary = await monitor.run_checks()
        except Exception:
            _log.exception("chaos experiment: reading health failed; ignoring it")
            return None
        status = summary.get("status")
        return str(status) if status is not None else None

    async def _measure(self, hyp: Hypothesis) -> list[ProbeResult]:
        """Measure the hypothesis over one window of traffic."""
        recorder = self._recorder
        assert recorder is not None
        window = _Counts()
        per_service: dict[str, _Counts] = {name: _Counts() for name in recorder.watched}
        end = _clock.monotonic() + hyp.window
        interval = self.experiment.safety.check_interval
        while True:
            left = end - _clock.monotonic()
            if left <= 1e-9:
                break
            await _clock.asleep(min(interval, left))
            # a sample takes the recorder's window: merge it into the measurement
            recorder_window = recorder.overall
            services_window = recorder.services
            _merge(window, recorder_window)
            for name, counts in services_window.items():
                _merge(per_service[name], counts)
            await self._sample()
        return [self._judge(probe, window, per_service) for probe in hyp.probes]

    def _judge(
        self, probe: Probe, window: _Counts, per_service: Mapping[str, _Counts]
    ) -> ProbeResult:
        counts = per_service.get(probe.service, window) if probe.service else window
        value: Any
        if probe.type == "success_rate":
            value = counts.success_rate
            held = value is not None and value >= probe.tolerance
            value = _round(value)
        elif probe.type.startswith("latency_"):
            q = {"latency_p50": 0.5, "latency_p95": 0.95, "latency_p99": 0.99}[probe.type]
            value = counts.percentile(q)
            held = value is None or value <= probe.tolerance
            value = _round(value)
        elif probe.type == "health":
            value = self._health
            if probe.service is not None and self.monitor is not None:
                try:
                    value = self.monitor.get_service_health(probe.service)["status"]
                except Exception:
                    value = "unknown"
            held = value in probe.accepted
        else:
            value = self._breaker_states().get(probe.service or "")
            held = value in probe.accepted
        return ProbeResult(probe.label, probe.type, probe.service, probe.tolerance, value, held)

    async def _rollback(self) -> None:
        """Stop every injection of the run, then the experiment's rollbacks, each one guarded."""
        self._phase, self._step = "rollback", None
        rollbacks = self.result.rollbacks
        self._injection = None
        interrupted: asyncio.CancelledError | None = None
        # only this run's: another run of the same experiment (another service, a
        # schedule) may be injecting at the same time
        for inj in self._injections:
            inj.stop("rollback")
        rollbacks.append({"action": "stop_injections", "ok": True, "error": None})
        for rollback in self.experiment.rollbacks:
            if rollback.action == "stop_injections":
                continue  # done first, always
            entry: dict[str, Any] = {"action": rollback.action, "ok": True, "error": None}
            if rollback.service is not None:
                entry["service"] = rollback.service
            if rollback.function is not None:
                entry["function"] = rollback.function
            try:
                await self._one_rollback(rollback)
            except (Exception, asyncio.CancelledError) as exc:
                entry["ok"] = False
                entry["error"] = f"{type(exc).__name__}: {exc}"
                _log.error("chaos rollback %s failed: %s", rollback.action, entry["error"])
                if isinstance(exc, asyncio.CancelledError):
                    interrupted = interrupted or exc  # the next rollbacks run all the same
            rollbacks.append(entry)
        if interrupted is not None:
            raise interrupted  # the run is cancelled: no recovery phase
        if self._recorder is not None:
            await self._sample()  # close the interval of the rollbacks: recovery starts afresh

    async def _one_rollback(self, rollback: Any) -> None:
        from resilient import pipeline

        if rollback.action == "wait":
            await _clock.asleep(rollback.seconds)
        elif rollback.action == "reset_breaker":
            breaker = self._breakers(rollback.service) if self._breakers is not None else None
            if breaker is None:
                breaker = pipeline.breakers().get(rollback.service)
            if breaker is None:
                msg = f"service {rollback.service!r} has no circuit breaker (yet)"
                raise LookupError(msg)
            breaker.reset()
        elif rollback.action == "call":
            outcome = _import_spec(rollback.function)()
            if inspect.isawaitable(outcome):
                await outcome

    async def _recover(self) -> None:
        hyp = self.experiment.steady_state_hypothesis
        result = self.result
        self._phase = "recovery"
        if hyp is None or result.before is None or not all(p.held for p in result.before):
            return  # nothing was injected: there is nothing to recover from
        began = _clock.monotonic()
        while True:
            result.after = await self._measure(hyp)
            if all(p.held for p in result.after):
                result.recovery_time = _clock.monotonic() - began
                return
            if _clock.monotonic() - began >= hyp.recovery_timeout:
                return

    def _finish(self) -> None:
        result = self.result
        recorder = self._recorder
        result.ended_at = self.wall().isoformat()
        result.duration = _clock.monotonic() - self._started
        if result.status == "running":
            held = result.held
            result.status = "completed" if held is None or held else "failed"
        if recorder is not None:
            result.transitions = list(recorder.transitions)
            total = recorder.total
            calls = total.calls
            retries = sum(recorder.retries.values())
            result.totals = {
                "calls": calls,
                "successes": total.successes,
                "failures": total.failures,
                "rejected": total.rejected,
                "fallbacks": total.fallbacks,
                "success_rate": _round(total.success_rate),
                "latency_p95": _round(total.percentile(0.95)),
                "faults": recorder.faults,
                "faults_by_mode": dict(recorder.faults_by_mode),
                "retries": retries,
                "skipped_calls": self._skipped,
            }
            from resilient.chaos._recommend import recommend

            try:
                result.recommendations = recommend(result, recorder.policies)
            except Exception:
                _log.exception("chaos experiment: recommendations failed; ignoring it")
        self._progress(None)

    # ------------------------------------------------------------ the load driver

    async def _drive(self, target: Callable[..., Any]) -> None:
        load = self.experiment.load
        interval = 1.0 / load.rate
        is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
            getattr(target, "__call__", None)  # noqa: B004 - an async __call__ counts
        )
        inline = _virtual_time()  # a thread would wait in real time
        tasks: set[asyncio.Future[None]] = set()
        next_at = _clock.monotonic()
        try:
            while True:
                if self._in_flight >= load.max_in_flight:
                    self._skipped += 1
                else:
                    self._in_flight += 1
                    task = asyncio.ensure_future(self._one_call(target, is_async, inline))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                next_at += interval
                delay = next_at - _clock.monotonic()
                await _clock.asleep(max(delay, 0.0))
        finally:
            for pending in list(tasks):
                pending.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _one_call(self, target: Callable[..., Any], is_async: bool, inline: bool) -> None:
        recorder = self._recorder
        assert recorder is not None
        began = _clock.monotonic()
        try:
            if is_async:
                await target()
            elif inline:
                outcome = target()
                if inspect.isawaitable(outcome):
                    await outcome
            else:
                await asyncio.to_thread(target)
        except RejectedError:
            recorder.record_driven("rejected", _clock.monotonic() - began)
        except TimeoutError:
            recorder.record_driven("timeout", _clock.monotonic() - began)
        except Exception:
            recorder.record_driven("failure", _clock.monotonic() - began)
        else:
            recorder.record_driven("success", _clock.monotonic() - began)
        finally:
            self._in_flight -= 1


def _merge(into: _Counts, other: _Counts) -> None:
    into.calls += other.calls
    into.successes += other.successes
    into.failures += other.failures
    into.fallbacks += other.fallbacks
    into.rejected += other.rejected
    into.timeouts += other.timeouts
    room = _MAX_LATENCIES - len(into.latencies)
    if room > 0:
        into.latencies.extend(other.latencies[:room])


def _ramp(step: InjectStep, elapsed: float) -> float:
    if step.ramp is None or elapsed >= step.ramp.over:
        return step.intensity
    share = elapsed / step.ramp.over
    return step.ramp.start + (step.intensity - step.ramp.start) * share


def _describe_rollback(rollback: Any) -> str:
    if rollback.action == "wait":
        return f"wait {rollback.seconds:g} s"
    if rollback.action == "reset_breaker":
        return f"reset the breaker of {rollback.service!r}"
    if rollback.action == "call":
        return f"call {rollback.function}"
    return "stop injections"


async def run_experiment(
    experiment: Experiment,
    *,
    target: Callable[..., Any] | None = None,
    dry_run: bool = False,
    now: datetime | Callable[[], datetime] | None = None,
    on_progress: ProgressCallback | None = None,
    monitor: Any = None,
    services: Iterable[str] = (),
    seed: int | None = None,
) -> ExperimentResult:
    """
    Run *experiment* and return its journal.

    Args:
        experiment: What to run (:func:`load_experiment`, or built in Python).
        target: A callable to drive load with (no arguments, sync or async, e.g. a
            ``@resilient`` function); wins over ``load.target``. Without either,
            the experiment observes real traffic.
        dry_run: Validate and plan only: nothing is injected and nothing called;
            ``result.plan`` says what would happen, ``result.guards`` what would refuse.
        now: The wall-clock time (for business hours and ``min_interval``): a
            ``datetime`` that then moves with the library's clock, or a function
            returning the time. Default: the real time.
        on_progress: Called with ``(result, sample)`` after every timeline
            sample, and with ``(result, None)`` at the end.
        monitor: A :class:`resilient.health.HealthMonitor` for health probes and
            the UNHEALTHY abort condition (default: none; health is not read).
        services: More names that exist besides policies and named breakers.
        seed: Seed of the injections' random draws (repeatable runs).

    Raises:
        resilient.ChaosRefusedError: A guard refused the run (nothing was done).
        resilient.PolicyError: The experiment names an unknown service or target.
    """
    run = ExperimentRun(
        experiment,
        target=target,
        dry_run=dry_run,
        now=now,
        on_progress=on_progress,
        monitor=monitor,
        services=services,
        seed=seed,
    )
    return await run.execute()

"""
Fault injection: the innermost stage of the pipeline, and its guards.

A pipeline gets a chaos *stage* when it is built (:func:`stage_for`, called by
``Pipeline.__init__``) only if something asks for faults in it: its policy's
``chaos:`` section, or a running :func:`inject`, and only while the guards allow
it (the switch is on, no emergency stop, not production). Otherwise its
``chaos`` attribute is ``None`` and nothing of this module runs on its calls.

With a stage, the pipeline takes its full lane and wraps the function once per
call (:meth:`ChaosStage.wrap_async` / :meth:`ChaosStage.wrap_sync`): inside the
attempt, so the breaker, the retries, the timeouts and health see an injected
fault exactly as a real one. The block forms (``attempts()``) call
:meth:`ChaosStage.enter_sync` / :meth:`ChaosStage.enter_async` when an attempt
is admitted.

Every change of what may inject (``inject()``, ``stop()``, the switch, the
environment, an emergency stop) goes up the runtime's rebuild counter, so every
handle rebuilds its pipeline at its next call; the stage also reads the stop
flag per attempt, so an emergency stop halts injection at once.

This module sits under the call layer (``pipeline.py`` imports it): it imports
leaves and the runtime only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import json
import logging
import os
import random
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from resilient import _clock
from resilient._models import (
    CHAOS_MODES,
    ChaosConfig,
    ChaosDelayConfig,
    ChaosErrorResultConfig,
    ChaosExceptionConfig,
    ChaosTimeoutConfig,
    LatencySpikeConfig,
)
from resilient.attempt import timeout_error
from resilient.errors import (
    AttemptTimeoutError,
    ChaosError,
    ChaosRefusedError,
    ChaosTimeoutError,
    PolicyError,
    did_you_mean,
)
from resilient.events import ChaosInjected, bus
from resilient.runtime import runtime

if TYPE_CHECKING:
    from resilient._models import Policy

__all__ = [
    "ENV_ENABLED",
    "ENV_ENVIRONMENT",
    "FAILURE_MODES",
    "SKIPPED",
    "ChaosStage",
    "CohortStats",
    "Fault",
    "Injection",
    "active_injections",
    "allow",
    "allowed",
    "check_modes",
    "disable",
    "disallow",
    "emergency_stop",
    "enable",
    "enabled",
    "environment",
    "faults_from_config",
    "inject",
    "is_production",
    "is_stopped",
    "known_targets",
    "register_target",
    "resume",
    "set_check_interval",
    "set_environment",
    "stage_for",
    "stop_all",
    "stop_reason",
]

_log = logging.getLogger("resilient.chaos")

ENV_ENABLED = "RESILIENCE_CHAOS_ENGINEERING_ENABLED"
ENV_ENVIRONMENT = "RESILIENCE_ENVIRONMENT"
FAILURE_MODES: tuple[str, ...] = CHAOS_MODES
#: environments in which nothing is injected unless an injection allows production
_PRODUCTION = frozenset({"production", "prod"})
#: how long an injected ``timeout`` hangs when neither a ``hang`` nor a deadline ends it
DEFAULT_HANG = 30.0
#: latencies kept per cohort for the p95 (the most recent ones)
_LATENCY_WINDOW = 10_000


class _Skipped:
    """The marker of an ``error_result`` in a block form: the body is skipped."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIPPED"


#: What ``enter_sync``/``enter_async`` return for an ``error_result``: the attempt
#: succeeded without running the block.
SKIPPED = _Skipped()


# --------------------------------------------------------------------------- faults

_PARAMS: dict[str, type[BaseModel]] = {
    "network_delay": ChaosDelayConfig,
    "latency_spike": LatencySpikeConfig,
    "timeout": ChaosTimeoutConfig,
    "exception": ChaosExceptionConfig,
    "error_result": ChaosErrorResultConfig,
}


def check_modes(names: Iterable[object], *, where: str = "failure_modes") -> tuple[str, ...]:
    """
    The failure mode names *names*, checked.

    Raises:
        PolicyError: A name is not a failure mode (with a did-you-mean), or not a string.
    """
    modes: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in _PARAMS:
            hint = did_you_mean(name, FAILURE_MODES)
            msg = (
                f"{where}: unknown failure mode {name!r}{hint}; "
                f"failure modes: {', '.join(FAILURE_MODES)}"
            )
            raise PolicyError(msg, key=where)
        modes.append(name)
    return tuple(modes)


def _problems(exc: ValidationError) -> str:
    texts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        texts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(texts)


class Fault:
    """
    One kind of fault to inject: a failure mode and its parameters, validated by
    the same models as the ``chaos:`` section of a policy file::

        Fault("network_delay", delay=0.2)
        Fault("latency_spike", distribution="exponential", delay=3)
        Fault("timeout", hang=10)
        Fault("exception", error="ConnectionResetError", message="boom")
        Fault("error_result", value={"status": 503})

    Raises:
        PolicyError: Unknown mode (did-you-mean) or invalid parameters.
    """

    __slots__ = ("config", "mode")

    mode: str
    config: Any

    def __init__(self, mode: str, **params: Any) -> None:
        (mode,) = check_modes([mode], where="fault")
        try:
            config = _PARAMS[mode].model_validate(params)
        except ValidationError as exc:
            msg = f"fault {mode!r}: {_problems(exc)}"
            raise PolicyError(msg, key=mode) from None
        self.mode = mode
        self.config = config

    @classmethod
    def _of_config(cls, mode: str, config: BaseModel | None) -> Fault:
        fault = cls.__new__(cls)
        fault.mode = mode
        fault.config = config if config is not None else _PARAMS[mode]()
        return fault

    @classmethod
    def of(cls, spec: str | Fault | Mapping[str, Any]) -> Fault:
        """A fault from a mode name, a :class:`Fault`, or ``{"mode": ..., **params}``."""
        if isinstance(spec, Fault):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, Mapping):
            params = dict(spec)
            mode = params.pop("mode", None)
            if mode is None:
                msg = f"a fault needs a 'mode' ({', '.join(FAILURE_MODES)}), got {spec!r}"
                raise PolicyError(msg, key="mode")
            return cls(str(mode), **params)
        msg = f"expected a failure mode name, a Fault or a mapping, got {spec!r}"
        raise TypeError(msg)

    def __repr__(self) -> str:
        fields = self.config.model_dump(exclude_defaults=True)
        params = "".join(f", {key}={value!r}" for key, value in fields.items())
        return f"Fault({self.mode!r}{params})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fault) and (self.mode, self.config) == (other.mode, other.config)

    def __hash__(self) -> int:
        return hash((self.mode, self.config))

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``{"mode": ..., **parameters}``."""
        # (mode exception: the class by the name a policy file uses; an error_result
        # value that JSON cannot hold, bytes or a response object, by its repr)
        params = self.config.model_dump()
        return {"mode": self.mode, **{key: _jsonable(value) for key, value in params.items()}}

    def draw_delay(self, rng: random.Random) -> float:
        """A delay in seconds for ``network_delay`` / ``latency_spike`` (0 for the others)."""
        cfg = self.config
        if not isinstance(cfg, ChaosDelayConfig):
            return 0.0
        kind = cfg.distribution
        if kind == "fixed":
            value = cfg.delay
        elif kind == "uniform":
            low = cfg.min if cfg.min is not None else 0.0
            high = cfg.max if cfg.max is not None else max(2 * cfg.delay, low)
            value = rng.uniform(low, high)
        elif kind == "normal":
            spread = cfg.stddev if cfg.stddev is not None else cfg.delay / 4
            value = rng.gauss(cfg.delay, spread)
        else:
            value = rng.expovariate(1.0 / cfg.delay) if cfg.delay > 0 else 0.0
        low = cfg.min if cfg.min is not None else 0.0
        value = max(value, low)
        if cfg.max is not None:
            value = min(value, cfg.max)
        return value


def _jsonable(value: Any) -> Any:
    """*value* if JSON can hold it, else its ``repr``."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def faults_from_config(config: ChaosConfig) -> tuple[Fault, ...]:
    """The faults of a ``chaos:`` section, one per failure mode it lists."""
    return tuple(Fault._of_config(mode, getattr(config, mode)) for mode in config.failure_modes)


def _faults(spec: str | Fault | Mapping[str, Any] | Sequence[Any]) -> tuple[Fault, ...]:
    if isinstance(spec, str | Fault | Mapping):
        return (Fault.of(spec),)
    faults = tuple(Fault.of(item) for item in spec)
    if not faults:
        msg = "inject() needs at least one fault"
        raise PolicyError(msg, key="fault")
    return faults


# --------------------------------------------------------------------------- guards


class _Guards:
    """The process's switch, environment and stop flag (one instance)."""

    __slots__ = (
        "claims",
        "environments",
        "explicit",
        "fleet_stop",
        "interval",
        "reason",
        "reported",
        "stopped",
    )

    def __init__(self) -> None:
        self.explicit: bool | None = None
        self.claims: tuple[object, ...] = ()
        self.environments: tuple[tuple[object, str], ...] = ()
        self.stopped = False
        self.reason: str | None = None
        self.fleet_stop = False  # the stop came from the fleet key
        self.interval = 1.0
        self.reported: set[str] = set()


_guards = _Guards()
_lock = threading.RLock()
_active: list[Injection] = []
_targets: dict[str, None] = {}  # names seen or registered (ordered, bounded)
_MAX_TARGETS = 10_000


def _env_flag() -> bool:
    raw = os.environ.get(ENV_ENABLED)
    if raw is None or not raw.strip():
        return False
    from resilient.policy import parse_env_value

    return bool(parse_env_value(ENV_ENABLED, raw, bool))


def enabled() -> bool:
    """
    Whether chaos may inject in this process: :func:`enable`/:func:`disable` if
    called, else a claim (:func:`allow`: a manager with ``chaos_engineering_enabled``)
    or ``RESILIENCE_CHAOS_ENGINEERING_ENABLED``. Off by default.

    Raises:
        PolicyError: The environment variable is not a boolean.
    """
    if _guards.explicit is not None:
        return _guards.explicit
    return bool(_guards.claims) or _env_flag()


def enable() -> None:
    """Switch chaos on in this process (wins over the environment variable)."""
    with _lock:
        _guards.explicit = True
    runtime.touch()


def disable() -> None:
    """Switch chaos off in this process (even if the environment says on); stops every injection."""
    with _lock:
        _guards.explicit = False
    stop_all("chaos switched off")
    runtime.touch()


def allow(owner: object) -> None:
    """Allow chaos while *owner* (a manager with ``chaos_engineering_enabled``) holds a claim."""
    with _lock:
        if all(claim is not owner for claim in _guards.claims):
            _guards.claims = (*_guards.claims, owner)
    runtime.touch()


def disallow(owner: object) -> None:
    """Drop *owner*'s claim (no error if it has none); the last claim stops every injection."""
    with _lock:
        _guards.claims = tuple(claim for claim in _guards.claims if claim is not owner)
        off = not enabled_quietly()
    if off:
        stop_all("chaos switched off")
    runtime.touch()


@contextlib.contextmanager
def allowed() -> Iterator[None]:
    """
    Allow chaos for the ``with`` block only (a claim, as a manager holds one): when
    the block ends, injections still running are stopped unless something else
    keeps chaos allowed.
    """
    owner = object()
    allow(owner)
    try:
        yield
    finally:
        disallow(owner)


def enabled_quietly() -> bool:
    """:func:`enabled`, with a bad environment variable logged (once) and read as off."""
    try:
        return enabled()
    except PolicyError as exc:
        text = str(exc)
        if text not in _guards.reported:
            _guards.reported.add(text)
            _log.error("chaos stays off: %s", text)
        return False


def set_environment(name: str | None, owner: object | None = None) -> None:
    """
    Say which environment this process runs in (``None``: forget *owner*'s word).
    The newest value wins over ``RESILIENCE_ENVIRONMENT``; a manager passes its
    ``ResilienceConfig.environment`` with itself as *owner*.
    """
    with _lock:
        others = tuple(item for item in _guards.environments if item[0] is not owner)
        _guards.environments = others if name is None else (*others, (owner, name))
    runtime.touch()


def environment() -> str:
    """:func:`set_environment`'s value, else ``RESILIENCE_ENVIRONMENT``, else development."""
    named = _guards.environments
    if named:
        return named[-1][1]
    return os.environ.get(ENV_ENVIRONMENT, "").strip() or "development"


def is_production() -> bool:
    """Whether :func:`environment` is ``production`` (or ``prod``)."""
    return environment().strip().lower() in _PRODUCTION


def register_target(name: str) -> None:
    """Make *name* a known target of :func:`inject` before its first call (manager services)."""
    with _lock:
        _remember(name)


def _remember(name: str) -> None:
    if name not in _targets:
        if len(_targets) >= _MAX_TARGETS:
            _targets.pop(next(iter(_targets)))
        _targets[name] = None


def known_targets() -> list[str]:
    """Policy names of the registry, and every pipeline and function name seen so far."""
    names = set(_targets)
    policies = runtime.registry.contents()[0]  # what is loaded (no discovery here)
    if policies is not None:
        names.update(policies)
    return sorted(names)


# --------------------------------------------------------------------------- emergency stop


def is_stopped() -> bool:
    """Whether an emergency stop is in force in this process (see :func:`resume`)."""
    return _guards.stopped


def stop_reason() -> str | None:
    """The reason given to the emergency stop in force, or ``None``."""
    return _guards.reason if _guards.stopped else None


def emergency_stop(reason: str) -> None:
    """
    Halt every injection in this process at once, and across the fleet when the
    Redis backend is on (other processes see it within one check interval).
    New injections are refused until :func:`resume`.
    """
    _halt(reason, fleet=True)


def _halt(reason: str, *, fleet: bool) -> None:
    with _lock:
        _guards.stopped = True
        _guards.reason = reason
        _guards.fleet_stop = not fleet
        running = list(_active)
    for injection in running:
        injection.stop(f"emergency stop: {reason}")
    runtime.touch()
    _log.warning("chaos emergency stop: %s", reason)
    if fleet:
        _fleet_write(reason)


def resume() -> None:
    """Lift the emergency stop, here and (Redis backend) in the fleet."""
    with _lock:
        _guards.stopped = False
        _guards.reason = None
        _guards.fleet_stop = False
    _fleet_write(None)
    runtime.touch()


def set_check_interval(seconds: float) -> None:
    """Seconds between two reads of the fleet's stop key (default 1.0)."""
    if not seconds > 0:
        msg = f"check interval must be positive, got {seconds!r}"
        raise ValueError(msg)
    _guards.interval = float(seconds)


def _fleet_backend() -> Any:
    """The runtime's backend if it shares a stop flag (Redis), else ``None``."""
    try:
        backend = runtime.backend()
    except Exception:
        _log.exception("chaos: the state backend could not be built")
        return None
    if getattr(backend, "name", "memory") == "memory":
        return None
    return backend if hasattr(backend, "chaos_stopped") else None


def _fleet_write(reason: str | None) -> None:
    backend = _fleet_backend()
    if backend is not None:
        backend.chaos_stop(reason)


def _fleet_check() -> None:
    """inject() time: adopt the fleet's stop (or its lifting) with one read."""
    backend = _fleet_backend()
    if backend is None:
        return
    _adopt(backend.chaos_stopped())


def _adopt(reason: str | None) -> None:
    """Follow the fleet's stop key: stop when it is set, and lift a stop that came
    from it once another replica cleared it (a local stop stays until resume())."""
    if reason is not None and not _guards.stopped:
        _halt(f"fleet: {reason}", fleet=False)
    elif reason is None and _guards.stopped and _guards.fleet_stop:
        with _lock:
            _guards.stopped = False
            _guards.reason = None
            _guards.fleet_stop = False
        runtime.touch()


class _Poller:
    """
    Reads the fleet's stop key every check interval, in a daemon thread that runs
    only while this process injects something (an injection, or a policy stage), or
    while a stop that came from the fleet holds (to see another replica lift it).
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self.stages: weakref.WeakSet[ChaosStage] = weakref.WeakSet()

    def needed(self) -> bool:
        if _guards.stopped:
            return _guards.fleet_stop
        return bool(_active) or len(self.stages) > 0

    def ensure(self) -> None:
        if _fleet_backend() is None:
            return
        with _lock:
            if self.thread is not None and self.thread.is_alive():
                return
            self.thread = threading.Thread(
                target=self.run, name="resilient-chaos-stop", daemon=True
            )
            self.thread.start()

    def run(self) -> None:
        while self.needed():
            self.wake.wait(_guards.interval)
            self.wake.clear()
            if not self.needed():
                break
            backend = _fleet_backend()
            if backend is None:
                break
            try:
                reason = backend.chaos_stopped()
            except Exception:  # never let a backend problem kill the guard silently
                _log.exception("chaos: reading the fleet's stop key failed")
                continue
            _adopt(reason)
        with _lock:
            if self.thread is threading.current_thread():
                self.thread = None


_poller = _Poller()


# --------------------------------------------------------------------------- cohorts


class CohortStats:
    """Calls of one cohort (treated or control) of an :class:`Injection`, as callers saw them."""

    __slots__ = ("_latencies", "_lock", "_next", "calls", "failures", "fallbacks", "successes")

    def __init__(self) -> None:
        self.calls = 0
        self.successes = 0
        self.failures = 0
        self.fallbacks = 0
        self._latencies: list[float] = []
        self._next = 0
        self._lock = threading.Lock()

    def add(self, outcome: str, duration: float) -> None:
        with self._lock:
            self.calls += 1
            if outcome == "success":
                self.successes += 1
            elif outcome == "fallback":
                self.fallbacks += 1
            else:
                self.failures += 1
            if len(self._latencies) < _LATENCY_WINDOW:
                self._latencies.append(duration)
            else:  # a ring of the most recent ones
                self._latencies[self._next] = duration
                self._next = (self._next + 1) % _LATENCY_WINDOW

    @property
    def success_rate(self) -> float:
        """Share of calls that succeeded (1.0 with no calls)."""
        return self.successes / self.calls if self.calls else 1.0

    @property
    def served_rate(self) -> float:
        """Share of calls that returned a value, their own or a fallback (1.0 with no calls)."""
        return (self.successes + self.fallbacks) / self.calls if self.calls else 1.0

    def _sorted(self) -> list[float]:
        with self._lock:
            return sorted(self._latencies)

    @property
    def p95_latency(self) -> float | None:
        """95th percentile of the call durations in seconds (``None`` with no calls)."""
        values = self._sorted()
        if not values:
            return None
        return values[min(len(values) - 1, max(0, -(-95 * len(values) // 100) - 1))]

    @property
    def mean_latency(self) -> float | None:
        """Mean call duration in seconds (``None`` with no calls)."""
        values = self._sorted()
        return sum(values) / len(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "calls": self.calls,
            "successes": self.successes,
            "failures": self.failures,
            "fallbacks": self.fallbacks,
            "success_rate": self.success_rate,
            "served_rate": self.served_rate,
            "p95_latency": self.p95_latency,
            "mean_latency": self.mean_latency,
        }

    def __repr__(self) -> str:
        return f"<CohortStats calls={self.calls} success_rate={self.success_rate:.3f}>"


# --------------------------------------------------------------------------- sources


class _Source:
    """Something that asks for faults in a pipeline: an injection or a policy section."""

    experiment: str | None = None
    tracks = False  # keeps per-cohort call statistics

    def assign(self) -> bool:
        """Whether a new call is in the treated cohort."""
        return True

    def pick(self, treated: bool) -> Fault | None:
        raise NotImplementedError

    def draw(self) -> random.Random:
        raise NotImplementedError


class _PolicySource(_Source):
    """A policy's ``chaos:`` section, at the rate of this function."""

    __slots__ = ("faults", "rate", "rng")

    def __init__(self, config: ChaosConfig, callable_name: str) -> None:
        self.faults = faults_from_config(config)
        rate = config.rate
        last = callable_name.rpartition(".")[2]
        for key, value in config.operations:
            if key in (callable_name, last):
                rate = value
        self.rate = rate
        self.rng = random.Random()

    def pick(self, treated: bool) -> Fault | None:
        rate = self.rate
        if rate <= 0 or (rate < 1 and self.rng.random() >= rate):
            return None
        faults = self.faults
        return faults[0] if len(faults) == 1 else self.rng.choice(faults)

    def draw(self) -> random.Random:
        return self.rng


class Injection(_Source):
    """
    A running injection (made by :func:`inject`): which faults go into which
    target, how often, within which caps; and what happened.

    ``rate`` may be changed while it runs (a ramp). ``stop()`` ends it (idempotent);
    ``with inject(...) as injection:`` stops it when the block ends.
    """

    def __init__(
        self,
        target: str,
        faults: tuple[Fault, ...],
        *,
        rate: float,
        cohort: float | None,
        max_faults: int | None,
        max_share: float | None,
        first: int | None,
        every: int | None,
        calls: frozenset[int] | None,
        allow_production: bool,
        experiment: str | None,
        seed: int | None,
    ) -> None:
        self.target = target
        self.fault_kinds = faults
        self._rate = rate
        self.cohort = cohort
        self.max_faults = max_faults
        self.max_share = max_share
        self.first = first
        self.every = every
        self.calls = calls
        self.allow_production = allow_production
        self.experiment = experiment
        self.tracks = True
        self.rng = random.Random(seed)
        self.active = True
        self.stop_reason: str | None = None
        self.capped: str | None = None
        self.faults = 0
        self.attempts = 0
        self.by_mode: dict[str, int] = {}
        self.treated = CohortStats()
        self.control = CohortStats()
        self._seen = itertools.count(1)
        self._count_lock = threading.Lock()
        self._deterministic = first is not None or every is not None or calls is not None

    def __repr__(self) -> str:
        state = "active" if self.active else f"stopped ({self.stop_reason})"
        modes = ", ".join(f.mode for f in self.fault_kinds)
        return f"<Injection {modes} into {self.target!r} {state}: {self.faults} faults>"

    # ---- settings

    @property
    def rate(self) -> float:
        """Share of treated attempts that get a fault (0 to 1); may be changed while it runs."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        self._rate = _intensity(value, "rate")

    # ---- the stage's side

    def assign(self) -> bool:
        cohort = self.cohort
        return cohort is None or self.rng.random() < cohort

    def pick(self, treated: bool) -> Fault | None:
        if not self.active or not treated:
            return None
        number = next(self._seen)
        self.attempts = number
        if self._deterministic:
            if self.first is not None:
                hit = number <= self.first
            elif self.every is not None:
                hit = number % self.every == 0
            else:
                hit = self.calls is not None and number in self.calls
        else:
            rate = self._rate
            hit = rate >= 1 or (rate > 0 and self.rng.random() < rate)
        if not hit:
            return None
        with self._count_lock:
            if self.max_faults is not None and self.faults >= self.max_faults:
                self.capped = f"max_faults={self.max_faults} reached"
                return None
            if self.max_share is not None and self.faults + 1 > self.max_share * number:
                self.capped = f"max_share={self.max_share} reached"
                return None
            self.faults += 1
            kinds = self.fault_kinds
            fault = kinds[0] if len(kinds) == 1 else self.rng.choice(kinds)
            self.by_mode[fault.mode] = self.by_mode.get(fault.mode, 0) + 1
        return fault

    def draw(self) -> random.Random:
        return self.rng

    def record(self, treated: bool, outcome: str, duration: float) -> None:
        (self.treated if treated else self.control).add(outcome, duration)

    # ---- control

    def stop(self, reason: str = "stopped") -> None:
        """End the injection (idempotent): pipelines rebuild without it at their next call."""
        with _lock:
            if not self.active:
                return
            self.active = False
            self.stop_reason = reason
            if self in _active:
                _active.remove(self)
        runtime.touch()

    def __enter__(self) -> Injection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop("stopped" if exc is None else f"stopped by {type(exc).__name__}")

    def diverged(
        self,
        *,
        success_rate: float | None = None,
        p95_latency: float | None = None,
        min_calls: int = 20,
    ) -> str | None:
        """
        Whether the treated cohort's KPIs diverged from the control's past a bound:
        *success_rate* is the largest allowed drop of the success rate (e.g. 0.05),
        *p95_latency* the largest allowed rise of the p95 in seconds. ``None`` while
        either cohort has fewer than *min_calls* calls, or when nothing diverged;
        else a sentence saying what diverged.
        """
        treated, control = self.treated, self.control
        if treated.calls < min_calls or control.calls < min_calls:
            return None
        if success_rate is not None:
            drop = control.success_rate - treated.success_rate
            if drop > success_rate:
                return (
                    f"success rate {treated.success_rate:.3f} (treated) vs "
                    f"{control.success_rate:.3f} (control): a drop of {drop:.3f} > {success_rate}"
                )
        if p95_latency is not None:
            t95, c95 = treated.p95_latency, control.p95_latency
            if t95 is not None and c95 is not None and t95 - c95 > p95_latency:
                return (
                    f"p95 latency {t95:.3f}s (treated) vs {c95:.3f}s (control): "
                    f"a rise of {t95 - c95:.3f}s > {p95_latency}s"
                )
        return None

    def snapshot(self) -> dict[str, Any]:
        """Everything about the injection, JSON-serialisable."""
        return {
            "target": self.target,
            "faults_spec": [fault.as_dict() for fault in self.fault_kinds],
            "experiment": self.experiment,
            "rate": self._rate,
            "cohort": self.cohort,
            "max_faults": self.max_faults,
            "max_share": self.max_share,
            "first": self.first,
            "every": self.every,
            "calls": sorted(self.calls) if self.calls is not None else None,
            "active": self.active,
            "stop_reason": self.stop_reason,
            "capped": self.capped,
            "faults": self.faults,
            "attempts": self.attempts,
            "by_mode": dict(self.by_mode),
            "treated": self.treated.as_dict(),
            "control": self.control.as_dict(),
        }


def _intensity(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        msg = f"{what} must be a number from 0 to 1, got {value!r}"
        raise PolicyError(msg, key=what)
    return float(value)


def _count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{what} must be a whole number of at least 1, got {value!r}"
        raise PolicyError(msg, key=what)
    return value


def inject(
    target: str,
    fault: str | Fault | Mapping[str, Any] | Sequence[str | Fault | Mapping[str, Any]],
    *,
    rate: float | None = None,
    cohort: float | None = None,
    max_faults: int | None = None,
    max_share: float | None = None,
    first: int | None = None,
    every: int | None = None,
    calls: Iterable[int] | None = None,
    allow_production: bool = False,
    experiment: str | None = None,
    seed: int | None = None,
    strict: bool = True,
) -> Injection:
    """
    Inject *fault* into the attempts of *target* (a policy name, a ``name=`` key, a
    manager service, or a function's qualified name) until the injection is stopped.

    Args:
        fault: A failure mode name, a :class:`Fault`, or several (one is drawn per
            injected attempt).
        rate: Share of treated attempts that get a fault (default 1.0).
        cohort: Share of *calls* in the treated cohort; the rest is the control and
            never gets a fault. ``None``: every call is treated.
        max_faults: Inject at most this many faults.
        max_share: Never let faults exceed this share of the attempts seen.
        first: Fault exactly attempts 1 to *first* (deterministic).
        every: Fault every *every*-th attempt (deterministic).
        calls: Fault exactly these attempt numbers, counted from 1 (deterministic).
        allow_production: Inject even when the environment is production.
        experiment: Name put on the ``ChaosInjected`` events.
        seed: Seed of the draws (rate, cohort, which fault).
        strict: Refuse a target that is neither a policy nor a name seen so far.

    Raises:
        ChaosRefusedError: Chaos is switched off, stopped, the environment is
            production, or the target is unknown.
        PolicyError: Invalid faults or settings.
    """
    faults = _faults(fault)
    given = (("first", first), ("every", every), ("calls", calls))
    deterministic = [name for name, value in given if value is not None]
    if len(deterministic) > 1:
        msg = f"give at most one of first, every and calls (got {', '.join(deterministic)})"
        raise PolicyError(msg, key=deterministic[1])
    if deterministic and rate is not None:
        msg = f"{deterministic[0]} chooses the faulted attempts: leave rate out"
        raise PolicyError(msg, key="rate")
    chosen: frozenset[int] | None = None
    if calls is not None:
        chosen = frozenset(calls)
        for number in chosen:
            _count(number, "calls")
    injection = Injection(
        target,
        faults,
        rate=_intensity(1.0 if rate is None else rate, "rate"),
        cohort=None if cohort is None else _intensity(cohort, "cohort"),
        max_faults=_count(max_faults, "max_faults"),
        max_share=None if max_share is None else _intensity(max_share, "max_share"),
        first=_count(first, "first"),
        every=_count(every, "every"),
        calls=chosen,
        allow_production=allow_production,
        experiment=experiment,
        seed=seed,
    )
    if not enabled():
        msg = (
            f"chaos injection into {target!r} refused: chaos is switched off "
            f"(resilient.chaos.enable(), {ENV_ENABLED}=true, or a manager with "
            "chaos_engineering_enabled=True)"
        )
        raise ChaosRefusedError(msg, reason="disabled", policy=target)
    _fleet_check()
    if _guards.stopped:
        msg = (
            f"chaos injection into {target!r} refused: emergency stop in force "
            f"({_guards.reason}); resilient.chaos.resume() lifts it"
        )
        raise ChaosRefusedError(msg, reason="stopped", policy=target)
    if is_production() and not allow_production:
        msg = (
            f"chaos injection into {target!r} refused: the environment is {environment()!r}; "
            "pass allow_production=True (allow_production: true in an experiment) to inject there"
        )
        raise ChaosRefusedError(msg, reason="production", policy=target)
    if strict:
        known = known_targets()
        if target not in known:
            hint = did_you_mean(target, known)
            shown = ", ".join(repr(n) for n in known[:20]) or "(none)"
            msg = (
                f"chaos injection refused: unknown target {target!r}{hint}; known policies "
                f"and functions: {shown} (strict=False injects into a name not seen yet)"
            )
            raise ChaosRefusedError(msg, reason="unknown_target", policy=target)
    with _lock:
        _active.append(injection)
    _ensure_observer()
    runtime.touch()
    _poller.ensure()
    return injection


def active_injections() -> tuple[Injection, ...]:
    """The injections running now."""
    with _lock:
        return tuple(_active)


def stop_all(reason: str = "stopped") -> None:
    """Stop every running injection (no stop flag: new ones may start)."""
    for injection in active_injections():
        injection.stop(reason)


# --------------------------------------------------------------------------- the stage

#: (stage, treated flags, start on the clock seam) of the call in progress in this
#: task or thread: the call observer puts the call in its cohorts with it
_Call = tuple["ChaosStage", tuple[bool, ...], float]
_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "resilient_chaos_call", default=None
)


class ChaosStage:
    """
    The chaos of one pipeline: the sources that ask for faults in it, chosen when
    the pipeline was built. Per attempt: the stop flag, then each source's draw.
    """

    __slots__ = (
        "__weakref__",
        "callable_name",
        "everyone",
        "name",
        "per_attempt",
        "sources",
        "timeout_error",
        "total",
        "total_error",
        "tracks",
    )

    def __init__(
        self,
        name: str,
        callable_name: str,
        sources: tuple[_Source, ...],
        per_attempt: float | None,
        timeout_error: Callable[[], AttemptTimeoutError],
        total: float | None = None,
        total_error: Callable[[], AttemptTimeoutError] | None = None,
    ) -> None:
        self.name = name
        self.callable_name = callable_name
        self.sources = sources
        self.per_attempt = per_attempt
        self.timeout_error = timeout_error
        #: the call's total budget: a sync hang never outlives what is left of it
        self.total = total
        self.total_error = total_error
        self.tracks = any(source.tracks for source in sources)
        #: the cohorts of a call when no source has a control group
        self.everyone = (True,) * len(sources)

    def __repr__(self) -> str:
        return f"<ChaosStage {self.name!r}: {len(self.sources)} source(s)>"

    # ---- per call

    def begin(self) -> tuple[bool, ...]:
        """Start a call: its cohort in each source, remembered for the call observer."""
        if not self.tracks:  # a policy section alone: nothing to count per cohort
            return self.everyone
        treated = tuple([source.assign() for source in self.sources])
        _CALL.set((self, treated, _clock.monotonic()))
        return treated

    def choose(self, treated: tuple[bool, ...]) -> tuple[Fault, _Source] | None:
        """The fault for one attempt, or ``None``."""
        if _guards.stopped:
            return None
        for index, source in enumerate(self.sources):
            fault = source.pick(treated[index])
            if fault is not None:
                self._announce(fault, source)
                return fault, source
        return None

    def _announce(self, fault: Fault, source: _Source) -> None:
        if bus.active:
            bus.emit(ChaosInjected(self.name, self.callable_name, fault.mode, source.experiment))

    def _error(self, fault: Fault, source: _Source) -> Exception:
        cfg: ChaosExceptionConfig = fault.config
        kind = cfg.error
        error: Exception
        if issubclass(kind, ChaosError):
            error = kind(cfg.message, policy=self.name, fault="exception")
        else:
            error = kind(cfg.message)  # type: ignore[assignment]
        _note(error, self, source)
        return error

    def _hang(
        self, fault: Fault, started: float
    ) -> tuple[float, Callable[[], AttemptTimeoutError] | None]:
        """Seconds a sync ``timeout`` hangs, and the error of the deadline that ends it
        (``None``: the configured hang ends first). *started*: when the call began
        (``-1`` when unknown), for what is left of its total budget."""
        hang = fault.config.hang
        seconds = hang if hang is not None else DEFAULT_HANG
        ends: Callable[[], AttemptTimeoutError] | None = None
        per = self.per_attempt
        if per is not None and per <= seconds:
            seconds, ends = per, self.timeout_error
        if self.total is not None and started >= 0:
            left = max(0.0, self.total - (_clock.monotonic() - started))
            if left < seconds:
                seconds, ends = left, self.total_error
        return seconds, ends

    def _hung(self, fault: Fault, source: _Source, seconds: float) -> ChaosTimeoutError:
        error = ChaosTimeoutError(
            f"injected timeout: the attempt hung for {seconds:g}s",
            policy=self.name,
            fault="timeout",
        )
        _note(error, self, source)
        return error

    def wrap_async(self, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """*fn* with faults injected per attempt (made once per call)."""
        treated = self.begin()
        call = _CALL.get() if self.tracks else None

        async def chaotic(*args: Any, **kwargs: Any) -> Any:
            picked = self.choose(treated)
            try:
                if picked is None:
                    return await fn(*args, **kwargs)
                fault, source = picked
                mode = fault.mode
                if mode == "exception":
                    raise self._error(fault, source)
                if mode == "error_result":
                    return fault.config.value
                if mode == "timeout":
                    hang = fault.config.hang
                    seconds = hang if hang is not None else DEFAULT_HANG
                    # the per-attempt (or total) deadline cancels this first when shorter
                    await _clock.asleep(seconds)
                    raise self._hung(fault, source, seconds)
                await _clock.asleep(fault.draw_delay(source.draw()))
                return await fn(*args, **kwargs)
            finally:
                if call is not None:  # a nested chaotic call may have set another
                    _CALL.set(call)

        return chaotic

    def wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """*fn* with faults injected per attempt (made once per call)."""
        treated = self.begin()
        call = _CALL.get() if self.tracks else None
        started = _clock.monotonic() if self.total is not None else -1.0

        def chaotic(*args: Any, **kwargs: Any) -> Any:
            picked = self.choose(treated)
            try:
                if picked is None:
                    return fn(*args, **kwargs)
                fault, source = picked
                mode = fault.mode
                if mode == "exception":
                    raise self._error(fault, source)
                if mode == "error_result":
                    return fault.config.value
                if mode == "timeout":
                    raise self._sync_timeout(fault, source, started)
                _clock.sleep(fault.draw_delay(source.draw()))
                return fn(*args, **kwargs)
            finally:
                if call is not None:
                    _CALL.set(call)

        return chaotic

    def _sync_timeout(self, fault: Fault, source: _Source, started: float) -> Exception:
        # Sync code cannot be interrupted: the attempt sleeps as long as it would
        # hang, and ends as a sync attempt in the thread-pool bulkhead does.
        seconds, deadline = self._hang(fault, started)
        _clock.sleep(seconds)
        if deadline is not None:
            return deadline()
        return self._hung(fault, source, seconds)

    # ---- block forms (attempts(), the manager's resilient_call)

    def enter_sync(
        self, treated: tuple[bool, ...], started: float = -1.0
    ) -> BaseException | _Skipped | None:
        """
        An admitted attempt of a block form begins: ``None`` to run the block (after
        any injected delay), an exception the attempt ends with (settle it as the
        block's outcome), or :data:`SKIPPED` (``error_result``: it succeeded without
        running the block). *started*: when the call began (its total budget bounds
        an injected hang).
        """
        picked = self.choose(treated)
        if picked is None:
            return None
        fault, source = picked
        mode = fault.mode
        if mode == "exception":
            return self._error(fault, source)
        if mode == "error_result":
            return SKIPPED
        if mode == "timeout":
            return self._sync_timeout(fault, source, started)
        _clock.sleep(fault.draw_delay(source.draw()))
        return None

    async def enter_async(self, treated: tuple[bool, ...]) -> BaseException | _Skipped | None:
        """:meth:`enter_sync` for ``async for``: a deadline armed on the task may cancel
        the hang or the delay (the ``CancelledError`` propagates: settle it)."""
        picked = self.choose(treated)
        if picked is None:
            return None
        fault, source = picked
        mode = fault.mode
        if mode == "exception":
            return self._error(fault, source)
        if mode == "error_result":
            return SKIPPED
        if mode == "timeout":
            hang = fault.config.hang
            seconds = hang if hang is not None else DEFAULT_HANG
            await _clock.asleep(seconds)
            return self._hung(fault, source, seconds)
        await _clock.asleep(fault.draw_delay(source.draw()))
        return None


def _note(error: BaseException, stage: ChaosStage, source: _Source) -> None:
    where = f" (experiment {source.experiment!r})" if source.experiment else ""
    error.add_note(f"resilient: injected by chaos into policy {stage.name!r}{where}")


def stage_for(pipeline: Any) -> ChaosStage | None:
    """
    The chaos stage of a pipeline being built, or ``None`` (the common case:
    nothing asks for faults, or the guards forbid them). Never raises: a bad
    setting is logged and means no chaos.
    """
    name: str = pipeline.name
    callable_name: str = pipeline.callable_name
    policy: Policy = pipeline.policy
    config = policy.chaos
    with _lock:
        _remember(name)
        _remember(callable_name)
        running = [i for i in _active if i.target == name or i.target == callable_name]
    if (config is None and not running) or _guards.stopped or not enabled_quietly():
        return None
    production = is_production()
    sources: list[_Source] = [i for i in running if i.allow_production or not production]
    if config is not None and not production:
        sources.append(_PolicySource(config, callable_name))
    if not sources:
        return None
    total: float | None = pipeline.total
    stage = ChaosStage(
        name,
        callable_name,
        tuple(sources),
        pipeline.per_attempt,
        pipeline.attempt_timeout,
        total,
        functools.partial(timeout_error, pipeline, "total") if total is not None else None,
    )
    if config is not None:
        _poller.stages.add(stage)
        _poller.ensure()
    return stage


# --------------------------------------------------------------------------- call observer


class _CohortObserver:
    """Counts each call of a chaos pipeline in the cohort it was in, per injection."""

    __slots__ = ("stage",)

    def __init__(self, stage: ChaosStage) -> None:
        self.stage = stage

    def record(self, outcome: str, duration: float) -> None:
        current = _CALL.get()
        if current is None or current[0] is not self.stage:
            return  # not a call this stage began (cannot happen through the pipeline)
        # on the clock seam, so that injected delays count under a virtual clock too
        took = _clock.monotonic() - current[2]
        for source, treated in zip(self.stage.sources, current[1], strict=True):
            if isinstance(source, Injection):
                source.record(treated, outcome, took)


def _observer_for(pipeline: Any) -> _CohortObserver | None:
    stage = getattr(pipeline, "chaos", None)
    if stage is None or not stage.tracks:
        return None
    return _CohortObserver(stage)


def _ensure_observer() -> None:
    if all(key != "chaos" for key, _factory in runtime.observers):
        runtime.add_observer_factory("chaos", _observer_for)


def _reset_for_tests() -> None:
    """Back to the defaults (the test suite's isolation): no switch, no stop, no injections."""
    stop_all("reset")
    with _lock:
        _guards.explicit = None
        _guards.claims = ()
        _guards.environments = ()
        _guards.stopped = False
        _guards.reason = None
        _guards.fleet_stop = False
        _guards.interval = 1.0
        _targets.clear()
    runtime.touch()


# The runtime sets this state aside and puts it back with the rest (runtime.snapshot() /
# restore(): the testing kit's isolated_registry and the pytest plugin), so a test that
# switches chaos on or starts an injection cannot leak it into the next one.
_SAVED_GUARDS = (
    "explicit",
    "claims",
    "environments",
    "stopped",
    "reason",
    "fleet_stop",
    "interval",
)


def _save_state() -> tuple[tuple[Any, ...], tuple[Injection, ...], dict[str, None]]:
    with _lock:
        guards = tuple(getattr(_guards, field) for field in _SAVED_GUARDS)
        return guards, tuple(_active), dict(_targets)


def _put_back(state: tuple[tuple[Any, ...], tuple[Injection, ...], dict[str, None]]) -> None:
    guards, active, targets = state
    for injection in active_injections():
        if injection not in active:
            injection.stop("restored")
    with _lock:
        for field, value in zip(_SAVED_GUARDS, guards, strict=True):
            setattr(_guards, field, value)
        _targets.clear()
        _targets.update(targets)
    runtime.touch()


runtime.add_state("chaos", _save_state, _put_back)

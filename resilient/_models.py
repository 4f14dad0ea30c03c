"""
Pydantic models of a policy: validation at the boundary only.

The models are frozen and forbid unknown keys. They are compiled once into the
plain runtime objects of :mod:`resilient.pipeline`; the call path never touches
pydantic.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Mapping
from enum import Enum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, SkipJsonSchema

from resilient.errors import did_you_mean

__all__ = [
    "MAX_COUNT",
    "MAX_COUNT_WINDOW",
    "MAX_SECONDS",
    "PRIORITIES",
    "TRANSIENT_ERRORS",
    "AdaptiveConfig",
    "BulkheadConfig",
    "ChaosConfig",
    "CircuitBreakerConfig",
    "FallbackConfig",
    "HealthCheckConfig",
    "HedgeConfig",
    "HttpConfig",
    "Policy",
    "RateLimitConfig",
    "RetryBudgetConfig",
    "RetryConfig",
    "RetryStrategy",
    "TimeoutConfig",
    "policy_file_schema",
    "resolve_exception",
    "transient_errors",
]

#: What ``retry_on`` defaults to: errors that usually go away by themselves.
#: The default also holds the transport errors of the HTTP clients that are
#: installed (see :func:`transient_errors`).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)

#: Transient errors of optional libraries, by dotted name: they do not inherit
#: from ``ConnectionError``/``OSError``, so the builtin set misses them. Resolved
#: when a policy is built, never at ``import resilient``.
OPTIONAL_TRANSIENT_ERRORS: tuple[str, ...] = (
    "httpx.TransportError",
    "httpx.TimeoutException",
    "aiohttp.ClientConnectionError",
)

#: Longest duration any setting accepts, in seconds (30 days). It keeps every
#: duration below what the platform's thread waits accept (``threading.TIMEOUT_MAX``
#: is about 49 days on Windows), so no value that validates overflows at a call.
MAX_SECONDS = 30 * 24 * 3600
#: Largest count any setting accepts (attempts, thresholds, pool sizes...).
MAX_COUNT = 1_000_000_000
#: Largest ``failure_rate_window`` with ``window_type: count``: the window keeps
#: one slot per call.
MAX_COUNT_WINDOW = 100_000


@functools.cache
def transient_errors() -> tuple[type[BaseException], ...]:
    """
    The default of ``retry_on``: :data:`TRANSIENT_ERRORS`, plus httpx's
    ``TransportError`` and ``TimeoutException`` and aiohttp's
    ``ClientConnectionError`` for those of the libraries that are installed.

    Imports those libraries on the first call (when the first policy with a
    retry section is built), never at ``import resilient``.
    """
    found: list[type[BaseException]] = []
    for dotted in OPTIONAL_TRANSIENT_ERRORS:
        module_name, _, attr = dotted.rpartition(".")
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
            cls = getattr(importlib.import_module(module_name), attr, None)
        except Exception:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return TRANSIENT_ERRORS + tuple(found)


_NAME_HELP = "give a builtin or resilient exception name, or a dotted path such as 'pkg.mod.Error'"


def _library_exception_names() -> list[str]:
    from resilient import errors

    names = [n for n in dir(builtins) if isinstance(getattr(builtins, n), type)]
    names = [n for n in names if issubclass(getattr(builtins, n), BaseException)]
    return [*names, *errors.__all__, *OPTIONAL_TRANSIENT_ERRORS]


def resolve_exception(spec: object) -> type[BaseException]:
    """
    Turn ``"ConnectionError"``, ``"builtins.ConnectionError"``, ``"CircuitOpenError"``
    or ``"pkg.mod.Error"`` (or a class) into an exception class.

    Raises:
        ValueError: The name is malformed, its module is not installed or does
            not have it, or it is not an exception class; the message says which,
            with a did-you-mean where one is close.
    """
    if isinstance(spec, type) and issubclass(spec, BaseException):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        msg = f"expected an exception class or its dotted name, got {spec!r}"
        raise ValueError(msg)
    name = spec.strip()
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        msg = f"{name!r} is not a valid exception name; {_NAME_HELP}"
        raise ValueError(msg)
    obj: object = None
    if len(parts) == 1:
        obj = getattr(builtins, name, None)
        if obj is None:
            from resilient import errors

            obj = getattr(errors, name, None) if name in errors.__all__ else None
        if obj is None:
            hint = did_you_mean(name, _library_exception_names())
            msg = f"unknown exception {name!r}{hint}; {_NAME_HELP}"
            raise ValueError(msg)
    else:
        obj = _import_dotted(name, parts)
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        msg = f"{name!r} is not an exception class"
        raise ValueError(msg)
    return obj


def _import_dotted(name: str, parts: list[str]) -> object:
    """Import the longest module prefix of *parts*, then follow the attributes."""
    missing: str | None = None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            gone = exc.name or module_name
            if module_name == gone or module_name.startswith(gone + "."):
                missing = missing or gone  # the module itself (or a parent) is not there
                continue
            msg = f"{name!r}: importing module {module_name!r} failed: {exc}"
            raise ValueError(msg) from None
        except Exception as exc:
            msg = f"{name!r}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
            raise ValueError(msg) from None
        obj: object = module
        for depth, attr in enumerate(parts[split:], start=split):
            found = getattr(obj, attr, None)
            if found is None:
                if missing is not None:
                    break  # e.g. pkg.missing_sub.Error: say the module is missing
                owner = ".".join(parts[:depth])
                options = [n for n in dir(obj) if not n.startswith("_")]
                hint = did_you_mean(attr, options)
                msg = f"unknown exception {name!r}: {owner!r} has no attribute {attr!r}{hint}"
                raise ValueError(msg)
            obj = found
        else:
            return obj
        break
    assert missing is not None
    if "." in missing:
        msg = f"unknown exception {name!r}: there is no module {missing!r}"
    else:
        msg = f"unknown exception {name!r}: module {missing!r} is not installed"
    raise ValueError(msg)


def _exception_list(value: object) -> object:
    if value is None:
        return ()
    if isinstance(value, str | type):
        return (value,)
    if not isinstance(value, list | tuple | set | frozenset):
        msg = "expected a list of exception names"
        raise ValueError(msg)
    return tuple(value)


def _exception_name(exc: type[BaseException]) -> str:
    if exc.__module__ == "builtins":
        return exc.__qualname__
    return f"{exc.__module__}.{exc.__qualname__}"


# Each name is validated on its own, so a list with several bad names reports
# every one of them, each at its own line.
ExceptionType = Annotated[type[BaseException], BeforeValidator(resolve_exception)]

ExceptionTypes = Annotated[
    tuple[ExceptionType, ...],
    BeforeValidator(_exception_list),
    PlainSerializer(lambda v: [_exception_name(e) for e in v], return_type=list[str]),
    WithJsonSchema(
        {
            "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
            "description": "Exception classes by name: 'ConnectionError', a resilient "
            "error such as 'CircuitOpenError', or a dotted path 'pkg.module.Error'; "
            "one name or a list.",
        }
    ),
]


def _number(value: object) -> object:
    # pydantic's lax mode reads true as 1 and false as 0; in YAML an unquoted
    # yes/no/on/off is a boolean, so `max_attempts: yes` would silently become 1.
    if isinstance(value, bool):
        msg = (
            f"expected a number, got the boolean {str(value).lower()} "
            "(in YAML, unquoted yes/no/on/off/true/false are booleans)"
        )
        raise ValueError(msg)
    return value


_Num = BeforeValidator(_number)
PositiveFloat = Annotated[float, _Num, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, _Num, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
PositiveInt = Annotated[int, _Num, Field(gt=0, le=MAX_COUNT)]
NonNegativeInt = Annotated[int, _Num, Field(ge=0, le=MAX_COUNT)]
Fraction = Annotated[float, _Num, Field(gt=0, le=1, allow_inf_nan=False)]
Share = Annotated[float, _Num, Field(ge=0, lt=1, allow_inf_nan=False)]
Factor = Annotated[float, _Num, Field(gt=0, le=1000, allow_inf_nan=False)]
Growth = Annotated[float, _Num, Field(ge=1, le=1000, allow_inf_nan=False)]
PositiveAmount = Annotated[float, _Num, Field(gt=0, le=MAX_COUNT, allow_inf_nan=False)]
NonNegativeAmount = Annotated[float, _Num, Field(ge=0, le=MAX_COUNT, allow_inf_nan=False)]
# PositiveFloat & co. are durations in seconds (hence the MAX_SECONDS bound); the
# amounts (rates, tokens) and factors have bounds of their own.


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_default=True,
        arbitrary_types_allowed=True,
        use_attribute_docstrings=True,
    )


class RetryStrategy(StrEnum):
    """How the delay between attempts grows."""

    EXPONENTIAL_BACKOFF = "exponential_backoff"
    """``base_delay * multiplier ** (n - 1)``"""
    LINEAR = "linear"
    """``base_delay * n``"""
    FIBONACCI = "fibonacci"
    """``base_delay * fib(n)``: 1, 1, 2, 3, 5, 8 ... times ``base_delay``"""
    CONSTANT = "constant"
    """``base_delay`` every time"""
    ADAPTIVE = "adaptive"
    """Exponential backoff stretched by the policy's recent failure rate *r*:
    ``base_delay * multiplier ** (n - 1) / (1 - min(r, 0.9))``."""

    @classmethod
    def _missing_(cls, value: object) -> RetryStrategy | None:
        if isinstance(value, str):
            lowered = value.strip().lower().replace("-", "_")
            for member in cls:
                if member.value == lowered or member.name.lower() == lowered:
                    return member
        return None


JitterKind = Literal["none", "full", "equal", "decorrelated"]


def _jitter(value: object) -> object:
    return False if value is None else value


#: ``max_open_duration`` when neither it nor a longer ``timeout_seconds`` is given.
_DEFAULT_MAX_OPEN = 600.0


def _one_of(*options: str) -> BeforeValidator:
    """A value that must be one of *options*; a misspelling gets a did-you-mean."""

    def check(value: object) -> object:
        if isinstance(value, str) and value not in options:
            hint = did_you_mean(value, options)
            msg = f"{value!r} is not one of {', '.join(options)}{hint}"
            raise ValueError(msg)
        return value

    return BeforeValidator(check)


class AdaptiveConfig(_Model):
    """
    The ``circuit_breaker.adaptive`` block: how the adaptive breaker (``type: adaptive``)
    predicts and acts. The basic breaker ignores it.
    """

    mode: Annotated[
        Literal["shadow", "active", "throttle"], _one_of("shadow", "active", "throttle")
    ] = "shadow"
    """``shadow``: predict and report, never act; ``active``: act on the prediction;
    ``throttle``: Google SRE client-side adaptive throttling (no model)."""
    action: Annotated[Literal["open", "shed"], _one_of("open", "shed")] = "open"
    """What ``active`` does above ``prediction_threshold``: ``open`` opens the breaker
    early (a normal trip, then the usual half-open); ``shed`` refuses a share of the calls
    that grows with the predicted risk. docs/adaptive.md measures both."""
    max_shed: Fraction = 0.9
    """The largest share of calls that ``shed`` refuses (at a predicted risk of 1)."""
    bucket_seconds: Annotated[float, _Num, Field(ge=0.05, le=3600, allow_inf_nan=False)] = 1.0
    """Width of one time bucket: features are computed, and the model asked, once per bucket."""
    horizon_seconds: PositiveFloat = 5.0
    """The label of a bucket: whether the service fails within this many seconds after it."""
    min_samples: PositiveInt = 300
    """Buckets the model must have been trained on before it may predict; below that
    the adaptive breaker is exactly the basic breaker."""
    retrain_seconds: PositiveFloat = 300.0
    """How often the model is retrained (in a background thread) from the process's history."""
    history_buckets: Annotated[int, _Num, Field(ge=10, le=1_000_000)] = 20_000
    """Most buckets of history kept for training (the oldest are dropped)."""
    model_path: str | None = None
    """A model saved with joblib (``resilient.adaptive.save_model``) to start from."""
    n_estimators: Annotated[int, _Num, Field(ge=1, le=1000)] = 30
    """Trees in the random forest."""
    k: Annotated[float, _Num, Field(ge=1, le=100, allow_inf_nan=False)] = 2.0
    """``throttle``: the SRE multiplier K (2 = let through until requests are twice the
    accepts)."""
    throttle_window: PositiveFloat = 120.0
    """``throttle``: seconds of requests and accepts the rejection probability is computed over."""


def _sklearn_missing() -> bool:
    return importlib.util.find_spec("sklearn") is None


class CircuitBreakerConfig(_Model):
    """
    The circuit breaker section of a policy (``circuit_breaker:``).

    The first eight fields are the seed's, with the seed's defaults. The
    breaker trips when *either* ``failure_threshold`` failures happen in a row,
    *or* the failure rate (or the slow-call rate) over the sliding window
    reaches its threshold once the window holds ``min_requests_threshold``
    calls.
    """

    failure_threshold: PositiveInt = 5
    """Consecutive failures that open the breaker."""
    success_threshold: PositiveInt = 3
    """Successful trial calls in half-open state that close it again."""
    timeout_seconds: PositiveFloat = 60.0
    """How long the breaker stays open before letting trial calls through."""
    half_open_timeout: PositiveFloat | None = 30.0
    """Longest time in half-open state without a verdict; then it opens again.
    ``null``: no limit."""
    failure_rate_window: Annotated[int, _Num, Field(gt=0, le=MAX_SECONDS)] = 60
    """Size of the sliding window: seconds (``window_type: time``, at most 30 days) or
    calls (``count``, at most 100,000 and at least ``min_requests_threshold``)."""
    min_requests_threshold: PositiveInt = 10
    """Calls the window must hold before its failure or slow-call rate can trip the breaker."""
    enable_ml_prediction: bool = True
    """``type: adaptive``: predict failures with a random forest (needs the ``ml`` extra).
    The basic breaker ignores it."""
    prediction_threshold: Fraction = 0.7
    """``type: adaptive``: predicted failure probability above which the breaker acts."""
    type: Annotated[Literal["basic", "adaptive"], _one_of("basic", "adaptive")] = "basic"
    """``adaptive``: a breaker that also learns to predict failures (docs/adaptive.md)."""
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)
    """``type: adaptive``: mode, buckets, horizon, training; the basic breaker ignores it."""

    failure_rate_threshold: Fraction | None = 0.5
    """Failure rate (0-1] over the window that opens the breaker. ``null``: rate tripping off."""
    window_type: Literal["time", "count"] = "time"
    """Whether ``failure_rate_window`` counts seconds or calls."""
    slow_call_duration: PositiveFloat | None = None
    """A call that takes at least this many seconds is slow. ``null``: slow calls not tracked."""
    slow_call_rate_threshold: Fraction = 1.0
    """Share of slow calls in the window that opens the breaker."""
    half_open_max_calls: PositiveInt | None = None
    """Trial calls allowed per half-open period (default: ``success_threshold``)."""
    open_duration_multiplier: Growth = 1.0
    """Each consecutive trip multiplies the open duration by this (1 = no growth)."""
    max_open_duration: PositiveFloat = _DEFAULT_MAX_OPEN
    """Cap on the grown open duration, in seconds. Default: 600, or ``timeout_seconds``
    when that is longer."""
    record_exceptions: ExceptionTypes = (Exception,)
    """Exceptions that count as failures."""
    ignore_exceptions: ExceptionTypes = ()
    """Exceptions that count as neither success nor failure (wins over ``record_exceptions``)."""
    mode: Literal["normal", "disabled", "metrics_only", "forced_open"] = "normal"
    """``disabled``: lets everything through, records nothing; ``metrics_only``: records and
    reports state changes but never rejects; ``forced_open``: rejects everything."""

    @model_validator(mode="before")
    @classmethod
    def _open_duration_follows_timeout(cls, data: Any) -> Any:
        # Only the default follows: a max_open_duration that is given is checked below.
        if isinstance(data, Mapping) and "max_open_duration" not in data:
            timeout = data.get("timeout_seconds")
            if (
                isinstance(timeout, int | float)
                and not isinstance(timeout, bool)
                and _DEFAULT_MAX_OPEN < timeout <= MAX_SECONDS
            ):
                return {**data, "max_open_duration": float(timeout)}
        return data

    @model_validator(mode="after")
    def _check(self) -> CircuitBreakerConfig:
        if self.window_type == "count" and self.failure_rate_window > MAX_COUNT_WINDOW:
            msg = (
                f"failure_rate_window ({self.failure_rate_window} calls) is larger than "
                f"{MAX_COUNT_WINDOW:,} calls, the most a count window holds (it keeps one "
                "slot per call); use window_type: time for long windows"
            )
            raise ValueError(msg)
        rate_tripping = self.failure_rate_threshold is not None or (
            self.slow_call_duration is not None
        )
        if (
            self.window_type == "count"
            and rate_tripping
            and self.failure_rate_window < self.min_requests_threshold
        ):
            msg = (
                f"failure_rate_window ({self.failure_rate_window} calls) is smaller than "
                f"min_requests_threshold ({self.min_requests_threshold}): the window never "
                "holds enough calls, so the failure and slow-call rates could never trip "
                "the breaker; make the window at least min_requests_threshold calls"
            )
            raise ValueError(msg)
        if self.half_open_max_calls is not None and self.half_open_max_calls < (
            self.success_threshold
        ):
            msg = (
                f"half_open_max_calls ({self.half_open_max_calls}) must be at least "
                f"success_threshold ({self.success_threshold}), or the breaker can never close"
            )
            raise ValueError(msg)
        if self.max_open_duration < self.timeout_seconds:
            msg = (
                f"max_open_duration ({self.max_open_duration}) must be at least "
                f"timeout_seconds ({self.timeout_seconds})"
            )
            raise ValueError(msg)
        if self.uses_model and _sklearn_missing():
            msg = (
                "type: adaptive with enable_ml_prediction needs scikit-learn: "
                "pip install 'resilient-policies[ml]' (or set enable_ml_prediction: false, "
                "or adaptive.mode: throttle, which need no model)"
            )
            raise ValueError(msg)
        a = self.adaptive
        labelled = a.history_buckets - math.ceil(a.horizon_seconds / a.bucket_seconds)
        if self.uses_model and a.model_path is None and a.min_samples > labelled:
            msg = (
                f"adaptive.min_samples ({a.min_samples}) is more than the "
                f"{max(labelled, 0)} labelled buckets that adaptive.history_buckets "
                f"({a.history_buckets}) keeps: without a model_path it would never predict; "
                "lower min_samples or raise history_buckets"
            )
            raise ValueError(msg)
        return self

    @property
    def uses_model(self) -> bool:
        """Whether this breaker predicts with a learned model (adaptive, ML on, not throttle)."""
        return (
            self.type == "adaptive"
            and self.enable_ml_prediction
            and self.adaptive.mode != "throttle"
        )

    @property
    def trial_calls(self) -> int:
        """Trial calls per half-open period."""
        return self.half_open_max_calls or self.success_threshold


class RetryBudgetConfig(_Model):
    """
    The ``retry.budget`` section: a token bucket that caps retries as a share of calls,
    in the manner of gRPC retry throttling and Finagle's ``RetryBudget``.

    Every call (its first attempt) deposits ``ratio`` tokens, every retry withdraws
    one, and ``min_retries_per_second`` tokens trickle in with time, so a quiet
    service can still retry. The balance never exceeds ``max_tokens``. When fewer than
    one token is left, a failed attempt is not retried (the first attempt of every call
    still runs) and a ``RetryBudgetExhausted`` event says so.
    """

    ratio: NonNegativeAmount = 0.2
    """Retries allowed per call, on average (Finagle's ``percentCanRetry``)."""
    min_retries_per_second: NonNegativeAmount = 10.0
    """Retries always allowed per second, whatever the traffic (Finagle's floor)."""
    max_tokens: PositiveAmount = 100.0
    """Most tokens saved up in quiet times: the largest burst of retries at the start
    of an outage. The bucket starts full."""


class RetryConfig(_Model):
    """
    The retry section of a policy (``retry:``).

    The first eight fields are the seed's, with the seed's defaults.
    ``max_attempts`` counts every attempt, the first one included.
    """

    max_attempts: PositiveInt = 3
    """Attempts in all, the first included (1 = no retry)."""
    base_delay: NonNegativeFloat = 1.0
    """Delay before the first retry, in seconds (the unit every strategy scales)."""
    max_delay: NonNegativeFloat = 60.0
    """No single delay is longer than this."""
    multiplier: Factor = 2.0
    """Growth factor of ``exponential_backoff`` and ``adaptive``."""
    jitter: Annotated[bool | JitterKind, BeforeValidator(_jitter)] = True
    """``true``/``full``: uniform in [0, d]; ``equal``: d/2 + uniform in [0, d/2];
    ``decorrelated``: uniform in [base_delay, 3 * previous]; ``false``/``none``: exact.
    Kept as given; ``jitter_kind`` names the formula."""
    strategy: RetryStrategy = RetryStrategy.EXPONENTIAL_BACKOFF
    """How the delay grows, see ``RetryStrategy``."""
    timeout: PositiveFloat | None = 60.0
    """Budget for all attempts and sleeps together, in seconds. ``null``: none."""
    per_attempt_timeout: PositiveFloat | None = 30.0
    """Budget for one attempt, in seconds. ``null``: none."""

    retry_on: ExceptionTypes = Field(default_factory=transient_errors)
    """Exceptions that are retried. Default: ``ConnectionError``, ``TimeoutError``,
    ``OSError``, and the transport errors of httpx and aiohttp when they are installed.
    Rejections by the library (``CircuitOpenError`` ...) are only retried when listed
    here by name."""
    give_up_on: ExceptionTypes = ()
    """Exceptions that are never retried, even when ``retry_on`` matches."""
    retry_if_exception: SkipJsonSchema[Callable[[BaseException], bool] | None] = Field(
        default=None, exclude=True
    )
    """Python only: also retry an exception when this returns true."""
    retry_if_result: SkipJsonSchema[Callable[[Any], bool] | None] = Field(
        default=None, exclude=True
    )
    """Python only: retry when this returns true for a *returned* value."""
    budget: RetryBudgetConfig | None = None
    """A retry budget shared by every call of the policy (see ``RetryBudgetConfig``).
    ``null``: retries are limited by ``max_attempts`` only."""
    retry_after: SkipJsonSchema[Callable[[Any], float | None] | None] = Field(
        default=None, exclude=True
    )
    """Python only: reads a server-chosen delay (seconds) from the exception of a failed
    attempt, or from the returned value that ``retry_if_result`` rejected; ``None`` keeps
    the computed backoff. The delay is capped by ``max_delay``. A library rejection that
    carries ``retry_after`` (``CircuitOpenError``, ``RateLimitedError``) is honoured
    without a hook when it is retried."""

    @model_validator(mode="after")
    def _check(self) -> RetryConfig:
        if self.max_delay < self.base_delay:
            msg = f"max_delay ({self.max_delay}) is smaller than base_delay ({self.base_delay})"
            raise ValueError(msg)
        return self

    @property
    def jitter_kind(self) -> JitterKind:
        """The jitter formula: ``full``, ``equal``, ``decorrelated`` or ``none``."""
        if self.jitter is True:
            return "full"
        if self.jitter is False:
            return "none"
        return self.jitter


class TimeoutConfig(_Model):
    """The ``timeout:`` section: time budgets in seconds; ``null`` switches one off."""

    per_attempt: PositiveFloat | None = None
    """Budget for each attempt."""
    total: PositiveFloat | None = None
    """Budget for the whole call: every attempt and every sleep between them."""


#: Priority names, lowest to highest; waiting callers are served highest first.
PRIORITIES: tuple[str, ...] = ("low", "normal", "high", "critical")

PriorityName = Literal["low", "normal", "high", "critical"]


class BulkheadConfig(_Model):
    """
    The ``bulkhead:`` section: how many calls of the policy run at once, and who
    waits for a slot.

    The first eight fields are the seed's, with the seed's defaults. A call that
    finds every slot taken waits up to ``acquire_timeout`` in a queue of at most
    ``max_queue`` callers (highest priority first, FIFO within a priority), then
    gets ``BulkheadFullError``; a full queue rejects at once.
    """

    max_concurrent_requests: PositiveInt = 100
    """Calls in flight at most (the ceiling of auto-scaling)."""
    max_thread_pool_size: PositiveInt = 50
    """Threads of the policy's own pool (``isolation: thread_pool``); calls in flight
    are also capped by it."""
    max_connection_pool_size: PositiveInt = 20
    """Default size of the connection pools made by ``BulkheadManager.connection_pool``."""
    enable_auto_scaling: bool = True
    """Move the limit between ``min_concurrent_requests`` and ``max_concurrent_requests``
    by utilisation and latency (see docs/bulkheads.md)."""
    scale_up_threshold: Fraction = 0.8
    """The limit only grows when calls in flight fill at least this share of it."""
    scale_down_threshold: Share = 0.3
    """The limit shrinks (10% per window) when calls in flight fill less than this share."""
    acquire_timeout: NonNegativeFloat = 30.0
    """Longest wait for a slot, in seconds; 0 rejects at once when the bulkhead is full."""
    priority_queuing: bool = True
    """Serve waiting callers by priority (else in arrival order)."""

    max_queue: NonNegativeInt = 1024
    """Callers waiting at most; the next one is rejected at once (0: never wait)."""
    isolation: Literal["semaphore", "thread_pool"] = "semaphore"
    """``semaphore``: the call runs in the caller's thread or task. ``thread_pool``: a sync
    function runs in the policy's own pool of ``max_thread_pool_size`` threads, so a hung
    dependency exhausts that pool, not the caller's threads (async functions are unchanged)."""
    default_priority: PriorityName = "normal"
    """Priority of a call that names none: ``low``, ``normal``, ``high`` or ``critical``."""
    priority_aging: PositiveFloat | None = None
    """Seconds of waiting that raise a caller by one priority level, so low priorities
    never starve. ``null``: strict priorities."""
    min_concurrent_requests: PositiveInt = 1
    """Floor of auto-scaling; also the concurrency at which the no-load latency is
    measured."""
    latency_tolerance: Annotated[float, _Num, Field(ge=0, le=1000, allow_inf_nan=False)] = 0.1
    """Auto-scaling lowers the limit when the mean latency exceeds the no-load latency by
    more than this share (Envoy's ``min_rtt_buffer``)."""
    probe_interval: PositiveFloat = 60.0
    """Seconds between re-measurements of the no-load latency (Envoy's
    ``min_rtt_calc_interval``)."""

    @model_validator(mode="after")
    def _check(self) -> BulkheadConfig:
        if self.scale_down_threshold >= self.scale_up_threshold:
            msg = (
                f"scale_down_threshold ({self.scale_down_threshold}) must be smaller than "
                f"scale_up_threshold ({self.scale_up_threshold})"
            )
            raise ValueError(msg)
        if self.min_concurrent_requests > self.max_concurrent_requests:
            msg = (
                f"min_concurrent_requests ({self.min_concurrent_requests}) is larger than "
                f"max_concurrent_requests ({self.max_concurrent_requests})"
            )
            raise ValueError(msg)
        return self


class RateLimitConfig(_Model):
    """
    The ``rate_limit:`` section: a leaky bucket of ``max_rate`` calls per
    ``time_period`` seconds (bursts of up to ``max_rate`` allowed). A call that
    would have to wait longer than ``max_wait`` gets ``RateLimitedError``.
    """

    max_rate: PositiveAmount
    """Calls allowed per ``time_period``; also the largest burst."""
    time_period: PositiveFloat = 1.0
    """Length of the period, in seconds."""
    max_wait: NonNegativeFloat = 0.0
    """Longest a call waits for capacity, in seconds; 0 rejects at once."""


class HealthCheckConfig(_Model):
    """
    The ``health:`` section: how a service's health is judged (see docs/health.md).

    The first seven fields are the seed's, with the seed's defaults. A policy with
    this section is also watched *passively*, from its live calls, with no probe
    traffic.
    """

    check_interval: PositiveFloat = 30.0
    """Seconds between two runs of each check (a little jitter is added)."""
    timeout: PositiveFloat = 10.0
    """Seconds a check may run; a check still running then counts as failed."""
    failure_threshold: PositiveInt = 3
    """Failed results in a row that make a check failing (and a critical one, the
    service ``unhealthy``)."""
    recovery_threshold: PositiveInt = 2
    """Passing results in a row that make a failing check pass again; also the passing
    deep or synthetic checks in a row that move an open breaker to half-open."""
    response_time_threshold: PositiveFloat = 5.0
    """Seconds: a check or a mean live call slower than this makes the service
    ``degraded``."""
    error_rate_threshold: Fraction = 0.1
    """Share of failed live calls above which the passive check fails."""
    auto_recovery: bool = True
    """Move an open circuit breaker to half-open after ``recovery_threshold`` passing
    deep or synthetic checks, before its open period ends."""
    min_calls: PositiveInt = 5
    """Fewest live calls the passive check judges at once; it waits for more until then."""
    open_breaker: Literal["degraded", "unhealthy"] = "degraded"
    """Status an open circuit breaker gives the service: ``degraded`` keeps it ready (an
    open breaker in every replica must not take the fleet out of the load balancer);
    ``unhealthy`` opts it into readiness."""


def _fallback_shorthand(value: object) -> object:
    # A mapping is always the full form ({value: ..., on: [...]}) so that a typo in
    # it is reported instead of silently becoming the fallback value.
    if isinstance(value, dict) and True in value and "on" not in value:
        # YAML 1.1 reads a bare `on:` key as the boolean true.
        value = {("on" if key is True else key): v for key, v in value.items()}
    if value is None or isinstance(value, dict | FallbackConfig):
        return value
    return {"value": value}


class FallbackConfig(_Model):
    """The ``fallback:`` section: a static value returned instead of raising."""

    value: Any = None
    """What the call returns when it fails."""
    on: ExceptionTypes = (Exception,)
    """Which exceptions are replaced by the value."""


#: Statuses that count as failures of an HTTP call by default (``http.failure_statuses``).
DEFAULT_FAILURE_STATUSES: tuple[int, ...] = (429, 502, 503, 504)
#: Methods retried (and hedged) by default: the idempotent ones (RFC 9110, 9.2.2).
IDEMPOTENT_METHODS: tuple[str, ...] = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def _one_or_many(value: object) -> object:
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(value)
    return (value,)


def _http_status(value: object) -> int:
    """An HTTP status from ``503``, ``"503"`` or a name such as ``service_unavailable``."""
    from http import HTTPStatus

    if isinstance(value, bool) or not isinstance(value, int | str):
        msg = f"expected an HTTP status code (100-599) or its name, got {value!r}"
        raise ValueError(msg)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        else:
            key = text.upper().replace(" ", "_").replace("-", "_")
            if key not in HTTPStatus.__members__:
                hint = did_you_mean(text.lower(), [m.lower() for m in HTTPStatus.__members__])
                msg = f"unknown HTTP status name {text!r}{hint}"
                raise ValueError(msg)
            return int(HTTPStatus[key])
    if not 100 <= value <= 599:
        msg = f"{value} is not an HTTP status code (100-599)"
        raise ValueError(msg)
    return value


#: The methods of RFC 9110 and RFC 5789 (PATCH): a name close to one of these that is
#: not registered is taken for a typo of it.
_COMMON_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "POST", "PATCH", "CONNECT")
#: The IANA HTTP method registry (WebDAV and friends), QUERY, and PURGE (caches).
_REGISTERED_METHODS = frozenset(
    (
        *_COMMON_METHODS,
        *("ACL", "BASELINE-CONTROL", "BIND", "CHECKIN", "CHECKOUT", "COPY", "LABEL"),
        *("LINK", "LOCK", "MERGE", "MKACTIVITY", "MKCALENDAR", "MKCOL", "MKREDIRECTREF"),
        *("MKWORKSPACE", "MOVE", "ORDERPATCH", "PRI", "PROPFIND", "PROPPATCH", "PURGE"),
        *("QUERY", "REBIND", "REPORT", "SEARCH", "UNBIND", "UNCHECKOUT", "UNLINK"),
        *("UNLOCK", "UPDATE", "UPDATEREDIRECTREF", "VERSION-CONTROL"),
    )
)


def _http_method(value: object) -> str:
    """A method name, upper-cased (httpx sends methods upper-cased); typos are refused."""
    if not isinstance(value, str) or not value or not set(value) <= _TOKEN_CHARS:
        msg = f"expected an HTTP method name such as POST, got {value!r}"
        raise ValueError(msg)
    method = value.upper()
    if method not in _REGISTERED_METHODS:
        # an extension method is allowed, unless it looks like a typo of a common one
        hint = did_you_mean(method, _COMMON_METHODS)
        if hint:
            msg = f"unknown HTTP method {value!r}{hint}"
            raise ValueError(msg)
    return method


_STATUS_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer", "minimum": 100, "maximum": 599}, {"type": "string"}]
}
HttpStatuses = Annotated[
    tuple[Annotated[int, BeforeValidator(_http_status)], ...],
    BeforeValidator(_one_or_many),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": _STATUS_SCHEMA},
                _STATUS_SCHEMA,
            ],
            "description": "HTTP status codes (100-599) or their names (service_unavailable); "
            "one or a list.",
        }
    ),
]
HttpMethods = Annotated[
    tuple[Annotated[str, BeforeValidator(_http_method)], ...],
    BeforeValidator(_one_or_many),
    WithJsonSchema(
        {
            "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
            "description": "HTTP method names (GET, POST ...); one or a list.",
        }
    ),
]


def _check_http_key(value: object) -> object:
    # pydantic's own Literal error names the options but suggests none
    if isinstance(value, str) and value not in ("policy", "host"):
        msg = f"expected 'policy' or 'host', got {value!r}{did_you_mean(value, ('policy', 'host'))}"
        raise ValueError(msg)
    return value


_http_key = BeforeValidator(_check_http_key)


class HttpConfig(_Model):
    """
    The ``http:`` section: how ``resilient.httpx`` transports judge and retry HTTP
    calls. A transport whose policy has no ``http:`` section uses these defaults.
    """

    failure_statuses: HttpStatuses = DEFAULT_FAILURE_STATUSES
    """Response statuses that count as failures: the circuit breaker counts them and
    the retry section retries them (codes, or names such as ``service_unavailable``)."""
    retry_methods: HttpMethods = IDEMPOTENT_METHODS
    """Methods whose requests are retried (and hedged); others get one attempt. Default:
    the idempotent methods GET, HEAD, OPTIONS, PUT, DELETE, TRACE."""
    respect_retry_after: bool = True
    """Wait what a failure response's ``Retry-After`` header says (seconds or an HTTP
    date) before the next attempt, capped by ``retry.max_delay``."""
    raise_on_exhausted: bool = False
    """When the last attempt ends on a failure status: ``false`` returns that response to
    the caller, ``true`` raises ``httpx.HTTPStatusError``."""
    key: Annotated[Literal["policy", "host"], _http_key] = "policy"
    """``policy``: one circuit breaker (and one set of metrics) for every host;
    ``host``: one per host and port."""
    max_keys: PositiveInt = 100
    """``key: host``: most hosts with their own breaker; further hosts share one."""


# --------------------------------------------------------------------------- chaos (issue 12)

#: The failure modes chaos injection knows (``chaos.failure_modes``).
CHAOS_MODES = ("network_delay", "timeout", "exception", "error_result", "latency_spike")
ChaosMode = Literal["network_delay", "timeout", "exception", "error_result", "latency_spike"]
_DISTRIBUTIONS = ("fixed", "uniform", "normal", "exponential")


def _chaos_choice(options: tuple[str, ...], what: str) -> BeforeValidator:
    # pydantic's own Literal error names the options but suggests none
    def check(value: object) -> object:
        if isinstance(value, str) and value not in options:
            hint = did_you_mean(value, options)
            msg = f"unknown {what} {value!r}{hint}; valid: {', '.join(options)}"
            raise ValueError(msg)
        return value

    return BeforeValidator(check)


ChaosModeName = Annotated[ChaosMode, _chaos_choice(CHAOS_MODES, "failure mode")]
Intensity = Annotated[float, _Num, Field(ge=0, le=1, allow_inf_nan=False)]


def _modes_list(value: object) -> object:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def _delay_shorthand(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"delay": value}
    return value


def _operations(value: object) -> object:
    # stored as pairs (the models are hashable); the rates are checked here so an
    # error names the function, not the position of a pair ("operations[0][1]")
    if not isinstance(value, Mapping):
        return value
    from pydantic import TypeAdapter, ValidationError

    rate: TypeAdapter[float] = TypeAdapter(Intensity)
    problems: list[str] = []
    pairs: list[tuple[object, float]] = []
    for key, given in value.items():
        try:
            pairs.append((key, rate.validate_python(given)))
        except ValidationError as exc:
            problems.append(f"{key!r}: {exc.errors()[0]['msg']} (got {given!r})")
    if problems:
        raise ValueError("rate of " + "; ".join(problems))
    return tuple(pairs)


def _or_seconds(schema: dict[str, Any]) -> None:
    # the schema accepts the shorthand the loader accepts: a number of seconds
    schema.setdefault("anyOf", []).insert(1, {"type": "number", "minimum": 0})


_MODE_NAMES_SCHEMA = {"type": "string", "enum": list(CHAOS_MODES)}


class ChaosDelayConfig(_Model):
    """
    A delay of ``network_delay`` or ``latency_spike``: a number of seconds, or a
    distribution to draw each delay from.
    """

    distribution: Annotated[
        Literal["fixed", "uniform", "normal", "exponential"],
        _chaos_choice(_DISTRIBUTIONS, "distribution"),
    ] = "fixed"
    """``fixed`` (always ``delay``), ``uniform`` (between ``min`` and ``max``), ``normal``
    (mean ``delay``, ``stddev``) or ``exponential`` (mean ``delay``)."""
    delay: NonNegativeFloat = 0.1
    """Seconds: the fixed delay, or the mean of ``normal`` and ``exponential``."""
    min: NonNegativeFloat | None = None
    """Shortest delay drawn (``uniform``: default 0)."""
    max: NonNegativeFloat | None = None
    """Longest delay drawn (``uniform``: default twice ``delay``)."""
    stddev: NonNegativeFloat | None = None
    """Standard deviation of ``normal`` (default a quarter of ``delay``)."""

    @model_validator(mode="after")
    def _bounds(self) -> ChaosDelayConfig:
        if self.min is not None and self.max is not None and self.min > self.max:
            msg = f"min ({self.min}) is larger than max ({self.max})"
            raise ValueError(msg)
        return self


class LatencySpikeConfig(ChaosDelayConfig):
    """The ``latency_spike`` delay: like ``network_delay``, rarer and longer."""

    delay: NonNegativeFloat = 2.0
    """Seconds: the fixed spike, or the mean of ``normal`` and ``exponential``."""


class ChaosTimeoutConfig(_Model):
    """Mode ``timeout``: the attempt hangs until its per-attempt timeout fires."""

    hang: PositiveFloat | None = None
    """Seconds the attempt hangs when no per-attempt timeout ends it first (then it
    raises ``ChaosTimeoutError``); default 30."""


class ChaosExceptionConfig(_Model):
    """Mode ``exception``: the attempt raises instead of calling the function."""

    error: Annotated[
        ExceptionType,
        PlainSerializer(_exception_name, return_type=str),
        WithJsonSchema({"type": "string", "default": "ChaosError"}),
    ] = Field(default_factory=lambda: _chaos_error())
    """The exception class (a name, as in ``retry_on``); default ``ChaosError``, a
    ``ConnectionError``."""
    message: str = "fault injected by chaos"
    """The exception's message."""

    @model_validator(mode="after")
    def _makeable(self) -> ChaosExceptionConfig:
        if not issubclass(self.error, Exception):
            msg = f"{self.error.__name__} is not an Exception subclass: it cannot be injected"
            raise ValueError(msg)
        try:
            self.error(self.message)
        except Exception as exc:
            msg = (
                f"{self.error.__name__}({self.message!r}) cannot be created "
                f"({type(exc).__name__}: {exc}); name an exception that takes a message"
            )
            raise ValueError(msg) from None
        return self


def _chaos_error() -> type[BaseException]:
    from resilient.errors import ChaosError

    return ChaosError


class ChaosErrorResultConfig(_Model):
    """Mode ``error_result``: the attempt returns ``value`` instead of calling the function."""

    value: Any = None
    """What the attempt returns."""


class ChaosConfig(_Model):
    """
    The ``chaos:`` section: faults injected into this policy's attempts, innermost,
    while chaos is allowed (``resilient.chaos.enable()`` or
    ``RESILIENCE_CHAOS_ENGINEERING_ENABLED``) and the environment is not production.
    """

    failure_modes: Annotated[
        tuple[ChaosModeName, ...],
        BeforeValidator(_modes_list),
        WithJsonSchema(
            {"anyOf": [{"type": "array", "items": _MODE_NAMES_SCHEMA}, _MODE_NAMES_SCHEMA]}
        ),
    ] = ()
    """Failure modes to inject (one is drawn per injected attempt); default: those whose
    parameters are given below."""
    rate: Intensity = 0.1
    """Share of attempts that get a fault, 0 to 1."""
    network_delay: Annotated[ChaosDelayConfig | None, BeforeValidator(_delay_shorthand)] = Field(
        default=None, json_schema_extra=_or_seconds
    )
    """Delay before the real call: seconds, or a distribution (default 0.1 s)."""
    latency_spike: Annotated[LatencySpikeConfig | None, BeforeValidator(_delay_shorthand)] = Field(
        default=None, json_schema_extra=_or_seconds
    )
    """A long delay before the real call (default 2 s)."""
    timeout: ChaosTimeoutConfig | None = None
    """Parameters of mode ``timeout``."""
    exception: ChaosExceptionConfig | None = None
    """Parameters of mode ``exception``."""
    error_result: ChaosErrorResultConfig | None = None
    """Parameters of mode ``error_result``."""
    operations: Annotated[
        tuple[tuple[str, Intensity], ...],
        BeforeValidator(_operations),
        PlainSerializer(dict, return_type=dict[str, float]),
        WithJsonSchema(
            {
                "type": "object",
                "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
                "description": "Rate per function: its qualified name or last part -> 0..1.",
            }
        ),
    ] = Field(default=(), json_schema_extra={"default": {}})
    """Rate per function (its qualified name, or the last part of it), instead of ``rate``."""

    @model_validator(mode="after")
    def _modes(self) -> ChaosConfig:
        given = [mode for mode in CHAOS_MODES if getattr(self, mode) is not None]
        if not self.failure_modes:
            if not given:
                msg = f"name at least one failure mode in failure_modes ({', '.join(CHAOS_MODES)})"
                raise ValueError(msg)
            object.__setattr__(self, "failure_modes", tuple(given))
        unused = [mode for mode in given if mode not in self.failure_modes]
        if unused:
            msg = (
                f"parameters given for {', '.join(unused)}, which failure_modes does not list "
                f"({', '.join(self.failure_modes)})"
            )
            raise ValueError(msg)
        object.__setattr__(self, "failure_modes", tuple(dict.fromkeys(self.failure_modes)))
        return self


#: ``hedge.delay`` as a quantile: ``p95``, ``p99``, ``p99.9`` (1 to 99.99).
_QUANTILE = re.compile(r"p(\d{1,2}(?:\.\d{1,2})?)")


def _hedge_delay(value: object) -> object:
    """A delay in seconds, or ``pNN``: the policy's own observed latency quantile."""
    expected = "seconds (a number >= 0) or a latency quantile 'pNN' such as 'p95' or 'p99.9'"
    if isinstance(value, str):
        text = value.strip().lower()
        match = _QUANTILE.fullmatch(text)
        if match is not None and 1 <= float(match.group(1)) <= 99.99:
            return text
        try:
            value = float(text)
        except ValueError:
            # p999 (as metrics name p99.9) reads as p99.9, p9999 as p99.99, p995 as p99.5
            digits = re.fullmatch(r"p(9\d)(\d\d?)", text)
            hint = f" (did you mean 'p{digits[1]}.{digits[2]}'?)" if digits else ""
            msg = f"delay must be {expected}, got {value!r}{hint}"
            raise ValueError(msg) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"delay must be {expected}, got {value!r}"
        raise ValueError(msg)
    if not 0 <= value <= MAX_SECONDS:  # NaN fails too
        msg = f"delay must be {expected}; {value!r} is out of 0..{MAX_SECONDS}"
        raise ValueError(msg)
    return float(value)


HedgeDelay = Annotated[
    float | str,
    BeforeValidator(_hedge_delay),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
                {"type": "string", "pattern": "^[pP][1-9][0-9]?(\\.[0-9]{1,2})?$"},
            ],
            "description": "Seconds before the next hedged attempt starts, or 'pNN': the "
            "policy's own observed latency quantile (e.g. 'p95').",
        }
    ),
]


#: Most extra attempts one call may start (``hedge.max_hedged_attempts``); Polly v8's
#: bound too.
MAX_HEDGED_ATTEMPTS = 10


class HedgeConfig(_Model):
    """
    The ``hedge:`` section: when an attempt has not answered after ``delay``, start
    another one in parallel; the first acceptable answer wins, the others are
    cancelled (docs/hedging.md). Hedging resends the call: idempotent operations only.
    """

    max_hedged_attempts: Annotated[int, _Num, Field(gt=0, le=MAX_HEDGED_ATTEMPTS)] = 1
    """Extra attempts a call may start in parallel (besides the first one), at most 10:
    each is a full copy of the request (with ``delay: 0``, all at once)."""
    delay: HedgeDelay = "p95"
    """Seconds without an answer before the next hedge starts (0: all at once), or
    ``pNN``: the policy's observed latency quantile, kept within ``min_delay``..``max_delay``."""
    min_delay: NonNegativeFloat = 0.0
    """``delay: pNN``: the floor of the delay, in seconds."""
    max_delay: PositiveFloat = 1.0
    """``delay: pNN``: the cap of the delay, in seconds; also the delay until enough
    latencies have been seen (20)."""
    on_failure: bool = False
    """A failed attempt starts the next hedge at once (Polly's fallback mode), instead
    of leaving the failure to the retry loop."""
    max_load_amplification: (
        Annotated[float, _Num, Field(gt=1, le=1000, allow_inf_nan=False)] | None
    ) = 1.5
    """Ceiling on attempts per call over the recent calls (1.5: hedges add at most 50 %
    to the load, after a burst allowance); ``null``: only ``max_hedged_attempts`` bounds it."""

    @model_validator(mode="after")
    def _check(self) -> HedgeConfig:
        if self.min_delay > self.max_delay:
            msg = f"min_delay ({self.min_delay}) must not exceed max_delay ({self.max_delay})"
            raise ValueError(msg)
        return self

    @property
    def quantile(self) -> float | None:
        """``delay: p95`` -> 0.95; ``None`` for a fixed delay."""
        if isinstance(self.delay, str):
            return float(self.delay[1:]) / 100.0
        return None


class Policy(_Model):
    """
    A named composition of strategies. A section that is absent (``None``)
    means that strategy is not in the pipeline at all.
    """

    description: str | None = None
    """Free text, for humans."""
    circuit_breaker: CircuitBreakerConfig | None = None
    retry: RetryConfig | None = None
    timeout: TimeoutConfig | None = None
    fallback: Annotated[FallbackConfig | None, BeforeValidator(_fallback_shorthand)] = None
    bulkhead: BulkheadConfig | None = None
    rate_limit: RateLimitConfig | None = None
    health: HealthCheckConfig | None = None
    hedge: HedgeConfig | None = None
    chaos: ChaosConfig | None = None
    http: HttpConfig | None = None

    @property
    def per_attempt_timeout(self) -> float | None:
        """Effective per-attempt budget: ``timeout.per_attempt`` wins over the retry field."""
        if self.timeout is not None:
            return self.timeout.per_attempt
        if self.retry is not None:
            return self.retry.per_attempt_timeout
        return None

    @property
    def total_timeout(self) -> float | None:
        """Effective total budget: ``timeout.total`` wins over ``retry.timeout``."""
        if self.timeout is not None:
            return self.timeout.total
        if self.retry is not None:
            return self.retry.timeout
        return None


class _SchemaGenerator(GenerateJsonSchema):
    """Renders exception-class defaults as their names, as a policy file spells them."""

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, tuple) and all(
            isinstance(e, type) and issubclass(e, BaseException) for e in dft
        ):
            return [_exception_name(e) for e in dft]
        if isinstance(dft, Enum):
            return dft.value
        return super().encode_default(dft)


def policy_file_schema() -> dict[str, Any]:
    """
    The JSON Schema of a whole policy file, for editors (``resilient schema``).

    Generated from the models, and it accepts exactly what the loader accepts:
    ``version``, ``policies`` (a policy may be left empty), ``redis_url`` and
    ``backend`` at the top level, ``extends`` in a policy, and the shorthands
    ``jitter: true``, ``retry_on: ConnectionError`` (one name) and
    ``fallback: <value>``.
    """
    from resilient._version import __version__
    from resilient.backends._config import BackendConfig

    policy = Policy.model_json_schema(
        schema_generator=_SchemaGenerator, ref_template="#/$defs/{model}"
    )
    defs: dict[str, Any] = policy.pop("$defs", {})
    props = policy["properties"]
    props["extends"] = {
        "type": "string",
        "description": "Name of a policy whose sections this one starts from (deep merge).",
    }
    fallback = props.get("fallback", {})
    if "anyOf" in fallback:
        fallback["anyOf"].append(
            {"not": {"type": "object"}, "description": "Shorthand: the fallback value itself."}
        )
    fallback.setdefault(
        "description",
        "A static value returned instead of raising: the value itself, or "
        "{value: ..., on: [exception names]}.",
    )
    defs["Policy"] = policy

    backend = BackendConfig.model_json_schema(
        schema_generator=_SchemaGenerator, ref_template="#/$defs/{model}"
    )
    redis_url = backend["properties"].pop("redis_url")
    redis_url.setdefault("description", "Redis URL of the shared state; null: in memory.")
    defs.update(backend.pop("$defs", {}))
    defs["Backend"] = backend
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "resilient policy file",
        "description": (
            "Resilience policies for the resilient library, format version 1 "
            "(resilience.yaml, or [tool.resilient] in pyproject.toml). Generated by "
            f"`resilient schema` (resilient {__version__}). For validation in editors that "
            "use yaml-language-server, make the first line of the policy file "
            "`# yaml-language-server: $schema=<path or URL of this schema>`."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "version": {
                "const": 1,
                "default": 1,
                "title": "Version",
                "description": "Format version of this file.",
            },
            "policies": {
                "type": ["object", "null"],
                "description": "Policies by name; decorate functions with "
                "@resilient(policy='<name>').",
                "additionalProperties": {"anyOf": [{"$ref": "#/$defs/Policy"}, {"type": "null"}]},
            },
            "redis_url": redis_url,
            "backend": {
                "anyOf": [{"$ref": "#/$defs/Backend"}, {"type": "null"}],
                "description": "Settings of the state backend (redis_url goes at the top level).",
            },
        },
        "$defs": dict(sorted(defs.items())),
    }

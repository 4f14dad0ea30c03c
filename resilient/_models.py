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
    "BulkheadConfig",
    "CircuitBreakerConfig",
    "FallbackConfig",
    "HealthCheckConfig",
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
    """Stored for the adaptive (learning) breaker, which is not part of this release: the
    basic breaker ignores it, and nothing predicts."""
    prediction_threshold: Fraction = 0.7
    """Failure probability above which the adaptive breaker opens early (see above)."""

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
        return self

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

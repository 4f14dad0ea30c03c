"""
Pydantic models of a policy: validation at the boundary only.

The models are frozen and forbid unknown keys. They are compiled once into the
plain runtime objects of :mod:`resilient.pipeline`; the call path never touches
pydantic.
"""

from __future__ import annotations

import builtins
import importlib
from collections.abc import Callable
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

__all__ = [
    "PRIORITIES",
    "TRANSIENT_ERRORS",
    "BulkheadConfig",
    "CircuitBreakerConfig",
    "FallbackConfig",
    "Policy",
    "RateLimitConfig",
    "RetryBudgetConfig",
    "RetryConfig",
    "RetryStrategy",
    "TimeoutConfig",
    "policy_file_schema",
    "resolve_exception",
]

#: What ``retry_on`` defaults to: errors that usually go away by themselves.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


def resolve_exception(spec: object) -> type[BaseException]:
    """
    Turn ``"ConnectionError"``, ``"builtins.ConnectionError"`` or
    ``"pkg.mod.Error"`` (or a class) into an exception class.

    Raises:
        ValueError: The name does not import, or is not an exception class.
    """
    if isinstance(spec, type) and issubclass(spec, BaseException):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        msg = f"expected an exception class or its dotted name, got {spec!r}"
        raise ValueError(msg)
    name = spec.strip()
    module_name, _, attr = name.rpartition(".")
    obj: object = None
    if not module_name:
        obj = getattr(builtins, name, None)
        if obj is None:
            from resilient import errors  # our own errors may be named bare too

            obj = getattr(errors, name, None)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is not None:
            obj = getattr(module, attr, None)
    if obj is None:
        hint = ""
        if not module_name:
            import difflib

            candidates = [n for n in dir(builtins) if n.endswith(("Error", "Exception"))]
            close = difflib.get_close_matches(name, candidates, n=1)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
        msg = f"unknown exception {name!r}{hint}; give a builtin name or a dotted path"
        raise ValueError(msg)
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        msg = f"{name!r} is not an exception class"
        raise ValueError(msg)
    return obj


def _exception_list(value: object) -> tuple[type[BaseException], ...]:
    if value is None:
        return ()
    if isinstance(value, str | type):
        value = [value]
    if not isinstance(value, list | tuple | set | frozenset):
        msg = "expected a list of exception names"
        raise ValueError(msg)
    return tuple(resolve_exception(v) for v in value)


def _exception_name(exc: type[BaseException]) -> str:
    if exc.__module__ == "builtins":
        return exc.__qualname__
    return f"{exc.__module__}.{exc.__qualname__}"


ExceptionTypes = Annotated[
    tuple[type[BaseException], ...],
    BeforeValidator(_exception_list),
    PlainSerializer(lambda v: [_exception_name(e) for e in v], return_type=list[str]),
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "string"},
            "description": "Exception classes by name: 'ConnectionError' or 'pkg.module.Error'.",
        }
    ),
]

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


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
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    return value


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
    failure_rate_window: PositiveInt = 60
    """Size of the sliding window: seconds (``window_type: time``) or calls (``count``)."""
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
    open_duration_multiplier: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 1.0
    """Each consecutive trip multiplies the open duration by this (1 = no growth)."""
    max_open_duration: PositiveFloat = 600.0
    """Cap on the grown open duration, in seconds."""
    record_exceptions: ExceptionTypes = (Exception,)
    """Exceptions that count as failures."""
    ignore_exceptions: ExceptionTypes = ()
    """Exceptions that count as neither success nor failure (wins over ``record_exceptions``)."""
    mode: Literal["normal", "disabled", "metrics_only", "forced_open"] = "normal"
    """``disabled``: lets everything through, records nothing; ``metrics_only``: records and
    reports state changes but never rejects; ``forced_open``: rejects everything."""

    @model_validator(mode="after")
    def _check(self) -> CircuitBreakerConfig:
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

    ratio: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.2
    """Retries allowed per call, on average (Finagle's ``percentCanRetry``)."""
    min_retries_per_second: NonNegativeFloat = 10.0
    """Retries always allowed per second, whatever the traffic (Finagle's floor)."""
    max_tokens: PositiveFloat = 100.0
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
    multiplier: PositiveFloat = 2.0
    """Growth factor of ``exponential_backoff`` and ``adaptive``."""
    jitter: Annotated[JitterKind, BeforeValidator(_jitter)] = "full"
    """``true``/``full``: uniform in [0, d]; ``equal``: d/2 + uniform in [0, d/2];
    ``decorrelated``: uniform in [base_delay, 3 * previous]; ``false``/``none``: exact."""
    strategy: RetryStrategy = RetryStrategy.EXPONENTIAL_BACKOFF
    """How the delay grows, see ``RetryStrategy``."""
    timeout: PositiveFloat | None = 60.0
    """Budget for all attempts and sleeps together, in seconds. ``null``: none."""
    per_attempt_timeout: PositiveFloat | None = 30.0
    """Budget for one attempt, in seconds. ``null``: none."""

    retry_on: ExceptionTypes = TRANSIENT_ERRORS
    """Exceptions that are retried. Rejections by the library (``CircuitOpenError`` ...) are
    only retried when listed here by name."""
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
    scale_down_threshold: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.3
    """The limit shrinks (10% per window) when calls in flight fill less than this share."""
    acquire_timeout: NonNegativeFloat = 30.0
    """Longest wait for a slot, in seconds; 0 rejects at once when the bulkhead is full."""
    priority_queuing: bool = True
    """Serve waiting callers by priority (else in arrival order)."""

    max_queue: Annotated[int, Field(ge=0)] = 1024
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
    latency_tolerance: NonNegativeFloat = 0.1
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

    max_rate: PositiveFloat
    """Calls allowed per ``time_period``; also the largest burst."""
    time_period: PositiveFloat = 1.0
    """Length of the period, in seconds."""
    max_wait: NonNegativeFloat = 0.0
    """Longest a call waits for capacity, in seconds; 0 rejects at once."""


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
    """JSON Schema of a whole policy file (``version`` + ``policies``), for editors."""
    policy = Policy.model_json_schema(
        schema_generator=_SchemaGenerator, ref_template="#/$defs/{model}"
    )
    defs = policy.pop("$defs", {})
    policy["properties"]["extends"] = {
        "type": "string",
        "description": "Name of a policy whose sections this one starts from (deep merge).",
    }
    defs["Policy"] = policy
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "resilient policy file",
        "description": "Resilience policies for the resilient library (version 1).",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "version": {"const": 1, "description": "Format version of this file."},
            "policies": {
                "type": "object",
                "description": "Policies by name.",
                "additionalProperties": {"$ref": "#/$defs/Policy"},
            },
        },
        "$defs": defs,
    }

"""
The exceptions that resilient itself raises.

Every one of them descends from :class:`ResilienceError`, and each also inherits
from the builtin whose meaning it shares, so existing ``except`` clauses keep
working::

    ResilienceError
     +-- PolicyError(ResilienceError, ValueError)     a policy is invalid or unknown
     +-- RejectedError                               the call was *not* attempted
     |    +-- CircuitOpenError    (.policy, .retry_after)
     |    +-- BulkheadFullError   (.policy)
     |    +-- RateLimitedError    (.policy, .retry_after)
     +-- AttemptTimeoutError(ResilienceError, TimeoutError)
                                                     attempted, but too slow

The user's own exceptions are never wrapped: when retries run out, the last
exception the function raised is re-raised unchanged (same object, same
traceback) with a note saying how many attempts were made.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "AttemptTimeoutError",
    "BulkheadFullError",
    "ChaosError",
    "ChaosRefusedError",
    "ChaosTimeoutError",
    "CircuitOpenError",
    "PolicyError",
    "RateLimitedError",
    "RejectedError",
    "ResilienceError",
    "ServiceNotFoundError",
]


def did_you_mean(word: object, options: Iterable[object], *, cutoff: float = 0.6) -> str:
    """
    Suggest the option closest to *word*: ``" (did you mean 'x'?)"``, or ``""``.

    The one helper behind every "did you mean" of the library (unknown keys,
    policies, exception names, scenarios...), so the wording never drifts.
    Compares case-insensitively and shows the option as it is spelt.
    """
    import difflib  # lazy: only an error message needs it

    spelt = {str(option).lower(): str(option) for option in options}
    close = difflib.get_close_matches(str(word).lower(), list(spelt), n=1, cutoff=cutoff)
    return f" (did you mean '{spelt[close[0]]}'?)" if close else ""


class ResilienceError(Exception):
    """
    Root of every exception raised by resilient itself.

    Attributes:
        policy: Name of the policy that raised it, or ``None`` when no policy
            was involved (a file that failed to load, for example).
    """

    policy: str | None

    def __init__(self, message: str, *, policy: str | None = None) -> None:
        super().__init__(message)
        self.policy = policy

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles by calling cls(*args), which our keyword-only
        # attributes do not survive; rebuild from args, slots and __dict__.
        slots = {
            name: getattr(self, name)
            for klass in type(self).__mro__
            for name in getattr(klass, "__slots__", ())
            if hasattr(self, name)
        }
        return (_restore, (type(self), self.args, slots, dict(self.__dict__)))


class PolicyError(ResilienceError, ValueError):
    """
    A policy file, a policy or a policy name is invalid.

    The message names the file, the line and the key path, and for an unknown
    key suggests the closest valid one. The parts are also kept as attributes
    so tools can render them.

    Attributes:
        source: The file (or environment variable, or ``"<python>"``) the bad
            value came from, if known.
        line: 1-based line number in *source*, if known.
        key: Dotted key path, e.g. ``policies.broker.retry.max_attempts``.
        problems: Every problem found, one string each (a file with several
            mistakes reports all of them at once).
    """

    source: str | None
    line: int | None
    key: str | None
    problems: tuple[str, ...]

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        key: str | None = None,
        policy: str | None = None,
        problems: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, policy=policy)
        self.source = source
        self.line = line
        self.key = key
        self.problems = problems or (message,)


class RejectedError(ResilienceError):
    """
    The call was refused before the function ran; it did not reach the service.

    Attributes:
        retry_after: Seconds after which trying again has a chance, or ``None``.
    """

    # Slots rather than the instance dict: a rejection is built on the hot path
    # of an open breaker, and slot stores save the dict's creation.
    __slots__ = ("policy", "retry_after")

    retry_after: float | None

    def __init__(
        self, message: str, *, policy: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, policy=policy)
        self.retry_after = retry_after


def _restore(
    cls: type[ResilienceError], args: tuple[Any, ...], slots: dict[str, Any], extra: dict[str, Any]
) -> ResilienceError:
    error = cls.__new__(cls, *args)
    error.args = args
    for name, value in {**slots, **extra}.items():
        setattr(error, name, value)
    return error


class CircuitOpenError(RejectedError):
    """
    The policy's circuit breaker is open (or its half-open trial calls are taken).

    ``retry_after`` says how many seconds remain until the breaker lets a trial
    call through.
    """

    __slots__ = ("_reason",)

    _reason: str

    @classmethod
    def fast(cls, policy: str, retry_after: float | None, reason: str) -> CircuitOpenError:
        """
        Build the error without running ``__init__`` and format its message only
        when someone reads it: rejecting is the breaker's hot path while open.
        """
        self = cls.__new__(cls)
        self.policy = policy
        self.retry_after = retry_after
        self._reason = reason
        return self

    def __str__(self) -> str:
        if self.args:
            return str(self.args[0])
        message = f"circuit breaker of policy {self.policy!r} is {self._reason}"
        if self.retry_after is not None:
            message += f"; retry after {self.retry_after:.3g}s"
        return message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class BulkheadFullError(RejectedError):
    """The policy's bulkhead had no free slot within its acquire timeout."""


class RateLimitedError(RejectedError):
    """The policy's rate limit was exhausted for longer than its ``max_wait``."""


class AttemptTimeoutError(ResilienceError, TimeoutError):
    """
    An attempt, or the whole call, ran past its time budget.

    Attributes:
        timeout: The budget that was exceeded, in seconds.
        kind: ``"per_attempt"`` or ``"total"``.
    """

    timeout: float
    kind: str

    def __init__(
        self, message: str, *, policy: str | None = None, timeout: float, kind: str
    ) -> None:
        super().__init__(message, policy=policy)
        self.timeout = timeout
        self.kind = kind


class ServiceNotFoundError(ResilienceError, KeyError):
    """
    No service of that name is registered (with a ``ResilienceManager``, or with a
    ``HealthMonitor``); the message lists the registered ones. A ``KeyError``, so
    ``manager.circuit_breakers.get(name)`` and ``except KeyError`` work.

    Attributes:
        service: The name asked for.
        registered: The names that are registered.
    """

    def __init__(self, service: str, registered: list[str], what: str = "service") -> None:
        hint = did_you_mean(service, registered)
        known = ", ".join(repr(n) for n in sorted(registered)) or "(none)"
        super().__init__(f"no {what} {service!r}{hint}; registered: {known}")
        self.service = service
        self.registered = sorted(registered)

    def __str__(self) -> str:
        # KeyError would show the message in quotes.
        return str(self.args[0])


# --------------------------------------------------------------------------- chaos (issue 12)


class ChaosError(ResilienceError, ConnectionError):
    """
    The fault that chaos injection raises by default (mode ``exception``).

    A ``ConnectionError``, so the default ``retry_on`` retries it and breakers count
    it, as they would a real transport error.

    Attributes:
        fault: The failure mode that raised it (``"exception"`` or ``"timeout"``).
    """

    fault: str

    def __init__(
        self,
        message: str = "fault injected by chaos",
        *,
        policy: str | None = None,
        fault: str = "exception",
    ) -> None:
        super().__init__(message, policy=policy)
        self.fault = fault


class ChaosTimeoutError(ChaosError, TimeoutError):
    """The configured hang of an injected ``timeout`` ended before any per-attempt deadline."""


class ChaosRefusedError(ResilienceError, RuntimeError):
    """
    Chaos injection was refused: it is switched off, stopped, the environment is
    production, or the target is unknown. The message says which and how to allow it.

    Attributes:
        reason: ``"disabled"``, ``"stopped"``, ``"production"`` or ``"unknown_target"``.
    """

    reason: str

    def __init__(self, message: str, *, reason: str, policy: str | None = None) -> None:
        super().__init__(message, policy=policy)
        self.reason = reason

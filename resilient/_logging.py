"""
stdlib ``logging`` for resilient's events: one subscriber on the event bus.

Off by default for the decorator (a library does not write logs nobody asked
for); ``resilient.enable_logging()`` turns it on, and ``ResilienceManager``
turns it on while it runs (``ResilienceConfig.logging_enabled``).

Every record goes to a logger named after what happened (``resilient.retry``,
``resilient.breaker``, ``resilient.bulkhead``, ``resilient.ratelimit``,
``resilient.fallback``, ``resilient.health``, ``resilient.chaos``,
``resilient.backend``) and carries the event's fields as ``extra`` attributes
plus ``event`` (e.g. ``"retry_scheduled"``), so JSON formatters output them as
keys. Events never hold call arguments or exception objects, so neither do the
records. The levels are in docs/logging.md.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from resilient import events as _events

__all__ = ["disable_logging", "enable_logging", "log_event", "logging_enabled"]

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_HEALTH_RANK = {"healthy": 0, "unknown": 1, "degraded": 2, "unhealthy": 3}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _retry_scheduled(e: _events.RetryScheduled) -> tuple[str, int, str]:
    return (
        "resilient.retry",
        logging.INFO,
        f"policy {e.policy!r}: attempt {e.attempt} of {e.callable} failed with "
        f"{e.error_type}; retrying in {e.delay:.3g}s",
    )


def _retries_exhausted(e: _events.RetriesExhausted) -> tuple[str, int, str]:
    return (
        "resilient.retry",
        logging.WARNING,
        f"policy {e.policy!r}: {e.callable} gave up after {e.attempts} attempt(s) "
        f"({e.reason}); last error {e.error_type}",
    )


def _budget(e: _events.RetryBudgetExhausted) -> tuple[str, int, str]:
    return (
        "resilient.retry",
        logging.WARNING,
        f"policy {e.policy!r}: retry budget spent; attempt {e.attempt} of {e.callable} "
        f"({e.error_type}) not retried",
    )


def _transition(e: _events.BreakerStateChanged) -> tuple[str, int, str]:
    level = logging.WARNING if e.new_state == "open" else logging.INFO
    return (
        "resilient.breaker",
        level,
        f"circuit breaker {e.policy!r}: {e.old_state} -> {e.new_state}",
    )


_REJECTION_LOGGERS = {
    "circuit_open": "resilient.breaker",
    "bulkhead_full": "resilient.bulkhead",
    "rate_limited": "resilient.ratelimit",
}


def _rejected(e: _events.CallRejected) -> tuple[str, int, str]:
    # DEBUG: one record per refused attempt would flood the log during an
    # outage; the transition (WARNING) and the metrics say it already.
    after = f"; retry after {e.retry_after:.3g}s" if e.retry_after is not None else ""
    return (
        _REJECTION_LOGGERS.get(e.reason, "resilient.events"),
        logging.DEBUG,
        f"policy {e.policy!r}: {e.callable} rejected ({e.reason}){after}",
    )


def _fallback(e: _events.FallbackUsed) -> tuple[str, int, str]:
    return (
        "resilient.fallback",
        logging.INFO,
        f"policy {e.policy!r}: {e.callable} answered by its fallback after {e.error_type}",
    )


def _health(e: _events.HealthChanged) -> tuple[str, int, str]:
    worse = _HEALTH_RANK.get(e.new_status, 1) > _HEALTH_RANK.get(e.old_status, 1)
    return (
        "resilient.health",
        logging.WARNING if worse else logging.INFO,
        f"service {e.service!r}: {e.old_status} -> {e.new_status} "
        f"(score {e.score:.2f}, {e.reason})",
    )


def _chaos(e: _events.ChaosInjected) -> tuple[str, int, str]:
    return (
        "resilient.chaos",
        logging.INFO,
        f"policy {e.policy!r}: injected {e.fault} into {e.callable}",
    )


def _backend_down(e: _events.BackendDown) -> tuple[str, int, str]:
    return (
        "resilient.backend",
        logging.WARNING,
        f"{e.backend} backend unreachable ({e.error_type}); carrying on with local state",
    )


def _backend_up(e: _events.BackendUp) -> tuple[str, int, str]:
    after = f" after {e.down_for:.3g}s" if e.down_for is not None else ""
    return ("resilient.backend", logging.INFO, f"{e.backend} backend reachable{after}")


_FORMATTERS: dict[type, Callable[[Any], tuple[str, int, str]]] = {
    _events.RetryScheduled: _retry_scheduled,
    _events.RetriesExhausted: _retries_exhausted,
    _events.RetryBudgetExhausted: _budget,
    _events.BreakerStateChanged: _transition,
    _events.CallRejected: _rejected,
    _events.FallbackUsed: _fallback,
    _events.HealthChanged: _health,
    _events.ChaosInjected: _chaos,
    _events.BackendDown: _backend_down,
    _events.BackendUp: _backend_up,
}


def _extra(event: object) -> dict[str, Any]:
    extra: dict[str, Any] = {"event": _snake(type(event).__name__)}
    if dataclasses.is_dataclass(event):
        for field in dataclasses.fields(event):
            key = field.name if field.name not in _RESERVED else f"event_{field.name}"
            extra[key] = getattr(event, field.name)
    return extra


def log_event(event: object) -> None:
    """
    The logging subscriber: write *event* to its ``resilient.*`` logger.

    Event types it does not know (added later) go to ``resilient.events`` at
    DEBUG with their fields.
    """
    formatter = _FORMATTERS.get(type(event))
    if formatter is None:
        logger = logging.getLogger("resilient.events")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s", type(event).__name__, extra=_extra(event))
        return
    name, level, message = formatter(event)
    logger = logging.getLogger(name)
    if logger.isEnabledFor(level):
        logger.log(level, "%s", message, extra=_extra(event))


_lock = threading.Lock()
_unsubscribe: Callable[[], None] | None = None
_retained = 0
_explicit = False


def enable_logging() -> None:
    """Log every event on the ``resilient.*`` loggers (idempotent)."""
    global _unsubscribe, _explicit
    with _lock:
        _explicit = True
        if _unsubscribe is None or log_event not in _events.bus._subscribers:
            _unsubscribe = _events.subscribe(log_event)


def disable_logging() -> None:
    """Stop logging events (idempotent)."""
    global _unsubscribe, _explicit, _retained
    with _lock:
        _explicit = False
        _retained = 0
        if _unsubscribe is not None:
            _unsubscribe()
            _unsubscribe = None


def logging_enabled() -> bool:
    """Whether the logging subscriber is on the bus."""
    return _unsubscribe is not None and log_event in _events.bus._subscribers


def _retain() -> None:
    """For ``ResilienceManager``: logging on while at least one manager runs."""
    global _unsubscribe, _retained
    with _lock:
        _retained += 1
        if _unsubscribe is None or log_event not in _events.bus._subscribers:
            _unsubscribe = _events.subscribe(log_event)


def _release() -> None:
    global _unsubscribe, _retained
    with _lock:
        _retained = max(_retained - 1, 0)
        if _retained == 0 and not _explicit and _unsubscribe is not None:
            _unsubscribe()
            _unsubscribe = None

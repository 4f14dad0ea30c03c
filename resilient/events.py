"""
Typed events and the in-process event bus.

Every event is a frozen, slotted dataclass. Subscribers are plain callables
(sync) or coroutine functions (async; scheduled on the running loop, or run to
completion when there is none). A subscriber that raises is logged and never
breaks the call that emitted the event.

Nothing is emitted on the plain success path: events describe what the
resilience strategies *did* (a retry, a transition, a rejection, a fallback).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = [
    "BackendDown",
    "BackendUp",
    "BreakerStateChanged",
    "CallRejected",
    "ChaosInjected",
    "Event",
    "EventBus",
    "FallbackUsed",
    "HealthChanged",
    "HedgeStarted",
    "PredictionCrossed",
    "RetriesExhausted",
    "RetryBudgetExhausted",
    "RetryScheduled",
    "bus",
    "subscribe",
    "unsubscribe",
]

_log = logging.getLogger("resilient.events")


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """An attempt failed and another one will run after *delay* seconds."""

    policy: str
    callable: str
    attempt: int
    """The attempt that failed (1 = the first call)."""
    delay: float
    error_type: str


@dataclass(frozen=True, slots=True)
class RetriesExhausted:
    """The last allowed attempt failed (or the budget ran out); the error goes to the caller."""

    policy: str
    callable: str
    attempts: int
    error_type: str
    reason: str
    """``"attempts"``, ``"total_timeout"``, ``"not_retryable"`` or ``"budget"``."""


@dataclass(frozen=True, slots=True)
class BreakerStateChanged:
    """A circuit breaker moved from *old_state* to *new_state*."""

    policy: str
    old_state: str
    new_state: str


@dataclass(frozen=True, slots=True)
class CallRejected:
    """
    A call was refused before reaching the function: *reason* is ``"circuit_open"``,
    ``"bulkhead_full"`` or ``"rate_limited"``.
    """

    policy: str
    callable: str
    reason: str
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class FallbackUsed:
    """The fallback answered instead of the function."""

    policy: str
    callable: str
    error_type: str


@dataclass(frozen=True, slots=True)
class RetryBudgetExhausted:
    """
    A failed attempt was not retried because the policy's retry budget is spent;
    the error goes to the caller (a ``RetriesExhausted`` with reason ``"budget"``
    follows).
    """

    policy: str
    callable: str
    attempt: int
    """The attempt that failed."""
    error_type: str


@dataclass(frozen=True, slots=True)
class HealthChanged:
    """The health status of a service (or policy) moved from *old_status* to *new_status*."""

    service: str
    old_status: str
    """``"healthy"``, ``"degraded"``, ``"unhealthy"`` or ``"unknown"``."""
    new_status: str
    score: float
    """Health score after the change, 0.0 (down) to 1.0 (fully healthy)."""
    reason: str
    """What the status was derived from, e.g. ``"circuit_breaker:open"``."""


@dataclass(frozen=True, slots=True)
class ChaosInjected:
    """Chaos injection replaced or delayed an attempt of *callable* with a *fault*."""

    policy: str
    callable: str
    fault: str
    """The failure mode injected, e.g. ``"network_delay"``, ``"timeout"``, ``"exception"``."""
    experiment: str | None
    """Name of the experiment that injected it, if any."""


@dataclass(frozen=True, slots=True)
class BackendDown:
    """The shared state backend became unreachable; the process carries on with local state."""

    backend: str
    """Backend kind, e.g. ``"redis"`` (never a URL: URLs can hold passwords)."""
    error_type: str


@dataclass(frozen=True, slots=True)
class BackendUp:
    """The shared state backend is reachable again (or was reached for the first time)."""

    backend: str
    down_for: float | None
    """Seconds it was down, or ``None`` on the first connection."""


@dataclass(frozen=True, slots=True)
class PredictionCrossed:
    """
    An adaptive breaker's predicted failure probability crossed its threshold
    (*above*: it went over; otherwise it came back under). In ``active`` mode the
    breaker acts from now on (or stops acting); in ``shadow`` mode it only reports.
    """

    policy: str
    risk: float
    threshold: float
    above: bool
    mode: str


@dataclass(frozen=True, slots=True)
class HedgeStarted:
    """A call of *callable* started another attempt in parallel (the ``hedge:`` section)."""

    policy: str
    callable: str
    hedge: int
    """Which extra attempt of the call this is (1 = the first hedge)."""
    after: float
    """Seconds since the call's first attempt started."""
    reason: str
    """``"delay"``: no answer within the hedge delay; ``"failure"``: an attempt failed
    (``on_failure: true``)."""


Event: TypeAlias = (
    RetryScheduled
    | RetriesExhausted
    | BreakerStateChanged
    | CallRejected
    | FallbackUsed
    | RetryBudgetExhausted
    | HealthChanged
    | ChaosInjected
    | BackendDown
    | BackendUp
    | PredictionCrossed
    | HedgeStarted
)
Subscriber: TypeAlias = Callable[[Any], Any]


class EventBus:
    """
    Fan-out of events to subscribers.

    ``active`` is true while anyone listens; emitters check it first so that an
    event nobody hears costs one attribute read and no allocation.
    """

    __slots__ = ("_lock", "_subscribers", "active")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: tuple[Subscriber, ...] = ()
        self.active = False

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add *subscriber*; returns a function that removes it again."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)
            self.active = True
        return lambda: self.unsubscribe(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Remove *subscriber* (no error if it was not subscribed)."""
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)
            self.active = bool(self._subscribers)

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        """The current subscribers, in order."""
        return self._subscribers

    def replace(self, subscribers: tuple[Subscriber, ...]) -> None:
        """Swap in another set of subscribers (the testing kit isolates tests with it)."""
        with self._lock:
            self._subscribers = tuple(subscribers)
            self.active = bool(self._subscribers)

    def emit(self, event: Any) -> None:
        """Deliver *event* to every subscriber; their errors are logged, never raised."""
        for subscriber in self._subscribers:
            try:
                outcome = subscriber(event)
                if inspect.isawaitable(outcome):
                    _schedule(outcome)
            except Exception:
                _log.exception("event subscriber %r raised; ignoring it", subscriber)


def _schedule(awaitable: Any) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_guard(awaitable))
        return
    task = loop.create_task(_guard(awaitable))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _guard(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:
        _log.exception("async event subscriber raised; ignoring it")


_pending: set[asyncio.Task[None]] = set()

bus = EventBus()


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Subscribe to every event of the process-wide bus; returns an unsubscribe function."""
    return bus.subscribe(subscriber)


def unsubscribe(subscriber: Subscriber) -> None:
    """Remove a subscriber from the process-wide bus."""
    bus.unsubscribe(subscriber)

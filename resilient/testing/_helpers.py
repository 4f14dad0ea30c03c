"""
Context managers for tests: an isolated policy registry, captured events and a
testing mode (no real sleeps, capped attempts).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from resilient._models import Policy
from resilient.events import Event, bus
from resilient.testing._virtual import VirtualClock

__all__ = [
    "CapturedEvents",
    "IsolatedRegistry",
    "capture_events",
    "isolated_registry",
    "testing_mode",
]

E = TypeVar("E")

PolicySource = str | os.PathLike[str] | Mapping[str, Any]


class IsolatedRegistry:
    """
    The policy registry while :func:`isolated_registry` is active: loads into it
    never touch the policies, breakers or event subscribers of the code outside.
    """

    __slots__ = ()

    def load(self, source: PolicySource) -> dict[str, Policy]:
        """
        Load a policy file (path), a parsed document (``{"version": 1, "policies":
        {...}}``) or a mapping of names to :class:`~resilient.Policy` objects.
        Returns the policies now active.
        """
        from resilient.policy import load_policies, registry

        if (
            isinstance(source, Mapping)
            and source
            and all(isinstance(v, Policy) for v in source.values())
        ):
            registry.replace(dict(source), "<resilient.testing>")
        else:
            load_policies(source)
        return dict(registry.policies())

    def get(self, name: str) -> Policy:
        """The active policy *name* (raises :class:`~resilient.PolicyError` if unknown)."""
        from resilient.policy import registry

        return registry.get(name)

    def names(self) -> list[str]:
        """Names of the active policies, sorted."""
        from resilient.policy import registry

        return sorted(registry.policies())

    def reset_breakers(self) -> None:
        """
        Forget every circuit breaker, bulkhead, rate limiter and retry budget
        (each policy starts afresh at its next call).
        """
        from resilient.runtime import runtime

        runtime.clear_shared()


@contextlib.contextmanager
def isolated_registry(source: PolicySource | None = None) -> Iterator[IsolatedRegistry]:
    """
    Give the block a registry of its own: no policies loaded (the next look-up
    discovers files again, or *source* is loaded), no circuit breakers,
    bulkheads, rate limiters or retry budgets, no event subscribers.
    Everything is put back as it was on exit.

        with isolated_registry("resilience.yaml") as policies:
            assert "broker" in policies.names()
    """
    from resilient.runtime import runtime

    saved = runtime.snapshot()
    saved_subscribers = bus.subscribers
    bus.replace(())
    runtime.registry.clear()
    runtime.clear_shared()
    handle = IsolatedRegistry()
    try:
        if source is not None:
            handle.load(source)
        yield handle
    finally:
        bus.replace(saved_subscribers)
        runtime.restore(saved)


class CapturedEvents(list[Event]):
    """The events emitted while :func:`capture_events` was active, in order."""

    def of_type(self, kind: type[E]) -> list[E]:
        """Only the events of class *kind* (``events.of_type(RetryScheduled)``)."""
        return [event for event in self if isinstance(event, kind)]

    def names(self) -> list[str]:
        """The class name of each event, in order (handy in assertions)."""
        return [type(event).__name__ for event in self]


@contextlib.contextmanager
def capture_events() -> Iterator[CapturedEvents]:
    """
    Record every event of the bus emitted in the block::

        with capture_events() as events:
            flaky()
        assert events.names() == ["RetryScheduled", "RetryScheduled"]
    """
    captured = CapturedEvents()
    unsubscribe = bus.subscribe(captured.append)
    try:
        yield captured
    finally:
        unsubscribe()


@contextlib.contextmanager
def testing_mode(
    *,
    attempts: int | None = 1,  # noqa: PT028 - not a test, despite its name (__test__ below)
    clock: VirtualClock | None = None,  # noqa: PT028
) -> Iterator[VirtualClock]:
    """
    Run the block with no real sleeps and at most *attempts* attempts per call
    (``None``: as many as each policy says). Restores everything on exit.

    Sleeps go through a :class:`VirtualClock` (yielded), so time budgets still
    work; pass your own *clock* to inspect or share it::

        with resilient.testing.testing_mode(attempts=1):
            with pytest.raises(ConnectionError):
                send_order(order)          # one attempt, no backoff
    """
    if attempts is not None and attempts < 1:
        msg = f"attempts must be at least 1 (or None), got {attempts}"
        raise ValueError(msg)
    clock = clock if clock is not None else VirtualClock()
    with contextlib.ExitStack() as stack:
        stack.enter_context(clock)
        if attempts is not None:
            stack.enter_context(_capped_attempts(attempts))
        yield clock


# Its name starts with "test": keep pytest from collecting it from test modules
# that import it.
testing_mode.__test__ = False  # type: ignore[attr-defined]


@contextlib.contextmanager
def _capped_attempts(cap: int) -> Iterator[None]:
    # The pipeline has no testing switch (it would cost the hot path a read);
    # RetryPlan.decide runs on the failure path only, so wrapping it for the
    # duration of the block costs nothing to code outside testing mode, and it
    # reaches pipelines that were built before the block too.
    from resilient.retry import RetryPlan

    original = RetryPlan.decide

    def decide(self: RetryPlan, state: Any, attempt: int, *rest: Any) -> tuple[float, str]:
        delay, reason = original(self, state, attempt, *rest)
        if delay >= 0 and attempt >= cap:
            return -1.0, "attempts"
        return delay, reason

    setattr(RetryPlan, "decide", decide)  # noqa: B010 - mypy: a method is replaced on purpose
    try:
        yield
    finally:
        setattr(RetryPlan, "decide", original)  # noqa: B010

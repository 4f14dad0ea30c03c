"""Scripted backends: a function that fails (or not) exactly as a test says."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from resilient import _clock

__all__ = ["ScriptedBackend", "Step"]


@dataclass(frozen=True, slots=True)
class Step:
    """
    What one call of a :class:`ScriptedBackend` does: take *latency* seconds
    (through the clock seam, so virtual under a :class:`VirtualClock`), then
    raise *error* (``None``: succeed).
    """

    error: type[Exception] | None = None
    latency: float = 0.0

    @property
    def failed(self) -> bool:
        """Whether this step raises."""
        return self.error is not None


_SUCCESS = Step()


class ScriptedBackend:
    """
    A stand-in for a dependency that plays *steps* in order, one per call
    (``True`` is short for a failing step with ``ConnectionError``, ``False``
    for a success); after the last step, every call plays *then*. Call it
    (sync) or await :meth:`acall` (async)::

        backend = ScriptedBackend([True, True, False])

        @resilient.resilient(policy="broker")
        def send() -> str:
            return backend()

        assert send() == "ok" and backend.calls == 3

    Attributes:
        calls: How many calls were made.
        started: The clock-seam time at which each call started.
    """

    __slots__ = ("_steps", "calls", "started", "then", "value")

    def __init__(
        self, steps: Iterable[Step | bool], *, then: Step = _SUCCESS, value: Any = "ok"
    ) -> None:
        self._steps = tuple(_as_step(s) for s in steps)
        self.then = then
        self.value = value
        self.calls = 0
        self.started: list[float] = []

    def __repr__(self) -> str:
        return f"<ScriptedBackend {self.calls} of {len(self._steps)} steps played>"

    @property
    def steps(self) -> tuple[Step, ...]:
        """The script."""
        return self._steps

    def _next(self) -> Step:
        n = self.calls
        self.calls = n + 1
        self.started.append(_clock.monotonic())
        return self._steps[n] if n < len(self._steps) else self.then

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        step = self._next()
        if step.latency > 0:
            _clock.sleep(step.latency)
        if step.error is not None:
            raise step.error(f"scripted failure (call {self.calls})")
        return self.value

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """The async twin of calling the backend."""
        step = self._next()
        if step.latency > 0:
            await _clock.asleep(step.latency)
        if step.error is not None:
            raise step.error(f"scripted failure (call {self.calls})")
        return self.value


def _as_step(value: Step | bool) -> Step:
    if isinstance(value, Step):
        return value
    return Step(ConnectionError) if value else _SUCCESS

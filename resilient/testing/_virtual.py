"""
Virtual time: a clock that only moves when something sleeps, and an asyncio
event loop that lives on it.

``VirtualClock.install()`` swaps the three functions of the library's time seam
(:mod:`resilient._clock`: ``monotonic``, ``sleep``, ``asleep``), so every retry
sleep and every time reading of the strategies is virtual. Circuit breakers,
bulkheads, rate limiters and retry budgets read their clock from the seam when
they are *created*; installing therefore also sets the existing ones aside
(they are restored on uninstall), so those built under the clock live in
virtual time.

Async time budgets (per-attempt and total timeouts) are armed with
``loop.time()``/``loop.call_at``. They are virtual when the coroutine runs on a
:class:`VirtualTimeEventLoop` (``clock.run(main())``): its ``time()`` is the
clock, and whenever nothing is ready to run it jumps the clock to the next
timer instead of waiting. Minutes of retries, timeouts and breaker periods then
take milliseconds, and the interleaving of concurrent tasks is exactly the one
real time would give.

Why not a library: ``looptime`` (PyPI) fast-forwards a loop's time, but it owns
that time (it cannot share one clock with the synchronous seam and the
breakers) and it installs itself as a pytest plugin in every session of every
project that depends on us. ``aiotools``' virtual clock patches the loop's time
only inside a context manager and does not skip idle waits of the selector.
The loop below is a ~40-line subclass of the standard selector loop.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

__all__ = ["VirtualClock", "VirtualTimeEventLoop"]

T = TypeVar("T")

_real_asyncio_sleep = asyncio.sleep


class VirtualClock:
    """
    A monotonic clock that only moves when told to (``advance``) or when
    something sleeps through it.

    Use it as a context manager (or ``install()``/``uninstall()``) to route the
    library's time seam through it::

        with VirtualClock() as clock:
            call_that_retries()          # sleeps 0.1 + 0.2 + 0.4 s: instantly
            assert clock.now == pytest.approx(0.7)
            assert clock.sleeps == [0.1, 0.2, 0.4]

    Async code gets virtual timeouts too when it runs on the clock's loop::

        result = clock.run(main())       # asyncio.run on a VirtualTimeEventLoop

    Attributes:
        sleeps: Every delay that was slept through the clock, in order.
    """

    __slots__ = ("_installed", "_lock", "_now", "_saved", "sleeps")

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()
        self._saved: tuple[Any, Any] = ((), None)
        self._installed = 0
        self.sleeps: list[float] = []

    def __repr__(self) -> str:
        return f"<VirtualClock now={self._now:.6g}s>"

    # ------------------------------------------------------------------ time

    @property
    def now(self) -> float:
        """The current virtual time, in seconds."""
        return self._now

    def monotonic(self) -> float:
        """The current virtual time (``resilient._clock.monotonic`` while installed)."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by *seconds* (negative values are an error)."""
        if not seconds >= 0:
            msg = f"a clock only moves forward; cannot advance by {seconds!r}"
            raise ValueError(msg)
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        """Sleep *seconds* of virtual time: records the delay and advances the clock."""
        self.sleeps.append(seconds)
        if seconds > 0:
            self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        """
        Sleep *seconds* of virtual time in a coroutine.

        On this clock's :class:`VirtualTimeEventLoop` it is a real
        ``asyncio.sleep`` (the loop jumps ahead when idle, so concurrent tasks
        interleave as in real time); on any other loop it advances the clock
        and yields once.
        """
        self.sleeps.append(seconds)
        loop = asyncio.get_running_loop()
        if isinstance(loop, VirtualTimeEventLoop) and loop.clock is self:
            await _real_asyncio_sleep(seconds)
            return
        if seconds > 0:
            self.advance(seconds)
        await _real_asyncio_sleep(0)

    # --------------------------------------------------------------- install

    def install(self) -> None:
        """
        Route the library's time seam through this clock, and set the existing
        breakers, bulkheads, limiters and budgets aside so new ones are built
        on virtual time.
        Nestable; undone by the matching :meth:`uninstall`.
        """
        from resilient import _clock
        from resilient.testing._state import fresh_state

        self._installed += 1
        if self._installed > 1:
            return
        saved: list[tuple[str, Any]] = []
        seam = (("monotonic", self.monotonic), ("sleep", self.sleep), ("asleep", self.asleep))
        for name, value in seam:
            saved.append((name, getattr(_clock, name)))
            setattr(_clock, name, value)
        state = fresh_state()
        state.__enter__()
        self._saved = (saved, state)

    def uninstall(self) -> None:
        """Undo :meth:`install`: the real clock and the breakers of before come back."""
        from resilient import _clock

        if self._installed == 0:
            return
        self._installed -= 1
        if self._installed:
            return
        saved, state = self._saved
        self._saved = ((), None)
        for name, value in saved:
            setattr(_clock, name, value)
        if state is not None:
            state.__exit__(None, None, None)

    @property
    def installed(self) -> bool:
        """Whether the library's time seam currently goes through this clock."""
        return self._installed > 0

    def __enter__(self) -> VirtualClock:
        self.install()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    # ----------------------------------------------------------------- async

    def new_event_loop(self, *, poll_io: bool = True) -> VirtualTimeEventLoop:
        """A new event loop whose time is this clock (see :class:`VirtualTimeEventLoop`)."""
        return VirtualTimeEventLoop(self, poll_io=poll_io)

    def run(self, main: Coroutine[Any, Any, T], *, poll_io: bool = True) -> T:
        """``asyncio.run(main)`` on a :class:`VirtualTimeEventLoop` of this clock."""
        with asyncio.Runner(loop_factory=lambda: self.new_event_loop(poll_io=poll_io)) as runner:
            return runner.run(main)


class _IdleJumpSelector(selectors.BaseSelector):
    """
    Wraps the loop's real selector. A ``select(timeout)`` that finds nothing
    ready does not wait: it moves the clock forward by *timeout* (the time
    until the loop's next timer) and returns.

    ``select(None)`` (no timer at all) really waits: only I/O or another
    thread can wake the loop then.
    """

    def __init__(
        self, inner: selectors.BaseSelector, clock: VirtualClock, *, poll: bool = True
    ) -> None:
        self._inner = inner
        self._clock = clock
        self._poll = poll

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            return self._inner.select(None)
        if self._poll:
            ready = self._inner.select(0)
            if ready:
                return ready
        if timeout > 0:
            self._clock.advance(timeout)
        return []

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def get_key(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._inner.get_key(fileobj)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeEventLoop(asyncio.SelectorEventLoop):
    """
    An asyncio loop whose ``time()`` is a :class:`VirtualClock` and which jumps
    to its next timer whenever nothing is ready to run.

    Everything scheduled with ``call_at``/``call_later`` (``asyncio.sleep``,
    ``asyncio.timeout``, resilient's deadlines) fires in virtual time, in the
    same order as in real time. Waits on sockets or threads are real: time
    skips ahead of them when a timer is pending, so use this loop for code
    that waits on timers and on other coroutines only.
    """

    def __init__(self, clock: VirtualClock | None = None, *, poll_io: bool = True) -> None:
        """
        Args:
            clock: The clock to live on (default: a new one, starting at 0).
            poll_io: Check sockets for readiness on every turn of the loop. The
                simulator turns it off: it does no I/O, and it saves a system call
                per turn. Callbacks from other threads still run on the next turn.
        """
        self.clock = clock if clock is not None else VirtualClock()
        selector = _IdleJumpSelector(selectors.DefaultSelector(), self.clock, poll=poll_io)
        super().__init__(selector)

    def time(self) -> float:
        return self.clock._now

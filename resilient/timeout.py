"""
Time budgets for async calls, cheap enough to arm on every call.

``asyncio.timeout()`` schedules one ``TimerHandle`` per call (a heap push and a
heap removal) and builds a context-manager object: about 3 µs per call on a
small machine. A policy's per-attempt budget has one fixed duration, so the
deadlines of the calls it guards arrive in the order the calls started. We
exploit that (the idea of a timer wheel with a single slot): a FIFO of entries
per (event loop, duration) and at most *one* armed timer, for the oldest entry
still running. Arming costs an append, finishing costs a flag (and usually a
pop from the head). When the timer fires it cancels the tasks whose deadline
passed and re-arms itself for the next live entry.

Nothing here is written by hand for lack of a library: no library offers
deadlines that cost less than a timer handle per call.

Synchronous functions cannot be interrupted from their own thread; for them
the budgets are enforced *between* attempts only (see docs/timeouts.md).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["DONE", "FIRED", "DeadlineQueue", "deadline_queue", "settle"]


# An armed budget is a plain list [task, deadline, cancelling, done, fired]:
# building a five-item list costs half of building a slotted object with five
# attributes, and this happens on every guarded async call.
TASK, DEADLINE, CANCELLING, DONE, FIRED = range(5)


def settle(entry: list[Any], exc: BaseException | None) -> bool:
    """
    Settle *entry* when its guarded code ends; return true when the ending was
    caused by this budget (the caller then raises its timeout).
    """
    entry[DONE] = True
    if not entry[FIRED]:
        return False
    # Like asyncio.timeout: undo our cancel() and only claim the
    # CancelledError if nobody else cancelled the task meanwhile.
    remaining = entry[TASK].uncancel()
    return isinstance(exc, asyncio.CancelledError) and remaining <= entry[CANCELLING]


class DeadlineQueue:
    """Deadlines of one duration on one loop, with at most one timer armed."""

    __slots__ = ("_handle", "_monotonic", "_time", "duration", "loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, duration: float) -> None:
        self.loop = loop
        self.duration = duration
        self.queue: deque[list[Any]] = deque()
        self._handle: asyncio.TimerHandle | None = None
        # The stock loop's time() is a Python method around time.monotonic();
        # calling the C function directly saves a frame per call. Loops with a
        # clock of their own (uvloop, virtual-time test loops) keep theirs.
        self._time: Callable[[], float] = (
            time.monotonic
            if getattr(type(loop), "time", None) is asyncio.BaseEventLoop.time
            else loop.time
        )
        #: whether a ``time.monotonic()`` reading of the caller can stand for ``_time()``
        self._monotonic = self._time is time.monotonic

    def _compact(self) -> None:
        live = [entry for entry in self.queue if not entry[DONE]]
        if len(live) * 2 < len(self.queue):
            self.queue = deque(live)

    def _fire(self) -> None:
        self._handle = None
        now = self.loop.time()
        queue = self.queue
        while queue:
            entry = queue[0]
            if entry[DONE]:
                queue.popleft()
            elif entry[DEADLINE] <= now:
                queue.popleft()
                entry[FIRED] = True
                entry[TASK].cancel()
            else:
                self._handle = self.loop.call_at(entry[DEADLINE], self._fire)
                return


class _QueueCache:
    """
    The deadline queues of one budget, one per event loop.

    Threads with loops of their own share it, so nothing here is mutated in
    place where another thread may be reading: the last loop used is kept in
    one tuple, and the map of loops is copied, changed and swapped in whole
    (copy on write) under a lock taken only when a loop is seen for the first
    time. Readers never lock; they see the old map or the new one.
    """

    __slots__ = ("__weakref__", "_lock", "by_loop", "duration", "last")

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.by_loop: dict[asyncio.AbstractEventLoop, DeadlineQueue] = {}
        self.last: tuple[asyncio.AbstractEventLoop | None, DeadlineQueue | None] = (None, None)
        self._lock = threading.Lock()

    def get(self, loop: asyncio.AbstractEventLoop) -> DeadlineQueue:
        """The queue of *loop*, made on first use."""
        last_loop, queue = self.last
        if last_loop is loop and queue is not None:
            return queue
        queue = self.by_loop.get(loop)
        if queue is None:
            with self._lock:
                queue = self.by_loop.get(loop)  # another thread of this loop won
                if queue is None:
                    queue = DeadlineQueue(loop, self.duration)
                    # Forget the queues of closed loops (tests create many).
                    fresh = {lp: q for lp, q in self.by_loop.items() if not lp.is_closed()}
                    fresh[loop] = queue
                    self.by_loop = fresh
        self.last = (loop, queue)
        return queue

    def arm(self, task: asyncio.Task[Any]) -> list[Any]:
        """
        Start a budget for *task* on its loop's queue.

        This is the per-call path of every guarded async call, so it works on
        the queue's fields directly rather than through a method of the queue.
        """
        loop = task.get_loop()
        last_loop, queue = self.last
        if last_loop is not loop or queue is None:
            queue = self.get(loop)
        deadline = queue._time() + queue.duration
        entry: list[Any] = [task, deadline, task.cancelling(), False, False]
        entries = queue.queue
        while entries and entries[0][DONE]:
            entries.popleft()
        # Only a live entry left at the head (a slow call) lets the queue grow.
        if entries and len(entries) > 256 and not len(entries) & 255:
            queue._compact()
        entries.append(entry)
        if queue._handle is None:
            queue._handle = loop.call_at(deadline, queue._fire)
        return entry

    def arm_at(self, task: asyncio.Task[Any], now: float) -> list[Any]:
        """
        :meth:`arm`, for a caller that read ``time.monotonic()`` just before:
        the budget starts at *now* instead of at a reading of its own (a loop
        with a clock of its own still reads that). A twin of :meth:`arm`
        rather than an optional argument of it: an argument to test would cost
        every other call of :meth:`arm` more than the reading it saves.
        """
        loop = task.get_loop()
        last_loop, queue = self.last
        if last_loop is not loop or queue is None:
            queue = self.get(loop)
        deadline = (now if queue._monotonic else queue._time()) + queue.duration
        entry: list[Any] = [task, deadline, task.cancelling(), False, False]
        entries = queue.queue
        while entries and entries[0][DONE]:
            entries.popleft()
        # Only a live entry left at the head (a slow call) lets the queue grow.
        if entries and len(entries) > 256 and not len(entries) & 255:
            queue._compact()
        entries.append(entry)
        if queue._handle is None:
            queue._handle = loop.call_at(deadline, queue._fire)
        return entry


#: The queue caches in use, one per duration: every pipeline (and bulkhead) whose
#: budget has that duration shares one, so a process with thousands of policies
#: keeps one FIFO and at most one timer per (loop, duration) instead of one per
#: budget. Deadlines of one duration still arrive in the order they were armed,
#: whichever pipeline armed them, so the shared FIFO stays sorted. Weak values: a
#: duration that no pipeline uses any more is forgotten.
_CACHES: weakref.WeakValueDictionary[float, _QueueCache] = weakref.WeakValueDictionary()
_CACHES_LOCK = threading.Lock()


def deadline_queue(duration: float) -> _QueueCache:
    """
    The queue cache for budgets of *duration* seconds, shared by every pipeline
    and bulkhead with a budget of that duration (made on first use).
    """
    duration = float(duration)
    with _CACHES_LOCK:
        cache = _CACHES.get(duration)
        if cache is None:
            cache = _CACHES[duration] = _QueueCache(duration)
    return cache

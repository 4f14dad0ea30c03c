"""
Bulkheads: concurrency isolation with a priority queue, auto-scaling, a
thread pool per policy for sync functions, and pools of user resources.

One :class:`Bulkhead` serves async tasks (of any event loop) and threads at
the same time. Its state is a counter under a ``threading.Lock`` that is held
for a few bytecodes, never while user code runs:

* **Fast path.** ``try_acquire()`` takes a slot when one is free and nobody
  waits: one lock round trip, no allocation, no coroutine. ``release()`` gives
  it back the same way. That is cheaper than ``async with asyncio.Semaphore``,
  which creates two coroutines per call (see docs/performance.md).
* **Slow path.** When the bulkhead is full a caller joins a heap of waiters
  ordered by priority, then arrival. A released slot is *handed over* to the
  head waiter under the lock (its count never drops), so a newcomer cannot
  overtake a waiter. An async waiter waits on a future of its own loop (woken
  with ``call_soon_threadsafe`` from other threads or loops), a thread waits
  on a lock; the async waiters' ``acquire_timeout`` deadlines share one
  timer per loop (:mod:`resilient.timeout`'s deadline queues), as they all
  wait the same time. Timeouts and cancellations race with hand-overs;
  whoever takes the lock first wins, and a waiter that was handed a slot it no longer wants
  passes it on. Dead entries stay in the heap and are skipped (compacted when
  they outnumber live ones), so 10,000 cancellations cost O(n log n).

Aging needs no timer: with every waiter rising one level per ``priority_aging``
seconds, the order of two waiters never changes while they wait, so the heap
key ``enqueued / aging - level`` is fixed at entry.

Auto-scaling (:class:`_GradientLimit`) is a latency-gradient controller in the
manner of Envoy's adaptive concurrency filter and Netflix's concurrency-limits:
see its docstring and docs/bulkheads.md.

Nothing here is written by hand for lack of reading: asyncio.Semaphore is per
loop, not thread-safe and has no priorities or timeouts; ``threading.Semaphore``
blocks the loop; hyx's bulkhead is two asyncio semaphores. A bulkhead that
sync and async callers share must be its own primitive.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import inspect
import itertools
import math
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from resilient import _clock
from resilient._models import PRIORITIES, BulkheadConfig
from resilient._shared import SharedByName
from resilient.errors import BulkheadFullError, PolicyError, did_you_mean
from resilient.timeout import DONE, _QueueCache, deadline_queue

__all__ = [
    "Bulkhead",
    "BulkheadManager",
    "ConnectionPool",
    "bulkhead_manager",
    "current_priority",
    "get_bulkhead",
    "priority",
    "priority_level",
]

C = TypeVar("C")

_LEVELS: dict[str, int] = {name: i for i, name in enumerate(PRIORITIES)}
_log2 = math.log2
_hypot = math.hypot
_LN2 = math.log(2.0)
_LN2_SQUARED = _LN2 * _LN2
_LOG2_FLOOR = math.log2(1e-6)  # a zero or negative latency counts as 1 µs
_priority: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "resilient_priority", default=None
)
# The tokens of the ``priority`` blocks open in this context, innermost first, as
# a linked list of ``(token, outer)`` pairs: each context (task, thread) has its
# own, so one ``priority`` object can be entered by many of them at once.
_PriorityTokens = tuple[contextvars.Token[int | None], Any] | None
_priority_tokens: contextvars.ContextVar[_PriorityTokens] = contextvars.ContextVar(
    "resilient_priority_tokens", default=None
)


def priority_level(name: str) -> int:
    """
    The level of a priority name (``low`` 0 ... ``critical`` 3).

    Raises:
        PolicyError: *name* is not a priority; the message lists the known ones.
    """
    level = _LEVELS.get(name) if isinstance(name, str) else None
    if level is None:
        hint = did_you_mean(name, PRIORITIES)
        msg = f"unknown priority {name!r}{hint}; known priorities: {', '.join(PRIORITIES)}"
        raise PolicyError(msg)
    return level


class priority:  # lowercase: used like a function, `with resilient.priority("high"):`
    """
    Give every bulkhead wait inside the block a priority::

        with resilient.priority("high"):
            await checkout(cart)        # all calls it makes queue as "high"

    The priority lives in a context variable, so it follows the request through
    ``await`` and into tasks and threads started with a copied context. It wins
    over the decorator's ``priority=`` and the policy's ``default_priority``.

    One object can be made once and entered anywhere, at the same time, by any
    number of tasks and threads, and nested in itself: what a block must undo
    when it ends is kept in the context that entered it, not in the object.

    Raises:
        PolicyError: At construction, for an unknown priority name.
    """

    __slots__ = ("level", "name")

    def __init__(self, name: str) -> None:
        self.level = priority_level(name)
        self.name = name

    def __enter__(self) -> priority:
        token = _priority.set(self.level)
        _priority_tokens.set((token, _priority_tokens.get()))
        return self

    def __exit__(self, *exc: object) -> None:
        entered = _priority_tokens.get()
        if entered is None:
            msg = "resilient.priority: __exit__ without __enter__ in this context"
            raise RuntimeError(msg)
        token, outer = entered
        _priority_tokens.set(outer)
        _priority.reset(token)

    def __repr__(self) -> str:
        return f"resilient.priority({self.name!r})"


def current_priority() -> str | None:
    """The priority set by an enclosing ``resilient.priority`` block, or ``None``."""
    level = _priority.get()
    return None if level is None else PRIORITIES[level]


# --------------------------------------------------------------------------- waiters

_WAITING, _GRANTED, _ABANDONED = 0, 1, 2


class _Waiter:
    """One caller waiting for a slot; ``wake`` is called (outside the lock) once granted."""

    __slots__ = ("level", "loop", "signal", "since", "state")

    def __init__(self, signal: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        self.state = _WAITING
        self.signal = signal  # an asyncio.Future (async) or a held threading.Lock (sync)
        self.loop = loop
        # priority level and time of queueing: to order it again after a reload
        self.level = 0
        self.since = 0.0

    def wake(self) -> bool:
        """Tell the waiter it holds a slot; false if it can no longer be told."""
        loop = self.loop
        if loop is None:
            self.signal.release()
            return True
        if asyncio._get_running_loop() is loop:
            _resolve(self.signal, True)
            return True
        try:
            loop.call_soon_threadsafe(_resolve, self.signal, True)
        except RuntimeError:  # its loop is closed: nobody will ever take the slot
            return False
        return True


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class _Expiry:
    """
    The ``acquire_timeout`` of an async waiter, in the deadline queues of
    :mod:`resilient.timeout` (the waiters of one bulkhead all wait the same
    time, so their deadlines arrive in order: one timer armed per loop instead
    of a ``TimerHandle`` per waiter). The queue sees a task: it reads the
    loop and cancels it when the deadline passes; cancelling an expiry tells
    its waiter "no slot" (``False``), as a timer of its own did.
    """

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future = future

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.future.get_loop()

    def cancelling(self) -> int:
        return 0

    def cancel(self) -> bool:
        _resolve(self.future, False)
        return True


# --------------------------------------------------------------------------- auto-scaling


class _GradientLimit:
    """
    The auto-scaling controller: moves a concurrency limit between a floor and
    a ceiling from the latency and the utilisation of completed calls.

    Calls are grouped in windows of ``max(20, limit)`` completions (about one
    round trip of the whole limit, as TCP Vegas updates once per RTT). A window
    is summed up by the mean ``m`` of its log latencies (the log of its
    geometric mean, which a long tail cannot drag around) and its utilisation
    ``u`` (calls in flight, sampled at each completion and counting it, averaged
    over the window, divided by the limit). ``base`` is ``m`` measured at no
    load, ``tol = log(1 + latency_tolerance)``, and ``margin = Z * s *
    sqrt(1/n + 1/n_base)`` is how far the two means can differ by chance alone
    (``s``: the larger of the two standard deviations of log latency; ``Z = 3``,
    about one false alarm in 700 windows):

    * ``m - base > tol + margin``: latency rose *significantly* past the
      target, the dependency queues. The limit falls to the concurrency used
      times ``max(0.5, exp(tol - (m - base)))`` (Envoy's gradient, target over
      latency). A cut must be earned: past a knee latency follows concurrency,
      so when the window after a cut is still too slow although it ran fewer
      calls, and its latency fell by less than half as much as concurrency did,
      the rise is not caused by this load (the dependency got slower for
      everyone): the cut is undone and ``base`` re-measured by a probe.
    * else, when ``u >= scale_up_threshold``, the limit grows by
      ``max(1, limit * (1 - exp(m - base + margin - tol)))``: quickly while
      latency is surely below the target, by one near it (additive increase);
    * when ``u < scale_down_threshold``, it shrinks by 10%, not below the peak
      concurrency of the window divided by ``scale_up_threshold``;
    * else it holds.

    A window in which the event loop's own delay (measured with ``call_soon``
    probes, :meth:`_loop_delay`) is more than ``1 - exp(-tol)`` of its latency
    is not judged by latency at all: the loop's queueing, which a smaller limit
    cannot shorten, could explain any rise. Its utilisation alone moves the
    limit, as if the rise were zero, and it starts no probe.

    After any change, completions of calls admitted before it are left out
    (their start, ``now - latency``, is before the change): they measure the
    old limit. ``base`` comes from a *probe*: ten calls run at the floor
    concurrency (Envoy's minRTT measurement) at the first busy window, then
    every ``probe_interval`` seconds while a busy limit is below its ceiling,
    and when a cut is not earned (a routine probe is pooled with the previous
    ones, up to 40 calls; the others start afresh). Between probes it only falls, to the upper
    confidence bound of a window that is significantly faster. Until the first
    probe the first window stands in for it. So noise, however long its tail,
    neither cuts the limit (but for a rare one-window false alarm, after which
    a busy limit grows back) nor drags ``base`` down.
    """

    __slots__ = (
        "base",
        "base_n",
        "ceiling",
        "changed",
        "clock",
        "cut",
        "cut_n",
        "cut_use",
        "down",
        "effective",
        "floor",
        "lag_count",
        "lag_loop",
        "lag_sent",
        "lag_share",
        "lag_sum",
        "latencies",
        "limit",
        "load",
        "next_probe",
        "peak",
        "pending",
        "pooled",
        "probe_every",
        "probing",
        "ramp",
        "saved",
        "spread",
        "tolerance",
        "uncut",
        "up",
        "window",
    )

    #: Completions per window, at least (fewer make the means too noisy to compare).
    MIN_WINDOW = 20
    #: Calls measured at the floor concurrency by a probe.
    PROBE_SAMPLES = 10
    #: Standard errors a difference of means must exceed to count (one-sided).
    Z = 3.0
    #: Probes of the event loop's delay per window, at most.
    LAG_PROBES = 4

    def __init__(self, cfg: BulkheadConfig, ceiling: int, clock: Callable[[], float]) -> None:
        self.ceiling = float(ceiling)
        self.floor = float(min(cfg.min_concurrent_requests, ceiling))
        self.tolerance = math.log1p(cfg.latency_tolerance)
        self.up = cfg.scale_up_threshold
        self.down = cfg.scale_down_threshold
        self.probe_every = cfg.probe_interval
        self.clock = clock
        self.limit = self.ceiling
        self.effective = ceiling
        self.window = max(self.MIN_WINDOW, ceiling)
        # the current window: the latency of each completion (their logs are
        # taken once, when the window ends), the sum of calls in flight at the
        # completions, the most calls in flight
        self.latencies: list[float] = []
        self.load = 0
        self.peak = 0
        # The event loop's own delay (see _lagging): the probe in flight (sent
        # at ``lag_sent`` on ``lag_loop``; -1: none) and the sum and number of
        # the delays measured in this window; a window is not judged by
        # latency when the loop's delay is more than ``lag_share`` of it.
        self.lag_sum = 0.0
        self.lag_count = 0
        self.lag_sent = -1.0
        self.lag_loop: asyncio.AbstractEventLoop | None = None
        self.lag_share = -math.expm1(-self.tolerance)  # 1 - 1 / (1 + latency_tolerance)
        # calls admitted before the last change of the limit, still to leave out
        self.pending = 0
        self.changed = 0.0
        # the no-load reference: mean and variance of log latency, sample count
        # (0: none yet)
        self.base = 0.0
        self.spread = 0.0
        self.base_n = 0
        # the window that caused the last cut (``cut`` infinite: the last
        # window did not cut), and the limit before it
        self.cut = math.inf
        self.cut_n = 1
        self.cut_use = 1.0
        self.uncut = self.ceiling
        self.next_probe = -math.inf
        self.probing = False
        self.pooled = False  # the running probe adds to base instead of replacing it
        self.saved = self.ceiling
        self.ramp = False  # the window after a probe: its calls were admitted in a burst

    # Bulkhead.release_timed adds each completed call to the window (inlined
    # there for speed) and calls _end_window when it is full.

    def _loop_delay(self) -> float | None:
        """
        The event loop's own delay in this window: the mean of its probes
        (``call_soon`` callbacks, see :meth:`watch_loop`); ``None`` in the first
        window on a loop (not measured yet), 0 for a thread.

        A call's latency includes the wait of its task in the loop's ready
        queue after the dependency answered. With many tasks ready at once
        (a CPU-bound service, or just 1,000 tasks doing fast I/O) that wait
        grows with the number of tasks: it looks like a dependency past its
        knee, yet a smaller limit cannot shorten it, only add a queue of
        waiters.
        """
        here = asyncio._get_running_loop()
        if here is None:
            return 0.0
        loop = self.lag_loop
        if loop is None:
            return None
        total, count = self.lag_sum, self.lag_count
        sent = self.lag_sent
        if sent >= 0.0 and loop is here:  # not back yet: the delay is at least this long
            total += self.clock() - sent
            count += 1
        return total / count if count else 0.0

    def watch_loop(self) -> None:
        """
        At the start of a window, under the bulkhead's lock: measure the delay
        of the running event loop with a probe, a ``call_soon`` callback that
        sends the next one when it runs, at most ``LAG_PROBES`` per window. One
        callback per loop turn at the most, in a window of at least 20 calls:
        less than one callback per five calls even with a single task.
        """
        self.lag_sum, self.lag_count = 0.0, 0
        loop = asyncio._get_running_loop()
        if loop is None or (self.lag_sent >= 0.0 and self.lag_loop is loop):
            return  # no loop, or the probe on its way counts for this window
        self.lag_loop = loop
        self.lag_sent = sent = self.clock()
        loop.call_soon(self._lag_seen, sent)

    def _lag_seen(self, sent: float) -> None:
        # Runs on the loop without the bulkhead's lock: what it changes only
        # steers _lagging, and a sample lost to a race with a thread is harmless.
        if self.lag_sent != sent:
            return  # replaced by a probe on another loop
        now = self.clock()
        self.lag_sum += now - sent
        self.lag_count += 1
        loop = self.lag_loop
        if self.lag_count < self.LAG_PROBES and loop is not None:
            self.lag_sent = now
            loop.call_soon(self._lag_seen, now)
        else:
            self.lag_sent = -1.0

    def _set(self, limit: float, in_flight: int) -> None:
        effective = max(1, int(limit + 0.5))
        if effective != self.effective:
            self.pending = in_flight
            self.changed = self.clock()
        self.limit = limit
        self.effective = effective
        self.window = max(self.MIN_WINDOW, effective)

    def _probe(self, saved: float, in_flight: int, *, pooled: bool) -> None:
        self.next_probe = self.clock() + self.probe_every
        self.probing = True
        self.pooled = pooled
        self.saved = saved
        self.cut = math.inf
        self._set(self.floor, in_flight)
        self.window = self.PROBE_SAMPLES

    def _end_window(self, in_flight: int) -> None:
        latencies = self.latencies
        n = len(latencies)
        # The logs once per window, in C loops (a call only appends its
        # latency): log2 is a quarter of the cost of math.log, whose optional
        # base argument goes through a slow path; hypot(*logs) ** 2 is their
        # sum of squares without a Python loop. Both scale back to natural logs.
        try:
            logs = list(map(_log2, latencies))
        except ValueError:  # zero (virtual time) or a clock that went back
            logs = [_log2(x) if x > 0.0 else _LOG2_FLOOR for x in latencies]
        sx = sum(logs) * _LN2
        mean = sx / n
        sxx = _hypot(*logs) ** 2 * _LN2_SQUARED
        var = max(0.0, (sxx - sx * mean) / (n - 1)) if n > 1 else 0.0
        mean_in_use = self.load / n
        peak = self.peak
        utilisation = mean_in_use / self.effective
        self.latencies, self.load, self.peak = [], 0, 0
        if self.probing:
            self.probing = False
            w = min(self.base_n, 4 * self.PROBE_SAMPLES) if self.pooled else 0
            if w:  # a routine probe: pool it with the last ones (10 calls are few)
                total = w + n
                pooled = (w * self.base + n * mean) / total
                self.spread = (
                    (w - 1) * self.spread + (n - 1) * var + w * n / total * (self.base - mean) ** 2
                ) / (total - 1)
                self.base, self.base_n = pooled, total
            else:
                self.base, self.spread, self.base_n = mean, var, n
            self.ramp = True
            self._set(self.saved, in_flight)
            return
        delay = self._loop_delay()
        if delay is not None and delay > self.lag_share * math.exp(mean):
            # The loop's own queueing could explain a rise past the tolerance:
            # this latency says nothing about the dependency, and a smaller
            # limit would only move the queue from the loop into the bulkhead.
            # Utilisation alone decides, as if latency were at the no-load
            # level (the growth of rule 2 with no rise), and no probe starts.
            self.ramp = False
            self.cut = math.inf
            limit = self.limit
            if utilisation >= self.up:
                limit = min(self.ceiling, limit + max(1.0, limit * self.lag_share))
            elif utilisation < self.down:
                limit = max(self.floor, min(limit, max(limit * 0.9, peak / self.up)))
            self._set(limit, in_flight)
            return
        if not self.base_n:
            self.base, self.spread, self.base_n = mean, var, n
        ramp, self.ramp = self.ramp, False
        # Either estimate of the spread may be low by chance: take the larger.
        sigma = math.sqrt(max(var, self.spread))
        margin = self.Z * sigma * math.sqrt(1.0 / n + 1.0 / self.base_n)
        rise = mean - self.base
        queueing = rise > self.tolerance + margin
        limit = self.limit
        cut, self.cut = self.cut, math.inf
        if queueing:
            if cut < math.inf and mean_in_use < self.cut_use:
                # Past a knee latency follows concurrency: after the last cut
                # it should have fallen about as much as the calls in flight.
                expected = math.log(self.cut_use / mean_in_use)
                noise = self.Z * sigma * math.sqrt(1.0 / n + 1.0 / self.cut_n)
                if cut - mean + noise < 0.5 * expected:
                    # It did not: the rise is not caused by this load. Undo
                    # the cut and measure the no-load latency again.
                    self._probe(self.uncut, in_flight, pooled=False)
                    return
            if not ramp:  # a burst of admissions is no reference for the next window
                self.cut, self.cut_n, self.cut_use, self.uncut = mean, n, mean_in_use, limit
            gradient = max(0.5, math.exp(self.tolerance - rise))  # target / latency
            limit = max(self.floor, min(limit, mean_in_use) * gradient)
        else:
            if rise + margin < 0:  # significantly faster than base: base was stale
                self.base = mean + margin
            if utilisation >= self.up:
                headroom = 1.0 - math.exp(rise + margin - self.tolerance)
                limit = min(self.ceiling, limit + max(1.0, limit * headroom))
            elif utilisation < self.down:
                limit = max(self.floor, min(limit, max(limit * 0.9, peak / self.up)))
        self._set(limit, in_flight)
        # Probe at the first busy window, then every probe_interval while a busy
        # limit is below its ceiling, where the no-load latency decides where it
        # goes. At the ceiling with latency in range a probe would only cost a
        # burst of queueing; a stale base shows up as a cut that is not earned.
        if (
            utilisation >= self.up
            and not queueing
            and self.floor < limit
            and (limit < self.ceiling or self.next_probe == -math.inf)
            and self.clock() >= self.next_probe
        ):
            # the first probe replaces the stand-in; later ones add to it
            self._probe(limit, in_flight, pooled=self.next_probe > -math.inf)


# --------------------------------------------------------------------------- thread pool


class _DaemonPool:
    """
    A fixed-size pool of daemon threads.

    ``concurrent.futures.ThreadPoolExecutor`` joins its workers at interpreter
    exit, so a single call hung in a dependency would hang the shutdown of the
    whole process: the very failure isolation is meant to contain. The bulkhead
    admits at most ``size`` calls, so no queue builds up here.
    """

    __slots__ = ("_idle", "_lock", "_queue", "_threads", "name", "size")

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def resize(self, size: int) -> None:
        """Allow *size* threads from now on (extra idle threads stay, the bulkhead bounds use)."""
        with self._lock:
            self.size = size

    def submit(self, run: Callable[[], None]) -> None:
        self._queue.put(run)
        with self._lock:
            if self._idle:
                self._idle -= 1
                return
            if self._threads >= self.size:
                return
            self._threads += 1
            number = self._threads
        threading.Thread(
            target=self._work, name=f"resilient-{self.name}-{number}", daemon=True
        ).start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            get()()
            with self._lock:
                self._idle += 1


# --------------------------------------------------------------------------- bulkhead


def _scaling(config: BulkheadConfig) -> tuple[Any, ...]:
    """The settings of the auto-scaling controller (a reload keeps it when they are unchanged)."""
    return (
        config.min_concurrent_requests,
        config.latency_tolerance,
        config.scale_up_threshold,
        config.scale_down_threshold,
        config.probe_interval,
    )


class Bulkhead:
    """
    The concurrency limit of one policy (or of one ``name=``), shared by every
    call of it, async and sync.

    Use it through a policy's ``bulkhead:`` section; directly, ``async with
    bulkhead:`` and ``with bulkhead:`` take and give back a slot.

    Attributes:
        name: The policy (or ``name=``) it belongs to.
        config: Its section.
        limit: The current concurrency limit.
        in_use: Slots taken now.
        rejected: Calls refused so far.
    """

    __slots__ = (
        "_acq",
        "_aging",
        "_clock",
        "_dead",
        "_deadlines",
        "_heap",
        "_lock",
        "_pool",
        "_prioritise",
        "_rel",
        "_seq",
        "acquire_timeout",
        "config",
        "controller",
        "default_level",
        "in_use",
        "limit",
        "max_queue",
        "name",
        "pooled",
        "queued",
        "rejected",
    )

    def __init__(
        self, name: str, config: BulkheadConfig, *, clock: Callable[[], float] | None = None
    ) -> None:
        self.name = name
        self._clock = clock or _clock.monotonic
        self._lock = threading.Lock()
        self._acq = self._lock.acquire
        self._rel = self._lock.release
        self.in_use = 0
        self.queued = 0
        self.rejected = 0
        self._heap: list[tuple[float, int, _Waiter]] = []
        self._dead = 0
        self._seq = itertools.count()
        self._pool: _DaemonPool | None = None
        self.controller: _GradientLimit | None = None
        self._apply(config)

    def _apply(self, config: BulkheadConfig) -> None:
        """Set what *config* decides (at construction, or under the lock at a reload)."""
        old = getattr(self, "config", None)
        self.config = config
        self.pooled = config.isolation == "thread_pool"
        ceiling = config.max_concurrent_requests
        if self.pooled:
            ceiling = min(ceiling, config.max_thread_pool_size)
        if not config.enable_auto_scaling:
            self.controller = None
            self.limit = ceiling
        elif (
            self.controller is None
            or old is None
            or _scaling(old) != _scaling(config)
            or self.controller.ceiling != ceiling
        ):
            self.controller = controller = _GradientLimit(config, ceiling, self._clock)
            self.limit = controller.effective
            if self.in_use:  # their latencies measure the old limit
                controller.pending = self.in_use
                controller.changed = self._clock()
        # else: the same controller goes on with what it learnt
        self.max_queue = config.max_queue
        if old is None or old.acquire_timeout != config.acquire_timeout:
            # Made at the first async wait. Waiters already queued keep the
            # deadline (and the queue) they had.
            self._deadlines: _QueueCache | None = None
        self.acquire_timeout = config.acquire_timeout
        self.default_level = _LEVELS[config.default_priority]
        self._prioritise = config.priority_queuing
        self._aging = config.priority_aging
        if self._pool is not None:
            self._pool.resize(config.max_thread_pool_size)

    def reconfigure(self, config: BulkheadConfig) -> Bulkhead:
        """
        Take a new section (a reload changed it) and return this bulkhead.

        The bulkhead stays the same object, so the calls in flight hold slots
        of the new limit until they end, and the waiters keep their place: a
        reload from 4 to 5 lets one more call in, never 4 + 5. A smaller limit
        admits nobody until enough calls have left. Waiters are ordered again
        when the priority settings changed; an auto-scaling controller keeps
        what it learnt unless its own settings (or the ceiling) changed.
        """
        with self._lock:
            if config == self.config:
                return self
            self._apply(config)
            if self._heap:
                # same arrival numbers: ties still go in arrival order
                self._heap = [
                    (self._key(w.level, w.since), seq, w)
                    for _key, seq, w in self._heap
                    if w.state == _WAITING
                ]
                heapq.heapify(self._heap)
                self._dead = 0
            woken = self._grant()
        self._wake(woken)
        return self

    def __repr__(self) -> str:
        return (
            f"<Bulkhead {self.name!r} in_use={self.in_use} limit={self.limit} "
            f"queued={self.queued} rejected={self.rejected}>"
        )

    # ------------------------------------------------------------ hot path

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits; never blocks."""
        self._acq()
        if self.in_use < self.limit and not self.queued:
            self.in_use += 1
            self._rel()
            return True
        self._rel()
        return False

    def release(self) -> None:
        """Give a slot back (handing it to the first waiter, if any)."""
        self._acq()
        self.in_use -= 1
        if self.queued:
            woken = self._grant()
            self._rel()
            self._wake(woken)
            return
        self._rel()

    def release_timed(self, latency: float) -> None:
        """``release()`` plus a latency sample for auto-scaling (seconds the call took)."""
        self._acq()
        c = self.controller  # under the lock: a reload may replace it
        # The controller's per-call bookkeeping, inlined (this is the hot path).
        if c is None:
            pass
        elif c.pending and c.clock() - latency < c.changed:
            # Admitted before the limit last changed: its latency measures the
            # old limit, and counting it would lower the limit again and again.
            c.pending -= 1
        else:
            in_use = self.in_use  # counts this call
            c.load += in_use
            if in_use > c.peak:
                c.peak = in_use
            latencies = c.latencies
            latencies.append(latency)  # its log is taken when the window ends
            if len(latencies) >= c.window:
                c._end_window(in_use - 1)
                self.limit = c.effective
                c.watch_loop()
        self.in_use -= 1
        if self.queued and self.in_use < self.limit:
            woken = self._grant()
            self._rel()
            self._wake(woken)
            return
        self._rel()

    # ------------------------------------------------------------ slow path

    def _grant(self) -> list[_Waiter]:
        """Under the lock: hand free slots to the first waiters."""
        heap = self._heap
        woken: list[_Waiter] = []
        while self.queued and self.in_use < self.limit:
            waiter = heapq.heappop(heap)[2]
            if waiter.state != _WAITING:
                self._dead -= 1
                continue
            waiter.state = _GRANTED
            self.queued -= 1
            self.in_use += 1
            woken.append(waiter)
        return woken

    def _wake(self, woken: list[_Waiter]) -> None:
        for waiter in woken:
            if not waiter.wake():
                self.release()

    def _level(self, level: int | None) -> int:
        # An enclosing `priority` block wins, then the caller's level, then the policy's.
        context = _priority.get()
        if context is not None:
            return context
        return self.default_level if level is None else level

    def _enqueue(self, waiter: _Waiter, level: int) -> bool:
        """Under the lock: take a free slot (false) or join the queue (true); raise if full."""
        self._acq()
        try:
            if self.in_use < self.limit and not self.queued:
                self.in_use += 1
                return False
            if self.queued >= self.max_queue or self.acquire_timeout <= 0:
                self.rejected += 1
                raise self._full("its waiting queue is full" if self.max_queue else "it is full")
            waiter.level = level
            waiter.since = since = self._clock()
            heapq.heappush(self._heap, (self._key(level, since), next(self._seq), waiter))
            self.queued += 1
            return True
        finally:
            self._rel()

    def _key(self, level: int, since: float) -> float:
        """The heap key of a waiter of *level* queued at *since* (smaller goes first)."""
        if not self._prioritise:
            return 0.0
        if self._aging is None:
            return -float(level)
        return since / self._aging - level

    def _abandon(self, waiter: _Waiter, *, timed_out: bool) -> bool:
        """A waiter gives up; true if it was granted a slot meanwhile (it now holds it)."""
        with self._lock:
            if waiter.state == _GRANTED:
                return True
            waiter.state = _ABANDONED
            self.queued -= 1
            self._dead += 1
            if timed_out:
                self.rejected += 1
            if self._dead > 64 and self._dead > self.queued:
                self._heap = [entry for entry in self._heap if entry[2].state == _WAITING]
                heapq.heapify(self._heap)
                self._dead = 0
            return False

    def _full(self, why: str) -> BulkheadFullError:
        return BulkheadFullError(
            f"policy {self.name!r}: bulkhead full ({self.in_use}/{self.limit} in use, "
            f"{self.queued} waiting): {why}",
            policy=self.name,
        )

    async def acquire_async(self, level: int | None = None) -> None:
        """
        Take a slot, waiting up to ``acquire_timeout`` seconds (never blocks the loop).

        Args:
            level: Priority level of this caller (``priority_level("high")``);
                an enclosing ``priority`` block wins over it, and without
                either the policy's ``default_priority`` applies.

        Raises:
            BulkheadFullError: No slot within the timeout, or the queue is full.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        waiter = _Waiter(future, loop)
        if not self._enqueue(waiter, self._level(level)):
            return
        # One timer per loop for all the waiters, not a TimerHandle each.
        deadlines = self._deadlines
        if deadlines is None:  # (two threads may both make one: either will do)
            deadlines = self._deadlines = deadline_queue(self.acquire_timeout)
        entry = deadlines.arm(cast("asyncio.Task[Any]", _Expiry(future)))
        try:
            granted = await future
        except BaseException:
            entry[DONE] = True
            if self._abandon(waiter, timed_out=False):
                self.release()
            raise
        entry[DONE] = True
        if granted or self._abandon(waiter, timed_out=True):
            return
        raise self._full(f"no slot within {self.acquire_timeout}s")

    def acquire_sync(self, level: int | None = None) -> None:
        """The blocking twin of :meth:`acquire_async`, for threads."""
        signal = threading.Lock()
        signal.acquire()
        waiter = _Waiter(signal, None)
        if not self._enqueue(waiter, self._level(level)):
            return
        try:
            granted = signal.acquire(timeout=self.acquire_timeout)
        except BaseException:
            if self._abandon(waiter, timed_out=False):
                self.release()
            raise
        if granted or self._abandon(waiter, timed_out=True):
            return
        raise self._full(f"no slot within {self.acquire_timeout}s")

    # ------------------------------------------------------------ thread pool

    def run_in_pool(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_timeout: Callable[[], BaseException],
    ) -> Any:
        """
        Run *fn* in the policy's own threads; the caller must hold a slot, which
        is given back when *fn* ends (not when the caller stops waiting, so a
        hung call keeps its slot and the pool never overcommits).

        Raises:
            BaseException: What *fn* raised, or ``on_timeout()`` when it ran
                longer than *timeout* (the thread is left to finish on its own).
        """
        future: Future[Any] = Future()
        self._submit(future, fn, args, kwargs)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():
                return future.result()
            raise on_timeout() from None

    def _submit(self, future: Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        pool = self._pool
        if pool is None:
            with self._lock:
                pool = self._pool
                if pool is None:
                    pool = self._pool = _DaemonPool(self.config.max_thread_pool_size, self.name)
        context = contextvars.copy_context()
        timed = self.controller is not None
        clock = self._clock

        def run() -> None:
            began = clock() if timed else 0.0
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = context.run(fn, *args, **kwargs)
                    except BaseException as exc:
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                if timed:
                    self.release_timed(clock() - began)
                else:
                    self.release()

        try:
            pool.submit(run)
        except BaseException:
            self.release()
            raise

    # ------------------------------------------------------------ context managers

    async def __aenter__(self) -> Bulkhead:
        if not self.try_acquire():
            await self.acquire_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __enter__(self) -> Bulkhead:
        if not self.try_acquire():
            self.acquire_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # ------------------------------------------------------------ status

    def get_status(self) -> dict[str, Any]:
        """In use, waiting, limit, rejected and utilisation (in use / limit), as a dict."""
        with self._lock:
            in_use, queued, limit, rejected = self.in_use, self.queued, self.limit, self.rejected
        return {
            "name": self.name,
            "kind": "thread_pool" if self.pooled else "semaphore",
            "in_use": in_use,
            "queued": queued,
            "limit": limit,
            "max_limit": self.config.max_concurrent_requests,
            "rejected": rejected,
            "utilisation": in_use / limit if limit else 1.0,
        }


# --------------------------------------------------------------------------- connection pools


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class ConnectionPool(Generic[C]):
    """
    A bounded pool of resources you create yourself (clients, sockets,
    sessions) for libraries that have no pool of their own::

        pool = resilient.bulkhead_manager.connection_pool("db", connect, close=Conn.close)
        async with pool.connection() as conn:
            await conn.execute(sql)

    At most ``max_size`` resources exist; a caller waits for one like for a
    bulkhead slot (same priorities, ``acquire_timeout``, ``BulkheadFullError``).

    Args:
        name: Pool name (in ``get_all_pools_status()``).
        factory: Makes a resource; sync or async.
        max_size: Most resources at once (default: the policy's
            ``max_connection_pool_size``, 20).
        validate: Checked at checkout (sync or async); a resource for which it
            returns false is closed and replaced.
        close: Closes a resource (sync or async).
        discard_on_error: Close a resource whose ``async with`` block raised,
            instead of putting it back (it may be broken).
        config: Acquire timeout, queue bound and priorities come from it.
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], C | Awaitable[C]],
        *,
        max_size: int | None = None,
        validate: Callable[[C], bool | Awaitable[bool]] | None = None,
        close: Callable[[C], Any] | None = None,
        discard_on_error: bool = True,
        config: BulkheadConfig | None = None,
    ) -> None:
        base = config or BulkheadConfig()
        size = max_size if max_size is not None else base.max_connection_pool_size
        if size <= 0:
            msg = f"max_size must be positive, got {size}"
            raise PolicyError(msg, policy=name)
        cfg = base.model_copy(
            update={
                "max_concurrent_requests": size,
                "enable_auto_scaling": False,
                "isolation": "semaphore",
                "min_concurrent_requests": 1,
            }
        )
        self.name = name
        self.max_size = size
        self.slots = Bulkhead(name, cfg)
        self._factory = factory
        self._validate = validate
        self._close = close
        self._discard_on_error = discard_on_error
        self._idle: deque[C] = deque()
        self._closing: set[asyncio.Future[Any]] = set()  # async closes still running
        self.created = 0
        self.closed = 0

    @contextlib.asynccontextmanager
    async def connection(self, priority: str | None = None) -> AsyncIterator[C]:
        """
        Check a resource out for the block; it goes back (or is closed) at the end.

        A cancellation at any point (waiting for a slot, in ``factory``,
        ``validate`` or ``close``, or inside the block) gives the slot back and
        never loses a resource: one taken from the idle set goes back to it or
        is closed.
        """
        slots = self.slots
        if not slots.try_acquire():
            await slots.acquire_async(priority_level(priority) if priority else None)
        try:
            conn = await self._checkout()
        except BaseException:
            slots.release()
            raise
        ok = False
        try:
            yield conn
            ok = True
        finally:
            try:
                if ok or not self._discard_on_error:
                    self._idle.append(conn)
                else:
                    # The block's own exception is what the caller sees, not
                    # a failure to close a resource that is likely broken.
                    with contextlib.suppress(Exception):
                        await self._dispose(conn)
            finally:
                slots.release()

    async def _checkout(self) -> C:
        idle = self._idle
        validate = self._validate
        while idle:
            conn = idle.pop()
            if validate is None:
                return conn
            try:
                valid = validate(conn)
                if inspect.isawaitable(valid):
                    valid = await valid
            except BaseException:
                # Cancelled (or failed) half-way through a check: the resource
                # is in an unknown state, so it is closed rather than reused.
                with contextlib.suppress(Exception):
                    await self._dispose(conn)
                raise
            if valid:
                return conn
            await self._dispose(conn)
        conn = await _maybe_await(self._factory())
        self.created += 1
        return conn

    async def _dispose(self, conn: C) -> None:
        """
        Close *conn*. An async ``close`` runs as a task of its own that a
        cancellation of the caller does not interrupt (the caller stops waiting
        for it; the resource is still closed).
        """
        self.closed += 1
        if self._close is None:
            return
        closing = self._close(conn)
        if not inspect.isawaitable(closing):
            return
        task = asyncio.ensure_future(closing)
        if task.done():
            task.result()
            return
        self._closing.add(task)
        task.add_done_callback(self._closed)
        await asyncio.shield(task)

    def _closed(self, task: asyncio.Future[Any]) -> None:
        self._closing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: whoever awaited it has seen it

    async def aclose(self) -> None:
        """Close every idle resource, and wait for closes still running on this loop."""
        while self._idle:
            await self._dispose(self._idle.pop())
        loop = asyncio.get_running_loop()
        running = [task for task in self._closing if task.get_loop() is loop]
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    def get_status(self) -> dict[str, Any]:
        """The bulkhead status plus ``idle``, ``size`` (open resources) and ``max_size``."""
        status = self.slots.get_status()
        status.update(
            kind="connection_pool",
            idle=len(self._idle),
            size=self.created - self.closed,
            max_size=self.max_size,
        )
        return status


# --------------------------------------------------------------------------- manager


def _make_bulkhead(
    name: str, config: BulkheadConfig, _backend: object, previous: Bulkhead | None
) -> Bulkhead:
    """
    The maker of the shared bulkheads: a changed section reconfigures the
    bulkhead it replaces (the same object), so that the calls in flight on it
    and the callers waiting for it carry over to the new limit.
    """
    if previous is not None:
        return previous.reconfigure(config)
    return Bulkhead(name, config, clock=_clock.monotonic)


class BulkheadManager:
    """
    Every bulkhead and connection pool of the process, by name (the seed's
    ``bulkhead_manager``). Bulkheads are made by the pipelines, one per policy
    name (or ``name=``), and kept across reloads while their section is unchanged.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bulkheads: SharedByName[Bulkhead] = SharedByName(
            "bulkhead",
            "bulkhead",
            _make_bulkhead,
            uses_backend=False,
        )
        self._pools: dict[str, ConnectionPool[Any]] = {}

    @property
    def table(self) -> SharedByName[Bulkhead]:
        """The bulkheads by name (:mod:`resilient._shared`)."""
        return self._bulkheads

    def get(self, name: str) -> Bulkhead:
        """
        The bulkhead of policy (or ``name=``) *name*.

        Raises:
            PolicyError: No such bulkhead, and no policy of that name with a
                ``bulkhead`` section.
        """
        from resilient.runtime import runtime

        return runtime.lookup(self._bulkheads, name)

    def bulkheads(self) -> dict[str, Bulkhead]:
        """Every bulkhead made so far, by name."""
        return self._bulkheads.all()

    def connection_pool(
        self,
        name: str,
        factory: Callable[[], C | Awaitable[C]],
        **options: Any,
    ) -> ConnectionPool[C]:
        """
        Make (or return the existing) connection pool *name*; *options* are those
        of :class:`ConnectionPool`. When a policy called *name* has a ``bulkhead``
        section, its ``max_connection_pool_size``, ``acquire_timeout``,
        ``max_queue`` and priorities apply.
        """
        with self._lock:
            known = self._pools.get(name)
            if known is not None:
                return known
        if "config" not in options:
            from resilient.runtime import runtime

            with contextlib.suppress(PolicyError):
                options["config"] = runtime.registry.get(name).bulkhead
        pool: ConnectionPool[C] = ConnectionPool(name, factory, **options)
        with self._lock:
            return self._pools.setdefault(name, pool)

    def connection(self, name: str, priority: str | None = None) -> Any:
        """``async with manager.connection("db") as conn``: check out of pool *name*."""
        pool = self._pools.get(name)
        if pool is None:
            msg = f"no connection pool {name!r}; make it with connection_pool({name!r}, factory)"
            raise PolicyError(msg, policy=name)
        return pool.connection(priority)

    def get_pool_status(self, name: str) -> dict[str, Any]:
        """Status of one bulkhead or connection pool."""
        pool = self._pools.get(name)
        return pool.get_status() if pool is not None else self.get(name).get_status()

    def get_all_pools_status(self) -> dict[str, dict[str, Any]]:
        """
        Per bulkhead and connection pool: ``in_use``, ``queued``, ``limit``,
        ``rejected``, ``utilisation`` (and ``kind``, ``max_limit``; pools add
        ``idle``, ``size`` and ``max_size``).
        """
        status = {name: b.get_status() for name, b in self._bulkheads.all().items()}
        status.update({name: p.get_status() for name, p in list(self._pools.items())})
        return status

    def reset(self) -> None:
        """Forget every bulkhead and pool (tests)."""
        self._bulkheads.clear()
        with self._lock:
            self._pools.clear()


bulkhead_manager = BulkheadManager()


def get_bulkhead(name: str) -> Bulkhead:
    """The bulkhead shared by every call of policy *name* (see ``BulkheadManager.get``)."""
    return bulkhead_manager.get(name)

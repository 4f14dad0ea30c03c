"""
The circuit breaker: closed, open and half-open, on pybreaker's state model.

Why by hand, on pybreaker's model
=================================

We reuse what pybreaker defines *as a model*: its state names
(``"closed"``, ``"open"``, ``"half-open"``), its listener protocol
(``CircuitBreakerListener.state_change/failure/success``, so existing
pybreaker listeners plug in unchanged). Shared state goes through a state
backend (:mod:`resilient.backends`), not pybreaker's storage objects. We do
**not** use ``pybreaker.CircuitBreaker.call``, because:

* it holds an ``RLock`` for the whole guarded call, so concurrent callers of
  one breaker run one after another (docs/architecture.md);
* in half-open state it lets *every* caller through instead of a fixed number
  of trial calls;
* it only counts consecutive failures: no sliding window, failure rate, slow
  calls, growing open durations or half-open timeout;
* it costs more than a microsecond per call, most of it in its state objects
  and storage properties.

Instead the pipeline drives this breaker with a *permit protocol* and runs the
user function itself, with no lock held::

    token = breaker.acquire()          # may raise CircuitOpenError
    try:
        result = fn()
    except asyncio.CancelledError:
        breaker.on_cancel(token)
        raise
    except BaseException as exc:
        breaker.on_failure(token, exc, duration)
        raise
    breaker.on_success(token, duration)

A short ``threading.Lock`` guards counters and transitions, never user code.
Listeners are called after the lock is released.

What lives where
================

* State, counters (consecutive failures, the sliding window, half-open
  trial permits, totals) and trip count are plain slotted attributes.
* With a shared backend the breaker is a *member*
  (:class:`resilient.backends.protocol.BreakerMember`): it calls
  ``backend.attach(self)`` once, and the backend talks to it only through
  ``fleet_snapshot``, ``adopt``, ``set_offline``, ``merge_window`` and
  ``after_fork``, from its own threads, never on a call path.

Tokens
======

``acquire()`` returns an opaque ``int``. Each transition bumps a generation
number ``gen``; an ordinary call admitted in closed state gets ``2 * gen`` (0
until the first transition) and a half-open trial permit gets
``2 * gen + 1``. A result whose token belongs to an earlier generation (the
breaker tripped, was reset, ...) updates only the lifetime totals and never the
current state. Negative tokens mark calls that were let through without being
judged (``disabled`` mode, and calls admitted while the state backend is away);
reporting them is optional, they only feed the lifetime totals.

Modes
=====

``normal`` is all of the above. ``metrics_only`` is resilience4j's METRICS_ONLY:
every call gets the recording token of the current generation whatever the
state, outcomes go into the window and the totals as usual, and nothing moves
the state by itself (no trip, no open period running out); only ``open()``,
``close()`` and ``reset()`` do. ``disabled`` records nothing and
``forced_open`` rejects everything; both freeze the state too.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from resilient._models import CircuitBreakerConfig
from resilient.backends.protocol import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    STATES,
    BreakerSnapshot,
    SharedState,
)
from resilient.errors import CircuitOpenError

if TYPE_CHECKING:
    from resilient.backends.protocol import Backend, BreakerLink, OnBackendFailure

__all__ = [
    "STATE_CLOSED",
    "STATE_HALF_OPEN",
    "STATE_OPEN",
    "TRIALS_BUSY_RETRY_AFTER",
    "CircuitBreaker",
]

_log = logging.getLogger("resilient.breaker")

# The state names (pybreaker's; a test checks they still match) are defined in
# resilient.backends.protocol, so that backends need not import this module.
# pybreaker itself is imported when the first breaker is built, not with this
# module: it imports redis at import time whenever redis is installed, and
# `import resilient` must not pull in optional dependencies.


def _pybreaker() -> Any:
    import pybreaker

    return pybreaker


Mode = Literal["normal", "disabled", "metrics_only", "forced_open"]

# Outcome bits stored in the sliding window.
_FAIL: Final = 1
_SLOW: Final = 2

# Tokens that are not tied to a generation.
_TOKEN_PASS: Final = -1  # disabled mode: nothing is recorded
_TOKEN_SHADOW: Final = -2  # let through unjudged (backend away): totals only
_NEVER: Final = -3  # a value no token ever has

#: ``retry_after`` when every half-open trial permit is taken: the trial calls
#: usually decide soon, so "try again shortly".
TRIALS_BUSY_RETRY_AFTER: Final = 0.5

#: Most buckets a time window keeps; longer windows use wider buckets.
_MAX_BUCKETS: Final = 60

_INF: Final = math.inf

#: Transitions made under the lock, ``(old, new)``, to report once it is released.
_Events = list[tuple[str, str]]


# Rejections build their error without __init__ (see CircuitOpenError.fast).
_new_error = BaseException.__new__


def _count_value(counter: Any) -> int:
    """The next value of an ``itertools.count`` (its repr is ``count(N)``)."""
    return int(repr(counter)[6:-1])


_NO_PENDING: Final = object()


class _StateName:
    """What listeners get as ``old_state``/``new_state``: pybreaker-style, ``.name`` only."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<state {self.name}>"


_STATE_OBJECTS: Final = {
    name: _StateName(name) for name in (STATE_CLOSED, STATE_OPEN, STATE_HALF_OPEN)
}


class _CountWindow:
    """The last *size* outcomes: a ring buffer with running totals, O(1) per call."""

    __slots__ = ("_pos", "_ring", "_size", "calls", "edge", "failures", "slow")

    def __init__(self, size: int) -> None:
        self.edge = _INF  # no time buckets (the lock-free success path is for time windows)
        self._size = size
        self._ring = [0] * size
        self._pos = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, outcome: int, now: float) -> int:
        """Record one outcome; return non-zero if the window holds a failure or slow call."""
        pos = self._pos
        ring = self._ring
        old = ring[pos]
        ring[pos] = outcome
        pos += 1
        self._pos = 0 if pos == self._size else pos
        if self.calls < self._size:
            self.calls += 1
        if outcome != old:
            self.failures += (outcome & _FAIL) - (old & _FAIL)
            self.slow += (outcome >> 1) - (old >> 1)
        return self.failures or self.slow

    def add_successes(self, n: int) -> None:
        """Record *n* successes in order."""
        for _ in range(n):
            self.add(0, 0.0)

    def expire(self, now: float) -> None:
        """Nothing expires by time in a count window."""

    def clear(self) -> None:
        self._ring = [0] * self._size
        self._pos = 0
        self.calls = self.failures = self.slow = 0


class _TimeWindow:
    """
    The last *seconds* seconds as a ring of buckets with running totals.

    Bucket ``b`` holds the calls whose time ``t`` has ``int(t // width) == b``;
    the window is the *n* newest buckets, so it spans between
    ``seconds - width`` and ``seconds``. Each call is O(1) amortised: moving the
    head clears at most *n* buckets, and a call inside the head bucket costs one
    float comparison. Memory is at most two lists of *n* ints, made when needed:
    while every call of the window is in the head bucket the totals say it all
    (a breaker used now and then, or only in bursts shorter than a bucket, never
    makes the ring), and the list of failure and slow counts waits for the
    first failure or slow call.
    """

    __slots__ = (
        "_b_bad",
        "_b_calls",
        "_head",
        "_i",
        "_n",
        "_width",
        "calls",
        "edge",
        "failures",
        "slow",
    )

    def __init__(self, seconds: int) -> None:
        self._n = min(seconds, _MAX_BUCKETS)
        self._width = seconds / self._n
        # calls per bucket; None while every call of the window is in the head bucket
        self._b_calls: list[int] | None = None
        # per bucket: failures + (slow calls << 32), or None while there was none in
        # the ring (a bucket holds far fewer than 2**32 calls: one int for two counts)
        self._b_bad: list[int] | None = None
        self._head = -(2**62)  # absolute index of the newest bucket
        self._i = 0  # its slot: head % n
        self.edge = -_INF  # time at which the head bucket ends
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, outcome: int, now: float) -> int:
        """Record one outcome; return non-zero if the window holds a failure or slow call."""
        if now >= self.edge:
            self.expire(now)
        # A clock that went backwards (never with time.monotonic) lands in the head bucket.
        self.calls += 1
        calls = self._b_calls
        if calls is not None:
            calls[self._i] += 1
        if outcome:
            fail = outcome & _FAIL
            slow = outcome >> 1
            if calls is not None:
                bad = self._b_bad
                if bad is None:
                    bad = self._b_bad = [0] * self._n
                bad[self._i] += fail | slow << 32
            self.failures += fail
            self.slow += slow
        return self.failures or self.slow

    def add_successes(self, n: int) -> None:
        """Count *n* successes in the head bucket (they happened before ``edge``)."""
        calls = self._b_calls
        if calls is not None:
            calls[self._i] += n
        self.calls += n

    def expire(self, now: float) -> None:
        """Drop the buckets that have left the window at time *now*."""
        b = int(now // self._width)
        head = self._head
        if b <= head:
            return
        n = self._n
        if b - head >= n:
            self._clear_buckets()
        else:
            calls = self._b_calls
            if calls is None and self.calls:
                # the head bucket (all of the window so far) stays in it: the ring is
                # needed now, to drop it later on its own
                i = self._i
                calls = self._b_calls = [0] * n
                calls[i] = self.calls
                if self.failures or self.slow:
                    self._b_bad = [0] * n
                    self._b_bad[i] = self.failures | self.slow << 32
            if calls is not None:
                bad = self._b_bad
                for k in range(head + 1, b + 1):
                    i = k % n
                    if calls[i]:
                        self.calls -= calls[i]
                        calls[i] = 0
                        if bad is not None and bad[i]:
                            self.failures -= bad[i] & 0xFFFFFFFF
                            self.slow -= bad[i] >> 32
                            bad[i] = 0
        self._head = b
        self._i = b % n
        self.edge = (b + 1) * self._width

    def _clear_buckets(self) -> None:
        self._b_calls = self._b_bad = None
        self.calls = self.failures = self.slow = 0

    def clear(self) -> None:
        self._clear_buckets()


def _exc_names(types: tuple[type[BaseException], ...]) -> list[str]:
    return [
        t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
        for t in types
    ]


class CircuitBreaker:
    """
    A thread-safe circuit breaker driven by ``acquire()`` and ``on_*()`` reports.

    Closed: every call passes; the breaker opens when ``failure_threshold``
    failures happen in a row, or when the sliding window holds at least
    ``min_requests_threshold`` calls and its failure rate (or slow-call rate)
    reaches its threshold. Open: calls are rejected with
    :class:`~resilient.errors.CircuitOpenError` for the open duration
    (``timeout_seconds * open_duration_multiplier ** (trips - 1)``, capped by
    ``max_open_duration``). Then the first ``acquire()`` moves it to half-open,
    where exactly ``config.trial_calls`` trial permits are issued;
    ``success_threshold`` successful trials close it, a failed (or slow) trial
    or an expired ``half_open_timeout`` opens it again.

    No timers or threads: time-based transitions happen lazily when the
    breaker is used or inspected.

    Attributes:
        name: The policy name, used in errors and status.
        config: The validated configuration.
        needs_duration: Whether the next ``on_success``/``on_failure`` wants a
            measured ``duration`` (slow calls tracked; an adaptive breaker while
            it samples latencies); otherwise pass -1.0 (not measured). Read it
            per call: a subclass may change it.
        measures: Whether durations may ever be wanted: what a step built once
            (the attempt engine's compiled steps) decides by.
        fleet_kind: ``"breaker"``: what a state backend attaches it as.
    """

    fleet_kind: Final = "breaker"

    __slots__ = (
        "_backend",
        "_clock",
        "_closed_token",
        "_consecutive",
        "_failure_cbs",
        "_failure_threshold",
        "_fast_edge",
        "_fast_token",
        "_fleet_calls",
        "_fleet_failures",
        "_gen",
        "_half_open_until",
        "_ignore",
        "_link",
        "_listeners",
        "_lock",
        "_lockfree",
        "_min_calls",
        "_mode",
        "_n_failures",
        "_n_ignored",
        "_n_successes",
        "_offline",
        "_open_until",
        "_opened_at_wall",
        "_pending",
        "_permits",
        "_rate_thr",
        "_record",
        "_reject_open",
        "_rejections",
        "_slow_s",
        "_slow_thr",
        "_state",
        "_success_cbs",
        "_timed",
        "_trial_calls",
        "_trial_successes",
        "_trips",
        "_window",
        "_window_add",
        "config",
        "measures",
        "name",
        "needs_duration",
    )

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig,
        *,
        clock: Callable[[], float] | None = None,
        listeners: Iterable[Any] = (),
        backend: Backend | None = None,
    ) -> None:
        """
        Create a closed breaker.

        Args:
            name: Policy name, carried by every ``CircuitOpenError``.
            config: The ``circuit_breaker`` section of the policy.
            clock: Monotonic clock in seconds (default ``time.monotonic``);
                tests pass a fake one.
            listeners: ``pybreaker.CircuitBreakerListener`` instances (or any
                objects with its ``state_change``, ``failure`` and ``success``
                methods).
            backend: Where the state is shared (:mod:`resilient.backends`);
                ``None`` or the memory backend: this process only.
        """
        self.name = name
        self.config = config
        self._clock: Callable[[], float] = clock or time.monotonic
        self._listeners: tuple[Any, ...] = ()
        self._success_cbs: tuple[Callable[[Any], object], ...] = ()
        self._failure_cbs: tuple[Callable[[Any, BaseException], object], ...] = ()
        self._set_listeners(tuple(listeners))
        self._lock = threading.Lock()

        self.needs_duration = config.slow_call_duration is not None
        self.measures = self.needs_duration
        self._slow_s = config.slow_call_duration if config.slow_call_duration is not None else _INF
        self._slow_thr = config.slow_call_rate_threshold if self.needs_duration else _INF
        self._rate_thr = (
            config.failure_rate_threshold if config.failure_rate_threshold is not None else _INF
        )
        self._min_calls = config.min_requests_threshold
        self._failure_threshold = config.failure_threshold
        self._trial_calls = config.trial_calls
        self._record = config.record_exceptions
        self._ignore = config.ignore_exceptions
        self._timed = config.window_type == "time"
        self._window: _CountWindow | _TimeWindow = (
            _TimeWindow(config.failure_rate_window)
            if self._timed
            else _CountWindow(config.failure_rate_window)
        )
        self._window_add = self._window.add
        # Successes counted without the lock (time windows without slow-call
        # tracking only: a count window must place every outcome in order).
        self._lockfree = self._timed and not self.needs_duration
        self._pending: Any = itertools.count() if self._lockfree else _NO_PENDING
        # Until this time a success with the closed token is only counted (see
        # on_success); -inf while the last locked step saw a failure in the window
        # or in a row, or the window is not lock-free. Never later than the end
        # of the window's head bucket when it was set.
        self._fast_edge = -_INF

        self._state = STATE_CLOSED
        self._mode: Mode = config.mode
        self._gen = 0
        self._consecutive = 0
        self._trips = 0
        self._open_until = 0.0
        self._opened_at_wall: float | None = None
        self._half_open_until = _INF
        self._permits = 0
        self._trial_successes = 0
        self._n_successes = 0
        self._n_failures = 0
        self._n_ignored = 0
        # itertools.count: next() is atomic, so rejections are counted without the lock
        self._rejections = itertools.count()
        self._closed_token = 0
        self._fast_token = 0
        # Fleet state (resilient.backends): the link, what the other replicas
        # counted in the window (refreshed by the backend's flusher) and the
        # behaviour while the backend is unreachable ("open"/"closed", or None).
        self._offline: str | None = None
        self._fleet_calls = 0
        self._fleet_failures = 0
        self._backend = backend
        self._link: BreakerLink | None = None
        self._sync_tokens()
        if backend is not None:
            self._link = backend.attach(self)

    # ------------------------------------------------------------------ hot path

    def acquire(self) -> int:
        """
        Ask to make a call.

        Returns:
            An opaque token to pass to exactly one of ``on_success``,
            ``on_failure`` or ``on_cancel``. In closed state it is the same
            value for every call (0 until the first transition); an odd one is
            a half-open trial permit; a negative one need not be reported.

        Raises:
            CircuitOpenError: The breaker is open (``retry_after`` is the rest
                of the open period), all half-open trial permits are taken
                (``retry_after`` is small), or the mode is ``forced_open``
                (``retry_after`` is ``None``).
        """
        token = self._fast_token
        if token >= 0:
            return token
        if self._reject_open:
            # Rejecting while open takes no lock and no extra call: the end of
            # the open period is read once; a transition racing with this read
            # at worst rejects a call at the very edge of the period.
            now = self._clock()
            open_until = self._open_until
            if now < open_until:
                next(self._rejections)
                error = _new_error(CircuitOpenError)
                error.policy = self.name
                error.retry_after = open_until - now
                error._reason = "open"
                try:
                    raise error
                finally:
                    del error  # no frame -> traceback -> frame cycle per rejection
        return self._acquire_slow()

    def on_success(self, token: int, duration: float) -> None:
        """
        Report that the call with *token* returned.

        Args:
            token: What ``acquire()`` returned.
            duration: Seconds the call took, or -1.0 when not measured
                (``needs_duration`` was false).
        """
        if token == self._closed_token and self._lockfree and self._clock() < self._fast_edge:
            # The common case: closed, a time window with no failure in it, none
            # in a row, and the window's head bucket unchanged since the last
            # locked step checked all that. A success then cannot trip the
            # breaker, so it is only counted, without the lock: next() on an
            # itertools.count is atomic, and the count is folded into the window
            # (under the lock) before anything reads the window.
            next(self._pending)
            if self._success_cbs:
                self._notify_outcome(None, None)
            return
        self._success_locked(token, duration, None)

    def on_success_at(self, token: int, duration: float, now: float) -> None:
        """
        :meth:`on_success` with the caller's reading *now* of this breaker's clock
        (the attempt engine reads the clock once per attempt and passes it on):
        a success in the common case is then one counter increment.
        """
        if token == self._closed_token and now < self._fast_edge:
            next(self._pending)
            if self._success_cbs:
                self._notify_outcome(None, None)
            return
        self._success_locked(token, duration, now)

    def success_step(
        self, clock: Callable[[], float]
    ) -> Callable[[int, float, float], None] | None:
        """
        :meth:`on_success_at`, for a caller whose *clock* readings it can take,
        or ``None`` when it gains nothing from one (a count window reads no
        clock) or cannot use it (another clock; a subclass with an
        ``on_success`` of its own, which must still be called).
        """
        if (
            self._timed
            and self._clock == clock  # equal: the same bound method of a clock object too
            and type(self).on_success is CircuitBreaker.on_success
        ):
            return self.on_success_at
        return None

    def _success_locked(self, token: int, duration: float, now: float | None) -> None:
        """A success off the lock-free path; *now* is a reading of the clock, if any."""
        events = None
        lock = self._lock
        # acquire()/release() rather than `with`: measurably cheaper on the
        # hot path, and nothing between them can raise but a bug.
        lock.acquire()
        try:
            self._fold()
            if token == self._closed_token:
                self._n_successes += 1
                self._consecutive = 0
                if self._timed:
                    if now is None:
                        now = self._clock()
                else:
                    now = 0.0
                # add() returns whether the window holds failures or slow calls at all.
                if self._window_add(_SLOW if duration >= self._slow_s else 0, now):
                    if self._window_trips(self._window):
                        events = self._trip(now if self._timed else self._clock())
                elif self._lockfree:
                    # nothing in the window, nothing in a row: the next successes
                    # of this head bucket need no lock
                    self._fast_edge = self._lockfree_until()
            elif token == _TOKEN_PASS:
                return
            else:
                events = self._other_success(token, duration)
        finally:
            lock.release()
        if self._success_cbs:
            self._notify_outcome(None, events)
        elif events is not None:
            self._notify(events)

    def _lockfree_until(self) -> float:
        """
        Until when successes may be only counted, without the lock (called with
        the lock held, after a success found the window free of failures): the
        end of the window's head bucket. A subclass that must see some successes
        under the lock (the adaptive breaker's bucket edges) returns less.
        """
        return self._window.edge

    def on_failure(self, token: int, exc: BaseException, duration: float) -> None:
        """
        Report that the call with *token* raised *exc*.

        ``ignore_exceptions`` count as neither success nor failure (a trial
        permit is given back); exceptions not in ``record_exceptions`` count
        as a success; the rest are failures.

        Args:
            token: What ``acquire()`` returned.
            exc: The exception the call raised.
            duration: Seconds the call took, or -1.0 when not measured
                (``needs_duration`` was false).
        """
        if token == _TOKEN_PASS:
            return
        if self._ignore and isinstance(exc, self._ignore):
            self._ignored(token)
            return
        if not isinstance(exc, self._record):
            self.on_success(token, duration)
            return
        events = None
        with self._lock:
            self._fast_edge = -_INF  # the next success checks the window under the lock
            self._fold()
            self._n_failures += 1
            if token == self._closed_token:
                consecutive = self._consecutive + 1
                self._consecutive = consecutive
                w = self._window
                timed = self._timed
                now = self._clock() if timed else 0.0
                w.add(_FAIL | _SLOW if duration >= self._slow_s else _FAIL, now)
                if consecutive >= self._failure_threshold or self._window_trips(w):
                    events = self._trip(now if timed else self._clock())
            elif token & 1 and token > 0:
                now = self._clock()
                events = self._advance(now)  # a verdict after half_open_timeout is too late
                if token == self._gen * 2 + 1 and self._state == STATE_HALF_OPEN:
                    if self._mode == "normal":
                        events = [self._transition(STATE_OPEN, now)]
                    else:
                        self._release_permit(token)  # the state is frozen: no verdict
        if self._failure_cbs:
            self._notify_outcome(exc, events)
        elif events is not None:
            self._notify(events)

    def on_cancel(self, token: int) -> None:
        """
        Report that the call with *token* was cancelled before it finished.

        Nothing is counted; a half-open trial permit is given back.

        Args:
            token: What ``acquire()`` returned.
        """
        if token > 0 and token & 1:
            with self._lock:
                self._release_permit(token)

    # ------------------------------------------------------------- slow paths

    def _acquire_slow(self, shared: bool = True) -> int:
        mode = self._mode
        if mode == "disabled":
            return _TOKEN_PASS
        if mode == "forced_open":
            next(self._rejections)
            raise CircuitOpenError.fast(self.name, None, "forced open")
        if mode == "metrics_only":
            return self._closed_token  # every call passes and is recorded, in any state
        offline = self._offline
        if offline is not None:
            return self._acquire_offline(offline)
        link = self._link
        with self._lock:
            now = self._clock()
            events = self._advance(now)
            state = self._state
            token = _TOKEN_SHADOW
            retry_after = 0.0
            ask_fleet = shared and link is not None and link.usable and state == STATE_HALF_OPEN
            if state == STATE_CLOSED:
                token = self._closed_token
            elif ask_fleet:
                pass  # the fleet's permit, asked below without the lock
            elif state == STATE_HALF_OPEN and self._permits < self._trial_calls:
                self._permits += 1
                token = self._gen * 2 + 1
            else:
                next(self._rejections)
                if state == STATE_OPEN:
                    retry_after = max(self._open_until - now, 0.0)
                else:
                    retry_after = min(TRIALS_BUSY_RETRY_AFTER, self._half_open_until - now)
                    retry_after = max(retry_after, 0.001)
            metrics_only = self._mode == "metrics_only"
        if events is not None:
            self._notify(events)
        if ask_fleet:
            return self._acquire_trial()
        if token != _TOKEN_SHADOW or metrics_only:
            return token
        reason = "open" if state == STATE_OPEN else "half-open, trial calls taken"
        raise CircuitOpenError.fast(self.name, retry_after, reason)

    def _acquire_offline(self, offline: str) -> int:
        """``acquire()`` while the shared backend is unreachable and the policy is open/closed."""
        if offline == "open" and self._mode != "metrics_only":
            next(self._rejections)
            raise CircuitOpenError.fast(self.name, TRIALS_BUSY_RETRY_AFTER, "backend unavailable")
        with self._lock:
            return self._closed_token if self._state == STATE_CLOSED else _TOKEN_SHADOW

    def _acquire_trial(self) -> int:
        """
        Half-open with a shared backend: one short round trip for a fleet-wide permit.

        Runs without the lock. If the backend does not answer in time the permit
        is decided as ``on_backend_failure`` says (``local``: this process's own
        permits).
        """
        link = self._link
        assert link is not None
        granted = link.trial_permit()  # may adopt a newer shared state meanwhile
        if granted is None:
            offline = self._offline
            if offline is not None:
                return self._acquire_offline(offline)
            return self._acquire_slow(shared=False)
        with self._lock:
            state = self._state
            if granted and state == STATE_HALF_OPEN:
                self._permits += 1
                return self._gen * 2 + 1
            if state == STATE_CLOSED:
                return self._closed_token
            metrics_only = self._mode == "metrics_only"
            next(self._rejections)
            now = self._clock()
            if state == STATE_OPEN:
                retry_after = max(self._open_until - now, 0.0)
            else:
                retry_after = max(min(TRIALS_BUSY_RETRY_AFTER, self._half_open_until - now), 0.001)
        if metrics_only:
            return _TOKEN_SHADOW
        reason = "open" if state == STATE_OPEN else "half-open, trial calls taken"
        raise CircuitOpenError.fast(self.name, retry_after, reason)

    def _other_success(self, token: int, duration: float) -> _Events | None:
        """Success with a token that is not the current closed one (lock held)."""
        self._n_successes += 1
        if token > 0 and token & 1:
            now = self._clock()
            events = self._advance(now)  # a verdict after half_open_timeout is too late
            if token == self._gen * 2 + 1 and self._state == STATE_HALF_OPEN:
                if self._mode != "normal":
                    self._release_permit(token)  # the state is frozen: no verdict
                    return events
                if duration >= self._slow_s:
                    return [self._transition(STATE_OPEN, now)]
                link = self._link
                if link is not None and link.usable and self._offline is None:
                    # the fleet counts trial successes; its verdict comes back by adoption
                    link.trial_result(True)
                    return events
                self._trial_successes += 1
                if self._trial_successes >= self.config.success_threshold:
                    return [self._transition(STATE_CLOSED, now)]
            return events
        return None

    def _ignored(self, token: int) -> None:
        with self._lock:
            self._n_ignored += 1
            if token > 0 and token & 1:
                self._release_permit(token)

    def _release_permit(self, token: int) -> None:
        if token == self._gen * 2 + 1 and self._state == STATE_HALF_OPEN and self._permits > 0:
            self._permits -= 1
            if self._link is not None and self._link.usable:
                self._link.release_permit()

    def _trip(self, now: float) -> _Events | None:
        """A threshold was reached (lock held): open, unless in ``metrics_only`` mode."""
        if self._mode == "metrics_only":
            return None  # observed only: the window and counters show it, the state stays
        return [self._transition(STATE_OPEN, now)]

    def _window_trips(self, w: _CountWindow | _TimeWindow) -> bool:
        # _fleet_*: the other replicas' share of the window (0 without a shared backend)
        calls = w.calls + self._fleet_calls
        return calls >= self._min_calls and (
            (w.failures + self._fleet_failures) / calls >= self._rate_thr
            or w.slow / calls >= self._slow_thr
        )

    # ------------------------------------------------------------ transitions

    def _advance(self, now: float) -> _Events | None:
        """
        Time-based transitions, done lazily at *now* (lock held).

        A half-open period past ``half_open_timeout`` reopens *as of* its
        deadline, so the new open period is not stretched by nobody looking;
        an open period that is over becomes half-open *now*, so the trial
        permits and the half-open timeout start when someone can use them.
        Frozen in every mode but ``normal``.
        """
        if self._mode != "normal":
            return None
        events = None
        if self._state == STATE_HALF_OPEN and now >= self._half_open_until:
            events = [self._transition(STATE_OPEN, self._half_open_until)]
        if self._state == STATE_OPEN and now >= self._open_until:
            event = self._transition(STATE_HALF_OPEN, now)
            events = [event] if events is None else [*events, event]
        return events

    def _transition(self, new: str, now: float, *, remote: bool = False) -> tuple[str, str]:
        """
        Move to *new* at time *now* (lock held); return ``(old, new)`` for the listeners.

        Every transition, even to the same state, starts a new generation:
        tokens issued before it no longer count. A local transition (*remote*
        false) is handed to the shared backend, if any, without waiting for it.
        """
        old = self._state
        self._fold()
        self._fast_edge = -_INF
        self._gen += 1
        self._state = new
        self._consecutive = 0
        self._permits = 0
        self._trial_successes = 0
        self._window.clear()
        if new == STATE_OPEN:
            self._trips += 1
            self._open_until = now + self._open_duration()
            self._opened_at_wall = time.time()
        elif new == STATE_HALF_OPEN:
            hot = self.config.half_open_timeout
            self._half_open_until = now + hot if hot is not None else _INF
        else:
            self._trips = 0
            self._opened_at_wall = None
        self._fleet_calls = self._fleet_failures = 0
        self._sync_tokens()
        if not remote and self._link is not None:
            self._link.transitioned(old, new)
        return (old, new)

    def _open_duration(self) -> float:
        cfg = self.config
        try:
            grown = cfg.timeout_seconds * cfg.open_duration_multiplier ** (self._trips - 1)
        except OverflowError:
            return cfg.max_open_duration
        return min(cfg.max_open_duration, grown)

    def _fold(self) -> None:
        """Move the successes counted without the lock into the window (lock held)."""
        pending = self._pending
        if pending is not _NO_PENDING:
            done = _count_value(pending)
            if done:
                # A success counted on the old counter between the read above and
                # this swap is lost: a rare undercount we accept for a lock-free path.
                self._pending = itertools.count()
                self._n_successes += done
                self._window.add_successes(done)

    def _sync_tokens(self) -> None:
        """Recompute the hot-path tokens after a transition or mode switch (lock held)."""
        mode = self._mode
        if mode == "metrics_only":
            # Every call passes and is recorded, whatever the state or the backend.
            self._closed_token = self._fast_token = self._gen * 2
        else:
            recording = self._state == STATE_CLOSED and mode != "disabled"
            self._closed_token = self._gen * 2 if recording else _NEVER
            fast = recording and mode == "normal" and self._offline != "open"
            self._fast_token = self._closed_token if fast else -1
        self._reject_open = (
            self._state == STATE_OPEN and self._mode == "normal" and self._offline is None
        )

    # ------------------------------------------------------------ fleet state

    @property
    def backend(self) -> Backend | None:
        """The state backend this breaker was built with (``None``: local only)."""
        return self._backend

    def fleet_snapshot(self) -> BreakerSnapshot:
        """
        What a state backend flushes: lifetime successes and failures (pending
        successes included), the state, the rest of the open period and the trips.
        """
        with self._lock:
            self._fold()
            state = self._state
            open_for = max(self._open_until - self._clock(), 0.0) if state == STATE_OPEN else 0.0
            return BreakerSnapshot(
                self._n_successes, self._n_failures, state, open_for, self._trips
            )

    def adopt(self, shared: SharedState, *, fresh: bool) -> bool:
        """
        Take on the fleet's state (called by the backend's threads, never on a call path).

        Args:
            shared: The shared state. A state name that is not one of the three
                is ignored.
            fresh: Read from the backend just now: it always wins. Otherwise (a
                pub/sub message) it is ignored unless its generation is newer
                than the last one adopted.

        Returns:
            Whether anything changed.
        """
        link = self._link
        gen, state = shared.generation, shared.state
        if link is None or state not in STATES:
            return False
        events = None
        with self._lock:
            if gen == link.known_gen and state == link.known_state:
                return False
            if not fresh and gen <= link.known_gen:
                return False
            first = link.known_gen == 0  # the first read of the shared record
            link.known_gen = gen
            link.known_state = state
            now = self._clock()
            if state != self._state:
                events = [self._transition(state, now, remote=True)]
            elif state == STATE_CLOSED and not first:
                # closed again in a newer generation (the fleet opened and recovered
                # meanwhile): a new window. The first read only tells this process
                # the generation; its own window stays.
                self._consecutive = 0
                self._window.clear()
                self._fleet_calls = self._fleet_failures = 0
            self._trips = shared.trips
            if state == STATE_OPEN:
                self._open_until = now + shared.open_for
            elif state == STATE_HALF_OPEN:
                half = shared.half_open_for
                self._half_open_until = now + half if half is not None else _INF
        if events is not None:
            self._notify(events)
        return True

    def set_offline(self, policy: OnBackendFailure | None) -> None:
        """
        The shared backend is unreachable: behave as ``on_backend_failure`` says
        (``"open"``: reject, ``"closed"``: let every call through; ``"local"`` or
        ``None``: decide alone, as without a backend).
        """
        with self._lock:
            self._offline = policy if policy != "local" else None
            self._sync_tokens()

    def merge_window(self, others_calls: int, others_failures: int) -> None:
        """Take in the other replicas' window counts and trip if the fleet's rate says so."""
        events = None
        with self._lock:
            self._fold()
            self._fleet_calls = others_calls
            self._fleet_failures = others_failures
            if (
                self._state == STATE_CLOSED
                and self._mode == "normal"  # metrics_only never changes state
                and others_failures
            ):
                w = self._window
                now = self._clock()
                w.expire(now)
                if self._window_trips(w):
                    events = [self._transition(STATE_OPEN, now)]
        if events is not None:
            self._notify(events)

    def after_fork(self) -> None:
        """
        In a forked child (the backend calls it): a new lock, since another thread
        of the parent may have held this one at the fork.
        """
        self._lock = threading.Lock()

    # -------------------------------------------------------------- listeners

    def _notify(self, events: Iterable[tuple[str, str]]) -> None:
        for old_name, new_name in events:
            if old_name == new_name:
                continue
            old, new = _STATE_OBJECTS[old_name], _STATE_OBJECTS[new_name]
            for listener in self._listeners:
                self._call_listener(listener, old, new)

    def _call_listener(self, listener: Any, old: _StateName, new: _StateName) -> None:
        try:
            listener.state_change(self, old, new)
        except Exception:
            _log.exception(
                "circuit breaker %r: listener %r failed in state_change", self.name, listener
            )

    def _notify_outcome(self, exc: BaseException | None, events: _Events | None) -> None:
        if exc is None:
            for on_success in self._success_cbs:
                try:
                    on_success(self)
                except Exception:
                    _log.exception("circuit breaker %r: listener %r failed", self.name, on_success)
        else:
            for on_failure in self._failure_cbs:
                try:
                    on_failure(self, exc)
                except Exception:
                    _log.exception("circuit breaker %r: listener %r failed", self.name, on_failure)
        if events is not None:
            self._notify(events)

    def _set_listeners(self, listeners: tuple[Any, ...]) -> None:
        """
        Install *listeners* (copy-on-write, so notifying needs no lock).

        Only ``success``/``failure`` methods that do something are kept for the
        hot path: one inherited unchanged from ``pybreaker.CircuitBreakerListener``
        (or missing) costs nothing per call.
        """
        base = _pybreaker().CircuitBreakerListener
        self._listeners = listeners
        self._success_cbs = tuple(
            listener.success
            for listener in listeners
            if getattr(type(listener), "success", base.success) is not base.success
        )
        self._failure_cbs = tuple(
            listener.failure
            for listener in listeners
            if getattr(type(listener), "failure", base.failure) is not base.failure
        )

    def add_listener(self, listener: Any) -> None:
        """
        Register a ``pybreaker.CircuitBreakerListener``-style listener.

        Listeners are called after the breaker's lock is released; one that
        raises is logged on ``resilient.breaker`` and otherwise ignored.
        ``before_call`` is never called: the pipeline, not the breaker, calls
        the function.
        """
        with self._lock:
            self._set_listeners((*self._listeners, listener))

    def remove_listener(self, listener: Any) -> None:
        """Unregister *listener* (its first registration). Raises ``ValueError`` if absent."""
        with self._lock:
            listeners = list(self._listeners)
            listeners.remove(listener)
            self._set_listeners(tuple(listeners))

    @property
    def listeners(self) -> tuple[Any, ...]:
        """The registered listeners, in call order."""
        return self._listeners

    # ------------------------------------------------------ control and state

    @property
    def state(self) -> str:
        """
        ``"closed"``, ``"open"`` or ``"half-open"``.

        Reading it may move an open breaker whose open time is over to
        half-open (and a half-open one past ``half_open_timeout`` to open).
        """
        with self._lock:
            events = self._advance(self._clock())
            state = self._state
        if events is not None:
            self._notify(events)
        return state

    @property
    def current_state(self) -> str:
        """Alias of :attr:`state`, under pybreaker's name."""
        return self.state

    @property
    def mode(self) -> Mode:
        """``"normal"``, ``"disabled"``, ``"metrics_only"`` or ``"forced_open"``."""
        return self._mode

    @property
    def failure_rate(self) -> float:
        """Share of failures in the current sliding window, 0.0 when it is empty."""
        with self._lock:
            self._fold()
            w = self._window
            w.expire(self._clock())
            return w.failures / w.calls if w.calls else 0.0

    @property
    def trips(self) -> int:
        """Consecutive trips since the breaker was last closed."""
        return self._trips

    def open_for(self) -> float:
        """
        Seconds until this breaker lets a call through again: 0.0 when it does now
        (closed, half-open, disabled, metrics only), ``inf`` when forced open.
        Retries use it to stop waiting for a breaker that will still be open.
        """
        mode = self._mode
        if mode == "forced_open":
            return math.inf
        if mode != "normal" or self._state != STATE_OPEN:
            return 0.0
        return max(self._open_until - self._clock(), 0.0)

    def _force(self, new: str, *, reset_totals: bool = False) -> None:
        with self._lock:
            event = self._transition(new, self._clock())
            if reset_totals:
                self._n_successes = self._n_failures = self._n_ignored = 0
                self._rejections = itertools.count()
                self._pending = itertools.count()
        self._notify((event,))

    def open(self) -> None:
        """Open the breaker now; this counts as a trip and starts a normal open period."""
        self._force(STATE_OPEN)

    def half_open(self) -> bool:
        """
        Move an open breaker to half-open now, before its open period ends, so its
        trial calls may start (health checks' recovery coordination uses it). Only
        the trial calls close it. Does nothing, and returns ``False``, unless the
        breaker is open in ``normal`` mode.
        """
        with self._lock:
            now = self._clock()
            events = self._advance(now)
            moved = self._mode == "normal" and self._state == STATE_OPEN
            if moved:
                event = self._transition(STATE_HALF_OPEN, now)
                events = [event] if events is None else [*events, event]
        if events is not None:
            self._notify(events)
        return moved

    def close(self) -> None:
        """Close the breaker now: counters and the trip count start from zero."""
        self._force(STATE_CLOSED)

    def reset(self) -> None:
        """Close the breaker and clear every counter, lifetime totals included. Keeps the mode."""
        self._force(STATE_CLOSED, reset_totals=True)

    def _set_mode(self, mode: Mode) -> None:
        with self._lock:
            self._mode = mode
            self._sync_tokens()

    def force_open(self) -> None:
        """Reject every call (``retry_after=None``) until another mode is set."""
        self._set_mode("forced_open")

    def disable(self) -> None:
        """Let every call through and record nothing; the state is frozen."""
        self._set_mode("disabled")

    def metrics_only(self) -> None:
        """
        Let every call through and record it (window, counters, failure rate), but
        never change state by itself: thresholds are only observed (see
        ``thresholds_exceeded`` in :meth:`get_status`).
        """
        self._set_mode("metrics_only")

    def normal(self) -> None:
        """Back to normal operation."""
        self._set_mode("normal")

    def _rejection_count(self) -> int:
        # itertools.count exposes its next value only through repr/reduce.
        return _count_value(self._rejections)

    def get_status(self) -> dict[str, Any]:
        """
        A JSON-serialisable snapshot of the breaker.

        Returns:
            A dict with ``name``, ``state``, ``mode``, ``failure_count``
            (consecutive failures), ``success_count`` (successful half-open
            trials), ``trial_permits_issued``, ``window`` (``type``, ``size``,
            ``calls``, ``failures``, ``slow``, ``failure_rate``,
            ``slow_call_rate``), ``opened_at`` (ISO 8601 UTC, or ``None``
            when closed), ``retry_after`` (seconds until a trial call is
            allowed, or ``None``), ``trips``, ``thresholds_exceeded``
            (whether the consecutive failures or the window are at a threshold
            now: in ``metrics_only`` mode, a normal breaker would have opened),
            ``totals`` (``calls``, ``successes``, ``failures``, ``ignored``,
            ``rejections``) and ``config`` (a summary).
        """
        cfg = self.config
        with self._lock:
            self._fold()
            now = self._clock()
            events = self._advance(now)
            w = self._window
            w.expire(now)
            calls = w.calls
            state = self._state
            retry_after: float | None = None
            if self._mode == "forced_open":
                retry_after = None
            elif state == STATE_OPEN:
                retry_after = max(self._open_until - now, 0.0)
            status: dict[str, Any] = {
                "name": self.name,
                "state": state,
                "mode": self._mode,
                "failure_count": self._consecutive,
                "success_count": self._trial_successes,
                "trial_permits_issued": self._permits,
                "window": {
                    "type": cfg.window_type,
                    "size": cfg.failure_rate_window,
                    "calls": calls,
                    "failures": w.failures,
                    "slow": w.slow,
                    "failure_rate": w.failures / calls if calls else 0.0,
                    "slow_call_rate": w.slow / calls if calls else 0.0,
                },
                "opened_at": (
                    datetime.fromtimestamp(self._opened_at_wall, UTC).isoformat()
                    if self._opened_at_wall is not None and state != STATE_CLOSED
                    else None
                ),
                "retry_after": retry_after,
                "trips": self._trips,
                "thresholds_exceeded": self._consecutive >= self._failure_threshold
                or self._window_trips(w),
                "totals": {
                    "calls": self._n_successes + self._n_failures + self._n_ignored,
                    "successes": self._n_successes,
                    "failures": self._n_failures,
                    "ignored": self._n_ignored,
                    "rejections": self._rejection_count(),
                },
            }
        if events is not None:
            self._notify(events)
        link = self._link
        if link is not None:
            status["fleet"] = {
                "backend": self._backend.name if self._backend is not None else None,
                "connected": link.usable,
                "generation": link.known_gen,
                "state": link.known_state,
                "other_replicas_window": {
                    "calls": self._fleet_calls,
                    "failures": self._fleet_failures,
                },
            }
        status["config"] = {
            "failure_threshold": cfg.failure_threshold,
            "success_threshold": cfg.success_threshold,
            "timeout_seconds": cfg.timeout_seconds,
            "half_open_timeout": cfg.half_open_timeout,
            "trial_calls": cfg.trial_calls,
            "failure_rate_threshold": cfg.failure_rate_threshold,
            "min_requests_threshold": cfg.min_requests_threshold,
            "slow_call_duration": cfg.slow_call_duration,
            "slow_call_rate_threshold": cfg.slow_call_rate_threshold,
            "open_duration_multiplier": cfg.open_duration_multiplier,
            "max_open_duration": cfg.max_open_duration,
            "record_exceptions": _exc_names(cfg.record_exceptions),
            "ignore_exceptions": _exc_names(cfg.ignore_exceptions),
        }
        return status

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self._state} mode={self._mode}>"

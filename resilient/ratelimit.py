"""
Rate limiting: a leaky bucket of ``max_rate`` calls per ``time_period``.

Async callers use aiolimiter's ``AsyncLimiter``. It is asyncio-only and bound
to the event loop that first used it (re-using it on another loop warns and
drops its waiters), so a :class:`RateLimiter` keeps one per loop, with the
last loop cached in one tuple; the budget is therefore shared by the callers
of one event loop, which is what one process usually has.

Sync callers cannot use aiolimiter (its waiters are asyncio futures woken by
loop timers), and no maintained library offers the same leaky-bucket
semantics for threads, so :class:`_ThreadBucket` writes them by hand: the same
level that drains at ``max_rate / time_period`` per second and the same burst
of ``max_rate``. A thread that must wait *reserves* its place by raising the
level first and then sleeps outside the lock, so threads are served in arrival
order with no wake-up machinery, and the wait is known before it starts: when
it would exceed ``max_wait`` the call is refused at once with
``retry_after`` set.

On the success path an async caller takes capacity the way
``AsyncLimiter.acquire()`` does when it need not wait (``has_capacity()``,
then one more unit in the bucket's level), without the two coroutines of
``async with limiter``; that reads aiolimiter's ``_level``, which
tests/test_ratelimit.py pins, and an aiolimiter without it makes every call
take the ``acquire()`` path instead. When calls come faster than one per
``_CREDIT_S`` (1 ms), that path also grants the loop a *credit*: the calls the
bucket has room for right now, usable for at most 1 ms, so the next calls cost
one decrement and one compare instead of a leak of the bucket each (see
:class:`_LoopLimiter` for why that never lets more through than the bucket
would). Async callers also see
``RateLimitedError`` at once when the callers already
waiting on the loop need more than ``max_wait`` to drain; otherwise they wait
in aiolimiter's queue at most ``max_wait`` seconds.

With a Redis backend (resilient.backends) the limit is the fleet's: a
:class:`_Lease` holds a batch of calls leased from one token bucket in Redis
and serves sync and async callers from it with no round trip; the backend's
thread tops it up in the background when it runs low, and a caller that finds
it empty makes one lease round trip (bounded by the client timeout). While
Redis is unreachable the local buckets above decide (``on_backend_failure:
local``, with ``fallback_rate_share`` of the limit). See docs/distributed.md.
"""

from __future__ import annotations

import asyncio
import math
import threading
from asyncio import get_running_loop
from typing import TYPE_CHECKING, Any, Final, cast

from aiolimiter import AsyncLimiter as _AsyncLimiter

from resilient import _clock
from resilient._models import RateLimitConfig
from resilient._shared import SharedByName
from resilient.errors import RateLimitedError

if TYPE_CHECKING:
    from resilient.backends.protocol import Backend, LeaseSource

__all__ = ["RateLimiter", "get_rate_limiter", "rate_limiters"]


_FAST_PATH = hasattr(_AsyncLimiter(1), "_level")

#: How early (seconds) a waiter may be let in to absorb floating-point residue; the
#: event loop itself fires timers up to its clock resolution (1 ns) early.
_EARLY_S = 1e-9

#: How long (seconds of loop time) a loop's credit stays usable, and how close two
#: takes from the bucket must be for a credit to be granted at all (dense traffic).
_CREDIT_S = 1e-3


def _bucket_shape(config: RateLimitConfig) -> tuple[float, float]:
    """
    ``(burst, period)`` of the leaky bucket for *config*.

    Every call takes one unit, so a bucket must hold at least one: a rate under
    one call per period (0.5 per second) is the same rate as one call per a
    longer period (one per 2 s), with a burst of one.
    """
    if config.max_rate >= 1.0:
        return config.max_rate, config.time_period
    return 1.0, config.time_period / config.max_rate


class _Bucket(_AsyncLimiter):
    """
    aiolimiter's ``AsyncLimiter`` with its waiters' wake-up made robust to rounding.

    After sleeping exactly the time aiolimiter computed, the level can still be
    a few ulps above "room for one" (``needed`` = 7.1e-15), and aiolimiter then
    re-arms its timer for the same instant. Real time moves on between two turns
    of the loop, so the next try succeeds; virtual time
    (``resilient.testing``) does not, and the loop spun forever. A residue worth
    less than ``_EARLY_S`` of draining is therefore drained at once (no more than
    the residue: a margin taken on every wake-up let a long queue of waiters in
    a little faster than the rate, which tests/test_ratelimit_credit.py caught).
    """

    __slots__ = ("_residue",)

    def __init__(self, max_rate: float, time_period: float) -> None:
        super().__init__(max_rate, time_period)
        # In units of the level; never below a few ulps of the burst.
        self._residue = max(max_rate / time_period * _EARLY_S, math.ulp(max_rate) * 64)

    def _wake_next(self, *args: object) -> None:
        heap = self._waiters
        if heap:
            self._leak()
            amount, rate, level = heap[0][0], self.max_rate, self._level
            # aiolimiter's ``needed``, with its operands in its order: a rounding apart,
            # ``level + amount - rate`` can be 0.0 where this is 2.2e-16.
            if 0.0 < amount - rate + level <= self._residue:
                # Exactly "room for one", rounded down until both of aiolimiter's tests
                # (``needed`` here, ``has_capacity`` in the woken waiter) agree: the
                # waiter gets in at most the residue early, and that does not add up
                # over a queue of waiters.
                level = max(rate - amount, 0.0)
                while level > 0.0 and (amount - rate + level > 0.0 or level + amount > rate):
                    level = math.nextafter(level, 0.0)
                self._level = level
        super()._wake_next(*args)


class _LoopLimiter:
    """
    aiolimiter's bucket for one loop, how many of our callers wait on it, and the
    loop's credit.

    A *credit* is a number of calls taken from the bucket in one go, so that the
    calls after it cost one decrement and one compare instead of a leak of the
    bucket each. It is granted by a take that found the previous take less than
    ``_CREDIT_S`` ago (calls are dense; sparse calls keep the exact path, and pay
    for no timer), when nobody waits, and it is at most what the bucket has room
    for at that instant (the burst is never exceeded). It ends when it is spent,
    or ``_CREDIT_S`` later (one loop timer, re-used by the next credit), or when a
    caller has to wait: the calls it admitted are then added to the bucket's
    level *as if made at that moment*, the latest instant they can have been made.
    The level is therefore never below the one of an exact leaky bucket fed the
    same calls (the leak only ever drains units already in it), so no window sees
    more than ``max_rate`` plus the drain of its length; the price is that the
    level can be up to ``rate x _CREDIT_S`` units high for ``_CREDIT_S`` after a
    credit ends, which delays a caller by at most that much.
    tests/test_ratelimit_credit.py checks both bounds on the virtual clock.

    aiolimiter has no batch take (``acquire(n)`` would wait); the credit is kept
    here, and the bucket stays aiolimiter's.
    """

    __slots__ = ("bucket", "credit", "granted", "timer", "waiting")

    def __init__(self, config: RateLimitConfig) -> None:
        burst, period = _bucket_shape(config)
        self.bucket = (_Bucket if _FAST_PATH else _AsyncLimiter)(burst, period)
        self.waiting = 0
        self.credit = 0  # calls the credit still admits
        self.granted = 0  # calls the credit admitted at first (0: no credit)
        self.timer: asyncio.TimerHandle | None = None

    def try_take(self) -> bool:
        """Take one unit if the bucket has room now, as ``acquire()`` would; never waits."""
        credit = self.credit
        if credit:
            self.credit = credit - 1
            return True
        return self._take()

    def _take(self) -> bool:
        # The credit is spent (or there is none): settle it, then ask the bucket.
        if not _FAST_PATH:
            return False
        bucket = self.bucket
        previous = bucket._last_check
        if self.granted:
            self.settle()
        if not bucket.has_capacity():
            return False
        level = bucket._level = bucket._level + 1.0
        now = bucket._last_check
        if now - previous < _CREDIT_S and not self.waiting and not bucket._waiters:
            free = int(bucket.max_rate - level)
            if free > 0:
                self.credit = self.granted = free
                if self.timer is None:
                    self.timer = bucket._loop.call_at(now + _CREDIT_S, self._expire)
        return True

    def settle(self) -> None:
        """End the credit: its calls go into the bucket's level as of now."""
        used = self.granted - self.credit
        self.granted = self.credit = 0
        if used:
            bucket = self.bucket
            bucket._leak()  # drain what the level held up to now, then add the calls
            bucket._level += used

    def _expire(self) -> None:
        self.timer = None
        if self.granted:
            self.settle()


#: ``RateLimiter._last`` before any loop: never the running loop.
_NO_LOOP: Final = (None, cast(_LoopLimiter, None))

#: Ask the fleet's bucket for a whole batch (it caps the grant at its batch size).
_FULL_BATCH = 1 << 30


class _Lease(_LoopLimiter):
    """
    Calls this process may admit, leased from the fleet's bucket (a Redis backend).

    One object for every thread and event loop of the process; ``try_take`` is the
    success path (a lock and a decrement, no round trip). When it goes down to
    ``low`` (half a batch) it asks the backend's thread to top it up in the
    background; a caller that finds it empty calls :meth:`lease_now`.
    """

    __slots__ = (
        "_leasing",
        "_lock",
        "batch",
        "dry_until",
        "interval",
        "low",
        "refill",
        "source",
        "taken",
        "tokens",
    )

    def __init__(self, config: RateLimitConfig, source: LeaseSource) -> None:
        super().__init__(config)
        self.source = source
        self.interval = config.time_period / config.max_rate
        self.tokens = 0
        self.taken = 0
        self.batch = 1
        self.low = 0
        self.refill = False
        self.dry_until = 0.0
        self._lock = threading.Lock()
        self._leasing = threading.Lock()

    def try_take(self) -> bool:
        """Take one leased call; false when the lease is empty."""
        lock = self._lock
        # acquire()/release() rather than `with`: cheaper on the success path, and
        # nothing between them can raise
        lock.acquire()
        n = self.tokens
        if n <= 0:
            lock.release()
            return False
        self.tokens = n - 1
        self.taken += 1
        lock.release()
        if n - 1 == self.low:
            self.refill = True
            self.source.wake()
        return True

    def _add(self, granted: int, batch: int, *, take: bool) -> None:
        with self._lock:
            self.batch = batch
            self.low = batch // 2
            self.tokens += granted - 1 if take else granted
            if take:
                self.taken += 1

    def lease_now(self) -> float | None:
        """
        The exhaustion path: lease a batch now (one round trip, at most the client
        timeout). Returns 0.0 when a call was taken for the caller, the seconds until
        the fleet's bucket has one, or ``None`` when the backend is unusable.
        """
        now = _clock.monotonic()
        if now < self.dry_until:
            return self.dry_until - now  # the fleet's bucket is known to be empty
        if not self._leasing.acquire(blocking=False):
            # Another caller (or the background top-up) is asking: wait for its answer
            # rather than ask too; at most one client timeout.
            if self._leasing.acquire(timeout=self.source.timeout):
                self._leasing.release()
            if self.try_take():
                return 0.0
            if not self.source.usable:
                return None
            return max(self.dry_until - _clock.monotonic(), self.interval)
        try:
            if self.try_take():
                return 0.0
            got = self.source.lease(_FULL_BATCH)
            if got is None:
                return None
            granted, batch, wait = got
            if granted == 0:
                self.dry_until = _clock.monotonic() + wait
                self._add(0, batch, take=False)
                return wait
            self._add(granted, batch, take=True)
            return 0.0
        finally:
            self._leasing.release()

    def top_up(self) -> None:
        """In the backend's thread: lease up to a batch in the background."""
        self.refill = False
        with self._leasing:
            want = self.batch - self.tokens
            if want <= 0 or not self.source.usable:
                return
            got = self.source.lease(want)
            if got is not None:
                granted, batch, wait = got
                if granted == 0:
                    self.dry_until = _clock.monotonic() + wait
                self._add(granted, batch, take=False)

    def revoke(self) -> int:
        """Drop the leased calls (given back to the fleet, or lost with Redis); how many."""
        with self._lock:
            n, self.tokens = self.tokens, 0
            self.dry_until = 0.0
        return n

    def after_fork(self) -> None:
        """In a forked child: new locks; the parent's leased calls are the parent's."""
        self._lock = threading.Lock()
        self._leasing = threading.Lock()
        self.tokens = 0
        self.dry_until = 0.0
        self.refill = False


class _ThreadBucket:
    """The leaky bucket for threads (see the module docstring for why it is ours)."""

    __slots__ = ("_last", "_lock", "burst", "clock", "level", "per_second")

    def __init__(self, config: RateLimitConfig) -> None:
        self.burst = _bucket_shape(config)[0]
        self.per_second = config.max_rate / config.time_period
        self.level = 0.0
        self.clock = _clock.monotonic
        self._last = self.clock()
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        """In a forked child: a new lock (the parent's may be held)."""
        self._lock = threading.Lock()

    def reserve(self, max_wait: float) -> float:
        """
        Take one unit of capacity; return how long to sleep before using it
        (0.0 at once), or ``-wait`` (a negative number) when the wait would
        exceed *max_wait* (nothing is taken then).
        """
        with self._lock:
            now = self.clock()
            level = self.level - (now - self._last) * self.per_second
            if level < 0.0:
                level = 0.0
            self._last = now
            if level + 1.0 <= self.burst:
                self.level = level + 1.0
                return 0.0
            wait = (level + 1.0 - self.burst) / self.per_second
            if wait > max_wait:
                self.level = level
                return -wait
            self.level = level + 1.0
            return wait

    def give_back(self) -> None:
        """Undo a reservation whose caller was interrupted while sleeping."""
        with self._lock:
            self.level = max(0.0, self.level - 1.0)


class RateLimiter:
    """
    The rate limit of one policy (or of one ``name=``), shared by its calls.

    Attributes:
        name: The policy it belongs to.
        config: Its ``rate_limit`` section.
        rejected: Calls refused so far.
        backend: The state backend it was attached to (``None``: local only).
        lease: The fleet's lease it serves calls from (``None``: local buckets only).
        fleet_kind: ``"limiter"``: what a state backend attaches it as.
    """

    fleet_kind: Final = "limiter"

    __slots__ = (
        "_by_loop",
        "_last",
        "_lock",
        "backend",
        "config",
        "interval",
        "lease",
        "local_config",
        "max_wait",
        "name",
        "rejected",
        "threads",
    )

    def __init__(
        self, name: str, config: RateLimitConfig, *, backend: Backend | None = None
    ) -> None:
        """
        Create a limiter with a full bucket.

        Args:
            name: The policy (or ``name=``) it belongs to.
            config: The ``rate_limit`` section.
            backend: A state backend to share the limit through (a Redis backend
                makes it the fleet's limit); ``None``: this process only.
        """
        self.name = name
        self.config = config
        self.local_config = config
        self.max_wait = config.max_wait
        self.interval = config.time_period / config.max_rate
        self.threads = _ThreadBucket(config)
        self.rejected = 0
        self._lock = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, _LoopLimiter] = {}
        # (loop, its bucket) of the last loop, while there is no lease: one tuple read
        # per call, safe against other threads
        self._last: tuple[asyncio.AbstractEventLoop | None, _LoopLimiter] = _NO_LOOP
        self.backend = backend
        self.lease: _Lease | None = None
        if backend is not None:
            source = backend.attach(self)  # last: the backend reads the limiter
            if source is not None:
                self._use_fleet(source)

    def _use_fleet(self, source: LeaseSource) -> None:
        """
        Serve calls from leases of the fleet's bucket (*source*); while it is
        unusable, the local buckets allow ``source.local_share`` of ``max_rate``.
        """
        cfg = self.config
        local_share = source.local_share
        if local_share != 1.0:
            rate = max(cfg.max_rate * local_share, min(cfg.max_rate, 1.0))
            local = cfg.model_copy(update={"max_rate": rate})
            self.local_config = local
            self.threads = _ThreadBucket(local)
            self.interval = local.time_period / local.max_rate
            with self._lock:
                self._by_loop.clear()
        self.lease = _Lease(cfg, source)
        with self._lock:  # after the lease is set: for_loop() must see it from now on
            self._last = _NO_LOOP

    def after_fork(self) -> None:
        """
        In a forked child (its backend calls it): new locks, since another thread
        of the parent may have held one at the fork, and the parent's lease dropped.
        """
        self._lock = threading.Lock()
        self.threads.after_fork()
        if self.lease is not None:
            self.lease.after_fork()

    def __repr__(self) -> str:
        cfg = self.config
        return f"<RateLimiter {self.name!r} {cfg.max_rate}/{cfg.time_period}s>"

    # ------------------------------------------------------------------ async

    def for_loop(self, running: asyncio.AbstractEventLoop | None = None) -> _LoopLimiter:
        """
        The bucket of the running loop (made on first use), or the fleet's lease.
        *running* is the running loop, if the caller has it at hand.
        """
        loop, limiter = self._last
        if loop is (running or get_running_loop()):
            return limiter
        lease = self.lease
        if lease is not None:
            source = lease.source
            if source.usable or source.fallback != "local":
                return lease
        return self._local_loop()

    def _local_loop(self) -> _LoopLimiter:
        loop = get_running_loop()
        with self._lock:
            limiter = self._by_loop.get(loop)
            if limiter is None:
                for old in [lp for lp in self._by_loop if lp.is_closed()]:
                    del self._by_loop[old]
                limiter = self._by_loop[loop] = _LoopLimiter(self.local_config)
            if self.lease is None:  # with a lease, for_loop() must ask it first
                self._last = (loop, limiter)
        return limiter

    async def acquire_async(self) -> None:
        """
        Take one unit of capacity, waiting up to ``max_wait`` seconds.

        Raises:
            RateLimitedError: The wait would be (or was) longer than ``max_wait``.
        """
        limiter = self.for_loop()
        if not limiter.try_take():
            await self.wait_async(limiter)

    async def wait_async(self, limiter: _LoopLimiter) -> None:
        """The slow path of :meth:`acquire_async`: ``try_take()`` found no room."""
        if isinstance(limiter, _Lease):
            await self._fleet_wait_async(limiter)
            return
        if limiter.granted:  # a waiter must see the calls of a credit in the level
            limiter.settle()
        if limiter.bucket.has_capacity():  # aiolimiter without the fast path
            await limiter.bucket.acquire()
            return
        max_wait = self.max_wait
        bucket = limiter.bucket
        if _FAST_PATH:
            # try_take() just drained the bucket to now: this caller gets in once
            # the level has room for it and for every caller already waiting.
            room = bucket._level + limiter.waiting + 1.0 - bucket.max_rate
            ahead = max(room * bucket.time_period / bucket.max_rate, 0.0)
        else:
            ahead = (limiter.waiting + 1) * self.interval
        # When the wait is known to be too long, say so now instead of after max_wait.
        if max_wait <= 0.0 or ahead > max_wait:
            raise self._refuse(ahead)
        limiter.waiting += 1
        try:
            # A wait of exactly max_wait is allowed: the grace lets the bucket's
            # wake-up, due at that same instant, win against the timeout.
            async with asyncio.timeout(max_wait + _EARLY_S):
                await limiter.bucket.acquire()
        except TimeoutError:
            raise self._refuse(self.interval) from None
        finally:
            limiter.waiting -= 1

    async def _fleet_wait_async(self, lease: _Lease) -> None:
        deadline = _clock.monotonic() + self.max_wait
        while True:
            step = self._fleet_step(lease, deadline)
            if step == 0.0:
                return
            if step < 0.0:  # Redis away: this process's own bucket decides
                limiter = self._local_loop()
                if not limiter.try_take():
                    await self.wait_async(limiter)
                return
            lease.waiting += 1
            try:
                await _clock.asleep(step)
            finally:
                lease.waiting -= 1
            if lease.try_take():
                return

    # ------------------------------------------------------------------- fleet

    def _fleet_step(self, lease: _Lease, deadline: float) -> float:
        """
        One step of the fleet's exhaustion path: 0.0 admitted, > 0 sleep that long and
        try again, < 0 let the local bucket decide (Redis away, ``on_backend_failure:
        local``).

        Raises:
            RateLimitedError: The fleet's bucket has no call for *deadline*, or Redis is
                away and ``on_backend_failure`` is ``open``.
        """
        for _ in range(2):
            source = lease.source
            if not source.usable:
                if source.fallback == "closed":
                    return 0.0
                if source.fallback == "open":
                    raise self._refuse(lease.interval, "unchecked: state backend unavailable")
                return -1.0
            wait = lease.lease_now()
            if wait is None:
                continue  # the backend just went down: decide per on_backend_failure
            if wait == 0.0:
                return 0.0
            if _clock.monotonic() + wait > deadline:
                raise self._refuse(wait)
            return wait
        return -1.0

    def _fleet_sync(self, lease: _Lease) -> bool:
        """The fleet's exhaustion path for threads; false: let the local bucket decide."""
        deadline = _clock.monotonic() + self.max_wait
        while True:
            step = self._fleet_step(lease, deadline)
            if step == 0.0:
                return True
            if step < 0.0:
                return False
            _clock.sleep(step)
            if lease.try_take():
                return True

    # ------------------------------------------------------------------- sync

    def acquire_sync(self) -> None:
        """The blocking twin of :meth:`acquire_async`, for threads."""
        lease = self.lease
        if (
            lease is not None
            and (lease.source.usable or lease.source.fallback != "local")
            and (lease.try_take() or self._fleet_sync(lease))
        ):
            return
        wait = self.threads.reserve(self.max_wait)
        if wait == 0.0:
            return
        if wait < 0.0:
            raise self._refuse(-wait)
        try:
            _clock.sleep(wait)
        except BaseException:
            self.threads.give_back()
            raise

    # ------------------------------------------------------------------ shared

    def _refuse(self, retry_after: float, why: str = "reached") -> RateLimitedError:
        self.rejected += 1
        cfg = self.config
        return RateLimitedError(
            f"policy {self.name!r}: rate limit of {cfg.max_rate:g} calls per "
            f"{cfg.time_period:g}s {why}; retry after {retry_after:.3g}s",
            policy=self.name,
            retry_after=retry_after,
        )

    def get_status(self) -> dict[str, Any]:
        """
        Configured rate, refused calls and callers waiting now (with a Redis backend,
        ``fleet``: whether the fleet's bucket decides now, calls leased, batch size).
        """
        waiting = sum(lim.waiting for lim in list(self._by_loop.values()))
        status: dict[str, Any] = {
            "name": self.name,
            "max_rate": self.config.max_rate,
            "time_period": self.config.time_period,
            "max_wait": self.max_wait,
            "rejected": self.rejected,
            "waiting": waiting + (self.lease.waiting if self.lease is not None else 0),
        }
        lease = self.lease
        if lease is not None:
            status["fleet"] = {
                "active": lease.source.usable,
                "leased": lease.tokens,
                "batch": lease.batch,
            }
        return status


def _make_limiter(
    name: str, config: RateLimitConfig, backend: Any, previous: RateLimiter | None
) -> RateLimiter:
    return RateLimiter(name, config, backend=backend)


_LIMITERS: SharedByName[RateLimiter] = SharedByName(
    "rate limiter", "rate_limit", _make_limiter, uses_backend=True
)
_reset_limiters = _LIMITERS.clear


def get_rate_limiter(name: str) -> RateLimiter:
    """
    The rate limiter shared by every call of policy *name*.

    Raises:
        PolicyError: No limiter of that name, and no policy of that name with a
            ``rate_limit`` section.
    """
    from resilient.runtime import runtime

    return runtime.lookup(_LIMITERS, name)


def rate_limiters() -> dict[str, RateLimiter]:
    """Every rate limiter made so far, by name."""
    return _LIMITERS.all()

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
take the ``acquire()`` path instead. Async callers also see
``RateLimitedError`` at once when the callers already
waiting on the loop need more than ``max_wait`` to drain; otherwise they wait
in aiolimiter's queue at most ``max_wait`` seconds.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiolimiter import AsyncLimiter as _AsyncLimiter

from resilient import _clock
from resilient._models import RateLimitConfig
from resilient.errors import PolicyError, RateLimitedError

__all__ = ["RateLimiter", "get_rate_limiter", "rate_limiters"]


_FAST_PATH = hasattr(_AsyncLimiter(1), "_level")


class _LoopLimiter:
    """aiolimiter's bucket for one loop plus how many of our callers wait on it."""

    __slots__ = ("bucket", "waiting")

    def __init__(self, config: RateLimitConfig) -> None:
        self.bucket = _AsyncLimiter(config.max_rate, config.time_period)
        self.waiting = 0

    def try_take(self) -> bool:
        """Take one unit if the bucket has room now, as ``acquire()`` would; never waits."""
        bucket = self.bucket
        if _FAST_PATH and bucket.has_capacity():
            bucket._level += 1
            return True
        return False


class _ThreadBucket:
    """The leaky bucket for threads (see the module docstring for why it is ours)."""

    __slots__ = ("_last", "_lock", "burst", "clock", "level", "per_second")

    def __init__(self, config: RateLimitConfig) -> None:
        self.burst = config.max_rate
        self.per_second = config.max_rate / config.time_period
        self.level = 0.0
        self.clock = _clock.monotonic
        self._last = self.clock()
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
    """

    __slots__ = (
        "_by_loop",
        "_last",
        "_lock",
        "config",
        "interval",
        "max_wait",
        "name",
        "rejected",
        "threads",
    )

    def __init__(self, name: str, config: RateLimitConfig) -> None:
        self.name = name
        self.config = config
        self.max_wait = config.max_wait
        self.interval = config.time_period / config.max_rate
        self.threads = _ThreadBucket(config)
        self.rejected = 0
        self._lock = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, _LoopLimiter] = {}
        self._last: tuple[asyncio.AbstractEventLoop | None, _LoopLimiter | None] = (None, None)

    def __repr__(self) -> str:
        cfg = self.config
        return f"<RateLimiter {self.name!r} {cfg.max_rate}/{cfg.time_period}s>"

    # ------------------------------------------------------------------ async

    def for_loop(self) -> _LoopLimiter:
        """The bucket of the running loop (made on first use)."""
        loop = asyncio.get_running_loop()
        last_loop, limiter = self._last  # one tuple read: safe against other threads
        if last_loop is loop and limiter is not None:
            return limiter
        with self._lock:
            limiter = self._by_loop.get(loop)
            if limiter is None:
                for old in [lp for lp in self._by_loop if lp.is_closed()]:
                    del self._by_loop[old]
                limiter = self._by_loop[loop] = _LoopLimiter(self.config)
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
        if limiter.bucket.has_capacity():  # aiolimiter without the fast path
            await limiter.bucket.acquire()
            return
        max_wait = self.max_wait
        ahead = (limiter.waiting + 1) * self.interval
        # The callers ahead need at least `waiting * interval` to drain: if that
        # is already too long, say so now instead of after max_wait.
        if max_wait <= 0.0 or ahead - self.interval >= max_wait:
            raise self._refuse(ahead)
        limiter.waiting += 1
        try:
            async with asyncio.timeout(max_wait):
                await limiter.bucket.acquire()
        except TimeoutError:
            raise self._refuse(self.interval) from None
        finally:
            limiter.waiting -= 1

    # ------------------------------------------------------------------- sync

    def acquire_sync(self) -> None:
        """The blocking twin of :meth:`acquire_async`, for threads."""
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

    def _refuse(self, retry_after: float) -> RateLimitedError:
        self.rejected += 1
        cfg = self.config
        return RateLimitedError(
            f"policy {self.name!r}: rate limit of {cfg.max_rate:g} calls per "
            f"{cfg.time_period:g}s reached; retry after {retry_after:.3g}s",
            policy=self.name,
            retry_after=retry_after,
        )

    def get_status(self) -> dict[str, Any]:
        """Configured rate, refused calls and callers waiting now."""
        return {
            "name": self.name,
            "max_rate": self.config.max_rate,
            "time_period": self.config.time_period,
            "max_wait": self.max_wait,
            "rejected": self.rejected,
            "waiting": sum(lim.waiting for lim in list(self._by_loop.values())),
        }


_limiters_lock = threading.Lock()
_limiters: dict[str, RateLimiter] = {}


def _limiter_for(key: str, config: RateLimitConfig) -> RateLimiter:
    """The shared limiter for *key*; kept across reloads while its config is unchanged."""
    with _limiters_lock:
        known = _limiters.get(key)
        if known is not None and known.config == config:
            return known
        limiter = _limiters[key] = RateLimiter(key, config)
        return limiter


def get_rate_limiter(name: str) -> RateLimiter:
    """
    The rate limiter shared by every call of policy *name*.

    Raises:
        PolicyError: No limiter of that name, and no policy of that name with a
            ``rate_limit`` section.
    """
    known = _limiters.get(name)
    if known is not None:
        return known
    from resilient.policy import registry

    policy = registry.get(name)
    if policy.rate_limit is None:
        msg = f"policy {name!r} has no rate_limit section"
        raise PolicyError(msg, policy=name)
    return _limiter_for(name, policy.rate_limit)


def rate_limiters() -> dict[str, RateLimiter]:
    """Every rate limiter made so far, by name."""
    return dict(_limiters)


def _reset_limiters() -> None:
    with _limiters_lock:
        _limiters.clear()

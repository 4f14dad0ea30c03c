"""
Fleet state on Redis: one breaker state, one half-open budget, one failure window.

The protocol (docs/distributed.md has the diagram):

* Per policy, four keys in one hash slot ``{<prefix>:<policy>}``: ``:state`` (hash:
  ``g`` generation, ``s`` state, ``ou``/``hu`` end of the open / half-open period in
  Redis server milliseconds, ``t`` consecutive trips), ``:trial`` (hash: the
  generation the half-open permits belong to, ``n`` permits taken, ``ok`` trial
  successes), ``:win`` (hash: the fleet's failure-rate window as a ring of buckets,
  cleared at every generation) and ``:replicas`` (sorted set: replica -> last flush).
* Every change is a Lua script, so it is atomic and compare-and-set on the
  generation; every transition is published on ``<prefix>:events`` as JSON.
* The success path of a closed breaker sends nothing: a daemon thread flushes the
  breaker's call counters every ``flush_interval`` (one pipelined round trip for all
  breakers), reading back the fleet's window and state in the same script (that is
  also the reconcile for missed pub/sub messages). A second daemon thread listens
  on pub/sub. Local transitions are queued to the flusher, which wakes at once.
* Only a caller that finds the breaker half-open pays a round trip (the fleet-wide
  trial permit), bounded by ``socket_timeout``.
* Retry budget and rate limit: one token bucket each in Redis (``:budget``,
  ``:rate``, same hash tag), managed by the ``bucket`` script. A process *leases*
  small batches of tokens (``cap / (10 x replicas seen)``) and spends them locally;
  the rate limiter's lease is topped up by the flusher when half spent, and a
  caller that finds it empty makes one lease round trip. Budget deposits are
  counted locally and added by the flusher. Leases unused for ``lease_ttl`` are
  given back.

Breakers, budgets and limiters are *members* (resilient.backends.protocol): this
module uses only their public protocol (``fleet_snapshot``, ``adopt``,
``set_offline``, ``merge_window``, ``after_fork`` ...) and never imports them.

Redis being slow or down never fails a call: every command has a short timeout and
no retries; on error the process carries on under ``on_backend_failure``, emits
:class:`~resilient.events.BackendDown`, reconnects with back-off and re-syncs
(a state record lost with a restarted Redis is re-seeded from the local state).
A process starting up is not in an outage: until the first answer (or the first
failed attempt, which counts as an outage) its members decide locally.
Malformed pub/sub messages and state records are ignored and counted.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal, overload

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from resilient.backends._config import BackendConfig, redact_url, split_cluster
from resilient.backends.protocol import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    STATES,
    SharedState,
)
from resilient.events import BackendDown, BackendUp, bus

if TYPE_CHECKING:
    from resilient.backends.protocol import (
        BreakerMember,
        BudgetMember,
        FleetMember,
        LimiterMember,
        OnBackendFailure,
    )

__all__ = ["RedisBackend", "fleet_status", "make_client", "redact", "redact_url"]

_log = logging.getLogger("resilient.backends.redis")

#: Errors that mean "Redis is not answering properly": the process carries on without it.
_BACKEND_ERRORS = (RedisError, RedisClusterException, OSError, ValueError)

#: *url* without credentials (the old name of :func:`redact_url`).
redact = redact_url

#: A malformed message or record is logged at most once per this many seconds.
_BAD_LOG_INTERVAL = 60.0

Health = Literal["connecting", "up", "down"]

# --------------------------------------------------------------------------- Lua

_PRELUDE = """
local name, chan = ARGV[1], ARGV[2]
local base, mult, maxd, ho = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6])
local origin = ARGV[7]
local t0 = redis.call('TIME')
local now = tonumber(t0[1]) * 1000 + math.floor(tonumber(t0[2]) / 1000)
local v = redis.call('HMGET', KEYS[1], 'g', 's', 'ou', 'hu', 't')
local g, s = tonumber(v[1]) or 0, v[2] or 'closed'
local ou, hu, t = tonumber(v[3]) or 0, tonumber(v[4]) or 0, tonumber(v[5]) or 0
local function dur(trips)
  local d = base * (mult ^ (trips - 1))
  if d > maxd then d = maxd end
  return math.floor(d)
end
local function rec(code)
  local orem, hrem = 0, -1
  if s == 'open' then orem = math.max(ou - now, 0) end
  if s == 'half-open' and hu > 0 then hrem = math.max(hu - now, 0) end
  return {code, g, s, orem, hrem, t}
end
local function store()
  redis.call('HSET', KEYS[1], 'g', g, 's', s, 'ou', ou, 'hu', hu, 't', t)
  local r = rec(0)
  redis.call('PUBLISH', chan, cjson.encode({name, g, s, r[4], r[5], t, origin}))
end
local function set(ns)
  g = g + 1
  if ns == 'open' then
    t = t + 1; ou = now + dur(t); hu = 0
  elseif ns == 'half-open' then
    if ho > 0 then hu = now + ho else hu = 0 end
  else
    t = 0; ou = 0; hu = 0
  end
  s = ns
  store()
end
local function advance()
  if s == 'half-open' and hu > 0 and now >= hu then set('open') end
end
"""

# Compare-and-set: ARGV[8] the generation the caller saw, ARGV[9] the new state.
_TRANSITION = """
local expected = tonumber(ARGV[8])
if g ~= expected then
  if redis.call('EXISTS', KEYS[1]) == 1 then return rec(0) end
  g = expected
end
set(ARGV[9])
return rec(1)
"""

# A half-open trial permit, fleet-wide: ARGV[8] cap, ARGV[9] key TTL (ms).
# Codes: 1 granted, 0 all taken, 2 closed, 3 open.
_TRIAL = """
advance()
if s == 'open' then
  if now < ou then return rec(3) end
  set('half-open')
end
if s ~= 'half-open' then return rec(2) end
if tonumber(redis.call('HGET', KEYS[2], 'g')) ~= g then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'g', g, 'n', 0, 'ok', 0)
end
redis.call('PEXPIRE', KEYS[2], ARGV[9])
local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
if n > tonumber(ARGV[8]) then
  redis.call('HINCRBY', KEYS[2], 'n', -1)
  return rec(0)
end
return rec(1)
"""

# A trial's verdict: ARGV[8] generation, ARGV[9] 'ok' or 'rel' (permit given back),
# ARGV[10] success_threshold. Code 1: this success closed the breaker.
_RESULT = """
advance()
if s ~= 'half-open' or g ~= tonumber(ARGV[8])
    or tonumber(redis.call('HGET', KEYS[2], 'g')) ~= g then
  return rec(0)
end
if ARGV[9] == 'rel' then
  if (tonumber(redis.call('HGET', KEYS[2], 'n')) or 0) > 0 then
    redis.call('HINCRBY', KEYS[2], 'n', -1)
  end
  return rec(0)
end
if redis.call('HINCRBY', KEYS[2], 'ok', 1) >= tonumber(ARGV[10]) then
  set('closed')
  return rec(1)
end
return rec(0)
"""

# Flush + reconcile + heartbeat. ARGV[8] generation the counts belong to, [9] calls,
# [10] failures, [11] bucket width (ms), [12] buckets (0: no fleet window),
# [13] replica id, [14] replica TTL (ms), [15..17] local state/open ms/trips to seed a
# record that Redis lost. Returns the record + current bucket, fleet calls, failures,
# whether the counts were added.
_FLUSH = """
local known = tonumber(ARGV[8])
if redis.call('EXISTS', KEYS[1]) == 0 then
  g = known + 1; s = ARGV[15]; t = tonumber(ARGV[17]); ou = 0; hu = 0
  if s == 'open' then ou = now + tonumber(ARGV[16])
  elseif s == 'half-open' and ho > 0 then hu = now + ho end
  store()
end
advance()
local ttl = tonumber(ARGV[14])
redis.call('ZADD', KEYS[4], now, ARGV[13])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
local width, nb = tonumber(ARGV[11]), tonumber(ARGV[12])
local cur, tc, tf, applied = 0, 0, 0, 0
if nb > 0 then
  cur = math.floor(now / width)
  if tonumber(redis.call('HGET', KEYS[3], 'g')) ~= g then
    redis.call('DEL', KEYS[3])
    redis.call('HSET', KEYS[3], 'g', g)
  end
  local dc, df = tonumber(ARGV[9]), tonumber(ARGV[10])
  if s == 'closed' and g == known and dc > 0 then
    local slot = cur % nb
    if tonumber(redis.call('HGET', KEYS[3], 'i' .. slot)) ~= cur then
      redis.call('HSET', KEYS[3], 'i' .. slot, cur, 'c' .. slot, 0, 'f' .. slot, 0)
    end
    redis.call('HINCRBY', KEYS[3], 'c' .. slot, dc)
    redis.call('HINCRBY', KEYS[3], 'f' .. slot, df)
    applied = 1
  end
  redis.call('PEXPIRE', KEYS[3], width * nb * 2)
  local all = redis.call('HGETALL', KEYS[3])
  local idx, cs, fs = {}, {}, {}
  for i = 1, #all, 2 do
    local kind, sl, val = string.sub(all[i], 1, 1), string.sub(all[i], 2), tonumber(all[i + 1])
    if kind == 'i' then idx[sl] = val elseif kind == 'c' then cs[sl] = val
    elseif kind == 'f' then fs[sl] = val end
  end
  for sl, i in pairs(idx) do
    if i > cur - nb then tc = tc + (cs[sl] or 0); tf = tf + (fs[sl] or 0) end
  end
end
local r = rec(0)
return {r[1], r[2], r[3], r[4], r[5], r[6], cur, tc, tf, applied}
"""

# A token bucket (the retry budget's and the rate limit's): KEYS[1] the bucket (hash:
# ``tk`` tokens, ``ts`` last update, Redis server ms), KEYS[2] the policy's replicas.
# ARGV: [1] capacity (also the initial balance), [2] refill per ms, [3] tokens added
# (deposits, leases given back), [4] tokens wanted (0: none), [5] replica id, [6] replica
# TTL (ms), [7] bucket TTL (ms). Grants at most one batch, cap / (10 x replicas seen).
# Returns granted, batch, ms until one token (-1: no refill by time), replicas.
_BUCKET = """
local t0 = redis.call('TIME')
local now = tonumber(t0[1]) * 1000 + tonumber(t0[2]) / 1000
local cap, per_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local add, want = tonumber(ARGV[3]), tonumber(ARGV[4])
local rttl = tonumber(ARGV[6])
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - rttl)
redis.call('PEXPIRE', KEYS[2], rttl)
local replicas = redis.call('ZCARD', KEYS[2])
local v = redis.call('HMGET', KEYS[1], 'tk', 'ts')
local tk, ts = tonumber(v[1]), tonumber(v[2])
if tk == nil or ts == nil then tk = cap; ts = now end
if now > ts then
  tk = tk + (now - ts) * per_ms
  ts = now
end
tk = tk + add
if tk > cap then tk = cap end
local batch = math.max(1, math.floor(cap / (10 * replicas)))
local granted = 0
if want > 0 and tk >= 1 then
  granted = math.min(want, batch, math.floor(tk))
  tk = tk - granted
end
redis.call('HSET', KEYS[1], 'tk', tostring(tk), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], ARGV[7])
local wait = -1
if tk < 1 and per_ms > 0 then wait = math.ceil((1 - tk) / per_ms) end
return {granted, batch, wait, replicas}
"""

_SCRIPTS = {
    "transition": _PRELUDE + _TRANSITION,
    "trial": _PRELUDE + _TRIAL,
    "result": _PRELUDE + _RESULT,
    "flush": _PRELUDE + _FLUSH,
    "bucket": _BUCKET,
}
_SHA = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in _SCRIPTS.items()}


# --------------------------------------------------------------------------- clients


def make_client(
    config: BackendConfig, *, socket_timeout: float | None = None, decode: bool = True
) -> Any:
    """
    A synchronous redis-py client for *config*: short timeouts and **no retries**
    (a retry would multiply the time a hung Redis can cost). *decode*: replies as
    ``str`` (``False``: ``bytes``, for a pub/sub connection that may carry garbage).
    """
    assert config.redis_url is not None
    url, cluster = split_cluster(config.redis_url, config.cluster)
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout if socket_timeout is not None else config.socket_timeout,
        "socket_connect_timeout": config.connect_timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": decode,
    }
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, retry_on_timeout=False, **options)


# --------------------------------------------------------------------------- records

_MAX_INT = 1 << 62


def _int(value: Any) -> int | None:
    """An integer from a script reply or a JSON message; ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -_MAX_INT < value < _MAX_INT else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and abs(value) < _MAX_INT else None
    if isinstance(value, str | bytes) and 0 < len(value) <= 19:
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _shared_state(record: Any) -> SharedState | None:
    """
    The record ``(code, g, s, open ms, half-open ms, trips, ...)`` of a script reply
    or a pub/sub message as a :class:`SharedState`; ``None`` when it is malformed
    (wrong shape, unknown state name, not numbers): it is then ignored.
    """
    try:
        raw_state = record[2]
        gen, open_ms, half_ms, trips = (_int(record[i]) for i in (1, 3, 4, 5))
    except (TypeError, IndexError, KeyError):
        return None
    state = raw_state.decode("utf-8", "replace") if isinstance(raw_state, bytes) else raw_state
    if (
        state not in STATES
        or gen is None
        or gen < 0
        or open_ms is None
        or open_ms < 0
        or half_ms is None
        or half_ms < -1
        or trips is None
        or trips < 0
    ):
        return None
    return SharedState(gen, state, open_ms / 1000, half_ms / 1000 if half_ms >= 0 else None, trips)


# --------------------------------------------------------------------------- link


class _Link:
    """One breaker's connection to the fleet (see resilient.backends.protocol.BreakerLink)."""

    def __init__(self, backend: RedisBackend, breaker: BreakerMember) -> None:
        self.backend = backend
        self.breaker = breaker
        self.name = breaker.name
        cfg = breaker.config
        self.known_gen = 0
        self.known_state = STATE_CLOSED
        self.usable = backend.up
        tag = backend.tag(breaker.name)
        self.keys = (f"{tag}:state", f"{tag}:trial", f"{tag}:win", f"{tag}:replicas")
        self.common: tuple[Any, ...] = (
            breaker.name,
            backend.channel,
            int(cfg.timeout_seconds * 1000),
            cfg.open_duration_multiplier,
            int(cfg.max_open_duration * 1000),
            int((cfg.half_open_timeout or 0) * 1000),
            backend.replica_id,
        )
        self.trial_ttl = int(max(cfg.half_open_timeout or 0, cfg.max_open_duration) * 2000) + 1000
        if cfg.window_type == "time":
            self.buckets = min(cfg.failure_rate_window, 60)
            self.width_ms = max(int(cfg.failure_rate_window * 1000 / self.buckets), 1)
        else:  # a count window stays per process (docs/distributed.md)
            self.buckets = 0
            self.width_ms = 1000
        self._plock = threading.Lock()
        self.pending: tuple[int, str] | None = None
        self.results: collections.deque[tuple[str, int]] = collections.deque()
        self.exhausted_gen = -1
        snapshot = breaker.fleet_snapshot()
        self.last_s = snapshot.successes
        self.last_f = snapshot.failures
        self.own: collections.deque[tuple[int, int, int]] = collections.deque()
        self.next_reconcile = 0.0
        # Adoptions are serialized, and every pub/sub message bumps ``seen``: a read
        # sent before a message was applied and answered after it may be older than
        # the message (two sockets, two threads) and must not undo it.
        self._alock = threading.RLock()
        self.seen = 0

    # ---- called by the breaker (lock held; never blocks)

    def transitioned(self, old: str, new: str) -> None:
        if old == STATE_OPEN and new == STATE_HALF_OPEN:
            return  # the fleet moves to half-open in the trial script, when someone asks
        with self._plock:
            self.pending = (self.known_gen, new)
        self.backend._wake.set()

    def trial_result(self, success: bool) -> None:
        self.results.append(("ok", self.known_gen))
        self.backend._wake.set()

    def release_permit(self) -> None:
        self.results.append(("rel", self.known_gen))
        self.backend._wake.set()

    # ---- called by the breaker without its lock: one short round trip

    def trial_permit(self) -> bool | None:
        if self.exhausted_gen == self.known_gen and self.known_state == STATE_HALF_OPEN:
            return False
        backend = self.backend
        since = self.seen
        try:
            reply = backend._eval(
                "trial",
                self.keys[:2],
                (*self.common, self.breaker.config.trial_calls, self.trial_ttl),
            )
        except ResponseError:
            _log.exception("resilient: trial permit script failed for %r", self.name)
            return None
        except _BACKEND_ERRORS as exc:
            backend._mark_down(exc)
            return None
        shared = _shared_state(reply)
        code = _int(reply[0]) if isinstance(reply, list | tuple) and reply else None
        if shared is None or code is None:
            backend._bad("state record", reply)
            return None  # decide with the local permits
        self.apply(reply, fresh=True, since=since)
        if code == 0:
            self.exhausted_gen = shared.generation
        return code == 1

    # ---- called by the backend's threads

    def apply(self, reply: Any, *, fresh: bool, since: int | None = None) -> bool:
        """
        Adopt the record ``(code, g, s, open ms, half-open ms, trips)``: a pub/sub
        message (*fresh* false) or a script's reply (*fresh* true; *since* the value
        of ``seen`` when the script was sent). Returns False if the reply was skipped
        as older than a message applied meanwhile, or malformed.
        """
        shared = _shared_state(reply)
        if shared is None:
            self.backend._bad("state record", reply)
            return False
        gen, state = shared.generation, shared.state
        with self._alock:
            if not fresh:
                self.seen += 1
            else:
                pending = self.pending
                if pending is not None and gen == pending[0]:
                    return True  # our own transition is on its way; this read predates it
                known = self.known_gen
                if (
                    since is not None
                    and since != self.seen
                    and (gen < known or (gen == known and state != self.known_state))
                ):
                    # A message was applied while this read was in flight and the read
                    # is older: it predates the message (two sockets, two threads), so
                    # it must not undo it. Read again soon rather than trust either
                    # blindly (a record Redis lost and re-seeded is legitimately older).
                    self.next_reconcile = 0.0
                    self.backend._wake.set()
                    return False
            self.breaker.adopt(shared, fresh=fresh)
        return True

    def take_pending(self) -> tuple[int, str] | None:
        with self._plock:
            pending, self.pending = self.pending, None
        return pending

    def flush_args(self) -> tuple[Any, ...]:
        snapshot = self.breaker.fleet_snapshot()
        s, f = snapshot.successes, snapshot.failures
        ds, df = s - self.last_s, f - self.last_f
        self.last_s, self.last_f = s, f
        if ds < 0 or df < 0:  # reset() cleared the totals
            ds = df = 0
        calls, fails = (ds + df, df) if self.buckets else (0, 0)
        state = snapshot.state
        return (
            *self.common,
            self.known_gen,
            calls,
            fails,
            self.width_ms,
            self.buckets,
            self.backend.replica_id,
            int(self.backend.config.heartbeat_ttl * 1000),
            state,
            int(snapshot.open_for * 1000) if state == STATE_OPEN else 0,
            snapshot.trips,
        )

    def has_news(self) -> bool:
        snapshot = self.breaker.fleet_snapshot()
        return snapshot.successes != self.last_s or snapshot.failures != self.last_f

    def flushed(self, args: tuple[Any, ...], reply: Any, since: int) -> None:
        cur, total_c, total_f, applied = (int(x) for x in reply[6:10])
        if applied:
            self.own.append((cur, int(args[8]), int(args[9])))
        while self.own and self.own[0][0] <= cur - self.buckets:
            self.own.popleft()
        if not self.apply(reply, fresh=True, since=since):
            return  # the fleet window read belongs to a generation no longer current
        if self.buckets and self.known_state == STATE_CLOSED:
            own_c = sum(c for _, c, _ in self.own)
            own_f = sum(f for _, _, f in self.own)
            self.breaker.merge_window(max(total_c - own_c, 0), max(total_f - own_f, 0))

    def after_fork(self, replica_id: str) -> None:
        """In a forked child: own locks afresh, the child's identity, the breaker's locks."""
        self.usable = False
        self._plock = threading.Lock()
        self._alock = threading.RLock()
        self.common = (*self.common[:6], replica_id)
        self.breaker.after_fork()
        self.breaker.set_offline(None)  # the child starts up: local until Redis answers


class _Bucket:
    """What the budget and rate links share: a bucket in Redis and the replica's identity."""

    kind = "bucket"

    def __init__(
        self, backend: RedisBackend, name: str, capacity: float, per_second: float
    ) -> None:
        self.backend = backend
        self.name = name
        tag = backend.tag(name)
        self.keys = (f"{tag}:{self.kind}", f"{tag}:replicas")
        self.capacity = capacity
        self.per_ms = per_second / 1000
        # a missing bucket is a full one: keep it while it could still be short of full
        full_ms = capacity / self.per_ms if self.per_ms > 0 else 86_400_000
        self.key_ttl = int(min(full_ms, 7 * 86_400_000)) + 1000
        self.usable = backend.up
        # Starting up is not an outage: the local bucket decides until Redis has been
        # found down, then on_backend_failure does (set by the backend's _mark_down).
        self.fallback: OnBackendFailure = (
            backend.config.on_backend_failure if backend.health == "down" else "local"
        )
        self.timeout = backend.config.socket_timeout

    def args(self, add: float, want: int) -> tuple[Any, ...]:
        cfg = self.backend.config
        return (
            self.capacity,
            self.per_ms,
            add,
            want,
            self.backend.replica_id,
            int(cfg.heartbeat_ttl * 1000),
            self.key_ttl,
        )

    def call(self, add: float, want: int) -> tuple[int, int, float] | None:
        """One bucket script, synchronously: ``(granted, batch, ms until a token)``."""
        backend = self.backend
        try:
            reply = backend._eval("bucket", self.keys, self.args(add, want))
        except ResponseError:
            _log.exception("resilient: bucket script failed for %r", self.name)
            return None
        except _BACKEND_ERRORS as exc:
            backend._mark_down(exc)
            return None
        return int(reply[0]), int(reply[1]), float(reply[2])

    def offline(self) -> None:
        """Redis is away: leased tokens may be stale by the time it returns."""

    def after_fork(self) -> None:
        """In a forked child: own locks afresh, the member's too."""


class _BudgetLink(_Bucket):
    """One retry budget's share of the fleet's bucket (see protocol.BudgetLink)."""

    kind = "budget"

    def __init__(self, backend: RedisBackend, budget: BudgetMember) -> None:
        cfg = budget.config
        super().__init__(backend, budget.name, cfg.max_tokens, cfg.min_retries_per_second)
        self.budget = budget
        self.ratio = cfg.ratio
        self._lock = threading.Lock()  # tokens, leased_at, last_calls
        self._leasing = threading.Lock()
        self.tokens = 0
        self.leased_at = 0.0
        self.last_calls = budget.calls
        self.dry_until = 0.0

    def deposits(self) -> float:
        """Tokens deposited by the calls since the last read (lock held)."""
        calls = self.budget.calls
        new, self.last_calls = calls - self.last_calls, calls
        return max(new, 0) * self.ratio

    def has_news(self) -> bool:
        return self.budget.calls != self.last_calls

    def _take(self) -> bool:
        with self._lock:
            if self.tokens > 0:
                self.tokens -= 1
                return True
        return False

    def withdraw(self) -> bool | None:
        if self._take():
            return True
        if not self.usable:
            return _OFFLINE[self.fallback]
        now = time.monotonic()
        if now < self.dry_until:
            return False
        if not self._leasing.acquire(blocking=False):
            # someone else is asking the fleet: wait for that answer (bounded) and share it
            if self._leasing.acquire(timeout=self.timeout):
                self._leasing.release()
            return True if self._take() else (False if self.usable else _OFFLINE[self.fallback])
        try:
            with self._lock:
                add = self.deposits()
            got = self.call(add, _FULL_BATCH)
        finally:
            self._leasing.release()
        if got is None:
            return _OFFLINE[self.fallback] if not self.usable else None
        granted, _batch, wait_ms = got
        if granted == 0:
            interval = self.backend.config.flush_interval
            self.dry_until = now + (min(wait_ms / 1000, interval) if wait_ms > 0 else interval)
            return False
        with self._lock:
            self.tokens += granted - 1
            self.leased_at = now
        return True

    def flush_args(self, now: float, lease_ttl: float) -> tuple[Any, ...] | None:
        """In the flusher: deposits since the last flush, plus a lease left unused too long."""
        with self._lock:
            give_back = 0
            if self.tokens and now - self.leased_at >= lease_ttl:
                give_back, self.tokens = self.tokens, 0
            add = self.deposits() + give_back
        return self.args(add, 0) if add > 0 else None

    def offline(self) -> None:
        with self._lock:
            self.tokens = 0
        self.dry_until = 0.0

    def after_fork(self) -> None:
        """In a forked child: own locks afresh; the parent's lease is the parent's."""
        self.usable = False
        self.fallback = "local"
        self._lock = threading.Lock()
        self._leasing = threading.Lock()
        self.tokens = 0
        self.dry_until = 0.0
        self.budget.after_fork()


class _RateLink(_Bucket):
    """One rate limiter's source of leases (see protocol.LeaseSource)."""

    kind = "rate"

    def __init__(self, backend: RedisBackend, limiter: LimiterMember) -> None:
        cfg = limiter.config
        # a bucket holds at least one call: 0.5 per second is one call per 2 s
        capacity = max(cfg.max_rate, 1.0)
        super().__init__(backend, limiter.name, capacity, cfg.max_rate / cfg.time_period)
        self.limiter = limiter
        self.local_share = backend.config.fallback_rate_share
        self.last_taken = 0
        self.active_at = time.monotonic()

    def lease(self, want: int) -> tuple[int, int, float] | None:
        got = self.call(0, want)
        if got is None:
            return None
        granted, batch, wait_ms = got
        return granted, batch, max(wait_ms, 1.0) / 1000

    def wake(self) -> None:
        self.backend._wake.set()

    def top_up(self) -> None:
        """In the flusher: top the limiter's lease up if it asked for it."""
        lease = self.limiter.lease
        if lease is not None and lease.refill:
            lease.top_up()

    def idle_args(self, now: float, lease_ttl: float) -> tuple[Any, ...] | None:
        """In the flusher: give back a lease nobody took from for ``lease_ttl``."""
        lease = self.limiter.lease
        if lease is None:
            return None
        taken = lease.taken
        if taken != self.last_taken:
            self.last_taken = taken
            self.active_at = now
            return None
        if lease.tokens and now - self.active_at >= lease_ttl:
            n = lease.revoke()
            if n:
                return self.args(n, 0)
        return None

    def offline(self) -> None:
        lease = self.limiter.lease
        if lease is not None:
            lease.revoke()

    def after_fork(self) -> None:
        """In a forked child: the limiter's own locks afresh, the parent's lease dropped."""
        self.usable = False
        self.fallback = "local"
        self.limiter.after_fork()


#: What a retry decides while Redis is unreachable (None: the local bucket).
_OFFLINE: dict[str, bool | None] = {"local": None, "open": False, "closed": True}
_FULL_BATCH = 1 << 30


# --------------------------------------------------------------------------- backend

_instances: weakref.WeakSet[RedisBackend] = weakref.WeakSet()


class RedisBackend:
    """
    Shares breaker state through Redis. One per process (see ``resilient.backends.configure``).

    Two daemon threads, started with the backend: the *flusher* (counts,
    queued transitions and trial verdicts, reconcile, heartbeat, reconnection) and
    the *listener* (pub/sub). Both use the synchronous client, so sync and async
    callers are served alike and no event loop is ever involved.

    Attributes:
        health: ``"connecting"`` (starting: no answer yet, members decide locally),
            ``"up"`` or ``"down"`` (an outage, ``on_backend_failure`` decides).
        up: Whether Redis answers now.
        url: The URL without credentials.
        bad_messages: Malformed pub/sub messages and state records ignored so far.
    """

    name = "redis"

    def __init__(self, config: BackendConfig) -> None:
        if not config.redis_url:
            msg = "RedisBackend needs a redis_url"
            raise ValueError(msg)
        self.config = config
        self.url = redact_url(config.redis_url)
        self.channel = f"{config.key_prefix}:events"
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(24):06x}"
        self._client = make_client(config)
        self._cluster = split_cluster(config.redis_url, config.cluster)[1]
        self._links: dict[str, _Link] = {}
        self._budgets: dict[str, _BudgetLink] = {}
        self._rates: dict[str, _RateLink] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.health: Health = "connecting"
        self.up = False
        self.subscribed = False
        self._down_since = 0.0
        self._last_heartbeat = 0.0
        self._next_flush = 0.0
        self._force = False
        self._bad_lock = threading.Lock()
        self.bad_messages = 0
        self._next_bad_log = 0.0
        _instances.add(self)
        # The first connection attempt starts now, in the background: members attached
        # meanwhile decide locally (starting up is not an outage) until it answers.
        self._start()

    def __repr__(self) -> str:
        return f"<RedisBackend {self.url} {self.health}>"

    def status(self) -> dict[str, Any]:
        """
        This process's view of the backend (JSON-serialisable): ``backend``, ``url``
        (without credentials), ``up``, ``state`` (``connecting``/``up``/``down``),
        ``replica``, ``subscribed`` and ``bad_messages``.
        """
        return {
            "backend": self.name,
            "url": self.url,
            "up": self.up,
            "state": self.health,
            "replica": self.replica_id,
            "subscribed": self.subscribed,
            "bad_messages": self.bad_messages,
        }

    # ---- breakers, budgets, limiters

    def tag(self, name: str) -> str:
        """The hash tag of policy *name*: all its keys are in one slot."""
        return f"{{{self.config.key_prefix}:{name}}}"

    @overload
    def attach(self, member: BreakerMember) -> _Link: ...
    @overload
    def attach(self, member: BudgetMember) -> _BudgetLink: ...
    @overload
    def attach(self, member: LimiterMember) -> _RateLink: ...

    def attach(self, member: FleetMember) -> _Link | _BudgetLink | _RateLink:
        """
        Share *member*'s state with the fleet (replacing an earlier member of the same
        kind and name).
        """
        if member.fleet_kind == "breaker":
            link = _Link(self, member)
            self._add(self._links, member.name, link)
            policy = self.config.on_backend_failure
            if self.health == "down" and policy != "local":
                member.set_offline(policy)
            self._force = True
            self._wake.set()
            return link
        if member.fleet_kind == "budget":
            budget = _BudgetLink(self, member)
            self._add(self._budgets, member.name, budget)
            return budget
        rate = _RateLink(self, member)
        self._add(self._rates, member.name, rate)
        return rate

    def _add(self, table: dict[str, Any], name: str, link: Any) -> None:
        with self._lock:
            table[name] = link

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait until Redis answered and the pub/sub subscription is in place."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.up and self.subscribed and not self._force:
                return True
            time.sleep(0.005)
        return False

    def _start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._run, name="resilient-redis-flusher", daemon=True),
            threading.Thread(target=self._listen, name="resilient-redis-listener", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the threads and close the connections (the shared state stays in Redis)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)
        self._threads = []
        for link in self._links.values():
            link.usable = False
        for bucket in self._buckets():
            bucket.usable = False
            bucket.fallback = "local"  # a closed backend leaves them to the local buckets
            bucket.offline()
        with contextlib.suppress(*_BACKEND_ERRORS):
            self._client.close()

    # ---- chaos emergency stop (resilient.chaos): one key, read by a poller, never per call

    @property
    def chaos_key(self) -> str:
        """The key that holds the fleet's chaos emergency stop (its reason)."""
        return f"{self.config.key_prefix}:chaos:stop"

    def chaos_stop(self, reason: str | None) -> None:
        """
        Raise (or, with ``None``, lift) the chaos emergency stop for the whole fleet.
        Redis being down is logged: the stop still holds in this process.
        """
        try:
            if reason is None:
                self._client.delete(self.chaos_key)
            else:
                self._client.set(self.chaos_key, reason)
        except _BACKEND_ERRORS as exc:
            _log.error("chaos emergency stop not shared with the fleet (%s): %s", self.url, exc)

    def chaos_stopped(self) -> str | None:
        """The fleet's chaos emergency stop reason, or ``None`` (also when Redis is down)."""
        try:
            value = self._client.get(self.chaos_key)
        except _BACKEND_ERRORS as exc:
            _log.warning("chaos stop key not readable (%s): %s", self.url, exc)
            return None
        if value is None:
            return None
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def _buckets(self) -> list[_BudgetLink | _RateLink]:
        with self._lock:
            return [*self._budgets.values(), *self._rates.values()]

    # ---- Redis calls

    def _eval(self, name: str, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        try:
            return self._client.evalsha(_SHA[name], len(keys), *keys, *args)
        except NoScriptError:
            self._load_scripts()
            return self._client.evalsha(_SHA[name], len(keys), *keys, *args)

    def _batch(self, sent: list[tuple[str, tuple[str, ...], tuple[Any, ...]]]) -> list[Any]:
        """Scripts ``(name, keys, args)``: pipelined (one round trip), or one by one on a
        cluster (redis-py refuses EVALSHA in cluster pipelines; each policy's keys are
        in one slot anyway)."""
        if not self._cluster:
            pipe = self._client.pipeline(transaction=False)
            for name, keys, args in sent:
                pipe.evalsha(_SHA[name], len(keys), *keys, *args)
            try:
                return list(pipe.execute())
            except NoScriptError:
                self._load_scripts()
        return [self._eval(name, keys, args) for name, keys, args in sent]

    def _load_scripts(self) -> None:
        for src in _SCRIPTS.values():
            self._client.script_load(src)

    # ---- malformed input

    def _bad(self, what: str, detail: Any) -> None:
        """Count a malformed message or record; log it at most once per interval."""
        now = time.monotonic()
        with self._bad_lock:
            self.bad_messages += 1
            count = self.bad_messages
            log = now >= self._next_bad_log
            if log:
                self._next_bad_log = now + _BAD_LOG_INTERVAL
        if log:
            _log.warning(
                "resilient: ignored a malformed %s from Redis %s: %.200r "
                "(%d ignored so far; logged at most once every %gs)",
                what,
                self.url,
                detail,
                count,
                _BAD_LOG_INTERVAL,
            )

    # ---- up / down

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            if self.health == "down":
                return
            starting = self.health == "connecting"
            self.health = "down"
            self.up = False
            self._down_since = time.monotonic()
            links = list(self._links.values())
        for link in links:
            link.usable = False
        policy = self.config.on_backend_failure
        for bucket in self._buckets():
            bucket.usable = False
            bucket.fallback = policy
            bucket.offline()  # leased tokens may be stale by the time Redis is back
        if policy != "local":
            for link in links:
                link.breaker.set_offline(policy)
        _log.warning(
            "resilient: Redis backend %s unreachable%s (%s: %s); carrying on with %s state",
            self.url,
            " from the start" if starting else "",
            type(exc).__name__,
            exc,
            "local" if policy == "local" else f"breakers {policy}",
        )
        if bus.active:
            bus.emit(BackendDown("redis", type(exc).__name__))
        self._wake.set()

    def _mark_up(self) -> None:
        with self._lock:
            was = self.health
            self.health = "up"
            self.up = True
            links = list(self._links.values())
        for link in links:
            link.usable = True
            link.exhausted_gen = -1
            link.breaker.set_offline(None)
        for bucket in self._buckets():
            bucket.usable = True
        down_for = None if was == "connecting" else time.monotonic() - self._down_since
        if down_for is not None:
            _log.warning("resilient: Redis backend %s is back after %.3gs", self.url, down_for)
        if bus.active:
            bus.emit(BackendUp("redis", down_for))

    # ---- the flusher thread

    def _run(self) -> None:
        delay = 0.02
        while not self._stop.is_set():
            if not self.up:
                try:
                    self._client.ping()
                    self._load_scripts()
                    self._tick(force=True)
                except Exception as exc:  # whatever it is, try again later
                    if self.health == "connecting":
                        self._mark_down(exc)  # unreachable from the start: an outage too
                    else:
                        _log.debug("resilient: Redis %s still unreachable: %s", self.url, exc)
                    self._stop.wait(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.config.max_reconnect_delay)
                    continue
                delay = 0.02
                self._mark_up()
                continue
            self._wake.wait(max(self._next_flush - time.monotonic(), 0.0))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._tick(force=self._force)
            except ResponseError:  # a script or server-side problem, not an outage
                _log.exception("resilient: Redis flusher got an error reply")
            except _BACKEND_ERRORS as exc:
                self._mark_down(exc)
            except Exception:  # a bug must not kill the thread
                _log.exception("resilient: Redis flusher failed")

    def _tick(self, *, force: bool) -> None:
        """
        Queued transitions and verdicts, lease top-ups (whenever woken), then every
        ``flush_interval``: counts, deposits, idle leases given back, reconcile.
        """
        self._force = False
        with self._lock:
            links = list(self._links.values())
            budgets = list(self._budgets.values())
            rates = list(self._rates.values())
        now = time.monotonic()
        flush_due = force or now >= self._next_flush
        if flush_due:
            self._next_flush = now + self.config.flush_interval
        for link in links:
            pending = link.take_pending()
            if pending is not None:
                since = link.seen
                try:
                    reply = self._eval("transition", link.keys[:1], (*link.common, *pending))
                except BaseException:
                    with link._plock:  # keep it for the re-sync
                        if link.pending is None:
                            link.pending = pending
                    raise
                link.apply(reply, fresh=True, since=since)
            while link.results:
                kind, gen = link.results[0]
                args = (*link.common, gen, kind, link.breaker.config.success_threshold)
                since = link.seen
                link.apply(self._eval("result", link.keys[:2], args), fresh=True, since=since)
                link.results.popleft()
        for rate in rates:  # after transitions (convergence first), before the flush
            rate.top_up()
        due = [
            link
            for link in links
            if force
            or now >= link.next_reconcile
            or (flush_due and link.buckets and link.has_news())
        ]
        sent = [(link, link.seen, link.flush_args()) for link in due]
        batch: list[tuple[str, tuple[str, ...], tuple[Any, ...]]] = [
            ("flush", link.keys, args) for link, _, args in sent
        ]
        if flush_due:
            lease_ttl = self.config.lease_ttl
            for bucket in budgets:
                extra = bucket.flush_args(now, lease_ttl)
                if extra is not None:
                    batch.append(("bucket", bucket.keys, extra))
            for rate in rates:
                extra = rate.idle_args(now, lease_ttl)
                if extra is not None:
                    batch.append(("bucket", rate.keys, extra))
        if batch:
            replies = self._batch(batch)
            for (link, since, args), reply in zip(sent, replies, strict=False):
                link.next_reconcile = now + self.config.reconcile_interval
                link.flushed(args, reply, since)
        if now - self._last_heartbeat >= self.config.heartbeat_ttl / 3:
            self._last_heartbeat = now
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "policies": sorted(
                    {link.name for link in links}
                    | {b.name for b in budgets}
                    | {r.name for r in rates}
                ),
                "bad_messages": self.bad_messages,
            }
            self._client.set(
                f"{self.config.key_prefix}:replica:{self.replica_id}",
                json.dumps(info),
                px=int(self.config.heartbeat_ttl * 1000),
            )

    # ---- the listener thread

    def _listen(self) -> None:
        pubsub: Any = None
        listener: Any = None
        delay = 0.02
        while not self._stop.is_set():
            if pubsub is None:
                try:
                    if listener is None:
                        # its own client: a blocking read on this thread delays no caller,
                        # so it need not give up after socket_timeout; bytes, not str, so
                        # that a message that is not UTF-8 is one bad message, not an error
                        # of the connection
                        listener = make_client(self.config, socket_timeout=5.0, decode=False)
                    pubsub = listener.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.channel)
                except _BACKEND_ERRORS:
                    pubsub = self._close_pubsub(pubsub)
                    self._stop.wait(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.config.max_reconnect_delay)
                    continue
                delay = 0.02
                self.subscribed = True
                self._force = True  # messages may have been missed: reconcile now
                self._wake.set()
            try:
                message = pubsub.get_message(timeout=0.25)
            except _BACKEND_ERRORS:
                pubsub = self._close_pubsub(pubsub)
                continue
            except Exception:  # a bug must not kill the thread
                _log.exception("resilient: Redis listener failed")
                pubsub = self._close_pubsub(pubsub)
                continue
            if message is not None and message.get("type") == "message":
                try:
                    self._on_message(message.get("data"))
                except Exception:  # a bug must not kill the thread either
                    self._bad("pub/sub message", message.get("data"))
        self._close_pubsub(pubsub)
        if listener is not None:
            with contextlib.suppress(*_BACKEND_ERRORS):
                listener.close()

    def _close_pubsub(self, pubsub: Any) -> Any:
        self.subscribed = False
        if pubsub is not None:
            with contextlib.suppress(*_BACKEND_ERRORS):
                pubsub.close()
        return None

    def _on_message(self, data: Any) -> None:
        """A transition published by a replica: ``[policy, g, s, open ms, half ms, trips, by]``."""
        try:
            message = json.loads(data)
        except (TypeError, ValueError):  # not JSON, not UTF-8
            self._bad("pub/sub message", data)
            return
        if not (isinstance(message, list) and len(message) == 7 and isinstance(message[0], str)):
            self._bad("pub/sub message", data)
            return
        link = self._links.get(message[0])
        if link is None:
            return  # a policy this process does not use
        record = (0, *message[1:6])
        if _shared_state(record) is None:  # an unknown state name, not numbers...
            self._bad("pub/sub message", data)
            return
        link.apply(record, fresh=False)

    # ---- fork

    def _after_fork(self) -> None:
        """In a forked child: no threads survive a fork; start afresh with a new identity."""
        self._lock = threading.Lock()
        self._bad_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.up = self.subscribed = False
        self.health = "connecting"
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(24):06x}"
        self._client = make_client(self.config)
        for link in self._links.values():
            link.after_fork(self.replica_id)
        for bucket in [*self._budgets.values(), *self._rates.values()]:
            bucket.after_fork()
        self._threads = []
        self._start()


def _reinit_after_fork() -> None:
    for backend in list(_instances):
        if backend._threads and not backend._stop.is_set():
            backend._after_fork()


os.register_at_fork(after_in_child=_reinit_after_fork)


# --------------------------------------------------------------------------- status


def _field(record: dict[str, Any], key: str, default: int = 0) -> int:
    value = _int(record.get(key, default))
    return default if value is None else value


def fleet_status(config: BackendConfig) -> dict[str, Any]:
    """
    The fleet's view, read from Redis: every policy's shared state and the replicas seen.

    Returns:
        ``url`` (without credentials), ``policies`` (state, generation, trips,
        ``retry_after``, ``trial_permits_taken``, replicas, per policy), ``replicas``
        (each one's heartbeat: pid, host, policies, ``bad_messages``) and
        ``bad_messages`` (malformed messages and records the replicas ignored).

    Raises:
        redis.RedisError: Redis cannot be reached.
    """
    client = make_client(config)
    prefix = config.key_prefix
    try:
        now_s, now_us = client.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        policies: dict[str, Any] = {}
        for key in sorted(set(client.scan_iter(match=f"{{{prefix}:*}}:state", count=500))):
            name = key[len(prefix) + 2 : -len("}:state")]
            record = client.hgetall(key)
            tag = f"{{{prefix}:{name}}}"
            seen = client.zrangebyscore(
                f"{tag}:replicas", now_ms - int(config.heartbeat_ttl * 1000), "+inf"
            )
            trial = client.hgetall(f"{tag}:trial")
            state = record.get("s", STATE_CLOSED)
            gen = _field(record, "g")
            policies[name] = {
                "state": state,
                "generation": gen,
                "trips": _field(record, "t"),
                "retry_after": max(_field(record, "ou") - now_ms, 0) / 1000
                if state == STATE_OPEN
                else None,
                "trial_permits_taken": _field(trial, "n")
                if state == STATE_HALF_OPEN and _field(trial, "g", -1) == gen
                else 0,
                "replicas": sorted(seen),
            }
        replicas: dict[str, Any] = {}
        for key in client.scan_iter(match=f"{prefix}:replica:*", count=500):
            raw = client.get(key)
            if raw is not None:
                try:
                    info = json.loads(raw)
                except ValueError:
                    info = {"malformed": True}
                replicas[key[len(prefix) + len(":replica:") :]] = info
        bad = sum(
            count
            for info in replicas.values()
            if isinstance(info, dict) and (count := _int(info.get("bad_messages"))) is not None
        )
        return {
            "url": redact_url(config.redis_url or ""),
            "policies": policies,
            "replicas": replicas,
            "bad_messages": bad,
        }
    finally:
        client.close()

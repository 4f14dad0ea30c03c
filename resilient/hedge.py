"""
Hedged requests: when an attempt has not answered after a delay, start another
one in parallel; the first acceptable answer wins and the others are cancelled.

A hedged *group* replaces the single attempt of one turn of the retry loop in
:mod:`resilient.pipeline` (so the order is ``retry -> hedge -> [attempt]``): the
loop admits the first attempt as usual and hands it here; each extra attempt
is an attempt of the one engine (:mod:`resilient.attempt`: admit, arm, settle)
run in a task of its own, with its per-attempt deadline armed on that task. The
group ends with the first acceptable outcome (a result that ``retry_if_result``
does not reject, or an exception the retry policy would not retry), or, when
every attempt failed, with the outcome of the last one to finish (a refusal of
a hedge never hides a real error); the retry loop then decides as for any
attempt.

The first attempt runs in the caller's own task, as it would without hedging,
so a call that answers before the delay costs one timer handle and nothing
else. When a hedge wins while the first attempt is still running, the caller's
task is cancelled the way ``asyncio.timeout`` does it (``cancel()`` then
``uncancel()``), so a cancellation from outside is never mistaken for ours.
Losers are cancelled and their cancellation awaited: their breaker permits and
bulkhead slots are back when the call returns.

Hedges are bounded three ways: ``max_hedged_attempts`` per call, the policy's
retry budget (``retry.budget``: every hedge withdraws a token as a retry does),
and ``max_load_amplification``, a token bucket per policy (a
:class:`~resilient.budget.RetryBudget` with its own ratio: each call deposits
``max_load_amplification - 1`` tokens, each hedge takes one).

``delay: pNN`` reads the policy's own latency quantile from the last
:data:`WINDOW` first-attempt durations (a ring buffer: bounded memory), sorted
again whenever a fifth of the window is new. A first attempt cut short by a
winning hedge is recorded with the time it had run, a lower bound that is above
the delay in force, so the estimate is not pulled down by the very hedges it
triggers. Written by hand: the libraries that estimate streaming quantiles
(t-digest, ``ddsketch``) are not dependencies, and a sort of a bounded window
every few hundred calls is all this needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import tenacity

from resilient import _clock
from resilient import attempt as _attempt
from resilient._models import HedgeConfig, RetryBudgetConfig
from resilient._shared import SharedByName
from resilient.budget import RetryBudget
from resilient.errors import PolicyError, RejectedError
from resilient.events import HedgeStarted, bus
from resilient.retry import RetryPlan

if TYPE_CHECKING:
    from resilient._models import Policy, RetryConfig


class _Pipeline(_attempt.Stages, Protocol):
    """What a hedged group reads of a compiled pipeline (:class:`resilient.pipeline.Pipeline`)."""

    policy: Policy
    budget: RetryBudget | None
    staged: bool


__all__ = ["REFRESH", "WINDOW", "Hedger", "hedgers"]

#: Attempt durations kept for ``delay: pNN``.
WINDOW = 1000
#: The quantile is computed again when this share (1/REFRESH) of the window is new,
#: and, once the window is full, at most once per REFRESH_SECONDS: a busy service
#: would otherwise sort its window hundreds of times a second.
REFRESH = 5
REFRESH_SECONDS = 0.05
#: Durations needed before the quantile is used (``max_delay`` until then).
MIN_SAMPLES = 20
#: Hedges the ``max_load_amplification`` bucket allows in a burst, per allowed hedge.
BURST = 10.0

_TOKEN, _SLOT, _ENTRY = _attempt.TOKEN, _attempt.SLOT, _attempt.ENTRY
_WAIT = _attempt.WAIT
_admit_rest = _attempt.admit_rest
_give_back = _attempt.give_back
_log = logging.getLogger("resilient")
_NOTHING = object()
_INF = float("inf")
_task_of = _attempt.task_of
_running_loop = _attempt.running_loop
_copy_context = contextvars.copy_context

# An armed call is a plain list (cheaper than an object; made on every call):
# [deadline, done, group, hedger, pipeline, fn, args, kwargs, task, total, began, context]
# (context: the caller's contextvars at the call's start, for its hedges: the timer that
# starts them is shared by the calls of the policy and runs in the context of whichever
# call armed it; about 30 ns a call)
_DEADLINE, _DONE, _GROUP = 0, 1, 2


class _Timers:
    """
    The hedge delays of one policy on one loop, with at most one timer armed.

    Calls of one policy share one delay, so their deadlines arrive in the order
    the calls started (the idea of timeout.py's deadline queue): a FIFO and one
    timer for the oldest entry still waiting, instead of a timer handle per call.
    A call whose deadline comes before the last one queued (``delay: pNN`` moved
    down) gets a timer of its own.
    """

    __slots__ = ("__weakref__", "at", "handle", "loop", "queue", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: deque[list[Any]] = deque()
        self.handle: asyncio.TimerHandle | None = None
        #: when ``handle`` fires (infinity: no timer armed). It may be later than a
        #: new deadline even with an empty queue: its entries answered in time, and
        #: ``delay: pNN`` moved down since; such a deadline needs the timer moved.
        self.at = _INF
        # the stock loop's time() is a method around time.monotonic(): call the C
        # function directly; loops with a clock of their own (virtual time) keep theirs
        self.time: Callable[[], float] = (
            time.monotonic
            if getattr(type(loop), "time", None) is asyncio.BaseEventLoop.time
            else loop.time
        )

    def arm(self, entry: list[Any], deadline: float) -> None:
        """Wake the entry's group at *deadline* (the caller inlines the common case)."""
        entry[_DEADLINE] = deadline
        queue = self.queue
        while queue and queue[0][_DONE]:
            queue.popleft()
        if queue and deadline < queue[-1][_DEADLINE]:
            self.loop.call_at(deadline, _due, entry)
            return
        queue.append(entry)
        if deadline < self.at:
            self.wake(deadline)

    def wake(self, deadline: float) -> None:
        """Arm the one timer for *deadline*, earlier than the one armed (if any)."""
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.loop.call_at(deadline, self.fire)
        self.at = deadline

    def fire(self) -> None:
        self.handle = None
        self.at = _INF
        now = self.loop.time()
        queue = self.queue
        while queue:
            entry = queue[0]
            if entry[_DONE]:
                queue.popleft()
            elif entry[_DEADLINE] <= now:
                queue.popleft()
                _due(entry)
            else:
                self.wake(entry[_DEADLINE])
                return


#: The hedge timers in use, by (event loop, delay): every hedger whose delay in force
#: is the same shares one FIFO and one timer (deadlines of one delay arrive in the
#: order the calls started, whichever policy made them), so thousands of policies
#: with one delay keep one queue per loop, not one each. Weak values: timers that
#: no hedger holds and no armed timer needs are forgotten, with their loop.
_TIMERS: weakref.WeakValueDictionary[tuple[asyncio.AbstractEventLoop, float], _Timers] = (
    weakref.WeakValueDictionary()
)
_TIMERS_LOCK = threading.Lock()


def _timers(loop: asyncio.AbstractEventLoop, delay: float) -> _Timers:
    """The shared hedge timers of *loop* for *delay* (made on first use)."""
    key = (loop, delay)
    with _TIMERS_LOCK:
        timers = _TIMERS.get(key)
        if timers is None:
            timers = _TIMERS[key] = _Timers(loop)
    return timers


@functools.lru_cache(maxsize=256)
def _guard_config(amplification: float, max_hedged_attempts: int) -> RetryBudgetConfig:
    """The load guard's budget settings, one (frozen) instance per distinct pair."""
    return RetryBudgetConfig(
        ratio=amplification - 1.0,
        min_retries_per_second=0.0,
        max_tokens=BURST * max_hedged_attempts,
    )


def _due(entry: list[Any]) -> None:
    """A call's delay passed with no answer (or ``delay: 0``): its group starts hedging."""
    if entry[_DONE]:
        return
    group = entry[_GROUP]
    if group is None:
        group = entry[_GROUP] = _Group(entry)
    try:
        group.fire()
    except Exception:  # a library failure never breaks the call: it goes on unhedged
        _log.exception("hedging of policy %r failed; the call goes on without it", group.p.name)


class Hedger:
    """
    The hedging state of one policy name: its configuration, the latency window
    of ``delay: pNN`` and the ``max_load_amplification`` bucket. Shared by every
    function of the policy (see :func:`hedgers`).

    Attributes:
        started: Hedges started so far.
        refused: Hedges not started: the load guard or the retry budget said no,
            or the breaker, rate limiter or bulkhead refused them (a refused hedge
            gives its guard and budget tokens back).
    """

    __slots__ = (
        "_fixed",
        "_last",
        "_next",
        "_quantile",
        "_refresh_at",
        "_samples",
        "_seen",
        "config",
        "current",
        "guard",
        "judge",
        "measures",
        "name",
        "refused",
        "started",
    )

    def __init__(self, name: str, config: HedgeConfig) -> None:
        self.name = name
        self.config = config
        q = config.quantile
        self._quantile = q
        #: whether the first attempts' durations are recorded (``delay: pNN``)
        self.measures = q is not None
        self._fixed = None if q is not None else float(config.delay)
        # the delay in force: fixed, or the cap until enough latencies were seen
        self.current = self._fixed if self._fixed is not None else config.max_delay
        self._samples: list[float] = []
        self._next = MIN_SAMPLES  # the number of durations at the next estimate
        self._refresh_at = 0.0  # no estimate before this time, once the window is full
        self._seen = 0
        amp = config.max_load_amplification
        self.guard: RetryBudget | None = None
        if amp is not None:
            self.guard = RetryBudget(name, _guard_config(amp, config.max_hedged_attempts))
        self.started = 0
        self.refused = 0
        # the shared hedge timers (see _timers) of the last loop, for the delay in force
        self._last: tuple[asyncio.AbstractEventLoop | None, _Timers | None] = (None, None)
        #: (retry section, its retry predicate, whether it judges results): what
        #: makes an answer acceptable, made from the policy's retry section on first use
        self.judge: tuple[RetryConfig | None, Any, bool] = (None, None, False)

    def __repr__(self) -> str:
        return f"<Hedger {self.name!r} delay={self.current:.4g}s started={self.started}>"

    def record(self, seconds: float) -> None:
        """
        The duration of a call's first attempt (``delay: pNN`` only), or the time it
        had run when a hedge won (a lower bound above the delay in force). Hedges
        are not recorded: one that lost was cut short, and one that won was chosen
        for being fast, so either would pull the estimate down.
        """
        seen = self._seen
        if seen < WINDOW:
            self._samples.append(seconds)
        else:
            self._samples[seen % WINDOW] = seconds  # the ring: overwrite the oldest
        seen += 1
        self._seen = seen
        if seen >= self._next:
            # again after a fifth of the window has changed (one sort per WINDOW / 5
            # calls: quick to follow a change), and at most once per REFRESH_SECONDS
            # once the window is full (a sort of 1,000 durations costs about 25 us)
            self._next = seen + max(MIN_SAMPLES, min(seen, WINDOW) // REFRESH)
            if seen > WINDOW:
                now = _clock.monotonic()
                if now < self._refresh_at:
                    return
                self._refresh_at = now + REFRESH_SECONDS
            self._estimate()

    def _estimate(self) -> None:
        q = self._quantile
        assert q is not None
        ordered = sorted(self._samples)  # a copy: other threads may append meanwhile
        value = ordered[min(int(q * len(ordered)), len(ordered) - 1)]
        cfg = self.config
        current = min(max(value, cfg.min_delay), cfg.max_delay)
        if current != self.current:
            self.current = current
            self._last = (None, None)  # the timers of the new delay, at the next call

    def allow(self, budget: RetryBudget | None) -> bool:
        """Take what one hedge costs: a load-guard token and a retry-budget token."""
        guard = self.guard
        if guard is None or guard.try_withdraw():
            if budget is None or budget.try_withdraw():
                self.started += 1
                return True
            if guard is not None:
                guard.refund()  # the budget said no: the guard's token was not spent
        self.refused += 1
        return False

    def refund(self, budget: RetryBudget | None) -> None:
        """A hedge :meth:`allow` let through was refused before it ran (it waited for
        a bulkhead slot or a rate-limit token in vain): it loaded nothing, so its
        tokens go back and it counts as refused."""
        self.started -= 1
        self.refused += 1
        if self.guard is not None:
            self.guard.refund()
        if budget is not None:
            budget.refund()

    def get_status(self) -> dict[str, Any]:
        """Delay in force, hedges started and refused, durations seen."""
        return {
            "name": self.name,
            "delay": self.current,
            "started": self.started,
            "refused": self.refused,
            "samples": min(self._seen, WINDOW),
        }

    # ------------------------------------------------------------------ async

    async def run_async(
        self,
        p: _Pipeline,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ticket: list[Any],
        total: Any,
        task: asyncio.Task[Any] | None = None,
    ) -> Any:
        """
        One hedged group in place of one attempt. *ticket* is the first attempt's,
        admitted by the loop. While no hedge has started the loop settles it as
        usual; once one has, the group settles it and leaves it empty (the loop's
        own settle is then a no-op). *total* is the call's total-deadline entry,
        *task* the caller's task if the loop has read it already.
        """
        if task is None:
            task = _task_of(_running_loop())
            if task is None:  # a coroutine driven by hand: nothing can run beside it
                return await fn(*args, **kwargs)
        guard = self.guard
        if guard is not None:
            guard.deposit()
        loop = task.get_loop()
        last_loop, timers = self._last
        if last_loop is not loop or timers is None:
            timers = self._timers_for(loop)
        began = timers.time()
        entry: list[Any] = [
            0.0,
            False,
            None,
            self,
            p,
            fn,
            args,
            kwargs,
            task,
            total,
            began,
            _copy_context(),
        ]
        delay = self.current
        if delay > 0:
            # timers.arm() inlined for its common case: the queue's order holds
            deadline = entry[_DEADLINE] = began + delay
            queue = timers.queue
            while queue and queue[0][_DONE]:  # calls that answered in time
                queue.popleft()
            if not queue or queue[-1][_DEADLINE] <= deadline:
                queue.append(entry)
                if deadline < timers.at:  # no timer, or one armed for later
                    timers.wake(deadline)
            else:
                timers.arm(entry, deadline)
        else:
            _due(entry)  # all at once
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            entry[_DONE] = True
            group = entry[_GROUP]
            if group is None:  # no hedge started: a failed attempt like any other
                if self.measures:
                    self.record(timers.time() - began)
                if not self.config.on_failure or not isinstance(exc, Exception):
                    raise
                group = entry[_GROUP] = _Group(entry)  # on_failure: the next one at once
            return await group.primary_failed(ticket, exc)
        entry[_DONE] = True
        group = entry[_GROUP]
        if group is None:  # the answer came before the delay: the common case
            if self.measures:
                self.record(timers.time() - began)
            return result
        return await group.primary_returned(ticket, result)

    def _timers_for(self, loop: asyncio.AbstractEventLoop) -> _Timers:
        timers = _timers(loop, self.current)
        self._last = (loop, timers)
        return timers

    # ------------------------------------------------------------------- sync

    def run_sync(
        self,
        p: _Pipeline,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ticket: list[Any],
    ) -> Any:
        """
        The sync twin of :meth:`run_async`, in the thread-pool bulkhead: every
        attempt runs in the policy's threads and the caller waits for the first
        acceptable answer. A losing attempt cannot be interrupted (a thread never
        can): its breaker permit is given back at once, and its bulkhead slot when
        its thread ends.
        """
        guard = self.guard
        if guard is not None:
            guard.deposit()
        return _SyncGroup(self, p, fn, args, kwargs).run(ticket)


def sync_error(p: _Pipeline) -> PolicyError:
    """The error of a sync call through a policy with ``hedge:`` but no thread pool."""
    return PolicyError(
        f"policy {p.name!r} has a hedge: section, but {p.callable_name} is synchronous: "
        "hedged attempts run in parallel, which a sync function can only do in the "
        "thread-pool bulkhead. Add `bulkhead: {isolation: thread_pool}` to the policy, "
        "or make the function async."
    )


def _judge(hedger: Hedger, p: _Pipeline) -> tuple[Any, bool]:
    """The retry predicate of *p*'s retry section (``None``: no section) and whether it
    judges results; built once per section (retry.py's own), even for ``max_attempts: 1``."""
    cfg = p.policy.retry
    judge = hedger.judge
    if judge[0] is not cfg:
        predicate = RetryPlan(cfg, total=None).retry if cfg is not None else None
        judge = hedger.judge = (cfg, predicate, cfg is not None and cfg.retry_if_result is not None)
    return judge[1], judge[2]


def _acceptable_error(hedger: Hedger, p: _Pipeline, exc: BaseException) -> bool:
    """An exception that ends the group: one the retry policy would not retry.
    Without a retry section every exception is a failure of its attempt only."""
    if isinstance(exc, RejectedError) or not isinstance(exc, Exception):
        return False
    predicate, _ = _judge(hedger, p)
    if predicate is None:
        return False
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.set_exception((type(exc), exc, exc.__traceback__))
    return not predicate(state)


def _acceptable_result(hedger: Hedger, p: _Pipeline, result: Any) -> bool:
    """A result that ends the group: any, unless ``retry_if_result`` rejects it."""
    predicate, checks = _judge(hedger, p)
    if not checks:
        return True
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.set_result(result)
    return not predicate(state)


def _empty(ticket: list[Any]) -> None:
    """Leave a settled ticket with nothing to settle (the loop settles it again)."""
    if ticket:
        ticket[_TOKEN] = None
        ticket[_SLOT] = -1.0
        ticket[_ENTRY] = None


class _Group:
    """One hedged group of an async call: the first attempt inline, hedges as tasks."""

    __slots__ = (
        "args",
        "began",
        "context",
        "cut",
        "done",
        "error",
        "failures",
        "finished",
        "fn",
        "hedger",
        "kwargs",
        "loop",
        "n",
        "p",
        "primary_running",
        "result",
        "running",
        "task",
        "timer",
        "total",
        "winner",
    )

    def __init__(self, entry: list[Any]) -> None:
        (_, _, _, hedger, p, fn, args, kwargs, task, total, began, context) = entry
        self.context: contextvars.Context = context
        self.hedger: Hedger = hedger
        self.p: _Pipeline = p
        self.fn: Callable[..., Awaitable[Any]] = fn
        self.args: tuple[Any, ...] = args
        self.kwargs: dict[str, Any] = kwargs
        self.task: asyncio.Task[Any] = task
        self.total = total
        self.loop = task.get_loop()
        self.began: float = began
        self.n = 0  # hedges started
        self.running: set[asyncio.Task[Any]] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] | None = None
        self.finished = False
        self.primary_running = not entry[_DONE]
        self.cut = False  # we cancelled the caller's task: a hedge won
        self.winner: asyncio.Task[Any] | None = None
        self.error: BaseException | None = None  # the last failure (refusals last)
        self.result: Any = _NOTHING  # the last result that was not acceptable
        self.failures = 0

    async def primary_returned(self, ticket: list[Any], result: Any) -> Any:
        """The first attempt returned after hedges started."""
        p = self.p
        hedger = self.hedger
        self.primary_running = False
        if self.cut:  # a hedge won as the first attempt returned: either answer will do
            self.cut = False
            self.task.uncancel()
        if p.staged:
            p.settle_step(ticket, None)
            _empty(ticket)
        if hedger.measures:
            hedger.record(self.loop.time() - self.began)
        if self.finished or _acceptable_result(hedger, p, result):
            await self.close()
            return result
        self.result = result
        self.on_failed()
        return await self.wait_hedges()

    async def primary_failed(self, ticket: list[Any], exc: BaseException) -> Any:
        """The first attempt raised: a failure, a cancellation, or our cut (a hedge won)."""
        p = self.p
        self.primary_running = False
        if self.cut:  # a hedge won: the first attempt is a loser, given back uncounted
            self.cut = False
            self.task.uncancel()
            if p.staged:
                _give_back(p, ticket)
                _empty(ticket)
            if self.hedger.measures:
                self.hedger.record(self.loop.time() - self.began)
            if self.task.cancelling() == 0:
                return await self.answer()
            await self.close()  # cancelled from outside as well
            raise exc
        error: BaseException = exc
        if p.staged:
            settled = p.settle_step(ticket, exc, self.total)
            _empty(ticket)
            assert settled is not None
            error = settled
        if not isinstance(error, Exception):  # the caller is cancelled
            await self.close()
            if error is exc:
                raise exc
            raise error from None
        if self.hedger.measures and self.n:  # (without hedges, the caller recorded it)
            self.hedger.record(self.loop.time() - self.began)
        if self.finished or _acceptable_error(self.hedger, p, error):
            await self.close()
            if error is exc:
                raise exc
            raise error from None
        self.failed(error)
        self.on_failed()
        return await self.wait_hedges()

    # ------------------------------------------------------------ hedges

    def fire(self) -> None:
        """The delay passed with no answer: start the next hedge (``delay: 0``: all)."""
        self.timer = None
        hedger = self.hedger
        while not self.finished and self.start("delay"):
            if self.n >= hedger.config.max_hedged_attempts:
                return
            delay = hedger.current
            if delay > 0:
                self.timer = self.loop.call_later(delay, self.fire)
                return

    def start(self, reason: str) -> bool:
        """
        Start one hedge if the limits allow it: admitted now (breaker, rate limiter
        and bulkhead, whatever is free at once; a refusal starts nothing), then a
        task of its own waits for the rest and runs it.
        """
        hedger, p = self.hedger, self.p
        if self.n >= hedger.config.max_hedged_attempts:
            return False
        ticket: list[Any] = []
        if p.staged:
            try:
                ticket = p.admit_step(False, True, False)
            except RejectedError:  # CallRejected is on the bus; nothing is held
                hedger.refused += 1
                return False
        if not hedger.allow(p.budget):
            if p.staged:
                _give_back(p, ticket)
            return False
        self.n += 1
        if bus.active:
            bus.emit(
                HedgeStarted(p.name, p.callable_name, self.n, self.loop.time() - self.began, reason)
            )
        ran = [False]  # whether the task began: one cancelled before gives its ticket back
        # in (a copy of) the caller's context, as the first attempt: request ids,
        # tracing spans, credentials in contextvars stay with their own call
        hedge = self.loop.create_task(self.attempt(ticket, ran), context=self.context.copy())
        self.running.add(hedge)
        hedge.add_done_callback(functools.partial(self.hedge_done, ticket, ran))
        return True

    async def attempt(self, ticket: list[Any], ran: list[bool]) -> Any:
        """One hedge: an attempt of the engine in this task (its deadline armed here)."""
        ran[0] = True
        p = self.p
        if p.staged:
            if ticket[_WAIT]:
                try:
                    await _admit_rest(p, ticket)  # gives everything back if refused or cancelled
                except RejectedError:
                    self.hedger.refund(p.budget)
                    raise
            else:
                _attempt.arm(p, ticket)
        try:
            result = await self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            error = p.settle_step(ticket, exc, self.total) if p.staged else exc
            if error is exc:
                raise
            assert error is not None
            raise error from None
        if p.staged:
            p.settle_step(ticket, None)
        return result

    def hedge_done(self, ticket: list[Any], ran: list[bool], hedge: asyncio.Task[Any]) -> None:
        self.running.discard(hedge)
        if hedge.cancelled():
            if not ran[0] and self.p.staged:  # cancelled before it began
                _give_back(self.p, ticket)
            self.check_end()
            return
        exc = hedge.exception()  # retrieved in every case: no "never retrieved" warning
        if self.finished:
            return
        p = self.p
        if exc is None:
            result = hedge.result()
            if _acceptable_result(self.hedger, p, result):
                self.win(hedge)
                return
            self.result = result
            self.error = None
        elif _acceptable_error(self.hedger, p, exc):
            self.win(hedge)
            return
        else:
            self.failed(exc)
        if not isinstance(exc, RejectedError):
            self.on_failed()
        self.check_end()

    def failed(self, exc: BaseException) -> None:
        if not isinstance(exc, RejectedError) or self.error is None:
            self.error = exc
            self.result = _NOTHING
        self.failures += 1

    def on_failed(self) -> None:
        """``on_failure: true``: an attempt failed, the next hedge starts at once."""
        if self.hedger.config.on_failure and not self.finished:
            self.start("failure")

    def win(self, hedge: asyncio.Task[Any]) -> None:
        self.finished = True
        self.winner = hedge
        self.stop_timer()
        if self.primary_running:
            self.cut = True
            self.task.cancel()
        elif self.done is not None and not self.done.done():
            self.done.set_result(None)

    def check_end(self) -> None:
        """Every attempt has ended and no other may start: the group is over."""
        if self.primary_running or self.running or self.finished:
            return
        self.finished = True
        self.stop_timer()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def wait_hedges(self) -> Any:
        """The first attempt ended without an acceptable answer: wait for the hedges."""
        self.check_end()
        if not self.finished:
            self.done = self.loop.create_future()
            try:
                await self.done
            except BaseException:
                await self.close()
                raise
        return await self.answer()

    async def answer(self) -> Any:
        """The group's outcome once it is over."""
        await self.close()
        winner = self.winner
        if winner is not None:
            return winner.result()
        if self.result is not _NOTHING:
            return self.result
        error, self.error = self.error, None
        assert error is not None
        try:
            raise error
        finally:
            error = None  # no frame -> exception -> traceback -> frame cycle

    async def close(self) -> None:
        """Stop the timer, cancel the hedges still running and await their end."""
        self.finished = True
        self.stop_timer()
        running = self.running
        if running:
            for hedge in running:
                hedge.cancel()
            await asyncio.wait(list(running))


class _SyncGroup:
    """
    One hedged group of a sync call, every attempt in the thread-pool bulkhead.

    A hedge's admission may wait (a rate-limit token within ``max_wait``, a
    bulkhead slot within ``acquire_timeout``): it waits in a short-lived thread
    of its own, never in the caller's, which must stay free to take the first
    answer as soon as it comes. (The engine's non-blocking admission needs an
    event loop; a sync caller has none.) Its future joins the group at once, and
    resolves with the attempt's outcome, or with the refusal.
    """

    __slots__ = ("args", "began", "fn", "hedger", "kwargs", "lock", "p")

    def __init__(
        self,
        hedger: Hedger,
        p: _Pipeline,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.hedger = hedger
        self.p = p
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.began = 0.0
        #: guards each attempt's ticket and "abandoned" flag against its admitter
        self.lock = threading.Lock()

    def submit(self, future: concurrent.futures.Future[Any]) -> concurrent.futures.Future[Any]:
        bulkhead = self.p.bulkhead
        assert bulkhead is not None
        # the bulkhead's own submission: its thread gives the slot back when fn ends
        bulkhead._submit(future, self.fn, self.args, self.kwargs)
        return future

    def leave(self, attempt: list[Any]) -> bool:
        """The group stops waiting for *attempt*; whether it holds an admitted ticket."""
        with self.lock:
            attempt[3] = True
            return bool(attempt[1])

    def run(self, ticket: list[Any]) -> Any:
        hedger, p = self.hedger, self.p
        cfg = hedger.config
        per_attempt = p.per_attempt
        began = self.began = time.monotonic()
        # attempt: [future, ticket (empty until admitted), started, abandoned]
        live: list[list[Any]] = [[self.submit(concurrent.futures.Future()), ticket, began, False]]
        n = 0
        next_at = began + hedger.current
        error: BaseException | None = None
        result: Any = _NOTHING
        try:
            while True:
                now = time.monotonic()
                # start the hedges that are due (all at once for delay 0)
                while live and n < cfg.max_hedged_attempts and now >= next_at:
                    if not self.start(live, n + 1, "delay"):
                        next_at = float("inf")
                        break
                    n += 1
                    next_at = now + hedger.current
                if not live:
                    break
                wake = next_at if n < cfg.max_hedged_attempts else float("inf")
                if per_attempt is not None:
                    wake = min(wake, min(a[2] for a in live) + per_attempt)
                timeout = None if wake == float("inf") else max(wake - time.monotonic(), 0.0)
                done, _ = concurrent.futures.wait(
                    [a[0] for a in live], timeout, concurrent.futures.FIRST_COMPLETED
                )
                now = time.monotonic()
                for a in list(live):
                    future, t, started, _ = a
                    if future in done:
                        exc = future.exception()
                        outcome: BaseException | None = exc
                    elif per_attempt is not None and now - started >= per_attempt:
                        exc = outcome = p.attempt_timeout()
                    else:
                        continue
                    live.remove(a)
                    if self.leave(a) and p.staged:  # (a refused hedge holds nothing)
                        p.settle_step(t, outcome)
                        _empty(t)
                    if hedger.measures and t is ticket:
                        hedger.record(now - started)
                    if exc is None:
                        value = future.result()
                        if _acceptable_result(self.hedger, p, value):
                            return value
                        result, error = value, None
                    else:
                        if not isinstance(exc, Exception) or _acceptable_error(self.hedger, p, exc):
                            raise exc
                        refused = isinstance(exc, RejectedError)
                        if not refused or (error is None and result is _NOTHING):
                            error, result = exc, _NOTHING  # a refusal never hides a real error
                        if (
                            cfg.on_failure
                            and not refused
                            and n < cfg.max_hedged_attempts
                            and self.start(live, n + 1, "failure")
                        ):
                            n += 1
                            next_at = now + hedger.current
                if not live:
                    break
        finally:
            for a in live:  # losers: their threads finish on their own
                future, t, started, _ = a
                admitted = self.leave(a)
                future.cancel()
                if hedger.measures and t is ticket:
                    # a first attempt that lost to a hedge: the time it had run, a
                    # lower bound above the delay (as the async group records it)
                    hedger.record(time.monotonic() - started)
                if p.staged and admitted:
                    _give_back(p, t)
                    _empty(t)
        if result is not _NOTHING:
            return result
        assert error is not None
        raise error

    def start(self, live: list[list[Any]], number: int, reason: str) -> bool:
        """Start one hedge if the guards allow it; its admission runs in a thread."""
        # The guard first: a slot admitted for the pool belongs to the pool's thread
        # (it gives it back when fn ends), so an admitted hedge must run.
        if not self.hedger.allow(self.p.budget):
            return False
        attempt: list[Any] = [concurrent.futures.Future(), [], time.monotonic(), False]
        live.append(attempt)
        context = contextvars.copy_context()  # the caller's, for events and for fn
        threading.Thread(
            target=context.run,
            args=(self.admit, attempt, number, reason),
            name=f"resilient-hedge-{self.p.name}",
            daemon=True,
        ).start()
        return True

    def admit(self, attempt: list[Any], number: int, reason: str) -> None:
        """In the hedge's own thread: admit it (waiting as the policy allows), then run it."""
        p, hedger = self.p, self.hedger
        future: concurrent.futures.Future[Any] = attempt[0]
        try:
            admitted = p.admit_step(True) if p.staged else []
        except BaseException as refusal:  # CallRejected is on the bus; nothing is held
            if isinstance(refusal, RejectedError):
                hedger.refund(p.budget)
            if future.set_running_or_notify_cancel():
                future.set_exception(refusal)
            return
        with self.lock:
            abandoned = attempt[3]
            if not abandoned:
                attempt[1].extend(admitted)
        if abandoned:  # the call ended (or this hedge timed out) while it waited
            _give_back(p, admitted)
            if p.bulkhead is not None:
                p.bulkhead.release()  # the slot taken for a pool thread that will not run
            return
        if bus.active:
            after = time.monotonic() - self.began
            bus.emit(HedgeStarted(p.name, p.callable_name, number, after, reason))
        try:
            self.submit(future)
        except BaseException as exc:  # (the bulkhead gave its slot back)
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)


def _make_hedger(name: str, config: HedgeConfig, backend: Any, previous: Hedger | None) -> Hedger:
    return Hedger(name, config)


_HEDGERS: SharedByName[Hedger] = SharedByName("hedger", "hedge", _make_hedger, uses_backend=False)


def hedgers() -> dict[str, Hedger]:
    """Every hedger made so far, by policy (or ``name=``)."""
    return _HEDGERS.all()

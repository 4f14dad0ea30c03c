"""
The attempt engine: what happens to *one attempt* of a call, for every call form.

An attempt is admitted, runs, and is settled:

* **admit**: the circuit breaker gives a token (or refuses: ``CircuitOpenError``),
  the rate limiter a permit (local bucket or a lease from the fleet's), the
  bulkhead a slot; a refusal at any stage gives back what the earlier stages
  handed out and is put on the event bus as ``CallRejected``. Async admission is
  split in two so that the common case costs no coroutine: :func:`admit` takes
  everything that is free *now* and :func:`admit_rest` waits for the rest.
* **arm** (async only): the per-attempt deadline is armed on the current task.
* **settle**: the deadline is disarmed (an attempt it cancelled becomes an
  ``AttemptTimeoutError``), the bulkhead slot released, and the outcome handed
  to the breaker: success, failure (an ``Exception``), or neither (cancellation
  and other ``BaseException``: the token is given back, nothing is counted).

The decorator (sync and async), ``call``/``acall``/``acall_sync``, the block form
``attempts()`` and the manager's ``resilient_call``/``call`` all go through these
functions, so they admit, time out, count and release in exactly the same way
(``tests/test_conformance.py`` checks every form against every situation). A new
innermost stage (fault injection, passive health) goes here, once.

The state of one attempt is a plain list, a *ticket* (cheaper than an object):
``[token, measured, slot_began, deadline_entry, wait, deadline_kind]``.
"""

from __future__ import annotations

import asyncio
import linecache
import time as _time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from resilient import _clock
from resilient.errors import (
    AttemptTimeoutError,
    BulkheadFullError,
    CircuitOpenError,
    RateLimitedError,
    RejectedError,
)
from resilient.events import CallRejected, bus
from resilient.timeout import DONE as _DONE
from resilient.timeout import FIRED as _FIRED
from resilient.timeout import settle as _settle_deadline

if TYPE_CHECKING:
    from resilient.breaker import CircuitBreaker
    from resilient.bulkhead import Bulkhead
    from resilient.ratelimit import RateLimiter
    from resilient.timeout import _QueueCache


class Stages(Protocol):
    """
    What the engine reads of a compiled pipeline (:class:`resilient.pipeline.Pipeline`
    is one): the stages a policy enables, ``None`` for the others.
    """

    name: str
    callable_name: str
    breaker: CircuitBreaker | None
    limiter: RateLimiter | None
    bulkhead: Bulkhead | None
    priority: int | None
    slot_timed: bool
    pooled: bool
    per_attempt: float | None
    total: float | None
    per_attempt_queues: _QueueCache | None
    total_queues: _QueueCache | None
    attempt_timeout: Callable[[], AttemptTimeoutError]
    #: the steps :func:`compile_steps` made for this pipeline
    admit_step: Callable[..., list[Any]]
    settle_step: Callable[..., BaseException | None]
    #: ``(breaker, limiter, bulkhead, per_attempt_queues, slot_timed)``, read once per step
    stages: tuple[
        CircuitBreaker | None, RateLimiter | None, Bulkhead | None, _QueueCache | None, bool
    ]


__all__ = [
    "Stages",
    "admit",
    "admit_rest",
    "arm",
    "call_sync",
    "settle",
    "since",
    "timeout_error",
    "token",
]

# The current task, as ``task_of(running_loop())``: asyncio.current_task is C
# code from Python 3.12 (and takes the loop); on 3.11 it is a Python function
# around a lookup in this dict, whose frame costs more than the lookup.
running_loop = asyncio.get_running_loop
task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = (
    asyncio.current_task
    if isinstance(asyncio.current_task, types.BuiltinFunctionType)
    else asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]
)

# ticket fields
TOKEN = 0
MEASURED = 1
SLOT = 2
ENTRY = 3
WAIT = 4
KIND = 5

# the timer handle of an entry armed by arm_late (after timeout's five fields)
_HANDLE = 5

# what admit() left to wait for
_WAIT_NONE = 0
_WAIT_RATE = 1  # the rate limiter (then the bulkhead)
_WAIT_SLOT = 2  # the bulkhead


def refused(p: Stages, exc: RejectedError, reason: str) -> None:
    """Put a refusal on the event bus (``circuit_open``, ``rate_limited``, ``bulkhead_full``)."""
    if bus.active:
        bus.emit(CallRejected(p.name, p.callable_name, reason, exc.retry_after))


def token(p: Stages) -> int:
    """The breaker's token for one attempt, a refusal put on the event bus."""
    breaker = p.breaker
    assert breaker is not None
    try:
        return breaker.acquire()
    except CircuitOpenError as rejected:
        refused(p, rejected, "circuit_open")
        raise


def since(measured: float) -> float:
    """Seconds since *measured* (a ``_clock.monotonic()`` reading), -1.0 when not measured."""
    return (_clock.monotonic() - measured) if measured >= 0 else -1.0


def admit(p: Stages, blocking: bool = False, in_pool: bool = True, armed: bool = True) -> list[Any]:
    """
    Admit an attempt: the breaker's token, then the rate limiter's permit and the
    bulkhead's slot, then (async, *armed*) the per-attempt deadline.

    Async callers (*blocking* false) get everything that is free *now*; when
    ``ticket[WAIT]`` is set, ``await admit_rest(p, ticket)`` before running it
    (it arms the deadline once admitted). Sync callers (*blocking* true) wait in
    their thread as the policy allows, and get no deadline (sync code cannot be
    interrupted). With a thread-pool bulkhead and *in_pool*, the slot is given
    back by the pool's thread when :func:`call_sync` ends; a block (the
    ``attempts()`` form, which runs in the caller's thread) holds it in the ticket.

    Raises:
        CircuitOpenError: The breaker refused (nothing is held).
        RateLimitedError, BulkheadFullError: *blocking* only; refused after the
            policy's waits (nothing is held).
    """
    return p.admit_step(blocking, in_pool, armed)


def compile_steps(
    p: Stages,
) -> tuple[Callable[..., list[Any]], Callable[..., BaseException | None]]:
    """
    ``(admit, settle)`` for *p*, specialised to the stages it has.

    They do what :func:`admit` and :func:`settle` do, with the absent stages left
    out and the present ones bound as closure variables: no attribute read and no
    ``is None`` test per attempt. The hot loops (``pipeline.py``) and the
    decorator's single-attempt lane call these; :func:`admit` and :func:`settle`
    are the same steps for the other forms. The source is assembled here from
    the snippets below, so there is still one definition of each step.
    """
    breaker, limiter, bulkhead, queues, slot_timed = p.stages
    # The clock is bound when the steps are made, as the breaker, the bulkhead
    # and the limiter bind theirs when they are made (a virtual clock installed
    # later rebuilds the pipeline). Each step reads it at most once and hands
    # the reading to every stage that needs the time: the breaker's duration,
    # the bulkhead's slot, the deadline, the breaker's window.
    clock = _clock.monotonic
    timed_slot = bulkhead is not None and slot_timed
    measure = breaker is not None and breaker.measures
    # admit: one reading after the breaker's token, if any stage wants it
    admit_now = measure or timed_slot
    # the deadline may start at it (a loop on time.monotonic; see _QueueCache.arm)
    arm_now = admit_now and clock is _time.monotonic
    a: list[str] = ["def admit(blocking=False, in_pool=True, armed=True, task=None):"]
    if breaker is not None:
        a += [
            "    try:",
            "        token = breaker.acquire()",
            "    except CircuitOpenError as rejected:",
            "        refused(p, rejected, 'circuit_open')",
            "        raise",
        ]
        if admit_now:
            a.append("    now = clock()")
        measured = "now" if measure else "-1.0"
        a.append(f"    ticket = [token, {measured}, -1.0, None, 0, 'per_attempt']")
    else:
        if admit_now:
            a.append("    now = clock()")
        a.append("    ticket = [None, -1.0, -1.0, None, 0, 'per_attempt']")
    if limiter is not None or bulkhead is not None:
        a += ["    if blocking:", "        try:"]
        if limiter is not None:
            a += [
                "            try:",
                "                limiter.acquire_sync()",
                "            except RateLimitedError as exc:",
                "                refused(p, exc, 'rate_limited')",
                "                raise",
            ]
            if timed_slot:  # it may have waited: the slot starts now
                a.append("            now = clock()")
        if bulkhead is not None:
            a += [
                "            if not bulkhead.try_acquire():",
                "                try:",
                "                    bulkhead.acquire_sync(p.priority)",
                "                except BulkheadFullError as exc:",
                "                    refused(p, exc, 'bulkhead_full')",
                "                    raise",
            ]
            if timed_slot:  # it waited: the slot starts now
                a.append("                now = clock()")
            a += [
                "            if not (p.pooled and in_pool):",
                f"                ticket[2] = {'now' if timed_slot else '0.0'}",
            ]
        a += [
            "        except BaseException:",
            "            _give_back(p, ticket)",
            "            raise",
            "        return ticket",
        ]
        if limiter is not None:
            if queues is not None:  # the loop, for the limiter and the task (arm below);
                # from the task when the caller has it: get_running_loop() costs
                # four times task.get_loop() (about 0.2 us on a small machine)
                a.append("    loop = running_loop() if task is None else task.get_loop()")
            a += [
                f"    if not limiter.for_loop({'loop' if queues is not None else ''}).try_take():",
                "        ticket[4] = 1",
                "        return ticket",
            ]
        if bulkhead is not None:
            a += [
                "    if not bulkhead.try_acquire():",
                "        ticket[4] = 2",
                "        return ticket",
                f"    ticket[2] = {'now' if timed_slot else '0.0'}",
            ]
    elif queues is not None:
        a += ["    if blocking:", "        return ticket"]
    if queues is not None:
        a += [
            "    if armed:",
            "        if task is None:",
            f"            task = task_of({'loop' if limiter is not None else 'running_loop()'})",
            "        if task is not None:",
            f"            ticket[3] = queues.{'arm_at(task, now)' if arm_now else 'arm(task)'}",
        ]
    a.append("    return ticket")

    # settle: one reading for the bulkhead's slot, the breaker's duration and
    # (a time window) its success; a breaker that can take it gets it
    success = breaker.success_step(clock) if breaker is not None else None
    settle_now = timed_slot or measure
    s: list[str] = ["def settle(ticket, error, total=None):"]
    if queues is not None:
        s += [
            "    entry = ticket[3]",
            "    if entry is not None:",
            "        if error is None:",
            "            entry[_DONE] = True",
            "            if entry[_FIRED]:",
            "                _settle_deadline(entry, None)",
            "        elif _settle_deadline(entry, error):",
            "            error = timeout_error(p, ticket[5])",
        ]
    if settle_now:
        s.append("    now = clock()")
    if bulkhead is not None:
        release = "bulkhead.release_timed(now - slot)" if slot_timed else "bulkhead.release()"
        s += ["    slot = ticket[2]", "    if slot >= 0:", f"        {release}"]
    if breaker is not None:
        if success is None:
            succeeded = "breaker.on_success(token, duration)"
        else:  # without a reading of its own (only a success needs one)
            succeeded = f"success(token, duration, {'now' if settle_now else 'clock()'})"
        s += [
            "    token = ticket[0]",
            "    if token is not None:",
            "        measured = ticket[1]",
            f"        duration = ({'now' if settle_now else 'clock()'} - measured)"
            " if measured >= 0 else -1.0",
            "        if error is None:",
            f"            {succeeded}",
            "        elif isinstance(error, Exception):",
            "            breaker.on_failure(token, error, duration)",
            "        elif total is not None and total[_FIRED]:",
            "            breaker.on_failure(token, timeout_error(p, 'total'), duration)",
            "        else:",
            "            breaker.on_cancel(token)",
        ]
    s.append("    return error")
    source = "\n".join([*a, "", *s, ""])
    namespace: dict[str, Any] = {
        "p": p,
        "breaker": breaker,
        "limiter": limiter,
        "bulkhead": bulkhead,
        "queues": queues,
        "clock": clock,
        "success": success,
        "refused": refused,
        "CircuitOpenError": CircuitOpenError,
        "RateLimitedError": RateLimitedError,
        "BulkheadFullError": BulkheadFullError,
        "_give_back": _give_back,
        "task_of": task_of,
        "running_loop": running_loop,
        "_settle_deadline": _settle_deadline,
        "timeout_error": timeout_error,
        "_DONE": _DONE,
        "_FIRED": _FIRED,
    }
    code = _compiled.get(source)
    if code is None:  # one compilation per shape of pipeline
        name = f"<resilient attempt steps {len(_compiled) + 1}>"
        code = _compiled[source] = compile(source, name, "exec")
        # tracebacks through these frames show their source
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    exec(code, namespace)
    return namespace["admit"], namespace["settle"]


_compiled: dict[str, Any] = {}  # source -> code object


async def admit_rest(p: Stages, ticket: list[Any], armed: bool = True) -> None:
    """
    Wait for what :func:`admit` could not take at once (a rate-limit permit, a
    bulkhead slot). On refusal or cancellation everything is given back.

    Raises:
        RateLimitedError, BulkheadFullError: Refused (after ``max_wait`` /
            ``acquire_timeout``).
    """
    try:
        if ticket[WAIT] == _WAIT_RATE:
            limiter = p.limiter
            assert limiter is not None
            try:
                await limiter.wait_async(limiter.for_loop())
            except RateLimitedError as exc:
                refused(p, exc, "rate_limited")
                raise
        bulkhead = p.bulkhead
        if bulkhead is not None:
            if not bulkhead.try_acquire():
                try:
                    await bulkhead.acquire_async(p.priority)
                except BulkheadFullError as exc:
                    refused(p, exc, "bulkhead_full")
                    raise
            ticket[SLOT] = _clock.monotonic() if p.slot_timed else 0.0
        ticket[WAIT] = _WAIT_NONE
    except BaseException:
        _give_back(p, ticket)
        raise
    if armed:
        arm(p, ticket)


def call_sync(p: Stages, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a sync attempt admitted by :func:`admit`: in the caller's thread, or in
    the thread-pool bulkhead (whose thread gives the slot back when *fn* ends)."""
    if p.pooled:
        bulkhead = p.bulkhead
        assert bulkhead is not None
        return bulkhead.run_in_pool(fn, args, kwargs, p.per_attempt, p.attempt_timeout)
    return fn(*args, **kwargs)


def arm(p: Stages, ticket: list[Any]) -> None:
    """Arm the per-attempt deadline of an async attempt on the current task."""
    queues = p.per_attempt_queues
    if queues is not None:
        task = task_of(running_loop())
        if task is not None:
            ticket[ENTRY] = queues.arm(task)


def arm_single(p: Stages, ticket: list[Any]) -> None:
    """
    Arm the deadline of a call that is one attempt and nothing else (the
    manager's ``resilient_call`` block): the smaller of the per-attempt and the
    total budget.
    """
    queues, kind = p.per_attempt_queues, "per_attempt"
    total = p.total_queues
    if total is not None and (queues is None or total.duration < queues.duration):
        queues, kind = total, "total"
    if queues is not None:
        task = task_of(running_loop())
        if task is not None:
            ticket[ENTRY] = queues.arm(task)
            ticket[KIND] = kind


def arm_late(p: Stages, task: asyncio.Task[Any] | None, started: float) -> list[Any]:
    """
    Arm the total budget of a call that started at *started* (a
    ``_clock.monotonic()`` reading) and is past its first attempt
    (``Pipeline.total_late``): what is left of it, as its own timer. Not on a
    queue: a queue's entries must arrive in the order of their deadlines, and
    this one started earlier than the entries armed meanwhile. A retry or a
    wait for admission is the slow path; one timer handle there is cheap.
    """
    total = p.total
    assert total is not None
    assert task is not None
    loop = task.get_loop()
    # Seconds since the start on resilient's clock, which is real time here
    # (Pipeline.total_late is false under a virtual one). The stock loop's clock
    # is the same one; uvloop's ticks at the same rate; a loop with a virtual
    # time of its own would be owed the virtual seconds that passed meanwhile,
    # which only it knows (docs/timeouts.md).
    left = total - (_clock.monotonic() - started)
    deadline = loop.time() + (left if left > 0.0 else 0.0)
    entry: list[Any] = [task, deadline, task.cancelling(), False, False, None]

    def fire() -> None:
        if not entry[_DONE]:
            entry[_FIRED] = True
            task.cancel()

    entry[_HANDLE] = loop.call_at(deadline, fire)
    return entry


def settle_total(entry: list[Any], exc: BaseException | None) -> bool:
    """
    Settle a call's total budget (from a queue, or :func:`arm_late`'s own timer,
    which is cancelled); true when it cut the call short (see
    :func:`resilient.timeout.settle`).
    """
    if len(entry) > _HANDLE:
        entry[_HANDLE].cancel()
    return _settle_deadline(entry, exc)


def settle(
    p: Stages, ticket: list[Any], error: BaseException | None, total: Any = None
) -> BaseException | None:
    """
    Settle an attempt that ran: *error* is what it raised (``None``: it returned).
    *total* is the call's total-deadline entry, if any: an attempt it cut short
    counts as a timeout failure for the breaker (slowness must be able to trip
    it), though the call's caller settles that deadline itself.

    Returns:
        What the caller must raise: *error*, or an ``AttemptTimeoutError`` when
        the per-attempt deadline cancelled it; ``None`` on success.
    """
    return p.settle_step(ticket, error, total)


def _give_back(p: Stages, ticket: list[Any]) -> None:
    """An attempt refused (or cancelled) before it ran: the breaker counts nothing."""
    entry = ticket[ENTRY]
    if entry is not None:  # armed, but the attempt never ran
        ticket[ENTRY] = None
        entry[_DONE] = True
        if entry[_FIRED]:
            _settle_deadline(entry, None)
    slot = ticket[SLOT]
    if slot >= 0:
        bulkhead = p.bulkhead
        assert bulkhead is not None
        bulkhead.release()
        ticket[SLOT] = -1.0
    token = ticket[TOKEN]
    if token is not None:
        breaker = p.breaker
        assert breaker is not None
        breaker.on_cancel(token)
        ticket[TOKEN] = None


def give_back(p: Stages, ticket: list[Any]) -> None:
    """Release an admitted attempt that will not run (its caller was cancelled)."""
    _give_back(p, ticket)


def timeout_error(p: Stages, kind: str) -> AttemptTimeoutError:
    """The error of a deadline that fired: *kind* is ``per_attempt`` or ``total``."""
    budget = p.per_attempt if kind == "per_attempt" else p.total
    assert budget is not None
    what = "attempt" if kind == "per_attempt" else "call"
    return AttemptTimeoutError(
        f"policy {p.name!r}: {what} of {p.callable_name} took longer than {budget}s",
        policy=p.name,
        timeout=budget,
        kind=kind,
    )

"""
``@resilient``, ``call``/``acall`` and the ``attempts`` block form.

Sync versus async is decided once, at decoration. The policy is *not* resolved
at decoration (decorators run at import, usually before the policy file is
loaded): the wrapper holds a handle that compiles the pipeline at the first
call and again after every change of the runtime (a reload,
``backends.configure()``, metrics switched on); a warm call checks one integer.

Every form runs its attempts through the attempt engine
(:mod:`resilient.attempt`), so they admit, time out, count and release alike.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import CoroutineType, TracebackType
from typing import Any, ParamSpec, TypeVar

import tenacity

from resilient import _clock
from resilient import attempt as _attempt
from resilient._models import Policy
from resilient.breaker import CircuitBreaker
from resilient.bulkhead import priority_level
from resilient.errors import RejectedError
from resilient.events import bus
from resilient.pipeline import (
    LANE_BREAKER,
    LANE_DEADLINE,
    LANE_DIRECT,
    LANE_FIRST,
    LANE_SINGLE,
    Pipeline,
    _is_async_callable,
    observe,
)
from resilient.pipeline import Resume as _Resume
from resilient.pipeline import outcome_of as _outcome_of
from resilient.runtime import runtime
from resilient.timeout import DONE as _DONE
from resilient.timeout import FIRED as _FIRED
from resilient.timeout import _QueueCache
from resilient.timeout import settle as _settle_deadline

__all__ = ["Attempt", "AttemptIterator", "acall", "acall_sync", "attempts", "call", "resilient"]

P = ParamSpec("P")
T = TypeVar("T")

_admit = _attempt.admit
_admit_rest = _attempt.admit_rest
_settle = _attempt.settle
_WAIT = _attempt.WAIT
_task_of = _attempt.task_of
_running_loop = _attempt.running_loop
_token = _attempt.token
_since = _attempt.since
_perf_counter = time.perf_counter
_log = logging.getLogger("resilient")


class _Handle:
    """Compiles a pipeline lazily and rebuilds it when the runtime changes."""

    __slots__ = (
        "_lock",
        "callable_name",
        "claimant",
        "fallback",
        "key",
        "policy",
        "priority",
        "state",
        "transform",
    )

    def __init__(
        self,
        policy: str | Policy,
        *,
        key: str | None,
        callable_name: str,
        fallback: Callable[[BaseException], Any] | None,
        priority: str | None = None,
        claimant: str | None = None,
        transform: Callable[[Policy], Policy] | None = None,
    ) -> None:
        if not isinstance(policy, str | Policy):
            msg = f"policy must be a policy name or a resilient.Policy, not {policy!r}"
            raise TypeError(msg)
        self.policy = policy
        self.key = key
        self.callable_name = callable_name
        self.fallback = fallback
        self.priority = priority
        if claimant is None:
            # A Policy object is claimed by this handle alone: two functions with the
            # same qualified name (closures of one factory) are two claimants.
            named = isinstance(policy, str)
            claimant = (
                f"policy {policy!r}"
                if named
                else f"the Policy of {callable_name} (handle {id(self):#x})"
            )
        self.claimant = claimant
        self.transform = transform
        self._lock = threading.Lock()
        # (runtime generation, pipeline): read as one tuple so that another
        # thread rebuilding it can never be seen half-way.
        self.state: tuple[int, Pipeline | None] = (-1, None)

    def get(self) -> Pipeline:
        generation, pipeline = self.state
        if generation == runtime.generation and pipeline is not None:
            return pipeline
        return self.rebuild()

    def rebuild(self) -> Pipeline:
        with self._lock:
            # The generation is read *before* the policy: a reload in between
            # leaves this handle one generation behind, so it rebuilds again at
            # its next call instead of keeping the old policy.
            generation = runtime.generation
            if isinstance(self.policy, str):
                policy = runtime.registry.get(self.policy)  # may discover files; PolicyError
                name = self.key or self.policy
            else:
                policy = self.policy
                name = self.key or self.callable_name
            if self.transform is not None:
                policy = self.transform(policy)
            # Always a new pipeline: it re-reads the shared objects (which the
            # tables keep while their configuration and backend are unchanged).
            pipeline = Pipeline(
                policy,
                name=name,
                callable_name=self.callable_name,
                fallback=self.fallback,
                priority=self.priority,
                claimant=self.claimant,
            )
            self.state = (generation, pipeline)
            return pipeline


def _qualname(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


def _reject_generators(fn: Any) -> None:
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        msg = (
            f"@resilient cannot guard the generator function {_qualname(fn)}: "
            "its body runs after the call returns. Guard the function that consumes it."
        )
        raise TypeError(msg)


def _returned_coroutine(fn: Any, result: Any) -> TypeError:
    """A sync function handed back a coroutine: it was never run, and nothing was retried."""
    result.close()
    msg = (
        f"{_qualname(fn)} is guarded as a synchronous function but returned a coroutine: "
        "make it `async def` (then @resilient awaits it, with retries and timeouts), or "
        "await the coroutine inside it"
    )
    return TypeError(msg)


def resilient(
    policy: str | Policy = "default",
    *,
    fallback: Callable[[BaseException], Any] | None = None,
    name: str | None = None,
    priority: str | None = None,
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """
    Guard a sync or async function with a policy.

    Args:
        policy: A policy name (resolved at the first call, and again after
            :func:`resilient.load_policies`) or a :class:`resilient.Policy`.
        fallback: Called with the exception when the call fails for good; its
            return value is returned instead. For an async function it may be
            sync or async. Replaces the policy's ``fallback`` value.
        name: Give this function its own breaker, bulkhead, rate limiter and
            retry budget instead of sharing the ones of the policy name.
        priority: Priority of this function's waits for a bulkhead slot
            (``low``, ``normal``, ``high``, ``critical``); a
            ``resilient.priority`` block around the call wins over it. Default:
            the policy's ``bulkhead.default_priority``.

    Raises:
        TypeError: At decoration, for generator functions, or an async fallback
            on a sync function.
        PolicyError: At decoration, for an unknown *priority* name; at the first
            call, when *name* is already used by another configuration.
    """

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        _reject_generators(fn)
        if not callable(fn):
            msg = f"@resilient needs a callable, got {fn!r}"
            raise TypeError(msg)
        is_async = _is_async_callable(fn)
        if fallback is not None and not is_async and _is_async_callable(fallback):
            msg = f"{_qualname(fn)} is synchronous, so its fallback must be too"
            raise TypeError(msg)
        if priority is not None:
            priority_level(priority)  # an unknown name fails at decoration (PolicyError)
        handle = _Handle(
            policy, key=name, callable_name=_qualname(fn), fallback=fallback, priority=priority
        )
        # The wrappers inline the choice of lane (see Pipeline.lane): a
        # coroutine or call layer per call would cost more than the strategies
        # themselves. The single-attempt lane is one attempt of the engine; the
        # breaker lane is the same attempt with its one stage inlined (it halves
        # the overhead of a breaker-only policy; tests/test_conformance.py checks
        # it against the engine's forms).

        if is_async:
            afn: Callable[..., Awaitable[Any]] = fn  # type: ignore[assignment]

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                generation, pipeline = handle.state
                if generation != runtime.generation or pipeline is None:
                    pipeline = handle.rebuild()
                lane = pipeline.lane
                if lane == LANE_DIRECT:
                    try:
                        return await afn(*args, **kwargs)
                    except Exception as exc:
                        return await pipeline.run_async(afn, args, kwargs, exc)
                if lane == LANE_DEADLINE:
                    queues: _QueueCache = pipeline.per_attempt_queues  # type: ignore[assignment]
                    task = _task_of(_running_loop())
                    if task is None:  # a coroutine driven by hand: nothing to cancel
                        return await afn(*args, **kwargs)
                    entry = queues.arm(task)
                    try:
                        result = await afn(*args, **kwargs)
                    except BaseException as exc:
                        if _settle_deadline(entry, exc):
                            raise _attempt.timeout_error(pipeline, "per_attempt") from None
                        raise
                    entry[_DONE] = True
                    if entry[_FIRED]:
                        _settle_deadline(entry, None)
                    return result
                if lane == LANE_BREAKER:
                    breaker: CircuitBreaker = pipeline.breaker  # type: ignore[assignment]
                    token = _token(pipeline) if bus.active else breaker.acquire()
                    measured = _clock.monotonic() if breaker.needs_duration else -1.0
                    try:
                        result = await afn(*args, **kwargs)
                    except Exception as exc:
                        breaker.on_failure(token, exc, _since(measured))
                        raise
                    except BaseException:
                        breaker.on_cancel(token)
                        raise
                    breaker.on_success(token, _since(measured) if measured >= 0 else -1.0)
                    return result
                if lane == LANE_FIRST:
                    # the full lane's first attempt; the loop takes over after it
                    # (run_async's resume=: the retries, the fallback, the end of
                    # a failed or cancelled call, the total budget's settling),
                    # called outside any `except` so that nothing of the first
                    # attempt becomes the context of a later error
                    observer = pipeline.observer
                    began = _perf_counter() if observer is not None else 0.0
                    budget = pipeline.budget
                    if budget is not None:
                        budget.deposit()
                    hedge = pipeline.hedge
                    total = None
                    started = -1.0
                    task = _task_of(_running_loop()) if hedge is not None else None
                    if pipeline.total is not None:
                        started = _clock.monotonic()
                        if not pipeline.total_late:  # armed now (see Pipeline.total_late)
                            if task is None:
                                task = _task_of(_running_loop())
                            if task is not None:
                                total = pipeline.total_queues.arm(task)  # type: ignore[union-attr]
                    failed: BaseException | None = None
                    try:
                        ticket = pipeline.admit_step(False, True, True, task)
                    except RejectedError as refusal:
                        failed = refusal
                    except BaseException:  # not a refusal (a bug): no deadline left armed
                        if total is not None:
                            _attempt.settle_total(total, None)
                        raise
                    if failed is None and not ticket[_WAIT]:
                        try:
                            if hedge is None:
                                result = await afn(*args, **kwargs)
                            else:  # a hedged group in place of the attempt
                                result = await hedge.run_async(
                                    pipeline, afn, args, kwargs, ticket, total, task
                                )
                        except BaseException as exc:
                            failed = pipeline.settle_step(ticket, exc, total)
                            assert failed is not None
                            if failed is not exc and isinstance(failed, Exception):
                                failed.__cause__ = None  # the per-attempt deadline fired
                                failed.__suppress_context__ = True
                        else:
                            pipeline.settle_step(ticket, None)
                            if total is not None:
                                _attempt.settle_total(total, None)
                            if observer is not None:
                                try:
                                    observer.record("success", _perf_counter() - began)
                                except Exception:
                                    _log.exception("call observer %r raised; ignoring it", observer)
                            return result
                        last = failed if isinstance(failed, Exception) else None
                        resume: _Resume = (began, started, None, last, total)
                    elif failed is None:  # admitted, waiting for a slot or a permit
                        resume = (began, started, ticket, None, total)
                    else:  # refused
                        resume = (began, started, None, None, total)
                    try:
                        return await pipeline.run_async(afn, args, kwargs, failed, resume)
                    finally:
                        failed = last = None
                        del resume
                if lane != LANE_SINGLE:
                    return await pipeline.run_async(afn, args, kwargs)
                ticket = pipeline.admit_step()
                if ticket[_WAIT]:
                    await _admit_rest(pipeline, ticket)
                try:
                    result = await afn(*args, **kwargs)
                except BaseException as exc:
                    error = pipeline.settle_step(ticket, exc)
                    if error is exc:
                        raise
                    assert error is not None
                    raise error from None
                pipeline.settle_step(ticket, None)
                return result

            async_wrapper.__resilient_handle__ = handle  # type: ignore[attr-defined]
            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            generation, pipeline = handle.state
            if generation != runtime.generation or pipeline is None:
                # The first call (and the first after a reload) takes the whole
                # pipeline and checks that the function is really synchronous: a
                # coroutine handed back is a TypeError, not a success. The fast
                # lanes below then skip that check.
                return _run_sync(handle.rebuild(), fn, args, kwargs)  # type: ignore[no-any-return]
            lane = pipeline.sync_lane
            if lane == LANE_DIRECT or lane == LANE_DEADLINE:  # noqa: SIM109 - no tuple per call
                # (a per-attempt deadline cannot interrupt sync code; docs/timeouts.md)
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    return pipeline.run_sync(fn, args, kwargs, exc)  # type: ignore[no-any-return]
            if lane == LANE_BREAKER:
                breaker: CircuitBreaker = pipeline.breaker  # type: ignore[assignment]
                token = _token(pipeline) if bus.active else breaker.acquire()
                measured = _clock.monotonic() if breaker.needs_duration else -1.0
                try:
                    result = fn(*args, **kwargs)
                except Exception as exc:
                    breaker.on_failure(token, exc, _since(measured))
                    raise
                except BaseException:
                    breaker.on_cancel(token)
                    raise
                breaker.on_success(token, _since(measured) if measured >= 0 else -1.0)
            elif lane == LANE_FIRST:
                # the full lane's first attempt; the loop takes over after it
                # (outside any `except`: see the async wrapper)
                observer = pipeline.observer
                began = _perf_counter() if observer is not None else 0.0
                budget = pipeline.budget
                if budget is not None:
                    budget.deposit()
                started = _clock.monotonic() if pipeline.total is not None else -1.0
                failed: BaseException | None = None
                try:
                    ticket = pipeline.admit_step(True)
                except RejectedError as refusal:
                    failed = refusal
                last: BaseException | None = None
                if failed is None:
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:
                        pipeline.settle_step(ticket, exc)
                        failed = exc
                        last = exc if isinstance(exc, Exception) else None
                    else:
                        pipeline.settle_step(ticket, None)
                        if observer is not None:
                            try:
                                observer.record("success", _perf_counter() - began)
                            except Exception:
                                _log.exception("call observer %r raised; ignoring it", observer)
                        return result
                try:
                    return pipeline.run_sync(  # type: ignore[no-any-return]
                        fn, args, kwargs, failed, (began, started, None, last, None)
                    )
                finally:
                    failed = last = None
            elif lane != LANE_SINGLE:
                result = pipeline.run_sync(fn, args, kwargs)
            else:
                # one attempt (sync code cannot be interrupted, so a per-attempt
                # deadline does not apply here; docs/timeouts.md)
                ticket = pipeline.admit_step(True)
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    pipeline.settle_step(ticket, exc)
                    raise
                pipeline.settle_step(ticket, None)
            return result

        sync_wrapper.__resilient_handle__ = handle  # type: ignore[attr-defined]
        return sync_wrapper

    return decorate


# --------------------------------------------------------------------------- call forms

_call_handles: dict[tuple[str | Policy, str | None], _Handle] = {}
_call_lock = threading.Lock()
_MAX_CALL_HANDLES = 512


def _handle_for(policy: str | Policy, name: str | None) -> _Handle:
    # Policies are immutable values: equal Policy objects share one handle (and
    # one breaker), so code that builds a new Policy per call does not grow the
    # tables. The table is bounded anyway (cleared past 512 distinct policies).
    key = (policy, name)
    handle = _call_handles.get(key)
    if handle is not None:
        return handle
    with _call_lock:
        if isinstance(policy, str):
            label = name or policy
        else:
            label = name or f"policy-{policy.description or format(hash(policy) & 0xFFFFFFFF, 'x')}"
            if len(_call_handles) >= _MAX_CALL_HANDLES:
                _call_handles.clear()
        handle = _Handle(policy, key=name or label, callable_name=f"call:{label}", fallback=None)
        _call_handles[key] = handle
    return handle


def _run_sync(pipeline: Pipeline, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    result = pipeline.run_sync(fn, args, kwargs)
    if type(result) is CoroutineType:
        raise _returned_coroutine(fn, result)
    return result


def call(policy: str | Policy, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call the sync function *fn* through *policy*: ``call("db", query, sql)``."""
    if _is_async_callable(fn):
        msg = "resilient.call() runs sync functions; use `await resilient.acall(...)`"
        raise TypeError(msg)
    return _run_sync(_handle_for(policy, None).get(), fn, args, kwargs)  # type: ignore[no-any-return]


async def acall(
    policy: str | Policy,
    fn: Callable[P, Awaitable[T]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Await the async function *fn* through *policy*: ``await acall("broker", send, o)``."""
    if not _is_async_callable(fn):
        msg = "resilient.acall() awaits async functions; use resilient.call() for sync ones"
        raise TypeError(msg)
    pipeline = _handle_for(policy, None).get()
    return await pipeline.run_async(fn, args, kwargs)  # type: ignore[no-any-return]


async def acall_sync(
    policy: str | Policy, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """
    Await the *sync* function *fn* through *policy* without blocking the loop:
    ``await acall_sync("db", query, sql)``. The sync pipeline runs in a worker
    thread (``asyncio.to_thread``, which carries the ``resilient.priority``
    context along); with ``bulkhead.isolation: thread_pool`` the function
    itself runs in the policy's own threads and the per-attempt timeout frees
    the caller.
    """
    if _is_async_callable(fn):
        msg = "resilient.acall_sync() runs sync functions; use `await resilient.acall(...)`"
        raise TypeError(msg)
    pipeline = _handle_for(policy, None).get()
    return await asyncio.to_thread(_run_sync, pipeline, fn, args, kwargs)


# --------------------------------------------------------------------------- block form


class Attempt:
    """
    One attempt of the block form; use it as ``with attempt:``.

    The attempt was admitted (breaker, rate limiter, bulkhead and, under
    ``async for``, its per-attempt deadline) before the iterator handed it out;
    ``with attempt:`` runs the block and settles it.

    Attributes:
        number: 1 for the first attempt.
    """

    __slots__ = ("_iterator", "_ticket", "exited", "number")

    def __init__(self, iterator: AttemptIterator, number: int, ticket: list[Any]) -> None:
        self._iterator = iterator
        self.number = number
        self._ticket: list[Any] | None = ticket
        self.exited = False

    def __repr__(self) -> str:
        return f"<Attempt {self.number} of policy {self._iterator.pipeline.name!r}>"

    def __enter__(self) -> Attempt:
        ticket = self._ticket
        if ticket is None:
            msg = "an Attempt can be entered once"
            raise RuntimeError(msg)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.exited = True
        ticket, self._ticket = self._ticket, None
        assert ticket is not None
        iterator = self._iterator
        error = _settle(iterator.pipeline, ticket, exc, iterator._total_entry)
        spent = iterator.total_expired(error)
        if spent is not error:  # the total budget is over: no retry
            assert spent is not None
            iterator._finish(spent)
            raise spent from None
        retry = iterator.after(self.number, error)
        if retry or error is exc:
            return retry
        assert error is not None
        raise error from None

    def _release(self) -> None:
        """The body never entered ``with attempt:``: give the admission back."""
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            _attempt.give_back(self._iterator.pipeline, ticket)


class AttemptIterator:
    """
    Iterate over attempts, sync (``for``) or async (``async for``)::

        for attempt in resilient.attempts("broker"):
            with attempt:
                send(order)

    The block runs again while it raises a retryable exception and attempts
    remain. Every attempt passes the circuit breaker, the rate limiter and the
    bulkhead before the iterator hands it out (a refusal is raised from the
    ``for`` statement); under ``async for`` the per-attempt and total timeouts
    apply to the block as well (sync code cannot be interrupted). A fallback
    does not apply: there is no value to return.
    """

    __slots__ = (
        "_began",
        "_failed",
        "_last",
        "_total_entry",
        "_treated",
        "delay",
        "finished",
        "is_async",
        "number",
        "pipeline",
        "started",
        "state",
    )

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.number = 0
        self.finished = False
        self.delay = 0.0
        self.is_async = False
        self.started = _clock.monotonic()
        self.state: tenacity.RetryCallState | None = None
        self._last: BaseException | None = None  # the block's own last exception
        self._failed: BaseException | None = None
        self._total_entry: Any = None
        self._began = 0.0
        if pipeline.budget is not None:
            pipeline.budget.deposit()
        # chaos: the call's cohorts (resilient.chaos), faults injected as attempts begin
        self._treated = pipeline.chaos.begin() if pipeline.chaos is not None else ()

    # ------------------------------------------------------------ decisions

    def _injected(self, ticket: list[Any], outcome: BaseException | object) -> BaseException | None:
        """
        Chaos ended an admitted attempt before its block ran (an injected exception
        or timeout, or ``error_result``: a success): settle it as the block's outcome.
        Returns what to raise from the loop, or ``None`` to go on (a retry, or done).
        """
        exc = outcome if isinstance(outcome, BaseException) else None
        error = _settle(self.pipeline, ticket, exc, self._total_entry)
        spent = self.total_expired(error)
        if spent is not error:
            self._finish(spent)
            return spent
        if self.after(self.number, error):
            return None
        return error

    def after(self, number: int, error: BaseException | None) -> bool:
        """Attempt *number* ended with *error*: ``True`` to run the block again."""
        p = self.pipeline
        if error is None:
            self._finish(None)
            return False
        if not isinstance(error, Exception):
            self._finish(error)
            return False
        self._last = error
        if p.retry is not None:
            if self.state is None:
                self.state = p.retry.new_state(self.started)
            delay = p._next_delay(self.state, number, error, None)
        else:
            delay = -1.0
        if delay < 0:
            self._finish(error)
            return False
        self.delay = delay
        return True  # swallow: the loop makes another attempt

    def refused(self, refusal: BaseException) -> BaseException:
        """Admission of the next attempt was refused: what to raise from the loop."""
        p = self.pipeline
        last = self._last
        error = refusal
        if isinstance(refusal, RejectedError) and p.retry is not None and last is None:
            if self.state is None:
                self.state = p.retry.new_state(self.started)
            delay = p._next_delay(self.state, self.number, refusal, None)
            if delay >= 0:
                self.delay = delay
                return refusal  # retried (the policy retries this refusal)
        if last is not None:
            error = p._refused_after(refusal, last, self.number)
        self._finish(error)
        return error

    def total_expired(self, error: BaseException | None) -> BaseException | None:
        """Map a cancellation by the total deadline to ``AttemptTimeoutError``."""
        entry = self._total_entry
        # Only a deadline that fired is settled here: settling one that did not
        # would disarm the budget for the attempts still to come.
        if entry is not None and error is not None and entry[_FIRED]:
            self._total_entry = None
            if _settle_deadline(entry, error):
                return _attempt.timeout_error(self.pipeline, "total")
        return error

    def _finish(self, error: BaseException | None) -> None:
        self.finished = True
        entry, self._total_entry = self._total_entry, None
        if entry is not None:
            _settle_deadline(entry, error)
        observer = self.pipeline.observer
        if observer is not None:
            outcome = "success" if error is None else _outcome_of(error)
            observe(observer, outcome, self._began, error)

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Attempt]:
        self._began = time.perf_counter()
        p = self.pipeline
        while not self.finished:
            if self.delay > 0:
                _clock.sleep(self.delay)
                self.delay = 0.0
            self.number += 1
            error: BaseException | None = None
            try:
                ticket = _admit(p, True, False)
            except RejectedError as refusal:
                error = self.refused(refusal)
            if error is not None:  # raised outside `except`: the user's error is left as it is
                if self.finished:
                    raise error
                continue
            if p.chaos is not None:
                fault = p.chaos.enter_sync(self._treated, self.started)
                if fault is not None:
                    error = self._injected(ticket, fault)
                    if error is not None:
                        raise error
                    continue
            attempt = Attempt(self, self.number, ticket)
            try:
                yield attempt
            finally:
                attempt._release()
            if not attempt.exited:
                return  # the body did not enter `with attempt:`: nothing to retry

    async def __aiter__(self) -> AsyncIterator[Attempt]:
        self.is_async = True
        self._began = time.perf_counter()
        p = self.pipeline
        if p.total_queues is not None:
            task = _task_of(_running_loop())
            if task is not None:
                self._total_entry = p.total_queues.arm(task)
        while not self.finished:
            error: BaseException | None = None
            try:
                if self.delay > 0:
                    await _clock.asleep(self.delay)
                    self.delay = 0.0
                self.number += 1
                ticket = _admit(p)
                if ticket[_WAIT]:
                    await _admit_rest(p, ticket)
            except RejectedError as refusal:
                error = self.refused(refusal)
            except BaseException as exc:
                spent = self.total_expired(exc)
                self._finish(spent)
                if spent is exc:
                    raise
                assert spent is not None
                raise spent from None
            if error is not None:  # raised outside `except`: the user's error is left as it is
                if self.finished:
                    raise error
                continue
            if p.chaos is not None:
                try:
                    fault = await p.chaos.enter_async(self._treated)
                except BaseException as exc:  # a deadline (or the caller) cancelled the hang
                    fault = exc
                if fault is not None:
                    error = self._injected(ticket, fault)
                    if error is not None:
                        raise error
                    continue
            attempt = Attempt(self, self.number, ticket)
            try:
                yield attempt
            finally:
                attempt._release()
            if not attempt.exited:
                return


def attempts(policy: str | Policy, *, name: str | None = None) -> AttemptIterator:
    """The block form: ``for attempt in attempts("broker"): with attempt: ...``."""
    return AttemptIterator(_handle_for(policy, name).get())

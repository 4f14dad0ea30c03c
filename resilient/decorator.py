"""
``@resilient``, ``call``/``acall`` and the ``attempts`` block form.

Sync versus async is decided once, at decoration. The policy is *not* resolved
at decoration (decorators run at import, usually before the policy file is
loaded): the wrapper holds a handle that compiles the pipeline at the first
call and again after every reload; a warm call checks one integer.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import tenacity

from resilient import _clock
from resilient import pipeline as _pipeline
from resilient._models import Policy
from resilient.bulkhead import priority_level
from resilient.errors import CircuitOpenError
from resilient.events import bus
from resilient.pipeline import (
    LANE_DIRECT,
    LANE_SINGLE,
    Pipeline,
    _current_task,
    _is_async_callable,
    _since,
)
from resilient.policy import registry
from resilient.timeout import DONE as _DONE
from resilient.timeout import FIRED as _FIRED
from resilient.timeout import settle as _settle

__all__ = ["Attempt", "AttemptIterator", "acall", "acall_sync", "attempts", "call", "resilient"]

P = ParamSpec("P")
T = TypeVar("T")


class _Handle:
    """Compiles a pipeline lazily and rebuilds it when the registry changes."""

    __slots__ = ("_lock", "callable_name", "fallback", "key", "policy", "priority", "state")

    def __init__(
        self,
        policy: str | Policy,
        *,
        key: str | None,
        callable_name: str,
        fallback: Callable[[BaseException], Any] | None,
        priority: str | None = None,
    ) -> None:
        if not isinstance(policy, str | Policy):
            msg = f"policy must be a policy name or a resilient.Policy, not {policy!r}"
            raise TypeError(msg)
        self.policy = policy
        self.key = key
        self.callable_name = callable_name
        self.fallback = fallback
        self.priority = priority
        self._lock = threading.Lock()
        # (registry generation, pipeline): read as one tuple so that another
        # thread rebuilding it can never be seen half-way.
        self.state: tuple[int, Pipeline | None] = (-1, None)

    def get(self) -> Pipeline:
        generation, pipeline = self.state
        if generation == registry.generation and pipeline is not None:
            return pipeline
        return self.rebuild()

    def rebuild(self) -> Pipeline:
        with self._lock:
            if isinstance(self.policy, str):
                policy = registry.get(self.policy)  # may discover files; raises PolicyError
                name = self.key or self.policy
            else:
                policy = self.policy
                name = self.key or self.callable_name
            generation = registry.generation
            current = self.state[1]
            if (
                current is not None
                and current.policy is policy
                and current.name == name
                and current.factory is _pipeline._observer_factory
            ):
                pipeline = current
            else:
                pipeline = Pipeline(
                    policy,
                    name=name,
                    callable_name=self.callable_name,
                    fallback=self.fallback,
                    priority=self.priority,
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
        PolicyError: At decoration, for an unknown *priority* name.
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
        # The wrappers inline the two fast lanes chosen when the pipeline was
        # built (see Pipeline.lane): a coroutine or call layer per call would
        # cost more than the strategies themselves. Everything else goes
        # through Pipeline.run_async / run_sync.

        if is_async:
            afn: Callable[..., Awaitable[Any]] = fn  # type: ignore[assignment]

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                generation, pipeline = handle.state
                if generation != registry.generation or pipeline is None:
                    pipeline = handle.rebuild()
                lane = pipeline.lane
                if lane == LANE_DIRECT:
                    try:
                        return await afn(*args, **kwargs)
                    except Exception as exc:
                        return await pipeline.run_async(afn, args, kwargs, exc)
                if lane != LANE_SINGLE:
                    return await pipeline.run_async(afn, args, kwargs)
                # one attempt: breaker, rate limiter, bulkhead and/or per-attempt
                # deadline (the same steps as one attempt of Pipeline.run_async)
                breaker = pipeline.breaker
                token: int | None = None
                measured = -1.0
                if breaker is not None:
                    if bus.active:
                        token = pipeline._acquire_reporting(breaker)
                    else:
                        token = breaker.acquire()
                    if breaker.needs_duration:
                        measured = _clock.monotonic()
                bulkhead = pipeline.bulkhead
                limiter = pipeline.limiter
                slot_began = -1.0
                if limiter is not None or bulkhead is not None:
                    try:
                        if limiter is not None:
                            loop_limiter = limiter.for_loop()
                            if not loop_limiter.try_take():
                                await pipeline._rate_wait_async(limiter, loop_limiter)
                        if bulkhead is not None:
                            if not bulkhead.try_acquire():
                                await pipeline._bulkhead_wait_async(bulkhead)
                            slot_began = _clock.monotonic() if pipeline.slot_timed else 0.0
                    except BaseException:
                        if token is not None:
                            assert breaker is not None
                            breaker.on_cancel(token)  # refused: the call did not run
                        raise
                queues = pipeline.per_attempt_queues
                entry = None
                if queues is not None:
                    task = _current_task()
                    if task is not None:
                        entry = queues.arm(task)
                try:
                    result = await afn(*args, **kwargs)
                except BaseException as exc:
                    if slot_began >= 0:
                        pipeline._release_slot(slot_began)
                    error: BaseException = exc
                    if entry is not None and _settle(entry, exc):
                        error = pipeline._timeout("per_attempt")
                    if token is not None:
                        assert breaker is not None
                        if isinstance(error, Exception):
                            breaker.on_failure(token, error, _since(measured))
                        else:
                            breaker.on_cancel(token)
                    if error is exc:
                        raise
                    raise error from None
                if slot_began >= 0:
                    assert bulkhead is not None
                    if pipeline.slot_timed:
                        bulkhead.release_timed(_clock.monotonic() - slot_began)
                    else:
                        bulkhead.release()
                if entry is not None:
                    entry[_DONE] = True
                    if entry[_FIRED]:
                        _settle(entry, None)
                if token is not None:
                    assert breaker is not None
                    breaker.on_success(
                        token, (_clock.monotonic() - measured) if measured >= 0 else 0.0
                    )
                return result

            async_wrapper.__resilient_handle__ = handle  # type: ignore[attr-defined]
            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            generation, pipeline = handle.state
            if generation != registry.generation or pipeline is None:
                pipeline = handle.rebuild()
            lane = pipeline.lane
            if lane == LANE_DIRECT:
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    return pipeline.run_sync(fn, args, kwargs, exc)  # type: ignore[no-any-return]
            if lane != LANE_SINGLE:
                return pipeline.run_sync(fn, args, kwargs)  # type: ignore[no-any-return]
            # one attempt through breaker, rate limiter and bulkhead (sync code
            # cannot be interrupted, so a per-attempt deadline does not apply
            # here; docs/timeouts.md)
            breaker = pipeline.breaker
            token: int | None = None
            measured = -1.0
            if breaker is not None:
                token = pipeline._acquire_reporting(breaker) if bus.active else breaker.acquire()
                if breaker.needs_duration:
                    measured = _clock.monotonic()
            bulkhead = pipeline.bulkhead
            limiter = pipeline.limiter
            slot_began = -1.0
            if limiter is not None or bulkhead is not None:
                try:
                    if limiter is not None:
                        pipeline._rate_acquire_sync(limiter)
                    if bulkhead is not None:
                        if not bulkhead.try_acquire():
                            pipeline._bulkhead_wait_sync(bulkhead)
                        slot_began = _clock.monotonic() if pipeline.slot_timed else 0.0
                except BaseException:
                    if token is not None:
                        assert breaker is not None
                        breaker.on_cancel(token)  # refused: the call did not run
                    raise
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if slot_began >= 0:
                    pipeline._release_slot(slot_began)
                if token is not None:
                    assert breaker is not None
                    breaker.on_failure(token, exc, _since(measured))
                raise
            except BaseException:
                if slot_began >= 0:
                    pipeline._release_slot(slot_began)
                if token is not None:
                    assert breaker is not None
                    breaker.on_cancel(token)
                raise
            if slot_began >= 0:
                assert bulkhead is not None
                if pipeline.slot_timed:
                    bulkhead.release_timed(_clock.monotonic() - slot_began)
                else:
                    bulkhead.release()
            if token is not None:
                assert breaker is not None
                breaker.on_success(token, (_clock.monotonic() - measured) if measured >= 0 else 0.0)
            return result

        sync_wrapper.__resilient_handle__ = handle  # type: ignore[attr-defined]
        return sync_wrapper

    return decorate


# --------------------------------------------------------------------------- call forms

_call_handles: dict[tuple[str | int, str | None], tuple[str | Policy, _Handle]] = {}
_call_lock = threading.Lock()


def _handle_for(policy: str | Policy, name: str | None) -> _Handle:
    # Handles of Policy objects are keyed by identity and keep the object alive
    # (so the id is not reused); the table is bounded for code that builds a new
    # Policy per call.
    key = (policy if isinstance(policy, str) else id(policy), name)
    cached = _call_handles.get(key)
    if cached is not None and (isinstance(policy, str) or cached[0] is policy):
        return cached[1]
    with _call_lock:
        if isinstance(policy, str):
            label = name or policy
        else:
            label = name or f"policy-{policy.description or format(id(policy), 'x')}"
            if len(_call_handles) >= 512:
                _call_handles.clear()
        handle = _Handle(policy, key=name or label, callable_name=f"call:{label}", fallback=None)
        _call_handles[key] = (policy, handle)
    return handle


def call(policy: str | Policy, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call the sync function *fn* through *policy*: ``call("db", query, sql)``."""
    if _is_async_callable(fn):
        msg = "resilient.call() runs sync functions; use `await resilient.acall(...)`"
        raise TypeError(msg)
    return _handle_for(policy, None).get().run_sync(fn, args, kwargs)  # type: ignore[no-any-return]


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
    return await asyncio.to_thread(pipeline.run_sync, fn, args, kwargs)


# --------------------------------------------------------------------------- block form


class Attempt:
    """
    One attempt of the block form; use it as ``with attempt:``.

    Attributes:
        number: 1 for the first attempt.
    """

    __slots__ = ("_began", "_iterator", "_token", "exited", "number")

    def __init__(self, iterator: AttemptIterator, number: int) -> None:
        self._iterator = iterator
        self.number = number
        self._token: int | None = None
        self._began = -1.0
        self.exited = False

    def __repr__(self) -> str:
        return f"<Attempt {self.number} of policy {self._iterator.pipeline.name!r}>"

    def __enter__(self) -> Attempt:
        breaker = self._iterator.pipeline.breaker
        if breaker is not None:
            try:
                self._token = breaker.acquire()
            except CircuitOpenError as rejected:
                self._iterator.pipeline._rejected(rejected)
                self._iterator.finished = True
                raise
            if breaker.needs_duration:
                self._began = _clock.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.exited = True
        iterator = self._iterator
        pipeline = iterator.pipeline
        breaker = pipeline.breaker
        token, self._token = self._token, None
        duration = (_clock.monotonic() - self._began) if self._began >= 0 else 0.0
        if exc is None:
            if token is not None and breaker is not None:
                breaker.on_success(token, duration)
            iterator.finished = True
            return False
        if not isinstance(exc, Exception):
            if token is not None and breaker is not None:
                breaker.on_cancel(token)
            iterator.finished = True
            return False
        if token is not None and breaker is not None:
            breaker.on_failure(token, exc, duration)
        if pipeline.retry is None:
            iterator.finished = True
            return False
        if iterator.state is None:
            iterator.state = pipeline.retry.new_state(iterator.started)
        delay = pipeline._next_delay(iterator.state, self.number, exc, None)
        if delay < 0:
            iterator.finished = True
            return False
        iterator.delay = delay
        return True  # swallow: the loop makes another attempt


class AttemptIterator:
    """
    Iterate over attempts, sync (``for``) or async (``async for``)::

        for attempt in resilient.attempts("broker"):
            with attempt:
                send(order)

    The block runs again while it raises a retryable exception and attempts
    remain; the breaker sees every attempt. Timeouts are not applied to the
    block (use the decorator or ``acall`` for them), nor is a fallback.
    """

    __slots__ = ("delay", "finished", "number", "pipeline", "started", "state")

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.number = 0
        self.finished = False
        self.delay = 0.0
        self.started = _clock.monotonic()
        self.state: tenacity.RetryCallState | None = None
        if pipeline.budget is not None:
            pipeline.budget.deposit()

    def __iter__(self) -> Iterator[Attempt]:
        while not self.finished:
            if self.delay > 0:
                _clock.sleep(self.delay)
                self.delay = 0.0
            self.number += 1
            attempt = Attempt(self, self.number)
            yield attempt
            if not attempt.exited:
                return  # the body did not enter `with attempt:`: nothing to retry

    async def __aiter__(self) -> AsyncIterator[Attempt]:
        while not self.finished:
            if self.delay > 0:
                await _clock.asleep(self.delay)
                self.delay = 0.0
            self.number += 1
            attempt = Attempt(self, self.number)
            yield attempt
            if not attempt.exited:
                return


def attempts(policy: str | Policy, *, name: str | None = None) -> AttemptIterator:
    """The block form: ``for attempt in attempts("broker"): with attempt: ...``."""
    return AttemptIterator(_handle_for(policy, name).get())

"""
HTTP clients: httpx transports that send every request through a policy.

::

    client = httpx.Client(transport=ResilientTransport("api"))
    client = httpx.AsyncClient(transport=AsyncResilientTransport("api"))

Each request is one call of the policy: its attempts pass the circuit breaker,
the rate limiter and the bulkhead, and the retry section retries them. The
``http:`` section of the policy (the defaults of ``HttpConfig`` when it
has none) says which response statuses are failures, which methods are retried,
whether ``Retry-After`` is honoured, what the caller gets when the retries run
out, and whether each host has its own breaker.

Only this module imports httpx (never ``import resilient``); httpx is the
``http`` extra: ``pip install 'resilient-policies[http]'``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

try:
    import httpx
except ImportError as exc:  # pragma: no cover - tests/test_httpx.py runs it in a subprocess
    msg = (
        "resilient.httpx needs httpx, which is not installed: "
        "pip install 'resilient-policies[http]' (the `http` extra)"
    )
    raise ImportError(msg, name=exc.name) from exc

from resilient._models import HttpConfig, Policy
from resilient.decorator import _Handle
from resilient.pipeline import Pipeline
from resilient.runtime import runtime

__all__ = ["AsyncResilientTransport", "ResilientTransport", "StatusFailure"]

#: Key of the shared breaker of the hosts beyond ``http.max_keys``.
OVERFLOW_KEY = "*"
#: Response extensions kept on a buffered failure response (the others describe a
#: connection that is closed by then).
_KEPT_EXTENSIONS = ("http_version", "reason_phrase")


class StatusFailure(Exception):
    """
    A response whose status is in ``http.failure_statuses``, as the policy sees it.

    The transport raises it inside the attempt, so the circuit breaker counts the
    response as a failure and the retry section retries it; the caller never sees
    it (it gets the response, or ``httpx.HTTPStatusError`` with
    ``raise_on_exhausted: true``). Name it in a policy as
    ``resilient.httpx.StatusFailure`` (for instance in a breaker's
    ``ignore_exceptions``).

    Attributes:
        request: The request.
        response: The response, with its body read and its connection released.
    """

    def __init__(self, request: httpx.Request, response: httpx.Response) -> None:
        super().__init__(
            f"{response.status_code} {response.reason_phrase} from {request.method} {request.url}"
        )
        self.request = request
        self.response = response


def _retry_after(own: Callable[[Any], Any] | None, outcome: Any) -> Any:
    """The ``Retry-After`` of a failure response (the pipeline parses seconds and dates)."""
    if isinstance(outcome, StatusFailure):
        value = outcome.response.headers.get("retry-after")
        if value is not None:
            return value
    return own(outcome) if own is not None else None


def _for_http(policy: Policy, *, retried: bool) -> Policy:
    """
    The policy as a transport runs it: failure responses retried (with their
    ``Retry-After``) for requests that may be sent again, one attempt (and no
    hedge) for the others, and no fallback value (a transport must return a
    response).
    """
    config = policy.http or HttpConfig()
    update: dict[str, Any] = {"fallback": None}
    retry = policy.retry
    if retry is not None:
        if retried:
            changes: dict[str, Any] = {}
            if not any(issubclass(StatusFailure, kind) for kind in retry.retry_on):
                changes["retry_on"] = (*retry.retry_on, StatusFailure)
            if config.respect_retry_after:
                changes["retry_after"] = functools.partial(_retry_after, retry.retry_after)
            retry = retry.model_copy(update=changes)
        else:
            retry = retry.model_copy(update={"max_attempts": 1})
        update["retry"] = retry
    if not retried and getattr(policy, "hedge", None) is not None:
        update["hedge"] = None  # hedging resends the request, like a retry
    return policy.model_copy(update=update)


_FOR_RETRIED = functools.partial(_for_http, retried=True)
_FOR_ONCE = functools.partial(_for_http, retried=False)


class _Plan:
    """The ``http:`` section of the current policy, compiled, and the handles per key."""

    __slots__ = ("config", "failures", "handles", "lock", "max_keys", "methods", "per_host")

    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.failures = frozenset(config.failure_statuses)
        self.methods = frozenset(config.retry_methods)
        self.per_host = config.key == "host"
        self.max_keys = config.max_keys
        #: key ("" for the policy, a host, or OVERFLOW_KEY) -> (retried, once) handles
        self.handles: dict[str, tuple[_Handle, _Handle]] = {}
        self.lock = threading.Lock()


class _Core:
    """What both transports share: the policy look-up and the choice of handle."""

    __slots__ = ("_claimant", "_kind", "_label", "_lock", "_policy", "_state")

    def __init__(self, policy: str | Policy, name: str | None, kind: str) -> None:
        if not isinstance(policy, str | Policy):
            msg = f"policy must be a policy name or a resilient.Policy, not {policy!r}"
            raise TypeError(msg)
        if name is not None and (not isinstance(name, str) or not name):
            msg = f"name must be a non-empty string, not {name!r}"
            raise TypeError(msg)
        self._policy = policy
        self._kind = kind
        if isinstance(policy, str):
            self._label = name or policy
            self._claimant = f"policy {policy!r}"
        else:
            self._label = name or f"http-{format(hash(policy) & 0xFFFFFFFF, 'x')}"
            self._claimant = f"the Policy of {kind} {id(self):#x}"
        # (runtime generation, plan), read as one tuple (see decorator._Handle)
        self._state: tuple[int, _Plan | None] = (-1, None)
        self._lock = threading.Lock()

    def _plan(self) -> _Plan:
        generation, plan = self._state
        if generation == runtime.generation and plan is not None:
            return plan
        with self._lock:
            generation = runtime.generation  # read before the policy, as _Handle does
            policy = (
                runtime.registry.get(self._policy)  # PolicyError for an unknown name
                if isinstance(self._policy, str)
                else self._policy
            )
            config = policy.http or HttpConfig()
            old = self._state[1]
            # Unchanged http: settings keep the handles (each rebuilds its own
            # pipeline when the runtime changed); changed ones start afresh.
            plan = old if old is not None and old.config == config else _Plan(config)
            self._state = (generation, plan)
            return plan

    def _pipeline(self, plan: _Plan, request: httpx.Request) -> Pipeline:
        # A request is sent again only when its method allows it and its body is
        # bytes in memory: a stream (an iterator, a file upload) is consumed by
        # the first attempt.
        retried = request.method in plan.methods and isinstance(request.stream, httpx.ByteStream)
        key = request.url.netloc.decode("ascii") if plan.per_host else ""
        pair = plan.handles.get(key)
        if pair is None:
            pair = self._pair(plan, key)
        return (pair[0] if retried else pair[1]).get()

    def _pair(self, plan: _Plan, key: str) -> tuple[_Handle, _Handle]:
        with plan.lock:
            pair = plan.handles.get(key)
            if pair is not None:
                return pair
            if key and len(plan.handles) >= plan.max_keys:
                # Bounded: the hosts beyond the cap share one breaker and one set of
                # metrics, so a client that talks to many hosts cannot grow the tables.
                key = OVERFLOW_KEY
                pair = plan.handles.get(key)
                if pair is not None:
                    return pair
            name = f"{self._label}@{key}" if key else self._label
            pair = (
                _Handle(
                    self._policy,
                    key=name,
                    callable_name=self._kind,
                    fallback=None,
                    claimant=self._claimant,
                    transform=_FOR_RETRIED,
                ),
                _Handle(
                    self._policy,
                    key=name,
                    callable_name=self._kind,
                    fallback=None,
                    claimant=self._claimant,
                    transform=_FOR_ONCE,
                ),
            )
            plan.handles[key] = pair
            return pair

    def _exhausted(self, plan: _Plan, failure: StatusFailure) -> httpx.Response:
        """The last attempt ended on a failure status: its response, or an error."""
        response = failure.response
        if not plan.config.raise_on_exhausted:
            return response
        response.request = failure.request
        message = (
            f"'{response.status_code} {response.reason_phrase}' for url "
            f"'{failure.request.url}' (a failure status of policy {self._label!r})"
        )
        error = httpx.HTTPStatusError(message, request=failure.request, response=response)
        for note in getattr(failure, "__notes__", ()):
            error.add_note(note)
        raise error from None

    def keys(self) -> list[str]:
        """The keys that have a breaker of their own so far (hosts with ``key: host``)."""
        _, plan = self._state
        if plan is None:
            return []
        return [f"{self._label}@{k}" if k else self._label for k in plan.handles]


class _Sent:
    """
    The responses of one hedged call: attempts run in parallel and more than one
    may answer, but the caller gets one response; the others are closed, so that
    their connections go back to the pool.
    """

    __slots__ = ("done", "lock", "responses")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.responses: list[httpx.Response] = []

    def add(self, response: httpx.Response) -> bool:
        """Keep *response*; ``False`` when the call is over (the caller closes it)."""
        with self.lock:
            if self.done:
                return False
            self.responses.append(response)
            return True

    def finish(self, kept: httpx.Response | None) -> list[httpx.Response]:
        """The call is over: the responses to close (all but *kept*)."""
        with self.lock:
            self.done = True
            return [r for r in self.responses if r is not kept]


def _buffered(response: httpx.Response, raw: bytes) -> httpx.Response:
    """
    A failure response with its raw body in memory, so that its connection is
    released at once whether it is retried or returned (still encoded: the client
    decodes it as it would the original).
    """
    extensions = {k: response.extensions[k] for k in _KEPT_EXTENSIONS if k in response.extensions}
    return httpx.Response(
        response.status_code, headers=response.headers, content=raw, extensions=extensions
    )


class ResilientTransport(httpx.BaseTransport):
    """
    An httpx transport that sends every request through a policy:
    ``httpx.Client(transport=ResilientTransport("api"))``.

    Args:
        policy: A policy name (looked up at the first request, and again after
            :func:`resilient.load_policies`) or a :class:`resilient.Policy`.
        transport: The transport that really sends the requests. Default: a new
            ``httpx.HTTPTransport()``; :meth:`close` closes it.
        name: Give this transport its own breaker, bulkhead, rate limiter and
            retry budget instead of sharing those of the policy name.

    Raises:
        TypeError: *policy* is neither a name nor a ``Policy``.
    """

    def __init__(
        self,
        policy: str | Policy = "default",
        transport: httpx.BaseTransport | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self._core = _Core(policy, name, "resilient.httpx.ResilientTransport")
        self._transport = transport if transport is not None else httpx.HTTPTransport()

    def __repr__(self) -> str:
        return f"<ResilientTransport policy={self._core._policy!r} over {self._transport!r}>"

    @property
    def keys(self) -> list[str]:
        """Names of the breakers this transport uses so far (one per host with ``key: host``)."""
        return self._core.keys()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request* through the policy."""
        core = self._core
        plan = core._plan()
        pipeline = core._pipeline(plan, request)
        if pipeline.hedge is not None:
            return self._hedged(plan, pipeline, request)
        try:
            return pipeline.run_sync(self._attempt, (request, plan.failures), {})  # type: ignore[no-any-return]
        except StatusFailure as failure:
            if failure.request is not request:
                raise
            return core._exhausted(plan, failure)

    def _hedged(self, plan: _Plan, pipeline: Pipeline, request: httpx.Request) -> httpx.Response:
        sent = _Sent()
        try:
            response: httpx.Response = pipeline.run_sync(
                self._hedged_attempt, (request, plan.failures, sent), {}
            )
        except StatusFailure as failure:
            for other in sent.finish(None):
                other.close()
            if failure.request is not request:
                raise
            return self._core._exhausted(plan, failure)
        except BaseException:
            for other in sent.finish(None):
                other.close()
            raise
        for other in sent.finish(response):
            other.close()
        return response

    def _hedged_attempt(
        self, request: httpx.Request, failures: frozenset[int], sent: _Sent
    ) -> httpx.Response:
        response = self._attempt(request, failures)
        if not sent.add(response):
            response.close()  # a loser that answered after the call was over
        return response

    def _attempt(self, request: httpx.Request, failures: frozenset[int]) -> httpx.Response:
        response = self._transport.handle_request(request)
        if response.status_code in failures:
            if not response.is_stream_consumed:
                try:
                    raw = b"".join(response.iter_raw())
                finally:
                    response.close()
                response = _buffered(response, raw)
            raise StatusFailure(request, response)
        return response

    def close(self) -> None:
        """Close the inner transport."""
        self._transport.close()


class AsyncResilientTransport(httpx.AsyncBaseTransport):
    """
    The async twin of :class:`ResilientTransport`:
    ``httpx.AsyncClient(transport=AsyncResilientTransport("api"))``.

    Args:
        policy: A policy name or a :class:`resilient.Policy`.
        transport: Default: a new ``httpx.AsyncHTTPTransport()``; :meth:`aclose`
            closes it.
        name: Give this transport its own breaker, bulkhead, rate limiter and
            retry budget.

    Raises:
        TypeError: *policy* is neither a name nor a ``Policy``.
    """

    def __init__(
        self,
        policy: str | Policy = "default",
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self._core = _Core(policy, name, "resilient.httpx.AsyncResilientTransport")
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    def __repr__(self) -> str:
        return f"<AsyncResilientTransport policy={self._core._policy!r} over {self._transport!r}>"

    @property
    def keys(self) -> list[str]:
        """Names of the breakers this transport uses so far (one per host with ``key: host``)."""
        return self._core.keys()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send *request* through the policy."""
        core = self._core
        plan = core._plan()
        pipeline = core._pipeline(plan, request)
        if pipeline.hedge is not None:
            return await self._hedged(plan, pipeline, request)
        try:
            return await pipeline.run_async(self._attempt, (request, plan.failures), {})  # type: ignore[no-any-return]
        except StatusFailure as failure:
            if failure.request is not request:
                raise
            return core._exhausted(plan, failure)

    async def _hedged(
        self, plan: _Plan, pipeline: Pipeline, request: httpx.Request
    ) -> httpx.Response:
        sent = _Sent()
        try:
            response: httpx.Response = await pipeline.run_async(
                self._hedged_attempt, (request, plan.failures, sent), {}
            )
        except StatusFailure as failure:
            for other in sent.finish(None):
                await other.aclose()
            if failure.request is not request:
                raise
            return self._core._exhausted(plan, failure)
        except BaseException:
            for other in sent.finish(None):
                await other.aclose()
            raise
        for other in sent.finish(response):
            await other.aclose()
        return response

    async def _hedged_attempt(
        self, request: httpx.Request, failures: frozenset[int], sent: _Sent
    ) -> httpx.Response:
        response = await self._attempt(request, failures)
        if not sent.add(response):
            await response.aclose()  # a loser that answered after the call was over
        return response

    async def _attempt(self, request: httpx.Request, failures: frozenset[int]) -> httpx.Response:
        response = await self._transport.handle_async_request(request)
        if response.status_code in failures:
            if not response.is_stream_consumed:
                try:
                    raw = b"".join([chunk async for chunk in response.aiter_raw()])
                finally:
                    await response.aclose()
                response = _buffered(response, raw)
            raise StatusFailure(request, response)
        return response

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._transport.aclose()

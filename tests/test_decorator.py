"""
The decorator and the pipeline, mirrored: every test runs once for a sync and
once for an async function (the `colour` fixture).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from conftest import NO_TIMEOUTS, Sleeps, load

import resilient
from resilient import CircuitOpenError, Policy, RetryConfig
from resilient.events import RetriesExhausted, RetryScheduled
from resilient.pipeline import set_observer_factory


class Script:
    """A fake dependency: each call pops the next outcome (an exception raises, else returns)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def next(self) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class Colour:
    """Builds sync or async functions from a Script and runs them."""

    def __init__(self, is_async: bool) -> None:
        self.is_async = is_async

    def make(self, script: Script) -> Callable[..., Any]:
        if self.is_async:

            async def dependency() -> Any:
                await asyncio.sleep(0)
                return script.next()

            return dependency

        def sync_dependency() -> Any:
            return script.next()

        return sync_dependency

    def decorate(self, script: Script, policy: str | Policy = "p", **kw: Any) -> Callable[..., Any]:
        return resilient.resilient(policy, **kw)(self.make(script))

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.is_async:
            return asyncio.run(fn(*args, **kwargs))
        return fn(*args, **kwargs)


@pytest.fixture(name="colour", params=[False, True], ids=["sync", "async"])
def _colour(request: pytest.FixtureRequest) -> Colour:
    return Colour(request.param)


RETRY = {"max_attempts": 3, "base_delay": 0.0, **NO_TIMEOUTS}


class TestRetry:
    def test_success_first_time(self, colour: Colour, sleeps: Sleeps) -> None:
        """A call that succeeds is called once and nothing sleeps."""
        load(p={"retry": RETRY})
        script = Script("ok")
        assert colour.run(colour.decorate(script)) == "ok"
        assert script.calls == 1
        assert sleeps == []

    def test_retries_transient_errors(self, colour: Colour, sleeps: Sleeps) -> None:
        """ConnectionError is retried until it succeeds."""
        load(p={"retry": RETRY})
        script = Script(ConnectionError("a"), TimeoutError("b"), "ok")
        assert colour.run(colour.decorate(script)) == "ok"
        assert script.calls == 3
        assert sleeps == []  # zero delay makes no sleep call

    def test_exhausted_reraises_same_exception_with_note(self, colour: Colour) -> None:
        """When attempts run out the user's last exception comes back unchanged, with a note."""
        load(p={"retry": RETRY})
        last = ConnectionError("last")
        script = Script(ConnectionError("first"), ConnectionError("second"), last)
        with pytest.raises(ConnectionError) as info:
            colour.run(colour.decorate(script))
        assert info.value is last
        assert script.calls == 3
        assert any("gave up after 3 attempts" in note for note in info.value.__notes__)

    def test_non_transient_not_retried(self, colour: Colour) -> None:
        """The default retry_on is the transient set, not every exception."""
        load(p={"retry": RETRY})
        error = KeyError("user bug")
        script = Script(error)
        with pytest.raises(KeyError) as info:
            colour.run(colour.decorate(script))
        assert info.value is error
        assert script.calls == 1
        assert not getattr(info.value, "__notes__", [])

    def test_give_up_on_wins(self, colour: Colour) -> None:
        """give_up_on stops retries even when retry_on matches."""
        load(p={"retry": {**RETRY, "give_up_on": ["ConnectionRefusedError"]}})
        script = Script(ConnectionRefusedError("no"))
        with pytest.raises(ConnectionRefusedError):
            colour.run(colour.decorate(script))
        assert script.calls == 1

    def test_retry_on_custom(self, colour: Colour) -> None:
        """retry_on given by dotted name retries that type."""
        load(p={"retry": {**RETRY, "retry_on": ["builtins.ValueError"]}})
        script = Script(ValueError(), "ok")
        assert colour.run(colour.decorate(script)) == "ok"

    def test_result_predicate(self, colour: Colour) -> None:
        """retry_if_result retries on a returned value."""
        policy = Policy(retry=RetryConfig(**RETRY, retry_if_result=lambda r: r is None))
        script = Script(None, None, "ok")
        assert colour.run(colour.decorate(script, policy)) == "ok"
        assert script.calls == 3

    def test_result_predicate_exhausted_returns_last(self, colour: Colour) -> None:
        """When a result keeps asking for retries, the last result is returned."""
        policy = Policy(retry=RetryConfig(**RETRY, retry_if_result=lambda r: r == "bad"))
        script = Script("bad")
        assert colour.run(colour.decorate(script, policy)) == "bad"
        assert script.calls == 3

    def test_exception_predicate(self, colour: Colour) -> None:
        """retry_if_exception adds exceptions to retry by a predicate."""
        policy = Policy(retry=RetryConfig(**RETRY, retry_if_exception=lambda e: "again" in str(e)))
        script = Script(RuntimeError("again"), RuntimeError("again"), "ok")
        assert colour.run(colour.decorate(script, policy)) == "ok"

    def test_delays_follow_strategy(self, colour: Colour, sleeps: Sleeps) -> None:
        """Exponential backoff without jitter sleeps base, base*m, ... capped at max_delay."""
        load(
            p={
                "retry": {
                    "max_attempts": 5,
                    "base_delay": 1,
                    "multiplier": 3,
                    "max_delay": 5,
                    "jitter": False,
                    **NO_TIMEOUTS,
                }
            }
        )
        script = Script(ConnectionError())
        with pytest.raises(ConnectionError):
            colour.run(colour.decorate(script))
        assert sleeps == [1, 3, 5, 5]

    def test_events(self, colour: Colour) -> None:
        """Retries and exhaustion are published on the event bus."""
        load(p={"retry": RETRY})
        seen: list[Any] = []
        resilient.subscribe(seen.append)
        with pytest.raises(ConnectionError):
            colour.run(colour.decorate(Script(ConnectionError())))
        assert [type(e) for e in seen] == [RetryScheduled, RetryScheduled, RetriesExhausted]
        assert seen[-1].attempts == 3

    def test_raising_subscriber_does_not_break_call(self, colour: Colour) -> None:
        """A subscriber that raises is logged; the call carries on."""
        load(p={"retry": RETRY})

        def bad(event: Any) -> None:
            raise RuntimeError("hook bug")

        resilient.subscribe(bad)
        assert colour.run(colour.decorate(Script(ConnectionError(), "ok"))) == "ok"

    def test_total_timeout_stops_retries(self, colour: Colour, sleeps: Sleeps) -> None:
        """No retry sleep is started that would outlive the total timeout."""
        load(p={"retry": {"max_attempts": 10, "base_delay": 2, "jitter": False, "timeout": 3}})
        script = Script(ConnectionError())
        with pytest.raises(ConnectionError) as info:
            colour.run(colour.decorate(script))
        assert sum(sleeps) <= 3
        assert script.calls == 2
        assert "total_timeout" in info.value.__notes__[-1]


class TestBreaker:
    POLICY: ClassVar[dict[str, Any]] = {
        "circuit_breaker": {
            "failure_threshold": 2,
            "timeout_seconds": 30,
            "failure_rate_threshold": None,
        }
    }

    def test_opens_and_rejects(self, colour: Colour) -> None:
        """After failure_threshold failures the next call is rejected without running."""
        load(p=self.POLICY)
        script = Script(ConnectionError())
        fn = colour.decorate(script)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                colour.run(fn)
        with pytest.raises(CircuitOpenError) as info:
            colour.run(fn)
        assert script.calls == 2
        assert info.value.policy == "p"
        assert info.value.retry_after is not None
        assert 0 < info.value.retry_after <= 30

    def test_shared_per_policy_name(self, colour: Colour) -> None:
        """Two functions with the same policy share one breaker."""
        load(p=self.POLICY)
        a = colour.decorate(Script(ConnectionError()))
        b = colour.decorate(Script("ok"))
        for _ in range(2):
            with pytest.raises(ConnectionError):
                colour.run(a)
        with pytest.raises(CircuitOpenError):
            colour.run(b)
        assert resilient.get_breaker("p").state == "open"

    def test_name_gives_own_breaker(self, colour: Colour) -> None:
        """name= gives a function a breaker of its own."""
        load(p=self.POLICY)
        a = colour.decorate(Script(ConnectionError()), name="a-only")
        b = colour.decorate(Script("ok"))
        for _ in range(2):
            with pytest.raises(ConnectionError):
                colour.run(a)
        assert colour.run(b) == "ok"
        assert resilient.get_breaker("a-only").state == "open"
        assert resilient.get_breaker("p").state == "closed"

    def test_open_circuit_not_retried(self, colour: Colour) -> None:
        """CircuitOpenError is not retried by default."""
        load(p={**self.POLICY, "retry": {**RETRY, "retry_on": ["Exception"]}})
        resilient.get_breaker("p").open()
        script = Script("ok")
        with pytest.raises(CircuitOpenError):
            colour.run(colour.decorate(script))
        assert script.calls == 0

    def test_open_circuit_retried_when_asked(self, colour: Colour, sleeps: Sleeps) -> None:
        """Naming CircuitOpenError in retry_on retries rejections."""
        load(p={**self.POLICY, "retry": {**RETRY, "retry_on": ["CircuitOpenError"]}})
        breaker = resilient.get_breaker("p")
        breaker.open()
        with pytest.raises(CircuitOpenError) as info:
            colour.run(colour.decorate(Script("ok")))
        assert "gave up after 3 attempts" in info.value.__notes__[-1]

    def test_user_exception_passes_through(self, colour: Colour) -> None:
        """The breaker never wraps the user's exception."""
        load(p=self.POLICY)
        error = ValueError("mine")
        with pytest.raises(ValueError) as info:
            colour.run(colour.decorate(Script(error)))
        assert info.value is error


class TestFallback:
    def test_callable_fallback(self, colour: Colour) -> None:
        """fallback= receives the exception and its value is returned."""
        load(p={"retry": RETRY})
        seen: list[BaseException] = []

        def fallback(exc: BaseException) -> str:
            seen.append(exc)
            return "cached"

        fn = colour.decorate(Script(ConnectionError("down")), fallback=fallback)
        assert colour.run(fn) == "cached"
        assert isinstance(seen[0], ConnectionError)

    def test_static_fallback_from_policy(self, colour: Colour) -> None:
        """A policy's fallback value is returned, for the exceptions it names."""
        load(p={"fallback": {"value": [], "on": ["ConnectionError"]}})
        assert colour.run(colour.decorate(Script(ConnectionError()))) == []
        with pytest.raises(KeyError):
            colour.run(colour.decorate(Script(KeyError())))

    def test_fallback_on_open_circuit(self, colour: Colour) -> None:
        """The fallback also answers when the breaker rejects."""
        load(p={**TestBreaker.POLICY, "fallback": "cached"})
        resilient.get_breaker("p").open()
        assert colour.run(colour.decorate(Script("live"))) == "cached"

    def test_async_fallback(self) -> None:
        """An async function may have an async fallback."""
        load(p={})

        async def fallback(exc: BaseException) -> str:
            return "async-cached"

        @resilient.resilient("p", fallback=fallback)
        async def broken() -> str:
            raise ConnectionError

        assert asyncio.run(broken()) == "async-cached"

    def test_async_fallback_on_sync_function_refused(self) -> None:
        """A sync function cannot have an async fallback: TypeError at decoration."""

        async def fallback(exc: BaseException) -> None:
            return None

        with pytest.raises(TypeError, match="synchronous"):
            resilient.resilient("p", fallback=fallback)(lambda: None)


class TestDecoration:
    def test_keeps_metadata(self, colour: Colour) -> None:
        """Name, docstring and signature are kept; async stays a coroutine function."""

        def sync(a: int, *, b: str = "x") -> str:
            """Doc."""
            return b * a

        async def asynchronous(a: int, *, b: str = "x") -> str:
            """Doc."""
            return b * a

        fn = asynchronous if colour.is_async else sync
        wrapped = resilient.resilient("p")(fn)
        assert wrapped.__name__ == fn.__name__
        assert wrapped.__doc__ == "Doc."
        assert inspect.signature(wrapped) == inspect.signature(fn)
        assert inspect.iscoroutinefunction(wrapped) is colour.is_async
        load(p={})
        assert colour.run(wrapped, 2, b="y") == "yy"

    @pytest.mark.parametrize("kind", ["gen", "agen"])
    def test_generators_refused(self, kind: str) -> None:
        """Generator functions get a TypeError at decoration."""

        def gen() -> Any:
            yield 1

        async def agen() -> Any:
            yield 1

        with pytest.raises(TypeError, match="generator"):
            resilient.resilient("p")(gen if kind == "gen" else agen)

    def test_async_callable_objects_and_partials(self) -> None:
        """Objects with an async __call__ and partials of coroutine functions are async."""

        class Client:
            async def __call__(self, x: int) -> int:
                return x + 1

        async def add(x: int, y: int) -> int:
            return x + y

        load(p={})
        wrapped_obj = resilient.resilient("p")(Client())
        wrapped_partial = resilient.resilient("p")(functools.partial(add, 1))
        assert inspect.iscoroutinefunction(wrapped_obj)
        assert asyncio.run(wrapped_obj(1)) == 2
        assert asyncio.run(wrapped_partial(2)) == 3

    def test_decorate_before_load_and_reload(self, colour: Colour) -> None:
        """The policy is resolved at the first call and again after a reload."""
        script = Script(ConnectionError(), "ok")
        fn = colour.decorate(script)  # nothing loaded yet
        load(p={"retry": {**RETRY, "max_attempts": 1}})
        with pytest.raises(ConnectionError):
            colour.run(fn)
        load(p={"retry": RETRY})
        script.outcomes = [ConnectionError(), "ok"]
        assert colour.run(fn) == "ok"

    def test_unknown_policy_at_call(self, colour: Colour) -> None:
        """An unknown policy name fails the call with a PolicyError listing known policies."""
        load(known={})
        fn = colour.decorate(Script("ok"), "unknown")
        with pytest.raises(resilient.PolicyError, match="known"):
            colour.run(fn)

    def test_policy_object(self, colour: Colour) -> None:
        """A Policy object can be given directly."""
        policy = Policy(retry=RetryConfig(**RETRY))
        assert colour.run(colour.decorate(Script(ConnectionError(), "ok"), policy)) == "ok"


class TestCallForms:
    def test_call(self, sleeps: Sleeps) -> None:
        """resilient.call runs a sync function through a policy."""
        load(p={"retry": RETRY})
        script = Script(ConnectionError(), "ok")
        assert resilient.call("p", lambda x: (script.next(), x)[0] + x, "!") == "ok!"

    def test_acall(self) -> None:
        """resilient.acall awaits an async function through a policy."""
        load(p={"retry": RETRY})
        script = Script(ConnectionError(), "ok")

        async def dep(suffix: str) -> str:
            return str(script.next()) + suffix

        assert asyncio.run(resilient.acall("p", dep, "!")) == "ok!"

    def test_call_refuses_async(self) -> None:
        """call() with a coroutine function is a TypeError pointing at acall()."""

        async def dep() -> None:
            return None

        with pytest.raises(TypeError, match="acall"):
            resilient.call("p", dep)

    def test_attempts_sync(self, sleeps: Sleeps) -> None:
        """The block form retries the block and stops after success."""
        load(p={"retry": RETRY})
        script = Script(ConnectionError(), ConnectionError(), "ok")
        numbers = []
        for attempt in resilient.attempts("p"):
            with attempt:
                numbers.append(attempt.number)
                script.next()
        assert numbers == [1, 2, 3]

    def test_attempts_gives_up(self) -> None:
        """The block form re-raises the last exception when attempts run out."""
        load(p={"retry": RETRY})
        with pytest.raises(ConnectionError):
            for attempt in resilient.attempts("p"):
                with attempt:
                    raise ConnectionError

    def test_attempts_async(self) -> None:
        """The block form works with async for."""
        load(p={"retry": RETRY})
        script = Script(ConnectionError(), "ok")

        async def main() -> list[int]:
            numbers = []
            async for attempt in resilient.attempts("p"):
                with attempt:
                    numbers.append(attempt.number)
                    await asyncio.sleep(0)
                    script.next()
            return numbers

        assert asyncio.run(main()) == [1, 2]

    def test_attempts_feed_breaker(self) -> None:
        """Each attempt of the block form is seen by the breaker."""
        load(p={**TestBreaker.POLICY, "retry": RETRY})
        with pytest.raises(ConnectionError) as caught:
            for attempt in resilient.attempts("p"):
                with attempt:
                    raise ConnectionError
        # two failures opened it: no third attempt (it would only be refused);
        # the block's own error comes back, with a note saying why it stopped
        assert resilient.get_breaker("p").state == "open"
        assert "gave up after 2 attempts (circuit_open)" in caught.value.__notes__[0]


class TestObserver:
    @pytest.fixture(autouse=True)
    def _no_factory(self) -> Any:
        yield
        set_observer_factory(None)

    def test_outcomes(self, colour: Colour) -> None:
        """An installed observer sees every call's outcome and duration."""
        seen: list[tuple[str, str, float]] = []

        class Recorder:
            def __init__(self, name: str) -> None:
                self.name = name

            def record(self, outcome: str, duration: float) -> None:
                seen.append((self.name, outcome, duration))

        set_observer_factory(lambda pipeline: Recorder(pipeline.name))
        load(p={**TestBreaker.POLICY}, f={"fallback": 0})
        colour.run(colour.decorate(Script("ok")))
        with pytest.raises(ConnectionError):
            colour.run(colour.decorate(Script(ConnectionError())))
        colour.run(colour.decorate(Script(ConnectionError()), "f"))
        resilient.get_breaker("p").open()
        with pytest.raises(CircuitOpenError):
            colour.run(colour.decorate(Script("ok")))
        assert [(n, o) for n, o, _ in seen] == [
            ("p", "success"),
            ("p", "failure"),
            ("f", "fallback"),
            ("p", "rejected"),
        ]
        assert all(d >= 0 for _, _, d in seen)

    def test_raising_observer_never_breaks_call(self, colour: Colour) -> None:
        """An observer that raises is logged and the call's result is kept."""

        class Broken:
            def record(self, outcome: str, duration: float) -> None:
                raise RuntimeError("metrics bug")

        set_observer_factory(lambda pipeline: Broken())
        load(p={})
        assert colour.run(colour.decorate(Script("ok"))) == "ok"

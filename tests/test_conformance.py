"""
The conformance matrix: every call form x every situation an attempt can meet.

Each form runs one call of the same policy in the same situation; they must give
the same outcome, put the same events on the bus, call the function the same
number of times and leave the same state behind (breaker counts, trial permits,
bulkhead slots). Sync forms cannot interrupt code, so the timeout situations
are checked on the async forms only. A new stage of the attempt engine (fault
injection, hedging) adds its situations here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import resilient
from resilient.bulkhead import get_bulkhead
from resilient.events import CallRejected, Event, subscribe
from resilient.manager import ResilienceManager
from resilient.pipeline import LANE_BREAKER, LANE_DEADLINE, LANE_FIRST, LANE_SINGLE
from resilient.runtime import runtime

# --------------------------------------------------------------------------- forms

Work = Callable[[], Any]  # the guarded body: returns "ok" or raises


async def _decorator_async(work: Work) -> Any:
    @resilient.resilient("p")
    async def guarded() -> Any:
        return await work()

    return await guarded()


async def _acall(work: Work) -> Any:
    async def guarded() -> Any:
        return await work()

    return await resilient.acall("p", guarded)


async def _attempts_async(work: Work) -> Any:
    async for attempt in resilient.attempts("p"):
        with attempt:
            return await work()
    raise AssertionError("no attempt")


async def _manager_block(work: Work) -> Any:
    manager = _MANAGER[0]
    async with manager.resilient_call("p", "op"):
        return await work()


async def _manager_call_async(work: Work) -> Any:
    async def guarded() -> Any:
        return await work()

    return await _MANAGER[0].call("p", guarded)


def _decorator_sync(work: Work) -> Any:
    @resilient.resilient("p")
    def guarded() -> Any:
        return work()

    return guarded()


def _call(work: Work) -> Any:
    return resilient.call("p", work)


def _attempts_sync(work: Work) -> Any:
    for attempt in resilient.attempts("p"):
        with attempt:
            return work()
    raise AssertionError("no attempt")


async def _acall_sync(work: Work) -> Any:
    return await resilient.acall_sync("p", work)


async def _manager_call_sync(work: Work) -> Any:
    return await _MANAGER[0].call("p", work)


_MANAGER: list[ResilienceManager] = []

ASYNC_FORMS: dict[str, Callable[[Work], Awaitable[Any]]] = {
    "decorator": _decorator_async,
    "acall": _acall,
    "attempts": _attempts_async,
    "manager.resilient_call": _manager_block,
    "manager.call": _manager_call_async,
}
SYNC_FORMS: dict[str, Callable[[Work], Any]] = {
    "decorator": _decorator_sync,
    "call": _call,
    "attempts": _attempts_sync,
}
# sync functions awaited from async code (they run the sync pipeline in a thread)
THREAD_FORMS: dict[str, Callable[[Work], Awaitable[Any]]] = {
    "acall_sync": _acall_sync,
    "manager.call(sync)": _manager_call_sync,
}


# --------------------------------------------------------------------------- harness


@dataclass
class Seen:
    outcome: str = ""
    calls: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


def _event_key(event: Event) -> tuple[str, str]:
    detail = getattr(event, "reason", "") or getattr(event, "new_state", "")
    return type(event).__name__, str(detail)


def _outcome(result: Any, error: BaseException | None) -> str:
    if error is None:
        return f"returned {result!r}"
    kind = getattr(error, "kind", None)
    return type(error).__name__ + (f"({kind})" if kind else "")


def _state() -> dict[str, Any]:
    state: dict[str, Any] = {}
    breaker = resilient.breakers().get("p")
    if breaker is not None:
        status = breaker.get_status()
        state["breaker"] = (
            status["state"],
            status["totals"]["successes"],
            status["totals"]["failures"],
            status["trial_permits_issued"],
        )
    bulkheads = resilient.bulkhead_manager.bulkheads()
    if "p" in bulkheads:
        state["bulkhead_in_use"] = bulkheads["p"].get_status()["in_use"]
    return state


# No retries and no default time budgets: the decorator then takes its fast lanes
# (breaker lane, single-attempt lane), which are checked here against the engine.
POLICY: dict[str, Any] = {
    "retry": {"max_attempts": 1, "timeout": None, "per_attempt_timeout": None},
    "circuit_breaker": {"failure_threshold": 5, "timeout_seconds": 30},
}


def _load(**sections: Any) -> None:
    """A fresh start for one form: the policy, and no breaker, bulkhead or limiter yet."""
    runtime.clear_shared()
    resilient.load_policies({"version": 1, "policies": {"p": {**POLICY, **sections}}})


async def _start_manager() -> None:
    # metrics off: a call observer would send every form down the full lane
    manager = ResilienceManager(
        resilient.ResilienceConfig(
            metrics_enabled=False, prometheus_enabled=False, logging_enabled=False
        )
    )
    await manager.initialize()
    await manager.register_service("p", policy="p")
    _MANAGER[:] = [manager]


class Situation:
    """Sets the scene before the call; what the guarded body does."""

    name = ""
    sections: dict[str, Any] = {}  # noqa: RUF012 - read-only per subclass
    retries = False  # the policy retries (the single-attempt block form differs)

    def prepare(self) -> None:
        """Called after the policy is loaded and the objects exist."""

    def body_sync(self, seen: Seen) -> Any:
        seen.calls += 1
        return "ok"

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        return "ok"

    def cleanup(self) -> None:
        """Give back what prepare() took, before the state is read."""


class Closed(Situation):
    name = "closed"


class Failing(Situation):
    name = "failing"

    def body_sync(self, seen: Seen) -> Any:
        seen.calls += 1
        raise ConnectionError("down")

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        raise ConnectionError("down")


class Open(Situation):
    name = "open breaker"

    def prepare(self) -> None:
        resilient.get_breaker("p").open()


class HalfOpenBusy(Situation):
    name = "half-open, trial permits taken"
    sections = {  # noqa: RUF012
        "circuit_breaker": {
            "failure_threshold": 5,
            "timeout_seconds": 0.05,
            "half_open_max_calls": 1,
            "success_threshold": 1,
        }
    }

    def prepare(self) -> None:
        breaker = resilient.get_breaker("p")
        breaker.open()
        time.sleep(0.06)
        self.token = breaker.acquire()  # the one trial permit

    def cleanup(self) -> None:
        resilient.get_breaker("p").on_cancel(self.token)


class RateEmpty(Situation):
    name = "empty local rate limiter"
    sections = {"rate_limit": {"max_rate": 1, "time_period": 60, "max_wait": 0}}  # noqa: RUF012


class BulkheadFull(Situation):
    name = "full bulkhead"
    sections = {  # noqa: RUF012
        "bulkhead": {
            "max_concurrent_requests": 1,
            "max_queue": 0,
            "enable_auto_scaling": False,
        }
    }

    def prepare(self) -> None:
        assert get_bulkhead("p").try_acquire()

    def cleanup(self) -> None:
        get_bulkhead("p").release()


class PerAttemptTimeout(Situation):
    name = "per-attempt timeout"
    sections = {"timeout": {"per_attempt": 0.02}}  # noqa: RUF012

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        await asyncio.sleep(5)
        return "late"


class DeadlineOnly(PerAttemptTimeout):
    name = "per-attempt timeout, no breaker"
    sections = {"circuit_breaker": None, "timeout": {"per_attempt": 0.02}}  # noqa: RUF012


class TotalTimeout(Situation):
    name = "total timeout"
    sections = {"timeout": {"per_attempt": 1.0, "total": 0.02}}  # noqa: RUF012

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        await asyncio.sleep(5)
        return "late"


RETRIES = {"max_attempts": 3, "base_delay": 0, "timeout": None, "per_attempt_timeout": None}
SLOTS = {"max_concurrent_requests": 2, "enable_auto_scaling": False}


class RetriedThenOk(Situation):
    """Retries: the decorator runs the first attempt itself (LANE_FIRST), the loop the rest."""

    name = "fails once, retried"
    sections = {"retry": RETRIES, "bulkhead": SLOTS}  # noqa: RUF012
    retries = True  # one attempt only in the manager's resilient_call block

    def body_sync(self, seen: Seen) -> Any:
        seen.calls += 1
        if seen.calls == 1:
            raise ConnectionError("blip")
        return "ok"

    async def body_async(self, seen: Seen) -> Any:
        return self.body_sync(seen)


class RetriesExhausted(Situation):
    name = "retries exhausted"
    sections = {"retry": {**RETRIES, "max_attempts": 2}, "bulkhead": SLOTS}  # noqa: RUF012
    retries = True

    def body_sync(self, seen: Seen) -> Any:
        seen.calls += 1
        raise ConnectionError("down")

    async def body_async(self, seen: Seen) -> Any:
        return self.body_sync(seen)


class TimedOutThenOk(Situation):
    name = "first attempt times out, retried"
    sections = {  # noqa: RUF012
        "retry": RETRIES,
        "bulkhead": SLOTS,
        "timeout": {"per_attempt": 0.02, "total": 2.0},
    }
    retries = True

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        if seen.calls == 1:
            await asyncio.sleep(5)
        return "ok"


RETRYING = [RetriedThenOk(), RetriesExhausted()]
SYNC_SITUATIONS = [Closed(), Failing(), Open(), HalfOpenBusy(), RateEmpty(), BulkheadFull()]
SYNC_SITUATIONS += RETRYING
ASYNC_SITUATIONS = [*SYNC_SITUATIONS, PerAttemptTimeout(), DeadlineOnly(), TotalTimeout()]
ASYNC_SITUATIONS += [TimedOutThenOk()]


async def _run_async_form(
    form: Callable[[Work], Awaitable[Any]], situation: Situation, *, body_sync: bool
) -> Seen:
    seen = Seen()
    _load(**situation.sections)
    await _start_manager()
    try:
        if isinstance(situation, RateEmpty):  # the first call takes the one permit
            await form(_body(situation, Seen(), body_sync))
        else:
            _touch_objects()
        situation.prepare()
        events: list[Event] = []
        unsubscribe = subscribe(events.append)
        result, error = None, None
        try:
            result = await form(_body(situation, seen, body_sync))
        except Exception as exc:
            error = exc
        unsubscribe()
        situation.cleanup()
        seen.outcome = _outcome(result, error)
        seen.events = [_event_key(e) for e in events]
        seen.state = _state()
    finally:
        await _MANAGER[0].close()
    return seen


def _body(situation: Situation, seen: Seen, sync: bool) -> Work:
    if sync:
        return lambda: situation.body_sync(seen)
    return lambda: situation.body_async(seen)


def _touch_objects() -> None:
    """Make the shared objects exist before prepare() reaches for them."""
    policy = resilient.get_policy("p")
    if policy.circuit_breaker is not None:
        resilient.get_breaker("p")
    if policy.bulkhead is not None:
        get_bulkhead("p")


def _run_sync_form(form: Callable[[Work], Any], situation: Situation) -> Seen:
    seen = Seen()
    _load(**situation.sections)
    if isinstance(situation, RateEmpty):
        form(_body(situation, Seen(), True))
    else:
        _touch_objects()
    situation.prepare()
    events: list[Event] = []
    unsubscribe = subscribe(events.append)
    result, error = None, None
    try:
        result = form(_body(situation, seen, True))
    except Exception as exc:
        error = exc
    unsubscribe()
    situation.cleanup()
    seen.outcome = _outcome(result, error)
    seen.events = [_event_key(e) for e in events]
    seen.state = _state()
    return seen


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("situation", ASYNC_SITUATIONS, ids=lambda s: s.name)
async def test_async_forms_agree(situation: Situation) -> None:
    results = {}
    for name, form in ASYNC_FORMS.items():
        if situation.retries and name == "manager.resilient_call":
            continue  # one attempt by design (docs/manager.md)
        results[name] = await _run_async_form(form, situation, body_sync=False)
    reference = results["decorator"]
    for name, seen in results.items():
        assert seen == reference, f"{name} differs from the decorator in {situation.name!r}"


@pytest.mark.parametrize("situation", SYNC_SITUATIONS, ids=lambda s: s.name)
async def test_sync_forms_agree(situation: Situation) -> None:
    results = {name: _run_sync_form(form, situation) for name, form in SYNC_FORMS.items()}
    for name, form in THREAD_FORMS.items():
        results[name] = await _run_async_form(form, situation, body_sync=True)
    reference = results["decorator"]
    for name, seen in results.items():
        assert seen == reference, f"{name} differs from the decorator in {situation.name!r}"


EXPECTED = {
    "closed": ("returned 'ok'", 1, []),
    "failing": ("ConnectionError", 1, []),
    "open breaker": ("CircuitOpenError", 0, [("CallRejected", "circuit_open")]),
    "half-open, trial permits taken": ("CircuitOpenError", 0, [("CallRejected", "circuit_open")]),
    "empty local rate limiter": ("RateLimitedError", 0, [("CallRejected", "rate_limited")]),
    "full bulkhead": ("BulkheadFullError", 0, [("CallRejected", "bulkhead_full")]),
    "per-attempt timeout": ("AttemptTimeoutError(per_attempt)", 1, []),
    "per-attempt timeout, no breaker": ("AttemptTimeoutError(per_attempt)", 1, []),
    "total timeout": ("AttemptTimeoutError(total)", 1, []),
    "fails once, retried": ("returned 'ok'", 2, [("RetryScheduled", "")]),
    "retries exhausted": (
        "ConnectionError",
        2,
        [("RetryScheduled", ""), ("RetriesExhausted", "attempts")],
    ),
    "first attempt times out, retried": ("returned 'ok'", 2, [("RetryScheduled", "")]),
}


@pytest.mark.parametrize("situation", ASYNC_SITUATIONS, ids=lambda s: s.name)
async def test_the_reference_is_right(situation: Situation) -> None:
    """The decorator's answer is the documented one (so agreeing with it means something)."""
    expected_lane = {
        "closed": LANE_BREAKER,
        "failing": LANE_BREAKER,
        "open breaker": LANE_BREAKER,
        "half-open, trial permits taken": LANE_BREAKER,
        "per-attempt timeout, no breaker": LANE_DEADLINE,
        "total timeout": LANE_FIRST,
        **{s.name: LANE_FIRST for s in ASYNC_SITUATIONS if s.retries},
    }.get(situation.name, LANE_SINGLE)
    _load(**situation.sections)
    assert resilient.resilient("p")(lambda: 1).__resilient_handle__.get().lane == expected_lane
    seen = await _run_async_form(_decorator_async, situation, body_sync=False)
    outcome, calls, events = EXPECTED[situation.name]
    assert (seen.outcome, seen.calls, seen.events) == (outcome, calls, events)
    if "bulkhead_in_use" in seen.state:
        assert seen.state["bulkhead_in_use"] == 0
    if situation.name in ("failing", "per-attempt timeout", "total timeout"):
        assert seen.state["breaker"][1:3] == (0, 1)  # one failure counted
    if situation.name in ("open breaker", "full bulkhead"):
        assert seen.state["breaker"][1:3] == (0, 0)  # refused calls count nothing
    if situation.name == "empty local rate limiter":
        assert seen.state["breaker"][1:3] == (1, 0)  # the first call only


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("form_name", list(ASYNC_FORMS))
async def test_cancelled_while_waiting_for_a_slot_releases_everything(form_name: str) -> None:
    form = ASYNC_FORMS[form_name]
    _load(bulkhead={"max_concurrent_requests": 1, "acquire_timeout": 5, "max_queue": 10})
    await _start_manager()
    try:
        _touch_objects()
        bulkhead = get_bulkhead("p")
        assert bulkhead.try_acquire()
        seen = Seen()
        events: list[Event] = []
        unsubscribe = subscribe(events.append)
        task = asyncio.ensure_future(form(_body(Closed(), seen, False)))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        unsubscribe()
        bulkhead.release()
        assert seen.calls == 0
        assert bulkhead.get_status()["in_use"] == 0
        assert bulkhead.get_status()["queued"] == 0
        status = resilient.get_breaker("p").get_status()
        assert _state()["breaker"][1:3] == (0, 0), status
        assert [e for e in events if isinstance(e, CallRejected)] == []
        # the trial-permit/pending accounting is clean: the breaker still admits
        assert await form(_body(Closed(), seen, False)) == "ok"
    finally:
        await _MANAGER[0].close()


# --------------------------------------------------------------------------- fleet lease


@pytest.mark.parametrize("form_name", [*ASYNC_FORMS, *SYNC_FORMS])
async def test_an_empty_fleet_rate_limit_refuses_every_form(server: Any, form_name: str) -> None:
    """With the fleet's bucket empty, every form refuses (the manager once admitted 5 of 5)."""
    from resilient import backends

    backend = backends.configure(
        redis_url=server.url, key_prefix=f"conf-{form_name}-{time.time_ns()}"
    )
    try:
        # until Redis first answers, a process decides alone (starting is not an outage)
        assert backend.wait_ready()  # type: ignore[attr-defined]
        _load(rate_limit={"max_rate": 2, "time_period": 60, "max_wait": 0})
        await _start_manager()
        drained = Seen()
        for _ in range(4):  # the fleet's two tokens for this minute go to the decorator
            with contextlib.suppress(resilient.RateLimitedError):
                await _decorator_async(_body(Closed(), drained, False))
        assert drained.calls == 2
        admitted = 0
        for _ in range(5):
            seen = Seen()
            try:
                if form_name in ASYNC_FORMS:
                    await ASYNC_FORMS[form_name](_body(Closed(), seen, False))
                else:
                    await asyncio.to_thread(SYNC_FORMS[form_name], _body(Closed(), seen, True))
            except resilient.RateLimitedError:
                pass
            admitted += seen.calls
        assert admitted == 0
        await _MANAGER[0].close()
    finally:
        backends.reset()


# --------------------------------------------------------------------------- hedging

# The call forms that can hedge: those that hold the function (a block cannot be
# run twice at once, so `attempts()` and the manager's block run one attempt).
HEDGE_FORMS = {name: ASYNC_FORMS[name] for name in ("decorator", "acall", "manager.call")}
_SLOTS = {"max_concurrent_requests": 5, "max_queue": 0, "enable_auto_scaling": False}


class HedgeWins(Situation):
    name = "hedge overtakes a slow first attempt"
    sections = {"hedge": {"delay": 0.02}, "bulkhead": _SLOTS}  # noqa: RUF012

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        if seen.calls == 1:
            await asyncio.sleep(5)
            return "late"
        return "ok"


class AnswerBeforeDelay(Situation):
    name = "answer before the hedge delay"
    sections = {"hedge": {"delay": 5}, "bulkhead": _SLOTS}  # noqa: RUF012


class EveryAttemptFails(Situation):
    name = "every hedged attempt fails"
    sections = {"hedge": {"delay": 0.02}, "bulkhead": _SLOTS}  # noqa: RUF012

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        if seen.calls == 1:
            await asyncio.sleep(0.08)
        raise ConnectionError("down")


class FailureStartsHedge(Situation):
    name = "on_failure starts the hedge"
    sections = {"hedge": {"delay": 5, "on_failure": True}, "bulkhead": _SLOTS}  # noqa: RUF012

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        if seen.calls == 1:
            raise ConnectionError("down")
        return "ok"


class HedgeFindsBulkheadFull(Situation):
    name = "hedge refused by a full bulkhead"
    sections = {  # noqa: RUF012
        "hedge": {"delay": 0.02},
        "bulkhead": {**_SLOTS, "max_concurrent_requests": 1},
    }

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        await asyncio.sleep(0.08)
        return "ok"


class HedgedOpen(Open):
    name = "hedged, open breaker"
    sections = {"hedge": {"delay": 0.02}}  # noqa: RUF012


class HedgedTimeouts(Situation):
    name = "hedged, every attempt times out"
    sections = {"hedge": {"delay": 0.02}, "timeout": {"per_attempt": 0.06}}  # noqa: RUF012

    async def body_async(self, seen: Seen) -> Any:
        seen.calls += 1
        await asyncio.sleep(5)
        return "late"


HEDGE_SITUATIONS = [
    HedgeWins(),
    AnswerBeforeDelay(),
    EveryAttemptFails(),
    FailureStartsHedge(),
    HedgeFindsBulkheadFull(),
    HedgedOpen(),
    HedgedTimeouts(),
]
HEDGE_EXPECTED = {
    # outcome, calls, events, breaker (successes, failures)
    "hedge overtakes a slow first attempt": (
        "returned 'ok'",
        2,
        [("HedgeStarted", "delay")],
        (1, 0),
    ),
    "answer before the hedge delay": ("returned 'ok'", 1, [], (1, 0)),
    "every hedged attempt fails": ("ConnectionError", 2, [("HedgeStarted", "delay")], (0, 2)),
    "on_failure starts the hedge": ("returned 'ok'", 2, [("HedgeStarted", "failure")], (1, 1)),
    "hedge refused by a full bulkhead": (  # started, then refused as any attempt would be
        "returned 'ok'",
        1,
        [("HedgeStarted", "delay"), ("CallRejected", "bulkhead_full")],
        (1, 0),
    ),
    "hedged, open breaker": ("CircuitOpenError", 0, [("CallRejected", "circuit_open")], (0, 0)),
    "hedged, every attempt times out": (
        "AttemptTimeoutError(per_attempt)",
        2,
        [("HedgeStarted", "delay")],
        (0, 2),
    ),
}


@pytest.mark.parametrize("situation", HEDGE_SITUATIONS, ids=lambda s: s.name)
async def test_hedging_forms_agree_and_leave_nothing_behind(situation: Situation) -> None:
    results = {}
    for name, form in HEDGE_FORMS.items():
        results[name] = await _run_async_form(form, situation, body_sync=False)
    reference = results["decorator"]
    for name, seen in results.items():
        assert seen == reference, f"{name} differs from the decorator in {situation.name!r}"
    outcome, calls, events, counted = HEDGE_EXPECTED[situation.name]
    assert (reference.outcome, reference.calls, reference.events) == (outcome, calls, events)
    assert reference.state["breaker"][1:3] == counted  # a cancelled loser counts nothing
    assert reference.state.get("bulkhead_in_use", 0) == 0  # every slot is back


# --------------------------------------------------------------------------- chaos injection

# Faults injected by resilient.chaos are innermost: every form must see them as it
# would see the real fault (same outcome, events, calls of the body, breaker counts).


class _Chaos(Situation):
    fault: Any = "exception"
    blocks = True  # whether the block forms take part (error_result skips a block)

    def prepare(self) -> None:
        from resilient import chaos

        chaos.enable()
        chaos.inject("p", self.fault)

    def cleanup(self) -> None:
        from resilient.chaos import _inject

        _inject._reset_for_tests()


class ChaosException(_Chaos):
    name = "chaos: exception"


class ChaosErrorResult(_Chaos):
    name = "chaos: error_result"
    blocks = False

    @property
    def fault(self) -> Any:  # type: ignore[override]
        from resilient import chaos

        return chaos.Fault("error_result", value="injected")


class ChaosDelay(_Chaos):
    name = "chaos: network_delay"

    @property
    def fault(self) -> Any:  # type: ignore[override]
        from resilient import chaos

        return chaos.Fault("network_delay", delay=0.01)


class ChaosTimeout(_Chaos):
    name = "chaos: timeout"
    sections = {"timeout": {"per_attempt": 0.02}}  # noqa: RUF012
    fault = "timeout"


class ChaosStopped(_Chaos):
    name = "chaos: emergency stop"

    def prepare(self) -> None:
        super().prepare()
        from resilient import chaos

        chaos.emergency_stop("conformance")


CHAOS_SITUATIONS = [
    ChaosException(),
    ChaosErrorResult(),
    ChaosDelay(),
    ChaosTimeout(),
    ChaosStopped(),
]
CHAOS_EXPECTED = {
    "chaos: exception": ("ChaosError", 0, [("ChaosInjected", "")], (0, 1)),
    "chaos: error_result": ("returned 'injected'", 0, [("ChaosInjected", "")], (1, 0)),
    "chaos: network_delay": ("returned 'ok'", 1, [("ChaosInjected", "")], (1, 0)),
    "chaos: timeout": ("AttemptTimeoutError(per_attempt)", 0, [("ChaosInjected", "")], (0, 1)),
    "chaos: emergency stop": ("returned 'ok'", 1, [], (1, 0)),
}
_BLOCK_FORMS = ("attempts", "manager.resilient_call")


@pytest.fixture(name="chaos_reset")
def _chaos_reset() -> Any:
    from resilient.chaos import _inject

    _inject._reset_for_tests()
    yield
    _inject._reset_for_tests()


@pytest.mark.usefixtures("chaos_reset")
@pytest.mark.parametrize("situation", CHAOS_SITUATIONS, ids=lambda s: s.name)
async def test_async_forms_agree_under_chaos(situation: _Chaos) -> None:
    results = {}
    for name, form in ASYNC_FORMS.items():
        if situation.blocks or name not in _BLOCK_FORMS:
            results[name] = await _run_async_form(form, situation, body_sync=False)
    reference = results["decorator"]
    for name, seen in results.items():
        assert seen == reference, f"{name} differs from the decorator in {situation.name!r}"
    outcome, calls, events, counted = CHAOS_EXPECTED[situation.name]
    assert (reference.outcome, reference.calls, reference.events) == (outcome, calls, events)
    assert reference.state["breaker"][1:3] == counted


@pytest.mark.usefixtures("chaos_reset")
@pytest.mark.parametrize("situation", CHAOS_SITUATIONS, ids=lambda s: s.name)
async def test_sync_forms_agree_under_chaos(situation: _Chaos) -> None:
    """Sync code cannot be interrupted: an injected timeout sleeps out the per-attempt
    budget and ends as AttemptTimeoutError, as in the thread-pool bulkhead."""
    results = {
        name: _run_sync_form(form, situation)
        for name, form in SYNC_FORMS.items()
        if situation.blocks or name not in _BLOCK_FORMS
    }
    for name, form in THREAD_FORMS.items():
        results[name] = await _run_async_form(form, situation, body_sync=True)
    reference = results["decorator"]
    for name, seen in results.items():
        assert seen == reference, f"{name} differs from the decorator in {situation.name!r}"
    outcome, calls, events, counted = CHAOS_EXPECTED[situation.name]
    assert (reference.outcome, reference.calls, reference.events) == (outcome, calls, events)
    assert reference.state["breaker"][1:3] == counted

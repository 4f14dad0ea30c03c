"""
``resilient demo``: a flaky service, three policies, real time, in memory.

A simulated service follows a script (healthy -> degrading -> outage ->
recovery, scaled to the duration) and is called about 40 times a second
through three policies defined in code:

- ``broker``: async, retry with short backoff + circuit breaker + per-attempt
  timeout: the breaker opens in the outage and keeps calls off the service;
- ``database``: a *sync* function (run in worker threads) with retry, a breaker
  and a fallback to cached rows: callers keep getting an answer;
- ``api``: async, retry with jittered backoff and nothing else: it keeps hammering
  the failing service, which the ``attempts`` column of the summary shows.

Everything printed comes from the caller's outcomes and from the event bus
(:mod:`resilient.events`): retries scheduled, calls rejected, breaker transitions.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from resilient.decorator import resilient
from resilient.errors import CircuitOpenError
from resilient.events import BreakerStateChanged, RetryScheduled, subscribe
from resilient.pipeline import get_breaker
from resilient.policy import load_policies

__all__ = ["PHASES", "DemoResult", "FlakyService", "Phase", "demo_policies", "run"]

#: Seconds a "hanging" request takes before the service gives up on it itself;
#: the policies' per-attempt timeouts cut it short.
HANG_SECONDS = 1.0
#: A sync (database) request never takes longer than this: worker threads cannot be
#: interrupted, and the demo must end on time.
SYNC_MAX_LATENCY = 0.15
#: After the last call is started, how long in-flight calls get to finish.
DRAIN_SECONDS = 0.6

CACHED_ROWS: tuple[dict[str, Any], ...] = ({"id": 1, "status": "cached"},)


@dataclass(frozen=True)
class Phase:
    """One part of the service's script."""

    name: str
    start: float
    """When it begins, as a fraction of the demo's duration."""
    failure: tuple[float, float]
    """Failure probability at the beginning and at the end of the phase (linear in between)."""
    latency: tuple[float, float]
    """Range of a successful request's latency, in seconds."""
    hang: float
    """Share of the failures that hang (time out) instead of failing fast."""
    note: str


PHASES: tuple[Phase, ...] = (
    Phase("healthy", 0.00, (0.02, 0.02), (0.005, 0.030), 0.0, "2% errors, 5-30 ms"),
    Phase(
        "degrading",
        0.25,
        (0.10, 0.50),
        (0.030, 0.200),
        0.25,
        "errors rise 10% -> 50%, 30-200 ms, some requests hang",
    ),
    Phase("outage", 0.45, (1.0, 1.0), (0.002, 0.010), 0.3, "every request fails, 30% hang"),
    Phase("recovery", 0.75, (0.03, 0.03), (0.005, 0.040), 0.0, "3% errors, 5-40 ms"),
)


class FlakyService:
    """The simulated service: its behaviour follows :data:`PHASES` over *duration* seconds."""

    def __init__(self, duration: float, rng: random.Random, *, start: float | None = None) -> None:
        self.duration = duration
        self.start = time.monotonic() if start is None else start
        self._rng = rng
        self._lock = threading.Lock()  # the database is called from worker threads
        self.hits: dict[str, int] = {}
        """Requests that reached the service, by caller."""

    def phase_at(self, elapsed: float) -> tuple[Phase, float]:
        """The phase at *elapsed* seconds, and how far into it (0-1)."""
        fraction = min(max(elapsed / self.duration, 0.0), 1.0)
        index = 0
        for i, phase in enumerate(PHASES):
            if fraction >= phase.start:
                index = i
        phase = PHASES[index]
        end = PHASES[index + 1].start if index + 1 < len(PHASES) else 1.0
        return phase, (fraction - phase.start) / (end - phase.start)

    def _decide(self, caller: str, *, can_hang: bool) -> tuple[float, BaseException | None]:
        with self._lock:
            self.hits[caller] = self.hits.get(caller, 0) + 1
            phase, progress = self.phase_at(time.monotonic() - self.start)
            low, high = phase.failure
            p_fail = low + (high - low) * progress
            latency = self._rng.uniform(*phase.latency)
            if self._rng.random() >= p_fail:
                return latency, None
            if can_hang and self._rng.random() < phase.hang:
                return HANG_SECONDS, TimeoutError("the service did not answer")
            return latency / 4, ConnectionError("connection reset by the service")

    async def request(self, caller: str) -> str:
        """An async request."""
        delay, error = self._decide(caller, can_hang=True)
        await asyncio.sleep(delay)
        if error is not None:
            raise error
        return "ok"

    def request_sync(self, caller: str) -> str:
        """A blocking request (never hangs longer than :data:`SYNC_MAX_LATENCY`)."""
        delay, error = self._decide(caller, can_hang=False)
        time.sleep(min(delay, SYNC_MAX_LATENCY))
        if error is not None:
            raise error
        return "ok"


def demo_policies(duration: float) -> dict[str, Any]:
    """The demo's policy document; breaker open times scale with *duration*."""
    open_seconds = round(max(0.25, duration * 2 / 15), 2)
    window = max(1, round(duration / 5))
    breaker = {
        "success_threshold": 2,
        "timeout_seconds": open_seconds,
        "failure_rate_window": window,
        "min_requests_threshold": 10,
    }
    return {
        "version": 1,
        "policies": {
            "broker": {
                "description": "async: retry, breaker, per-attempt timeout",
                "retry": {
                    "max_attempts": 3,
                    "base_delay": 0.05,
                    "max_delay": 0.2,
                    "jitter": "equal",
                    "retry_on": ["ConnectionError", "TimeoutError"],
                },
                "circuit_breaker": {"failure_threshold": 3, **breaker},
                "timeout": {"per_attempt": 0.25, "total": 1.0},
            },
            "database": {
                "description": "sync: retry, breaker; the caller passes a fallback",
                "retry": {"max_attempts": 2, "base_delay": 0.05, "max_delay": 0.1},
                "circuit_breaker": {"failure_threshold": 5, **breaker},
                "timeout": {"per_attempt": None, "total": 1.0},
            },
            "api": {
                "description": "async: retry with jitter only",
                "retry": {
                    "max_attempts": 4,
                    "base_delay": 0.05,
                    "max_delay": 0.4,
                    "jitter": "full",
                },
                "timeout": {"per_attempt": 0.5, "total": 1.5},
            },
        },
    }


# --------------------------------------------------------------------------- bookkeeping

_OUTCOMES = ("ok", "failed", "fallback", "rejected", "retries")
_LABELS = {"ok": "ok", "failed": "fail", "fallback": "fb", "rejected": "rej", "retries": "retry"}


@dataclass
class PolicyStats:
    """What happened to the calls of one policy."""

    columns: tuple[str, ...]
    """The per-second columns that apply to this policy."""
    calls: int = 0
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_OUTCOMES, 0))
    second: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_OUTCOMES, 0))
    transitions: list[tuple[float, str, str]] = field(default_factory=list)
    final_state: str | None = None
    attempts: int = 0

    def count(self, key: str) -> None:
        self.total[key] += 1
        self.second[key] += 1


@dataclass
class DemoResult:
    """What :func:`run` observed (returned by :meth:`_Demo.execute` for tests and tools)."""

    duration: float
    seed: int
    elapsed: float
    stats: dict[str, PolicyStats]
    interrupted: bool = False


@dataclass(frozen=True)
class _Client:
    name: str
    rate: float
    call: Callable[[], Awaitable[object]]


class _Demo:
    def __init__(self, duration: float, seed: int, quiet: bool, out: TextIO) -> None:
        self.duration = duration
        self.seed = seed
        self.quiet = quiet
        self.out = out
        self.rng = random.Random(seed)
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.stats: dict[str, PolicyStats] = {
            "broker": PolicyStats(("ok", "failed", "rejected", "retries")),
            "database": PolicyStats(("ok", "fallback", "rejected", "retries")),
            "api": PolicyStats(("ok", "failed", "retries")),
        }
        self.service = FlakyService(duration, random.Random(self.rng.random()), start=self.start)
        self.inflight: set[asyncio.Task[None]] = set()
        self.open_seconds = 0.0

    # ------------------------------------------------------------ output

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def emit(self, text: str, *, at: float | None = None) -> None:
        """Print one line (thread-safe); with *at*, prefixed by the elapsed time."""
        if self.quiet:
            return
        line = f"[{at:4.1f}s] {text}" if at is not None else text
        print(line, file=self.out, flush=True)

    def on_event(self, event: object) -> None:
        """Event-bus subscriber; may run in a worker thread (the database calls)."""
        stats = self.stats.get(getattr(event, "policy", ""))
        if stats is None:
            return
        with self.lock:
            if isinstance(event, RetryScheduled):
                stats.count("retries")
            elif isinstance(event, BreakerStateChanged):
                at = self.elapsed()
                stats.transitions.append((at, event.old_state, event.new_state))
                why = {
                    "open": f"calls are rejected for {self.open_seconds:g} s",
                    "half-open": "letting trial calls through",
                    "closed": "trial calls succeeded",
                }.get(event.new_state, "")
                if event.old_state == "half-open" and event.new_state == "open":
                    why = f"a trial call failed; rejecting for {self.open_seconds:g} s"
                text = f"{event.policy} breaker {event.old_state} -> {event.new_state}"
                self.emit(f"{text:<36} ({why})" if why else text, at=at)

    def record(self, policy: str, outcome: str | None) -> None:
        with self.lock:
            stats = self.stats[policy]
            stats.calls += 1
            if outcome is not None:
                stats.count(outcome)

    # ------------------------------------------------------------ table

    def header(self) -> list[str]:
        titles = [" " * 18]
        labels = [f"{'service':>16}  "]
        for name, stats in self.stats.items():
            width = 6 * len(stats.columns)
            titles.append(f"| {name:<{width}}")
            labels.append("|" + "".join(f"{_LABELS[c]:>6}" for c in stats.columns) + " ")
        return ["".join(titles).rstrip(), "".join(labels).rstrip()]

    def second_line(self, at: float, phase: str) -> str:
        with self.lock:
            parts = [f"[{at:4.1f}s] {phase:<10}"]
            for stats in self.stats.values():
                parts.append("|" + "".join(f"{stats.second[c]:>6}" for c in stats.columns) + " ")
                stats.second = dict.fromkeys(_OUTCOMES, 0)
        return "".join(parts).rstrip()

    # ------------------------------------------------------------ the run

    def clients(self) -> list[_Client]:
        service = self.service

        @resilient(policy="broker")
        async def place_order() -> str:
            return await service.request("broker")

        @resilient(policy="database", fallback=lambda _exc: CACHED_ROWS)
        def query_orders() -> object:
            return service.request_sync("database")

        async def query_in_thread() -> object:
            return await asyncio.to_thread(query_orders)

        @resilient(policy="api")
        async def fetch_prices() -> str:
            return await service.request("api")

        return [
            _Client("broker", 20.0, place_order),
            _Client("database", 10.0, query_in_thread),
            _Client("api", 10.0, fetch_prices),
        ]

    async def one_call(self, client: _Client) -> None:
        try:
            result = await client.call()
        except CircuitOpenError:
            outcome = "rejected"  # refused before any attempt ran
        except Exception:
            outcome = "failed"
        else:
            outcome = "fallback" if result is CACHED_ROWS else "ok"
        self.record(client.name, outcome)

    async def drive(self, client: _Client, stop_at: float) -> None:
        """Start calls at a steady rate (not one after the other: slow calls pile up)."""
        interval = 1.0 / client.rate
        next_at = self.start + self.rng.uniform(0, interval)
        while True:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if now >= stop_at:
                return
            task = asyncio.create_task(self.one_call(client))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
            next_at = max(next_at + interval, now)

    async def tick(self) -> None:
        """One table line per second, and a line when the service changes phase."""
        second = 1
        phase_index = 0
        while True:
            next_phase = (
                self.start + PHASES[phase_index + 1].start * self.duration
                if phase_index + 1 < len(PHASES)
                else float("inf")
            )
            next_second = self.start + second
            target = min(next_phase, next_second)
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if target == next_phase:
                phase_index += 1
                phase = PHASES[phase_index]
                self.emit(f"service: {phase.name} ({phase.note})", at=target - self.start)
                continue
            if second > self.duration:
                return
            phase, _ = self.service.phase_at(second - 1e-9)
            self.emit(self.second_line(float(second), phase.name))
            second += 1

    async def main(self) -> None:
        self.start = self.service.start = time.monotonic()
        stop_at = self.start + self.duration
        clients = self.clients()
        ticker = asyncio.create_task(self.tick())
        drivers = [asyncio.create_task(self.drive(c, stop_at)) for c in clients]
        try:
            await asyncio.gather(*drivers)
            pending = set(self.inflight)
            if pending:
                deadline = self.start + self.duration + DRAIN_SECONDS
                _, pending = await asyncio.wait(
                    pending, timeout=max(0.05, deadline - time.monotonic())
                )
        finally:
            for task in (ticker, *drivers, *self.inflight):
                task.cancel()
            await asyncio.gather(ticker, *drivers, *self.inflight, return_exceptions=True)

    def execute(self) -> DemoResult:
        """Run the demo in a new event loop; ``KeyboardInterrupt`` ends it early."""
        policies = demo_policies(self.duration)
        self.open_seconds = policies["policies"]["broker"]["circuit_breaker"]["timeout_seconds"]
        load_policies(policies, apply_env=False)
        for name in ("broker", "database"):
            get_breaker(name).reset()  # a previous run in this process may have left it open
        self.intro(policies)
        unsubscribe = subscribe(self.on_event)
        interrupted = False
        try:
            asyncio.run(self.main())
        except KeyboardInterrupt:
            interrupted = True
        finally:
            unsubscribe()
        elapsed = self.elapsed()
        leftover = any(any(s.second.values()) for s in self.stats.values())
        if leftover:
            phase, _ = self.service.phase_at(elapsed)
            self.emit(self.second_line(elapsed, phase.name))
        for name, stats in self.stats.items():
            stats.attempts = self.service.hits.get(name, 0)
            if name in ("broker", "database"):
                stats.final_state = get_breaker(name).state
        return DemoResult(self.duration, self.seed, elapsed, self.stats, interrupted)

    def intro(self, policies: dict[str, Any]) -> None:
        d = self.duration
        open_s = policies["policies"]["broker"]["circuit_breaker"]["timeout_seconds"]
        self.emit(
            f"resilient demo: {d:g} s of a simulated flaky service, called ~40 times a second "
            f"through 3 policies (seed {self.seed}; in memory, real time)"
        )
        self.emit(
            "  broker    async  retry x3 (50-200 ms backoff), breaker "
            f"(opens after 3 failures in a row, open {open_s:g}"
            " s), 250 ms per attempt"
        )
        self.emit(
            "  database  sync   retry x2, breaker (5 failures in a row), fallback: cached rows"
        )
        self.emit("  api       async  retry x4 with full jitter, no breaker")
        script = ", ".join(f"{p.name} {p.start * d:.1f}s" for p in PHASES)
        self.emit(f"  service script: {script}")
        self.emit(
            "  per second: ok, fail(ed), fb = fallback answered, rej(ected by breaker), retry"
        )
        self.emit("")
        for line in self.header():
            self.emit(line)


def summary(result: DemoResult) -> list[str]:
    """The closing table, one row per policy."""
    head = (
        f"{'policy':<10}{'calls':>7}{'ok':>7}{'failed':>8}{'fallback':>10}{'rejected':>10}"
        f"{'retries':>9}{'attempts':>10}{'transitions':>13}  breaker"
    )
    note = " (interrupted)" if result.interrupted else ""
    lines = [
        "",
        f"summary after {result.elapsed:.1f} s{note} (seed {result.seed}):",
        head,
        "-" * len(head),
    ]
    for name, s in result.stats.items():
        t = s.total
        lines.append(
            f"{name:<10}{s.calls:>7}{t['ok']:>7}{t['failed']:>8}{t['fallback']:>10}"
            f"{t['rejected']:>10}{t['retries']:>9}{s.attempts:>10}{len(s.transitions):>13}"
            f"  {s.final_state or '-'}"
        )
    lines.append(
        "attempts: requests that reached the service. rejected: refused by an open breaker "
        "(the database's fallback answered those)."
    )
    return lines


def run(
    *,
    duration: float = 15.0,
    seed: int | None = None,
    quiet: bool = False,
    out: TextIO | None = None,
) -> int:
    """Run the demo and print the summary; returns the exit status (130 if interrupted)."""
    stream = sys.stdout if out is None else out
    if seed is None:
        seed = random.SystemRandom().randrange(10_000)
    result = _Demo(duration, seed, quiet, stream).execute()
    for line in summary(result):
        print(line, file=stream, flush=True)
    return 130 if result.interrupted else 0

"""
Scheduled experiments: every N seconds, or on a cron-like spec, with the same guards.

    sched = schedule(experiment, cron="*/30 9-16 * * mon-fri", timezone="Europe/Berlin")
    task = asyncio.create_task(sched.run())      # ... sched.stop() to end it

Each run goes through :func:`run_experiment`, so business hours, the minimum
interval, the production guard and an emergency stop refuse a run exactly as
they refuse a manual one; a refused run is recorded in ``skipped`` and the
schedule carries on.

The cron spec is parsed here, by hand: five fields (minute, hour, day of month,
month, day of week) with ``*``, ``a``, ``a-b``, ``*/n``, ``a-b/n``, lists and
day names. Why not a library: croniter is not a dependency of ours, and this
subset is about 60 lines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from resilient import _clock
from resilient.chaos._experiment import Experiment
from resilient.chaos._runner import ExperimentResult, _wall_clock, run_experiment
from resilient.errors import ChaosRefusedError, did_you_mean

__all__ = ["CronSpec", "Schedule", "schedule"]

_log = logging.getLogger("resilient.chaos")
_DOW_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MONTH_NAMES = {
    name: i + 1
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTH_NAMES),
    ("day of week", 0, 7, _DOW_NAMES),
)


def _parse_field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                msg = f"{name}: bad step {step_text!r} in {text!r}"
                raise ValueError(msg)
            step = int(step_text)
        if base == "*":
            start, end = low, high
        else:
            first, dash, last = base.partition("-")
            start = _value(first, name, low, high, names)
            end = _value(last, name, low, high, names) if dash else (high if step_text else start)
            if end < start:
                msg = f"{name}: range {base!r} runs backwards"
                raise ValueError(msg)
        values.update(range(start, end + 1, step))
    return values


def _value(text: str, name: str, low: int, high: int, names: dict[str, int]) -> int:
    if text in names:
        return names[text]
    if not text.isdigit():
        hint = did_you_mean(text, names) if names else ""
        msg = f"{name}: {text!r} is not a number{hint}"
        raise ValueError(msg)
    number = int(text)
    if not low <= number <= high:
        msg = f"{name}: {number} is outside {low}-{high}"
        raise ValueError(msg)
    return number


@dataclass(frozen=True)
class CronSpec:
    """A parsed five-field cron spec (see the module docstring)."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> CronSpec:
        """
        Parse *text*.

        Raises:
            ValueError: Not five fields, or a field that is not valid (the message says which).
        """
        fields = text.split()
        if len(fields) != 5:
            msg = (
                f"a cron spec has 5 fields (minute hour day-of-month month day-of-week), "
                f"got {len(fields)} in {text!r}"
            )
            raise ValueError(msg)
        parsed = [
            _parse_field(field, name, low, high, names)
            for field, (name, low, high, names) in zip(fields, _FIELDS, strict=True)
        ]
        weekdays = {0 if d == 7 else d for d in parsed[4]}
        return cls(
            text,
            frozenset(parsed[0]),
            frozenset(parsed[1]),
            frozenset(parsed[2]),
            frozenset(parsed[3]),
            frozenset(weekdays),
            any_day=fields[2] == "*",
            any_weekday=fields[4] == "*",
        )

    def _day_matches(self, at: datetime) -> bool:
        if at.month not in self.months:
            return False
        dom = at.day in self.days
        dow = (at.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:  # cron: both restricted means either matches
            return dom and dow
        return dom or dow

    def next_after(self, at: datetime) -> datetime:
        """The first time strictly after *at* (in *at*'s time zone) the spec matches."""
        t = at.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=366 * 5)
        while t < limit:
            if not self._day_matches(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0)
                continue
            if t.hour not in self.hours:
                t = (t + timedelta(hours=1)).replace(minute=0)
                continue
            if t.minute not in self.minutes:
                t += timedelta(minutes=1)
                continue
            return t
        msg = f"the cron spec {self.text!r} never matches"
        raise ValueError(msg)


class Schedule:
    """
    Runs an experiment again and again (see :func:`schedule`).

    Attributes:
        results: The journal of every run, oldest first.
        skipped: ``{"at", "reason", "why"}`` for every run a guard refused.
        failed: ``{"at", "error", "why"}`` for every run that could not start or
            ended in an error of its own (a bad target, the backend down ...): it is
            logged and the schedule carries on.
    """

    def __init__(
        self,
        experiment: Experiment,
        *,
        every: float | None = None,
        cron: str | None = None,
        timezone: str = "UTC",
        runs: int | None = None,
        now: datetime | Callable[[], datetime] | None = None,
        on_result: Callable[[ExperimentResult], Any] | None = None,
        **options: Any,
    ) -> None:
        from zoneinfo import ZoneInfo

        if (every is None) == (cron is None):
            msg = "give exactly one of every= (seconds) or cron= (a cron spec)"
            raise ValueError(msg)
        if every is not None and not every > 0:
            msg = f"every must be a positive number of seconds, got {every!r}"
            raise ValueError(msg)
        self.experiment = experiment
        self.every = every
        self.cron = CronSpec.parse(cron) if cron is not None else None
        self.zone = ZoneInfo(timezone)
        self.runs = runs
        self.wall = _wall_clock(now)
        self.on_result = on_result
        self.options = options
        options.pop("dry_run", None)
        self.results: list[ExperimentResult] = []
        self.skipped: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self._stop = asyncio.Event()

    def next_run(self, after: datetime | None = None) -> datetime:
        """When the next run is due (after *after*, default now)."""
        at = (after or self.wall()).astimezone(self.zone)
        if self.cron is not None:
            return self.cron.next_after(at)
        assert self.every is not None
        return at + timedelta(seconds=self.every)

    def stop(self) -> None:
        """End :meth:`run` at its next wait (a run in progress finishes, rollbacks included)."""
        self._stop.set()

    async def run(self) -> None:
        """Run the experiment at every due time until :meth:`stop` or *runs* attempts."""
        attempts = 0
        due = self.next_run()
        while not self._stop.is_set() and (self.runs is None or attempts < self.runs):
            wait = (due - self.wall()).total_seconds()
            if wait > 0:
                sleeper = asyncio.ensure_future(_clock.asleep(wait))
                stopper = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
                sleeper.cancel()
                stopper.cancel()
                if self._stop.is_set():
                    return
            attempts += 1
            try:
                result = await run_experiment(self.experiment, now=self.wall, **self.options)
            except ChaosRefusedError as exc:
                self.skipped.append(
                    {"at": self.wall().isoformat(), "reason": exc.reason, "why": str(exc)}
                )
                _log.info("scheduled chaos experiment skipped: %s", exc)
            except Exception as exc:  # one bad run must not end the schedule
                self.failed.append(
                    {"at": self.wall().isoformat(), "error": type(exc).__name__, "why": str(exc)}
                )
                _log.exception("scheduled chaos experiment failed; the schedule carries on")
            else:
                self.results.append(result)
                if self.on_result is not None:
                    try:
                        self.on_result(result)
                    except Exception:
                        _log.exception("on_result callback raised; ignoring it")
            due = self._after(due)

    def _after(self, due: datetime) -> datetime:
        """The next due time after *due* that is not already past (runs do not drift)."""
        now = self.wall()
        if self.cron is not None:
            return self.cron.next_after(max(due, now).astimezone(self.zone))
        assert self.every is not None
        step = timedelta(seconds=self.every)
        due += step
        while due <= now:
            due += step
        return due


def schedule(
    experiment: Experiment,
    *,
    every: float | None = None,
    cron: str | None = None,
    timezone: str = "UTC",
    runs: int | None = None,
    now: datetime | Callable[[], datetime] | None = None,
    on_result: Callable[[ExperimentResult], Any] | None = None,
    **options: Any,
) -> Schedule:
    """
    Run *experiment* every *every* seconds, or whenever the cron spec *cron*
    matches (in *timezone*); ``await schedule(...).run()`` runs it.

    Args:
        every: Seconds between runs.
        cron: ``"minute hour day-of-month month day-of-week"``, e.g.
            ``"0 10 * * mon-fri"`` (10:00 on weekdays).
        timezone: Zone of the cron spec.
        runs: Stop after this many due runs (refused ones included); default: never.
        now: The wall clock, as for :func:`run_experiment`.
        on_result: Called with each run's result.
        options: Passed to :func:`run_experiment` (``target``, ``monitor`` ...).

    Raises:
        ValueError: Neither or both of *every* and *cron*, or an invalid cron spec.
    """
    return Schedule(
        experiment,
        every=every,
        cron=cron,
        timezone=timezone,
        runs=runs,
        now=now,
        on_result=on_result,
        **options,
    )

"""
Scenarios: how a simulated backend behaves over time.

A :class:`Scenario` is a *baseline* (error probability, latency distribution)
plus *phases* that override it during a time interval; a phase may ramp its
error rate and latency linearly from its start to its end. Later phases win
where phases overlap, which is what composition (``a | b``) relies on.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field, replace

__all__ = [
    "Conditions",
    "Latency",
    "Phase",
    "Scenario",
    "SimulatedError",
    "brownout",
    "compose",
    "errors_ramp",
    "flapping",
    "healthy",
    "healthy_noisy",
    "latency_creep",
    "load_spike",
    "outage",
]

_Z99 = 2.3263478740408408  # the 99th percentile of the standard normal distribution


class SimulatedError(ConnectionError):
    """What the simulated backend raises when a request fails (a transient error)."""


@dataclass(frozen=True, slots=True)
class Latency:
    """
    A latency distribution: log-normal with the given median and 99th
    percentile, in seconds (``p99 == median``: always exactly *median*).
    """

    median: float = 0.02
    p99: float = 0.1

    def __post_init__(self) -> None:
        if not (self.median > 0 and math.isfinite(self.median)):
            msg = f"median latency must be positive, got {self.median!r}"
            raise ValueError(msg)
        if not (self.p99 >= self.median and math.isfinite(self.p99)):
            msg = f"p99 latency ({self.p99!r}) must be at least the median ({self.median!r})"
            raise ValueError(msg)

    def sample(self, rng: random.Random) -> float:
        """One latency drawn with *rng*."""
        if self.p99 == self.median:
            return self.median
        sigma = math.log(self.p99 / self.median) / _Z99
        return rng.lognormvariate(math.log(self.median), sigma)

    def towards(self, other: Latency, fraction: float) -> Latency:
        """The distribution *fraction* (0..1) of the way from this one to *other*."""
        median = self.median + (other.median - self.median) * fraction
        p99 = self.p99 + (other.p99 - self.p99) * fraction
        return Latency(median, max(p99, median))


@dataclass(frozen=True, slots=True)
class Conditions:
    """
    How the backend behaves at one moment.

    Attributes:
        error_rate: Probability (0..1) that a request fails.
        latency: How long a request takes (failures included, unless they hang).
        hang: Share (0..1) of the failures that *hang*: they take ``hang_for``
            seconds before failing, so only a timeout saves the caller.
        hang_for: How long a hanging request takes, in seconds.
    """

    error_rate: float = 0.0
    latency: Latency = field(default_factory=Latency)
    hang: float = 0.0
    hang_for: float = 30.0

    def __post_init__(self) -> None:
        for name in ("error_rate", "hang"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                msg = f"{name} must be within 0..1, got {value!r}"
                raise ValueError(msg)
        if not (self.hang_for > 0 and math.isfinite(self.hang_for)):
            msg = f"hang_for must be positive, got {self.hang_for!r}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Phase:
    """
    Conditions during ``[start, end)``; if *until* is given, they move linearly
    from *conditions* at *start* to *until* at *end* (error rate, latency and
    hang share ramp; ``hang_for`` is taken from *conditions*).
    """

    start: float
    end: float
    conditions: Conditions
    until: Conditions | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end and math.isfinite(self.end)):
            msg = f"a phase needs 0 <= start < end, got [{self.start!r}, {self.end!r})"
            raise ValueError(msg)

    def at(self, t: float) -> Conditions:
        """The conditions at time *t* (inside the phase)."""
        until = self.until
        if until is None:
            return self.conditions
        f = min(max((t - self.start) / (self.end - self.start), 0.0), 1.0)
        c = self.conditions
        return Conditions(
            c.error_rate + (until.error_rate - c.error_rate) * f,
            c.latency.towards(until.latency, f),
            c.hang + (until.hang - c.hang) * f,
            c.hang_for,
        )

    def shifted(self, seconds: float) -> Phase:
        """The same phase, *seconds* later."""
        return replace(self, start=self.start + seconds, end=self.end + seconds)


@dataclass(frozen=True)
class Scenario:
    """
    A schedule of backend behaviour: *baseline* conditions, overridden by
    *phases* during their intervals (where phases overlap, the one given later wins).

    Compose scenarios with ``|`` (overlay: the right side's phases win),
    :meth:`shift` and :meth:`then` (one after the other)::

        storm = outage(start=30, duration=20) | latency_creep(start=0, duration=120)
        week = brownout(duration=60).then(outage(start=0, duration=30), gap=10)
    """

    name: str
    baseline: Conditions = field(default_factory=Conditions)
    phases: tuple[Phase, ...] = ()
    _starts: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Flatten overlaps once (a later phase cuts the earlier ones it covers),
        # then sort by start: conditions_at is a binary search.
        flat: list[Phase] = []
        for phase in self.phases:
            flat = [*_cut(flat, phase.start, phase.end), phase]
        ordered = tuple(sorted(flat, key=lambda p: p.start))
        object.__setattr__(self, "phases", ordered)
        object.__setattr__(self, "_starts", tuple(p.start for p in ordered))

    @property
    def end(self) -> float:
        """When the last phase ends (0 for a scenario without phases)."""
        return max((p.end for p in self.phases), default=0.0)

    def conditions_at(self, t: float) -> Conditions:
        """How the backend behaves at time *t* (seconds since the start)."""
        i = bisect.bisect_right(self._starts, t) - 1
        if i >= 0:
            phase = self.phases[i]
            if t < phase.end:
                return phase.at(t)
        return self.baseline

    def shift(self, seconds: float) -> Scenario:
        """The same scenario with every phase *seconds* later."""
        return Scenario(self.name, self.baseline, tuple(p.shifted(seconds) for p in self.phases))

    def then(self, other: Scenario, *, gap: float = 0.0) -> Scenario:
        """This scenario, then *other*'s phases starting *gap* seconds after this one ends."""
        later = other.shift(self.end + gap)
        return Scenario(f"{self.name}+{other.name}", self.baseline, self.phases + later.phases)

    def __or__(self, other: Scenario) -> Scenario:
        return compose(self, other)


def compose(*scenarios: Scenario, name: str | None = None) -> Scenario:
    """
    Overlay scenarios: the baseline of the first, the phases of all; where
    phases overlap, the one from the later scenario wins.
    """
    if not scenarios:
        msg = "compose() needs at least one scenario"
        raise ValueError(msg)
    phases = tuple(phase for scenario in scenarios for phase in scenario.phases)
    return Scenario(name or "|".join(s.name for s in scenarios), scenarios[0].baseline, phases)


def _cut(phases: list[Phase], start: float, end: float) -> list[Phase]:
    """*phases* with the interval [start, end) removed (ramps keep their shape)."""
    out: list[Phase] = []
    for p in phases:
        if p.end <= start or p.start >= end:
            out.append(p)
            continue
        if p.start < start:
            out.append(_slice(p, p.start, start))
        if p.end > end:
            out.append(_slice(p, end, p.end))
    return out


def _slice(p: Phase, start: float, end: float) -> Phase:
    if p.until is None:
        return replace(p, start=start, end=end)
    return Phase(start, end, p.at(start), p.at(end), p.label)


# --------------------------------------------------------------------------- built-ins

#: A healthy backend: no errors, 20 ms median, 100 ms p99.
HEALTHY = Conditions()
#: A failing backend refuses fast (connection refused): 2 ms.
_REFUSED = Latency(0.002, 0.005)


def healthy(*, error_rate: float = 0.0, latency: Latency | None = None) -> Scenario:
    """A backend that behaves the same all the time."""
    return Scenario("healthy", Conditions(error_rate, latency or Latency()))


def healthy_noisy(
    *, error_rate: float = 0.05, latency: Latency | None = None, hang: float = 0.0
) -> Scenario:
    """
    A healthy backend with background noise: *error_rate* of the requests fail
    at random all the time, and latency has a long tail (20 ms median, 400 ms p99).
    A good breaker stays closed through this.
    """
    conditions = Conditions(error_rate, latency or Latency(0.02, 0.4), hang)
    return Scenario("healthy_noisy", conditions)


def outage(
    *,
    start: float = 30.0,
    duration: float = 60.0,
    hang: float = 0.0,
    hang_for: float = 30.0,
    baseline: Conditions = HEALTHY,
) -> Scenario:
    """
    Every request fails during ``[start, start + duration)``: fast (connection
    refused), or a *hang* share of them after ``hang_for`` seconds.
    """
    down = Conditions(1.0, _REFUSED, hang, hang_for)
    return Scenario("outage", baseline, (Phase(start, start + duration, down, label="outage"),))


def brownout(
    *,
    start: float = 30.0,
    duration: float = 60.0,
    error_rate: float = 0.3,
    latency: Latency | None = None,
    hang: float = 0.1,
    hang_for: float = 30.0,
    baseline: Conditions = HEALTHY,
) -> Scenario:
    """
    A partial degradation during ``[start, start + duration)``: *error_rate* of
    the requests fail, the rest are slow (500 ms median, 2 s p99), and a *hang*
    share of the failures hang.
    """
    degraded = Conditions(error_rate, latency or Latency(0.5, 2.0), hang, hang_for)
    return Scenario(
        "brownout", baseline, (Phase(start, start + duration, degraded, label="brownout"),)
    )


def latency_creep(
    *,
    start: float = 0.0,
    duration: float = 120.0,
    to: Latency | None = None,
    error_rate: float = 0.0,
    baseline: Conditions = HEALTHY,
) -> Scenario:
    """
    Latency grows linearly from the baseline's to *to* (default 2 s median,
    5 s p99) over ``[start, start + duration)``, and stays there afterwards
    (a slow leak); *error_rate* is reached the same way.
    """
    target = Conditions(error_rate, to or Latency(2.0, 5.0))
    ramp = Phase(
        start, start + duration, baseline, replace(target, hang_for=baseline.hang_for), "creep"
    )
    after = Phase(start + duration, start + duration + 1e9, target, label="crept")
    return Scenario("latency_creep", baseline, (ramp, after))


def flapping(
    *,
    start: float = 30.0,
    duration: float = 120.0,
    period: float = 10.0,
    down: float = 0.5,
    baseline: Conditions = HEALTHY,
) -> Scenario:
    """
    The backend goes down and up again every *period* seconds during
    ``[start, start + duration)``: down (every request fails fast) for the
    first *down* share (0..1) of each period, healthy for the rest.
    """
    if not (period > 0 and 0 < down < 1):
        msg = f"flapping needs period > 0 and 0 < down < 1, got {period!r}, {down!r}"
        raise ValueError(msg)
    failing = Conditions(1.0, _REFUSED)
    phases = []
    t = start
    stop = start + duration
    while t < stop:
        phases.append(Phase(t, min(t + period * down, stop), failing, label="down"))
        t += period
    return Scenario("flapping", baseline, tuple(phases))


def errors_ramp(
    *,
    start: float = 30.0,
    duration: float = 40.0,
    hold: float = 30.0,
    to: float = 1.0,
    baseline: Conditions = HEALTHY,
) -> Scenario:
    """
    The error rate climbs linearly from the baseline's to *to* over
    ``[start, start + duration)`` (a leak, a failing disk), then stays at *to*
    for *hold* seconds before the backend recovers.
    """
    if not 0.0 <= to <= 1.0:
        msg = f"errors_ramp needs 0 <= to <= 1, got {to!r}"
        raise ValueError(msg)
    top = replace(baseline, error_rate=to)
    phases = [Phase(start, start + duration, baseline, top, "ramp")]
    if hold > 0:
        phases.append(Phase(start + duration, start + duration + hold, top, label="failing"))
    return Scenario("errors_ramp", baseline, tuple(phases))


def load_spike(
    *,
    start: float = 30.0,
    rise: float = 8.0,
    duration: float = 25.0,
    error_rate: float = 0.7,
    latency: Latency | None = None,
    baseline: Conditions = HEALTHY,
) -> Scenario:
    """
    What a caller sees of a load spike on a shared backend: over *rise* seconds
    latency climbs to *latency* (default 400 ms median, 1.5 s p99) and the
    error rate to *error_rate* as the backend saturates and sheds; it stays
    there for *duration* seconds, then recovers at once. (The simulator's
    arrival rate is constant: the load comes from the backend's other clients.)
    """
    peak = Conditions(error_rate, latency or Latency(0.4, 1.5), baseline.hang, baseline.hang_for)
    ramp = Phase(start, start + rise, baseline, peak, "rising")
    top = Phase(start + rise, start + rise + duration, peak, label="saturated")
    return Scenario("load_spike", baseline, (ramp, top))


BUILTINS = {
    "healthy": healthy,
    "healthy_noisy": healthy_noisy,
    "outage": outage,
    "brownout": brownout,
    "latency_creep": latency_creep,
    "flapping": flapping,
    "errors_ramp": errors_ramp,
    "load_spike": load_spike,
}

"""
Warm-start models for the adaptive breaker, trained on simulated histories.

Separate from :mod:`resilient.adaptive` because it drives the simulator
(:mod:`resilient.testing`), which imports the pipeline, which builds adaptive
breakers: keeping it here keeps the import graph acyclic.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from resilient._models import CircuitBreakerConfig, Policy, TimeoutConfig
from resilient.adaptive import Forest, recording, save_model, train
from resilient.testing._scenario import (
    Latency,
    Scenario,
    brownout,
    errors_ramp,
    flapping,
    healthy_noisy,
    latency_creep,
    load_spike,
    outage,
)
from resilient.testing._simulate import simulate

__all__ = ["SuiteCase", "bootstrap_model", "suite"]


@dataclass(frozen=True, slots=True)
class SuiteCase:
    """
    One scenario of the adaptive suite.

    Attributes:
        name: Its short name.
        scenario: The scenario.
        onset: When the trouble starts (``None``: never, a healthy scenario).
        end: When it is over.
    """

    name: str
    scenario: Scenario
    onset: float | None
    end: float | None


def suite(seed: int, *, duration: float = 150.0) -> list[SuiteCase]:
    """
    The scenario suite: latency creep before an outage, errors ramping up, periodic
    brownouts, flapping, a load spike and healthy-but-noisy, with start times and
    strengths drawn from *seed* (so training and evaluation seeds see different runs).
    """
    rng = random.Random(seed * 7919 + 17)
    u = rng.uniform
    cases: list[SuiteCase] = []
    start = u(30, 50)
    creep = u(25, 45)
    to = Latency(u(0.3, 0.6), u(1.2, 2.5))
    down = u(25, 40)
    sc = latency_creep(start=start, duration=creep, to=to) | outage(
        start=start + creep, duration=down
    )
    cases.append(SuiteCase("creep_then_outage", sc, start, start + creep + down))
    start, ramp, hold = u(30, 50), u(20, 40), u(20, 35)
    sc = errors_ramp(start=start, duration=ramp, hold=hold, to=u(0.8, 1.0))
    cases.append(SuiteCase("errors_ramp", sc, start, start + ramp + hold))
    start, each, gap = u(20, 35), u(12, 20), u(15, 25)
    rate, hang = u(0.35, 0.6), u(0.05, 0.2)
    sc = brownout(start=start, duration=each, error_rate=rate, hang=hang, hang_for=5.0)
    sc = sc.then(
        brownout(start=0, duration=each, error_rate=rate, hang=hang, hang_for=5.0), gap=gap
    )
    cases.append(SuiteCase("brownouts", sc, start, sc.end))
    start, span = u(30, 45), u(50, 70)
    sc = flapping(start=start, duration=span, period=u(8, 14), down=u(0.4, 0.6))
    cases.append(SuiteCase("flapping", sc, start, start + span))
    start, rise, top = u(30, 50), u(5, 12), u(20, 30)
    sc = load_spike(start=start, rise=rise, duration=top, error_rate=u(0.6, 0.85))
    cases.append(SuiteCase("load_spike", sc, start, start + rise + top))
    noise = u(0.03, 0.08)
    cases.append(SuiteCase("healthy_noisy", healthy_noisy(error_rate=noise), None, None))
    return [c for c in cases if c.onset is None or c.onset < duration]


def training_policy(config: CircuitBreakerConfig, timeout: float | None = 1.0) -> Policy:
    """The simulated policy: *config* as a shadow-mode adaptive breaker, and a timeout."""
    shadow = config.model_copy(
        update={
            "type": "adaptive",
            "adaptive": config.adaptive.model_copy(update={"mode": "shadow"}),
        }
    )
    return Policy(
        circuit_breaker=shadow,
        timeout=TimeoutConfig(per_attempt=timeout) if timeout is not None else None,
    )


def bootstrap_model(
    path: str | None = None,
    *,
    seeds: Iterable[int] = (101, 102, 103),
    duration: float = 150.0,
    rate: float = 50.0,
    config: CircuitBreakerConfig | None = None,
    timeout: float | None = 1.0,
    scenarios: Iterable[Scenario] | None = None,
) -> Forest:
    """
    Train a model on histories generated with the simulator, and save it to *path*.

    Each scenario of :func:`suite` (or *scenarios*) runs once per seed through the
    real pipeline in virtual time with a shadow-mode adaptive breaker, whose
    labelled history (:meth:`~resilient.adaptive.AdaptiveCircuitBreaker.dataset`)
    becomes training data. Keep the evaluation seeds apart from *seeds*.

    Args:
        path: Where to save the model with joblib (``None``: do not save).
        seeds: Simulation seeds for training.
        duration, rate: Of each simulation run.
        config: The breaker section to simulate (its ``adaptive`` block gives
            the bucket width, horizon and forest size).
        timeout: The per-attempt timeout of the simulated policy (``None``: none).
        scenarios: Other scenarios to train on (default: the suite of each seed).
    """
    base = config or CircuitBreakerConfig(type="adaptive")
    policy = training_policy(base, timeout)
    xs: list[tuple[float, ...]] = []
    ys: list[int] = []
    given = list(scenarios) if scenarios is not None else None
    for seed in seeds:
        runs = given if given is not None else [c.scenario for c in suite(seed, duration=duration)]
        for scenario in runs:
            with recording() as made:
                simulate(policy, scenario, duration=duration, rate=rate, seed=seed)
            for breaker in made:
                rows, labels = breaker.dataset()
                xs.extend(rows)
                ys.extend(labels)
    model = train(xs, ys, n_estimators=base.adaptive.n_estimators)
    if path is not None:
        save_model(model, path)
    return model

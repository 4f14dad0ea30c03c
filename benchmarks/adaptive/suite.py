"""
The adaptive breaker's scenario suite, in virtual time through the real pipeline.

    python benchmarks/adaptive/suite.py [--quick] [--json out.json]

1. Trains a model on shadow-mode histories of the suite generated with the
   training seeds (``resilient._adaptive_bootstrap.bootstrap_model``).
2. Runs every scenario of the suite with the evaluation seeds (never a training
   seed: the scenarios' start times and strengths are drawn from the seed too)
   against five breakers on the same policy: basic, SRE throttling, adaptive
   shadow, adaptive active (shed) and adaptive active (open early).
3. Prints, per scenario and breaker, the means over the seeds of: failing calls
   let through to the dependency, good calls refused, detection delay (first
   refusal, or first prediction above the threshold for shadow, after the
   trouble starts) and time to recover (from the end of the trouble to 5 s
   without refusals); then the targets of issue #13, met or not.

"Good calls refused" is an expectation: each refused call counts as the
probability that it would have succeeded at that moment (the scenario's error
rate and the share of its latency distribution under the timeout).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resilient import Policy
from resilient._adaptive_bootstrap import SuiteCase, bootstrap_model, suite
from resilient._models import CircuitBreakerConfig, TimeoutConfig
from resilient.adaptive import recording
from resilient.testing import simulate
from resilient.testing._scenario import Scenario

TRAIN_SEEDS = (101, 102, 103, 104, 105, 106)
EVAL_SEEDS = (1, 2, 3, 4, 5)
DURATION = 150.0
RATE = 50.0
TIMEOUT = 1.0  # the policy's per-attempt timeout
#: The breaker every variant shares: trips on 5 failures in a row or a 50% failure
#: rate over a 10 s window (10 calls at least), stays open 10 s.
BASE = {
    "failure_threshold": 5,
    "timeout_seconds": 10.0,
    "failure_rate_window": 10,
    "min_requests_threshold": 10,
}
DEGRADATION = ("creep_then_outage", "errors_ramp", "brownouts", "flapping", "load_spike")


def variants(model_path: str) -> dict[str, dict[str, Any]]:
    ml = {"model_path": model_path, "min_samples": 200}
    return {
        "basic": {},
        "sre_throttle": {
            "type": "adaptive",
            "enable_ml_prediction": False,
            "adaptive": {"mode": "throttle", "k": 2.0},
        },
        "adaptive_shadow": {"type": "adaptive", "adaptive": {"mode": "shadow", **ml}},
        "adaptive_shed": {
            "type": "adaptive",
            "adaptive": {"mode": "active", "action": "shed", **ml},
        },
        "adaptive_open": {
            "type": "adaptive",
            "adaptive": {"mode": "active", "action": "open", **ml},
        },
    }


@dataclass
class Cell:
    failing: list[float] = field(default_factory=list)
    good_refused: list[float] = field(default_factory=list)
    delay: list[float] = field(default_factory=list)
    recover: list[float] = field(default_factory=list)

    def mean(self, name: str) -> float:
        values = getattr(self, name)
        return statistics.fmean(values) if values else math.nan


def _p_ok(scenario: Scenario, t: float) -> float:
    """Probability that a call started at *t* succeeds within the timeout."""
    c = scenario.conditions_at(t)
    lat = c.latency
    if lat.p99 == lat.median:
        under = 1.0 if lat.median < TIMEOUT else 0.0
    else:
        sigma = math.log(lat.p99 / lat.median) / 2.3263478740408408
        z = (math.log(TIMEOUT) - math.log(lat.median)) / sigma
        under = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return (1 - c.error_rate) * under


def run_one(case: SuiteCase, cb: dict[str, Any], seed: int) -> dict[str, float]:
    policy = Policy(
        circuit_breaker=CircuitBreakerConfig(**BASE, **cb),
        timeout=TimeoutConfig(per_attempt=TIMEOUT),
    )
    with recording() as made:
        r = simulate(policy, case.scenario, duration=DURATION, rate=RATE, seed=seed)
    # the virtual clock starts at 0: crossing times are seconds into the run
    crossings = [at for b in made for at, _, above in b.crossings if above]
    good_refused = sum(
        s.rejected * _p_ok(case.scenario, s.second + 0.5) for s in r.timeline if s.rejected
    )
    out = {"failing": float(r.failed), "good_refused": good_refused}
    if case.onset is not None and case.end is not None:
        refusals = [float(s.second) for s in r.timeline if s.rejected and s.second >= case.onset]
        firsts = refusals[:1] + [c for c in crossings if c >= case.onset][:1]
        out["delay"] = (min(firsts) - case.onset) if firsts else DURATION - case.onset
        busy = {s.second for s in r.timeline if s.rejected}
        t = math.ceil(case.end)
        while any(t + k in busy for k in range(5)):
            t += 1
        out["recover"] = t - case.end
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 training and 2 evaluation seeds")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    train_seeds = TRAIN_SEEDS[:2] if args.quick else TRAIN_SEEDS
    eval_seeds = EVAL_SEEDS[:2] if args.quick else EVAL_SEEDS
    assert not set(train_seeds) & set(eval_seeds)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.joblib")
        model = bootstrap_model(
            path,
            seeds=train_seeds,
            duration=DURATION,
            rate=RATE,
            config=CircuitBreakerConfig(**BASE, type="adaptive"),
            timeout=TIMEOUT,
        )
        trained = time.perf_counter() - t0
        table: dict[str, dict[str, Cell]] = {}
        for seed in eval_seeds:
            for case in suite(seed, duration=DURATION):
                for label, cb in variants(path).items():
                    res = run_one(case, cb, seed)
                    cell = table.setdefault(case.name, {}).setdefault(label, Cell())
                    for key, value in res.items():
                        getattr(cell, key).append(value)
    elapsed = time.perf_counter() - t0
    print(
        f"# adaptive breaker suite: {DURATION:g} s at {RATE:g} calls/s per run, "
        f"training seeds {list(train_seeds)} ({model.samples} buckets, {trained:.1f} s), "
        f"evaluation seeds {list(eval_seeds)}; means over the evaluation seeds; "
        f"{elapsed:.1f} s in all\n"
    )
    print(
        "| scenario | breaker | failing calls let through | good calls refused "
        "| detection delay (s) | time to recover (s) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, row in table.items():
        for label, cell in row.items():
            print(
                f"| {name} | {label} | {cell.mean('failing'):.1f} | "
                f"{cell.mean('good_refused'):.1f} | {_fmt(cell.mean('delay'))} | "
                f"{_fmt(cell.mean('recover'))} |"
            )
    verdict = _targets(table)
    print()
    for line in verdict["lines"]:
        print(line)
    if args.json:
        data = {
            "train_seeds": list(train_seeds),
            "eval_seeds": list(eval_seeds),
            "table": {n: {lab: c.__dict__ for lab, c in row.items()} for n, row in table.items()},
            "targets": verdict["figures"],
        }
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _targets(table: dict[str, dict[str, Cell]]) -> dict[str, Any]:
    lines = ["## Targets (issue #13), across the degradation scenarios", ""]
    figures: dict[str, Any] = {}
    deg = [n for n in DEGRADATION if n in table]
    base_fail = sum(table[n]["basic"].mean("failing") for n in deg)
    base_delay = statistics.fmean(table[n]["basic"].mean("delay") for n in deg)
    for label in ("sre_throttle", "adaptive_shed", "adaptive_open"):
        fail = sum(table[n][label].mean("failing") for n in deg)
        delay = statistics.fmean(table[n][label].mean("delay") for n in deg)
        cut = 1 - fail / base_fail if base_fail else 0.0
        lead = base_delay - delay
        noisy = table.get("healthy_noisy", {})
        refused = noisy[label].mean("good_refused") if label in noisy else math.nan
        base_refused = noisy["basic"].mean("good_refused") if "basic" in noisy else math.nan
        figures[label] = {
            "failing_cut": cut,
            "lead_seconds": lead,
            "noisy_refused": refused,
            "noisy_refused_basic": base_refused,
        }
        ok = lambda b: "met" if b else "NOT met"  # noqa: E731
        lines.append(
            f"- {label}: {100 * cut:.0f}% fewer failing calls than basic (target >= 40%: "
            f"{ok(cut >= 0.40)}); detects {lead:+.1f} s earlier on average (target >= 2 s: "
            f"{ok(lead >= 2.0)}); healthy_noisy good calls refused {refused:.1f} vs basic "
            f"{base_refused:.1f} (target: no more: {ok(refused <= base_refused + 1e-9)})"
        )
    return {"lines": lines, "figures": figures}


if __name__ == "__main__":
    sys.exit(main())

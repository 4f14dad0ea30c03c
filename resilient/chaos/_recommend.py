"""
Recommendations drawn from what a run observed, read against the policies in force.

Each rule looks at one thing the run measured (when a breaker opened and closed,
how much retries added to the load, what latency reached callers, whether the
steady state came back) and at the policy section that governs it, and says what
to change, with the numbers that justify it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The runner imports this module: its ExperimentResult and Sample are read by
# attribute here, typed as Any, so the import graph stays acyclic.
ExperimentResult = Any
Sample = Any

__all__ = ["recommend"]

_FAILING_MODES = frozenset({"exception", "timeout"})
_SLOW_MODES = frozenset({"network_delay", "latency_spike", "timeout"})
#: A breaker that takes longer than this to open lets too many calls fail.
_SLOW_TO_OPEN = 5.0
#: Retries that add more than this factor to the load are worth a budget.
_AMPLIFICATION = 1.5


def _policy_of(name: str, policies: Mapping[str, Any]) -> Any:
    policy = policies.get(name)
    if policy is not None:
        return policy
    from resilient.policy import registry

    return (registry.contents()[0] or {}).get(name)


def _samples(result: ExperimentResult, start: float, end: float) -> list[Sample]:
    return [s for s in result.timeline if start < s.at <= end + 1e-9]


def _rate(samples: list[Sample], seconds: float) -> float:
    return sum(s.calls for s in samples) / seconds if seconds > 0 else 0.0


def _success(samples: list[Sample]) -> float | None:
    calls = sum(s.calls for s in samples)
    if not calls:
        return None
    ok = sum((s.success_rate or 0.0) * s.calls for s in samples)
    return float(ok / calls)


def _p95(samples: list[Sample]) -> float | None:
    values = [s.latency_p95 for s in samples if s.latency_p95 is not None]
    return max(values) if values else None


def recommend(result: ExperimentResult, policies: Mapping[str, Any]) -> list[str]:
    """What to change, from what *result* observed (*policies*: name -> Policy in force)."""
    out: list[str] = []
    baseline = [s for s in result.timeline if s.phase == "baseline"]
    for step in result.steps:
        out.extend(_step_rules(result, step, policies, baseline))
    out.extend(_retry_rules(result, policies))
    if result.aborted:
        out.append(
            f"The run was aborted ({result.abort_reason}). Start again with a lower intensity, "
            "a cohort (only a share of calls treated) or a blast-radius cap "
            "(safety.max_faults / max_share)."
        )
    if result.before is not None and not all(p.held for p in result.before):
        failed = ", ".join(p.probe for p in result.before if not p.held)
        out.append(
            f"The steady state did not hold before any fault ({failed}), so nothing was "
            "injected: fix the service, or the tolerances or the load of the hypothesis, first."
        )
    hyp = result.experiment.steady_state_hypothesis
    if hyp is not None and result.after is not None:
        if all(p.held for p in result.after):
            if result.recovery_time is not None and result.recovery_time > hyp.window + 1e-9:
                out.append(
                    f"The steady state came back {result.recovery_time:.1f} s after the "
                    "rollbacks: that is how long users feel the fault after it ends."
                )
        else:
            failed = ", ".join(p.probe for p in result.after if not p.held)
            out.append(
                f"The steady state did not come back within {hyp.recovery_timeout:g} s of the "
                f"rollbacks ({failed}): check what holds the service down (an open breaker, "
                "a drained pool, a retry storm) before running this experiment again."
            )
    if not out and result.status == "completed":
        out.append(
            "The policies held and nothing stood out: try a higher intensity, a longer "
            "duration or another failure mode next time."
        )
    return out


def _step_rules(
    result: ExperimentResult, step: dict[str, Any], policies: Mapping[str, Any], baseline: list[Any]
) -> list[str]:
    out: list[str] = []
    name = step["service"]
    modes = set(step["modes"])
    started = float(step["started"])
    ended = float(step.get("ended", started))
    duration = max(ended - started, 1e-9)
    samples = _samples(result, started, ended)
    out.extend(_during(result, step, samples))
    rate = _rate(samples, duration)
    policy = _policy_of(name, policies)
    cb = getattr(policy, "circuit_breaker", None)
    transitions = [t for t in result.transitions if t["service"] == name]
    success = _success(samples)
    if modes & _FAILING_MODES:
        opened = next(
            (t for t in transitions if t["new"] == "open" and t["at"] >= started - 1e-9), None
        )
        if cb is None:
            if success is not None and success < 0.9:
                out.append(
                    f"{name!r} has no circuit breaker: during {step['name']!r} only "
                    f"{success:.0%} of calls succeeded and every failure reached a caller "
                    "(and the dependency kept getting the full load); add a circuit_breaker "
                    "section."
                )
        elif opened is not None:
            took = opened["at"] - started
            text = (
                f"The breaker of {name!r} opened {took:.1f} s after the faults started "
                f"({step['name']})"
            )
            if took > _SLOW_TO_OPEN:
                text += (
                    f"; failure_threshold={cb.failure_threshold} is high for "
                    f"{rate:.0f} calls/s at intensity {step['intensity']:g}: lower it, or rely "
                    f"on failure_rate_threshold (now {cb.failure_rate_threshold}) with a "
                    f"shorter failure_rate_window (now {cb.failure_rate_window})."
                )
            else:
                text += ": it protects callers quickly."
            out.append(text)
            closed = next(
                (t for t in transitions if t["new"] == "closed" and t["at"] > opened["at"]), None
            )
            if closed is not None:
                out.append(
                    f"The breaker of {name!r} closed again {closed['at'] - ended:.1f} s after "
                    f"the injection ended (timeout_seconds={cb.timeout_seconds:g}, "
                    f"success_threshold={cb.success_threshold})."
                )
            else:
                out.append(
                    f"The breaker of {name!r} was still not closed at the end of the run: "
                    f"timeout_seconds={cb.timeout_seconds:g} keeps it open long after the fault "
                    "ended; consider a shorter timeout_seconds or health checks that move it to "
                    "half-open (docs/health.md)."
                )
        elif success is not None and success < 0.5:
            out.append(
                f"The breaker of {name!r} never opened although only {success:.0%} of calls "
                f"succeeded during {step['name']!r}: at intensity {step['intensity']:g} failures "
                f"rarely come {cb.failure_threshold} in a row (failure_threshold); set "
                "failure_rate_threshold (e.g. 0.5) so the failure rate trips it."
            )
    if modes & _SLOW_MODES and policy is not None and policy.per_attempt_timeout is None:
        during = _p95(samples)
        before = _p95(baseline)
        if during is not None and (before is None or during > 2 * before):
            shown = f" (vs {before:.3f} s before)" if before is not None else ""
            out.append(
                f"{name!r} has no per-attempt timeout: the injected delays reached callers, "
                f"p95 latency {during:.3f} s during {step['name']!r}{shown}; set "
                "timeout.per_attempt so a slow dependency fails fast and trips the breaker."
            )
    per_attempt = getattr(policy, "per_attempt_timeout", None)
    before_p95 = _p95(baseline)
    if (
        modes & _SLOW_MODES
        and per_attempt is not None
        and before_p95 is not None
        and per_attempt > max(1.0, 20 * before_p95)
    ):
        out.append(
            f"The per-attempt timeout of {name!r} ({per_attempt:g} s) is far above its normal "
            f"p95 latency ({before_p95:.3f} s): a dependency that hangs keeps callers waiting "
            f"{per_attempt:g} s per attempt before anything reacts; a few times the p95 is enough."
        )
    fallback = getattr(policy, "fallback", None)
    if (
        policy is not None
        and fallback is None
        and success is not None
        and success < 0.9
        and modes & _FAILING_MODES
    ):
        out.append(
            f"{name!r} has no fallback: {1 - success:.0%} of calls failed or were refused during "
            f"{step['name']!r}; a fallback (a cached or default answer) would have served them."
        )
    return out


def _during(result: ExperimentResult, step: dict[str, Any], samples: list[Sample]) -> list[str]:
    """Probes of the hypothesis (on all calls) that the faults broke while they lasted."""
    hyp = result.experiment.steady_state_hypothesis
    if hyp is None or not samples:
        return []
    out = []
    for probe in hyp.probes:
        if probe.service is not None:
            continue
        if probe.type == "success_rate":
            worst = min(
                (s.success_rate for s in samples if s.success_rate is not None), default=None
            )
            if worst is not None and worst < probe.tolerance:
                out.append(
                    f"During {step['name']!r} the success rate fell to {worst:.0%} (the steady "
                    f"state asks for {probe.tolerance:.0%}): callers noticed the fault."
                )
        elif probe.type == "latency_p95":
            worst = _p95(samples)
            if worst is not None and worst > probe.tolerance:
                out.append(
                    f"During {step['name']!r} the p95 latency reached {worst:.3f} s (the steady "
                    f"state asks for at most {probe.tolerance:g} s): callers noticed the fault."
                )
    return out


def _retry_rules(result: ExperimentResult, policies: Mapping[str, Any]) -> list[str]:
    totals = result.totals
    calls = int(totals.get("calls") or 0)
    retries = int(totals.get("retries") or 0)
    if calls <= 0 or retries <= 0:
        return []
    factor = (calls + retries) / calls
    if factor < _AMPLIFICATION:
        return []
    detail = []
    for name in result.experiment.watched():
        retry = getattr(_policy_of(name, policies), "retry", None)
        if retry is not None:
            budget = "no retry budget" if retry.budget is None else "a retry budget"
            detail.append(f"{name!r}: max_attempts={retry.max_attempts}, {budget}")
    where = f" ({'; '.join(detail)})" if detail else ""
    return [
        f"Retries multiplied the load {factor:.1f}x ({retries} retries for {calls} calls){where}: "
        "a struggling dependency got more traffic, not less; add retry.budget (e.g. ratio "
        "0.2) or fewer attempts."
    ]

"""
``resilient simulate``: run a policy of a file against a scenario in virtual time.

    resilient simulate resilience.yaml --policy broker --scenario outage --duration 120
    resilient simulate resilience.yaml --policy broker --scenario brownout,outage --json
    resilient simulate resilience.yaml --policy broker --scenario flapping --plot out.png

``resilient.cli`` wires this in with :func:`add_simulate_parser`; the handler is
:func:`run_simulate`. Exit codes as the rest of the command: 0 ok, 1 invalid
policy file or input, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

__all__ = ["SCENARIOS", "add_simulate_parser", "run_simulate", "scenario_for"]

EXIT_OK = 0
EXIT_INVALID = 1

#: Built-in scenarios by name, and where they sit in a run of *duration* seconds.
SCENARIOS: dict[str, str] = {
    "outage": "every request fails fast from 25% to 75% of the run",
    "brownout": "30% errors and slow (500 ms median) from 25% to 75% of the run",
    "latency_creep": "latency grows to 2 s median over the first 75% of the run",
    "flapping": "down/up every 1/12 of the run (at least 2 s) from 25% to 75%",
    "healthy_noisy": "5% random errors and a long latency tail all the time",
    "errors_ramp": "errors ramp from 0 to 100% over the middle 40% of the run, then hold",
    "load_spike": "latency climbs and 70% of requests fail from 25% of the run for 25% of it",
    "healthy": "no errors, 20 ms median latency",
}


def scenario_for(name: str, duration: float) -> Any:
    """
    The built-in scenario *name* placed within a run of *duration* seconds;
    ``"a,b"`` composes several (later ones win where they overlap).

    Raises:
        ValueError: An unknown scenario name.
    """
    from resilient.testing import _scenario as sc

    parts = [part.strip() for part in name.split(",") if part.strip()]
    if not parts:
        msg = "no scenario given"
        raise ValueError(msg)
    built = []
    quarter, half = duration * 0.25, duration * 0.5
    for part in parts:
        key = part.replace("-", "_")
        if key == "outage":
            built.append(sc.outage(start=quarter, duration=half))
        elif key == "brownout":
            built.append(sc.brownout(start=quarter, duration=half))
        elif key == "latency_creep":
            built.append(sc.latency_creep(start=0.0, duration=duration * 0.75))
        elif key == "flapping":
            built.append(sc.flapping(start=quarter, duration=half, period=max(duration / 12, 2.0)))
        elif key == "healthy_noisy":
            built.append(sc.healthy_noisy())
        elif key == "errors_ramp":
            ramp = duration * 0.4
            built.append(sc.errors_ramp(start=quarter, duration=ramp, hold=duration * 0.25))
        elif key == "load_spike":
            built.append(
                sc.load_spike(start=quarter, rise=duration * 0.08, duration=duration * 0.25)
            )
        elif key == "healthy":
            built.append(sc.healthy())
        else:
            from resilient.errors import did_you_mean

            hint = did_you_mean(key, SCENARIOS)
            msg = f"unknown scenario {part!r}{hint}; built-in: {', '.join(SCENARIOS)}"
            raise ValueError(msg)
    return built[0] if len(built) == 1 else sc.compose(*built)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"not a number: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 < value < float("inf"):
        msg = f"must be a positive number, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_simulate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``simulate`` command to *subparsers* (``parser.add_subparsers(...)``)."""
    # argparse %-formats help texts: the scenarios' "30%" must be written "30%%".
    scenario_help = "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()).replace("%", "%%")
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="run a policy against a failure scenario in virtual time",
        description="Drive the real pipeline of policy NAME from FILE against a simulated "
        "backend that follows a scenario, in virtual time (10 minutes at 200 calls/s take a "
        "few seconds), and print what happened: outcomes, retries, backend load, breaker "
        "transitions, caller latency. The same seed gives the same result.",
    )
    parser.add_argument("file", metavar="FILE", help="resilience.yaml or pyproject.toml")
    parser.add_argument("--policy", required=True, metavar="NAME", help="policy to simulate")
    parser.add_argument(
        "--scenario",
        default="outage",
        metavar="NAME[,NAME...]",
        help=f"built-in scenario(s), composed left to right (default: outage). {scenario_help}",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        default=120.0,
        metavar="SECONDS",
        help="virtual seconds during which calls arrive (default: 120)",
    )
    parser.add_argument(
        "--rate",
        type=_positive,
        default=200.0,
        metavar="PER_SECOND",
        help="mean calls per second (Poisson arrivals; default: 200)",
    )
    parser.add_argument("--seed", type=int, default=1, metavar="N", help="random seed (default: 1)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also write a timeline plot to PNG "
        "(needs matplotlib: pip install 'resilient-policies[plot]')",
    )
    parser.add_argument(
        "--no-env", action="store_true", help="ignore RESILIENCE_* environment overrides"
    )
    parser.set_defaults(handler=run_simulate)
    return parser


def run_simulate(args: argparse.Namespace) -> int:
    """Handler of ``resilient simulate``; returns the exit status."""
    from resilient.errors import PolicyError, did_you_mean
    from resilient.policy import load_file
    from resilient.testing import simulate

    try:
        policies = load_file(args.file, env=None if args.no_env else os.environ)
    except PolicyError as exc:
        message = str(exc)
        _err(message if message.startswith(str(args.file)) else f"{args.file}: {message}")
        return EXIT_INVALID
    policy = policies.get(args.policy)
    if policy is None:
        known = ", ".join(sorted(policies)) or "(none)"
        hint = did_you_mean(args.policy, policies)
        _err(f"{args.file}: unknown policy {args.policy!r}{hint}; known policies: {known}")
        return EXIT_INVALID
    try:
        scenario = scenario_for(args.scenario, args.duration)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_INVALID
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before the run, not after it
        except ImportError:
            _err("--plot needs matplotlib: pip install 'resilient-policies[plot]'")
            return EXIT_INVALID
    adaptive: dict[str, Any] | None = None
    cb = policy.circuit_breaker
    with contextlib.ExitStack() as stack:
        made: list[Any] = []
        if cb is not None and cb.type == "adaptive":
            from resilient.adaptive import recording  # scikit-learn only if a model is used

            made = stack.enter_context(recording())
        result = simulate(
            policy,
            scenario,
            duration=args.duration,
            rate=args.rate,
            seed=args.seed,
            name=args.policy,
        )
    if made:
        adaptive = made[-1].get_status()["adaptive"]
        adaptive["crossings"] = len(made[-1].crossings)
    if args.json:
        data = result.to_dict()
        if adaptive is not None:
            data["adaptive"] = adaptive
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(result.summary() + "\n")
        if adaptive is not None:
            sys.stdout.write(_adaptive_summary(adaptive) + "\n")
    if args.plot:
        from resilient.testing._plot import plot_timeline

        plot_timeline(result, args.plot)
        if not args.json:
            sys.stdout.write(f"\ntimeline plot written to {args.plot}\n")
    return EXIT_OK


def _adaptive_summary(status: dict[str, Any]) -> str:
    """The adaptive breaker's part of the summary (``type: adaptive``)."""
    line = f"  adaptive breaker ({status['mode']}"
    line += f", action {status['action']})" if status["action"] else ")"
    if "throttle" in status:
        t = status["throttle"]
        return f"{line}: SRE throttling, K = {t['k']:g}, window {t['window_seconds']:g} s"
    if not status["ml"]:
        return f"{line}: ML off (enable_ml_prediction: false), the basic breaker"
    if status["model_error"]:
        return f"{line}: model not loaded: {status['model_error']}"
    model = (
        f"model trained on {status['model_samples']} buckets"
        if status["model_samples"]
        else "no model (too few samples: the basic breaker)"
    )
    return (
        f"{line}: {model}, {status['predictions']} predictions, "
        f"{status['crossings']} threshold crossings"
    )


def _err(message: str) -> None:
    print(message, file=sys.stderr)

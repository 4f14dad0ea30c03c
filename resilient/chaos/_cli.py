"""
``resilient chaos``: run chaos experiments from the command line.

    resilient chaos run experiment.yaml --dry-run
    resilient chaos run experiment.yaml --journal run.json --report run.html --plot run.png
    resilient chaos report run.json --report run.md --plot run.png

Exit codes: 0 the steady-state hypothesis held (or a dry run found nothing
wrong), 1 it did not hold, the run was aborted, refused or interrupted, 2 bad
input (an invalid experiment file, a missing extra, a usage error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

__all__ = ["add_chaos_parser"]

EXIT_HELD = 0
EXIT_NOT_HELD = 1
EXIT_BAD_INPUT = 2
_BAR = 24


def _err(message: str) -> None:
    print(message, file=sys.stderr)


class _Progress:
    """A progress bar and status line in a terminal; plain lines otherwise."""

    def __init__(self, expected: float, stream: Any) -> None:
        self.expected = max(expected, 1e-9)
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.width = 0
        self.phase: str | None = None

    def __call__(self, result: Any, sample: Any) -> None:
        if sample is None:
            self.done()
            return
        share = min(sample.at / self.expected, 0.99)
        rate = "-" if sample.success_rate is None else f"{sample.success_rate:.0%}"
        p95 = "-" if sample.latency_p95 is None else f"{sample.latency_p95:.3f}s"
        breakers = " ".join(f"{k}={v}" for k, v in sample.breakers.items())
        status = (
            f"t={sample.at:5.1f}s {sample.phase:<8} intensity {sample.intensity:.2f} "
            f"calls {sample.calls:>4} ok {rate:>4} p95 {p95:>7} faults {sample.injected:>3}"
            + (f" {breakers}" if breakers else "")
        )
        if self.tty:
            filled = round(share * _BAR)
            line = f"\r[{'#' * filled}{'-' * (_BAR - filled)}] {share:4.0%} {status}"
            pad = max(self.width - len(line), 0)
            self.stream.write(line + " " * pad)
            self.width = len(line)
            self.stream.flush()
        else:
            if sample.phase != self.phase:
                self.stream.write(f"phase: {sample.phase}\n")
                self.phase = sample.phase
            self.stream.write(f"{status}\n")
            self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


def _expected_duration(experiment: Any) -> float:
    hyp = experiment.steady_state_hypothesis
    total = sum(step.duration + step.pause_after for step in experiment.method)
    total += sum(r.seconds or 0.0 for r in experiment.rollbacks if r.action == "wait")
    if hyp is not None:
        total += 2 * hyp.window
    return float(total)


def _summary(result: Any) -> str:
    data = result.to_dict()
    lines = [f"{data['title']}: {data['status']}"]
    if data["abort_reason"]:
        lines.append(f"  why: {data['abort_reason']}")
    if data["error"]:
        lines.append(f"  error: {data['error']}")
    hyp = data["hypothesis"]
    for key in ("before", "after"):
        for probe in hyp[key] or ():
            mark = "ok " if probe["held"] else "NOT"
            lines.append(f"  {key:<6} {mark} {probe['probe']} (measured {probe['value']})")
    totals = data["totals"]
    if totals:
        lines.append(
            f"  {totals['calls']} calls, {totals['faults']} faults injected, "
            f"{totals['retries']} retries, {len(data['breaker_transitions'])} breaker transitions"
        )
    for rollback in data["rollbacks"]:
        state = "ok" if rollback["ok"] else f"FAILED {rollback['error']}"
        lines.append(f"  rollback {rollback['action']}: {state}")
    for text in data["recommendations"]:
        lines.append(f"  - {text}")
    return "\n".join(lines)


def _write_outputs(args: argparse.Namespace, result: Any) -> int:
    from resilient.chaos._report import write_journal, write_report

    status = 0
    try:
        if args.journal:
            write_journal(result, args.journal)
            _err(f"journal written to {args.journal}")
        if args.plot:
            from resilient.chaos._plot import write_plot

            write_plot(result, args.plot)
            _err(f"plot written to {args.plot}")
        if args.report:
            write_report(result, args.report, plot=args.plot)
            _err(f"report written to {args.report}")
    except OSError as exc:
        _err(f"cannot write: {exc}")
        status = EXIT_BAD_INPUT
    return status


def _matplotlib_missing(args: argparse.Namespace) -> bool:
    if not args.plot:
        return False
    try:
        import matplotlib  # noqa: F401 - fail before the run, not after it
    except ImportError:
        from resilient.chaos._plot import MISSING

        _err(f"--plot: {MISSING}")
        return True
    return False


def run_chaos(args: argparse.Namespace) -> int:
    """``resilient chaos run``."""
    from resilient import chaos
    from resilient.chaos._experiment import load_experiment
    from resilient.chaos._runner import ExperimentRun
    from resilient.errors import ChaosRefusedError, PolicyError

    if _matplotlib_missing(args):
        return EXIT_BAD_INPUT
    try:
        experiment = load_experiment(args.experiment)
    except PolicyError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    if experiment.load.target is None and not args.dry_run:
        _err(
            f"{args.experiment}: load.target is not set: from the command line the experiment "
            "must drive its own load (module:function); to observe real traffic, run it inside "
            "the application with resilient.chaos.run_experiment()"
        )
        return EXIT_BAD_INPUT
    # load.target and rollback functions may live next to the experiment file
    where = os.path.dirname(os.path.abspath(args.experiment))
    if where not in sys.path:
        sys.path.insert(0, where)
    # the command's own process only: the faults reach the load this command drives
    chaos.enable()
    run = ExperimentRun(experiment, dry_run=args.dry_run, seed=args.seed)
    if not args.dry_run:
        run.on_progress = _Progress(_expected_duration(experiment), sys.stderr)
    began = time.monotonic()
    try:
        if args.virtual_time:
            from resilient.testing import VirtualClock

            with VirtualClock() as clock:
                result = clock.run(run.execute())
        else:
            result = asyncio.run(run.execute())
    except ChaosRefusedError as exc:
        _err(f"refused: {exc}")
        return EXIT_NOT_HELD
    except PolicyError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        result = run.result
        _err("\ninterrupted: injections stopped, rollbacks ran")
    if args.dry_run:
        print(f"dry run of {experiment.title!r}: nothing injected, nothing called")
        for line in result.plan:
            print(f"  {line}")
        refusals = {k: v for k, v in result.guards.items() if v is not None}
        for guard, why in refusals.items():
            print(f"  a real run would be refused ({guard}): {why}")
        wrote = _write_outputs(args, result)
        return wrote or (EXIT_NOT_HELD if refusals else EXIT_HELD)
    print(_summary(result))
    print(f"(ran {time.monotonic() - began:.1f} s)")
    wrote = _write_outputs(args, result)
    if wrote:
        return wrote
    return EXIT_HELD if result.status == "completed" else EXIT_NOT_HELD


def report_chaos(args: argparse.Namespace) -> int:
    """``resilient chaos report``: reports and plot from a saved journal."""
    try:
        with open(args.journal_in, encoding="utf-8") as f:
            journal = json.load(f)
    except (OSError, ValueError) as exc:
        _err(f"{args.journal_in}: cannot read the journal: {exc}")
        return EXIT_BAD_INPUT
    if not isinstance(journal, dict) or "timeline" not in journal:
        _err(f"{args.journal_in}: not a chaos experiment journal")
        return EXIT_BAD_INPUT
    if not args.report and not args.plot:
        _err("nothing to do: give --report and/or --plot")
        return EXIT_BAD_INPUT
    if _matplotlib_missing(args):
        return EXIT_BAD_INPUT
    args.journal = None
    return _write_outputs(args, journal) or (
        EXIT_HELD if journal.get("status") in {"completed", "dry_run"} else EXIT_NOT_HELD
    )


def add_chaos_parser(commands: Any) -> None:
    """Add ``chaos run`` and ``chaos report`` to the ``resilient`` command's sub-commands."""
    chaos = commands.add_parser(
        "chaos",
        help="run chaos experiments (fault injection with safety stops and reports)",
        description="Run a chaos experiment file (docs/chaos.md) and report on it. Exit "
        "status: 0 the steady state held, 1 it did not (or the run was aborted, refused or "
        "interrupted), 2 bad input.",
    )
    sub = chaos.add_subparsers(dest="chaos_command", metavar="COMMAND", title="commands")
    chaos.set_defaults(handler=lambda _args: (chaos.print_help(sys.stderr), EXIT_BAD_INPUT)[1])

    run = sub.add_parser(
        "run",
        help="run an experiment file",
        description="Validate EXPERIMENT, check its guards, drive its load (load.target), "
        "inject its faults, check the steady state before and after, always run its "
        "rollbacks, and report. Chaos is switched on in this command's process only. A "
        "progress bar and status line are shown in a terminal, plain lines otherwise.",
    )
    run.add_argument("experiment", metavar="EXPERIMENT", help="experiment file (YAML)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the plan and the guards; inject nothing, call nothing",
    )
    run.add_argument("--journal", metavar="FILE", help="write the JSON journal to FILE")
    run.add_argument(
        "--report", metavar="FILE", help="write a report: FILE.md (Markdown) or FILE.html"
    )
    run.add_argument(
        "--plot",
        metavar="FILE",
        help="write the timeline plot (PNG; needs pip install 'resilient-policies[plot]')",
    )
    run.add_argument("--seed", type=int, metavar="N", help="seed of the injections' draws")
    run.add_argument(
        "--virtual-time",
        action="store_true",
        help="run on a virtual clock (resilient.testing): minutes take milliseconds; for "
        "targets that only wait on timers (simulated dependencies), never real I/O",
    )
    run.set_defaults(handler=run_chaos)

    report = sub.add_parser(
        "report",
        help="write a report and plot from a saved journal",
        description="Read a journal written by `resilient chaos run --journal` and write the "
        "report and/or the plot again.",
    )
    report.add_argument("journal_in", metavar="JOURNAL", help="journal file (JSON)")
    report.add_argument("--report", metavar="FILE", help="FILE.md or FILE.html")
    report.add_argument("--plot", metavar="FILE", help="timeline plot (PNG)")
    report.set_defaults(handler=report_chaos)

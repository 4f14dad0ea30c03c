"""
The one command behind ``python -m benchmarks``: discover, run, tabulate.

Convention (benchmarks/README.md): a benchmark module is a file named ``bench_*.py`` or
``sim_*.py`` in ``benchmarks/`` or in one sub-directory of it (``benchmarks/adaptive/``).
It joins the table by defining::

    def run_benchmark(ctx: Context) -> Iterable[Row]: ...

``ctx.scale`` is ``"full"``, ``"quick"`` or ``"tiny"`` (``ctx.pick(full, quick, tiny)``
chooses a count), ``ctx.wants(case)`` says whether ``-k`` selects a case (skip the work of
the ones it does not), ``ctx.peer("hyx")`` imports a peer or returns ``None`` (then give
the rows ``Row.missing(...)``: they print "not installed"). A module without
``run_benchmark`` still runs (full and quick scales), as a script with ``--quick`` if it
accepts one, and its own output is printed after the table.

Every module runs in its own interpreter (``python -m benchmarks --child FILE``), so the
policies, metrics switches and event loops of one cannot leak into the next, and a crash
or a missing peer becomes rows that say so instead of ending the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
T = TypeVar("T")

# The peers of the `bench` extra, and ours; printed with their versions.
DISTRIBUTIONS = (
    "resilient-policies",
    "tenacity",
    "stamina",
    "backoff",
    "pybreaker",
    "aiobreaker",
    "circuitbreaker",
    "purgatory",
    "aiolimiter",
    "hyx",
    "nopanic",
    "pyresilience",
    "prometheus-client",
    "redis",
    "pydantic",
)
SCALES = ("full", "quick", "tiny")
MODULE_TIMEOUT = {"full": 900, "quick": 300, "tiny": 120}  # seconds per module


@dataclass
class Row:
    """One line of the table: our figure, a peer's, and the target they are held to."""

    case: str
    value: float | None
    unit: str = "ns/call"
    peer: str = ""
    peer_value: float | None = None
    max_ratio: float | None = None  # target: value / peer_value <= max_ratio
    max_value: float | None = None  # target: value <= max_value (same unit)
    status: str = "ok"  # "ok", "not installed: NAME", "error: ...", "skipped: ..."
    note: str = ""
    module: str = ""

    @classmethod
    def missing(cls, case: str, name: str, **kw: Any) -> Row:
        return cls(case, None, status=f"not installed: {name}", **kw)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.peer_value:
            return None
        return self.value / self.peer_value

    @property
    def target(self) -> str:
        if self.max_ratio is not None:
            return f"≤ {self.max_ratio:g}x"
        if self.max_value is not None:
            return f"≤ {_num(self.max_value)} {self.unit}"
        return ""

    @property
    def met(self) -> str:
        if self.status != "ok":
            return self.status
        if self.max_ratio is not None:
            ratio = self.ratio
            return "-" if ratio is None else ("met" if ratio <= self.max_ratio else "MISSED")
        if self.max_value is not None and self.value is not None:
            return "met" if self.value <= self.max_value else "MISSED"
        return "(report)"


@dataclass
class Context:
    scale: str = "full"
    k: str | None = None
    module: str = ""

    @property
    def quick(self) -> bool:
        return self.scale != "full"

    def pick(self, full: T, quick: T, tiny: T) -> T:
        return {"full": full, "quick": quick, "tiny": tiny}[self.scale]

    def wants(self, case: str) -> bool:
        """Whether ``-k`` selects *case* (a substring of the module or case name)."""
        if not self.k:
            return True
        k = self.k.lower()
        return k in self.module.lower() or k in case.lower()

    @staticmethod
    def peer(name: str) -> Any:
        """The imported peer module, or None when it is not installed."""
        try:
            return importlib.import_module(name)
        except ImportError:
            return None


# --------------------------------------------------------------------------- discovery


def discover() -> list[Path]:
    """Every benchmark module, in a stable order: top level first, then sub-directories."""
    found: list[Path] = []
    for folder in [HERE, *sorted(p for p in HERE.iterdir() if p.is_dir())]:
        if folder.name.startswith(("_", ".")):
            continue
        for pattern in ("bench_*.py", "sim_*.py"):
            found += sorted(folder.glob(pattern))
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(HERE).with_suffix("")
    return ".".join(rel.parts)


def _defines_hook(path: Path) -> bool:
    return "def run_benchmark(" in path.read_text(encoding="utf-8")


def _filters_cases(path: Path) -> bool:
    return _defines_hook(path) and "ctx.wants(" in path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- one module (child)


def run_child(path: Path, scale: str, k: str | None, out: Path) -> int:
    """Import one module and run its ``run_benchmark``; write its rows as JSON to *out*."""
    name = module_name(path)
    for extra in (str(ROOT / "tests"), str(path.parent), str(HERE), str(ROOT)):
        if extra not in sys.path:
            sys.path.insert(0, extra)
    rows: list[Row]
    try:
        module = importlib.import_module(name)
        hook: Callable[[Context], Iterable[Row]] = module.run_benchmark
        rows = list(hook(Context(scale=scale, k=k, module=name)))
    except ModuleNotFoundError as exc:
        rows = [Row(f"{name} (module)", None, status=f"not installed: {exc.name}")]
    except Exception as exc:
        traceback.print_exc()
        rows = [Row(f"{name} (module)", None, status=f"error: {type(exc).__name__}: {exc}")]
    for row in rows:
        row.module = name
    out.write_text(json.dumps([dataclasses.asdict(r) for r in rows]), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------- the parent


@dataclass
class ModuleResult:
    name: str
    rows: list[Row]
    seconds: float
    output: str = ""
    script: bool = False
    stderr: str = field(default="", repr=False)


def _run_module(path: Path, scale: str, k: str | None) -> ModuleResult:
    name = module_name(path)
    began = time.monotonic()
    timeout = MODULE_TIMEOUT[scale]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if not _defines_hook(path):
        return _run_script(path, name, scale, timeout, env, began)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "benchmarks", "--child", str(path), "--scale", scale]
        cmd += ["--child-out", str(out)]
        if k:
            cmd += ["-k", k]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
            )
        except subprocess.TimeoutExpired:
            row = Row(f"{name} (module)", None, status=f"error: timed out after {timeout} s")
            return ModuleResult(name, [row], time.monotonic() - began)
        if out.exists():
            rows = [Row(**r) for r in json.loads(out.read_text(encoding="utf-8"))]
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows = [Row(f"{name} (module)", None, status=f"error: exit {proc.returncode}: {tail}")]
    return ModuleResult(name, rows, time.monotonic() - began, stderr=proc.stderr)


def _run_script(
    path: Path, name: str, scale: str, timeout: int, env: dict[str, str], began: float
) -> ModuleResult:
    case = f"{name} (script, no run_benchmark())"
    if scale == "tiny":
        row = Row(case, None, unit="s", status="skipped: runs as a script at full/quick scale")
        return ModuleResult(name, [row], 0.0, script=True)
    cmd = [sys.executable, str(path)]
    if scale == "quick" and "--quick" in path.read_text(encoding="utf-8"):
        cmd.append("--quick")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        row = Row(case, None, unit="s", status=f"error: timed out after {timeout} s")
        return ModuleResult(name, [row], time.monotonic() - began, script=True)
    seconds = time.monotonic() - began
    status = "ok" if proc.returncode == 0 else f"error: exit {proc.returncode}"
    row = Row(case, seconds, unit="s wall", status=status, note="output below the table")
    return ModuleResult(name, [row], seconds, proc.stdout, script=True, stderr=proc.stderr)


def versions() -> dict[str, str]:
    found = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def environment_lines(scale: str) -> list[str]:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    vers = versions()
    return [
        f"Python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.platform()}; {nproc} CPUs; load average {load:.2f}; scale {scale}",
        ", ".join(f"{dist} {v}" for dist, v in vers.items()),
    ]


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render(rows: list[Row]) -> str:
    lines = [
        "| case | ours | unit | peer | peer | ratio | target | met |",
        "|---|---:|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = r.ratio
        case = r.case + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {case} | {_num(r.value)} | {r.unit} | {r.peer or '-'} | {_num(r.peer_value)} "
            f"| {'-' if ratio is None else f'{ratio:.3f}'} | {r.target or '-'} | {r.met} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run every benchmark of benchmarks/ and print one table.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run with small counts")
    parser.add_argument(
        "--iterations-scale",
        choices=SCALES,
        help="full (default); quick (= --quick); tiny (CI: smallest counts, meaningless figures)",
    )
    parser.add_argument("-k", metavar="TEXT", help="only modules or cases whose name contains TEXT")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the rows and environment to FILE"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    parser.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--scale", choices=SCALES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scale = args.scale or args.iterations_scale or ("quick" if args.quick else "full")

    if args.child:
        out = Path(args.child_out) if args.child_out else None
        return run_child(Path(args.child), scale, args.k, out or _child_out_default(args.child))

    modules = discover()
    if args.list:
        for path in modules:
            hook = "run_benchmark" if _defines_hook(path) else "script"
            print(f"{module_name(path):32} {hook}")
        return 0
    if args.k:
        k = args.k.lower()
        # A module whose name does not match still runs if it asks ctx.wants(): it may hold
        # a matching case (and skips the others); the others run only when their name matches.
        modules = [p for p in modules if k in module_name(p).lower() or _filters_cases(p)]

    began = time.monotonic()
    header = environment_lines(scale)
    for line in header:
        print(line, flush=True)
    results: list[ModuleResult] = []
    for path in modules:
        print(f"... {module_name(path)}", file=sys.stderr, flush=True)
        result = _run_module(path, scale, args.k)
        results.append(result)
    rows = [r for res in results for r in res.rows]
    if args.k:
        ctx = Context(k=args.k)
        rows = [
            r for r in rows if ctx.wants(r.module + " " + r.case) or r.status.startswith("error")
        ]
    elapsed = time.monotonic() - began
    print(f"{len(rows)} rows from {len(results)} modules in {elapsed:.0f} s\n")
    print(render(rows))
    for res in results:
        if res.script and res.output:
            print(f"\n### {res.name} (its own output)\n\n{res.output.rstrip()}")
    for res in results:
        if any(r.status.startswith("error") for r in res.rows) and res.stderr:
            print(f"\n### {res.name}: stderr\n\n{res.stderr.rstrip()[-4000:]}", file=sys.stderr)
    if args.json:
        payload = {
            "environment": header,
            "versions": versions(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "scale": scale,
            "seconds": round(elapsed, 1),
            "rows": [{**dataclasses.asdict(r), "ratio": r.ratio, "met": r.met} for r in rows],
            "modules": {res.name: round(res.seconds, 1) for res in results},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


def _child_out_default(child: str) -> Path:
    return Path(tempfile.gettempdir()) / f"bench-{Path(child).stem}-{os.getpid()}.json"

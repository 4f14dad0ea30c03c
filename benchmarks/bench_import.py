"""
Import time and import footprint: ``import resilient`` against ``import tenacity``.

Usage::

    python benchmarks/bench_import.py [--quick]

Each figure is a median over fresh interpreters, bytecode cached (see ``_env``): of
``python -X importtime -c CODE`` (the sum of the cumulative times of the top-level imports
CODE triggers), and of the wall-clock time of CODE (importtime's sums miss what runs
outside an import statement, e.g. the first access of a lazy attribute). Three codes:

* ``import resilient``: the package itself;
* ``import resilient; resilient.resilient``: plus the first use of the decorator (the
  package's attributes load on first access, PEP 562), what a program really pays;
* ``... ; resilient.load_policies({...})``: plus loading a policy.

And the optional modules that ``import resilient`` (and the first use) pulls in: none of
sklearn, redis, prometheus_client, yaml, matplotlib, httpx, uvicorn must be there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runner import ROOT, Context, Row, render

OPTIONAL = ("sklearn", "redis", "prometheus_client", "yaml", "matplotlib", "httpx", "uvicorn")
FIRST_USE = "import resilient; resilient.resilient"
LOADED = (
    FIRST_USE + "; resilient.load_policies({'version': 1, 'policies': "
    "{'p': {'retry': {}, 'circuit_breaker': {}}}})"
)


def _env() -> dict[str, str]:
    """Bytecode cached, as for an installed package (pip compiles wheels to .pyc): with
    PYTHONDONTWRITEBYTECODE set (this repository's dev shells set it) every import of the
    source tree would compile it again, while the peers in site-packages have their .pyc.
    The cache goes to a directory of its own (PYTHONPYCACHEPREFIX), not into the tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "resilient-bench-pycache")
    return env


def import_ms(code: str) -> float:
    """Milliseconds of imports that *code* triggers, from one fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=120,
        env=_env(),
    )
    total = 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        _self, cumulative, name = line.removeprefix("import time:").split("|")
        if name.startswith(" ") and not name.startswith("  ") and cumulative.strip().isdigit():
            total += int(cumulative)  # top level only: the nested ones are inside it
    return total / 1000


def wall_ms(code: str) -> float:
    """Wall-clock milliseconds of *code* in one fresh interpreter (after its start-up)."""
    timed = (
        f"import time as _t; _t0 = _t.perf_counter()\n{code}\n"
        "print((_t.perf_counter() - _t0) * 1e3)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", timed],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=120,
        env=_env(),
    )
    return float(proc.stdout.split()[-1])


def median_wall_ms(code: str, runs: int) -> float:
    wall_ms(code)  # the first run writes the bytecode cache
    return statistics.median(wall_ms(code) for _ in range(runs))


def median_ms(code: str, runs: int) -> float:
    import_ms(code)  # the first run writes the bytecode cache
    return statistics.median(import_ms(code) for _ in range(runs))


def pulled(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    return [m for m in out.split(",") if m]


def run_benchmark(ctx: Context) -> list[Row]:
    """The rows of ``python -m benchmarks`` (benchmarks/README.md)."""
    runs = ctx.pick(15, 5, 2)
    rows: list[Row] = []
    if ctx.wants("import time"):
        note = f"median of {runs} interpreters"
        tenacity = median_ms("import tenacity", runs)
        rows.append(Row("import time, import resilient (-X importtime)",
                        median_ms("import resilient", runs), "ms", "import tenacity", tenacity,
                        max_ratio=2.0, note=note))  # fmt: skip
        tenacity = median_wall_ms("import tenacity", runs)
        for case, code, target in (
            ("import time, import resilient (wall)", "import resilient", 2.0),
            ("import time, import + first use of the decorator (wall)", FIRST_USE, None),
            ("import time, import + decorator + load_policies (wall)", LOADED, None),
        ):
            ours = median_wall_ms(code, runs)
            rows.append(Row(case, ours, "ms", "import tenacity", tenacity, max_ratio=target,
                            note=note))  # fmt: skip
    if ctx.wants("optional modules"):
        for case, code, limit in (
            ("optional modules pulled by import resilient", "import resilient", 0),
            ("optional modules pulled by import + decorator + load_policies", LOADED, None),
        ):
            found = pulled(code)
            rows.append(Row(case, len(found), "modules", max_value=limit,
                            note=", ".join(found) or "none"))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--quick", action="store_true", help="5 interpreters per figure")
    args = parser.parse_args(argv)
    ctx = Context(scale="quick" if args.quick else "full", module="bench_import")
    print(render(run_benchmark(ctx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

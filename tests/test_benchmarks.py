"""The benchmarks never rot: `python -m benchmarks` runs every one at the tiniest scale.

No figure is asserted (timings on a CI machine mean nothing); what is asserted is that
every case is in the table and that no module crashed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent

# One case (a prefix of the case name) per kind of row, from every module of ours.
EXPECTED_CASES = {
    "bench_foundation": ["1. retry-only success, sync", "3. breaker-only success, async",
                         "4. rejection while open", "5. async failure",
                         "6. 8 threads x 50 ms"],
    "bench_isolation": ["bulkhead layer (fixed limit)", "rate-limit layer"],
    "bench_metrics": ["metrics on, full stack, sync", "metrics on, full stack, async"],
    "bench_health": ["health: on, full stack, sync", "health: on, full stack, async"],
    "bench_redis": ["Redis backend, closed breaker", "Redis backend, breaker + rate limit",
                    "fleet convergence p99"],
    "bench_stack": ["full async stack, metrics on", "full sync stack, metrics on",
                    "ablation, async: + metrics", "ablation, sync: + bulkhead",
                    "throughput, full async stack, 1000 tasks",
                    "throughput, full sync stack, 8 threads"],
    "bench_import": ["import time, import resilient", "import time, import + first use",
                     "optional modules pulled by import resilient"],
    "bench_memory": ["memory per policy, every section (tracemalloc)",
                     "memory per policy, every section (RSS)", "memory retained after",
                     "memory per distinct policy, every section (tracemalloc)",
                     ],
    "sim_autoscaling": ["auto-scaling bulkhead, healthy,"],
}  # fmt: skip


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_runner", ROOT / "benchmarks/_runner.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, object]]:
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--iterations-scale", "tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_every_case_is_in_the_table_and_nothing_crashed(
    tiny_run: tuple[str, dict[str, object]],
) -> None:
    stdout, data = tiny_run
    rows = data["rows"]
    assert isinstance(rows, list)
    crashed = [
        (r["module"], r["case"], r["status"]) for r in rows if r["status"].startswith("error")
    ]
    assert crashed == []
    for module, cases in EXPECTED_CASES.items():
        mine = [r for r in rows if r["module"] == module]
        if len(mine) == 1 and mine[0]["status"].startswith("not installed"):
            continue  # a peer the module imports at the top is missing: said so, not crashed
        names = [r["case"] for r in mine]
        for case in cases:
            assert any(name.startswith(case) for name in names), (module, case, names)
    # The one table, with its header and the environment above it.
    assert "| case | ours | unit | peer | peer | ratio | target | met |" in stdout
    assert stdout.startswith("Python 3.")
    assert "CPUs" in stdout.splitlines()[0]
    assert "tenacity " in stdout.splitlines()[1]


def test_rows_with_a_value_and_a_target_have_a_verdict(
    tiny_run: tuple[str, dict[str, object]],
) -> None:
    _stdout, data = tiny_run
    rows = data["rows"]
    assert isinstance(rows, list)
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["value"] is not None, r
        if r["max_ratio"] is not None and r["peer_value"]:
            assert r["met"] in ("met", "MISSED"), r


def test_list_names_every_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    listed = {line.split()[0] for line in out.splitlines()}
    assert set(EXPECTED_CASES) <= listed


def test_verdicts() -> None:
    runner = _runner()
    row = runner.Row("x", 50.0, peer="p", peer_value=100.0, max_ratio=0.4)
    assert row.ratio == 0.5
    assert row.met == "MISSED"
    assert runner.Row("x", 30.0, peer="p", peer_value=100.0, max_ratio=0.4).met == "met"
    assert runner.Row("x", 5.0, "B", max_value=10.0).met == "met"
    assert runner.Row("x", 50.0, "B", max_value=10.0).met == "MISSED"
    assert runner.Row("x", 1.0).met == "(report)"
    assert runner.Row.missing("x", "hyx").met == "not installed: hyx"
    assert runner.Context.peer("no_such_peer_module_here") is None


def test_k_selects_cases() -> None:
    ctx = _runner().Context(k="ablation", module="bench_stack")
    assert ctx.wants("ablation, async: + bulkhead")
    assert not ctx.wants("full async stack, metrics on")
    assert _runner().Context(k="stack", module="bench_stack").wants("anything")

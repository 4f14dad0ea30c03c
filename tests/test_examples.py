"""The runnable examples in examples/ run to completion (in memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("script", [pytest.param(s, id=s.name) for s in SCRIPTS])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    """Each example exits 0 within 60 s, printing what it promises."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENCE_")}
    env["PYTHONPATH"] = str(EXAMPLES.parent)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_quickstart_output() -> None:
    """The manager quickstart shows the rows and the health check's answer."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "manager_quickstart.py")],
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "rows: [(1,)]" in result.stdout
    assert "run_health_check: healthy" in result.stdout


def test_metrics_example_output() -> None:
    """The metrics example scrapes its own counters over HTTP."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "metrics_server.py")],
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert 'resilient_calls_total{outcome="success",policy="broker"} 2.0' in result.stdout
    assert 'resilient_retry_attempts_total{policy="broker"} 1.0' in result.stdout
    assert 'resilient_calls_total{outcome="success",policy="database"} 1.0' in result.stdout

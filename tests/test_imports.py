"""Importing resilient is light: no optional dependency is loaded until it is used."""

from __future__ import annotations

import subprocess
import sys

import pybreaker

from resilient import breaker


def test_import_loads_no_optional_dependency() -> None:
    """`import resilient` leaves redis, prometheus, yaml, sklearn and hypothesis alone."""
    code = (
        "import sys, resilient\n"
        "heavy = ['redis', 'prometheus_client', 'yaml', 'sklearn', 'hypothesis', 'pybreaker']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_state_names_match_pybreaker() -> None:
    """Our state names are pybreaker's (we do not import it eagerly to read them)."""
    assert breaker.STATE_CLOSED == pybreaker.STATE_CLOSED
    assert breaker.STATE_OPEN == pybreaker.STATE_OPEN
    assert breaker.STATE_HALF_OPEN == pybreaker.STATE_HALF_OPEN

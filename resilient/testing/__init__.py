"""
Test your policies like code: virtual time, a simulator, Hypothesis strategies
and a pytest plugin.

    from resilient.testing import VirtualClock, outage, simulate

    result = simulate("broker", outage(start=30, duration=60), duration=120, seed=1)
    assert result.backend_calls_by_state.get("open", 0) == 0

The Hypothesis strategies (:func:`policies`, :func:`failure_sequences`,
:func:`scenarios`) and :func:`load_hypothesis_profile` need ``hypothesis``
installed; they are imported on first use, so the rest of this package works
without it. The pytest plugin (fixtures ``virtual_clock``, ``policy_registry``,
``captured_events``, ``redis_server``) is registered by the package's
``pytest11`` entry point. See docs/testing.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resilient.testing._helpers import CapturedEvents as CapturedEvents
from resilient.testing._helpers import IsolatedRegistry as IsolatedRegistry
from resilient.testing._helpers import capture_events as capture_events
from resilient.testing._helpers import isolated_registry as isolated_registry
from resilient.testing._helpers import testing_mode as testing_mode
from resilient.testing._scenario import Conditions as Conditions
from resilient.testing._scenario import Latency as Latency
from resilient.testing._scenario import Phase as Phase
from resilient.testing._scenario import Scenario as Scenario
from resilient.testing._scenario import SimulatedError as SimulatedError
from resilient.testing._scenario import brownout as brownout
from resilient.testing._scenario import compose as compose
from resilient.testing._scenario import errors_ramp as errors_ramp
from resilient.testing._scenario import flapping as flapping
from resilient.testing._scenario import healthy as healthy
from resilient.testing._scenario import healthy_noisy as healthy_noisy
from resilient.testing._scenario import latency_creep as latency_creep
from resilient.testing._scenario import load_spike as load_spike
from resilient.testing._scenario import outage as outage
from resilient.testing._simulate import LatencySummary as LatencySummary
from resilient.testing._simulate import SecondStats as SecondStats
from resilient.testing._simulate import SimulationResult as SimulationResult
from resilient.testing._simulate import Transition as Transition
from resilient.testing._simulate import simulate as simulate
from resilient.testing._steps import ScriptedBackend as ScriptedBackend
from resilient.testing._steps import Step as Step
from resilient.testing._virtual import VirtualClock as VirtualClock
from resilient.testing._virtual import VirtualTimeEventLoop as VirtualTimeEventLoop

if TYPE_CHECKING:
    from resilient.testing._strategies import circuit_breaker_configs as circuit_breaker_configs
    from resilient.testing._strategies import failure_sequences as failure_sequences
    from resilient.testing._strategies import load_hypothesis_profile as load_hypothesis_profile
    from resilient.testing._strategies import policies as policies
    from resilient.testing._strategies import retry_configs as retry_configs
    from resilient.testing._strategies import scenarios as scenarios
    from resilient.testing._strategies import timeout_configs as timeout_configs

__all__ = (
    # virtual time
    "VirtualClock",
    "VirtualTimeEventLoop",
    # simulation
    "simulate",
    "SimulationResult",
    "SecondStats",
    "Transition",
    "LatencySummary",
    "Scenario",
    "Phase",
    "Conditions",
    "Latency",
    "SimulatedError",
    "compose",
    "healthy",
    "healthy_noisy",
    "outage",
    "brownout",
    "latency_creep",
    "load_spike",
    "errors_ramp",
    "flapping",
    # scripted backends
    "Step",
    "ScriptedBackend",
    # helpers
    "testing_mode",
    "capture_events",
    "CapturedEvents",
    "isolated_registry",
    "IsolatedRegistry",
    # hypothesis (imported on first use)
    "policies",
    "retry_configs",
    "circuit_breaker_configs",
    "timeout_configs",
    "failure_sequences",
    "scenarios",
    "load_hypothesis_profile",
)

_LAZY = frozenset(
    {
        "policies",
        "retry_configs",
        "circuit_breaker_configs",
        "timeout_configs",
        "failure_sequences",
        "scenarios",
        "load_hypothesis_profile",
    }
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from resilient.testing import _strategies

        return getattr(_strategies, name)
    msg = f"module 'resilient.testing' has no attribute {name!r}"
    raise AttributeError(msg)

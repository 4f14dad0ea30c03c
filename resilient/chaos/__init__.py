"""
Chaos engineering: inject faults into the pipeline, under guards.

Injection (:mod:`resilient.chaos._inject`): the ``chaos:`` policy section and
:func:`inject` put faults innermost in the attempts of a policy, so breakers,
retries, timeouts and health react as to real faults. Nothing is injected unless
chaos is switched on (:func:`enable`, ``RESILIENCE_CHAOS_ENGINEERING_ENABLED`` or
a manager with ``chaos_engineering_enabled=True``), never in production unless
an injection allows it, and :func:`emergency_stop` halts everything at once.
"""

from __future__ import annotations

import importlib
from typing import Any

from resilient.chaos._inject import FAILURE_MODES as FAILURE_MODES
from resilient.chaos._inject import SKIPPED as SKIPPED
from resilient.chaos._inject import ChaosStage as ChaosStage
from resilient.chaos._inject import CohortStats as CohortStats
from resilient.chaos._inject import Fault as Fault
from resilient.chaos._inject import Injection as Injection
from resilient.chaos._inject import active_injections as active_injections
from resilient.chaos._inject import allow as allow
from resilient.chaos._inject import allowed as allowed
from resilient.chaos._inject import check_modes as check_modes
from resilient.chaos._inject import disable as disable
from resilient.chaos._inject import disallow as disallow
from resilient.chaos._inject import emergency_stop as emergency_stop
from resilient.chaos._inject import enable as enable
from resilient.chaos._inject import enabled as enabled
from resilient.chaos._inject import environment as environment
from resilient.chaos._inject import faults_from_config as faults_from_config
from resilient.chaos._inject import inject as inject
from resilient.chaos._inject import is_production as is_production
from resilient.chaos._inject import is_stopped as is_stopped
from resilient.chaos._inject import known_targets as known_targets
from resilient.chaos._inject import register_target as register_target
from resilient.chaos._inject import resume as resume
from resilient.chaos._inject import set_check_interval as set_check_interval
from resilient.chaos._inject import set_environment as set_environment
from resilient.chaos._inject import stop_all as stop_all
from resilient.chaos._inject import stop_reason as stop_reason
from resilient.errors import ChaosError as ChaosError
from resilient.errors import ChaosRefusedError as ChaosRefusedError
from resilient.errors import ChaosTimeoutError as ChaosTimeoutError

_INJECTION_API = [
    "FAILURE_MODES",
    "SKIPPED",
    "ChaosError",
    "ChaosRefusedError",
    "ChaosStage",
    "ChaosTimeoutError",
    "CohortStats",
    "Fault",
    "Injection",
    "active_injections",
    "allow",
    "allowed",
    "check_modes",
    "disable",
    "disallow",
    "emergency_stop",
    "enable",
    "enabled",
    "environment",
    "faults_from_config",
    "inject",
    "is_production",
    "is_stopped",
    "known_targets",
    "register_target",
    "resume",
    "set_check_interval",
    "set_environment",
    "stop_all",
    "stop_reason",
]

# ---- H2: experiments (lazy) ------------------------------------------------------
# resilient.pipeline imports resilient.chaos._inject, which runs this file: the
# experiment half (which reaches the decorator, the manager and health) must be
# imported lazily, here, by name -> module.
_LAZY: dict[str, str] = {
    "Experiment": "resilient.chaos._experiment",
    "load_experiment": "resilient.chaos._experiment",
    "ExperimentResult": "resilient.chaos._runner",
    "ExperimentRun": "resilient.chaos._runner",
    "ProbeResult": "resilient.chaos._runner",
    "Sample": "resilient.chaos._runner",
    "run_experiment": "resilient.chaos._runner",
    "Schedule": "resilient.chaos._schedule",
    "schedule": "resilient.chaos._schedule",
    "render_html": "resilient.chaos._report",
    "render_markdown": "resilient.chaos._report",
    "write_journal": "resilient.chaos._report",
    "write_report": "resilient.chaos._report",
    "write_plot": "resilient.chaos._plot",
}
# ---- end of H2's region ------------------------------------------------------------

__all__ = sorted([*_INJECTION_API, *_LAZY])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'resilient.chaos' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

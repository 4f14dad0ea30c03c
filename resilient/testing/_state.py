"""
The per-name runtime state of the strategies (breakers, bulkheads, rate
limiters, retry budgets), set aside and put back as a whole.

Each of these objects reads its clock from :mod:`resilient._clock` when it is
made and is shared by name, so code under a virtual clock, or in an isolated
registry, needs tables of its own. The tables are private to their modules;
this is the one place that knows them, and it skips any that a version of the
library does not have.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

__all__ = ["fresh_state"]

#: (module, attribute path) of every by-name table of runtime state.
STATE_TABLES: tuple[tuple[str, str], ...] = (
    ("resilient.pipeline", "_breakers"),
    ("resilient.bulkhead", "bulkhead_manager._bulkheads"),
    ("resilient.ratelimit", "_limiters"),
    ("resilient.budget", "_budgets"),
)


def _tables() -> list[dict[Any, Any]]:
    found = []
    for module_name, path in STATE_TABLES:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, dict):
            found.append(obj)
    return found


@contextlib.contextmanager
def fresh_state() -> Iterator[None]:
    """Empty every state table for the block; restore their contents after it."""
    from resilient.policy import registry

    saved = [(table, dict(table)) for table in _tables()]
    for table, _ in saved:
        table.clear()
    registry.touch()  # pipelines re-read their shared objects at the next call
    try:
        yield
    finally:
        for table, contents in saved:
            table.clear()
            table.update(contents)
        registry.touch()

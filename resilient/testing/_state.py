"""
The per-name runtime state of the strategies (breakers, bulkheads, rate
limiters, retry budgets), set aside and put back as a whole.

Each of these objects reads its clock from :mod:`resilient._clock` when it is
made and is shared by name, so code under a virtual clock, or in an isolated
registry, needs tables of its own. They all live in
``resilient._shared.TABLES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["fresh_state"]


@contextlib.contextmanager
def fresh_state() -> Iterator[None]:
    """Empty every table of shared runtime state for the block; restore them after it."""
    from resilient import _shared, pipeline  # noqa: F401 - importing makes the tables
    from resilient.policy import registry

    saved = [(table, table.all()) for table in _shared.TABLES]
    for table, _ in saved:
        table.clear()
    registry.touch()  # pipelines re-read their shared objects at the next call
    try:
        yield
    finally:
        for table, contents in saved:
            table.clear()
            table.items.update(contents)
        registry.touch()

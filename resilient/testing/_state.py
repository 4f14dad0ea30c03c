"""
The per-name runtime state of the strategies (breakers, bulkheads, rate
limiters, retry budgets), set aside and put back as a whole.

Each of these objects reads its clock from :mod:`resilient._clock` when it is
made and is shared by name, so code under a virtual clock, or in an isolated
registry, needs objects of its own. :meth:`resilient.runtime.Runtime.snapshot`
and :meth:`~resilient.runtime.Runtime.restore` do the bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["fresh_state"]


@contextlib.contextmanager
def fresh_state() -> Iterator[None]:
    """Empty every table of shared runtime state for the block; restore them after it."""
    from resilient.runtime import runtime

    saved = runtime.snapshot()
    runtime.clear_shared()  # pipelines re-read their shared objects at the next call
    try:
        yield
    finally:
        runtime.restore(saved)

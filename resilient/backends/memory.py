"""
The in-memory backend, the default: every process keeps its breakers to itself.

A member without a link runs entirely on its own state; this backend gives none,
so the in-memory breaker is exactly the breaker of :mod:`resilient.breaker` with
nothing added on any path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, overload

from resilient.backends._config import BackendConfig

if TYPE_CHECKING:
    from resilient.backends.protocol import (
        BreakerLink,
        BreakerMember,
        BudgetLink,
        BudgetMember,
        FleetMember,
        LeaseSource,
        LimiterMember,
    )

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """No server, no threads: state lives in the members of this process."""

    name = "memory"

    def __init__(self, config: BackendConfig | None = None) -> None:
        self.config = config if config is not None else BackendConfig()

    @overload
    def attach(self, member: BreakerMember) -> BreakerLink | None: ...
    @overload
    def attach(self, member: BudgetMember) -> BudgetLink | None: ...
    @overload
    def attach(self, member: LimiterMember) -> LeaseSource | None: ...

    def attach(self, member: FleetMember) -> BreakerLink | BudgetLink | LeaseSource | None:
        """Nothing to attach: the breaker, budget or limiter stays local."""
        return None

    def status(self) -> dict[str, Any]:
        """Always up: ``{"backend": "memory", "up": True, "state": "up"}``."""
        return {"backend": self.name, "up": True, "state": "up"}

    def close(self) -> None:
        """Nothing to stop."""

    def chaos_stop(self, reason: str | None) -> None:
        """No fleet: a chaos emergency stop stays in this process."""

    def chaos_stopped(self) -> str | None:
        """No fleet: never stopped from outside."""
        return None

    def __repr__(self) -> str:
        return "<MemoryBackend>"

"""
The in-memory backend, the default: every process keeps its breakers to itself.

A breaker without a link runs entirely on its own counters; this backend gives
none, so the in-memory breaker is exactly the breaker of :mod:`resilient.breaker`
with nothing added on any path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from resilient.backends._config import BackendConfig

if TYPE_CHECKING:
    from resilient.backends import BreakerLink, BudgetLink, LeaseSource
    from resilient.breaker import CircuitBreaker
    from resilient.budget import RetryBudget
    from resilient.ratelimit import RateLimiter

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """No server, no threads: state lives in the breaker objects of this process."""

    name = "memory"

    def __init__(self, config: BackendConfig | None = None) -> None:
        self.config = config if config is not None else BackendConfig()

    def attach(self, breaker: CircuitBreaker) -> BreakerLink | None:
        """Nothing to attach: the breaker is local."""
        return None

    def attach_budget(self, budget: RetryBudget) -> BudgetLink | None:
        """Nothing to attach: the retry budget is local."""
        return None

    def attach_limiter(self, limiter: RateLimiter) -> LeaseSource | None:
        """Nothing to attach: the rate limiter is local."""
        return None

    def close(self) -> None:
        """Nothing to stop."""

    def __repr__(self) -> str:
        return "<MemoryBackend>"

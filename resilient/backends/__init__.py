"""
State backends: where circuit breakers keep the state they share.

* :mod:`resilient.backends.memory` (the default): every process on its own, no server.
* :mod:`resilient.backends.redis`: one breaker state, fleet-wide half-open trial
  permits, an aggregated failure-rate window, one retry budget and one rate limit for
  every process that points at the same Redis (see docs/distributed.md).

The backend is chosen, first match wins, by :func:`configure` (what the manager's
``redis_url`` calls), ``RESILIENCE_REDIS_URL``, then ``redis_url:`` (and ``backend:``)
at the top level of the policy file. Pipelines ask :func:`current` when they are
built, so a change takes effect at the next call, like a policy reload.

redis is imported only when a Redis backend is actually built.
"""

from __future__ import annotations

from typing import Any

from resilient.backends._config import BackendConfig, OnBackendFailure, redact_url
from resilient.backends.protocol import (
    Backend,
    BreakerBackend,
    BreakerLink,
    BreakerMember,
    BudgetLink,
    BudgetMember,
    FleetMember,
    LeaseSource,
    LimiterMember,
    SharedState,
    same_backend,
)

__all__ = [
    "Backend",
    "BackendConfig",
    "BreakerBackend",
    "BreakerLink",
    "BreakerMember",
    "BudgetLink",
    "BudgetMember",
    "FleetMember",
    "LeaseSource",
    "LimiterMember",
    "OnBackendFailure",
    "SharedState",
    "configure",
    "current",
    "redact_url",
    "reset",
    "same_backend",
]


def configure(
    redis_url: str | None = None, *, config: BackendConfig | None = None, **options: Any
) -> BreakerBackend:
    """
    Choose the process's state backend explicitly (wins over the environment and the file).

    Args:
        redis_url: ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS),
            ``unix:///path/redis.sock``; add ``?cluster=true`` (or ``cluster=True``) for
            Redis Cluster. ``None`` selects the in-memory backend.
        config: A complete :class:`BackendConfig` instead of *redis_url* and *options*.
        options: Any other :class:`BackendConfig` field (``socket_timeout``,
            ``flush_interval``, ``on_backend_failure``, ``key_prefix``, ...).

    Returns:
        The backend now in use. Every decorated function, already called or not,
        uses it from its next call on (its breaker, budget and limiter are re-made
        on it: their local counters start afresh; the shared state is kept).
    """
    from resilient.runtime import runtime  # the runtime owns the choice

    cfg = config if config is not None else BackendConfig(redis_url=redis_url, **options)
    runtime.configure_backend(cfg)
    return runtime.backend()


def reset() -> None:
    """Forget :func:`configure` and stop the active backend's threads (tests, shutdown)."""
    from resilient.runtime import runtime

    runtime.reset_backend()


def current() -> BreakerBackend:
    """The backend that new breakers use (built on first use, kept while its settings hold)."""
    from resilient.runtime import runtime

    return runtime.backend()

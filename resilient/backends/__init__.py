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

import os
import threading
from typing import TYPE_CHECKING, Any, Protocol

from resilient.backends._config import BackendConfig, OnBackendFailure

if TYPE_CHECKING:
    from resilient.breaker import CircuitBreaker
    from resilient.budget import RetryBudget
    from resilient.ratelimit import RateLimiter

__all__ = [
    "BackendConfig",
    "BreakerBackend",
    "BreakerLink",
    "BudgetLink",
    "LeaseSource",
    "OnBackendFailure",
    "configure",
    "current",
    "reset",
    "same_backend",
]

ENV_REDIS_URL = "RESILIENCE_REDIS_URL"


class BreakerLink(Protocol):
    """
    What a breaker talks to when its state is shared (private protocol).

    The breaker never calls the link on the success path of a closed breaker.
    ``transitioned``, ``trial_result`` and ``release_permit`` are called with the
    breaker's lock held and must not block (they queue work for a background
    thread); ``trial_permit`` is called without the lock and may do one short
    round trip.
    """

    known_gen: int
    known_state: str
    usable: bool

    def transitioned(self, old: str, new: str) -> None: ...

    def trial_permit(self) -> bool | None:
        """``True``: a fleet-wide trial permit; ``False``: refused; ``None``: no backend."""

    def trial_result(self, success: bool) -> None: ...

    def release_permit(self) -> None: ...


class BudgetLink(Protocol):
    """
    What a retry budget talks to when it is shared (private protocol).

    Deposits are never sent by the caller: the backend reads the budget's call count
    in the background. ``withdraw`` runs on the failure path only.
    """

    usable: bool

    def withdraw(self) -> bool | None:
        """``True``/``False``: the fleet's answer; ``None``: decide with the local bucket."""


class LeaseSource(Protocol):
    """
    Where a rate limiter leases batches of calls from (private protocol).

    ``lease`` is one round trip bounded by the client timeout; ``wake`` asks the
    backend's thread to top the lease up in the background (never blocks).
    """

    usable: bool
    fallback: OnBackendFailure
    timeout: float

    def lease(self, want: int) -> tuple[int, int, float] | None:
        """``(granted, batch, seconds until the fleet has a token)``; ``None``: backend down."""

    def wake(self) -> None: ...


class BreakerBackend(Protocol):
    """A state backend (private protocol): gives each breaker, budget and limiter its link."""

    name: str
    config: BackendConfig

    def attach(self, breaker: CircuitBreaker) -> BreakerLink | None: ...

    def attach_budget(self, budget: RetryBudget) -> BudgetLink | None: ...

    def attach_limiter(self, limiter: RateLimiter) -> LeaseSource | None: ...

    def close(self) -> None: ...


def same_backend(a: BreakerBackend | None, b: BreakerBackend) -> bool:
    """Whether state made for backend *a* can be kept under *b* (same object, or both memory)."""
    return a is b or (a is not None and a.name == b.name == "memory")


_lock = threading.Lock()
_explicit: BackendConfig | None = None
_active: BreakerBackend | None = None


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
        The backend now in use. Breakers are re-created on the next call of each
        pipeline (their local counters start afresh; the shared state is kept).
    """
    global _explicit
    cfg = config if config is not None else BackendConfig(redis_url=redis_url, **options)
    with _lock:
        _explicit = cfg
    _touch()
    return current()


def reset() -> None:
    """Forget :func:`configure` and stop the active backend's threads (tests, shutdown)."""
    global _explicit, _active
    with _lock:
        _explicit = None
        active, _active = _active, None
    if active is not None:
        active.close()
    _touch()


def _touch() -> None:
    from resilient.policy import registry

    registry.touch()


def _resolve() -> BackendConfig:
    if _explicit is not None:
        return _explicit
    from resilient.policy import registry

    file_cfg: BackendConfig | None = getattr(registry, "fleet", None)
    env_url = os.environ.get(ENV_REDIS_URL, "").strip()
    if env_url:
        base = file_cfg if file_cfg is not None else BackendConfig()
        return base.model_copy(update={"redis_url": env_url})
    return file_cfg if file_cfg is not None else BackendConfig()


def current() -> BreakerBackend:
    """The backend that new breakers use (built on first use, kept while its settings hold)."""
    global _active
    cfg = _resolve()
    active = _active
    if active is not None and active.config == cfg:
        return active
    with _lock:
        active = _active
        if active is not None and active.config == cfg:
            return active
        if cfg.redis_url:
            from resilient.backends.redis import RedisBackend

            new: BreakerBackend = RedisBackend(cfg)
        else:
            from resilient.backends.memory import MemoryBackend

            new = MemoryBackend(cfg)
        _active = new
    if active is not None:
        active.close()
    return new

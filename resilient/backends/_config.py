"""
Settings of the state backend (``redis_url:`` and ``backend:`` in a policy file).

This module imports nothing from redis: ``import resilient`` must stay free of it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BackendConfig", "OnBackendFailure"]

OnBackendFailure = Literal["local", "open", "closed"]

_Seconds = Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)]
_Share = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class BackendConfig(BaseModel):
    """
    Where the fleet state lives, and how the process behaves when it is unreachable.

    ``redis_url`` unset means the in-memory backend (every process on its own).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str | None = None
    """``redis://``, ``rediss://`` (TLS), ``unix://`` or a cluster node's URL; ``None``: memory."""
    cluster: bool = False
    """Use Redis Cluster (``redis.cluster.RedisCluster``); also ``?cluster=true`` in the URL."""
    key_prefix: Annotated[str, Field(min_length=1, pattern=r"^[^{}\s]+$")] = "resilient"
    """Prefix of every key and of the pub/sub channel; several applications can share one Redis."""
    socket_timeout: _Seconds = 0.05
    """Seconds a Redis command may take before the process carries on without Redis."""
    connect_timeout: _Seconds = 0.1
    """Seconds to establish a connection."""
    flush_interval: _Seconds = 0.2
    """How often local call counts are flushed (pipelined) to the fleet window."""
    reconcile_interval: _Seconds = 1.0
    """How often an idle breaker re-reads the shared state (for missed pub/sub messages)."""
    heartbeat_ttl: _Seconds = 10.0
    """A replica that has not flushed for this long is no longer listed as seen."""
    max_reconnect_delay: _Seconds = 0.5
    """Cap of the exponential back-off between reconnection attempts."""
    on_backend_failure: OnBackendFailure = "local"
    """While Redis is unreachable: ``local`` = each process decides alone (its own breaker, retry
    budget and rate limiter); ``open`` = reject every call (and every retry); ``closed`` = let
    every call (and every retry) through."""
    lease_ttl: _Seconds = 1.0
    """Rate-limit and retry-budget tokens that a process leased from the fleet and left unused
    for this long are given back to the fleet's bucket."""
    fallback_rate_share: _Share = 1.0
    """While Redis is unreachable (``on_backend_failure: local``), each process admits this
    share of a policy's ``rate_limit.max_rate``: 1.0 = the whole limit per process (the fleet
    may then admit replicas x the limit); 1/replicas keeps the fleet within the limit."""

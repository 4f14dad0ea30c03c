"""
Settings of the state backend (``redis_url:`` and ``backend:`` in a policy file).

``redis_url`` is checked when the settings are built (a policy file, the
environment, :func:`resilient.backends.configure`): a URL that redis-py would
refuse, or a Redis URL without redis-py installed, is a validation error then,
never an error inside a call. :func:`redact_url` is how every message, log line
and status shows a URL: without its credentials.

This module imports nothing from redis at import time: ``import resilient`` must
stay free of it (redis-py is imported to check a ``redis_url`` that is set).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ENV_REDIS_URL",
    "BackendConfig",
    "OnBackendFailure",
    "RedisUrl",
    "redact_url",
    "split_cluster",
    "valid_redis_url",
]

OnBackendFailure = Literal["local", "open", "closed"]

_Seconds = Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)]
_Share = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]

INSTALL_HINT = "pip install 'resilient-policies[redis]'"
#: The environment variable that chooses the Redis backend (over the policy file).
ENV_REDIS_URL = "RESILIENCE_REDIS_URL"
_SCHEMES = ("redis", "rediss", "unix")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

# --------------------------------------------------------------------------- redaction

#: Query parameters whose value is (or may be) a secret. redis-py passes every
#: query parameter on to the connection, so anything naming a credential counts.
_SECRET_PARAM = re.compile(r"pass|user|secret|token|auth|cred|key", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact_url(url: str) -> str:
    """
    *url* without credentials, for messages, logs and status: the user info
    (``user:password@``) becomes ``***@`` and the value of every query parameter
    that names a credential (``password``, ``username``, ``ssl_password`` ...)
    becomes ``***``. Never raises, even for a URL that does not parse.

    Args:
        url: A Redis URL, well-formed or not.

    Returns:
        The URL to show.
    """
    match = _SCHEME.match(url)
    start = match.end() if match else 0
    query_at = min((i for i in (url.find("?", start), url.find("#", start)) if i >= 0), default=-1)
    authority_end = len(url) if query_at < 0 else query_at
    at = url.rfind("@", start, authority_end)
    head = url[:start] + (
        "***@" + url[at + 1 : authority_end] if at >= 0 else url[start:authority_end]
    )
    if query_at < 0:
        return head
    rest = url[query_at:]
    fragment = ""
    if rest.startswith("?") and "#" in rest:
        rest, fragment = rest.split("#", 1)
        fragment = "#***" if fragment else "#"
    if not rest.startswith("?"):
        return head + "#***"
    parts = []
    for item in rest[1:].split("&"):
        key, eq, _value = item.partition("=")
        if eq and _SECRET_PARAM.search(unquote(key)):
            parts.append(f"{key}=***")
        else:
            parts.append(item)
    return f"{head}?{'&'.join(parts)}{fragment}"


# --------------------------------------------------------------------------- validation


def split_cluster(url: str, cluster: bool = False) -> tuple[str, bool]:
    """
    Remove our ``cluster=`` query parameter (redis-py does not know it) from *url*.

    Returns:
        The URL for redis-py (otherwise unchanged), and whether it names a Redis
        Cluster (*cluster*, or ``?cluster=true``).

    Raises:
        ValueError: ``cluster=`` is not a boolean.
    """
    base, sep, query = url.partition("?")
    if not sep:
        return url, cluster
    query, hash_, fragment = query.partition("#")
    kept = []
    for item in query.split("&"):
        key, _eq, value = item.partition("=")
        if unquote(key) != "cluster":
            kept.append(item)
            continue
        flag = unquote(value).lower()
        if flag in _TRUE:
            cluster = True
        elif flag in _FALSE:
            cluster = False
        else:
            msg = f"cluster={value!r} in the URL must be true or false"
            raise ValueError(msg)
    rebuilt = base + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return rebuilt, cluster


@functools.lru_cache(maxsize=64)
def valid_redis_url(value: str | None) -> str | None:
    """
    *value* stripped (``None`` for an empty one) after checking it is a Redis URL
    redis-py can use; the one check behind every ``redis_url`` setting.

    Raises:
        ValueError: Not a usable Redis URL, or redis-py is not installed (the
            message names the extra and never shows a password).
    """
    if value is not None:
        value = value.strip()
        if not value:
            return None
        _check_url(value)
    return value


#: A ``redis_url`` field: validated like :class:`BackendConfig`'s.
RedisUrl = Annotated[str | None, AfterValidator(valid_redis_url)]


def _check_url(url: str) -> None:
    """Raise ``ValueError`` (naming the redacted URL) unless redis-py can use *url*."""
    shown = redact_url(url)
    lowered = url.lower()
    if "://" not in url or not lowered.startswith(tuple(f"{s}://" for s in _SCHEMES)):
        scheme = url.split("://", 1)[0] if "://" in url else None
        if scheme is None:
            msg = (
                f"{shown!r} has no scheme: write redis://host:port/db "
                "(rediss:// for TLS, unix:///path/to/redis.sock)"
            )
        else:
            msg = f"{shown!r}: unknown scheme {scheme!r}; use redis://, rediss:// (TLS) or unix://"
        raise ValueError(msg)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number or out of range
        stripped, _cluster = split_cluster(url)
    except ValueError as exc:
        msg = f"{shown!r} does not parse: {exc}"
        raise ValueError(msg) from None
    if parts.scheme.lower() == "unix":
        if not parts.path:
            msg = f"{shown!r}: a unix:// URL needs the socket's path"
            raise ValueError(msg)
    else:
        if not parts.hostname:
            msg = f"{shown!r} has no host (write redis://host:port/db)"
            raise ValueError(msg)
        if port is not None and not 1 <= port <= 65535:
            msg = f"{shown!r}: port {port} is not between 1 and 65535"
            raise ValueError(msg)
        db = unquote(parts.path).strip("/")
        if db and not db.isdigit():
            msg = f"{shown!r}: the database after the host must be a number, not {db!r}"
            raise ValueError(msg)
    if importlib.util.find_spec("redis") is None:
        msg = f"the Redis backend ({shown!r}) needs redis-py (not installed): {INSTALL_HINT}"
        raise ValueError(msg)
    import redis

    try:
        # redis-py's own parsing, then the connection object it would build (no
        # socket is opened): an unknown or ill-typed query parameter fails here.
        pool = redis.ConnectionPool.from_url(stripped)
        pool.make_connection()
    except (TypeError, ValueError) as exc:
        text = str(exc).replace(url, shown).replace(stripped, redact_url(stripped))
        msg = f"{shown!r} is refused by redis-py: {text}"
        raise ValueError(msg) from None


class BackendConfig(BaseModel):
    """
    Where the fleet state lives, and how the process behaves when it is unreachable.

    ``redis_url`` unset means the in-memory backend (every process on its own).
    """

    # hide_input_in_errors: the input may be a URL with a password in it
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

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
    every call (and every retry) through. A process that has not heard from Redis yet (it
    is starting) decides locally until the first answer or the first failed attempt."""
    lease_ttl: _Seconds = 1.0
    """Rate-limit and retry-budget tokens that a process leased from the fleet and left unused
    for this long are given back to the fleet's bucket."""
    fallback_rate_share: _Share = 1.0
    """While Redis is unreachable (``on_backend_failure: local``), each process admits this
    share of a policy's ``rate_limit.max_rate``: 1.0 = the whole limit per process (the fleet
    may then admit replicas x the limit); 1/replicas keeps the fleet within the limit."""

    @field_validator("redis_url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        return valid_redis_url(value)

    def __repr_args__(self):  # type: ignore[no-untyped-def]  # pydantic's own signature
        for key, value in super().__repr_args__():
            yield key, redact_url(value) if key == "redis_url" and value else value

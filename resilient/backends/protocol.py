"""
What a state backend and its members say to each other (public protocols).

A *member* is a runtime object whose state a backend may share: a circuit breaker,
a retry budget or a rate limiter. Each offers the backend a small public surface
(:class:`BreakerMember`, :class:`BudgetMember`, :class:`LimiterMember`) and gets
back a *link* from ``backend.attach(member)`` (:class:`BreakerLink`,
:class:`BudgetLink`, :class:`LeaseSource`), or ``None`` when the backend keeps
nothing (the in-memory one). Attaching is the only wiring: every member calls
``link = backend.attach(self)`` once, at the end of its constructor.

Backends dispatch on ``member.fleet_kind`` (``"breaker"``, ``"budget"`` or
``"limiter"``), never on the member's class, and use nothing but these methods:
so a backend never imports :mod:`resilient.breaker`, :mod:`resilient.budget` or
:mod:`resilient.ratelimit`, and those never import a backend.

This module is a leaf: it imports nothing of ``resilient`` but the backend
settings. The breaker's state names live here for that reason (and are
re-exported by :mod:`resilient.breaker`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, overload

from resilient.backends._config import BackendConfig, OnBackendFailure

__all__ = [
    "STATES",
    "STATE_CLOSED",
    "STATE_HALF_OPEN",
    "STATE_OPEN",
    "Backend",
    "BreakerBackend",
    "BreakerLink",
    "BreakerMember",
    "BreakerSettings",
    "BreakerSnapshot",
    "BudgetLink",
    "BudgetMember",
    "BudgetSettings",
    "FleetLease",
    "FleetMember",
    "LeaseSource",
    "LimiterMember",
    "Link",
    "OnBackendFailure",
    "RateSettings",
    "SharedState",
    "same_backend",
]

# pybreaker's state names (tests/test_breaker.py checks they still match).
STATE_CLOSED: Final[str] = "closed"
STATE_OPEN: Final[str] = "open"
STATE_HALF_OPEN: Final[str] = "half-open"
#: Every state a breaker can be in: anything else from outside is ignored.
STATES: Final = frozenset({STATE_CLOSED, STATE_OPEN, STATE_HALF_OPEN})


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class SharedState:
    """
    A breaker state as the fleet holds it (what :meth:`BreakerMember.adopt` takes).

    Attributes:
        generation: Bumped by every shared transition.
        state: One of :data:`STATES`.
        open_for: Seconds left in the open period (0 unless open).
        half_open_for: Seconds before a half-open period times out (``None``: no limit).
        trips: Consecutive trips (the open period grows with them).
    """

    generation: int
    state: str
    open_for: float
    half_open_for: float | None
    trips: int


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """
    What a breaker tells its backend when it flushes (:meth:`BreakerMember.fleet_snapshot`).

    Attributes:
        successes: Lifetime successes (the backend sends the difference since its last read).
        failures: Lifetime failures.
        state: The local state.
        open_for: Seconds left in the local open period (0 unless open).
        trips: Consecutive local trips.
    """

    successes: int
    failures: int
    state: str
    open_for: float
    trips: int


# --------------------------------------------------------------------------- settings


class BreakerSettings(Protocol):
    """The parts of a breaker's configuration a backend reads."""

    @property
    def timeout_seconds(self) -> float: ...
    @property
    def open_duration_multiplier(self) -> float: ...
    @property
    def max_open_duration(self) -> float: ...
    @property
    def half_open_timeout(self) -> float | None: ...
    @property
    def window_type(self) -> str: ...
    @property
    def failure_rate_window(self) -> int: ...
    @property
    def trial_calls(self) -> int: ...
    @property
    def success_threshold(self) -> int: ...


class BudgetSettings(Protocol):
    """The parts of a retry budget's configuration a backend reads."""

    @property
    def ratio(self) -> float: ...
    @property
    def max_tokens(self) -> float: ...
    @property
    def min_retries_per_second(self) -> float: ...


class RateSettings(Protocol):
    """The parts of a rate limit's configuration a backend reads."""

    @property
    def max_rate(self) -> float: ...
    @property
    def time_period(self) -> float: ...


# --------------------------------------------------------------------------- links


class BreakerLink(Protocol):
    """
    What a breaker talks to when its state is shared.

    The breaker never calls the link on the success path of a closed breaker.
    ``transitioned``, ``trial_result`` and ``release_permit`` are called with the
    breaker's lock held and must not block (they queue work for a background
    thread); ``trial_permit`` is called without the lock and may do one short
    round trip. ``known_gen`` and ``known_state`` are the last shared state the
    breaker adopted (the breaker updates them in :meth:`BreakerMember.adopt`).
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
    What a retry budget talks to when it is shared.

    Deposits are never sent by the caller: the backend reads the budget's call count
    in the background. ``withdraw`` runs on the failure path only.
    """

    usable: bool

    def withdraw(self) -> bool | None:
        """``True``/``False``: the fleet's answer; ``None``: decide with the local bucket."""


class LeaseSource(Protocol):
    """
    Where a rate limiter leases batches of calls from.

    ``lease`` is one round trip bounded by the client timeout; ``wake`` asks the
    backend's thread to top the lease up in the background (never blocks).
    ``fallback`` is what decides while the source is not usable (``local``: the
    limiter's own buckets, which then allow ``local_share`` of ``max_rate``).
    """

    usable: bool
    fallback: OnBackendFailure
    timeout: float
    local_share: float

    def lease(self, want: int) -> tuple[int, int, float] | None:
        """``(granted, batch, seconds until the fleet has a token)``; ``None``: backend down."""

    def wake(self) -> None: ...


Link = BreakerLink | BudgetLink | LeaseSource


# --------------------------------------------------------------------------- members


class FleetLease(Protocol):
    """A rate limiter's lease, as its backend's thread tops it up and takes it back."""

    @property
    def refill(self) -> bool:
        """Whether the lease ran low and asked for a top-up."""

    @property
    def taken(self) -> int:
        """Calls taken from leases so far (the backend watches it to find idle leases)."""

    @property
    def tokens(self) -> int:
        """Calls leased and not yet taken."""

    def top_up(self) -> None:
        """Lease up to a batch now (in the backend's thread)."""

    def revoke(self) -> int:
        """Drop the leased calls; return how many (the backend gives them back)."""


class BreakerMember(Protocol):
    """What a circuit breaker offers a backend."""

    @property
    def fleet_kind(self) -> Literal["breaker"]: ...
    @property
    def name(self) -> str: ...
    @property
    def config(self) -> BreakerSettings: ...

    def fleet_snapshot(self) -> BreakerSnapshot:
        """Lifetime counts and the local state, read under the breaker's lock."""

    def adopt(self, shared: SharedState, *, fresh: bool) -> bool:
        """
        Take on the fleet's state (from the backend's threads, never a call path).

        *fresh*: read from the backend just now (always wins); otherwise a message,
        ignored when its generation is not newer than the last one adopted. Returns
        whether anything changed; an unknown state is ignored.
        """

    def set_offline(self, policy: OnBackendFailure | None) -> None:
        """The backend is unreachable: behave as *policy* says; ``None``: it is back."""

    def merge_window(self, others_calls: int, others_failures: int) -> None:
        """Take in the other replicas' window counts; trip if the fleet's rate says so."""

    def after_fork(self) -> None:
        """In a forked child: re-create the breaker's own locks."""


class BudgetMember(Protocol):
    """What a retry budget offers a backend."""

    @property
    def fleet_kind(self) -> Literal["budget"]: ...
    @property
    def name(self) -> str: ...
    @property
    def config(self) -> BudgetSettings: ...
    @property
    def calls(self) -> int:
        """Calls counted so far (each deposits ``ratio`` tokens)."""

    def after_fork(self) -> None:
        """In a forked child: re-create the budget's own locks."""


class LimiterMember(Protocol):
    """What a rate limiter offers a backend."""

    @property
    def fleet_kind(self) -> Literal["limiter"]: ...
    @property
    def name(self) -> str: ...
    @property
    def config(self) -> RateSettings: ...
    @property
    def lease(self) -> FleetLease | None:
        """The lease it serves calls from (set once ``attach`` returned a source)."""

    def after_fork(self) -> None:
        """In a forked child: re-create its own locks and drop the parent's lease."""


FleetMember = BreakerMember | BudgetMember | LimiterMember


# --------------------------------------------------------------------------- backend


class Backend(Protocol):
    """
    A state backend: gives each breaker, retry budget and rate limiter its link.

    ``attach`` replaces an earlier member of the same kind and name. ``status``
    is a JSON-serialisable summary (``backend``, ``up``, ...).
    """

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> BackendConfig: ...

    @overload
    def attach(self, member: BreakerMember) -> BreakerLink | None: ...
    @overload
    def attach(self, member: BudgetMember) -> BudgetLink | None: ...
    @overload
    def attach(self, member: LimiterMember) -> LeaseSource | None: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    def chaos_stop(self, reason: str | None) -> None:
        """Raise the fleet's chaos emergency stop with *reason* (``None``: lift it)."""
        ...

    def chaos_stopped(self) -> str | None:
        """The reason of the fleet's chaos emergency stop, or ``None`` (one read)."""
        ...


#: The earlier name of :class:`Backend`.
BreakerBackend = Backend


def same_backend(a: Backend | None, b: Backend | None) -> bool:
    """Whether state made for backend *a* can be kept under *b* (same object, or both memory)."""
    return a is b or (a is not None and b is not None and a.name == b.name == "memory")

"""
Runtime objects shared by name: one circuit breaker, bulkhead, rate limiter and
retry budget per policy name (or per ``name=`` given to the decorator).

Every kind keeps its objects in a :class:`SharedByName` table. An object is kept
across policy reloads while its config (and, for the kinds that use it, the
state backend) is unchanged, so a reload that does not touch a breaker keeps
its state.

Each name has one *owner*: the claimant (a policy name, a manager service, a
``Policy`` object of one function) that made it. Another claimant asking for the
same name with the *same* configuration shares the object; with a different
configuration it is refused with a :class:`~resilient.PolicyError` naming both,
because two configurations under one name would silently split the state (one
caller rejected by a breaker that ``get_breaker(name)`` reports closed). The
owner itself may change its configuration (a policy reload): the maker is then
called again and handed the object it replaces, so that state carries over (a
breaker starts afresh; a bulkhead updates itself in place, so the calls in flight
keep counting against the new limit).

This module imports nothing else of ``resilient`` but the errors and the backend
protocol (a leaf): the runtime (:mod:`resilient.runtime`) passes the backend in and
sets tables aside as a whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from resilient.backends.protocol import same_backend
from resilient.errors import PolicyError

__all__ = ["TABLES", "SharedByName"]


class _Shared(Protocol):
    @property
    def config(self) -> Any: ...


T = TypeVar("T", bound=_Shared)

#: ``make(name, config, backend, previous)``: *backend* is the active state
#: backend (``None`` for kinds that do not use one), *previous* the object of the
#: same name being replaced (``None`` for a new name).
Maker = Callable[[str, Any, Any, Any], T]
#: The claims on one name, flat: ``(claimant, generation, claimant, generation, ...)``.
Claims = tuple[Any, ...]


def _pairs(claims: Claims) -> zip[tuple[str, int]]:
    """``(claimant, generation)`` of each claim."""
    return zip(claims[::2], claims[1::2], strict=True)


def _without(claims: Claims, claimant: str) -> Claims:
    """*claims* less *claimant*'s."""
    return tuple(x for c, g in _pairs(claims) if c != claimant for x in (c, g))


def _with(claims: Claims, claimant: str, generation: int) -> Claims:
    """*claims* with *claimant*'s claim set to *generation*."""
    if len(claims) == 2 and claims[0] == claimant:
        return (claimant, generation)
    return (*_without(claims, claimant), claimant, generation)


class SharedByName(Generic[T]):
    """
    Objects of one kind by name, made on demand from a policy section.

    Args:
        kind: What the objects are, for messages (``"circuit breaker"`` ...).
        section: The policy section that configures them (``"circuit_breaker"``,
            ``"retry.budget"`` ...), used to build one from the active policy of
            the same name.
        make: Builds an object, see :data:`Maker`.
        uses_backend: Whether objects belong to a state backend (they are remade
            when another backend becomes active; they must have ``.backend``).
    """

    def __init__(self, kind: str, section: str, make: Maker[T], *, uses_backend: bool) -> None:
        self.kind = kind
        self.section = section
        self.uses_backend = uses_backend
        self._make = make
        self._lock = threading.Lock()
        self.items: dict[str, T] = {}
        self.owners: dict[str, str] = {}
        #: name -> (claimant, runtime generation of its latest claim, ...): a flat tuple
        #: rather than a dict per name (a name has one claimant or a few; a pair costs
        #: a quarter of a dict of one item, and a process may have thousands of names)
        self.claims: dict[str, Claims] = {}
        TABLES.append(self)

    def get_or_make(
        self, name: str, config: Any, *, claimant: str, backend: Any = None, generation: int = 0
    ) -> T:
        """
        The object for *name*, kept while *config* (and *backend*) are unchanged.

        *generation* is the runtime's rebuild counter when the claimant asks: a
        claim made at the current generation is *current* (its pipeline already
        holds the object); older claims are stale and will be made again.

        Raises:
            PolicyError: *name* is owned by another claimant with another
                configuration, or the owner changes its configuration while
                another claimant currently shares the object with the old one.
        """
        with self._lock:
            known = self.items.get(name)
            claims = self.claims.get(name, ())
            if known is not None:
                kept_backend = not self.uses_backend or same_backend(
                    getattr(known, "backend", None), backend
                )
                if known.config == config:
                    if kept_backend:
                        self.claims[name] = _with(claims, claimant, generation)
                        return known
                else:
                    owner = self.owners.get(name, claimant)
                    if owner != claimant:
                        raise self._conflict(name, owner, known.config, claimant, config)
                    # The owner changes its configuration (a reload): another claimant
                    # that already holds the object at this generation would be split off.
                    for other, seen in _pairs(claims):
                        if other != claimant and seen >= generation:
                            raise self._conflict(name, other, known.config, claimant, config)
            made = self.items[name] = self._make(name, config, backend, known)
            if known is None or known.config != config:
                self.owners[name] = claimant
                claims = ()
            self.claims[name] = _with(claims, claimant, generation)
            return made

    def _conflict(
        self, name: str, holder: str, held: Any, claimant: str, config: Any
    ) -> PolicyError:
        msg = (
            f"{self.kind} {name!r} is already used by {holder} with another "
            f"configuration; {claimant} asks for it with {self.section}: "
            f"{_short(config)} (it has {_short(held)}). Two configurations cannot "
            f"share one {self.kind}: give one of them its own name (name=...) or the "
            f"same {self.section} section"
        )
        return PolicyError(msg, policy=name, key=self.section)

    def release(self, name: str, claimant: str) -> None:
        """*claimant* no longer uses *name* (a manager service unregistered)."""
        with self._lock:
            if self.owners.get(name) == claimant:
                del self.owners[name]
            claims = self.claims.get(name)
            if claims is not None:
                self.claims[name] = _without(claims, claimant)

    def get(self, name: str) -> T | None:
        """The object for *name*, if one was made."""
        return self.items.get(name)

    def all(self) -> dict[str, T]:
        """Every object made so far, by name."""
        return dict(self.items)

    def clear(self) -> None:
        """Forget every object (the next call makes new ones)."""
        with self._lock:
            self.items.clear()
            self.owners.clear()
            self.claims.clear()

    def snapshot(self) -> tuple[dict[str, T], dict[str, str], dict[str, Claims]]:
        """Contents, for :meth:`restore` (the runtime sets every table aside at once)."""
        with self._lock:
            return dict(self.items), dict(self.owners), dict(self.claims)

    def restore(self, saved: tuple[dict[str, T], dict[str, str], dict[str, Claims]]) -> None:
        """Put back what :meth:`snapshot` returned."""
        items, owners, claims = saved
        with self._lock:
            self.items = dict(items)
            self.owners = dict(owners)
            self.claims = dict(claims)


def _short(config: Any) -> str:
    """A one-line rendering of a config section for messages."""
    dump = getattr(config, "model_dump", None)
    if dump is None:
        return repr(config)
    fields = getattr(config, "model_fields_set", None) or ()
    shown = {k: v for k, v in dump().items() if k in fields} or dump()
    text = ", ".join(f"{k}={v!r}" for k, v in shown.items())
    return "{" + (text if len(text) < 200 else text[:197] + "...") + "}"


#: Every table of shared runtime state, in the order they were made.
TABLES: list[SharedByName[Any]] = []

"""
Runtime objects shared by name: one circuit breaker, bulkhead, rate limiter and
retry budget per policy name (or per ``name=`` given to the decorator).

Every kind keeps its objects in a :class:`SharedByName` table. An object is kept
across policy reloads while its config (and, for the kinds that use it, the
state backend) is unchanged, so a reload that does not touch a breaker keeps
its state. The testing kit sets all tables aside at once (:data:`TABLES`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from resilient.errors import PolicyError

__all__ = ["TABLES", "SharedByName"]


class _Shared(Protocol):
    @property
    def config(self) -> Any: ...


T = TypeVar("T", bound=_Shared)


class SharedByName(Generic[T]):
    """
    Objects of one kind by name, made on demand from a policy section.

    Args:
        section: The policy section that configures them (``"circuit_breaker"``,
            ``"retry.budget"`` ...),
            used to build one from the active policy of the same name.
        make: Builds an object: ``make(name, config, backend)``; *backend* is the
            active state backend, or ``None`` for kinds that do not use one.
        uses_backend: Whether objects belong to a state backend (they are remade
            when another backend becomes active; they must have ``.backend``).
    """

    def __init__(
        self, section: str, make: Callable[[str, Any, Any], T], *, uses_backend: bool
    ) -> None:
        self.section = section
        self._make = make
        self._uses_backend = uses_backend
        self._lock = threading.Lock()
        self.items: dict[str, T] = {}
        TABLES.append(self)

    def get_or_make(self, name: str, config: Any) -> T:
        """The object for *name*, kept while *config* (and the backend) are unchanged."""
        from resilient import backends  # memory, or Redis: fleet-wide state

        backend = backends.current() if self._uses_backend else None
        with self._lock:
            known = self.items.get(name)
            if (
                known is not None
                and known.config == config
                and (
                    backend is None
                    or backends.same_backend(getattr(known, "backend", None), backend)
                )
            ):
                return known
            made = self.items[name] = self._make(name, config, backend)
            return made

    def lookup(self, name: str) -> T:
        """
        The object for *name*, made from the active policy of that name if needed.

        Raises:
            PolicyError: No such object and no policy *name* with this section.
        """
        known = self.items.get(name)
        if known is not None:
            return known
        from resilient.policy import registry

        config: Any = registry.get(name)
        for part in self.section.split("."):  # "retry.budget" is nested
            config = getattr(config, part, None) if config is not None else None
        if config is None:
            msg = f"policy {name!r} has no {self.section} section"
            raise PolicyError(msg, policy=name)
        return self.get_or_make(name, config)

    def all(self) -> dict[str, T]:
        """Every object made so far, by name."""
        return dict(self.items)

    def clear(self) -> None:
        """Forget every object (the next call makes new ones)."""
        with self._lock:
            self.items.clear()


#: Every table of shared runtime state, in the order they were made.
TABLES: list[SharedByName[Any]] = []

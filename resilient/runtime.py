"""
The runtime: the one owner of the process-wide state that compiled pipelines
depend on.

* the **policy registry** (:data:`resilient.policy.registry`),
* the **state backend** (memory, or Redis for a fleet): chosen, first match
  wins, by :func:`resilient.backends.configure`, ``RESILIENCE_REDIS_URL``, then
  ``redis_url:``/``backend:`` at the top level of the policy file,
* the **call observer factory** (what :mod:`resilient.metrics` installs),
* the **shared-by-name tables** (breakers, bulkheads, rate limiters, retry
  budgets: :mod:`resilient._shared`),
* and **one rebuild counter**, :attr:`Runtime.generation`.

Every change to any of them (a policy reload, ``backends.configure()``, metrics
switched on) goes up the counter; a decorated function compares the counter of
its compiled pipeline with this one on each call (one integer test) and rebuilds
when they differ, so a change reaches every function at its next call.

:meth:`Runtime.snapshot` / :meth:`Runtime.restore` set the whole state aside and
put it back; the testing kit and the pytest plugin isolate tests with them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from resilient import _shared
from resilient.backends._config import ENV_REDIS_URL, BackendConfig
from resilient.errors import PolicyError
from resilient.policy import Policy, registry

if TYPE_CHECKING:
    from resilient.backends.protocol import Backend

__all__ = ["ENV_REDIS_URL", "Runtime", "RuntimeSnapshot", "runtime"]


T = TypeVar("T", bound=_shared._Shared)
_log = logging.getLogger("resilient")
_reported: set[str] = set()  # bad RESILIENCE_REDIS_URL values already logged


#: The settings of the in-memory backend (frozen: one instance serves every caller;
#: a new one per ``backend()`` call left bytes behind per shared object made).
_MEMORY = BackendConfig()


@dataclass(frozen=True)
class RuntimeSnapshot:
    """Everything :meth:`Runtime.restore` puts back (opaque to users)."""

    policies: Mapping[str, Policy] | None
    source: str
    fleet: BackendConfig | None
    explicit_backend: BackendConfig | None
    backend_claims: tuple[tuple[object, BackendConfig], ...]
    observer_factory: Any
    observers: tuple[tuple[str, Any], ...]
    tables: tuple[tuple[_shared.SharedByName[Any], Any], ...]
    extras: tuple[tuple[str, Any], ...] = ()


class Runtime:
    """
    The process's runtime state (one instance: :data:`runtime`).

    Attributes:
        registry: The policy registry.
        generation: The rebuild counter; goes up on every change that compiled
            pipelines must see.
        observer_factory: Gives each pipeline its call observer (metrics), or ``None``.
    """

    __slots__ = (
        "_backend",
        "_backend_claims",
        "_explicit_backend",
        "_lock",
        "_states",
        "generation",
        "observer_factory",
        "observers",
        "registry",
    )

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.generation = 0
        self.registry = registry
        registry.on_change = self.touch
        self.observer_factory: Callable[[Any], Any] | None = None
        #: further observer factories by key (health monitoring watches calls with one)
        self.observers: tuple[tuple[str, Callable[[Any], Any]], ...] = ()
        self._explicit_backend: BackendConfig | None = None
        # owners (managers given a redis_url) and their settings, newest last
        self._backend_claims: tuple[tuple[object, BackendConfig], ...] = ()
        self._backend: Backend | None = None
        # process-wide state of modules above the runtime (chaos switches and injections),
        # set aside and put back with the rest: key -> (snapshot, restore)
        self._states: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}

    def __repr__(self) -> str:
        backend = self._backend.name if self._backend is not None else "not built"
        return (
            f"<Runtime generation={self.generation} policies={self.registry.source!r} "
            f"backend={backend}>"
        )

    def touch(self) -> None:
        """Make every compiled pipeline rebuild at its next call."""
        with self._lock:
            self.generation += 1

    # ------------------------------------------------------------ observer

    def set_observer_factory(self, factory: Callable[[Any], Any] | None) -> None:
        """Install (or remove) the factory that gives each pipeline its call observer."""
        with self._lock:
            self.observer_factory = factory
            self.generation += 1

    def add_observer_factory(self, key: str, factory: Callable[[Any], Any]) -> None:
        """
        Give pipelines one more call observer, next to the metrics one (replacing the
        factory of the same *key*). A factory may return ``None`` for a pipeline it
        does not watch; a pipeline with no observer keeps its fast lanes.
        """
        with self._lock:
            others = tuple(item for item in self.observers if item[0] != key)
            self.observers = (*others, (key, factory))
            self.generation += 1

    def remove_observer_factory(self, key: str) -> None:
        """Take the factory of *key* away (no error if there is none)."""
        with self._lock:
            self.observers = tuple(item for item in self.observers if item[0] != key)
            self.generation += 1

    @contextlib.contextmanager
    def observers_paused(self) -> Iterator[None]:
        """No call observer for pipelines built in the block (the simulator's calls are
        not the process's: metrics and passive health must not count them)."""
        with self._lock:
            saved = self.observer_factory, self.observers
            self.observer_factory, self.observers = None, ()
            self.generation += 1
        try:
            yield
        finally:
            with self._lock:
                self.observer_factory, self.observers = saved
                self.generation += 1

    def observer_for(self, pipeline: Any) -> Any:
        """The call observer of *pipeline*: ``None``, one observer, or a fan-out to several."""
        found = []
        factories = [self.observer_factory] if self.observer_factory is not None else []
        factories += [factory for _key, factory in self.observers]
        for factory in factories:
            observer = factory(pipeline)
            if observer is not None:
                found.append(observer)
        if not found:
            return None
        return found[0] if len(found) == 1 else _FanOut(tuple(found))

    # ------------------------------------------------------------ backend

    def backend_config(self) -> BackendConfig:
        """
        The backend settings in force: :meth:`configure_backend`, else
        ``RESILIENCE_REDIS_URL`` (on top of the file's settings), else the
        policy file's ``redis_url``/``backend``, else memory.

        A ``RESILIENCE_REDIS_URL`` that is not a valid Redis URL is refused when
        policies load (a ``PolicyError`` naming the variable); if it is set badly
        later, it is logged (once per value, never the password) and ignored here:
        a setting never fails a call.
        """
        claims = self._backend_claims
        if claims:
            return claims[-1][1]
        explicit = self._explicit_backend
        if explicit is not None:
            return explicit
        file_cfg = self.registry.fleet
        env_url = os.environ.get(ENV_REDIS_URL, "").strip()
        if env_url:
            base = file_cfg if file_cfg is not None else _MEMORY
            try:
                return BackendConfig.model_validate({**base.model_dump(), "redis_url": env_url})
            except ValidationError as exc:
                if env_url not in _reported:
                    _reported.add(env_url)
                    problem = "; ".join(str(e["msg"]) for e in exc.errors())
                    _log.error("environment variable %s ignored: %s", ENV_REDIS_URL, problem)
        return file_cfg if file_cfg is not None else _MEMORY

    def backend(self) -> Backend:
        """The backend new breakers, budgets and limiters attach to (built on first use)."""
        cfg = self.backend_config()
        active = self._backend
        if active is not None and active.config == cfg:
            return active
        with self._lock:
            active = self._backend
            if active is not None and active.config == cfg:
                return active
            new: Backend
            if cfg.redis_url:
                from resilient.backends.redis import RedisBackend

                new = RedisBackend(cfg)
            else:
                from resilient.backends.memory import MemoryBackend

                new = MemoryBackend(cfg)
            self._backend = new
            self.generation += 1
        if active is not None:
            active.close()
        return new

    def configure_backend(self, config: BackendConfig | None) -> None:
        """Choose the backend explicitly (``None``: back to the environment and the file)."""
        with self._lock:
            self._explicit_backend = config
            self.generation += 1

    def claim_backend(self, owner: object, config: BackendConfig) -> None:
        """
        *owner* (a manager given a ``redis_url``) needs *config* while it runs: the
        newest claim wins over :meth:`configure_backend`, and when the last claim
        is released the application's own choice is back.
        """
        with self._lock:
            others = tuple(c for c in self._backend_claims if c[0] is not owner)
            self._backend_claims = (*others, (owner, config))
            self.generation += 1

    def release_backend(self, owner: object) -> None:
        """Drop *owner*'s claim (no error if it has none)."""
        with self._lock:
            self._backend_claims = tuple(c for c in self._backend_claims if c[0] is not owner)
            self.generation += 1

    def reset_backend(self) -> None:
        """Forget :meth:`configure_backend` and stop the active backend's threads."""
        with self._lock:
            self._explicit_backend = None
            self._backend_claims = ()
            active, self._backend = self._backend, None
            self.generation += 1
        if active is not None:
            active.close()

    @property
    def explicit_backend(self) -> BackendConfig | None:
        """The settings chosen in code: the newest claim, else :meth:`configure_backend`'s."""
        claims = self._backend_claims
        return claims[-1][1] if claims else self._explicit_backend

    # ------------------------------------------------------------ shared objects

    def claim(self, table: _shared.SharedByName[T], name: str, config: Any, claimant: str) -> T:
        """*table*'s object for *name* under *config*, owned or shared by *claimant*."""
        backend = self.backend() if table.uses_backend else None
        return table.get_or_make(
            name, config, claimant=claimant, backend=backend, generation=self.generation
        )

    def lookup(self, table: _shared.SharedByName[T], name: str) -> T:
        """
        *table*'s object for *name*, made from the active policy *name* if needed.

        Raises:
            PolicyError: No such object and no policy *name* with that section.
        """
        known = table.get(name)
        if known is not None:
            return known
        config: Any = self.registry.get(name)
        for part in table.section.split("."):  # "retry.budget" is nested
            config = getattr(config, part, None) if config is not None else None
        if config is None:
            msg = f"policy {name!r} has no {table.section} section"
            raise PolicyError(msg, policy=name)
        return self.claim(table, name, config, f"policy {name!r}")

    def clear_shared(self) -> None:
        """Forget every breaker, bulkhead, rate limiter and budget (each starts afresh)."""
        for table in _shared.TABLES:
            table.clear()
        self.touch()

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> RuntimeSnapshot:
        """Set the whole runtime state aside (see :meth:`restore`)."""
        with self._lock:
            policies, source, fleet = self.registry.contents()
            return RuntimeSnapshot(
                policies=policies,
                source=source,
                fleet=fleet,
                explicit_backend=self._explicit_backend,
                backend_claims=self._backend_claims,
                observer_factory=self.observer_factory,
                observers=self.observers,
                tables=tuple((table, table.snapshot()) for table in _shared.TABLES),
                extras=tuple((key, save()) for key, (save, _) in self._states.items()),
            )

    def restore(self, snapshot: RuntimeSnapshot) -> None:
        """Put back what :meth:`snapshot` returned; every pipeline rebuilds at its next call."""
        with self._lock:
            self.registry.set_contents(snapshot.policies, snapshot.source, snapshot.fleet)
            self._explicit_backend = snapshot.explicit_backend
            self._backend_claims = snapshot.backend_claims
            self.observer_factory = snapshot.observer_factory
            self.observers = snapshot.observers
            saved = dict(snapshot.tables)
            for table in _shared.TABLES:
                if table in saved:
                    table.restore(saved[table])
                else:
                    table.clear()
            extras = dict(snapshot.extras)
            states = list(self._states.items())
            self.generation += 1
        for key, (_, put_back) in states:  # outside the lock: they may touch the runtime
            if key in extras:
                put_back(extras[key])

    def add_state(
        self, key: str, snapshot: Callable[[], Any], restore: Callable[[Any], None]
    ) -> None:
        """
        Have :meth:`snapshot` and :meth:`restore` include a module's own process-wide
        state (what *snapshot* returns is given back to *restore*). Chaos registers its
        switch, stop flag and injections here, so an isolated test cannot leak them.
        """
        with self._lock:
            self._states[key] = (snapshot, restore)


class _FanOut:
    """Several call observers of one pipeline, each one shielded from the others."""

    __slots__ = ("_records", "observers")

    def __init__(self, observers: tuple[Any, ...]) -> None:
        self.observers = observers
        # bound once: record() runs at the end of every observed call
        self._records = tuple((observer.record, observer) for observer in observers)

    def record(self, outcome: str, duration: float) -> None:
        for record, observer in self._records:
            try:
                record(outcome, duration)
            except Exception:
                _log.exception("call observer %r raised; ignoring it", observer)

    def failed(self, error: BaseException) -> None:
        for observer in self.observers:
            failed = getattr(observer, "failed", None)
            if failed is not None:
                try:
                    failed(error)
                except Exception:
                    _log.exception("call observer %r raised; ignoring it", observer)


#: The process's runtime.
runtime = Runtime()

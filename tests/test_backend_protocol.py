"""
Backends behind a public protocol (resilient.backends.protocol): the backend modules
import no member module, the protocol module is a leaf, and the Redis backend touches
no private member of another module's objects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from resilient import backends
from resilient._models import CircuitBreakerConfig, RateLimitConfig, RetryBudgetConfig
from resilient.backends import protocol
from resilient.backends.memory import MemoryBackend
from resilient.breaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker
from resilient.budget import RetryBudget
from resilient.ratelimit import RateLimiter

BACKENDS = Path(backends.__file__).parent
MEMBERS = {"resilient.breaker", "resilient.budget", "resilient.ratelimit"}


def _imports(path: Path) -> set[str]:
    """Every module *path* imports, at any level (type-checking imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", sorted(p.name for p in BACKENDS.glob("*.py")))
def test_backends_never_import_their_members(module: str) -> None:
    """No backend module imports the breaker, the budget or the rate limiter."""
    assert not _imports(BACKENDS / module) & MEMBERS


def test_the_protocol_module_is_a_leaf() -> None:
    """protocol.py imports nothing of resilient but the backend settings."""
    ours = {m for m in _imports(BACKENDS / "protocol.py") if m.startswith("resilient")}
    assert ours == {"resilient.backends._config"}


def test_the_redis_backend_uses_only_public_members() -> None:
    """No ``<member>._private`` access in redis.py (it used nine of the breaker's)."""
    tree = ast.parse((BACKENDS / "redis.py").read_text())
    members = {"breaker", "budget", "limiter", "lease", "member"}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name in members:
                bad.append(f"line {node.lineno}: {name}.{node.attr}")
    assert bad == []


def test_state_names_are_shared_with_the_breaker() -> None:
    """The breaker's state names are the protocol's (one definition)."""
    assert (STATE_CLOSED, STATE_OPEN, STATE_HALF_OPEN) == (
        protocol.STATE_CLOSED,
        protocol.STATE_OPEN,
        protocol.STATE_HALF_OPEN,
    )
    assert frozenset({STATE_CLOSED, STATE_OPEN, STATE_HALF_OPEN}) == protocol.STATES


class TestOneWayToAttach:
    def test_every_member_attaches_itself_through_attach(self) -> None:
        """Breaker, budget and limiter each call backend.attach(self) once, when built."""

        class Recording(MemoryBackend):
            def __init__(self) -> None:
                super().__init__()
                self.seen: list[tuple[str, str]] = []

            def attach(self, member):  # type: ignore[no-untyped-def,override]
                self.seen.append((member.fleet_kind, member.name))
                return super().attach(member)

        backend = Recording()
        breaker = CircuitBreaker("a", CircuitBreakerConfig(), backend=backend)
        budget = RetryBudget("b", RetryBudgetConfig(), backend=backend)
        limiter = RateLimiter("c", RateLimitConfig(max_rate=5), backend=backend)
        assert backend.seen == [("breaker", "a"), ("budget", "b"), ("limiter", "c")]
        assert (breaker.backend, budget.backend, limiter.backend) == (backend,) * 3
        assert (budget.link, limiter.lease) == (None, None)  # memory: nothing shared

    def test_breaker_adopt_ignores_an_unknown_state(self) -> None:
        """adopt() is public, so it checks its input: a state name it does not know is refused."""
        breaker = CircuitBreaker("a", CircuitBreakerConfig())
        assert not breaker.adopt(protocol.SharedState(3, "exploded", 0.0, None, 1), fresh=True)
        assert breaker.state == "closed"

    def test_memory_backend_status(self) -> None:
        """The in-memory backend is always up."""
        assert MemoryBackend().status() == {"backend": "memory", "up": True, "state": "up"}

"""The runtime: one owner of registry, backend, observer and the rebuild counter."""

from __future__ import annotations

import ast
import pathlib
from typing import Any

import pytest

import resilient
from resilient import backends
from resilient.runtime import runtime


def load(**policies: Any) -> None:
    resilient.load_policies({"version": 1, "policies": policies})


BREAKER = {"circuit_breaker": {"failure_threshold": 1, "timeout_seconds": 30}}


class TestConfigureReachesEveryFunction:
    def test_configure_after_the_first_call_reaches_the_function(self, server: Any) -> None:
        """backends.configure() after a function was decorated *and called* still reaches it."""
        load(p=BREAKER)

        @resilient.resilient("p")
        def ok() -> str:
            return "ok"

        assert ok() == "ok"
        assert resilient.get_breaker("p").backend is not None
        assert resilient.get_breaker("p").backend.name == "memory"
        try:
            backends.configure(redis_url=server.url, key_prefix="rt-configure")
            assert ok() == "ok"
            breaker = ok.__resilient_handle__.get().breaker  # type: ignore[attr-defined]
            assert breaker.backend.name == "redis"
            assert resilient.get_breaker("p") is breaker
        finally:
            backends.reset()
        assert ok() == "ok"
        assert ok.__resilient_handle__.get().breaker.backend.name == "memory"  # type: ignore[attr-defined]

    def test_reload_between_reading_the_counter_and_the_policy_is_not_lost(self) -> None:
        load(p={"retry": {"max_attempts": 2}})

        @resilient.resilient("p")
        def f() -> int:
            return 1

        f()
        handle = f.__resilient_handle__  # type: ignore[attr-defined]
        real = runtime.registry

        class ReloadRightAfterTheRead:
            def get(self, name: str) -> Any:
                policy = real.get(name)
                load(p={"retry": {"max_attempts": 3}})  # a reload lands right after the read
                return policy

        runtime.registry = ReloadRightAfterTheRead()  # type: ignore[assignment]
        try:
            runtime.touch()
            assert handle.get().policy.retry.max_attempts == 2
        finally:
            runtime.registry = real
        # the handle knows it is behind: the next call picks up the reload
        assert handle.get().policy.retry.max_attempts == 3


class TestOneOwnerPerName:
    def test_two_configurations_under_one_name_is_an_error_naming_both(self) -> None:
        load(
            db={"circuit_breaker": {"failure_threshold": 5}},
            other={"circuit_breaker": {"failure_threshold": 2}},
        )

        @resilient.resilient("db")
        def query() -> str:
            return "rows"

        @resilient.resilient("other", name="db")
        def report() -> str:
            return "report"

        assert query() == "rows"
        with pytest.raises(resilient.PolicyError) as caught:
            report()
        message = str(caught.value)
        assert "policy 'db'" in message
        assert "policy 'other'" in message
        assert "failure_threshold" in message
        # nothing was split: the breaker is still the first one
        assert resilient.get_breaker("db").config.failure_threshold == 5

    def test_same_configuration_shares(self) -> None:
        load(db=BREAKER, alias={**BREAKER, "description": "same breaker"})

        @resilient.resilient("db")
        def a() -> None:
            raise ConnectionError

        @resilient.resilient("alias", name="db")
        def b() -> str:
            return "b"

        with pytest.raises(ConnectionError):
            a()
        with pytest.raises(resilient.CircuitOpenError):
            b()  # the one shared breaker opened
        assert resilient.get_breaker("db").state == "open"

    async def test_a_manager_service_cannot_take_a_name_with_another_breaker(self) -> None:
        load(db={"circuit_breaker": {"failure_threshold": 5}})

        @resilient.resilient("db")
        def query() -> str:
            return "rows"

        query()
        manager = await resilient.create_resilience_manager(prometheus_enabled=False)
        try:
            with pytest.raises(resilient.PolicyError, match="service 'db'"):
                await manager.register_service("db", None, {"failure_threshold": 2})
        finally:
            await manager.close()

    def test_a_reload_of_the_owner_replaces_its_objects(self) -> None:
        load(db={"circuit_breaker": {"failure_threshold": 5}})

        @resilient.resilient("db")
        def query() -> str:
            return "rows"

        query()
        load(db={"circuit_breaker": {"failure_threshold": 7}})
        query()
        assert resilient.get_breaker("db").config.failure_threshold == 7


class TestSnapshot:
    def test_restore_puts_everything_back(self) -> None:
        load(p=BREAKER)
        resilient.get_breaker("p").open()
        saved = runtime.snapshot()
        generation = runtime.generation
        load(q=BREAKER)
        runtime.clear_shared()
        assert "p" not in resilient.breakers()
        runtime.restore(saved)
        assert runtime.generation > generation
        assert resilient.get_policy("p") is not None
        assert resilient.get_breaker("p").state == "open"
        with pytest.raises(resilient.PolicyError):
            resilient.get_policy("q")

    async def test_manager_close_keeps_the_applications_backend(self, server: Any) -> None:
        backends.configure(redis_url=server.url, key_prefix="rt-manager")
        try:
            manager = await resilient.create_resilience_manager(prometheus_enabled=False)
            status = manager.get_system_status()
            assert status["backend"] == "redis"
            await manager.close()
            assert runtime.explicit_backend is not None
            assert backends.current().name == "redis"
        finally:
            backends.reset()

    async def test_a_manager_with_redis_url_gives_back_the_previous_choice(
        self, server: Any
    ) -> None:
        manager = await resilient.create_resilience_manager(
            redis_url=server.url, prometheus_enabled=False
        )
        assert manager.get_system_status()["backend"] == "redis"
        await manager.close()
        assert runtime.explicit_backend is None
        assert backends.current().name == "memory"


# --------------------------------------------------------------------------- imports

PACKAGE = pathlib.Path(resilient.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """Every import of every module of the package, wherever it is (function-level and
    ``if TYPE_CHECKING:`` imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_is_acyclic() -> None:
    graph = _import_graph()
    assert "resilient.attempt" in graph
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_graph_checker_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


class TestObservers:
    def test_several_observers_each_see_every_call_and_one_failing_harms_none(self) -> None:
        load(p={"circuit_breaker": {}})
        seen: dict[str, list[str]] = {"a": [], "b": []}

        class Recorder:
            def __init__(self, key: str) -> None:
                self.key = key

            def record(self, outcome: str, duration: float) -> None:
                seen[self.key].append(outcome)

        class Broken:
            def record(self, outcome: str, duration: float) -> None:
                raise RuntimeError("observer bug")

        runtime.add_observer_factory("a", lambda p: Recorder("a"))
        runtime.add_observer_factory("broken", lambda p: Broken())
        runtime.add_observer_factory("b", lambda p: Recorder("b") if p.name == "p" else None)
        try:

            @resilient.resilient("p")
            def f(fail: bool) -> int:
                if fail:
                    raise ConnectionError
                return 1

            assert f(False) == 1
            with pytest.raises(ConnectionError):
                f(True)
            assert seen == {"a": ["success", "failure"], "b": ["success", "failure"]}
        finally:
            for key in ("a", "b", "broken"):
                runtime.remove_observer_factory(key)
        f(False)
        assert seen["a"] == ["success", "failure"]  # removed: no longer called


class TestOwnerReload:
    def test_an_owner_changing_its_config_under_a_current_sharer_is_refused(self) -> None:
        def policies(threshold: int) -> dict[str, Any]:
            return {
                "a": {"circuit_breaker": {"failure_threshold": threshold}},
                "c": {"circuit_breaker": {"failure_threshold": 2}},
            }

        load(**policies(2))

        @resilient.resilient("a", name="db")
        def f1() -> int:
            return 1

        @resilient.resilient("c", name="db")
        def f3() -> int:
            return 3

        assert (f1(), f3()) == (1, 3)  # the same section: shared
        load(**policies(3))
        assert f3() == 3  # the sharer rebuilds first, still sharing the old breaker
        with pytest.raises(resilient.PolicyError, match="policy 'c'"):
            f1()  # the owner may not split it off
        assert resilient.get_breaker("db").config.failure_threshold == 2

    def test_a_bad_redis_url_variable_fails_the_load_not_a_call(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
    ) -> None:
        monkeypatch.setenv("RESILIENCE_REDIS_URL", "localhost:6379")
        with pytest.raises(resilient.PolicyError, match="RESILIENCE_REDIS_URL"):
            load(p=BREAKER)
        # set badly after loading: logged and ignored, the call still works
        monkeypatch.delenv("RESILIENCE_REDIS_URL")
        load(p=BREAKER)
        monkeypatch.setenv("RESILIENCE_REDIS_URL", "htp://nope")
        runtime.touch()
        assert resilient.call("p", lambda: 7) == 7

    async def test_two_managers_with_redis_closed_out_of_order(self, server: Any) -> None:
        base = server.url.rsplit("/", 1)[0]  # redis://127.0.0.1:PORT
        m1 = await resilient.create_resilience_manager(redis_url=f"{base}/3", metrics_enabled=False)
        first = runtime.explicit_backend
        m2 = await resilient.create_resilience_manager(redis_url=f"{base}/4", metrics_enabled=False)
        second = runtime.explicit_backend
        assert first != second
        await m1.close()
        assert runtime.explicit_backend == second  # m2 still runs on its backend
        await m2.close()
        assert runtime.explicit_backend is None  # the application's own choice
        assert backends.current().name == "memory"


def test_snapshot_and_restore_include_chaos() -> None:
    """An isolated block cannot leak chaos: the switch and its injections are put back."""
    from resilient import chaos
    from resilient.testing import isolated_registry

    resilient.load_policies({"policies": {"db": {}}})

    @resilient.resilient(policy="db")
    def query() -> str:
        return "rows"

    assert query() == "rows"
    with isolated_registry():
        resilient.load_policies({"policies": {"db": {}}})
        chaos.enable()
        injection = chaos.inject("db", "error_result")
        assert query() is None  # the fault's value
    assert not chaos.enabled()
    assert not injection.active
    assert query() == "rows"

"""The public surface: what `resilient` exports is complete, unique and importable."""

from __future__ import annotations

import resilient


def test_all_is_unique_and_resolves() -> None:
    """Every name in __all__ exists on the package, once."""
    names = list(resilient.__all__)
    assert len(names) == len(set(names))
    missing = [name for name in names if not hasattr(resilient, name)]
    assert missing == []


def test_public_names_are_exported() -> None:
    """Every public class or function the package namespace holds is listed in __all__."""
    public = {
        name
        for name, value in vars(resilient).items()
        if not name.startswith("_")
        and (isinstance(value, type) or callable(value))
        and getattr(value, "__module__", "").startswith("resilient")
    }
    assert public - set(resilient.__all__) == set()


def test_the_lazy_export_table_agrees_with_all_and_the_type_stubs() -> None:
    """`__all__`, the lazy-load table and the TYPE_CHECKING imports name the same things."""
    import ast
    import inspect

    exports = set(resilient._EXPORTS)
    assert exports | {"__version__"} == set(resilient.__all__)
    tree = ast.parse(inspect.getsource(resilient))
    stubs = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for child in node.body
        if isinstance(child, ast.ImportFrom)
        for alias in child.names
    }
    assert stubs == exports
    for name, (module, attribute) in resilient._EXPORTS.items():
        assert getattr(__import__(module, fromlist=[attribute]), attribute) is getattr(
            resilient, name
        )

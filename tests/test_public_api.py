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

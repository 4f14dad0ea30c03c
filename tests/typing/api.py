"""
Checked by mypy --strict in CI, never run: the decorator keeps the type of what
it wraps (ParamSpec and return type), for sync and async functions alike.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

import resilient


@resilient.resilient(policy="database", fallback=lambda exc: [])
def query(sql: str, *, limit: int = 10) -> list[str]:
    return [sql] * limit


@resilient.resilient(policy="broker")
async def place_order(order_id: int) -> bool:
    return order_id > 0


assert_type(query("SELECT 1", limit=2), list[str])
coroutine = place_order(1)
_ = assert_type(coroutine, Coroutine[Any, Any, bool])
coroutine.close()


async def caller() -> None:
    assert_type(await place_order(1), bool)
    assert_type(await resilient.acall("broker", place_order, 2), bool)
    assert_type(resilient.call("database", query, "SELECT 2"), list[str])
    for attempt in resilient.attempts("broker"):
        with attempt:
            pass

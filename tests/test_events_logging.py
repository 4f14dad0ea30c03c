"""The new events (issue 5) and the stdlib logging subscriber."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import pytest
from conftest import Sleeps, load

import resilient
from resilient import _logging
from resilient.events import (
    BackendDown,
    BackendUp,
    BreakerStateChanged,
    CallRejected,
    ChaosInjected,
    HealthChanged,
    RetryScheduled,
    bus,
)


@pytest.fixture(autouse=True)
def _logging_off() -> Iterator[None]:
    yield
    resilient.disable_logging()


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(HealthChanged("db", "healthy", "unhealthy", 0.0, "r"), id="health"),
        pytest.param(ChaosInjected("db", "f", "timeout", "exp"), id="chaos"),
        pytest.param(BackendDown("redis", "ConnectionError"), id="down"),
        pytest.param(BackendUp("redis", None), id="up"),
    ],
)
def test_new_events_are_frozen_and_slotted(event: object) -> None:
    """The new events are frozen, slotted dataclasses, like the others."""
    assert dataclasses.is_dataclass(event)
    assert not hasattr(event, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, dataclasses.fields(event)[0].name, "x")  # type: ignore[arg-type]


def test_nothing_emitted_on_success(sleeps: Sleeps) -> None:
    """A plain successful call through a full policy emits nothing."""
    load(db={"retry": {"max_attempts": 3}, "circuit_breaker": {}, "timeout": {"total": 5}})
    seen: list[object] = []
    resilient.subscribe(seen.append)

    @resilient.resilient("db")
    def ok() -> int:
        return 1

    for _ in range(3):
        ok()
    assert seen == []


class TestLogging:
    def test_off_by_default(self, caplog: pytest.LogCaptureFixture, sleeps: Sleeps) -> None:
        """Without enable_logging() the decorator logs nothing."""
        caplog.set_level(logging.DEBUG, logger="resilient")
        load(db={"retry": {"max_attempts": 2}})

        @resilient.resilient("db")
        def broken() -> None:
            raise ConnectionError

        with pytest.raises(ConnectionError):
            broken()
        assert [r for r in caplog.records if r.name.startswith("resilient.")] == []

    def test_records_carry_structured_fields(
        self, caplog: pytest.LogCaptureFixture, sleeps: Sleeps
    ) -> None:
        """Records go to resilient.<area> loggers with the event's fields as extras."""
        caplog.set_level(logging.DEBUG, logger="resilient")
        resilient.enable_logging()
        resilient.enable_logging()  # idempotent
        load(db={"retry": {"max_attempts": 2}, "circuit_breaker": {"failure_threshold": 2}})

        @resilient.resilient("db")
        def broken(password: str) -> None:
            raise ConnectionError

        with pytest.raises(ConnectionError):
            broken("hunter2")
        by_event = {getattr(r, "event", None): r for r in caplog.records}
        retry = by_event["retry_scheduled"]
        assert retry.name == "resilient.retry"
        assert retry.levelno == logging.INFO
        assert retry.policy == "db"  # type: ignore[attr-defined]
        assert retry.attempt == 1  # type: ignore[attr-defined]
        assert retry.error_type == "ConnectionError"  # type: ignore[attr-defined]
        exhausted = by_event["retries_exhausted"]
        assert (exhausted.name, exhausted.levelno) == ("resilient.retry", logging.WARNING)
        opened = by_event["breaker_state_changed"]
        assert (opened.name, opened.levelno) == ("resilient.breaker", logging.WARNING)
        assert opened.new_state == "open"  # type: ignore[attr-defined]
        for record in caplog.records:
            assert "hunter2" not in record.getMessage()
            assert "hunter2" not in repr(record.__dict__)

    @pytest.mark.parametrize(
        ("event", "logger", "level"),
        [
            pytest.param(
                CallRejected("db", "f", "bulkhead_full", None),
                "resilient.bulkhead",
                logging.DEBUG,
                id="bulkhead",
            ),
            pytest.param(
                CallRejected("db", "f", "rate_limited", 1.0),
                "resilient.ratelimit",
                logging.DEBUG,
                id="ratelimit",
            ),
            pytest.param(
                BreakerStateChanged("db", "open", "half-open"),
                "resilient.breaker",
                logging.INFO,
                id="half-open",
            ),
            pytest.param(
                HealthChanged("db", "healthy", "unhealthy", 0.0, "r"),
                "resilient.health",
                logging.WARNING,
                id="worse",
            ),
            pytest.param(
                HealthChanged("db", "unhealthy", "healthy", 1.0, "r"),
                "resilient.health",
                logging.INFO,
                id="better",
            ),
            pytest.param(
                ChaosInjected("db", "f", "timeout", None), "resilient.chaos", logging.INFO, id="c"
            ),
            pytest.param(
                BackendDown("redis", "E"), "resilient.backend", logging.WARNING, id="down"
            ),
            pytest.param(BackendUp("redis", 2.0), "resilient.backend", logging.INFO, id="up"),
        ],
    )
    def test_logger_and_level(
        self, caplog: pytest.LogCaptureFixture, event: object, logger: str, level: int
    ) -> None:
        """Each event type has its logger and level."""
        caplog.set_level(logging.DEBUG, logger="resilient")
        resilient.enable_logging()
        bus.emit(event)
        (record,) = [r for r in caplog.records if r.name.startswith("resilient.")]
        assert (record.name, record.levelno) == (logger, level)

    def test_unknown_event_and_reserved_names(self, caplog: pytest.LogCaptureFixture) -> None:
        """Unknown events log at DEBUG; fields named like LogRecord attributes get a prefix."""

        @dataclasses.dataclass(frozen=True)
        class Custom:
            name: str
            policy: str

        caplog.set_level(logging.DEBUG, logger="resilient")
        _logging.log_event(Custom("n", "p"))
        (record,) = caplog.records
        assert record.name == "resilient.events"
        assert record.event_name == "n"  # type: ignore[attr-defined]
        assert record.event == "custom"  # type: ignore[attr-defined]

    async def test_manager_enables_logging_while_running(self) -> None:
        """The manager turns logging on while it runs, unless told not to."""
        assert not _logging.logging_enabled()
        async with resilient.ResilienceManager():
            assert _logging.logging_enabled()
        assert not _logging.logging_enabled()
        async with resilient.ResilienceManager(resilient.ResilienceConfig(logging_enabled=False)):
            assert not _logging.logging_enabled()

    def test_disable(self) -> None:
        """disable_logging() takes the subscriber off the bus."""
        resilient.enable_logging()
        assert _logging.logging_enabled()
        resilient.disable_logging()
        assert not _logging.logging_enabled()
        assert RetryScheduled  # the bus is untouched otherwise

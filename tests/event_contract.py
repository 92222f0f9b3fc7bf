"""pytest plugin: every change event published in the test suite obeys the contract.

While the suite runs, :meth:`bus.amqp.publisher.Publisher.publish_batch` is wrapped. Each
message to ``syncbus.changes`` that claims to be an event (a JSON object with
``specversion``) is checked against the checked-in JSON Schema
(``schemas/change-event.v1.json``) with ``jsonschema``, and against the routing
rules the schema cannot express: routing key ``<connection>.<entity>.<op>``,
``type`` ending in the op, ``message_id`` equal to the event id. Messages that are
not events at all (tests of the consumer runtime publish ``{"n": 1}``) are left
alone.

A violation fails the test that published it (reported at its teardown, so an event
published by a worker thread is caught too); the publish itself goes ahead, so the
test runs as it would. A test that publishes invalid events on purpose is marked
``@pytest.mark.invalid_events``.

Events published by subprocesses (``python -m bus.cli run`` in end-to-end tests) are
not seen; they are built by the same ``schemas.event.new_event``.

Enable it in ``tests/conftest.py`` with ``pytest_plugins = ["tests.event_contract"]``.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import CHANGES_EXCHANGE
from schemas.event import SCHEMA_FILE

__all__ = ["EventContract", "contract", "event_contract"]

_MARKER = "invalid_events"


def _rfc3339(value: object) -> bool:
    """The ``date-time`` format: ISO 8601 with a time zone (jsonschema skips it without
    the optional rfc3339-validator package)."""
    if not isinstance(value, str):
        return True  # formats apply to strings only
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value.upper() and parsed.tzinfo is not None


class EventContract:
    """Checks published messages and remembers the violations of the current test."""

    def __init__(self) -> None:
        checker = FormatChecker()
        checker.checks("date-time")(_rfc3339)
        self.schema = json.loads(SCHEMA_FILE.read_text())
        self.validator = Draft202012Validator(self.schema, format_checker=checker)
        self.checked = 0
        self.violations: list[str] = []
        self._lock = threading.Lock()

    def problems(self, message: OutMessage) -> list[str]:
        """Why ``message`` breaks the contract (empty when it keeps it or is no event)."""
        if message.exchange != CHANGES_EXCHANGE:
            return []
        try:
            event = json.loads(message.body)
        except ValueError:
            return []
        if not isinstance(event, dict) or "specversion" not in event:
            return []
        with self._lock:
            self.checked += 1
        problems = [f"{'/'.join(map(str, e.absolute_path)) or '(event)'}: {e.message}"
                    for e in self.validator.iter_errors(event)]
        if not problems:
            problems += _routing_problems(message, event)
        return problems

    def check(self, messages: Sequence[OutMessage]) -> None:
        """Record the violations of ``messages``."""
        for message in messages:
            for problem in self.problems(message):
                with self._lock:
                    self.violations.append(f"{message.routing_key}: {problem}")

    def take(self) -> list[str]:
        """The violations recorded since the last call."""
        with self._lock:
            found, self.violations = self.violations, []
        return found


def _routing_problems(message: OutMessage, event: dict[str, Any]) -> list[str]:
    data = event["data"]
    problems = []
    expected = f"{data['origin']['connection']}.{data['entity']}.{data['op']}"
    if message.routing_key != expected:
        problems.append(f"routing key should be {expected!r}")
    if event["type"] != f"io.syncbus.change.{data['op']}":
        problems.append(f"type {event['type']!r} does not match op {data['op']!r}")
    if message.message_id is not None and message.message_id != event["id"]:
        problems.append(f"message_id {message.message_id!r} is not the event id")
    return problems


#: The session's contract checker (None outside a test session).
contract: EventContract | None = None
_original: Callable[..., None] | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and wrap the publisher for the whole session."""
    global contract, _original
    config.addinivalue_line(
        "markers", f"{_MARKER}: the test publishes invalid change events on purpose")
    if _original is not None:
        return
    contract = EventContract()
    _original = Publisher.publish_batch
    original = _original

    @functools.wraps(original)
    def publish_batch(self: Publisher, messages: Sequence[OutMessage], *args: Any,
                      **kwargs: Any) -> None:
        if contract is not None:
            contract.check(messages)
        original(self, messages, *args, **kwargs)

    Publisher.publish_batch = publish_batch  # type: ignore[method-assign]


#: Events checked by pytest-xdist workers, summed on the controller.
_from_workers = 0


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """(xdist controller) add up what a worker checked."""
    global _from_workers
    _from_workers += int(getattr(node, "workeroutput", {}).get("event_contract_checked", 0))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """(xdist worker) report how many events this process checked."""
    if contract is not None and hasattr(session.config, "workeroutput"):
        session.config.workeroutput["event_contract_checked"] = contract.checked


def pytest_unconfigure(config: pytest.Config) -> None:
    """Put the publisher back."""
    global contract, _original
    if _original is not None:
        Publisher.publish_batch = _original  # type: ignore[method-assign]
    contract, _original = None, None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how many events were checked."""
    checked = (contract.checked if contract is not None else 0) + _from_workers
    if checked:
        terminalreporter.write_line(
            f"event contract: {checked} published change events validated "
            f"against {SCHEMA_FILE.name}")


@pytest.fixture(autouse=True)
def event_contract(request: pytest.FixtureRequest) -> Iterator[EventContract | None]:
    """Fail the test when it published a change event that breaks the contract."""
    if contract is not None:
        contract.take()  # leftovers of an earlier test's threads are not this test's
    yield contract
    if contract is None:
        return
    found = contract.take()
    if found and request.node.get_closest_marker(_MARKER) is None:
        shown = "\n  ".join(found[:20])
        more = f"\n  … and {len(found) - 20} more" if len(found) > 20 else ""
        pytest.fail(f"{len(found)} published change event(s) break the contract "
                    f"({SCHEMA_FILE.name}):\n  {shown}{more}", pytrace=False)

"""Reading the contract without a broker: topic patterns, --from values, tail lines."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bus.amqp.events import EventMessage, parse_event, topic_matches
from bus.amqp.history import parse_start, stream_offset
from bus.ops.tail import format_event
from connectors.base import SchemaError
from schemas.event import dumps, new_event


@pytest.mark.parametrize("pattern, key, expected", [
    ("#", "crm.customers.upsert", True),
    ("crm.#", "crm.customers.upsert", True),
    ("crm.#", "erp.customers.upsert", False),
    ("crm.customers.*", "crm.customers.delete", True),
    ("crm.customers.*", "crm.customers_x.delete", False),
    ("*.*.delete", "erp.items.delete", True),
    ("*.*.delete", "erp.items.upsert", False),
    ("*.items.#", "erp.items.upsert", True),
    ("#.upsert", "crm.customers.upsert", True),
    ("crm.#.upsert", "crm.upsert", True),
    ("crm.*", "crm.customers.upsert", False),
    ("crm.customers.upsert", "crm.customers.upsert", True),
])
def test_topic_patterns_match_like_rabbitmq(pattern, key, expected):
    assert topic_matches(pattern, key) is expected


@pytest.mark.parametrize("text, expected", [
    ("first", "first"), ("last", "last"), ("next", "next"), ("0", 0), ("1234", 1234),
    ("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)), ("2h", timedelta(hours=2)),
    ("7d", timedelta(days=7)),
    ("2026-03-01T08:00:00Z", datetime(2026, 3, 1, 8, tzinfo=UTC)),
    ("2026-03-01T08:00:00+00:00", datetime(2026, 3, 1, 8, tzinfo=UTC)),
])
def test_from_values(text, expected):
    assert parse_start(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "-5", "5x", ""])
def test_bad_from_values_say_what_is_accepted(text):
    with pytest.raises(ValueError, match="first, last, next"):
        parse_start(text)


def test_stream_offsets():
    assert stream_offset("first") == "first"
    assert stream_offset(12) == 12
    assert stream_offset(timedelta(minutes=15)) == "900s"  # the broker counts back itself
    naive = datetime(2026, 3, 1, 8)
    local = stream_offset(naive)
    assert isinstance(local, datetime) and local.tzinfo is not None  # naive means local time
    assert local == naive.astimezone()
    with pytest.raises(ValueError):
        stream_offset(-1)


def _message(**over: Any) -> EventMessage:
    args: dict[str, Any] = dict(connection="crm", entity="customers", op="upsert", key={"id": 7}, version=42,
                record={"id": 7, "name": "Anna"}, modified_at=None, cursor="c1",
                detected_at=datetime(2026, 3, 1, 8, 0, 1, 250000, tzinfo=UTC))
    args.update(over)
    event = new_event(**args)
    return EventMessage(f"crm.customers.{args['op']}", dumps(event), offset=None,
                        message_id=event["id"])


def test_a_tail_line_shows_time_routing_key_key_version_and_changed_fields():
    line = format_event(_message(changed=["name", "credit"])).plain
    local = datetime(2026, 3, 1, 8, 0, 1, 250000, tzinfo=UTC).astimezone()
    assert line == (f"{local:%Y-%m-%d %H:%M:%S}.250  crm.customers.upsert  "
                    '{"id":7}  v42  name, credit')
    assert format_event(_message()).plain.endswith("v42  *")  # the source did not say
    assert format_event(_message(op="delete", record=None)).plain.endswith("(deleted)")


def test_a_replayed_line_starts_with_its_offset_and_junk_is_shown_not_fatal():
    replayed = EventMessage("crm.customers.upsert", _message().body, offset=1234)
    assert format_event(replayed).plain.startswith("#1234  ")
    junk = EventMessage("x.y.z", b'{"n": 1}')
    assert "not a change event" in format_event(junk).plain


def test_parse_event_raises_schema_error_with_the_place():
    with pytest.raises(SchemaError, match=r"id: Field required \(and \d+ more problems\)"):
        parse_event(b'{"specversion": "1.0"}')
    with pytest.raises(SchemaError):
        parse_event(b"not json")
    assert parse_event(_message().body).data.key == {"id": 7}


def test_rich_output_is_plain_one_line_per_event_off_a_terminal():
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, highlight=False, soft_wrap=True, width=20)
    console.print(format_event(_message(changed=["a" * 50])))
    assert out.getvalue().count("\n") == 1 and "\x1b" not in out.getvalue()

"""How a message becomes a row of the transaction index."""

from __future__ import annotations

import json

import pytest

from bus.amqp.txrecord import event_id_of, index_row

EVENT_ID = "0b6c2f8e-3f5a-4c8e-9a51-6d0f1e2a3b4c"
LETTER = "5f0c0d7e9b1a4c2d8e3f4a5b6c7d8e9f"
HEADERS = {"x-syncbus-link": "items", "x-syncbus-queue": "syncbus.link.items.b2a",
           "x-syncbus-routing-key": "src.items.upsert", "x-syncbus-error-class": "SchemaError",
           "x-syncbus-error": "bad", "x-syncbus-last-failure": "2026-01-01T00:00:00+00:00"}


@pytest.mark.parametrize(("message_id", "body_id", "expected"), [
    (EVENT_ID, None, EVENT_ID),
    (None, EVENT_ID, EVENT_ID),
    ("order-4711", EVENT_ID, "order-4711"),  # the AMQP identity of a foreign publisher
    (LETTER, None, LETTER),  # a replayed copy of a transaction named by its letter
    ("o:123", None, "o:123"),
    ("", "", None), ("x" * 201, None, None), ("has space", "abc\u0000def", None),
    (EVENT_ID + "\n", None, None), (None, "x", None), (None, "has space", None),
    (None, LETTER, None),
])
def test_only_an_id_of_the_bus_names_a_transaction(message_id, body_id, expected):
    assert event_id_of(message_id, body_id) == expected


def test_foreign_messages_sharing_an_id_stay_separate_transactions():
    rows = [index_row(HEADERS, json.dumps({"id": "x"}).encode(), message_id=None,
                      status="error", letter=f"{n:032x}") for n in range(3)]
    assert [r["id"] for r in rows] == [f"{n:032x}" for n in range(3)]
    assert {(r["link"], r["direction"], r["error_class"]) for r in rows} == {
        ("items", "b2a", "SchemaError")}


def test_an_event_keeps_its_id_across_letters():
    body = json.dumps({"id": EVENT_ID, "data": {"key": {"id": 4}, "op": "upsert"}}).encode()
    rows = [index_row(HEADERS, body, message_id=None, status="error", letter=letter)
            for letter in (LETTER, "f" * 32)]
    assert {r["id"] for r in rows} == {EVENT_ID}
    assert [r["letter"] for r in rows] == [LETTER, "f" * 32]


def test_a_letter_rabbitmq_wrote_without_any_id_is_named_by_its_offset():
    row = index_row({}, b"\xff\xfe", message_id=None, status="error", offset=77)
    assert (row["id"], row["link"], row["direction"]) == ("o:77", "?", "?")
    assert row["unreadable"]

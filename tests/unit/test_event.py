"""The change event contract: deterministic ids, CloudEvents shape, JSON values."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from schemas.event import ChangeEvent, dumps, event_id, new_event, routing_key


def _event(**over):
    args = dict(connection="crm", entity="customers", op="upsert", key={"id": 7}, version=42,
                record={"id": 7, "name": "Anna", "credit": Decimal("10.50"),
                        "seen": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                        "blob": b"\x00\x01"},
                modified_at=None, cursor="41")
    args.update(over)
    return new_event(**args)


def test_the_same_change_detected_twice_has_the_same_id():
    assert _event()["id"] == _event(cursor="12")["id"]
    assert event_id("crm", "customers", {"id": 7}, 42) == _event()["id"]


def test_ids_differ_by_connection_entity_key_and_version():
    base = _event()["id"]
    assert len({base, _event(version=43)["id"], _event(key={"id": 8})["id"],
                _event(entity="contacts")["id"], _event(connection="erp")["id"]}) == 5


def test_key_field_order_does_not_change_the_id():
    assert event_id("a", "b", {"x": 1, "y": 2}, 1) == event_id("a", "b", {"y": 2, "x": 1}, 1)


def test_event_is_a_valid_cloudevent_with_json_values():
    raw = json.loads(dumps(_event()))
    event = ChangeEvent.model_validate(raw)
    assert event.specversion == "1.0"
    assert event.type == "io.syncbus.change.upsert"
    assert event.source == "/syncbus/crm/customers"
    assert event.subject == '{"id":7}'
    assert event.data.record == {"id": 7, "name": "Anna", "credit": "10.50",
                                 "seen": "2026-01-02T03:04:05+00:00", "blob": "AAE="}
    assert event.data.origin.connection == "crm" and event.data.origin.cursor == "41"


def test_delete_event_has_no_record():
    event = ChangeEvent.model_validate(_event(op="delete", record=None))
    assert event.data.op == "delete" and event.data.record is None


def test_routing_key():
    assert routing_key("crm", "customers", "delete") == "crm.customers.delete"

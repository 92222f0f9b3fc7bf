"""The published contract: the checked-in JSON Schema, its versioning, and the hot path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from bus.amqp.publisher import OutMessage
from schemas.event import (
    DATASCHEMA,
    EVENT_SCHEMA_VERSION,
    RELEASED_SCHEMA_DIR,
    SCHEMA_FILE,
    ChangeData,
    ChangeEvent,
    Origin,
    dumps,
    json_schema,
    new_event,
    released_schema_file,
    schema_incompatibilities,
)
from tests.event_contract import EventContract
from tests.syncenv import ROOT

MAJOR = EVENT_SCHEMA_VERSION.split(".")[0]


def _event(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        connection="crm", entity="customers", op="upsert", key={"id": 7}, version=42,
        record={"id": 7, "name": "Anna", "credit": Decimal("10.50"), "born": date(1990, 5, 1),
                "seen": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "blob": b"\x00\x01",
                "ref": uuid.UUID(int=5), "tags": ["a"], "meta": {"x": 1}, "none": None},
        modified_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), cursor="41")
    args.update(over)
    return new_event(**args)


def _validator() -> Draft202012Validator:
    return EventContract().validator


# -- the checked-in schema ---------------------------------------------------------------


def test_the_checked_in_schema_equals_the_one_generated_from_the_models():
    checked_in = json.loads(SCHEMA_FILE.read_text())
    assert checked_in == json_schema(), (
        f"{SCHEMA_FILE.name} is out of date: run `python -m schemas.event --write-schema`")


def test_the_schema_tool_reports_drift_with_its_exit_code():
    result = subprocess.run([sys.executable, "-m", "schemas.event", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_is_a_valid_draft_2020_12_schema_named_by_dataschema():
    schema = json.loads(SCHEMA_FILE.read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$id"] == DATASCHEMA == _event()["dataschema"]
    assert DATASCHEMA.endswith(f"/change-event/{EVENT_SCHEMA_VERSION}")
    assert SCHEMA_FILE.name == f"change-event.v{MAJOR}.json"


def test_the_schema_is_backward_compatible_with_every_released_version_of_its_major():
    current = json.loads(SCHEMA_FILE.read_text())
    released = sorted(RELEASED_SCHEMA_DIR.glob(f"change-event-{MAJOR}.*.json"))
    assert released, f"no released {MAJOR}.x schema in {RELEASED_SCHEMA_DIR}"
    for path in released:
        problems = schema_incompatibilities(json.loads(path.read_text()), current)
        assert not problems, f"breaks readers of {path.name}:\n" + "\n".join(problems)


def test_a_changed_schema_needs_a_new_version():
    """The released copy of the current version may differ in annotations only."""
    frozen = released_schema_file()
    assert frozen.exists(), (
        f"{frozen.name} is missing: run `python -m schemas.event --write-schema` to freeze it")
    released, current = json.loads(frozen.read_text()), json_schema()
    assert not schema_incompatibilities(released, current)
    assert not schema_incompatibilities(current, released), (
        f"the schema grew but EVENT_SCHEMA_VERSION is still {EVENT_SCHEMA_VERSION}: bump the "
        "minor version and run `python -m schemas.event --write-schema`")


# -- the compatibility rule ----------------------------------------------------------------


def _data(schema: dict[str, Any]) -> dict[str, Any]:
    return schema["$defs"]["ChangeData"]


@pytest.mark.parametrize("change", [
    "new optional field", "new description", "new title",
])
def test_additive_changes_are_compatible(change):
    old, new = json_schema(), copy.deepcopy(json_schema())
    if change == "new optional field":
        _data(new)["properties"]["tenant"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    elif change == "new description":
        _data(new)["properties"]["entity"]["description"] = "Something else."
    else:
        new["title"] = "renamed"
    assert schema_incompatibilities(old, new) == []


@pytest.mark.parametrize("change, expected", [
    ("removed field", "properties.changed: removed"),
    ("new required field", "required"),
    ("retyped field", "properties.entity.type"),
    ("narrowed enum", "properties.op.enum"),
    ("widened enum", "properties.op.enum"),
    ("closed object", "additionalProperties"),
    ("new pattern", "properties.subject.pattern: added"),
])
def test_breaking_changes_are_reported(change, expected):
    old, new = json_schema(), copy.deepcopy(json_schema())
    props = _data(new)["properties"]
    if change == "removed field":
        del props["changed"]
        _data(new)["required"].remove("changed")
    elif change == "new required field":
        props["tenant"] = {"type": "string"}
        _data(new)["required"].append("tenant")
    elif change == "retyped field":
        props["entity"]["type"] = "integer"
    elif change == "narrowed enum":
        props["op"]["enum"] = ["upsert"]
    elif change == "widened enum":
        props["op"]["enum"] = ["upsert", "delete", "truncate"]
    elif change == "closed object":
        _data(new)["additionalProperties"] = False
    else:
        new["properties"]["subject"]["pattern"] = "^{"
    problems = schema_incompatibilities(old, new)
    assert any(expected in p for p in problems), problems


# -- events against the schema -------------------------------------------------------------


@pytest.mark.parametrize("event", [
    _event(),
    _event(op="delete", record=None, modified_at=None, cursor=None),
    _event(version="W/\"etag-1\"", changed=["name"], previous={"name": "Ann",
                                                               "credit": Decimal("1.5")}),
    _event(key={"company": "C1", "no": 10}, detected_at=datetime(2026, 3, 1, tzinfo=UTC)),
], ids=["upsert", "delete", "etag-changed-previous", "compound-key"])
def test_new_event_validates_against_the_schema_and_the_model(event):
    wire = json.loads(dumps(event))
    errors = [e.message for e in _validator().iter_errors(wire)]
    assert errors == []
    assert ChangeEvent.model_validate(wire).model_dump(mode="json") == wire


def test_new_event_emits_exactly_the_fields_of_the_model():
    """The hot path and the model stay one contract: no field only one of them knows."""
    event = _event()
    assert set(event) == set(ChangeEvent.model_fields)
    assert set(event["data"]) == set(ChangeData.model_fields)
    assert set(event["data"]["origin"]) == set(Origin.model_fields)
    required = json_schema()["required"]
    assert set(required) == set(event)


def test_json_values_follow_the_documented_conventions():
    record = _event()["data"]["record"]
    assert record["credit"] == "10.50"  # decimals as strings: no precision lost
    assert record["seen"] == "2026-01-02T03:04:05+00:00"  # ISO 8601
    assert record["born"] == "1990-05-01"
    assert record["blob"] == "AAE="  # base64
    assert record["ref"] == "00000000-0000-0000-0000-000000000005"
    assert _event(changed=("name",), previous={"credit": Decimal("9.90")})["data"][
        "previous"] == {"credit": "9.90"}


def test_an_event_of_a_later_minor_version_still_validates_and_parses():
    """Readers ignore what they do not know: the forward half of the additive rule."""
    later = json.loads(dumps(_event()))
    later["dataschema"] = DATASCHEMA.rsplit("/", 1)[0] + f"/{MAJOR}.7"
    later["data"]["tenant"] = "north"
    later["data"]["origin"]["host"] = "db1"
    later["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert [e.message for e in _validator().iter_errors(later)] == []
    parsed = ChangeEvent.model_validate(later)
    assert parsed.data.model_extra == {"tenant": "north"}


@pytest.mark.parametrize("mutate, where", [
    (lambda e: e.pop("id"), "id"),
    (lambda e: e["data"].update(op="merge"), "op"),
    (lambda e: e.update(type="io.syncbus.change.merge"), "type"),
    (lambda e: e.update(time="2026-01-02T03:04:05"), "time"),  # no time zone
    (lambda e: e.update(dataschema="https://syncbus.dev/schemas/change-event/2.0"), "dataschema"),
    (lambda e: e["data"].pop("record"), "record"),
    (lambda e: e["data"]["origin"].pop("connection"), "connection"),
    (lambda e: e["data"].update(version=1.5), "version"),
])
def test_broken_events_are_rejected_by_the_schema(mutate, where):
    event = json.loads(dumps(_event()))
    mutate(event)
    errors = [f"{list(e.absolute_path)} {e.message}" for e in _validator().iter_errors(event)]
    assert errors and any(where in e for e in errors), errors


# -- the test-suite plugin ------------------------------------------------------------------


def _message(event: dict[str, Any], routing_key: str = "crm.customers.upsert",
             exchange: str = "syncbus.changes", message_id: str | None = None) -> OutMessage:
    return OutMessage(exchange, routing_key, dumps(event), message_id=message_id)


def test_the_plugin_checks_schema_and_routing_of_events_only():
    contract = EventContract()
    good = _event()
    assert contract.problems(_message(good, message_id=good["id"])) == []
    assert contract.problems(_message(good, routing_key="crm.customers.delete"))
    assert contract.problems(_message(good, message_id="other"))
    broken = dict(good, time="yesterday")
    assert contract.problems(_message(broken))
    assert contract.problems(_message(broken, exchange="")) == []  # a retry copy
    assert contract.problems(OutMessage("syncbus.changes", "a.t.upsert", b'{"n": 1}')) == []
    assert contract.checked == 4

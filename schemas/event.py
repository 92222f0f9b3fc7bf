"""The change event: CloudEvents 1.0, structured JSON mode.

One event per record change. Its ``id`` is deterministic — a hash of connection,
entity, key and version — so a change detected twice is the same event and
consumers deduplicate on it. Routing key on the ``syncbus.changes`` topic exchange:
``<connection>.<entity>.<op>``.

Values in ``data.record`` are JSON: datetimes as ISO 8601 strings, decimals as
strings (no precision lost), bytes as base64.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChangeData",
    "ChangeEvent",
    "EVENT_SCHEMA_VERSION",
    "EVENT_TYPE_PREFIX",
    "NAME_PATTERN",
    "Origin",
    "canonical_key",
    "dumps",
    "event_id",
    "json_value",
    "new_event",
    "routing_key",
    "valid_name",
]

#: Major.minor of the event contract; within a major version changes are additive only.
EVENT_SCHEMA_VERSION = "1.0"
#: CloudEvents ``type`` is this prefix plus the op: ``io.syncbus.change.upsert``.
EVENT_TYPE_PREFIX = "io.syncbus.change."
#: Connection, entity and link names: safe in routing keys, queue names and URLs.
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"
_NAME_RE = re.compile(NAME_PATTERN)


class Origin(BaseModel):
    """Where the change was detected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connection: str = Field(description="Name of the source connection in the config.")
    cursor: str | None = Field(
        default=None, description="Detector cursor of the page this change was read in."
    )


class ChangeData(BaseModel):
    """The ``data`` of a change event."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["upsert", "delete"]
    entity: str = Field(description="Entity (table, entity set) in the source system.")
    key: dict[str, Any] = Field(description="Key field(s) of the record in the source system.")
    version: int | str = Field(description="Source version (row version, version number, ETag).")
    modified_at: str | None = Field(
        default=None, description="Source modification time (ISO 8601), when known."
    )
    record: dict[str, Any] | None = Field(
        default=None, description="Every field of the record after the change; null for deletes."
    )
    changed: list[str] | None = Field(
        default=None, description="Names of the fields that changed, when the source tells."
    )
    previous: dict[str, Any] | None = Field(
        default=None, description="Previous values of changed fields, when the source provides them."
    )
    origin: Origin


class ChangeEvent(BaseModel):
    """A CloudEvents 1.0 envelope around :class:`ChangeData`."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str = Field(description="``/syncbus/<connection>/<entity>``")
    type: str = Field(description="``io.syncbus.change.<op>``")
    subject: str = Field(description="The record key as canonical JSON.")
    time: str = Field(description="When syncbus detected the change (ISO 8601, UTC).")
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str = f"https://syncbus.dev/schemas/change-event/{EVENT_SCHEMA_VERSION}"
    data: ChangeData


def json_value(value: Any) -> Any:
    """Convert a database value into its JSON form (see module docstring)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (dict, list)):
        return value
    return str(value)


def canonical_key(key: dict[str, Any]) -> str:
    """The key as compact JSON with sorted fields: stable across processes."""
    return json.dumps(
        {k: json_value(v) for k, v in key.items()}, sort_keys=True, separators=(",", ":")
    )


def event_id(connection: str, entity: str, key: dict[str, Any], version: int | str) -> str:
    """Deterministic event id: the same change detected twice has the same id."""
    digest = hashlib.sha256(
        f"{connection}\x1f{entity}\x1f{canonical_key(key)}\x1f{version}".encode()
    ).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


def routing_key(connection: str, entity: str, op: str) -> str:
    """``<connection>.<entity>.<op>`` — what subscribers bind to."""
    return f"{connection}.{entity}.{op}"


def valid_name(name: str) -> bool:
    """True when ``name`` is usable as a connection, entity or link name."""
    return bool(_NAME_RE.match(name))


def new_event(
    *,
    connection: str,
    entity: str,
    op: str,
    key: dict[str, Any],
    version: int | str,
    record: dict[str, Any] | None,
    modified_at: datetime | str | None,
    cursor: str | None,
    detected_at: datetime | None = None,
) -> dict[str, Any]:
    """Build a change event as a plain dict (the hot path: no model validation).

    The result validates against :class:`ChangeEvent`; tests check that it does.
    """
    json_key = {k: json_value(v) for k, v in key.items()}
    when = detected_at or datetime.now(UTC)
    return {
        "specversion": "1.0",
        "id": event_id(connection, entity, key, version),
        "source": f"/syncbus/{connection}/{entity}",
        "type": EVENT_TYPE_PREFIX + op,
        "subject": canonical_key(key),
        "time": when.isoformat(),
        "datacontenttype": "application/json",
        "dataschema": f"https://syncbus.dev/schemas/change-event/{EVENT_SCHEMA_VERSION}",
        "data": {
            "op": op,
            "entity": entity,
            "key": json_key,
            "version": version,
            "modified_at": json_value(modified_at),
            "record": None
            if record is None
            else {k: json_value(v) for k, v in record.items()},
            "changed": None,
            "previous": None,
            "origin": {"connection": connection, "cursor": cursor},
        },
    }


def dumps(event: dict[str, Any]) -> bytes:
    """Serialize an event dict to the bytes that go on the wire."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()

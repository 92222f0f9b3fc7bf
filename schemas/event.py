"""The change event: CloudEvents 1.0, structured JSON mode.

One event per record change. Its ``id`` is deterministic — a hash of connection,
entity, key and version — so a change detected twice is the same event and
consumers deduplicate on it. Routing key on the ``syncbus.changes`` topic exchange:
``<connection>.<entity>.<op>``.

Values in ``data.record`` are JSON: datetimes as ISO 8601 strings, decimals as
strings (no precision lost), bytes as base64.

The JSON Schema of the event is generated from :class:`ChangeEvent` and checked in
as ``schemas/change-event.v1.json``; ``docs/events.md`` is the contract in words.
Regenerate it after changing the models::

    python -m schemas.event --write-schema     # rewrite the checked-in schema
    python -m schemas.event --check            # exit 1 when it is out of date

Within a major version the schema only grows: new optional fields, never a
removed, renamed, retyped or newly required one (:func:`schema_incompatibilities`
is the rule as code). Every released minor version is frozen in
``schemas/released/change-event-<major>.<minor>.json``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

__all__ = [
    "ChangeData",
    "ChangeEvent",
    "DATASCHEMA",
    "EVENT_SCHEMA_VERSION",
    "EVENT_TYPE_PREFIX",
    "NAME_PATTERN",
    "Origin",
    "RELEASED_SCHEMA_DIR",
    "SCHEMA_FILE",
    "canonical_key",
    "dumps",
    "event_id",
    "json_schema",
    "json_value",
    "new_event",
    "released_schema_file",
    "routing_key",
    "schema_incompatibilities",
    "valid_name",
]

#: Major.minor of the event contract; within a major version changes are additive only.
EVENT_SCHEMA_VERSION = "1.0"
#: CloudEvents ``type`` is this prefix plus the op: ``io.syncbus.change.upsert``.
EVENT_TYPE_PREFIX = "io.syncbus.change."
#: Connection, entity and link names: safe in routing keys, queue names and URLs.
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"
_NAME_RE = re.compile(NAME_PATTERN)
#: The CloudEvents ``dataschema`` of every event: names the schema version.
DATASCHEMA = f"https://syncbus.dev/schemas/change-event/{EVENT_SCHEMA_VERSION}"
_MAJOR = EVENT_SCHEMA_VERSION.split(".")[0]
#: The checked-in JSON Schema of the current major version.
SCHEMA_FILE = Path(__file__).with_name(f"change-event.v{_MAJOR}.json")
#: Frozen copies of every released schema version, ``change-event-<major>.<minor>.json``.
RELEASED_SCHEMA_DIR = Path(__file__).with_name("released")
#: Keywords that only document a schema; changing them never breaks a reader.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$id"})


def _also_required(*names: str) -> Callable[[JsonDict], None]:
    """A ``json_schema_extra`` hook: ``names`` are always present (maybe null) on the wire.

    Fields added in a later minor version must stay optional, so readers of older
    events (the history stream keeps them) still validate.
    """

    def extra(schema: JsonDict) -> None:
        props = schema.get("properties")
        required = schema.get("required")
        wanted = {*(required if isinstance(required, list) else []), *names}
        schema["required"] = [n for n in (props if isinstance(props, dict) else {}) if n in wanted]

    return extra


class Origin(BaseModel):
    """Where the change was detected: the source connection and the detector cursor."""

    # Unknown fields are kept, not refused: a later minor version may add some.
    model_config = ConfigDict(extra="allow", frozen=True,
                              json_schema_extra=_also_required("cursor"))

    connection: str = Field(description="Name of the source connection in the syncbus config.")
    cursor: str | None = Field(
        default=None,
        description="Detector cursor the page holding this change was read from (opaque; "
        "null when unknown). Events of one page share it.",
    )


class ChangeData(BaseModel):
    """The change: what happened to which record, its values, and where it was seen."""

    # Unknown fields are kept, not refused: a later minor version may add some.
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra=_also_required("modified_at", "record", "changed", "previous"),
    )

    op: Literal["upsert", "delete"] = Field(
        description="upsert: the record was created or changed; delete: it is gone."
    )
    entity: str = Field(description="Entity (table, entity set) in the source system.")
    key: dict[str, Any] = Field(description="Key field(s) of the record in the source system.")
    version: int | str = Field(
        description="Source version (row version, version number, ETag); it grows with every "
        "change of the record when it is an integer."
    )
    modified_at: str | None = Field(
        default=None,
        description="Source modification time (ISO 8601, with offset when the source has "
        "one), or null when unknown.",
    )
    record: dict[str, Any] | None = Field(
        default=None,
        description="Every field of the record after the change (JSON values: decimals as "
        "strings, datetimes ISO 8601, bytes base64); null for deletes.",
    )
    changed: list[str] | None = Field(
        default=None,
        description="Names of the fields that changed, or null when the source does not tell.",
    )
    previous: dict[str, Any] | None = Field(
        default=None,
        description="Values of the changed fields before the change, or null when the source "
        "does not provide them.",
    )
    origin: Origin = Field(description="Where the change was detected.")


class ChangeEvent(BaseModel):
    """A syncbus change event: CloudEvents 1.0 in structured JSON mode; ``data`` is the change."""

    # CloudEvents extension attributes are allowed and kept.
    model_config = ConfigDict(
        extra="allow",
        title="syncbus change event",
        json_schema_extra=_also_required("specversion", "datacontenttype", "dataschema"),
    )

    specversion: Literal["1.0"] = Field(default="1.0", description="CloudEvents version.")
    id: str = Field(
        json_schema_extra={"format": "uuid"},
        description="Deterministic: a hash of connection, entity, key and version, so the same "
        "change detected twice has the same id. Deduplicate on it.",
    )
    source: str = Field(
        pattern=r"^/syncbus/[^/]+/[^/]+$", description="``/syncbus/<connection>/<entity>``"
    )
    type: Literal["io.syncbus.change.upsert", "io.syncbus.change.delete"] = Field(
        description="``io.syncbus.change.<op>``"
    )
    subject: str = Field(description="The record key as canonical JSON (sorted, compact).")
    time: str = Field(
        json_schema_extra={"format": "date-time"},
        description="When syncbus detected the change (RFC 3339, UTC).",
    )
    datacontenttype: Literal["application/json"] = Field(
        default="application/json", description="The data is JSON."
    )
    dataschema: str = Field(
        default=DATASCHEMA,
        pattern=rf"^https://syncbus\.dev/schemas/change-event/{_MAJOR}\.[0-9]+$",
        description="The schema version of the data: "
        "``https://syncbus.dev/schemas/change-event/<major>.<minor>``.",
    )
    data: ChangeData = Field(description="The change.")


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
    changed: Sequence[str] | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a change event as a plain dict (the hot path: no model validation).

    The result validates against :class:`ChangeEvent` and the checked-in JSON Schema
    and carries exactly the model's fields; tests check that it does.

    Args:
        connection: Source connection name (``origin.connection``, routing key part 1).
        entity: Source entity (routing key part 2).
        op: ``upsert`` or ``delete`` (routing key part 3).
        key: Key field(s) of the record.
        version: Source version of the record after the change.
        record: Every field after the change; None for deletes.
        modified_at: Source modification time, if known.
        cursor: Detector cursor the page was read from.
        detected_at: Detection time (default: now, UTC).
        changed: Names of the changed fields, when the source tells.
        previous: Values of the changed fields before the change, when the source has them.
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
        "dataschema": DATASCHEMA,
        "data": {
            "op": op,
            "entity": entity,
            "key": json_key,
            "version": version,
            "modified_at": json_value(modified_at),
            "record": None
            if record is None
            else {k: json_value(v) for k, v in record.items()},
            "changed": None if changed is None else list(changed),
            "previous": None
            if previous is None
            else {k: json_value(v) for k, v in previous.items()},
            "origin": {"connection": connection, "cursor": cursor},
        },
    }


def dumps(event: dict[str, Any]) -> bytes:
    """Serialize an event dict to the bytes that go on the wire."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


# -- the JSON Schema ------------------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :class:`ChangeEvent`, as checked in."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": DATASCHEMA,
        **ChangeEvent.model_json_schema(),
    }


def released_schema_file(version: str = EVENT_SCHEMA_VERSION) -> Path:
    """Where the frozen copy of schema ``version`` (``major.minor``) is kept."""
    return RELEASED_SCHEMA_DIR / f"change-event-{version}.json"


def schema_incompatibilities(old: Any, new: Any, path: str = "$") -> list[str]:
    """Why a reader of schema ``old`` and one of schema ``new`` cannot share events.

    The rule within a major version: ``new`` may add optional properties and change
    annotations (title, description, default, examples); everything else a reader
    relies on — properties, types, enums, patterns, the required list, whether unknown
    fields are allowed — stays as it was.

    Args:
        old: A released schema (parsed JSON).
        new: The schema that claims to extend it.
        path: Where in the schema the comparison is (for messages).

    Returns:
        One line per incompatibility; empty when ``new`` only adds.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        problems: list[str] = []
        for word in sorted((old.keys() | new.keys()) - _ANNOTATIONS):
            where = f"{path}.{word}"
            if word in ("properties", "$defs"):
                problems += _members(old.get(word, {}), new.get(word, {}), where)
            elif word in ("required", "enum"):
                before, after = old.get(word, []), new.get(word, [])
                if sorted(map(json.dumps, before)) != sorted(map(json.dumps, after)):
                    problems.append(f"{where}: {before} became {after}")
            elif word not in old or word not in new:
                problems.append(f"{where}: {'added' if word in new else 'removed'}")
            else:
                problems += schema_incompatibilities(old[word], new[word], where)
        return problems
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [p for i, (a, b) in enumerate(zip(old, new, strict=True))
                for p in schema_incompatibilities(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} became {new!r}"]


def _members(old: dict[str, Any], new: dict[str, Any], path: str) -> list[str]:
    """Compare named sub-schemas; new names are fine (``required`` is checked apart)."""
    problems = []
    for name, sub in old.items():
        if name not in new:
            problems.append(f"{path}.{name}: removed")
        else:
            problems += schema_incompatibilities(sub, new[name], f"{path}.{name}")
    return problems


def _render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m schemas.event [--write-schema | --check]``: the schema file tool."""
    parser = argparse.ArgumentParser(
        prog="python -m schemas.event",
        description="Print, check or rewrite the checked-in JSON Schema of the change event.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write-schema", action="store_true",
                        help=f"rewrite {SCHEMA_FILE.name} and freeze this version's copy")
    action.add_argument("--check", action="store_true",
                        help="exit 1 when the checked-in schema differs from the models")
    args = parser.parse_args(argv)
    schema = json_schema()
    if args.check:
        current = json.loads(SCHEMA_FILE.read_text()) if SCHEMA_FILE.exists() else None
        if current != schema:
            print(f"{SCHEMA_FILE} is out of date: run python -m schemas.event --write-schema")
            return 1
        return 0
    if not args.write_schema:
        sys.stdout.write(_render(schema))
        return 0
    frozen = released_schema_file()
    if frozen.exists():
        released = json.loads(frozen.read_text())
        if _strip(released) != _strip(schema):
            print(f"the models changed but EVENT_SCHEMA_VERSION is still {EVENT_SCHEMA_VERSION} "
                  f"({frozen.name} is released): bump the minor version for an additive "
                  "change, the major version for a breaking one")
            return 1
    else:
        frozen.parent.mkdir(exist_ok=True)
        frozen.write_text(_render(schema))
        print(f"froze {frozen}")
    SCHEMA_FILE.write_text(_render(schema))
    print(f"wrote {SCHEMA_FILE}")
    return 0


def _strip(schema: Any) -> Any:
    """``schema`` without annotations: what readers rely on."""
    if isinstance(schema, dict):
        return {k: {n: _strip(s) for n, s in v.items()} if k in ("properties", "$defs")
                else _strip(v) for k, v in schema.items() if k not in _ANNOTATIONS}
    if isinstance(schema, list):
        return [_strip(v) for v in schema]
    return schema


if __name__ == "__main__":
    raise SystemExit(_main())

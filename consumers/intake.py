"""What a link consumer accepts: every check a change event passes before it is used.

A link queue can receive anything a client with write permission publishes, so the
applier reads each delivery through :class:`Intake` first, in this order, and a
failure dead-letters the message with the reason (nothing is written, the ordering
guard is not consulted):

1. size: at most ``broker.max_event_bytes``;
2. integrity: the bus's signature (:mod:`bus.amqp.integrity`) → ``Unverified``;
3. JSON: UTF-8, no NaN/Infinity, nested at most :data:`MAX_DEPTH` levels;
4. the CloudEvents envelope and syncbus's data (the published schema,
   ``schemas/change-event.v1.json``): ``specversion``, an ``id`` of safe characters,
   ``type`` matching ``data.op``, a key of scalar values, a record for an upsert;
5. meaning: ``source``, ``data.entity`` and ``data.origin.connection`` name this
   flow's source, and the version is of the source connector's version type (an
   integer of at most 63 bits, or a short token where the connector uses ETags).

Everything but the signature is also what a subscriber would want checked, but only
link consumers enforce it: they are the ones that write.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bus.amqp.consumer import Delivery
from bus.amqp.integrity import BOUND_HEADERS, Signer
from connectors.base import SchemaError, Unverified
from consumers.flow import Flow
from schemas.event import EVENT_TYPE_PREFIX

__all__ = ["Intake", "MAX_DEPTH", "MAX_KEY_FIELDS", "ReadEvent"]

#: Containers nested inside one another in an event (the envelope itself uses 3).
MAX_DEPTH = 32
#: Fields of a record key.
MAX_KEY_FIELDS = 16
#: Characters of one key value, and of a version token.
MAX_KEY_TEXT = 1000
MAX_VERSION_TEXT = 512
#: Largest integer version: the state store keeps versions as signed 64-bit integers.
MAX_VERSION = 2**63 - 1
WINNER_HEADER = BOUND_HEADERS[0]
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ReadEvent:
    """A change event that passed :class:`Intake`."""

    id: str
    op: str
    version: int | str
    key: dict[str, Any]
    data: dict[str, Any]
    time: str | None


class Intake:
    """The checks of one flow (see the module docstring).

    Args:
        flow: The flow whose queue the events come from.
        signer: Verifies signatures; None accepts unsigned events (``syncbus preview``
            feeds the applier events it built itself).
        version_types: The source connector's version types
            (:attr:`connectors.base.Capabilities.version_types`).
        max_bytes: ``broker.max_event_bytes``.
    """

    def __init__(self, flow: Flow, *, signer: Signer | None,
                 version_types: tuple[type, ...] = (int,), max_bytes: int = 4 * 1024 * 1024) -> None:
        self.flow = flow
        self.signer = signer
        self.version_types = version_types
        self.max_bytes = max_bytes
        self.source = f"/syncbus/{flow.source.connection}/{flow.source.entity}"

    def read(self, delivery: Delivery) -> ReadEvent:
        """The event in ``delivery``, checked.

        Raises:
            Unverified: the bus did not sign it (or not with this key).
            SchemaError: anything else above; the text names the field.
        """
        body = delivery.body
        if len(body) > self.max_bytes:
            raise SchemaError(f"event is {len(body):,} bytes, larger than the limit of "
                              f"{self.max_bytes:,} (broker.max_event_bytes)")
        if self.signer is not None:
            problem = self.signer.problem(body, delivery.headers)
            if problem is not None:
                raise Unverified(f"unverified event: {problem}")
        event = _parse(body)
        # A resolved conflict's winner (signed) may carry a token version: the
        # connector could not read the record's version back (see bus.ops.conflicts).
        return self._check(event, token_ok=delivery.headers.get(WINNER_HEADER) is not None)

    def _check(self, event: Any, *, token_ok: bool = False) -> ReadEvent:
        if not isinstance(event, dict):
            raise _bad(f"the event is a JSON {_kind(event)}, not an object")
        if event.get("specversion") != "1.0":
            raise _bad("specversion must be \"1.0\"")
        event_id = event.get("id")
        if not isinstance(event_id, str) or not _ID_RE.match(event_id):
            raise _bad(f"id must be 1-128 letters, digits or ._:- (got {_show(event_id)})")
        data = event.get("data")
        if not isinstance(data, dict):
            raise _bad(f"data must be an object (got {_kind(data)})")
        op = data.get("op")
        if op not in ("upsert", "delete"):
            raise _bad(f"data.op must be upsert or delete (got {_show(op)})")
        if event.get("type") != EVENT_TYPE_PREFIX + op:
            raise _bad(f"type must be {EVENT_TYPE_PREFIX + op} for data.op {op} "
                       f"(got {_show(event.get('type'))})")
        self._check_origin(event, data)
        key = _key(data.get("key"))
        version = self._version(data.get("version"), token_ok=token_ok)
        record = data.get("record")
        if op == "upsert" and not isinstance(record, dict):
            raise _bad(f"data.record must be an object for an upsert (got {_kind(record)})")
        if op == "delete" and record is not None and not isinstance(record, dict):
            raise _bad(f"data.record must be an object or null (got {_kind(record)})")
        when = event.get("time")
        return ReadEvent(event_id, op, version, key, data, when if isinstance(when, str) else None)

    def _check_origin(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        """The event must come from this flow's source connection and entity."""
        flow = self.flow
        if event.get("source") != self.source:
            raise _bad(f"source {_show(event.get('source'))} is not this link's source "
                       f"{self.source!r} (link {flow.link!r}, {flow.direction})")
        if data.get("entity") != flow.source.entity:
            raise _bad(f"data.entity {_show(data.get('entity'))} is not this link's source "
                       f"entity {flow.source.entity!r}")
        origin = data.get("origin")
        connection = origin.get("connection") if isinstance(origin, dict) else None
        if connection != flow.source.connection:
            raise _bad(f"data.origin.connection {_show(connection)} is not this link's source "
                       f"connection {flow.source.connection!r}")

    def _version(self, version: Any, *, token_ok: bool) -> int | str:
        if isinstance(version, int) and not isinstance(version, bool) and int in self.version_types:
            if not 0 <= version <= MAX_VERSION:
                raise _bad(f"data.version {version} is outside 0..2^63-1")
            return version
        if isinstance(version, str) and (token_ok or str in self.version_types):
            if not version or len(version) > MAX_VERSION_TEXT or _CONTROL_RE.search(version):
                raise _bad(f"data.version must be 1-{MAX_VERSION_TEXT} printable characters")
            return version
        wanted = " or ".join("an integer" if t is int else "a string" for t in self.version_types)
        raise _bad(f"data.version must be {wanted} for connection "
                   f"{self.flow.source.connection!r} (got {_kind(version)} {_show(version)})")


def _parse(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise _bad(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise _bad(f"not JSON: {exc}") from None
    if _depth_exceeds(value, MAX_DEPTH):
        raise _bad(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when containers in ``value`` nest deeper than ``limit`` (iterative)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _key(key: Any) -> dict[str, Any]:
    if not isinstance(key, dict) or not key:
        raise _bad(f"data.key must be a non-empty object (got {_kind(key)})")
    if len(key) > MAX_KEY_FIELDS:
        raise _bad(f"data.key has {len(key)} fields (at most {MAX_KEY_FIELDS})")
    for name, value in key.items():
        if isinstance(value, str):
            if len(value) > MAX_KEY_TEXT or "\x00" in value:
                raise _bad(f"data.key.{_show(name)} must be at most {MAX_KEY_TEXT} "
                           "characters without NUL")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _bad(f"data.key.{_show(name)} is not a finite number")
        elif not isinstance(value, (int, bool)):
            raise _bad(f"data.key.{_show(name)} must be a string or a number "
                       f"(got {_kind(value)})")
    return key


def _bad(text: str) -> SchemaError:
    return SchemaError(f"malformed change event: {text}")


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A short, printable rendering of a value for an error text."""
    if isinstance(value, (dict, list)):
        return _kind(value)
    if isinstance(value, str):
        value = value[:61]
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."

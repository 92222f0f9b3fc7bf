"""Reading any message for display: the operator tools never crash on a message.

``syncbus status``, ``tx list``/``show``/``stats`` and ``tail`` show messages that syncbus
did not necessarily write: a foreign client's body, damaged headers, a 5 MB blob, JSON
nested 100,000 levels deep. This module is the one place where a message is read for
display. Nothing in it raises on any input, and each message costs bounded time and
memory: bodies over :data:`MAX_READ_BYTES` are not parsed, JSON deeper than
:data:`MAX_DEPTH` is refused, header tables are cut at :data:`MAX_HEADER_DEPTH`.

Body::

    body = read_body(raw)            # bytes, str (py-amqp decodes content_encoding), anything
    body.unreadable                  # None, or Unreadable(size, preview, reason)
    body.fields                      # EventFields: id, source, entity, op, key, version
    body.value                       # the JSON object, when at most MAX_SHOW_BYTES

Headers (as pika or py-amqp decoded them: any AMQP field type)::

    hdrs = cap_headers(raw)          # a copy with nesting cut; safe for json, repr, publish
    header_text(hdrs, name)          # str | None, whatever the type
    header_int(hdrs, name)           # int | None ("abc" → None)
    read_failure(hdrs, delivery_limit=20)   # syncbus's x-syncbus-* and RabbitMQ's x-death

Terminal: :func:`printable` escapes control, surrogate and bidi characters and truncates.

Decoding: :func:`harden_amqp_decoders` keeps pika and py-amqp from failing on a header
table nested thousands of levels deep, a timestamp Python cannot represent, or message
properties that are not UTF-8 (such a message arrives with only :data:`UNDECODABLE`).

The consumer reads what it acts on through the same module: :func:`body_bytes`,
:func:`count_header` and :func:`time_header` (a damaged value reads as "not set"), and
:func:`safe_headers` for retry and dead-letter copies, whose values pika can always
encode again (floats, integers beyond 64 bits and unknown types become text).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from bus.amqp.headers import headers

__all__ = [
    "Body",
    "EventFields",
    "Failure",
    "Headers",
    "MAX_COUNT",
    "MAX_DEPTH",
    "MAX_HEADER_DEPTH",
    "MAX_READ_BYTES",
    "MAX_SHOW_BYTES",
    "PREVIEW_BYTES",
    "ROUTING_KEY_RE",
    "UNDECODABLE",
    "Unreadable",
    "UnreadableJSON",
    "body_bytes",
    "cap_headers",
    "count_header",
    "escape_bytes",
    "harden_amqp_decoders",
    "header_history",
    "header_int",
    "header_text",
    "parse_json",
    "printable",
    "read_body",
    "read_failure",
    "safe_headers",
    "time_header",
]

#: JSON nested deeper than this is unreadable (a change event needs a handful of levels).
MAX_DEPTH = 64
#: Bodies larger than this are not parsed (RabbitMQ accepts up to 128 MiB).
MAX_READ_BYTES = 8 * 1024 * 1024
#: Bodies up to this size keep their parsed JSON for display; larger ones show a preview.
MAX_SHOW_BYTES = 64 * 1024
#: Bytes of a body shown as its preview.
PREVIEW_BYTES = 64
#: Header values nested deeper than this are replaced by a note.
MAX_HEADER_DEPTH = 8
#: Failure history entries kept for display.
MAX_HISTORY = 50


class UnreadableJSON(ValueError):
    """A body is not a readable JSON value; the message says why."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A message body that cannot be read: how big, how it starts, and why."""

    size: int
    #: The first :data:`PREVIEW_BYTES` bytes, escaped (printable ASCII only).
    preview: str
    reason: str

    def describe(self) -> str:
        """One line: ``unreadable (12 bytes): not JSON: …; starts with b'…'``."""
        size = "1 byte" if self.size == 1 else f"{self.size} bytes"
        return f"unreadable ({size}): {self.reason}; starts with b'{self.preview}'"


@dataclass(frozen=True, slots=True)
class EventFields:
    """What a body says about its change event, each field as text (None: absent).

    Read leniently: a JSON object with the wrong shape still gives what it has; an
    integer id or entity becomes its text; a key object becomes its canonical JSON.
    """

    id: str | None = None
    source: str | None = None
    entity: str | None = None
    op: str | None = None
    key: str | None = None
    #: An integer stays an integer; anything else is text.
    version: int | str | None = None


@dataclass(frozen=True, slots=True)
class Body:
    """A message body as read for display (see :func:`read_body`)."""

    size: int
    #: The JSON object, when readable and at most :data:`MAX_SHOW_BYTES`.
    value: dict[str, Any] | None = None
    unreadable: Unreadable | None = None
    fields: EventFields = field(default_factory=EventFields)
    #: The first bytes, escaped (also for readable bodies too large to show whole).
    preview: str = ""


@dataclass(frozen=True, slots=True)
class Failure:
    """What a message's headers say about its failures (see :func:`read_failure`)."""

    link: str | None = None
    routing_key: str = ""
    #: The work queue the message belongs to.
    queue: str | None = None
    #: Failed attempts; None when the header is there but not a number.
    attempts: int | None = 0
    replays: int = 0
    first_failure: str | None = None
    last_failure: str | None = None
    error_class: str | None = None
    error: str | None = None
    response: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    archived_at: str | None = None
    #: Deliveries before RabbitMQ's delivery limit dead-lettered it (None: not that case).
    deliveries: int | None = None


# -- body ---------------------------------------------------------------------------------


def read_body(raw: object, *, max_bytes: int = MAX_READ_BYTES,
              max_depth: int = MAX_DEPTH) -> Body:
    """Read a message body for display; never raises.

    Readable means: UTF-8 JSON text of at most ``max_bytes`` bytes, nested at most
    ``max_depth`` levels, whose top level is an object, with finite numbers only.

    Args:
        raw: The body: bytes (pika), str (py-amqp, when ``content_encoding`` is set or
            the body is empty), or anything else a client handed over.
        max_bytes: Larger bodies are not parsed.
        max_depth: Deeper JSON is unreadable.

    Returns:
        The body's fields, or an :class:`Unreadable` record saying why not.
    """
    data = body_bytes(raw)
    size = len(data) if data is not None else 0
    preview = escape_bytes(data[:PREVIEW_BYTES]) if data is not None else ""
    try:
        if data is None:
            raise UnreadableJSON(f"a body of type {type(raw).__name__}, not bytes")
        if size > max_bytes:
            raise UnreadableJSON(f"too large to read ({size} bytes; the tools read up to "
                                 f"{max_bytes})")
        value = parse_json(data, max_depth=max_depth)
    except UnreadableJSON as exc:
        return Body(size, unreadable=Unreadable(size, preview, str(exc)), preview=preview)
    if not isinstance(value, dict):
        reason = f"not a JSON object but {_kind(value)}"
        return Body(size, unreadable=Unreadable(size, preview, reason), preview=preview)
    return Body(size, value=value if size <= MAX_SHOW_BYTES else None,
                fields=_event_fields(value), preview=preview)


def parse_json(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON safely: UTF-8, at most ``max_depth`` levels, no NaN or infinity.

    Raises:
        UnreadableJSON: why the data is not readable JSON (``not JSON: …``,
            ``not UTF-8: …``, ``nested deeper than 64 levels``).
    """
    if isinstance(data, bytes):
        if not data:
            raise UnreadableJSON("empty body")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnreadableJSON(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    else:
        text = data
    if not text.strip():
        raise UnreadableJSON("empty body" if not text else "blank body")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        msg = exc.msg.removesuffix(" at")  # "Invalid control character at"
        raise UnreadableJSON(f"not JSON: {msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # the C scanner gives up near Python's recursion limit
        raise UnreadableJSON(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # NaN, an integer of more than 4,300 digits
        raise UnreadableJSON(f"not JSON: {exc}") from None
    problem = _shape_problem(value, max_depth)
    if problem:
        raise UnreadableJSON(problem)
    return value


def body_bytes(raw: object, encoding: str | None = None) -> bytes | None:
    """The bytes of a message body as a client handed it over; None when not a body.

    py-amqp decodes a body with its ``content_encoding`` and hands over ``str`` (also
    for an empty body); encoding it back with the same codec restores the bytes.
    """
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)
    if raw is None:
        return b""
    if not isinstance(raw, str):
        return None
    if encoding:
        with contextlib.suppress(LookupError, UnicodeError, TypeError, ValueError):
            restored = raw.encode(encoding)
            if isinstance(restored, bytes):
                return restored
    return raw.encode("utf-8", "surrogatepass")


def escape_bytes(data: bytes) -> str:
    """``data`` as printable ASCII: bytes outside 0x20–0x7e (and the backslash) as \\xNN."""
    return data.decode("latin-1").translate(_BYTE_ESCAPES)


_BYTE_ESCAPES = {b: f"\\x{b:02x}" for b in (*range(0x20), 0x5C, *range(0x7F, 0x100))} | {
    0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x5C: "\\\\"}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _shape_problem(value: Any, max_depth: int) -> str | None:
    """Too deep, or a number that is not finite; walked without recursion."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a number too large for JSON"
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            elif isinstance(child, float) and not math.isfinite(child):
                return "a number too large for JSON"
    return None


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def _event_fields(event: dict[str, Any]) -> EventFields:
    data = event.get("data")
    data = data if isinstance(data, dict) else {}
    version = data.get("version")
    return EventFields(
        id=_text(event.get("id")), source=_text(event.get("source")),
        entity=_text(data.get("entity")), op=_text(data.get("op")),
        key=_key_text(data.get("key")),
        version=version if isinstance(version, int) and not isinstance(version, bool)
        else _text(version))


def _key_text(key: Any) -> str | None:
    if isinstance(key, dict):
        from schemas.event import canonical_key  # noqa: PLC0415 - keeps this module light

        return canonical_key(key)
    return None if key is None else _json(key)


def _text(value: Any) -> str | None:
    """JSON value → text: strings as they are, anything else as compact JSON."""
    if value is None or isinstance(value, str):
        return value
    return _json(value)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


# -- headers ------------------------------------------------------------------------------


class Headers(dict[str, Any]):
    """A header table :func:`cap_headers` made safe: text keys, nesting cut."""


def cap_headers(raw: object, *, max_depth: int = MAX_HEADER_DEPTH) -> Headers:
    """A copy of a header table with text keys and nesting cut at ``max_depth``.

    Deeper tables and arrays become the text ``<nested deeper than 8 levels>``; the copy
    is safe to print, serialize and publish again. Anything but a table gives an empty
    one; a table this function made is returned as it is (capping again costs nothing).
    """
    if isinstance(raw, Headers):
        return raw
    out = Headers()
    if not isinstance(raw, Mapping):
        return out
    stack: list[tuple[Any, Any, int]] = [(raw, out, 1)]
    while stack:
        source, target, depth = stack.pop()
        is_table = isinstance(target, dict)
        for key, value in source.items() if is_table else enumerate(source):
            if isinstance(value, dict | list | tuple) or (
                    not isinstance(value, str | bytes | int) and isinstance(value, Mapping)):
                if depth >= max_depth:
                    value = f"<nested deeper than {max_depth} levels>"
                else:
                    copy: Any = [None] * len(value) if isinstance(value, list | tuple) else {}
                    stack.append((value, copy, depth + 1))
                    value = copy
            if is_table:
                target[key if type(key) is str else _scalar_text(key)] = value
            else:
                target[key] = value
    return out


def header_text(hdrs: Mapping[str, Any], name: str) -> str | None:
    """Header ``name`` as text, whatever its type; None when absent or null."""
    value = hdrs.get(name)
    if value is None:
        return None
    if isinstance(value, Mapping | list | tuple):
        return _json(cap_headers({"v": value})["v"])
    return _scalar_text(value)


def header_int(hdrs: Mapping[str, Any], name: str) -> int | None:
    """Header ``name`` as an integer; None when absent or not a whole number."""
    value = hdrs.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float | Decimal):
        with contextlib.suppress(ValueError, OverflowError, ArithmeticError):
            if value == int(value):
                return int(value)
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and _INT_RE.match(value):
        return int(value)
    return None


_INT_RE = re.compile(r"^\s*-?[0-9]{1,18}\s*$")


def header_history(hdrs: Mapping[str, Any], name: str) -> list[dict[str, str]]:
    """A history header, each entry's values as text; [] otherwise.

    The header is JSON text (a RabbitMQ stream keeps only scalar header values, so
    syncbus writes it that way) or, as written by syncbus before, a list of tables.
    """
    value = hdrs.get(name)
    if isinstance(value, str | bytes):
        try:
            value = parse_json(value, max_depth=4)
        except UnreadableJSON:
            return []
    if not isinstance(value, list | tuple):
        return []
    out = []
    for entry in value[-MAX_HISTORY:]:
        if isinstance(entry, Mapping):
            out.append({str(k): header_text(entry, k) or "" for k in entry})
        else:
            out.append({"unreadable": header_text({"v": entry}, "v") or ""})
    return out


def read_failure(raw: object, delivery_limit: int | None = None) -> Failure:
    """What the headers of a retried, dead-lettered or archived message say; never raises.

    A message dead-lettered by RabbitMQ itself carries ``x-death`` instead of syncbus's
    reason. For the delivery limit, the dead letter does not carry the delivery count
    (RabbitMQ 3.10 keeps ``x-delivery-count`` per queue: on a browsed dead letter it
    counts the browses), so it is worked out from the link queue's limit: a quorum
    queue dead-letters a message on its ``delivery_limit + 1``-th unsettled delivery.

    Args:
        raw: The header table (capped here when it is not yet).
        delivery_limit: The link queues' ``x-delivery-limit`` (``broker.delivery_limit``).
    """
    h = headers

    hdrs = cap_headers(raw)
    attempts = header_int(hdrs, h.ATTEMPTS)
    out = Failure(
        link=header_text(hdrs, h.LINK), routing_key=header_text(hdrs, h.ROUTING_KEY) or "",
        queue=header_text(hdrs, h.QUEUE),
        attempts=0 if hdrs.get(h.ATTEMPTS) is None else attempts,
        replays=max(0, header_int(hdrs, h.REPLAYS) or 0),
        first_failure=header_text(hdrs, h.FIRST_FAILURE),
        last_failure=header_text(hdrs, h.LAST_FAILURE),
        error_class=header_text(hdrs, h.ERROR_CLASS), error=header_text(hdrs, h.ERROR),
        response=header_text(hdrs, h.RESPONSE), history=header_history(hdrs, h.HISTORY),
        archived_at=header_text(hdrs, h.ARCHIVED_AT))
    death = _death(hdrs)
    if death is None or out.error:
        return out
    return _broker_failure(out, hdrs, death, delivery_limit)


def _broker_failure(out: Failure, hdrs: Mapping[str, Any], death: Mapping[str, Any],
                    delivery_limit: int | None) -> Failure:
    """The failure of a letter RabbitMQ dead-lettered itself (see :func:`read_failure`)."""
    reason = header_text(death, "reason") or "?"
    count = max(1, header_int(death, "count") or 1)
    queue = header_text(hdrs, "x-first-death-queue") or header_text(death, "queue") or ""
    keys = death.get("routing-keys")
    deliveries = (delivery_limit + 1) * count if (
        reason == "delivery_limit" and delivery_limit is not None) else None
    routing_key = out.routing_key
    if not routing_key and isinstance(keys, list) and keys:
        routing_key = header_text({"k": keys[0]}, "k") or ""
    return replace(
        out, link=out.link or _link_of_queue(queue), queue=out.queue or queue or None,
        routing_key=routing_key,
        last_failure=out.last_failure or header_text(death, "time"),
        error_class=f"Broker.{reason}", error=_death_text(reason, count, queue, delivery_limit),
        deliveries=deliveries)


def _death(hdrs: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The most recent death: ``x-death``'s first table, or — in a RabbitMQ stream,
    which keeps scalar header values only — what the ``x-first-death-*`` headers say."""
    deaths = hdrs.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]  # the most recent first
    reason = header_text(hdrs, "x-first-death-reason")
    if reason:
        return {"reason": reason, "queue": header_text(hdrs, "x-first-death-queue") or "",
                "count": 1}
    return None


def _death_text(reason: str, count: int, queue: str, delivery_limit: int | None) -> str:
    where = f" from {queue}" if queue else ""
    if reason == "delivery_limit":
        if delivery_limit is None:
            what = "delivered more often than the queue's delivery limit"
        elif count == 1:
            what = (f"delivered {delivery_limit + 1} times without being settled "
                    f"(delivery_limit {delivery_limit})")
        else:
            what = (f"dead-lettered {count} times, each after {delivery_limit + 1} unsettled "
                    f"deliveries (delivery_limit {delivery_limit})")
        return (f"dead-lettered by RabbitMQ{where}: {what}; the message kept crashing or "
                "stalling the consumer")
    why = {"expired": "its time to live ran out", "maxlen": "the queue was full",
           "rejected": "a consumer rejected it without a reason"}.get(reason, reason)
    times = f" ({count} times)" if count > 1 else ""
    return f"dead-lettered by RabbitMQ{where}: {why}{times}"


def _link_of_queue(queue: str) -> str | None:
    parts = queue.split(".")
    return parts[2] if len(parts) == 4 and parts[:2] == ["syncbus", "link"] else None


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return str(value)


# -- terminal and decoding ------------------------------------------------------------------


def printable(text: object, limit: int | None = None) -> str:
    """``text`` safe for a terminal: control, surrogate and bidi characters escaped
    (``\\x1b``, ``\\u202e``), cut to about ``limit`` characters with ``…``."""
    value = text if isinstance(text, str) else _scalar_text(text)
    if limit is not None and len(value) > limit:
        value = value[: max(limit - 1, 0)] + "…"
    return _UNPRINTABLE.sub(_escape_char, value)


_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ufeff\ufff9-\ufffb\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return {9: "\\t", 10: "\\n", 13: "\\r"}.get(code) or (
        f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def harden_amqp_decoders() -> None:
    """Make pika and py-amqp decode any header table RabbitMQ accepts.

    Both decode tables recursively, and RabbitMQ accepts a table nested some 26,000
    levels in one 128 KiB frame: past Python's recursion limit, so one such message
    broke every connection it was delivered on (RecursionError). Both also decode a
    timestamp with ``datetime.fromtimestamp``, which fails past the year 9999 (a Java
    client's ``new Date(Long.MAX_VALUE)``). Wrapped here, a table or array nested deeper
    than :data:`MAX_HEADER_DEPTH` is skipped by its length prefix and read as the text
    ``<nested deeper than 8 levels>``, a bad timestamp as ``<timestamp N out of range>``.
    The decoders look themselves up by module name at each level, so wrapping one
    function per client covers every level. Idempotent; called when :mod:`bus.amqp.deadlog`
    and :mod:`bus.amqp.events` are imported (the link consumer should call it too).
    """
    import amqp.serialization  # noqa: PLC0415 - the clients are only patched when used
    import pika.data  # noqa: PLC0415

    _tolerate_undecodable_properties()
    for module, name, as_bytes, naive in ((pika.data, "decode_value", True, False),
                                          (amqp.serialization, "_read_item", False, True)):
        original = getattr(module, name)
        if not getattr(original, "_syncbus_hardened", False):
            setattr(module, name, _tolerant_decoder(original, as_bytes, naive))


_nesting = threading.local()


def _tolerant_decoder(original: Any, as_bytes: bool, naive: bool) -> Any:
    """Wrap a client's ``decode(buf, offset) -> (value, offset)`` for one field value."""
    table, array, stamp = (b"F", b"A", b"T") if as_bytes else (0x46, 0x41, 0x54)

    def decode(buf: bytes, offset: int) -> tuple[Any, int]:
        kind = buf[offset:offset + 1] if as_bytes else buf[offset]
        if kind == stamp:
            return _timestamp(struct.unpack_from(">Q", buf, offset + 1)[0], naive), offset + 9
        if kind != table and kind != array:
            return original(buf, offset)  # type: ignore[no-any-return]
        depth = getattr(_nesting, "depth", 0)
        if depth >= MAX_HEADER_DEPTH:
            (length,) = struct.unpack_from(">I", buf, offset + 1)
            return f"<nested deeper than {MAX_HEADER_DEPTH} levels>", offset + 5 + length
        _nesting.depth = depth + 1
        try:
            return original(buf, offset)  # type: ignore[no-any-return]
        finally:
            _nesting.depth = depth

    decode._syncbus_hardened = True  # type: ignore[attr-defined]
    return decode


def _timestamp(seconds: int, naive: bool) -> datetime | str:
    try:
        when = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, ValueError, OSError):
        return f"<timestamp {seconds} out of range>"
    return when.replace(tzinfo=None) if naive else when


# -- reading for the consumer: counters, times, copies that can always be published ------

#: Largest counter (attempts, rounds, replays) read back from a header; beyond it the
#: value is taken as forged or damaged and reads as 0.
MAX_COUNT = 1_000_000
#: Characters of one header value kept in a retry or dead-letter copy.
MAX_COPY_TEXT = 4000
_INT64 = (-(2**63), 2**63 - 1)
#: An AMQP routing key or content type we publish with: printable, at most 255 bytes.
ROUTING_KEY_RE = re.compile(r"^[\x21-\x7e]{0,255}$")


def count_header(value: Any) -> int:
    """A syncbus counter header (attempts, round, replays): 0 when absent or not a count
    (a forged or damaged value beyond :data:`MAX_COUNT` included)."""
    count = header_int({"v": value}, "v")
    return count if count is not None and 0 <= count <= MAX_COUNT else 0


def time_header(value: Any) -> datetime | None:
    """A syncbus timestamp header (ISO 8601): None when absent or not a time."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def safe_headers(headers: Any) -> dict[str, Any]:
    """``headers`` with every value in a form the publisher can send (see module doc)."""
    if not isinstance(headers, dict):
        return {}
    out: dict[str, Any] = {}
    for name, value in headers.items():
        key = name if isinstance(name, str) else str(name)
        if len(key.encode("utf-8", "backslashreplace")) > 128:
            continue
        out[key] = _safe_value(value, 0)
    return out


def _safe_value(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, (bool, datetime)):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if isinstance(value, str):
        return value[:MAX_COPY_TEXT]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:MAX_COPY_TEXT])
    if isinstance(value, Decimal):
        return _safe_decimal(value)
    if depth >= MAX_HEADER_DEPTH and isinstance(value, (dict, list, tuple)):
        return "(nested too deep)"
    if isinstance(value, dict):
        return {str(k)[:128]: _safe_value(v, depth + 1) for k, v in list(value.items())[:100]}
    if isinstance(value, (list, tuple)):
        return [_safe_value(v, depth + 1) for v in list(value)[:100]]
    return repr(value)[:MAX_COPY_TEXT]


def _safe_decimal(value: Decimal) -> Decimal | str:
    """A decimal pika can pack (an int32 mantissa, at most 255 places), else its text."""
    if not value.is_finite():
        return str(value)
    exponent = value.normalize().as_tuple().exponent
    places = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    try:
        mantissa = int(value.normalize() * (Decimal(10) ** places))
    except (ArithmeticError, ValueError):
        return str(value)
    if places > 255 or not -(2**31) <= mantissa < 2**31:
        return str(value)
    return value


#: Header the tolerant decoder puts on a message whose properties could not be decoded.
UNDECODABLE = "x-syncbus-undecodable-properties"


def _tolerate_undecodable_properties() -> None:
    """Make py-amqp hand over a message whose properties it cannot decode.

    py-amqp decodes message properties while reading frames: a ``message_id`` that is
    not UTF-8 or a timestamp beyond the year 9999 (any AMQP client other than pika can
    send them) raises inside ``drain_events``, so the consumer never sees the message
    and RabbitMQ redelivers it until ``x-delivery-limit``, dead-lettering it without a
    reason. With this installed (idempotent, process-wide), such a message arrives
    with only the header :data:`UNDECODABLE` saying why, and the consumer dead-letters
    it with that reason.
    """
    from amqp import serialization  # noqa: PLC0415 - py-amqp internals, touched only here
    from amqp.spec import Basic  # noqa: PLC0415

    decode = serialization.PROPERTY_CLASSES[Basic.CLASS_ID]
    if getattr(decode, "_syncbus_tolerant", False):
        return

    def tolerant(buf: Any, offset: int) -> tuple[dict[str, Any], int]:
        try:
            props, end = decode(buf, offset)
        except Exception as exc:  # noqa: BLE001 - any failure: say why, hand it over
            reason = f"{type(exc).__name__}: {exc}"[:300]
            return {"application_headers": {UNDECODABLE: reason}}, offset
        return props, end

    tolerant._syncbus_tolerant = True  # type: ignore[attr-defined]
    serialization.PROPERTY_CLASSES[Basic.CLASS_ID] = tolerant

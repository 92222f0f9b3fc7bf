"""Reading messages that anyone may have published: bodies, header values, copies.

A work queue or ``syncbus.changes`` can receive messages from any AMQP client with
write permission, so nothing about a delivery is trusted before it is read here:

- :func:`body_bytes`: py-amqp hands a body over as ``str`` for an empty body, and
  when the publisher set ``content_encoding`` on a channel that decodes (consumers
  turn that off: ``channel.auto_decode = False``, since a decoded body cannot always
  be encoded back to the same bytes); this returns the bytes, or says why it cannot.
- :func:`count_header`, :func:`time_header`: syncbus's own counters and timestamps
  read back from headers, where a foreign or damaged value reads as "not set".
- :func:`safe_headers`: headers as the publisher (pika) can send them again, so the
  retry and dead-letter copy of a message can always be published: values pika
  cannot encode (floats, integers beyond 64 bits, unknown types) become text, and
  oversized or deeply nested values are cut.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

__all__ = [
    "MAX_COUNT",
    "ROUTING_KEY_RE",
    "UNDECODABLE",
    "body_bytes",
    "count_header",
    "safe_headers",
    "time_header",
    "tolerate_undecodable_properties",
]

#: Largest counter (attempts, rounds, replays) read back from a header; beyond it the
#: value is taken as forged or damaged and reads as 0.
MAX_COUNT = 1_000_000
#: Characters of one header value kept in a copy.
MAX_HEADER_TEXT = 4000
#: Nesting of tables and arrays kept in a copy.
MAX_HEADER_DEPTH = 8
_INT64 = (-(2**63), 2**63 - 1)
#: An AMQP routing key we publish with: printable, at most 255 bytes.
ROUTING_KEY_RE = re.compile(r"^[\x21-\x7e]{0,255}$")


def body_bytes(body: Any, content_encoding: Any = None) -> tuple[bytes, str | None]:
    """The bytes a message carried, and None; or what could be read, and why not.

    Args:
        body: ``message.body`` as kombu/py-amqp gives it (bytes, str, or other).
        content_encoding: The message's ``content_encoding`` property, if any: a ``str``
            body was decoded with it, so it is encoded back with it.

    Returns:
        ``(bytes, None)`` for a readable body; ``(best effort bytes, reason)`` otherwise.
    """
    if isinstance(body, bytes):
        return body, None
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body), None
    if isinstance(body, str):
        codec = content_encoding if isinstance(content_encoding, str) and content_encoding else "utf-8"
        try:
            return body.encode(codec), None
        except (LookupError, UnicodeError, TypeError, ValueError):
            pass
        try:
            return body.encode("utf-8"), None
        except UnicodeError:
            raw = body.encode("utf-8", "backslashreplace")
            return raw, f"body is text that cannot be encoded (content_encoding {codec!r})"
    return repr(body)[:200].encode("utf-8", "backslashreplace"), (
        f"body is a {type(body).__name__}, not bytes")


def count_header(value: Any) -> int:
    """A syncbus counter header (attempts, round, replays): 0 when absent or not a count."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, (str, bytes)) and value.strip().isdigit() and len(value) < 10:
            value = int(value)
        else:
            return 0
    return value if 0 <= value <= MAX_COUNT else 0


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
        return value[:MAX_HEADER_TEXT]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:MAX_HEADER_TEXT])
    if isinstance(value, Decimal):
        return _safe_decimal(value)
    if depth >= MAX_HEADER_DEPTH and isinstance(value, (dict, list, tuple)):
        return "(nested too deep)"
    if isinstance(value, dict):
        return {str(k)[:128]: _safe_value(v, depth + 1) for k, v in list(value.items())[:100]}
    if isinstance(value, (list, tuple)):
        return [_safe_value(v, depth + 1) for v in list(value)[:100]]
    return repr(value)[:MAX_HEADER_TEXT]


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


# -- AMQP properties that py-amqp cannot decode -----------------------------------------

#: Header the tolerant decoder puts on a message whose properties could not be decoded.
UNDECODABLE = "x-syncbus-undecodable-properties"


def tolerate_undecodable_properties() -> None:
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

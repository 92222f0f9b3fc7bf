"""Column types: portable names, and value conversion in both directions.

*Encoding* turns the JSON-shaped values of a change event (ISO 8601 strings for
dates and times, decimal strings, base64 strings for binary, plain ints, floats,
bools and strings) into the Python values the column's driver wants. It is strict:
a value that does not fit raises ``CoercionError`` naming the column and value.

*Decoding* is only needed for SQLite, whose columns hold whatever a program put in
them: it turns raw stored values into Python values (``Decimal``, ``datetime``,
``bool``, parsed JSON) and leaves a value it cannot convert as it is, so one odd
row never stops a change feed.

Date-time convention: a naive value written into a time-zone-aware column is taken
as UTC; an aware value written into a naive column is converted to UTC first.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeEngine

__all__ = [
    "CoercionError",
    "Converter",
    "PORTABLE_TYPES",
    "decoder_for",
    "encoder_for",
    "portable_type",
]

Converter = Callable[[Any], Any]

#: Every portable type name ``describe()`` reports.
PORTABLE_TYPES = (
    "string", "integer", "decimal", "float", "boolean", "date", "datetime", "time",
    "binary", "json", "uuid", "other",
)

# Order matters: Float is a Numeric, Enum is a String.
_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (sa.Boolean, "boolean"),
    (sa.Integer, "integer"),
    (sa.Float, "float"),
    (sa.Numeric, "decimal"),
    (sa.DateTime, "datetime"),
    (sa.Date, "date"),
    (sa.Time, "time"),
    ((sa.LargeBinary, sa.BINARY, sa.VARBINARY), "binary"),
    (sa.JSON, "json"),
    (sa.Uuid, "uuid"),
    (sa.String, "string"),
)

_TRUE = frozenset({"true", "t", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "f", "0", "no", "n", "off"})


class CoercionError(ValueError):
    """A value does not fit its column.

    Args:
        column: The column name.
        value: The offending value.
        reason: Why it does not fit.
    """

    def __init__(self, column: str, value: Any, reason: str) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:59] + "…"
        super().__init__(f"column {column!r}: cannot use {shown}: {reason}")
        self.column = column
        self.value = value


def portable_type(type_: TypeEngine[Any]) -> str:
    """The portable name of a reflected column type.

    Args:
        type_: A SQLAlchemy type (reflected from SQLite or PostgreSQL).

    Returns:
        One of ``PORTABLE_TYPES``.
    """
    for cls, name in _KINDS:
        if isinstance(type_, cls):
            return name
    return "other"


# ------------------------------------------------------------------ encoding (JSON → DB)


def _to_int(v: Any) -> int:
    if isinstance(v, int):  # bool included: True → 1
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, Decimal) and v.is_finite() and v == v.to_integral_value():
        return int(v)
    if isinstance(v, str):
        return int(v.strip())
    raise TypeError(f"not an integer ({type(v).__name__})")


def _to_decimal(v: Any) -> Decimal:
    if isinstance(v, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(v, Decimal):
        d = v
    elif isinstance(v, int):
        d = Decimal(v)
    elif isinstance(v, float):
        d = Decimal(repr(v))
    elif isinstance(v, str):
        try:
            d = Decimal(v.strip())
        except InvalidOperation:
            raise ValueError("not a decimal number") from None
    else:
        raise TypeError(f"not a number ({type(v).__name__})")
    if not d.is_finite():
        raise ValueError("not a finite number")
    return d


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(v, (int, float, Decimal, str)):
        f = float(v)
        if math.isnan(f):
            raise ValueError("not a number")
        return f
    raise TypeError(f"not a number ({type(v).__name__})")


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        word = v.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError("not a boolean")


def _parse_datetime(v: Any) -> datetime:
    if isinstance(v, datetime):
        return v
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day)
    if isinstance(v, str):
        return datetime.fromisoformat(v.strip())
    raise TypeError(f"not an ISO 8601 date-time ({type(v).__name__})")


def _datetime_encoder(aware: bool) -> Converter:
    def encode(v: Any) -> datetime:
        d = _parse_datetime(v)
        if aware:
            return d if d.tzinfo is not None else d.replace(tzinfo=UTC)
        return d.astimezone(UTC).replace(tzinfo=None) if d.tzinfo is not None else d

    return encode


def _to_date(v: Any) -> date:
    if isinstance(v, datetime):
        d = v
    elif isinstance(v, date):
        return v
    elif isinstance(v, str):
        try:
            return date.fromisoformat(v.strip())
        except ValueError:
            d = datetime.fromisoformat(v.strip())
    else:
        raise TypeError(f"not an ISO 8601 date ({type(v).__name__})")
    if d.time() != time(0):
        raise ValueError("has a time of day")
    return d.date()


def _to_time(v: Any) -> time:
    if isinstance(v, time):
        return v
    if isinstance(v, str):
        return time.fromisoformat(v.strip())
    raise TypeError(f"not an ISO 8601 time ({type(v).__name__})")


def _to_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return base64.b64decode(v, validate=True)
    raise TypeError(f"not base64 binary ({type(v).__name__})")


def _uuid_encoder(as_uuid: bool) -> Converter:
    def encode(v: Any) -> uuid.UUID | str:
        u = v if isinstance(v, uuid.UUID) else uuid.UUID(str(v))
        return u if as_uuid else str(u)

    return encode


def _to_str(v: Any) -> str:
    if isinstance(v, str):
        if "\x00" in v:
            raise ValueError("text with a NUL character (U+0000), which PostgreSQL cannot store")
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, Decimal, uuid.UUID)):
        return str(v)
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, (dict, list)):
        kind = "an object" if isinstance(v, dict) else "an array"
        raise TypeError(f"{kind} is not text: map the field to a JSON column, or pick a "
                        "value out of it with a transform")
    raise TypeError(f"not text ({type(v).__name__})")


def _identity(v: Any) -> Any:
    return v


def encoder_for(type_: TypeEngine[Any]) -> Converter:
    """A strict converter from a JSON-shaped value to what the column's driver wants.

    The converter is never called with None (None is always written as NULL).

    Args:
        type_: The reflected column type.

    Returns:
        A function raising ``ValueError`` / ``TypeError`` for a value that does not fit.
    """
    kind = portable_type(type_)
    if kind == "datetime":
        return _datetime_encoder(bool(getattr(type_, "timezone", False)))
    if kind == "uuid":
        return _uuid_encoder(bool(getattr(type_, "as_uuid", True)))
    return _ENCODERS.get(kind, _identity)


_ENCODERS: dict[str, Converter] = {
    "integer": _to_int,
    "decimal": _to_decimal,
    "float": _to_float,
    "boolean": _to_bool,
    "date": _to_date,
    "time": _to_time,
    "binary": _to_bytes,
    "string": _to_str,
}


# ------------------------------------------------------------- decoding (SQLite → Python)


def _lenient(convert: Converter) -> Converter:
    def decode(v: Any) -> Any:
        if v is None:
            return None
        try:
            return convert(v)
        except (ValueError, TypeError, ArithmeticError):
            return v

    return decode


def _decimal_decoder(scale: int | None) -> Converter:
    quantum = Decimal(1).scaleb(-scale) if scale is not None else None

    def decode(v: Any) -> Decimal:
        d = v if isinstance(v, Decimal) else Decimal(repr(v) if isinstance(v, float) else v)
        return d.quantize(quantum) if quantum is not None and d.is_finite() else d

    return decode


def _bool_decoder(v: Any) -> bool:
    return _to_bool(v)


def _json_decoder(v: Any) -> Any:
    return json.loads(v) if isinstance(v, (str, bytes)) else v


def _text_datetime(v: Any) -> datetime:
    if not isinstance(v, str):
        raise TypeError("not text")
    return datetime.fromisoformat(v)


def _text_date(v: Any) -> date:
    if not isinstance(v, str):
        raise TypeError("not text")
    return date.fromisoformat(v[:10]) if len(v) > 10 else date.fromisoformat(v)


def _text_time(v: Any) -> time:
    if not isinstance(v, str):
        raise TypeError("not text")
    return time.fromisoformat(v)


def decoder_for(type_: TypeEngine[Any]) -> Converter:
    """A lenient converter from a raw SQLite value to the Python value of the column type.

    Args:
        type_: The reflected column type.

    Returns:
        A function that never raises: a value it cannot convert is returned unchanged.
    """
    kind = portable_type(type_)
    if kind == "decimal":
        scale = getattr(type_, "scale", None)
        return _lenient(_decimal_decoder(scale if isinstance(scale, int) else None))
    convert: Converter | None = {
        "boolean": _bool_decoder,
        "json": _json_decoder,
        "datetime": _text_datetime,
        "date": _text_date,
        "time": _text_time,
        "float": _to_float,
    }.get(kind)
    return _lenient(convert) if convert is not None else _identity

"""Values between syncbus records and Dataverse JSON, in both directions.

Reading (``from_row``): a Web API row becomes a flat record keyed by column logical
names: ``_parentcustomerid_value`` → ``parentcustomerid`` (the GUID), plus
``parentcustomeridtype`` (from the ``lookuplogicalname`` annotation) for lookups
with several targets; ETags and annotations are dropped.

Writing (``to_body``): a record mapped to the target's columns becomes a PATCH body.
Values are converted to the column's JSON type (``42`` → ``"42"`` for text,
``"12.50"`` → ``12.5`` for money, naive date-times taken as UTC with ``Z``, dates
kept as ``YYYY-MM-DD`` for date-only columns…).
A lookup column becomes an ``@odata.bind`` on its navigation property:

=====================================  ==================================================
value of ``parentcustomerid``          sent as
=====================================  ==================================================
a GUID (text or ``uuid.UUID``)         ``parentcustomerid_account@odata.bind: /accounts(GUID)``
``{"accountnumber": "A-1"}``           ``…@odata.bind: /accounts(accountnumber='A-1')``
``"/contacts(GUID)"`` (entity path)    ``parentcustomerid_contact@odata.bind: /contacts(GUID)``
None                                   ``…@odata.bind: null`` (clears the lookup)
=====================================  ==================================================

For a lookup with several targets the target is ``<column>type`` when the record has
it (``account``/``contact``), the table of an entity path, else the first target.

Features
    * Read-only columns (``createdon``, ``versionnumber``…) are left out of bodies, so
      a Dataverse → Dataverse identity map works; unknown columns are sent as they
      are, for Dataverse to refuse with its own message.

Configuration
    None.

Limits
    * Alternate-key values containing ``/ ? # %`` are URL-encoded; real Dataverse may
      still refuse some characters in key values.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from connectors.dataverse.metadata import AttributeMeta, TableMeta

__all__ = [
    "ConversionError",
    "filter_literal",
    "from_row",
    "key_segment",
    "key_value",
    "parse_datetime",
    "to_body",
]

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_LOOKUP_NAME = "@Microsoft.Dynamics.CRM.lookuplogicalname"


class ConversionError(ValueError):
    """A value cannot be written to its column (the record is rejected, not sent)."""


# -- reading ------------------------------------------------------------------------------


def from_row(table: TableMeta, row: Mapping[str, Any]) -> dict[str, Any]:
    """A Web API row as a syncbus record (see the module docstring)."""
    out: dict[str, Any] = {}
    for attr in table.attributes.values():
        prop = attr.property_name
        if prop not in row:
            continue
        out[attr.name] = row[prop]
        if attr.is_lookup and len(attr.navigation) > 1:
            out[f"{attr.name}type"] = row.get(prop + _LOOKUP_NAME) if row[prop] else None
    return out


def parse_datetime(text: Any) -> datetime | None:
    """A Dataverse date-time (``2024-05-01T10:20:30Z``) as an aware datetime, else None."""
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# -- writing ------------------------------------------------------------------------------


def to_body(table: TableMeta, sets: Mapping[str, str], values: Mapping[str, Any],
            skip: set[str]) -> dict[str, Any]:
    """The PATCH body for ``values``.

    Args:
        table: The target table.
        sets: Logical name → entity set of every table (for bind paths).
        values: Column → value, as mapped by the link.
        skip: Columns not to send (the key columns in the URL).

    Returns:
        The JSON body.

    Raises:
        ConversionError: a value does not fit its column, or names an unknown target.
    """
    body: dict[str, Any] = {}
    for name, value in values.items():
        if name in skip:
            continue
        attr = table.attributes.get(name)
        if attr is None:
            if name.endswith("type") and name[:-4] in table.attributes:
                continue  # the target of a polymorphic lookup, used below
            body[name] = _plain(value)
            continue
        if not attr.writable or attr.primary_id:
            continue
        if attr.is_lookup:
            nav, path = _bind(attr, sets, value, values.get(f"{name}type"))
            body[f"{nav}@odata.bind"] = path
            continue
        body[name] = _convert(attr, value)
    return body


def key_segment(table: TableMeta, key: Mapping[str, Any]) -> str:
    """The URL of a row by primary id or alternate key: ``accounts(accountnumber='A-1')``.

    Raises:
        ConversionError: the columns are neither the primary id nor an alternate key.
    """
    if set(key) == {table.primary_id}:
        return f"{table.entity_set}({_guid(key[table.primary_id], table.primary_id)})"
    if table.is_key(list(key)) is None:
        keys = ", ".join("(" + ", ".join(k) + ")" for k in table.keys) or "none"
        raise ConversionError(
            f"({', '.join(key)}) is neither the primary id ({table.primary_id}) nor an "
            f"alternate key of {table.logical_name} (alternate keys: {keys})")
    parts = []
    for column, value in key.items():
        attr = table.attributes.get(column)
        converted = _convert(attr, value) if attr is not None and not attr.is_lookup else value
        name = attr.property_name if attr is not None else column
        parts.append(f"{name}={_literal(converted)}")
    return f"{table.entity_set}({','.join(parts)})"


def key_value(attr: AttributeMeta, value: Any) -> Any:
    """A key column's value in its JSON form (GUIDs of ids and lookups lower-case).

    Raises:
        ConversionError: the value does not fit the column (or is null).
    """
    if value is None:
        raise ConversionError(f"column {attr.name!r}: a key value cannot be null")
    if attr.primary_id or attr.is_lookup or attr.type == "Uniqueidentifier":
        return _guid(value, attr.name)
    return _convert(attr, value)


def filter_literal(attr: AttributeMeta, value: Any) -> str:
    """A ``key_value`` as a ``$filter`` literal (not URL-encoded): ``'A-1'``, ``42``, a bare
    GUID or date-time."""
    if attr.primary_id or attr.is_lookup or attr.type in ("Uniqueidentifier", "DateTime"):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    text = str(value)
    if _GUID.match(text):
        return text
    return "'" + urllib.parse.quote(text.replace("'", "''"), safe="-_.~!$&*+,;=:@'") + "'"


def _bind(attr: AttributeMeta, sets: Mapping[str, str], value: Any,
          target_hint: Any) -> tuple[str, str | None]:
    targets = attr.navigation
    if not targets:
        raise ConversionError(f"lookup {attr.name!r} has no target table in the metadata")
    target = str(target_hint) if target_hint else next(iter(targets))
    if isinstance(value, str) and "(" in value and value.rstrip().endswith(")"):
        path = value if value.startswith("/") else f"/{value}"
        named_set = path[1:path.index("(")]
        target = next((t for t in targets if sets.get(t) == named_set), "")
        if not target:
            raise ConversionError(f"{value!r} is not a row of a table {attr.name!r} may refer "
                                  f"to ({', '.join(targets)})")
        return targets[target], path
    if target not in targets:
        raise ConversionError(f"lookup {attr.name!r} cannot refer to a {target!r} (targets: "
                              f"{', '.join(targets)})")
    if value is None:
        return targets[target], None
    entity_set = sets.get(target)
    if entity_set is None:
        raise ConversionError(f"table {target!r} of lookup {attr.name!r} is unknown")
    if isinstance(value, Mapping):
        parts = ",".join(f"{k}={_literal(v)}" for k, v in value.items())
        return targets[target], f"/{entity_set}({parts})"
    return targets[target], f"/{entity_set}({_guid(value, attr.name)})"


def _guid(value: Any, column: str) -> str:
    text = str(value).strip("{}")
    if not _GUID.match(text):
        raise ConversionError(f"column {column!r}: {value!r} is not a GUID")
    return text.lower()


def _plain(value: Any) -> Any:
    """A value as JSON can carry it."""
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _convert(attr: AttributeMeta | None, value: Any) -> Any:
    if value is None or attr is None:
        return _plain(value)
    convert = _CONVERTERS.get(attr.type)
    if convert is None:
        return _plain(value)
    try:
        return convert(value)
    except (TypeError, ValueError, InvalidOperation) as exc:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:59] + "…"
        raise ConversionError(f"column {attr.name!r} ({attr.type}): cannot use {shown}: "
                              f"{exc}") from None


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(_plain(value))


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    number = Decimal(str(value).strip())
    if number != number.to_integral_value():
        raise ValueError("not a whole number")
    return int(number)


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    return float(Decimal(str(value).strip()) if isinstance(value, str) else value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    raise ValueError("not a boolean")


def _datetime(value: Any) -> str:
    """Date-times as UTC ``…Z``; dates (date-only columns) stay ``YYYY-MM-DD``."""
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date):
        return value.isoformat()
    text = str(value).strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return text
    return _iso(datetime.fromisoformat(text.replace("Z", "+00:00")))


def _uuid(value: Any) -> str:
    return _guid(value, "value")


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "String": _text, "Memo": _text, "Integer": _integer, "BigInt": _integer,
    "Picklist": _integer, "State": _integer, "Status": _integer, "Decimal": _number,
    "Money": _number, "Double": _number, "Boolean": _boolean, "DateTime": _datetime,
    "Uniqueidentifier": _uuid,
}

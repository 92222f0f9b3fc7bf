"""Rows in and out of the emulator: JSON bodies to stored values, rows to JSON.

Features
    * ``read_body``: checks every property of a create/update body against the table
      definition (unknown property, wrong JSON type, too long, out of range, bad
      option) and turns ``nav@odata.bind`` references (``/accounts(guid)``, full URLs,
      alternate keys, ``$n`` batch references, ``null`` to clear) into lookups.
    * ``render``: a stored row as Web API JSON: ``@odata.etag``, ``$select``ed
      properties, lookups as ``_x_value`` with the ``lookuplogicalname`` /
      ``associatednavigationproperty`` / ``FormattedValue`` annotations when the
      client asked for them (``Prefer: odata.include-annotations``).

Configuration
    None.

Limits
    * Deep insert (nested objects) and collection-valued navigation properties are
      rejected with a 400.
    * Formatted values exist for lookups, booleans, money and option values only.
"""

from __future__ import annotations

import fnmatch
import math
import re
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import date
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from connectors.dataverse.emulator.errors import (
    CODE_PAYLOAD,
    CODE_VALIDATION,
    ODataError,
    bad_query,
    not_found,
)
from connectors.dataverse.emulator.keys import parse_key_segment
from connectors.dataverse.emulator.model import AttributeDef, EntityDef
from connectors.dataverse.emulator.odata import format_datetime, parse_datetime

if TYPE_CHECKING:
    from connectors.dataverse.emulator.store import Store, Table

__all__ = [
    "Annotations",
    "annotation_filter",
    "coerce",
    "etag",
    "find_row",
    "key_columns",
    "read_body",
    "render",
]

Row = dict[str, Any]
#: Whether an annotation term is wanted.
Annotations = Callable[[str], bool]

_LOOKUP_ANNOTATIONS = (
    "Microsoft.Dynamics.CRM.associatednavigationproperty",
    "Microsoft.Dynamics.CRM.lookuplogicalname",
)
_FORMATTED = "OData.Community.Display.V1.FormattedValue"


def etag(row: Mapping[str, Any]) -> str:
    """The row's weak ETag, ``W/"<versionnumber>"``."""
    return f'W/"{row["versionnumber"]}"'


def annotation_filter(preference: str | None) -> Annotations:
    """Turn ``odata.include-annotations="…"`` into a term matcher (None: nothing)."""
    if not preference:
        return lambda _term: False
    patterns = [p.strip() for p in preference.strip('"').split(",") if p.strip()]
    return lambda term: any(fnmatch.fnmatchcase(term, p) for p in patterns)


# -- output -------------------------------------------------------------------------------------


def render(store: Store, entity: EntityDef, row: Row, select: list[AttributeDef] | None,
           wanted: Annotations) -> Row:
    """A stored row as Web API JSON.

    Args:
        store: For formatted values of lookups (the target's primary name).
        entity: The row's table.
        row: The stored row.
        select: Columns to return (the primary id is always added); None: all.
        wanted: Which annotations the client asked for.

    Returns:
        The JSON object.
    """
    out: Row = {"@odata.etag": etag(row)}
    columns = entity.properties() if select is None else select
    if select is not None and not any(a.logical_name == entity.primary_id for a in select):
        out[entity.primary_id] = row.get(entity.primary_id)
    for attr in columns:
        value = row.get(attr.logical_name)
        if attr.is_lookup:
            prop = attr.property_name
            lookup = value if isinstance(value, dict) else None
            if lookup is not None and wanted(_FORMATTED):
                out[f"{prop}@{_FORMATTED}"] = _primary_name(store, lookup)
            if lookup is not None and wanted(_LOOKUP_ANNOTATIONS[0]):
                nav = attr.logical_name if len(attr.targets) == 1 else (
                    f"{attr.logical_name}_{lookup['logicalname']}")
                out[f"{prop}@{_LOOKUP_ANNOTATIONS[0]}"] = nav
            if lookup is not None and wanted(_LOOKUP_ANNOTATIONS[1]):
                out[f"{prop}@{_LOOKUP_ANNOTATIONS[1]}"] = lookup["logicalname"]
            out[prop] = lookup["id"] if lookup is not None else None
            continue
        if value is not None and wanted(_FORMATTED):
            formatted = _formatted(attr, value)
            if formatted is not None:
                out[f"{attr.logical_name}@{_FORMATTED}"] = formatted
        out[attr.logical_name] = value
    return out


def _primary_name(store: Store, lookup: Mapping[str, Any]) -> str | None:
    table = store.tables.get(lookup["logicalname"])
    if table is None or table.entity.primary_name is None:
        return None
    target = table.rows.get(lookup["id"])
    return None if target is None else target.get(table.entity.primary_name)


def _formatted(attr: AttributeDef, value: Any) -> str | None:
    if attr.type == "Boolean":
        return "Yes" if value else "No"
    if attr.type == "Money":
        return f"${value:,.2f}"
    if attr.type in ("Picklist", "State", "Status"):
        return str(value)
    return None


# -- input --------------------------------------------------------------------------------------


def read_body(store: Store, entity: EntityDef, body: Any, *, creating: bool, base_url: str,
              content_ids: Mapping[str, str] | None = None) -> Row:
    """Validate a create/update body and convert it to stored values.

    Args:
        store: To resolve ``@odata.bind`` targets.
        entity: The table written.
        body: The parsed JSON body.
        creating: True for a create (``IsValidForCreate`` applies), else an update.
        base_url: The Web API root, stripped from absolute bind URLs.
        content_ids: ``$n`` → entity URL, inside a ``$batch`` change set.

    Returns:
        Column → stored value (read-only columns are dropped, as Dataverse ignores them).

    Raises:
        ODataError: 400 for a malformed body or value, 404 for a bind to a missing row.
    """
    if not isinstance(body, dict):
        raise _payload(entity, "The request body must be a JSON object.")
    navigation = entity.navigation()
    values: Row = {}
    for name, value in body.items():
        if name.endswith("@odata.bind"):
            nav = name[: -len("@odata.bind")]
            if nav not in navigation:
                raise _payload(entity, f"An undeclared property '{nav}' which only has property "
                               "annotations in the payload but no property value was found in "
                               "the payload. In OData, only declared navigation properties and "
                               "declared named streams can be represented as properties without "
                               "values.")
            lookup, target = navigation[nav]
            values[lookup.logical_name] = _bind(store, target, value, base_url, content_ids)
            continue
        if "@" in name:
            continue  # instance annotations (@odata.type …) are ignored
        attr = entity.attribute(name)
        if attr is None or attr.is_lookup or attr.type == "EntityName":
            if name in navigation and isinstance(value, dict | list):
                raise _payload(entity, f"Deep insert through '{name}' is not supported by "
                               "the emulator; create the row and bind it with @odata.bind.")
            raise _payload(entity, f"The property '{name}' does not exist on type "
                           f"'{entity.type_name}'. Make sure to only use property names that "
                           "are defined by the type or mark the type as open type.")
        if not (attr.valid_for_create if creating else attr.valid_for_update):
            continue  # read-only columns, and the primary id on update, are ignored
        values[attr.logical_name] = coerce(entity, attr, value)
    return values


def coerce(entity: EntityDef, attr: AttributeDef, value: Any) -> Any:
    """Check one JSON value against its column and return the stored value.

    Raises:
        ODataError: 400 with Dataverse's wording.
    """
    if value is None:
        return None
    kind = attr.type
    if kind in ("String", "Memo", "EntityName"):
        text = _expect(entity, attr, value, str)
        if attr.max_length is not None and len(text) > attr.max_length:
            raise _invalid(f"The length of the '{attr.logical_name}' attribute of the "
                           f"'{entity.logical_name}' entity exceeded the maximum allowed length "
                           f"of '{attr.max_length}'.")
        return text
    if kind in ("Integer", "BigInt", "Picklist", "State", "Status"):
        number = _expect(entity, attr, value, int)
        if attr.options and number not in attr.options:
            raise _invalid(f"The value {number} of '{attr.logical_name}' on record of type "
                           f"'{entity.logical_name}' is outside the valid range. Accepted Values: "
                           + ",".join(str(o) for o in attr.options))
        return _in_range(entity, attr, number)
    if kind in ("Decimal", "Money", "Double"):
        number = _expect(entity, attr, value, (int, float))
        if isinstance(number, float) and not math.isfinite(number):
            raise _cannot_convert(entity, attr, value)
        rounded = float(round(Decimal(str(number)), attr.precision if attr.precision is not None else 10))
        return _in_range(entity, attr, rounded)
    if kind == "Boolean":
        return _expect(entity, attr, value, bool)
    if kind == "DateTime":
        return _datetime(entity, attr, _expect(entity, attr, value, str))
    if kind == "Uniqueidentifier":
        text = _expect(entity, attr, value, str)
        if not re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", text):
            raise _cannot_convert(entity, attr, value)
        return text.lower()
    raise _cannot_convert(entity, attr, value)


def _expect(entity: EntityDef, attr: AttributeDef, value: Any, types: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and types is not bool:
        raise _cannot_convert(entity, attr, value)
    if not isinstance(value, types):
        raise _cannot_convert(entity, attr, value)
    return value


def _in_range(entity: EntityDef, attr: AttributeDef, number: float) -> Any:
    low, high = attr.min_value, attr.max_value
    if (low is not None and number < low) or (high is not None and number > high):
        raise _invalid(f"The value {number} of '{attr.logical_name}' on record of type "
                       f"'{entity.logical_name}' is outside the valid range. Accepted Values: "
                       f"{low:g} to {high:g}")
    return number


def _datetime(entity: EntityDef, attr: AttributeDef, text: str) -> str:
    try:
        if attr.date_only:
            return date.fromisoformat(text[:10]).isoformat()
        if not re.search(r"(Z|[+-]\d{2}:\d{2})$", text):
            raise ValueError("no offset")
        return format_datetime(parse_datetime(text))
    except ValueError:
        raise _cannot_convert(entity, attr, text) from None


def _cannot_convert(entity: EntityDef, attr: AttributeDef, value: Any) -> ODataError:
    shown = value if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else value
    return _payload(entity, f"Cannot convert the literal '{shown}' to the expected type "
                    f"'{attr.edm_type}'.")


def _payload(entity: EntityDef, inner: str) -> ODataError:
    return ODataError(400, CODE_PAYLOAD, (
        f"Error identified in Payload provided by the user for Entity :'{entity.entity_set}', "
        "For more information on this error please follow this help link "
        "https://go.microsoft.com/fwlink/?linkid=2195293  ---->  InnerException : "
        f"Microsoft.OData.ODataException: {inner}"))


def _invalid(message: str) -> ODataError:
    return ODataError(400, CODE_VALIDATION, f"A validation error occurred. {message}")


def _bind(store: Store, target: str, value: Any, base_url: str,
          content_ids: Mapping[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_query("The value of an @odata.bind annotation must be an entity URL.")
    ref = value
    if ref.startswith("$") and content_ids is not None:
        if ref not in content_ids:
            raise bad_query(f"Content-ID Reference: '{ref}' does not exist in the batch context.")
        ref = content_ids[ref]
    if ref.startswith(base_url):
        ref = ref[len(base_url):]
    ref = urllib.parse.unquote(ref.lstrip("/"))
    set_name, key = parse_key_segment(ref)
    table = store.sets.get(set_name)
    if table is None or key is None or "/" in set_name:
        raise bad_query(f"The @odata.bind value '{value}' is not an entity URL.")
    if table.entity.logical_name != target:
        raise bad_query(f"The @odata.bind value '{value}' refers to a '{table.entity.logical_name}'"
                        f" but the navigation property expects a '{target}'.")
    row_id = find_row(table, key)
    if row_id is None:
        raise not_found(target, key if isinstance(key, str) else _key_text(key))
    return {"id": row_id, "logicalname": target}


def _key_text(key: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in key.items())


def find_row(table: Table, key: str | dict[str, Any]) -> str | None:
    """The id of the row a URL key names, or None when no such row exists.

    Args:
        table: The table.
        key: A GUID, or named key parts (primary id, or an alternate key's columns;
            lookups written as ``_x_value``).

    Raises:
        ODataError: 400 when the named parts are not a defined key.
    """
    entity = table.entity
    if isinstance(key, str):
        return key if key in table.rows else None
    if set(key) == {entity.primary_id}:
        value = str(key[entity.primary_id]).lower()
        return value if value in table.rows else None
    columns: dict[str, Any] = {}
    for prop, value in key.items():
        attr = entity.by_property(prop)
        if attr is None:
            break
        columns[attr.logical_name] = {"id": value} if attr.is_lookup else value
    definition = entity.key_for(set(columns)) if len(columns) == len(key) else None
    if definition is None:
        raise bad_query(f"The key in the request URI is not valid for resource "
                        f"'{entity.type_name}'. Ensure that the names and number of key "
                        "properties are correct.")
    return table.find(definition, columns)


def key_columns(table: Table, key: str | dict[str, Any]) -> Row:
    """Stored values of the key columns a URL key names (to copy into a created row)."""
    entity = table.entity
    if isinstance(key, str):
        return {entity.primary_id: key}
    out: Row = {}
    for prop, value in key.items():
        attr = entity.by_property(prop)
        if attr is None:
            continue
        if attr.is_lookup:
            out[attr.logical_name] = {"id": str(value).lower(), "logicalname": attr.targets[0]}
        elif attr.logical_name == entity.primary_id:
            out[attr.logical_name] = str(value).lower()
        else:
            out[attr.logical_name] = coerce(entity, attr, value)
    return out

"""Key segments of emulator URLs: ``accounts(…)``, ``EntityDefinitions(LogicalName='x')``.

Features
    * ``(guid)``, ``(accountid=guid)``, ``(accountnumber='A-1')``, multi-part keys
      ``(firstname='Joe',emailaddress1='j@x.com')``, lookup parts
      ``(_primarycontactid_value=guid)``; quotes doubled inside strings.

Configuration
    None.

Limits
    None.
"""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime
from typing import Any

from connectors.dataverse.emulator.errors import bad_query
from connectors.dataverse.emulator.odata import GUID, format_datetime, parse_literal

__all__ = ["new_guid", "parse_key", "parse_key_segment"]

_SEGMENT = re.compile(r"^(?P<name>[A-Za-z_$][\w.]*)(?:\((?P<key>.*)\))?$", re.S)


def parse_key_segment(segment: str) -> tuple[str, str | dict[str, Any] | None]:
    """Split ``accounts(…)`` into the name and its key.

    Args:
        segment: One path segment (already URL-decoded).

    Returns:
        ``(name, None)`` without parentheses, ``(name, "guid")`` for a bare GUID, or
        ``(name, {column: value, …})`` for named key parts (values are Python values:
        str, int, Decimal, bool, lower-case GUID text, datetime).

    Raises:
        ODataError: the key cannot be parsed.
    """
    match = _SEGMENT.match(segment)
    if match is None:
        raise bad_query(f"Resource not found for the segment '{segment}'.")
    name, key = match.group("name"), match.group("key")
    return name, (None if key is None else parse_key(key))


def _split_key(key: str) -> list[tuple[str, str]]:
    """``a='x',b=1`` → [("a", "'x'"), ("b", "1")], respecting quotes."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(key):
        eq = key.find("=", pos)
        if eq < 0:
            raise bad_query(f"Bad Request - Error in query syntax: key '({key})'.")
        name = key[pos:eq].strip()
        pos = eq + 1
        if pos < len(key) and key[pos] == "'":
            end = pos + 1
            while True:
                end = key.find("'", end)
                if end < 0:
                    raise bad_query(f"Bad Request - Error in query syntax: key '({key})'.")
                if key[end + 1:end + 2] == "'":
                    end += 2
                    continue
                break
            value = key[pos:end + 1]
            pos = end + 1
        else:
            comma = key.find(",", pos)
            end = len(key) if comma < 0 else comma
            value = key[pos:end].strip()
            pos = end
        out.append((name, value))
        if pos < len(key):
            if key[pos] != ",":
                raise bad_query(f"Bad Request - Error in query syntax: key '({key})'.")
            pos += 1
    return out


def parse_key(key: str) -> str | dict[str, Any]:
    """Parse the inside of a key segment; see :func:`parse_key_segment`."""
    stripped = key.strip()
    if re.fullmatch(GUID, stripped):
        return stripped.lower()
    parts: dict[str, Any] = {}
    for name, value in _split_key(stripped):
        if not re.fullmatch(r"[A-Za-z_][\w]*", name):
            raise bad_query(f"Bad Request - Error in query syntax: key '({key})'.")
        lit = parse_literal(value)
        value_ = lit.value
        if isinstance(value_, datetime):
            value_ = format_datetime(value_)
        elif isinstance(value_, date):
            value_ = value_.isoformat()
        parts[name] = value_
    if not parts:
        raise bad_query(f"Bad Request - Error in query syntax: key '({key})'.")
    return parts


def new_guid() -> str:
    """A fresh lower-case GUID."""
    return str(uuid.uuid4())

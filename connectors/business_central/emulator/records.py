"""The emulator's rows and companies, and how times and ETags look.

Features
    * :class:`Record` — one table row: values under API v2.0 names plus the system
      fields (SystemId, row version, Resco's ``RowVersionNumber``, created/modified).
    * :class:`Company` — its tables, number series and ``number`` index.
    * :class:`Change` — a committed change, as webhooks see it.
    * :func:`make_etag` — opaque weak ETags in Business Central's ``W/"JzQ0O…"`` shape.

Configuration
    None.

Limits
    * Times are kept in milliseconds, as Business Central's ``SystemModifiedAt``.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["Change", "ChangeKind", "Company", "Record", "format_datetime", "make_etag",
           "truncate_ms"]

ChangeKind = Literal["created", "updated", "deleted"]


def format_datetime(value: datetime) -> str:
    """``2024-05-01T10:20:30.123Z``: UTC, milliseconds (the precision Business Central keeps)."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def truncate_ms(value: datetime) -> datetime:
    """``value`` in UTC, cut to whole milliseconds."""
    return value.astimezone(UTC).replace(microsecond=value.microsecond // 1000 * 1000)


def make_etag(record_id: str, rv: int) -> str:
    """An opaque weak ETag in Business Central's shape, ``W/"JzQ0O…Jyc="``.

    Args:
        record_id: The SystemId.
        rv: The row version.

    Returns:
        ``W/"<base64 of '44;<id+version>;'>"``; it changes with every write.
    """
    inner = base64.b64encode(uuid.UUID(record_id).bytes).decode() + f"{rv:016d};00;"
    return 'W/"' + base64.b64encode(f"'{len(inner)};{inner}'".encode()).decode() + '"'


@dataclass(slots=True)
class Record:
    """One table row: its fields (API v2.0 names) and its system fields."""

    id: str
    values: dict[str, Any]
    rv: int
    resco_rv: int
    created: datetime
    modified: datetime

    @property
    def etag(self) -> str:
        """The record's current ETag."""
        return make_etag(self.id, self.rv)

    def copy(self) -> Record:
        """A copy whose ``values`` can change independently."""
        return replace(self, values=dict(self.values))

    def to_json(self) -> dict[str, Any]:
        """Serializable form (for the SQLite file)."""
        return {"id": self.id, "values": self.values, "rv": self.rv, "resco_rv": self.resco_rv,
                "created": format_datetime(self.created),
                "modified": format_datetime(self.modified)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        """The inverse of :meth:`to_json`."""
        return cls(data["id"], data["values"], data["rv"], data["resco_rv"],
                   datetime.fromisoformat(data["created"]), datetime.fromisoformat(data["modified"]))


@dataclass(slots=True)
class Company:
    """A company of the environment, with its tables and number series."""

    id: str
    name: str
    display_name: str
    business_profile_id: str = ""
    system_version: str = "26.0.30643.32172"
    tables: dict[str, dict[str, Record]] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)
    #: table → case-folded ``number`` → SystemId (kept by the store).
    numbers: dict[str, dict[str, str]] = field(default_factory=dict)

    def rows(self, table: str) -> dict[str, Record]:
        """The rows of ``table`` by SystemId."""
        return self.tables.setdefault(table, {})

    def by_number(self, table: str, number: str) -> Record | None:
        """The row of ``table`` whose ``number`` is ``number`` (case-insensitive), or None."""
        rid = self.numbers.get(table, {}).get(number.casefold())
        return self.rows(table).get(rid) if rid is not None else None

    def summary(self) -> dict[str, Any]:
        """The ``companies`` entity as the API returns it."""
        return {"id": self.id, "systemVersion": self.system_version, "timestamp": 0,
                "name": self.name, "displayName": self.display_name,
                "businessProfileId": self.business_profile_id}


@dataclass(frozen=True, slots=True)
class Change:
    """A committed change of one row (what webhooks notify about)."""

    company: str
    table: str
    id: str
    kind: ChangeKind
    at: datetime
    #: The record's ``number`` at the time (pages keyed by ``No`` address it by that).
    number: str = ""

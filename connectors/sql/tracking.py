"""What change tracking looks like to the connector, whatever the dialect.

A ``Tracker`` installs the database-side machinery (``prepare_common`` once, then
``prepare_table`` per table), tells whether a table is prepared (``probe``), and
reads one page of changes at a time (``read_page``) or answers the cheap
``has_changes`` question. The SQLite and PostgreSQL trackers live in
``sqlite.py`` and ``postgres.py``; this module holds what they share: cursor
encoding, the tombstone table's Core definition, record building and the merge
of upserts and deletes into one version-ordered page.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from connectors.base import ChangePage, ChangeRecord, Op, SchemaError
from connectors.sql.schema import INTERNAL_PREFIX, VERSION_COLUMN, TableInfo

__all__ = ["TOMBSTONES", "Tracker", "dump_cursor", "internal_name", "load_cursor", "merge_page"]

#: Name of the table the delete triggers fill.
TOMBSTONES = f"{INTERNAL_PREFIX}tombstones"
#: Longest identifier PostgreSQL keeps (longer ones are silently truncated).
_MAX_IDENT = 63


def internal_name(kind: str, table: str) -> str:
    """A deterministic name ``_syncbus_<table>_<kind>`` for a trigger or index, at most
    63 characters (long table names are shortened and made unique with a hash).

    Args:
        kind: What the object is (``ver``, ``xid``, ``ai``, ``ad``, …).
        table: The table it belongs to.
    """
    name = f"{INTERNAL_PREFIX}{table}_{kind}"
    if len(name.encode()) <= _MAX_IDENT:
        return name
    digest = hashlib.sha1(table.encode()).hexdigest()[:8]
    return f"{INTERNAL_PREFIX}{table[:30]}_{digest}_{kind}"


def dump_cursor(state: dict[str, Any]) -> str:
    """Encode a cursor state as the opaque string handed to the detector."""
    return json.dumps(state, separators=(",", ":"), sort_keys=True)


def load_cursor(cursor: str | None, required: Sequence[str], connector: str) -> dict[str, Any] | None:
    """Decode a cursor string made by ``dump_cursor``.

    Args:
        cursor: The cursor, or None for "from the beginning".
        required: Keys the dialect's cursor must have.
        connector: The connector's name, for the error message.

    Returns:
        The cursor state, or None.

    Raises:
        SchemaError: the cursor was not made by this kind of connector.
    """
    if cursor is None:
        return None
    try:
        state = json.loads(cursor)
    except ValueError:
        state = None
    if not isinstance(state, dict) or any(k not in state for k in required):
        shown = cursor if len(cursor) <= 80 else cursor[:79] + "…"
        raise SchemaError(f"{connector}: {shown!r} is not a cursor of this database's change feed")
    return state


def merge_page(
    upserts: list[ChangeRecord], deletes: list[ChangeRecord], page_size: int
) -> tuple[list[ChangeRecord], bool]:
    """Merge two version-ordered lists; keep ``page_size`` records.

    Returns:
        The page's records and whether more records were left over.
    """
    merged = list(heapq.merge(upserts, deletes, key=lambda r: int(r.version)))
    return merged[:page_size], len(merged) > page_size


class Tracker(ABC):
    """The dialect-specific half of change tracking.

    Args:
        connector: The connector's name, for messages.
        schema: The schema / attached database holding the tables, None = default.
    """

    #: Keys every cursor of this dialect holds.
    cursor_keys: tuple[str, ...] = ()
    #: Rows are read raw and decoded leniently (SQLite: a column holds whatever was put
    #: in it); otherwise the driver's typed values are used as they are.
    raw_rows: bool = False

    def __init__(self, connector: str, schema: str | None) -> None:
        self.connector = connector
        self.schema = schema

    @abstractmethod
    def prepare_common(self, conn: sa.Connection) -> list[str]:
        """Create the shared objects (counter, tombstones, functions) if missing."""

    @abstractmethod
    def prepare_table(self, conn: sa.Connection, info: TableInfo) -> list[str]:
        """Add the version column(s), index(es), back-fill and triggers to one table."""

    @abstractmethod
    def probe(self, conn: sa.Connection, table: sa.Table) -> bool:
        """True when every tracking trigger of ``table`` exists."""

    @abstractmethod
    def has_changes(self, conn: sa.Connection, info: TableInfo, cursor: str | None) -> bool:
        """The cheap "anything after this cursor?" check (index lookups only)."""

    @abstractmethod
    def read_page(
        self, conn: sa.Connection, info: TableInfo, cursor: str | None, page_size: int
    ) -> ChangePage:
        """Read the next page of changes after ``cursor``."""

    # ------------------------------------------------------------------ shared helpers

    def tombstones(self, key_type: sa.types.TypeEngine[Any], schema: str | None = None) -> sa.Table:
        """Core definition of the tombstone table (queries only; DDL is per dialect).

        Args:
            key_type: Type of the ``key`` column as queried.
            schema: Schema to qualify with (default: the tracker's).
        """
        return sa.Table(
            TOMBSTONES,
            sa.MetaData(),
            sa.Column("version", sa.BigInteger),
            sa.Column("entity", sa.Text),
            sa.Column("key", key_type),
            sa.Column("deleted_at", sa.DateTime),
            sa.Column("xid", sa.types.NullType),
            schema=schema or self.schema,
        )

    def tombstone_table(self, conn: sa.Connection) -> sa.Table:
        """The tombstone table, qualified with the schema in use on ``conn``."""
        return self.tombstones(sa.Text())

    def cursor_state(self, cursor: str | None) -> dict[str, Any] | None:
        """Decode ``cursor`` for this dialect (see ``load_cursor``)."""
        return load_cursor(cursor, self.cursor_keys, self.connector)

    def select_rows(self, info: TableInfo, *, raw: bool, version: bool = True) -> sa.Select[Any]:
        """``SELECT <user columns>[, _sb_version] FROM <table>``; with ``raw`` the driver's
        values come back untouched (decoded later by the lenient decoders)."""
        table = info.table
        cols: list[sa.ColumnElement[Any]] = [
            sa.type_coerce(table.c[c], sa.types.NullType()).label(c) if raw else table.c[c]
            for c in info.columns
        ]
        if version:
            cols.append(table.c[VERSION_COLUMN])
        return sa.select(*cols)

    @staticmethod
    def row_values(info: TableInfo, row: Sequence[Any], *, decode: bool) -> dict[str, Any]:
        """The user column values of a row of ``select_rows``: the one value form of
        change records and fetched records alike."""
        values = dict(zip(info.columns, row[: len(info.columns)], strict=True))
        if decode:
            values = {c: info.decoders[c](v) for c, v in values.items()}
        return values

    @classmethod
    def upsert_record(cls, info: TableInfo, row: Sequence[Any], *, decode: bool) -> ChangeRecord:
        """Build an ``Op.UPSERT`` record from a row of ``select_rows``."""
        values = cls.row_values(info, row, decode=decode)
        return ChangeRecord(
            key={k: values[k] for k in info.key}, op=Op.UPSERT, version=int(row[-1]), values=values
        )

    @staticmethod
    def delete_record(info: TableInfo, version: int, key_json: Any, *, decode: bool) -> ChangeRecord:
        """Build an ``Op.DELETE`` record from a tombstone.

        With ``decode`` (SQLite) the stored key values go through the same lenient
        decoders as row values; otherwise (PostgreSQL ``jsonb``) the JSON values are
        converted with the column encoders, falling back to the JSON value.
        """
        raw = json.loads(key_json, parse_float=Decimal) if isinstance(key_json, str) else key_json
        key: dict[str, Any] = {}
        for col in info.key:
            value = raw.get(col) if isinstance(raw, dict) else None
            if value is not None and decode:
                value = info.decoders[col](value)
            elif value is not None:
                with contextlib.suppress(ValueError, TypeError, ArithmeticError):
                    value = info.encoders[col](value)
            key[col] = value
        return ChangeRecord(key=key, op=Op.DELETE, version=int(version))

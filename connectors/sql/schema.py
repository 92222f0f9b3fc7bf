"""Reflection: the tables of one database as ``TableInfo`` records, cached.

A ``TableInfo`` holds what reading and writing need: the reflected
``sqlalchemy.Table``, the user columns (tracking columns ``_sb_*`` left out), the
primary key, unique keys (from unique constraints *and* unique indexes), foreign
keys, one encoder and one decoder per column, and whether change tracking is set
up. Reflection is done once per table and kept until ``invalidate()``.

Tables named ``_syncbus_*`` are syncbus's own and never listed nor looked up.
"""

from __future__ import annotations

import difflib
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from connectors.base import EntityInfo, FieldInfo, SchemaError
from connectors.sql.coerce import Converter, decoder_for, encoder_for, portable_type

__all__ = [
    "Catalog",
    "INTERNAL_PREFIX",
    "TRACKING_COLUMNS",
    "TableInfo",
    "VERSION_COLUMN",
    "XID_COLUMN",
    "quiet_reflection",
]

#: Row-version column kept by the database's own triggers.
VERSION_COLUMN = "_sb_version"
#: PostgreSQL only: the id (xid8) of the transaction that last wrote the row.
XID_COLUMN = "_sb_xid"
#: Columns syncbus adds to tracked tables; never described, read or written.
TRACKING_COLUMNS = frozenset({VERSION_COLUMN, XID_COLUMN})
#: Prefix of syncbus's own tables, triggers, functions and sequences.
INTERNAL_PREFIX = "_syncbus_"

#: ``probe(connection, table_name) -> bool``: are the tracking triggers in place?
TrackingProbe = Callable[[sa.Connection, sa.Table], bool]


@contextmanager
def quiet_reflection() -> Iterator[None]:
    """Silence SQLAlchemy's warning about the ``xid8`` type it does not know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Did not recognize type", category=sa.exc.SAWarning)
        yield


@dataclass(frozen=True)
class TableInfo:
    """One reflected table, ready for reading and writing."""

    name: str
    table: sa.Table
    #: User columns in table order (tracking columns left out).
    columns: tuple[str, ...]
    key: tuple[str, ...]
    unique_keys: tuple[tuple[str, ...], ...]
    #: Column → referenced table, for foreign keys.
    references: dict[str, str]
    #: True when the tracking columns and triggers are in place.
    tracked: bool
    encoders: dict[str, Converter] = field(repr=False)
    decoders: dict[str, Converter] = field(repr=False)

    def is_unique(self, columns: Sequence[str]) -> bool:
        """True when ``columns`` (any order) are the primary key or a unique key."""
        wanted = set(columns)
        return any(set(k) == wanted for k in (self.key, *self.unique_keys))

    def key_problem(self, columns: Sequence[str]) -> str | None:
        """Why ``columns`` cannot name one row (unknown column, not unique), or None."""
        if not columns:
            return "empty key"
        unknown = [c for c in columns if c not in self.encoders]
        if unknown:
            return f"table {self.name!r} has no column(s) {', '.join(unknown)}"
        if not self.is_unique(columns):
            return (
                f"key ({', '.join(columns)}) is neither the primary key nor a unique key "
                f"of table {self.name!r}"
            )
        return None

    def describe(self) -> EntityInfo:
        """The table as connector metadata."""
        fields = tuple(
            FieldInfo(
                name=name,
                type=portable_type(self.table.c[name].type),
                nullable=bool(self.table.c[name].nullable) and name not in self.key,
                key=name in self.key,
                references=self.references.get(name),
                has_default=(self.table.c[name].server_default is not None
                             or self.table.c[name].autoincrement is True),
            )
            for name in self.columns
        )
        return EntityInfo(
            name=self.name, fields=fields, key=self.key, unique_keys=self.unique_keys,
            change_tracking=self.tracked,
        )


class Catalog:
    """Reflected tables of one engine and schema, cached and thread-safe.

    Args:
        engine: The connector's engine.
        schema: Database schema (PostgreSQL) or attached database (SQLite); None = default.
        connector: The connector's name, for error messages.
        probe: Tells whether a table's tracking triggers exist.
    """

    def __init__(
        self, engine: sa.Engine, schema: str | None, connector: str, probe: TrackingProbe
    ) -> None:
        self._engine = engine
        self._schema = schema
        self._connector = connector
        self._probe = probe
        self._cache: dict[str, TableInfo] = {}
        self._lock = threading.Lock()

    def table_names(self, conn: sa.Connection) -> list[str]:
        """Names of the user tables, sorted (syncbus's own tables left out)."""
        names = sa.inspect(conn).get_table_names(schema=self._schema)
        return sorted(n for n in names if not n.startswith(INTERNAL_PREFIX))

    def get(self, name: str) -> TableInfo:
        """The cached ``TableInfo`` of ``name``, reflecting it on first use.

        Raises:
            SchemaError: no such table (the message lists what exists).
            sqlalchemy.exc.DBAPIError: the database failed (translated by the caller).
        """
        with self._lock:
            info = self._cache.get(name)
        if info is not None:
            return info
        with self._engine.connect() as conn:
            info = self.reflect(conn, name)
        with self._lock:
            self._cache[name] = info
        return info

    def reflect(self, conn: sa.Connection, name: str) -> TableInfo:
        """Reflect ``name`` afresh through ``conn`` (nothing cached).

        Raises:
            SchemaError: no such table.
        """
        inspector = sa.inspect(conn)
        if name.startswith(INTERNAL_PREFIX) or not inspector.has_table(name, schema=self._schema):
            raise self.unknown(conn, name)
        with quiet_reflection():
            table = sa.Table(
                name, sa.MetaData(), schema=self._schema, autoload_with=conn, resolve_fks=False
            )
        columns = tuple(c.name for c in table.columns if c.name not in TRACKING_COLUMNS)
        key = tuple(c.name for c in table.primary_key.columns)
        references: dict[str, str] = {}
        for fk in inspector.get_foreign_keys(name, schema=self._schema):
            for col in fk["constrained_columns"]:
                references.setdefault(col, fk["referred_table"])
        tracked = VERSION_COLUMN in table.c and self._probe(conn, table)
        return TableInfo(
            name=name,
            table=table,
            columns=columns,
            key=key,
            unique_keys=_unique_keys(inspector, name, self._schema, key),
            references=references,
            tracked=tracked,
            encoders={c: encoder_for(table.c[c].type) for c in columns},
            decoders={c: decoder_for(table.c[c].type) for c in columns},
        )

    def reload(self, name: str) -> TableInfo:
        """Reflect ``name`` afresh on a connection of its own and cache it."""
        with self._engine.connect() as conn:
            return self.refresh(conn, name)

    def refresh(self, conn: sa.Connection, name: str) -> TableInfo:
        """Reflect ``name`` afresh and replace the cached entry."""
        info = self.reflect(conn, name)
        with self._lock:
            self._cache[name] = info
        return info

    def invalidate(self, name: str | None = None) -> None:
        """Forget one table (or all) so the next use reflects it again."""
        with self._lock:
            if name is None:
                self._cache.clear()
            else:
                self._cache.pop(name, None)

    def unknown(self, conn: sa.Connection, name: str) -> SchemaError:
        """The error for a table that does not exist, with a "did you mean" hint."""
        names = self.table_names(conn)
        hint = difflib.get_close_matches(name, names, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        shown = ", ".join(names[:30]) + (", …" if len(names) > 30 else "")
        return SchemaError(
            f"{self._connector}: unknown entity {name!r}{did_you_mean}; "
            f"tables: {shown or '(none)'}",
            entity=name,
        )


def _unique_keys(
    inspector: Any, name: str, schema: str | None, key: tuple[str, ...]
) -> tuple[tuple[str, ...], ...]:
    """Column sets of unique constraints and plain unique indexes (not partial, no
    expressions), without the primary key and without duplicates."""
    found: list[tuple[str, ...]] = []
    for uc in inspector.get_unique_constraints(name, schema=schema):
        found.append(tuple(uc["column_names"]))
    for ix in inspector.get_indexes(name, schema=schema):
        cols = ix.get("column_names") or []
        options = ix.get("dialect_options") or {}
        partial = any(k.endswith("_where") for k in options)
        if ix.get("unique") and cols and None not in cols and not partial:
            found.append(tuple(cols))
    seen = {frozenset(key)}
    result = []
    for cols in found:
        if frozenset(cols) in seen or TRACKING_COLUMNS.intersection(cols):
            continue
        seen.add(frozenset(cols))
        result.append(cols)
    return tuple(result)

"""Reading current rows by key: ``SqlConnector.fetch``.

Keys are grouped by their column set (the primary key or any unique key, checked
as ``upsert`` checks them) and each group is read in chunks, one
``SELECT … WHERE (k1, k2) IN (…)`` per chunk, all in one read transaction. Rows come
back in exactly the form of the change feed (``Tracker.select_rows`` and
``Tracker.row_values``), so a fetched record and a change record of the same row
compare equal.

A key whose value cannot be a value of its column (``"abc"`` for an integer) or is
null names no row: its entry is None, like a key that matches nothing.

Limits
    * Rows are matched to keys by exact value: a key column with a case-insensitive
      collation (``COLLATE NOCASE``, ``citext``) finds a row only when the case agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa

from connectors.base import FetchedRecord, SchemaError, group_keys
from connectors.sql.schema import Catalog, TableInfo
from connectors.sql.tracking import Tracker

__all__ = ["FETCH_CHUNK", "Fetcher", "MAX_PARAMS"]

#: Keys per query (one chunk, one round trip).
FETCH_CHUNK = 500
#: Bound parameters per query at most (SQLite builds before 3.32 allow 999).
MAX_PARAMS = 900

#: ``errors(entity)``: the connector's driver-error translation.
Errors = Callable[[str | None], AbstractContextManager[None]]
#: A key's values in its group's column order.
_Wanted = tuple[Any, ...]


class Fetcher:
    """Reads rows by key for one engine.

    Args:
        catalog: The connector's reflected tables.
        engine: The connector's engine.
        tracker: The dialect's tracker (it owns the row value form).
        errors: Translates driver errors for an entity.
        connector: The connector's name, for messages.
    """

    def __init__(
        self, catalog: Catalog, engine: sa.Engine, tracker: Tracker, errors: Errors,
        connector: str,
    ) -> None:
        self._catalog = catalog
        self._engine = engine
        self._tracker = tracker
        self._errors = errors
        self._connector = connector

    def fetch(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[FetchedRecord | None]:
        """One entry per key, in order: the current row, or None.

        Raises:
            SchemaError: unknown table, or a key that is not the primary key nor a
                unique key (unknown column included).
            ConnectorUnavailable: the database cannot be reached.
            TransientError: the database is busy.
        """
        if not keys:
            return []
        info = self._info(entity, {c for k in keys for c in k})
        groups = group_keys(keys, lambda cols: self._check_key(info, cols),
                            lambda cols, key: _encode(info, cols, key))
        result: list[FetchedRecord | None] = [None] * len(keys)
        with self._errors(entity), self._engine.connect() as conn, conn.begin():
            for cols, wanted_by_index in groups.items():
                found = self._read(conn, info, cols, set(wanted_by_index.values()))
                for i, wanted in wanted_by_index.items():
                    result[i] = found.get(wanted)
        return result

    def _info(self, entity: str, names: set[str]) -> TableInfo:
        """The table, reflected again once if a key names a column we do not know."""
        with self._errors(entity):
            info = self._catalog.get(entity)
            if not names <= info.encoders.keys():
                info = self._catalog.reload(entity)
        return info

    def _check_key(self, info: TableInfo, cols: tuple[str, ...]) -> None:
        problem = info.key_problem(cols)
        if problem is not None:
            raise SchemaError(f"{self._connector}: cannot fetch by key: {problem}", entity=info.name)

    def _read(
        self, conn: sa.Connection, info: TableInfo, cols: tuple[str, ...], wanted: set[_Wanted]
    ) -> dict[_Wanted, FetchedRecord]:
        """The rows whose ``cols`` are among ``wanted``, by their (encoded) key values."""
        raw, tracked = self._tracker.raw_rows, info.tracked
        query = self._tracker.select_rows(info, raw=raw, version=tracked)
        column = sa.tuple_(*(info.table.c[c] for c in cols)) if len(cols) > 1 else info.table.c[cols[0]]
        todo = list(wanted)
        size = max(1, min(FETCH_CHUNK, MAX_PARAMS // len(cols)))
        found: dict[_Wanted, FetchedRecord] = {}
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            params = chunk if len(cols) > 1 else [w[0] for w in chunk]
            for row in conn.execute(query.where(column.in_(params))):
                record = _record(info, row, raw=raw, tracked=tracked, cols=cols)
                matched = _encode(info, cols, record.values)
                if matched is not None:
                    found[matched] = record
        return found


def _encode(info: TableInfo, cols: tuple[str, ...], values: dict[str, Any]) -> _Wanted | None:
    """``values`` of ``cols`` coerced to their column types (the form both a requested
    key and a row's key take for matching); None when one is null or does not fit."""
    try:
        encoded = tuple(info.encoders[c](values[c]) for c in cols if values[c] is not None)
        hash(encoded)
    except (ValueError, TypeError, ArithmeticError):
        return None
    return encoded if len(encoded) == len(cols) else None


def _record(
    info: TableInfo, row: Sequence[Any], *, raw: bool, tracked: bool, cols: tuple[str, ...]
) -> FetchedRecord:
    values = Tracker.row_values(info, row, decode=raw)
    key_cols = info.key or cols
    version = row[-1] if tracked else None
    return FetchedRecord(
        key={k: values[k] for k in key_cols}, values=values,
        version=int(version) if version is not None else None,
    )

"""Batched, idempotent writes: upsert by key and delete by key.

A batch is first validated and coerced row by row in Python (unknown columns, key
not unique, values that do not fit their column: ``PERMANENT`` outcomes for those
rows only). The rest is grouped by (key columns, column set) and sent as one
executemany per group, all in one transaction: psycopg 3 pipelines it, sqlite3
loops in C, so a 500-row batch costs one round of the network, not 500.

If the database refuses the batch for a data reason (NOT NULL, CHECK, FK, unique,
bad value), the batch is redone row by row in one transaction, each row inside its
own SAVEPOINT, so the bad rows get ``PERMANENT`` outcomes with the database's own
text and SQLSTATE and the others are applied. Connection failures raise
``ConnectorUnavailable`` and lock / deadlock / serialization failures
``TransientError`` for the whole batch (nothing of it is committed then).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL

from connectors.base import BusError, Outcome, OutcomeStatus, WriteRow
from connectors.sql.coerce import CoercionError
from connectors.sql.errors import (
    ErrorKind,
    classify,
    db_error_text,
    describe_value,
    error_code,
    to_bus_error,
    translate_errors,
)
from connectors.sql.schema import Catalog, TableInfo

__all__ = ["Writer"]

log = structlog.get_logger(__name__)

#: Opens a connection meant for writing (SQLite: ``BEGIN IMMEDIATE``).
Connect = Callable[[], sa.Connection]
_DB_ERRORS = (sa.exc.StatementError, sa.exc.TimeoutError)


class _Rejected(Exception):
    """A row refused before it reaches the database (message = the reason)."""


@dataclass
class _Group:
    """Rows sharing key columns and column set: one executemany."""

    key: tuple[str, ...]
    columns: tuple[str, ...]
    indexes: list[int] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)


Build = Callable[[TableInfo, _Group], sa.Executable]


class Writer:
    """Upserts and deletes for one engine.

    Args:
        catalog: The connector's reflected tables.
        connect: Opens a write connection.
        dialect: ``sqlite`` or ``postgresql``.
        connector: The connector's name, for messages.
        url: The connection URL (its password is masked in messages).
    """

    def __init__(
        self, catalog: Catalog, connect: Connect, dialect: str, connector: str, url: URL
    ) -> None:
        self._catalog = catalog
        self._connect = connect
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._connector = connector
        self._url = url
        self._secret = url.password if isinstance(url.password, str) and url.password else None

    # ------------------------------------------------------------------ public

    def upsert(self, entity: str, rows: Sequence[WriteRow]) -> list[Outcome]:
        """Insert or update ``rows`` by their key; one outcome per row, in order.

        Raises:
            SchemaError: ``entity`` is not a table.
            ConnectorUnavailable: the database cannot be reached.
            TransientError: lock, deadlock, serialization failure, busy database.
        """
        if not rows:
            return []
        names = {c for r in rows for c in (*r.key, *r.values)}
        info = self._info(entity, names)
        outcomes: list[Outcome | None] = [None] * len(rows)
        prepared: list[tuple[int, tuple[str, ...], dict[str, Any]]] = []
        updates: list[tuple[int, tuple[str, ...], dict[str, Any]]] = []
        checked: dict[tuple[str, ...], str | None] = {}
        for i, row in enumerate(rows):
            try:
                key, params = self._upsert_params(info, row, checked)
            except _Rejected as exc:
                outcomes[i] = Outcome(OutcomeStatus.PERMANENT, error=str(exc))
                continue
            (updates if row.update_only else prepared).append((i, key, params))
        self._execute(entity, info, _group_upserts(prepared), self._upsert_statement, outcomes)
        if updates:  # an UPDATE: the INSERT of an upsert would need every NOT NULL column
            groups = _group_upserts(updates)
            for group in groups:
                group.params = [{f"u_{c}": v for c, v in p.items()} for p in group.params]
            self._execute(entity, info, groups, self._update_statement, outcomes)
        return _complete(outcomes)

    def delete(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[Outcome]:
        """Delete rows by key (a missing row counts as applied); one outcome per key.

        Raises:
            SchemaError: ``entity`` is not a table.
            ConnectorUnavailable: the database cannot be reached.
            TransientError: lock, deadlock, serialization failure, busy database.
        """
        if not keys:
            return []
        info = self._info(entity, {c for k in keys for c in k})
        outcomes: list[Outcome | None] = [None] * len(keys)
        groups: dict[frozenset[str], _Group] = {}
        checked: dict[tuple[str, ...], str | None] = {}
        for i, key in enumerate(keys):
            try:
                cols, values = self._key_values(info, key, checked)
            except _Rejected as exc:
                outcomes[i] = Outcome(OutcomeStatus.PERMANENT, error=str(exc))
                continue
            group = groups.get(frozenset(cols))
            if group is None:
                group = groups[frozenset(cols)] = _Group(cols, cols)
            group.indexes.append(i)
            group.params.append({f"_k{j}": values[c] for j, c in enumerate(group.key)})
        self._execute(entity, info, list(groups.values()), self._delete_statement, outcomes)
        return _complete(outcomes)

    # ------------------------------------------------------------------ preparing rows

    def _info(self, entity: str, names: Iterable[str]) -> TableInfo:
        """The table, reflected again once if the batch names a column we do not know."""
        with translate_errors(connector=self._connector, url=self._url, entity=entity):
            info = self._catalog.get(entity)
            if not set(names) <= info.encoders.keys():
                info = self._catalog.reload(entity)
        return info

    def _encode(self, info: TableInfo, values: dict[str, Any]) -> dict[str, Any]:
        """Coerce ``values`` (known columns only) with the column encoders.

        Raises:
            _Rejected: a value does not fit; the message names the column and value.
        """
        encoders = info.encoders
        try:  # the hot path: one comprehension, no per-value call overhead of our own
            return {c: None if v is None else encoders[c](v) for c, v in values.items()}
        except (ValueError, TypeError, ArithmeticError):
            pass
        for column, value in values.items():  # find the culprit for the message
            try:
                if value is not None:
                    encoders[column](value)
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise _Rejected(str(CoercionError(column, value, str(exc)))) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_columns(self, info: TableInfo, names: Iterable[str]) -> None:
        unknown = [c for c in names if c not in info.encoders]
        if unknown:
            raise _Rejected(f"table {info.name!r} has no column(s) {', '.join(unknown)}")

    def _check_key(self, info: TableInfo, cols: tuple[str, ...]) -> None:
        problem = info.key_problem(cols)
        if problem is not None:
            raise _Rejected(problem)

    def _key_values(
        self, info: TableInfo, key: dict[str, Any], checked: dict[tuple[str, ...], str | None]
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        """Validate (once per key column set, memoized in ``checked``) and coerce a key."""
        cols = tuple(key)
        if cols not in checked:
            try:
                self._check_key(info, cols)
                checked[cols] = None
            except _Rejected as exc:
                checked[cols] = str(exc)
        problem = checked[cols]
        if problem is not None:
            raise _Rejected(problem)
        values = self._encode(info, key)
        if None in values.values():
            missing = [c for c, v in values.items() if v is None]
            raise _Rejected(f"key column(s) {', '.join(missing)} are null")
        return cols, values

    def _upsert_params(
        self, info: TableInfo, row: WriteRow, checked: dict[tuple[str, ...], str | None]
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        cols, key = self._key_values(info, row.key, checked)
        if not row.values.keys() <= info.encoders.keys():
            self._check_columns(info, row.values)
        params = self._encode(info, row.values)
        for c, v in key.items():
            if c in params and params[c] != v:
                raise _Rejected(
                    f"key column {c!r} is {describe_value(row.key[c])} in the key but "
                    f"{describe_value(row.values[c])} in the values"
                )
            params[c] = v
        return cols, params

    # ------------------------------------------------------------------ statements

    def _upsert_statement(self, info: TableInfo, group: _Group) -> sa.Executable:
        ins = self._insert(info.table)
        target = [info.table.c[c] for c in group.key]
        updates = [c for c in group.columns if c not in group.key]
        if not updates:
            return ins.on_conflict_do_nothing(index_elements=target)
        return ins.on_conflict_do_update(
            index_elements=target, set_={c: ins.excluded[c] for c in updates}
        )

    def _update_statement(self, info: TableInfo, group: _Group) -> sa.Executable:
        """UPDATE of existing rows only (parameters named ``u_<column>``)."""
        table = info.table
        values: dict[str, Any] = {c: sa.bindparam(f"u_{c}") for c in group.columns
                                  if c not in group.key}
        return sa.update(table).where(
            *(table.c[c] == sa.bindparam(f"u_{c}") for c in group.key)).values(values)

    def _delete_statement(self, info: TableInfo, group: _Group) -> sa.Executable:
        table = info.table
        return sa.delete(table).where(
            *(table.c[c] == sa.bindparam(f"_k{j}") for j, c in enumerate(group.key))
        )

    # ------------------------------------------------------------------ execution

    def _execute(
        self, entity: str, info: TableInfo, groups: list[_Group], build: Build,
        outcomes: list[Outcome | None],
    ) -> None:
        """One transaction, one executemany per group; row by row if data is refused."""
        if not groups:
            return
        try:
            with self._connect() as conn, conn.begin():
                for group in groups:
                    conn.execute(build(info, group), group.params)
        except _DB_ERRORS as exc:
            if classify(exc) is not ErrorKind.DATA:
                raise self._error(exc, entity) from exc
            log.info("batch_refused_retrying_row_by_row", connector=self._connector,
                     entity=entity, rows=sum(len(g.indexes) for g in groups),
                     error=db_error_text(exc, secret=self._secret))
            self._row_by_row(entity, info, groups, build, outcomes)
            return
        for group in groups:
            for i in group.indexes:
                outcomes[i] = Outcome.applied()

    def _row_by_row(
        self, entity: str, info: TableInfo, groups: list[_Group], build: Build,
        outcomes: list[Outcome | None],
    ) -> None:
        try:
            with self._connect() as conn, conn.begin():
                for group in groups:
                    statement = build(info, group)
                    for i, params in zip(group.indexes, group.params, strict=True):
                        outcomes[i] = self._one(conn, statement, params)
        except _DB_ERRORS as exc:
            raise self._error(exc, entity) from exc

    def _one(self, conn: sa.Connection, statement: sa.Executable, params: dict[str, Any]) -> Outcome:
        """Execute one row inside a SAVEPOINT; a data error becomes its outcome."""
        try:
            with conn.begin_nested():
                conn.execute(statement, params)
        except sa.exc.StatementError as exc:
            if classify(exc) is not ErrorKind.DATA:
                raise
            return Outcome(
                OutcomeStatus.PERMANENT,
                error=db_error_text(exc, secret=self._secret),
                code=error_code(exc),
            )
        return Outcome.applied()

    def _error(self, exc: BaseException, entity: str) -> BusError:
        return to_bus_error(exc, connector=self._connector, url=self._url, entity=entity)


def _group_upserts(prepared: list[tuple[int, tuple[str, ...], dict[str, Any]]]) -> list[_Group]:
    """One group per (key columns, column set), as long as that keeps the batch order of
    every record; when one record appears in two groups (different column sets), fall
    back to groups of consecutive rows, so its last write still wins."""
    groups: dict[tuple[frozenset[str], frozenset[str]], _Group] = {}
    owner: dict[Any, tuple[frozenset[str], frozenset[str]]] = {}
    reordered = False
    for i, key, params in prepared:
        group_id = (frozenset(key), frozenset(params))
        group = groups.get(group_id)
        if group is None:
            group = groups[group_id] = _Group(key, tuple(params))
        group.indexes.append(i)
        group.params.append(params)
        if not reordered:
            try:  # column names are unique, so sorting never compares the values
                record = tuple(sorted((c, params[c]) for c in key))
                reordered = owner.setdefault(record, group_id) != group_id
            except TypeError:  # an unhashable key value: do not take chances
                reordered = True
    if not reordered:
        return list(groups.values())
    runs: list[_Group] = []
    for i, key, params in prepared:
        if not runs or (set(runs[-1].key), set(runs[-1].columns)) != (set(key), set(params)):
            runs.append(_Group(key, tuple(params)))
        runs[-1].indexes.append(i)
        runs[-1].params.append(params)
    return runs


def _complete(outcomes: list[Outcome | None]) -> list[Outcome]:
    """Every slot filled (a hole would be a bug: report it rather than crash)."""
    return [o if o is not None else Outcome(OutcomeStatus.TRANSIENT, error="not attempted")
            for o in outcomes]

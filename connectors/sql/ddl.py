"""Tables and columns created from another system's metadata (``syncbus schema pull``).

Resco's "Update Server" for a SQL target: each entity a source describes becomes one
table named as the entity, with one column per field (types: :func:`column_type`,
documented in ``docs/metadata.md``), the entity's key as primary key, every alternate /
unique key as a unique index, and an index on every lookup column.

Running it again brings metadata changes over: new entities become tables, new fields
become columns. Nothing is ever dropped or altered: a field that disappeared from the
source, a type that changed, a different key are reported and left as they are, and
no row is touched. Each table's changes run in one transaction, so a table the
database refuses (a unique index over duplicate values) is left as it was and the
other tables are done. What was pulled from which source is kept in
:data:`PULLS_TABLE` (hidden from ``describe``), so an entity that disappeared from the
source can be reported too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import TypeEngine

from connectors.base import EntityInfo
from connectors.features import TableChange
from connectors.sql.coerce import portable_type
from connectors.sql.schema import INTERNAL_PREFIX, TRACKING_COLUMNS, quiet_reflection

__all__ = ["PULLS_TABLE", "TableMaker", "column_type"]

#: Table in the target recording which entity of which source became which table.
PULLS_TABLE = f"{INTERNAL_PREFIX}schema_pulls"
#: Longest identifier PostgreSQL keeps (index names are shortened to it).
_MAX_IDENTIFIER = 63

# Portable type → SQL type, per dialect (the table in docs/metadata.md).
_TYPES: dict[str, dict[str, Callable[[], TypeEngine[Any]]]] = {
    "postgresql": {
        "string": sa.Text, "integer": sa.BigInteger, "decimal": sa.Numeric, "float": sa.Double,
        "boolean": sa.Boolean, "date": sa.Date, "datetime": lambda: sa.DateTime(timezone=True),
        "time": sa.Time, "binary": sa.LargeBinary, "json": postgresql.JSONB, "uuid": sa.Uuid,
    },
    "sqlite": {
        "string": sa.Text, "integer": sa.BigInteger, "decimal": sa.Numeric, "float": sa.Double,
        "boolean": sa.Boolean, "date": sa.Date, "datetime": lambda: sa.DateTime(timezone=True),
        "time": sa.Time, "binary": sa.LargeBinary, "json": sa.JSON, "uuid": sa.Text,
    },
}

Apply = Callable[[sa.Connection], None]


def column_type(dialect: str, kind: str) -> TypeEngine[Any]:
    """The SQL type a field of portable type ``kind`` gets in ``dialect``.

    Args:
        dialect: ``postgresql`` or ``sqlite``.
        kind: A portable type (``string``, ``uuid``…); anything unknown is text.

    Returns:
        A SQLAlchemy type.
    """
    return _TYPES[dialect].get(kind, sa.Text)()


@dataclass(frozen=True)
class _Step:
    """A planned change and, when it changes the database, what runs it."""

    change: TableChange
    run: Apply | None = None


class TableMaker:
    """Creates and extends tables of one database from metadata.

    Args:
        engine: The database's engine (plans read through it).
        write_connection: Opens a connection for writing.
        schema: The schema the tables live in (None: the default).
        explain: The database's error text for an error (no secrets).
    """

    def __init__(self, engine: sa.Engine, write_connection: Callable[[], sa.Connection],
                 schema: str | None, explain: Callable[[BaseException], str]) -> None:
        self._engine, self._write_connection = engine, write_connection
        self._schema, self._explain = schema, explain

    def pulled(self, source: str) -> list[str]:
        """Entities pulled from ``source`` into this database earlier, by name."""
        with self._engine.connect() as conn:
            if not sa.inspect(conn).has_table(PULLS_TABLE, schema=self._schema):
                return []
            pulls = _pulls_table(self._schema)
            rows = conn.execute(sa.select(pulls.c.entity).where(pulls.c.source == source)
                                .order_by(pulls.c.entity)).all()
        return [r.entity for r in rows]

    def create(self, source: str, entities: Sequence[EntityInfo], *,
               dry_run: bool = False) -> list[TableChange]:
        """Plan the tables of ``entities`` and, unless ``dry_run``, apply and record them.

        Returns:
            The planned changes, then one failed change per table whose changes the
            database refused (and were rolled back).
        """
        with self._engine.connect() as conn:
            planner = _Planner(conn, self._schema)
            steps = [step for info in entities for step in planner.plan(info)]
        failed = [] if dry_run else self._apply(source, entities, steps)
        return [s.change for s in steps] + failed

    def _apply(self, source: str, entities: Sequence[EntityInfo],
               steps: list[_Step]) -> list[TableChange]:
        """Run the steps, each table in a transaction of its own; record the pull."""
        failed = []
        for table in dict.fromkeys(s.change.table for s in steps if s.run is not None):
            try:
                with self._write_connection() as conn, conn.begin():
                    for step in steps:
                        if step.change.table == table and step.run is not None:
                            step.run(conn)
            except sa.exc.DBAPIError as exc:
                failed.append(TableChange(table, f"failed: {self._explain(exc)}; this table's "
                                          "changes were rolled back", applied=False, failed=True))
        with self._write_connection() as conn, conn.begin():
            pulls = _pulls_table(self._schema)
            pulls.create(conn, checkfirst=True)
            now = datetime.now(UTC)
            for info in entities:
                conn.execute(sa.delete(pulls).where((pulls.c.source == source)
                                                    & (pulls.c.entity == info.name)))
                conn.execute(sa.insert(pulls).values(source=source, entity=info.name,
                                                     table_name=info.name, pulled_at=now))
        return failed


class _Planner:
    """Compares one source entity with the target database; plans what to add."""

    def __init__(self, conn: sa.Connection, schema: str | None) -> None:
        self.conn = conn
        self.schema = schema
        self.dialect = conn.dialect.name
        self.inspector = sa.inspect(conn)

    def plan(self, info: EntityInfo) -> list[_Step]:
        if not self.inspector.has_table(info.name, schema=self.schema):
            return self._create(info)
        with quiet_reflection():
            table = sa.Table(info.name, sa.MetaData(), schema=self.schema, autoload_with=self.conn,
                             resolve_fks=False)
        steps = self._columns(info, table) + self._indexes(info, table)
        return steps or [_report(info.name, "up to date")]

    def _create(self, info: EntityInfo) -> list[_Step]:
        table = self._table(info)
        uniques = "".join(f", unique ({', '.join(k)})" for k in info.unique_keys)
        key = f"primary key ({', '.join(info.key)})" if info.key else "no primary key"
        text = f"create table ({len(info.fields)} columns, {key}{uniques})"
        steps = [_Step(TableChange(info.name, text), run=lambda conn: table.create(conn))]
        for fld in info.fields:
            if fld.references:
                steps.append(_Step(TableChange(info.name, f"lookup → {fld.references}, indexed",
                                               fld.name), run=lambda _conn: None))
        return steps

    def _table(self, info: EntityInfo) -> sa.Table:
        columns = [sa.Column(f.name, column_type(self.dialect, f.type), nullable=f.name not in info.key)
                   for f in info.fields]
        table = sa.Table(info.name, sa.MetaData(), *columns, schema=self.schema)
        if info.key:
            table.append_constraint(sa.PrimaryKeyConstraint(*info.key))
        for cols in info.unique_keys:
            sa.Index(_index_name("ux", info.name, cols), *(table.c[c] for c in cols), unique=True)
        for fld in info.fields:
            if fld.references and fld.name not in info.key:
                sa.Index(_index_name("ix", info.name, [fld.name]), table.c[fld.name])
        return table

    def _columns(self, info: EntityInfo, table: sa.Table) -> list[_Step]:
        steps: list[_Step] = []
        existing = {c.name: c for c in table.columns if c.name not in TRACKING_COLUMNS}
        for fld in info.fields:
            wanted = column_type(self.dialect, fld.type)
            column = existing.get(fld.name)
            if column is None:
                ddl = wanted.compile(dialect=self.conn.dialect)
                steps.append(_Step(TableChange(info.name, f"add column {ddl} ({fld.type})",
                                               fld.name),
                                   run=_add_column(table, fld.name, wanted)))
            elif portable_type(column.type) != portable_type(wanted):
                steps.append(_report(
                    info.name, f"is {fld.type} in the source now; the column stays "
                    f"{column.type.compile(dialect=self.conn.dialect)} (not changed)", fld.name))
        for name in existing:
            if info.field(name) is None:
                steps.append(_report(info.name, "no longer in the source; the column is kept",
                                     name))
        table_key = tuple(c.name for c in table.primary_key.columns)
        if info.key and set(table_key) != set(info.key):
            steps.append(_report(
                info.name, f"the source's key is ({', '.join(info.key)}); the table's primary "
                f"key stays ({', '.join(table_key) or 'none'})"))
        return steps

    def _indexes(self, info: EntityInfo, table: sa.Table) -> list[_Step]:
        """Unique keys and lookup indexes the table lacks (on columns it has or gets)."""
        indexes = self.inspector.get_indexes(info.name, schema=self.schema)
        unique = [set(ix["column_names"]) for ix in indexes if ix.get("unique")]
        unique += [set(uc["column_names"]) for uc in
                   self.inspector.get_unique_constraints(info.name, schema=self.schema)]
        unique.append({c.name for c in table.primary_key.columns})
        indexed = {tuple(ix["column_names"])[0] for ix in indexes if ix["column_names"]}
        steps = []
        for cols in info.unique_keys:
            if set(cols) not in unique:
                name = _index_name("ux", info.name, cols)
                steps.append(_Step(TableChange(info.name,
                                               f"add unique index {name} ({', '.join(cols)})"),
                                   run=_create_index(info.name, self.schema, name, cols, True)))
        for fld in info.fields:
            if fld.references and fld.name not in indexed and fld.name not in info.key:
                name = _index_name("ix", info.name, [fld.name])
                steps.append(_Step(
                    TableChange(info.name, f"add index {name} (lookup → {fld.references})",
                                fld.name),
                    run=_create_index(info.name, self.schema, name, [fld.name], False)))
        return steps


def _report(table: str, text: str, column: str | None = None) -> _Step:
    """A finding that is only reported, never applied."""
    return _Step(TableChange(table, text, column, applied=False))


def _add_column(table: sa.Table, name: str, type_: TypeEngine[Any]) -> Apply:
    def run(conn: sa.Connection) -> None:
        prep = conn.dialect.identifier_preparer
        ddl = (f"ALTER TABLE {prep.format_table(table)} ADD COLUMN {prep.quote(name)} "
               f"{type_.compile(dialect=conn.dialect)}")
        conn.exec_driver_sql(ddl)
    return run


def _create_index(table: str, schema: str | None, name: str, cols: Sequence[str],
                  unique: bool) -> Apply:
    def run(conn: sa.Connection) -> None:
        target = sa.Table(table, sa.MetaData(), *(sa.Column(c) for c in cols), schema=schema)
        sa.Index(name, *(target.c[c] for c in cols), unique=unique).create(conn)
    return run


def _pulls_table(schema: str | None) -> sa.Table:
    return sa.Table(
        PULLS_TABLE, sa.MetaData(),
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("entity", sa.String(200), primary_key=True),
        sa.Column("table_name", sa.String(200), nullable=False),
        sa.Column("pulled_at", sa.DateTime(timezone=True), nullable=False),
        schema=schema)


def _index_name(prefix: str, table: str, cols: Sequence[str]) -> str:
    name = f"{prefix}_{table}_{'_'.join(cols)}"
    if len(name) <= _MAX_IDENTIFIER:
        return name
    digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{name[:_MAX_IDENTIFIER - 9]}_{digest}"

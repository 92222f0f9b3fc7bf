"""``syncbus schema pull``: create SQL tables and columns from a source's metadata.

Resco's "Update Server" as a command: the source connector describes its entities
(Dataverse ``EntityDefinitions``, Business Central ``$metadata``, SQL reflection)
and the target SQL database gets one table per entity, named as the entity, with
one column per field (types: :func:`column_type`, documented in
``docs/metadata.md``), the entity's key as primary key, every alternate / unique
key as a unique index, and an index on every lookup column.

Re-running it is safe and is how metadata changes are brought over: new entities
become tables, new fields become columns. Nothing is ever dropped or altered: a
field that disappeared from the source, a type that changed, a different key are
reported and left as they are, and no row is touched. The target remembers what
was pulled from which source (table ``_syncbus_schema_pulls``, hidden from
``describe``), so an entity that disappeared from the source is reported too.

:func:`pull_schema` plans and applies; :func:`link_config` turns what was pulled
into a starting link config (one link per entity).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import TypeEngine

from bus.core.redact import redact_text, redact_url
from connectors.base import Connector, ConnectorUnavailable, EntityInfo, SchemaError
from connectors.sql.coerce import portable_type
from connectors.sql.schema import INTERNAL_PREFIX, TRACKING_COLUMNS, quiet_reflection
from schemas.config import Endpoint, LinkConfig, SqlConnection
from schemas.event import valid_name

__all__ = ["PULLS_TABLE", "PullAction", "PullResult", "column_type", "link_config",
           "pull_schema"]

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
class PullAction:
    """One step of a pull: done (``applied``), or only reported.

    Args:
        table: The table concerned.
        text: What it is, in words (``create table (…)``, ``add column TEXT``…).
        column: The column concerned, if any.
        applied: True when it changes the target; False for what is only reported.
    """

    table: str
    text: str
    column: str | None = None
    applied: bool = True
    run: Apply | None = field(default=None, repr=False, compare=False)

    def line(self, *, dry_run: bool = False) -> str:
        """The line printed for it: ``account.telephone1: add column TEXT (string)``."""
        where = f"{self.table}.{self.column}" if self.column else self.table
        verb = f"would {self.text}" if dry_run and self.applied else self.text
        return f"{where}: {verb}"


@dataclass
class PullResult:
    """What a pull did (or, dry, would do)."""

    actions: list[PullAction]
    #: The source's entities that exist (and now have tables).
    entities: list[EntityInfo]
    #: Entities asked for or pulled before that the source no longer has.
    missing: list[str]
    dry_run: bool = False
    #: Tables whose changes failed (and were rolled back), one action each.
    failed: list[PullAction] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per action."""
        return [a.line(dry_run=self.dry_run) for a in self.actions]


def pull_schema(source: Connector, source_name: str, target: SqlConnection, *,
                entities: Sequence[str] | None = None, dry_run: bool = False) -> PullResult:
    """Create or extend tables in ``target`` from the metadata of ``source``.

    Args:
        source: The connector to describe.
        source_name: Its connection name (recorded with what was pulled).
        target: The SQL connection to write into.
        entities: Entities to pull (default: everything the source describes).
        dry_run: Plan and report only; change nothing.

    Returns:
        The actions, the entities pulled and those missing from the source.

    Raises:
        SchemaError: an entity named in ``entities`` does not exist and was never
            pulled from this source before.
        ConnectorUnavailable: the source or the target cannot be reached.
    """
    engine = _engine(target)
    try:
        with engine.connect() as conn:
            pulled = _pulled_before(conn, target.schema_, source_name)
            infos, missing = _describe(source, entities, pulled)
            planner = _Planner(conn, target.schema_)
            actions = [a for info in infos for a in planner.plan(info)]
        actions += [PullAction(name, "no longer in the source; the table is kept", applied=False)
                    for name in missing]
        failed = [] if dry_run else _apply(engine, target.schema_, source_name, infos, actions)
        return PullResult(actions + failed, infos, missing, dry_run, failed)
    except sa.exc.OperationalError as exc:
        raise ConnectorUnavailable(f"cannot reach {redact_url(target.url)}: "
                                   f"{redact_text(str(exc.orig))}") from exc
    finally:
        engine.dispose()


def link_config(source: str, target: str,
                entities: Sequence[EntityInfo]) -> tuple[dict[str, LinkConfig], dict[str, str]]:
    """One link per pulled entity: ``source`` entity → the table of the same name.

    Every field is mapped (target column ← same-named source field), keyed by the
    entity's key.

    Args:
        source: The source connection name.
        target: The SQL connection the tables were pulled into.
        entities: What was pulled.

    Returns:
        Link name (the entity's) → link, and entity → why it got no link: it has no
        key (nothing to match records by), or its name is not a valid config name.
    """
    links: dict[str, LinkConfig] = {}
    skipped: dict[str, str] = {}
    for info in entities:
        if not info.key:
            skipped[info.name] = "it has no key to match records by"
        elif not valid_name(info.name):
            skipped[info.name] = ("its name is not a valid config name (a letter, then "
                                  "letters, digits, '_' and '-')")
        else:
            links[info.name] = LinkConfig(
                source=Endpoint(connection=source, entity=info.name),
                target=Endpoint(connection=target, entity=info.name),
                key=list(info.key), fields={f.name: f.name for f in info.fields})
    return links, skipped


# -- planning ----------------------------------------------------------------------------


class _Planner:
    """Compares one source entity with the target database; plans what to add."""

    def __init__(self, conn: sa.Connection, schema: str | None) -> None:
        self.conn = conn
        self.schema = schema
        self.dialect = conn.dialect.name
        self.inspector = sa.inspect(conn)

    def plan(self, info: EntityInfo) -> list[PullAction]:
        if not self.inspector.has_table(info.name, schema=self.schema):
            return self._create(info)
        with quiet_reflection():
            table = sa.Table(info.name, sa.MetaData(), schema=self.schema, autoload_with=self.conn,
                             resolve_fks=False)
        actions = self._columns(info, table) + self._indexes(info, table)
        return actions or [PullAction(info.name, "up to date", applied=False)]

    def _create(self, info: EntityInfo) -> list[PullAction]:
        table = self._table(info)
        uniques = "".join(f", unique ({', '.join(k)})" for k in info.unique_keys)
        key = f"primary key ({', '.join(info.key)})" if info.key else "no primary key"
        text = f"create table ({len(info.fields)} columns, {key}{uniques})"
        actions = [PullAction(info.name, text, run=lambda conn: table.create(conn))]
        for fld in info.fields:
            if fld.references:
                actions.append(PullAction(info.name, f"lookup → {fld.references}, indexed",
                                          fld.name, run=lambda _conn: None))
        return actions

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

    def _columns(self, info: EntityInfo, table: sa.Table) -> list[PullAction]:
        actions: list[PullAction] = []
        existing = {c.name: c for c in table.columns if c.name not in TRACKING_COLUMNS}
        for fld in info.fields:
            wanted = column_type(self.dialect, fld.type)
            column = existing.get(fld.name)
            if column is None:
                ddl = wanted.compile(dialect=self.conn.dialect)
                actions.append(PullAction(info.name, f"add column {ddl} ({fld.type})", fld.name,
                                          run=self._add_column(table, fld.name, wanted)))
            elif portable_type(column.type) != portable_type(wanted):
                actions.append(PullAction(
                    info.name, f"is {fld.type} in the source now; the column stays "
                    f"{column.type.compile(dialect=self.conn.dialect)} (not changed)",
                    fld.name, applied=False))
        for name in existing:
            if info.field(name) is None:
                actions.append(PullAction(info.name, "no longer in the source; the column is "
                                          "kept", name, applied=False))
        table_key = tuple(c.name for c in table.primary_key.columns)
        if info.key and set(table_key) != set(info.key):
            actions.append(PullAction(
                info.name, f"the source's key is ({', '.join(info.key)}); the table's primary "
                f"key stays ({', '.join(table_key) or 'none'})", applied=False))
        return actions

    def _indexes(self, info: EntityInfo, table: sa.Table) -> list[PullAction]:
        """Unique keys and lookup indexes the table lacks (on columns it has or gets)."""
        indexes = self.inspector.get_indexes(info.name, schema=self.schema)
        unique = [set(ix["column_names"]) for ix in indexes if ix.get("unique")]
        unique += [set(uc["column_names"]) for uc in
                   self.inspector.get_unique_constraints(info.name, schema=self.schema)]
        unique.append({c.name for c in table.primary_key.columns})
        indexed = {tuple(ix["column_names"])[0] for ix in indexes if ix["column_names"]}
        actions = []
        for cols in info.unique_keys:
            if set(cols) not in unique:
                name = _index_name("ux", info.name, cols)
                actions.append(PullAction(info.name, f"add unique index {name} ({', '.join(cols)})",
                                          run=_create_index(info.name, self.schema, name, cols, True)))
        for fld in info.fields:
            if fld.references and fld.name not in indexed and fld.name not in info.key:
                name = _index_name("ix", info.name, [fld.name])
                actions.append(PullAction(info.name, f"add index {name} (lookup → {fld.references})",
                                          fld.name, run=_create_index(info.name, self.schema, name,
                                                                      [fld.name], False)))
        return actions

    def _add_column(self, table: sa.Table, name: str, type_: TypeEngine[Any]) -> Apply:
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


def _apply(engine: sa.Engine, schema: str | None, source: str, infos: Sequence[EntityInfo],
           actions: list[PullAction]) -> list[PullAction]:
    """Run the actions, each table in a transaction of its own; record the pull.

    Returns:
        One action per table whose changes the database refused (e.g. a unique index
        over duplicate values); the other tables are done.
    """
    failed = []
    for table in dict.fromkeys(a.table for a in actions if a.run is not None):
        try:
            with engine.begin() as conn:
                for action in actions:
                    if action.table == table and action.run is not None:
                        action.run(conn)
        except sa.exc.DBAPIError as exc:
            failed.append(PullAction(table, f"failed: {redact_text(str(exc.orig)).strip()}; "
                                     "this table's changes were rolled back", applied=False))
    with engine.begin() as conn:
        pulls = _pulls_table(schema)
        pulls.create(conn, checkfirst=True)
        now = datetime.now(UTC)
        for info in infos:
            conn.execute(sa.delete(pulls).where((pulls.c.source == source)
                                                & (pulls.c.entity == info.name)))
            conn.execute(sa.insert(pulls).values(source=source, entity=info.name,
                                                 table_name=info.name, pulled_at=now))
    return failed


# -- helpers --------------------------------------------------------------------------------


def _engine(target: SqlConnection) -> sa.Engine:
    url = sa.make_url(target.url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url)


def _pulls_table(schema: str | None) -> sa.Table:
    return sa.Table(
        PULLS_TABLE, sa.MetaData(),
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("entity", sa.String(200), primary_key=True),
        sa.Column("table_name", sa.String(200), nullable=False),
        sa.Column("pulled_at", sa.DateTime(timezone=True), nullable=False),
        schema=schema)


def _pulled_before(conn: sa.Connection, schema: str | None, source: str) -> list[str]:
    """Entities pulled from ``source`` into this database earlier, in pull order."""
    if not sa.inspect(conn).has_table(PULLS_TABLE, schema=schema):
        return []
    pulls = _pulls_table(schema)
    rows = conn.execute(sa.select(pulls.c.entity).where(pulls.c.source == source)
                        .order_by(pulls.c.entity)).all()
    return [r.entity for r in rows]


def _describe(source: Connector, entities: Sequence[str] | None,
              pulled: Sequence[str]) -> tuple[list[EntityInfo], list[str]]:
    """The entities that exist, and those wanted (or pulled before) that do not."""
    if entities is None:
        infos = source.describe(None)
        names = {i.name for i in infos}
        return infos, [name for name in pulled if name not in names]
    infos, missing = [], []
    for name in dict.fromkeys(entities):
        try:
            infos += source.describe([name])
        except SchemaError:
            if name not in pulled:
                raise
            missing.append(name)
    return infos, missing


def _index_name(prefix: str, table: str, cols: Sequence[str]) -> str:
    name = f"{prefix}_{table}_{'_'.join(cols)}"
    if len(name) <= _MAX_IDENTIFIER:
        return name
    digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{name[:_MAX_IDENTIFIER - 9]}_{digest}"

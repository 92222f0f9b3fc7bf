"""Schema drift: links whose entities or fields changed in the live systems.

The mapping editor's "detect deleted entities and fields", as a check that runs
before every worker start and on demand (``syncbus schema diff``). A link has
drifted when

* what ``syncbus validate`` checks against the live metadata no longer holds: its
  entities exist, its key and mapped fields exist on both sides, the key still
  reaches a unique key of the target, every required target field gets a value
  (the checks of :mod:`bus.config.validate`, reused, not repeated); or
* a field it uses (key fields, mapped fields on both sides) changed type since it
  was first seen. First-seen types are the *baseline*, kept per link in the state
  store (table ``syncbus_schema_baseline``); ``syncbus schema diff --accept``
  records the current types after a change was dealt with.

:func:`link_drift` returns the report, one list of lines per link (empty: clean).
The worker refuses a drifted link (:func:`refuse_drifted_links`): it builds neither
its consumer nor, unless another link needs it, its detector; changes already
routed to the link's queue wait there. The other links run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
import structlog

from bus.config.load import Loc, format_loc
from bus.config.validate import Describe, LinkChecker
from connectors.base import EntityInfo
from schemas.config import LinkConfig, SyncConfig

__all__ = ["FieldType", "SchemaBaseline", "link_drift", "link_field_types",
           "refuse_drifted_links"]

log = structlog.get_logger(__name__)

_metadata = sa.MetaData()

#: Per link, the type each used field had when first seen.
baseline_table = sa.Table(
    "syncbus_schema_baseline",
    _metadata,
    sa.Column("link", sa.String(200), primary_key=True),
    sa.Column("side", sa.String(8), primary_key=True),
    sa.Column("field", sa.String(200), primary_key=True),
    sa.Column("entity", sa.String(200), nullable=False),
    sa.Column("type", sa.String(50), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True, slots=True)
class FieldType:
    """The type of one field a link uses, as the connector describes it."""

    side: str  # "source" or "target"
    connection: str
    entity: str
    field: str
    type: str

    @property
    def where(self) -> str:
        return f"{self.connection}.{self.entity}.{self.field}"


class SchemaBaseline:
    """The baseline of field types in the state store (created on first use).

    Args:
        engine: The state store's engine.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        # Another worker may create it at the same moment (PostgreSQL then refuses one).
        with contextlib.suppress(sa.exc.IntegrityError, sa.exc.ProgrammingError):
            _metadata.create_all(engine)

    def load(self) -> dict[tuple[str, str, str], tuple[str, str, datetime]]:
        """(link, side, field) → (entity, type, recorded_at)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(baseline_table)).all()
        return {(r.link, r.side, r.field): (r.entity, r.type, r.recorded_at) for r in rows}

    def record(self, link: str, types: Iterable[FieldType], *, replace: bool = False) -> int:
        """Remember the types of fields first seen (all of them with ``replace``).

        A field whose entity changed (the link was pointed elsewhere) is recorded afresh.

        Returns:
            How many fields were recorded.
        """
        known = self.load()
        now = datetime.now(UTC)
        count = 0
        with self.engine.begin() as conn:
            for t in types:
                before = known.get((link, t.side, t.field))
                if before is not None and before[0] == t.entity and (
                        not replace or before[1] == t.type):
                    continue
                where = ((baseline_table.c.link == link) & (baseline_table.c.side == t.side)
                         & (baseline_table.c.field == t.field))
                conn.execute(sa.delete(baseline_table).where(where))
                conn.execute(sa.insert(baseline_table).values(
                    link=link, side=t.side, field=t.field, entity=t.entity, type=t.type,
                    recorded_at=now))
                count += 1
        return count


def link_drift(config: SyncConfig, describe: Describe, *,
               links: Iterable[str] | None = None, baseline: SchemaBaseline | None = None,
               unreachable: list[str] | None = None) -> dict[str, list[str]]:
    """Compare links with the live metadata.

    Args:
        config: The configuration.
        describe: A connection's entities by name (e.g. ``Worker.describe``).
        links: The links to check (default: every link, disabled ones included).
        baseline: Where first-seen field types are kept; None: no type comparison.
        unreachable: When given, connections that are only temporarily unavailable
            are appended here and their links are not reported.

    Returns:
        Link name → what drifted, one line each (``fields.email: source field
        'emailaddress1' is not a field of crm.contact``); an empty list when clean.
    """
    names = list(config.links) if links is None else list(links)
    checker = LinkChecker(config, describe, set(), unreachable)
    report: dict[str, list[str]] = {}
    for name in names:
        start = len(checker.found)
        checker.check(name, config.links[name].model_copy(update={"enabled": True}))
        report[name] = [_line(loc, msg) for loc, msg in checker.found[start:]
                        if loc[:2] == ("links", name)]
    for loc, msg in checker.found:  # a connection whose metadata cannot be read at all
        if loc[0] == "connections":
            for name in names:
                if loc[1] in _connections(config.links[name]):
                    report[name].append(f"connection {loc[1]}: {msg}")
    if baseline is not None:
        known = baseline.load()
        for name in names:
            report[name] += _type_changes(name, link_field_types(config.links[name], describe),
                                          known)
    return report


def link_field_types(link: LinkConfig, describe: Describe) -> list[FieldType]:
    """The live types of the fields ``link`` uses (key and mapped fields, both sides).

    Fields or entities that do not exist are left out (:func:`link_drift` reports them).
    """
    src = _entity(describe, link.source.connection, link.source.entity)
    tgt = _entity(describe, link.target.connection, link.target.entity)
    if src is None or tgt is None:
        return []
    pairs = _used_fields(link, src, tgt)
    found: list[FieldType] = []
    for side, info, names in (("source", src, pairs[0]), ("target", tgt, pairs[1])):
        endpoint = link.source if side == "source" else link.target
        for name in sorted(names):
            fld = info.field(name)
            if fld is not None:
                found.append(FieldType(side, endpoint.connection, endpoint.entity, name, fld.type))
    return found


def refuse_drifted_links(config: SyncConfig, describe: Describe,
                         engine: sa.Engine) -> dict[str, list[str]]:
    """The worker's check: enabled links that drifted, each logged as an error.

    Clean links get the types of fields seen for the first time recorded. A
    connection that is down refuses nothing (its links wait in retry as usual).

    Args:
        config: The worker's configuration.
        describe: The worker's (cached) metadata lookup.
        engine: The state store's engine (where the baseline is kept).

    Returns:
        Link name → its drift report, for the drifted links only.
    """
    baseline = SchemaBaseline(engine)
    enabled = [name for name, link in config.links.items() if link.enabled]
    unreachable: list[str] = []
    report = link_drift(config, describe, links=enabled, baseline=baseline,
                        unreachable=unreachable)
    refused = {name: lines for name, lines in report.items() if lines}
    for name, lines in refused.items():
        log.error("link_refused_schema_drift", link=name, drift=lines,
                  hint="fix the link or run `syncbus schema diff --accept`")
    for name in enabled:
        link = config.links[name]
        if name not in refused and not set(_connections(link)) & set(unreachable):
            baseline.record(name, link_field_types(link, describe))
    return refused


# -- internals ----------------------------------------------------------------------------


def _line(loc: Loc, message: str) -> str:
    where = format_loc(loc[2:])
    return f"{where}: {message}" if where else message


def _connections(link: LinkConfig) -> tuple[str, str]:
    return link.source.connection, link.target.connection


def _entity(describe: Describe, connection: str, entity: str) -> EntityInfo | None:
    try:
        return describe(connection).get(entity)
    except Exception:  # noqa: BLE001 - link_drift reports unreadable metadata itself
        return None


def _used_fields(link: LinkConfig, src: EntityInfo,
                 tgt: EntityInfo) -> tuple[set[str], set[str]]:
    """(source fields, target fields) the link reads and writes, both directions."""
    specs = link.field_specs()
    if specs is None:
        common = {f.name for f in src.fields if tgt.field(f.name) is not None}
        return common | set(link.key), set(common)
    source = set(link.key) | {s.from_ for s in specs.values() if s.from_ is not None}
    target = set(specs)
    reverse = getattr(link, "b2a", None)
    reverse_specs = getattr(reverse, "fields", None) or {}
    for a_field, spec in reverse_specs.items():  # b → a overrides: a is written, b is read
        source.add(a_field)
        from_ = spec if isinstance(spec, str) else getattr(spec, "from_", None)
        if from_:
            target.add(from_)
    return source, target


def _type_changes(name: str, current: list[FieldType],
                  known: Mapping[tuple[str, str, str], tuple[str, str, datetime]]) -> list[str]:
    lines = []
    for t in current:
        before = known.get((name, t.side, t.field))
        if before is not None and before[0] == t.entity and before[1] != t.type:
            lines.append(f"{t.side} field {t.where} changed type: {before[1]} → {t.type} (first "
                         f"seen as {before[1]} on {before[2]:%Y-%m-%d}); fix the link, then "
                         "accept it with `syncbus schema diff --accept`")
    return lines

"""``syncbus preview``: what a sync of one link direction would do now, writing nothing.

The changes previewed are those the direction's detector would read next: every change
of the source entity after its committed cursor (everything when there is none yet),
several changes of one record coalesced to the newest. Each goes through the
direction's own applier as far as it goes without writing
(:meth:`consumers.apply.LinkApplier.plan`: filter, soft-delete marker, field map,
lookups through the id map), and is then compared with the target's current record
(``Connector.fetch``), field by field, with the normalisation of the content hashes
(:func:`consumers.twoway.normalize`: ``10.5`` equals ``"10.50"``). Each record ends as
one of :data:`ACTIONS`:

* ``create``: the target has no record with the mapped key;
* ``update``: it has one, and a mapped field differs;
* ``unchanged``: it already holds the mapped values (one-way links still write them;
  two-way links skip them), or a deletion finds nothing to delete, or a change only
  echoes what the link last synced (the echo rule);
* ``delete`` / ``soft delete``: a deletion (or a record that left a filter with
  ``filter_action: delete``) of a record the target holds; soft: the marker is written;
* ``conflict``: two-way, both sides changed since the last sync and the link's
  conflict policy keeps the target's version (or waits for an operator: ``manual``);
  a conflict the source wins counts as its update, with a note;
* ``waiting``: a lookup's parent is not in the id map yet (the sync retries it);
* ``error``: the change would be dead-lettered (a mapping error), with the reason.

Changes a filter ignores and deletions the link ignores (``deletes: ignore``) are only
counted. The ordering guard is not consulted: a change after the cursor is newer than
what was applied, except after a crash between a publish and its cursor commit, when
the target already holds it (``unchanged``).

Nothing is written anywhere:

* the target is only read (``fetch``, ``describe``);
* the state store is only read (cursor, id map, pair hashes), and not even created
  when it does not exist yet;
* nothing is published; the broker is only asked how many changes already wait in the
  direction's queues (a passive declare), which a sync applies too;
* connectors that move bookkeeping of their own while reading changes (they declare
  ``Capabilities.scratch_copy``: Dataverse's key set, Business Central's key index and
  webhook subscriptions) read through a scratch copy of it, deleted afterwards.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa

from bus.amqp.consumer import Delivery, Verdict
from bus.amqp.queues import BrokerSession
from bus.amqp.topology import link_queues
from bus.core.redact import redact_text, redact_url
from bus.state.store import StateStore
from bus.worker.worker import Worker
from connectors.base import (
    BrokerConnectionError,
    ChangeRecord,
    ConfigError,
    Connector,
    ConnectorUnavailable,
    FetchedRecord,
)
from connectors.features import ScratchCopyable
from connectors.registry import open_connector
from consumers.apply import LinkApplier, Planned
from consumers.flow import Flow, flows
from consumers.intake import Intake
from consumers.twoway import DELETED, LinkSides, content_hash, normalize, winner
from producers.detector import change_event
from schemas.config import ConnectionConfig, SoftDelete, SyncConfig
from schemas.event import canonical_key, dumps, json_value, routing_key

__all__ = ["ACTIONS", "DEFAULT_LIMIT", "FieldDiff", "PreviewCounts", "PreviewRecord",
           "PreviewReport", "preview"]

#: What a sync would do to one record (see the module docstring).
ACTIONS = ("create", "update", "delete", "soft delete", "unchanged", "conflict", "waiting",
           "error")
#: Records shown side by side with the target when no limit is given.
DEFAULT_LIMIT = 10
#: Changes planned and fetched from the target per round trip.
CHUNK = 500
#: Seconds to wait for the broker when counting queued changes.
BROKER_TIMEOUT = 5.0

_CHANGES = ("create", "update", "delete", "soft delete", "conflict", "waiting", "error")


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One target field: its current value and the value after the sync."""

    field: str
    now: Any
    after: Any
    changed: bool


@dataclass(slots=True)
class PreviewRecord:
    """What a sync would do to one record."""

    action: str
    #: The target key (empty when the change could not be mapped).
    key: dict[str, Any]
    #: The source connector's key of the change.
    source_key: dict[str, Any]
    fields: list[FieldDiff] = field(default_factory=list)
    note: str | None = None


@dataclass(slots=True)
class PreviewCounts:
    """Records per action, plus the changes only counted."""

    creates: int = 0
    updates: int = 0
    deletes: int = 0
    soft_deletes: int = 0
    unchanged: int = 0
    conflicts: int = 0
    waiting: int = 0
    errors: int = 0
    #: Changes a filter ignores (``filter_action: ignore``).
    filtered: int = 0
    #: Deletions the link ignores (``deletes: ignore``), or of records never synced.
    ignored: int = 0

    def add(self, action: str) -> None:
        name = {"create": "creates", "update": "updates", "delete": "deletes",
                "soft delete": "soft_deletes", "unchanged": "unchanged",
                "conflict": "conflicts", "waiting": "waiting", "error": "errors"}[action]
        setattr(self, name, getattr(self, name) + 1)


@dataclass(slots=True)
class PreviewReport:
    """What a sync of one link direction would do now."""

    link: str
    direction: str
    #: ``<connection>.<entity>`` of each side.
    source: str
    target: str
    #: The committed cursor the changes were read after (None: from the beginning).
    cursor: str | None
    #: Change records read, and records left after coalescing them.
    changes: int = 0
    records: int = 0
    counts: PreviewCounts = field(default_factory=PreviewCounts)
    #: Up to ``limit`` records side by side with the target (changes first).
    sample: list[PreviewRecord] = field(default_factory=list)
    #: Changes already waiting in the direction's queues (None: broker unreachable).
    queued: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return cast(dict[str, Any], _jsonable(asdict(self)))


def preview(config: SyncConfig, link: str, direction: str | None = None,
            limit: int = DEFAULT_LIMIT) -> PreviewReport:
    """What a sync of ``link`` in ``direction`` would do now; writes nothing.

    Args:
        config: A validated configuration.
        link: The link's name.
        direction: ``a2b`` or ``b2a`` (default: the link's first direction).
        limit: Records in :attr:`PreviewReport.sample`.

    Raises:
        ConfigError: unknown link, or a direction it does not flow in.
        BusError: a system or the state store is unavailable, or the source is not
            prepared for change tracking (``syncbus setup``).
    """
    flow = _flow(config, link, direction)
    report = PreviewReport(link, flow.direction, _side(flow.source), _side(flow.target),
                           cursor=None)
    if not flow.config.enabled:
        report.notes.append(f"link {link!r} is disabled: a sync does nothing until it is "
                            "enabled; this is what it would do then")
    with tempfile.TemporaryDirectory(prefix="syncbus-preview-") as scratch:
        worker = Worker(config)
        needed = {flow.source.connection, flow.target.connection}
        for name in sorted(needed):
            worker.connectors[name] = _open_scratch(name, config.connections[name],
                                                    Path(scratch), report.notes)
        state = _open_state(config.state.url)
        try:
            _Previewer(flow, worker, state, report, limit).run()
        finally:
            for connector in worker.connectors.values():
                connector.close()
            worker.metrics.close()
            state.close()
    queues = link_queues(link, flow.config, flow.direction)
    report.queued = _queued(config.broker.url, [queues.work, *(q for _, q in queues.retries)])
    if report.queued is None:
        report.notes.append(f"broker {redact_url(config.broker.url)} unreachable: changes "
                            "already queued for this direction are not counted")
    elif report.queued:
        report.notes.append(f"{report.queued} change(s) already wait in the queues of "
                            f"{link}.{flow.direction}; a sync applies them too (not previewed)")
    return report


class _Previewer:
    """Classifies the changes of one flow (one use)."""

    def __init__(self, flow: Flow, worker: Worker, state: StateStore, report: PreviewReport,
                 limit: int) -> None:
        self.flow, self.state, self.report, self.limit = flow, state, report, limit
        self.source = worker.connectors[flow.source.connection]
        self.target = worker.connectors[flow.target.connection]
        self.sides: LinkSides | None = worker.link_sides().get(flow.link)
        # The events are built here, from the source: checked, but not signed.
        intake = Intake(flow, signer=None, version_types=self.source.capabilities.version_types,
                        max_bytes=worker.config.broker.max_event_bytes)
        self.applier = LinkApplier(flow.link, flow, self.target, state, sides=self.sides,
                                   links=worker.config.links, intake=intake)
        self.spare: list[PreviewRecord] = []

    def run(self) -> None:
        flow, report = self.flow, self.report
        report.cursor = self.state.load_cursor(report.source)
        records = self._read()
        report.records = len(records)
        for start in range(0, len(records), CHUNK):
            self._chunk(records[start:start + CHUNK])
        stats = self.applier.stats
        report.counts.filtered, report.counts.ignored = stats.filtered, stats.ignored
        report.sample += self.spare[:max(0, self.limit - len(report.sample))]
        if flow.one_way:
            report.notes.append("not mapped in this direction: " + "; ".join(
                f"{name} ({why})" for name, why in sorted(flow.one_way.items())))

    def _read(self) -> list[ChangeRecord]:
        """Every change after the cursor, the newest per record, in reading order."""
        latest: dict[str, ChangeRecord] = {}
        for page in self.source.read_changes(self.flow.source.entity, self.report.cursor,
                                             self.flow.config.page_size):
            for rec in page.records:
                self.report.changes += 1
                key = canonical_key(rec.key)
                latest.pop(key, None)  # pages come oldest first: the later change wins
                latest[key] = rec
        return list(latest.values())

    def _chunk(self, records: Sequence[ChangeRecord]) -> None:
        planned, decisions = self.applier.plan([self._delivery(r) for r in records])
        for rec, decision in zip(records, decisions, strict=True):
            if decision is None or decision.verdict is Verdict.ACK:
                continue
            action = "waiting" if decision.error_class == "MissingParent" else "error"
            self._keep(PreviewRecord(action, {}, rec.key, note=decision.error))
        current = self.target.fetch(self.flow.target.entity, [p.key for p in planned])
        pairs = (self.state.pair_hashes(self.flow.link, [p.record_key for p in planned])
                 if self.sides is not None else {})
        for item, cur in zip(planned, current, strict=True):
            self._keep(self._classify(item, records[item.index].key, cur,
                                      pairs.get(item.record_key)))

    def _delivery(self, rec: ChangeRecord) -> Delivery:
        """The change as its detector would publish it (same serialisation)."""
        src = self.flow.source
        event = change_event(src.connection, src.entity, rec, self.report.cursor)
        return Delivery(body=dumps(event), headers={}, message_id=event["id"],
                        routing_key=routing_key(src.connection, src.entity, rec.op.value))

    @property
    def _soft(self) -> SoftDelete | None:
        """The marker a deletion writes instead of deleting (``deletes: soft``)."""
        return self.flow.soft_delete if self.flow.deletes == "soft" else None

    def _classify(self, item: Planned, source_key: dict[str, Any], cur: FetchedRecord | None,
                  pair: tuple[str | None, str | None] | None) -> PreviewRecord:
        if self._echo(item, pair):
            return PreviewRecord("unchanged", item.key, source_key, self._fields(item, cur),
                                 note="echo: the source holds what the link last synced")
        if item.op == "delete" and cur is None:
            return PreviewRecord("unchanged", item.key, source_key,
                                 note="deletion: the target has no such record")
        if item.op == "delete" and self._soft is None and cur is not None:
            fields = [FieldDiff(n, json_value(v), None, True)
                      for n, v in self._shown(cur.values).items()]
            record = PreviewRecord("delete", item.key, source_key, fields)
        else:
            fields = self._fields(item, cur)
            changed = cur is None or self._differs(item, cur, fields)
            action = "soft delete" if item.op == "delete" else "create" if cur is None else "update"
            record = PreviewRecord(action if changed else "unchanged", item.key, source_key,
                                   fields)
        if record.action != "unchanged" and self.sides is not None and self.sides.two_way:
            self._conflict(item, cur, pair, record)
        return record

    def _after(self, item: Planned) -> dict[str, Any]:
        """The target values the sync writes for a planned record."""
        soft = self._soft
        if item.op == "delete" and soft is not None:
            return {**item.key, soft.field: soft.value}
        values = item.values or {}
        order = [n for n in self.flow.specs or () if n in values]  # as the config lists them
        return {**{n: values[n] for n in order}, **values}

    def _fields(self, item: Planned, cur: FetchedRecord | None) -> list[FieldDiff]:
        now = cur.values if cur is not None else {}
        return [FieldDiff(name, json_value(now.get(name)), value,
                          cur is None or normalize(now.get(name)) != normalize(value))
                for name, value in self._after(item).items()]

    def _differs(self, item: Planned, cur: FetchedRecord, fields: list[FieldDiff]) -> bool:
        """Whether the write changes the target (two-way: over the fields the link hashes)."""
        if self.sides is None or not self.sides.two_way:
            return any(f.changed for f in fields)
        hashed = self.sides.fields(self.flow.target_side)
        return (content_hash({**cur.values, **self._after(item)}, hashed)
                != content_hash(cur.values, hashed))

    def _shown(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of a target record this flow maps (all for identity maps)."""
        mapped = self.flow.specs
        return dict(values) if mapped is None else {n: values.get(n) for n in mapped}

    def _echo(self, item: Planned, pair: tuple[str | None, str | None] | None) -> bool:
        """The echo rule: the source holds what the pair row says was last synced."""
        if self.sides is None or pair is None:
            return False
        stored = pair[0 if self.flow.source_side == "a" else 1]
        if item.op == "upsert" and item.record is not None:
            mine = content_hash(item.record, self.sides.fields(self.flow.source_side))
        else:
            mine = DELETED
        return stored is not None and stored == mine

    def _conflict(self, item: Planned, cur: FetchedRecord | None,
                  pair: tuple[str | None, str | None] | None, record: PreviewRecord) -> None:
        """The conflict rule: did the target change too since the last sync?"""
        assert self.sides is not None
        src, dst = self.flow.source_side, self.flow.target_side
        now = content_hash(cur.values, self.sides.fields(dst)) if cur is not None else DELETED
        last = pair[0 if dst == "a" else 1] if pair is not None else None
        if not ((now != last) if last is not None else cur is not None):
            return
        policy = self.flow.config.conflict
        win = winner(policy, src, item.modified, cur.modified_at if cur is not None else None)
        if win == src:
            record.note = f"conflict: both sides changed; {policy}: this change wins"
            return
        record.action = "conflict"
        record.note = ("both sides changed; manual: waits for an operator "
                       "(`syncbus tx resolve`)" if win is None else
                       f"both sides changed; {policy}: the target's version stays "
                       "and flows back")

    def _keep(self, record: PreviewRecord) -> None:
        self.report.counts.add(record.action)
        if record.action in _CHANGES:
            if len(self.report.sample) < self.limit:
                self.report.sample.append(record)
        elif len(self.spare) < self.limit:
            self.spare.append(record)


def _flow(config: SyncConfig, link: str, direction: str | None) -> Flow:
    cfg = config.links.get(link)
    if cfg is None:
        raise ConfigError(f"no link {link!r} in the config "
                          f"(links: {', '.join(config.links) or 'none'})")
    by_direction = {f.direction: f for f in flows(link, cfg)}
    if direction is None:
        return next(iter(by_direction.values()))
    if direction not in by_direction:
        raise ConfigError(f"link {link!r} does not flow {direction} "
                          f"(it flows {', '.join(by_direction)})")
    return by_direction[direction]


def _side(endpoint: Any) -> str:
    return f"{endpoint.connection}.{endpoint.entity}"


# -- read-only access ---------------------------------------------------------------------


def _open_state(url: str) -> StateStore:
    """The state store, read as it is; an empty in-memory one when it does not exist yet
    (opening it would create its tables)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        exists = parsed.database not in (None, "", ":memory:") and Path(parsed.database).exists()
    else:
        engine = sa.create_engine(url)
        try:
            exists = sa.inspect(engine).has_table("syncbus_checkpoints")
        except sa.exc.OperationalError as exc:
            raise ConnectorUnavailable(f"state store {redact_url(url)} unreachable: "
                                       f"{redact_text(str(exc.orig))}") from exc
        finally:
            engine.dispose()
    return StateStore(url if exists else "sqlite://")


def _queued(url: str, queues: Sequence[str]) -> int | None:
    """Ready messages in ``queues``; None if the broker cannot be reached."""
    try:
        with BrokerSession(url, timeout=BROKER_TIMEOUT) as broker:
            return broker.total(queues)
    except BrokerConnectionError:
        return None


# -- scratch copies of connector bookkeeping ---------------------------------------------


def _open_scratch(name: str, settings: ConnectionConfig, scratch: Path,
                  notes: list[str]) -> Connector:
    """The connector of ``name``, reading through a scratch copy of its own bookkeeping
    when it keeps any (``Capabilities.scratch_copy``); what the copy leaves out is noted."""
    connector = open_connector(name, settings)
    if not connector.capabilities.scratch_copy:
        return connector
    try:
        copy = cast(ScratchCopyable, connector).scratch_copy(scratch)
    finally:
        connector.close()
    notes += [redact_text(note) for note in copy.notes]
    return open_connector(name, copy.settings)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return json_value(value)


"""The mapping consumer of one link direction (a flow): filter, map, guard, write, decide.

For each batch of change events:

1. decode, filter and map every event (a malformed event or a mapping error is
   permanent: dead-letter it, with the reason, and go on with the rest); records that
   leave the flow's filter are ignored or turned into deletions, per link;
2. translate lookups (foreign keys) through the parent link's id map; a child whose
   parent is not there yet waits in retry, and is dead-lettered naming the parent
   once the retry budget is spent;
3. coalesce events of the same target record, keeping the newest version;
4. under the state store's lock for those records, drop events whose version is not
   newer than the version already applied (the ordering rule); on two-way links also
   drop echoes and settle conflicts (:mod:`consumers.twoway`); upsert and delete the
   rest in the target in one batch each, and record versions and pair state;
5. turn each record's outcome into a decision: applied → ack, transient → retry,
   permanent → dead-letter with the target's own error text.

An optional ``on_batch`` hook receives an :class:`ApplyReport` per batch (metrics of
what the target confirmed, and the detection times of the applied events for the
change-to-target latency).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.amqp.consumer import Decision, Delivery, Verdict
from bus.amqp.integrity import BOUND_HEADERS
from bus.state.store import AppliedGuard, StateStore
from connectors.base import (
    BusError,
    ConfigError,
    Connector,
    FetchedRecord,
    MappingError,
    Outcome,
    OutcomeStatus,
    PermanentError,
    TransientError,
    WriteRow,
)
from consumers.flow import Flow
from consumers.intake import Intake
from consumers.mapping import FieldMapper
from consumers.twoway import DELETED, LinkSides, content_hash, single_id, winner
from schemas.config import LinkConfig
from schemas.event import canonical_key

__all__ = ["ApplyReport", "ApplyStats", "LinkApplier", "MASTER_HEADER", "Planned", "WINNER_HEADER"]

log = structlog.get_logger(__name__)

#: Header an operator's conflict resolution sets on a replayed change: the side (a/b)
#: whose version is kept. Covered by the event's signature (bus.amqp.integrity).
WINNER_HEADER = BOUND_HEADERS[0]
#: Header of Sync All events: the master side (a/b) that wins every difference (signed).
MASTER_HEADER = BOUND_HEADERS[1]


@dataclass(slots=True)
class ApplyStats:
    """Running totals of one applier."""

    upserted: int = 0
    deleted: int = 0
    stale: int = 0
    superseded: int = 0
    ignored: int = 0
    filtered: int = 0
    echoes: int = 0
    unchanged: int = 0
    conflicts: int = 0
    waiting: int = 0
    failed: int = 0

    @property
    def skipped(self) -> int:
        return (self.stale + self.superseded + self.ignored + self.filtered + self.echoes
                + self.unchanged)


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """What one call of the applier did (for the ``on_batch`` hook)."""

    upserted: int
    deleted: int
    skipped: int
    #: Wall-clock time (Unix seconds) the target confirmed the writes.
    applied_at: float
    #: The ``time`` attribute (detection time, ISO 8601) of every applied event.
    detected: list[str]


@dataclass(slots=True)
class Planned:
    """One record on its way to the target, as :meth:`LinkApplier.plan` leaves it.

    ``op`` is final (filters and soft-delete markers applied), ``key`` is the target's,
    ``values`` are mapped (lookups translated once resolved) and ``record`` is the
    source's. The two-way fields are filled while settling echoes and conflicts.
    """

    #: Position of the delivery in its batch (where its decision goes).
    index: int
    delivery: Delivery
    event_id: str
    op: str
    version: Any
    #: The record's key in the target.
    key: dict[str, Any]
    #: The state store's key of the record (the pair key on two-way links).
    record_key: str
    values: dict[str, Any] | None = None
    #: The event's detection time (CloudEvents ``time``), if it has one.
    time: str | None = None
    #: The source record (upserts), the event's key and the source's connector key.
    record: dict[str, Any] | None = None
    event_key: dict[str, Any] = field(default_factory=dict)
    source_id: str | None = None
    modified: str | None = None
    #: Lookup fields: target field → (parent link, parent id in the source).
    lookups: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: A winner forced by an operator (conflict resolution) or by Sync All.
    winner: str | None = None
    #: A Sync All event: its side is the master, which wins every difference.
    master: bool = False
    #: The source's content hash (two-way links, set while settling).
    src_hash: str | None = None
    #: True once the target's current record was read (:attr:`current`, None: absent).
    fetched: bool = False
    current: FetchedRecord | None = None
    #: The content hash the target will hold after the write (two-way links).
    dst_hash: str | None = None


class LinkApplier:
    """Applies batches of change events to a flow's target.

    Args:
        name: Link name (state-store namespace and log field).
        flow: The direction applied (``consumers.flow.flows``).
        target: The target connector.
        state: The state store (ordering rule, pair state, id map).
        sides: The link's shared two-way state (pair keys, content hashes); None for
            a plain one-way link.
        links: Every link of the config (the parents that lookups translate through).
        target_fields: Fields of the target entity (restricts identity mapping); when
            None they are read from the target before the first batch.
        on_batch: Called with an :class:`ApplyReport` after every batch.
        intake: Checks every event before it is used (:mod:`consumers.intake`); the
            worker passes one that verifies signatures. Default: the checks without
            signature verification (``syncbus preview`` builds its own events).
    """

    def __init__(
        self,
        name: str,
        flow: Flow,
        target: Connector,
        state: StateStore,
        *,
        sides: LinkSides | None = None,
        links: Mapping[str, LinkConfig] | None = None,
        target_fields: Collection[str] | None = None,
        on_batch: Callable[[ApplyReport], None] | None = None,
        intake: Intake | None = None,
    ) -> None:
        self.name = name
        self.intake = intake or Intake(flow, signer=None)
        self.flow = flow
        self.link = flow.config
        self.target = target
        self.state = state
        self.sides = sides
        self.entity = flow.target.entity
        self._target_fields = target_fields
        self._mapper: FieldMapper | None = None
        if sides is None and (target_fields is not None or flow.specs is not None):
            self._mapper = FieldMapper(flow, target_fields=target_fields)
        self.stats = ApplyStats()
        self.on_batch = on_batch
        self._applied_times: list[str] = []
        #: Source ids of this batch's records that the filter left out.
        self._left_out: list[str] = []
        self._lookups = flow.lookups()
        self._links = dict(links or {})
        missing = sorted({p for p in self._lookups.values() if p not in self._links})
        if missing:
            raise ConfigError(f"link {name!r}: lookup through unknown link(s) {', '.join(missing)}")
        self._log = log.bind(link=name, direction=flow.direction, entity=self.entity)

    @property
    def tracked(self) -> bool:
        """True when the pair state is kept (two-way links, lookup parents)."""
        return self.sides is not None

    @property
    def mapper(self) -> FieldMapper:
        """The field mapper; an identity map needs the target's fields first.

        Raises:
            TransientError: the target cannot be described right now.
        """
        if self._mapper is None:
            if self.sides is not None:
                self._mapper = self.sides.mapper(self.flow, self._target_fields)
            else:
                info = self.target.describe([self.entity])[0]
                self._mapper = FieldMapper(self.flow, target_fields=[f.name for f in info.fields])
        return self._mapper

    def __call__(self, batch: Sequence[Delivery]) -> list[Decision]:
        if self.on_batch is None:
            return self._handle(batch)
        st = self.stats
        before = (st.upserted, st.deleted, st.skipped)
        self._applied_times = []
        decisions = self._handle(batch)
        self.on_batch(ApplyReport(
            upserted=st.upserted - before[0], deleted=st.deleted - before[1],
            skipped=st.skipped - before[2], applied_at=time.time(),
            detected=self._applied_times))
        return decisions

    def _ready(self) -> None:
        """Resolve the mapper (and a two-way link's side fields) before mapping anything.

        Raises:
            TransientError: a system cannot be described right now.
        """
        self.mapper  # noqa: B018 - identity maps need the target's fields
        if self.sides is not None:
            self.sides.fields("a")  # identity maps describe both sides once

    def _handle(self, batch: Sequence[Delivery]) -> list[Decision]:
        try:
            self._ready()
        except TransientError as exc:
            return [self._fail(d, exc) for d in batch]
        decisions: list[Decision | None] = [None] * len(batch)
        self._left_out = []
        items = self._plan(batch, decisions)
        if self._left_out and self.tracked:
            try:
                self.state.mark_filtered(self.name, self.flow.source_side, self._left_out)
            except TransientError as exc:  # children would wait for these parents
                return [self._fail(d, exc) for d in batch]
        if items:
            self._apply(items, decisions)
        return [d if d is not None else Decision.ack() for d in decisions]

    def plan(self, batch: Sequence[Delivery]) -> tuple[list[Planned], list[Decision | None]]:
        """Steps 1-3 of a batch (filter, map, lookups, coalesce), writing nothing.

        Read-only: what ``syncbus preview`` (:mod:`bus.ops.preview`) classifies. The id map
        is read, never written; :attr:`stats` counts as for a real batch.

        Returns:
            The records that would go on to the ordering guard and the write, and per
            delivery the decision already taken (None for the planned ones).

        Raises:
            TransientError: the target cannot be described, or the state store is down.
        """
        self._ready()
        decisions: list[Decision | None] = [None] * len(batch)
        self._left_out = []
        return self._plan(batch, decisions, strict=True), decisions

    def _plan(self, batch: Sequence[Delivery], decisions: list[Decision | None], *,
              strict: bool = False) -> list[Planned]:
        prepared: list[Planned] = []
        for index, delivery in enumerate(batch):
            try:
                item = self._prepare(index, delivery)
            except PermanentError as exc:
                decisions[index] = self._dead(delivery, exc)
                continue
            if item is None:
                decisions[index] = Decision.ack()
            else:
                prepared.append(item)
        try:
            prepared = self._resolve(prepared, decisions)
        except TransientError as exc:
            if strict:
                raise
            for item in prepared:
                decisions[item.index] = self._fail(item.delivery, exc)
            prepared = []
        items: dict[str, Planned] = {}
        for item in prepared:
            older = items.get(item.record_key)
            if older is not None and _newer(older.version, item.version):
                decisions[item.index] = Decision.ack()
                self.stats.superseded += 1
                continue
            if older is not None:
                decisions[older.index] = Decision.ack()
                self.stats.superseded += 1
            items[item.record_key] = item
        return list(items.values())

    # -- steps ------------------------------------------------------------------------

    def _prepare(self, index: int, delivery: Delivery) -> Planned | None:
        event = self.intake.read(delivery)  # PermanentError: dead-lettered with the reason
        data, op, version, key, event_id = event.data, event.op, event.version, event.key, event.id
        flow = self.flow
        forced = delivery.headers.get(WINNER_HEADER) or delivery.headers.get(MASTER_HEADER)
        item = Planned(index, delivery, event_id, op, version, {}, "", time=event.time,
                       event_key=key, source_id=single_id(key),
                       modified=_text(data.get("modified_at")),
                       winner=str(forced) if forced in ("a", "b") else None)
        if forced is not None and MASTER_HEADER in delivery.headers:
            item.master = True
        if op == "upsert":
            record = data["record"]
            item.record = record
            marker = flow.soft_marker
            if marker is not None and record.get(marker.field) == marker.value:
                item.op = "delete"  # soft-deleted by the other direction: a deletion here
            elif flow.filter is not None and not flow.filter.matches(record):
                if item.source_id is not None:
                    self._left_out.append(item.source_id)
                if flow.filter_action == "ignore":
                    self.stats.filtered += 1
                    return None
                item.op = "delete"  # the record left the filter: remove it from the target
            item.key = self.mapper.target_key(record)
            if item.op == "upsert":
                item.values = self.mapper.map_record(record)
                for column, parent in self._lookups.items():
                    value = item.values.get(column)
                    if value is not None:
                        item.lookups[column] = (parent, str(value))
        if item.op == "delete":
            if flow.deletes == "ignore" and op == "delete":
                self.stats.ignored += 1
                return None
            if not item.key:
                item.key = self._delete_key(key)
        item.record_key = self._record_key(item)
        return item

    def _delete_key(self, key: dict[str, Any]) -> dict[str, Any]:
        """The target key of a deletion, from the event's key (link key fields needed)."""
        if self.tracked and not all(k in key for k in self.flow.key):
            return {}  # found through the id map in _resolve
        return self.mapper.target_key(key)

    def _record_key(self, item: Planned) -> str:
        if self.sides is None:
            return canonical_key(item.key)
        if not item.key:
            return ""
        if self.flow.direction == "b2a":
            return canonical_key(item.key)
        source = item.record or item.event_key  # a deletion: the a-side key fields are in its key
        return canonical_key({k: source.get(k) for k in self.flow.key})

    def _resolve(self, items: list[Planned], decisions: list[Decision | None]) -> list[Planned]:
        """Find deletions' records through the id map and translate lookups."""
        if not self.tracked and not self._lookups:
            return items
        side = self.flow.source_side
        unknown = [i for i in items if not i.record_key and i.source_id]
        if unknown:
            found = self.state.pair_keys_by_id(self.name, side, [i.source_id or "" for i in unknown])
            for item in unknown:
                pair_key = found.get(item.source_id or "")
                if pair_key is None:
                    self.stats.ignored += 1  # never synced: nothing to delete on the other side
                    decisions[item.index] = Decision.ack()
                    continue
                item.record_key = pair_key
                item.key = self._key_from_pair(pair_key)
        items = [i for i in items if i.record_key]
        if not self._lookups:
            return items
        wanted: dict[str, set[str]] = {}
        for item in items:
            for parent, value in item.lookups.values():
                wanted.setdefault(parent, set()).add(value)
        found_ids = {parent: self.state.lookup_ids(parent, self._parent_side(parent), sorted(values))
                     for parent, values in wanted.items()}
        ready, waiting = [], []
        for item in items:
            missing = [(column, parent, value) for column, (parent, value) in item.lookups.items()
                       if value not in found_ids[parent]]
            if missing:
                waiting.append((item, missing))
                continue
            for column, (parent, value) in item.lookups.items():
                assert item.values is not None
                item.values[column] = found_ids[parent][value]
            ready.append(item)
        absent: dict[str, set[str]] = {}
        for _, missing in waiting:
            for _, parent, value in missing:
                absent.setdefault(parent, set()).add(value)
        filtered = {parent: self.state.filtered_ids(parent, self._parent_side(parent),
                                                    sorted(values))
                    for parent, values in absent.items()}  # one query per parent link
        for item, missing in waiting:
            decisions[item.index] = self._orphan(item, missing, filtered)
        return ready

    def _orphan(self, item: Planned, missing: list[tuple[str, str, str]],
                filtered: Mapping[str, set[str]]) -> Decision:
        """A record whose parent is not in the id map: filtered out by the parent link
        (settled at once, per ``filtered_parents``), or not synced yet (it waits)."""
        left_out = [(c, p, v) for c, p, v in missing if v in filtered[p]]
        if not left_out:
            return self._waiting(item, missing)
        what = "; ".join(f"{column}: the {parent!r} record with key {value!r} is left out by "
                         f"link {parent!r}'s filter" for column, parent, value in left_out)
        if self.link.filtered_parents == "skip":
            self.stats.filtered += 1
            self._log.info("parent_filtered_out", event_id=item.event_id, detail=what)
            return Decision.ack()
        return self._dead(item.delivery, MappingError(f"parent filtered out: {what}",
                                                      entity=self.entity))

    def _key_from_pair(self, pair_key: str) -> dict[str, Any]:
        a_key: dict[str, Any] = json.loads(pair_key)
        if self.flow.direction == "b2a":
            return a_key
        return self.mapper.target_key(a_key)

    def _parent_side(self, parent: str) -> str:
        """Which side of the parent link this flow's source connection is."""
        return "a" if self._links[parent].source.connection == self.flow.source.connection else "b"

    def _waiting(self, item: Planned, missing: list[tuple[str, str, str]]) -> Decision:
        self.stats.waiting += 1
        what = "; ".join(f"{column}: no {parent!r} record with key {value!r} in "
                         f"{self.flow.target.connection} yet" for column, parent, value in missing)
        message = f"waiting for parent record ({what})"
        if item.delivery.attempts + 1 >= self.link.retry.max_attempts:
            return self._dead(item.delivery, MappingError(
                f"missing parent after {item.delivery.attempts + 1} attempts: {what}",
                entity=self.entity))
        return Decision(Verdict.RETRY, error=message, error_class="MissingParent")

    def _apply(self, items: list[Planned], decisions: list[Decision | None]) -> None:
        started = time.perf_counter()
        applied_as = self.name if self.flow.direction == "a2b" else self.flow.name
        try:
            with self.state.guard(self.name, [i.record_key for i in items], applied_as=applied_as,
                                  with_pairs=self.tracked) as guard:
                fresh = []
                for item in items:
                    if isinstance(item.version, int) and self._is_stale(item, guard):
                        decisions[item.index] = Decision.ack()
                        self.stats.stale += 1
                    else:
                        fresh.append(item)
                if self.sides is not None:
                    fresh = self._settle(fresh, guard, decisions)
                fresh = self._soft_deletable(fresh, decisions)
                outcomes = self._write(fresh)
                created: list[Planned] = []
                for item, outcome in zip(fresh, outcomes, strict=True):
                    decisions[item.index] = self._decide(item, outcome)
                    if not outcome.ok:
                        continue
                    if item.time is not None:
                        self._applied_times.append(item.time)
                    if isinstance(item.version, int):
                        guard.record(item.record_key, item.version)
                    guard.processed_event(event_id=item.event_id, entity=self.entity,
                                          key=item.record_key, op=item.op, version=item.version)
                    if self.sides is not None:
                        self._remember(item, guard)
                        if item.op == "upsert" and item.current is None:
                            created.append(item)
                if created:
                    self._learn_ids(created, guard)
        except (TransientError, PermanentError) as exc:
            # Nothing of this batch is recorded as applied: every record goes round again.
            self._applied_times.clear()
            self._log.warning("batch_failed", count=len(items), error=exc.message,
                              error_class=type(exc).__name__)
            for item in items:
                decisions[item.index] = self._fail(item.delivery, exc)
            return
        self._log.info("batch_applied", count=len(items),
                       ms=round((time.perf_counter() - started) * 1000, 1))

    def _soft_deletable(self, items: list[Planned],
                        decisions: list[Decision | None]) -> list[Planned]:
        """Leave out soft deletes of records the target does not have (nothing to mark)."""
        if self.flow.deletes != "soft":
            return items
        unknown = [i for i in items if i.op == "delete" and not i.fetched]
        if not unknown:
            return items
        found = self._fetch(unknown)
        absent = {i.index for i, rec in zip(unknown, found, strict=True) if rec is None}
        for item in unknown:
            if item.index in absent:
                self.stats.ignored += 1
                decisions[item.index] = Decision.ack()
        return [i for i in items if i.index not in absent]

    def _is_stale(self, item: Planned, guard: AppliedGuard) -> bool:
        """The ordering rule: this version, or a newer one, was applied or seen already.

        On tracked links the pair row also remembers the version of each side read
        back while settling a conflict, so a change that lost is not applied later.
        """
        if guard.is_stale(item.record_key, item.version):
            return True
        if self.sides is None:
            return False
        seen = (guard.pair(item.record_key) or {}).get(f"{self.flow.source_side}_version")
        return isinstance(seen, str) and seen.isdigit() and item.version <= int(seen)

    # -- two-way ----------------------------------------------------------------------

    def _settle(self, items: list[Planned], guard: AppliedGuard,
                decisions: list[Decision | None]) -> list[Planned]:
        """Drop echoes and no-ops, settle conflicts; returns the items to write."""
        assert self.sides is not None
        src, dst = self.flow.source_side, self.flow.target_side
        src_fields, dst_fields = self.sides.fields(src), self.sides.fields(dst)
        pending = []
        for item in items:
            pair = guard.pair(item.record_key) or {}
            src_hash = (content_hash(item.record or {}, src_fields)
                        if item.op == "upsert" and item.record is not None else DELETED)
            item.src_hash = src_hash
            if pair.get(f"{src}_hash") == src_hash and item.winner is None:
                self.stats.echoes += 1  # our own write coming back, or nothing we sync changed
                self._touch(item, guard)
                decisions[item.index] = Decision.ack()
                continue
            pending.append(item)
        if not self.sides.two_way or not pending:
            return pending
        current = self._fetch(pending)
        out = []
        for item, cur in zip(pending, current, strict=True):
            pair = guard.pair(item.record_key) or {}
            item.fetched, item.current = True, cur
            now_hash = content_hash(cur.values, dst_fields) if cur is not None else DELETED
            if item.op == "upsert":
                item.dst_hash = content_hash({**(cur.values if cur else {}),
                                              **(item.values or {})}, dst_fields)
            else:
                item.dst_hash = DELETED
            if now_hash == item.dst_hash:
                self.stats.unchanged += 1  # the target already holds this content
                self._remember(item, guard)
                decisions[item.index] = Decision.ack()
                continue
            last = pair.get(f"{dst}_hash")
            changed = (now_hash != last) if last is not None else cur is not None
            if not changed and item.winner in (None, src):
                out.append(item)
                continue
            if cur is None and item.master:
                out.append(item)  # Sync All: the master lacks the record; copy it
                continue
            win = item.winner or winner(self.link.conflict, src, item.modified,
                                        cur.modified_at if cur is not None else None)
            self._log_conflict(item, cur, win, guard)
            if win == src:
                out.append(item)
                continue
            if win is None:
                decisions[item.index] = self._conflict_dead(item)
                continue
            self._touch(item, guard)  # the target's version wins: it flows back on its own
            decisions[item.index] = Decision.ack()
        return out

    def _fetch(self, items: list[Planned]) -> list[FetchedRecord | None]:
        keyed = [i for i in items if i.key]
        found = self.target.fetch(self.entity, [i.key for i in keyed]) if keyed else []
        by_index = {i.index: rec for i, rec in zip(keyed, found, strict=True)}
        return [by_index.get(i.index) for i in items]

    def _touch(self, item: Planned, guard: AppliedGuard) -> None:
        """Record the source's version (duplicates then skip) without syncing content."""
        src = self.flow.source_side
        guard.set_pair(item.record_key, **{f"{src}_version": item.version,
                                           f"{src}_id": item.source_id or _pair_id(guard, item, src)})
        if isinstance(item.version, int):
            guard.record(item.record_key, item.version)

    def _remember(self, item: Planned, guard: AppliedGuard) -> None:
        """Both sides now hold the same content: record it in the pair row."""
        src, dst = self.flow.source_side, self.flow.target_side
        cur = item.current
        values: dict[str, Any] = {f"{src}_hash": item.src_hash, f"{src}_version": item.version}
        if item.source_id:
            values[f"{src}_id"] = item.source_id
        if item.dst_hash is not None:
            values[f"{dst}_hash"] = item.dst_hash
        elif self.sides is not None and item.values is not None:
            values[f"{dst}_hash"] = content_hash(item.values, self.sides.fields(dst))
        elif item.op == "delete":
            values[f"{dst}_hash"] = DELETED
        if cur is not None:
            values[f"{dst}_id"] = single_id(cur.key)
            values[f"{dst}_version"] = cur.version
        guard.set_pair(item.record_key, **values)

    def _learn_ids(self, created: list[Planned], guard: AppliedGuard) -> None:
        """Read back records this batch created, for their ids (lookups, deletions)."""
        dst = self.flow.target_side
        missing = [i for i in created if not (guard.pair(i.record_key) or {}).get(f"{dst}_id")]
        if not missing:
            return
        for item, rec in zip(missing, self.target.fetch(self.entity, [i.key for i in missing]),
                             strict=True):
            if rec is not None:
                guard.set_pair(item.record_key, **{f"{dst}_id": single_id(rec.key),
                                                   f"{dst}_version": rec.version})

    def _log_conflict(self, item: Planned, cur: FetchedRecord | None, win: str | None,
                      guard: AppliedGuard) -> None:
        src = self.flow.source_side
        mine = item.record if item.op == "upsert" else None
        theirs = cur.values if cur is not None else None
        theirs_time = cur.modified_at.isoformat() if cur is not None and cur.modified_at else None
        a_vals, b_vals = (mine, theirs) if src == "a" else (theirs, mine)
        a_time, b_time = (item.modified, theirs_time) if src == "a" else (theirs_time, item.modified)
        policy = "operator" if item.winner else self.link.conflict
        self.stats.conflicts += 1
        guard.conflict(pair_key=item.record_key, policy=policy, winner=win,
                       a_values=_jsonable(a_vals), b_values=_jsonable(b_vals),
                       a_modified=a_time, b_modified=b_time, event_id=item.event_id,
                       direction=self.flow.direction)
        self._log.warning("conflict", key=item.record_key, policy=policy, winner=win or "pending",
                          event_id=item.event_id)

    def _conflict_dead(self, item: Planned) -> Decision:
        message = (f"conflict: both sides changed {item.record_key} since the last sync "
                   f"(link {self.name!r}, policy manual); keep one side with "
                   f"`syncbus tx resolve {item.event_id} --keep a|b`")
        return Decision(Verdict.DEAD, error=message, error_class="Conflict")

    # -- writing ----------------------------------------------------------------------

    def _write(self, items: list[Planned]) -> list[Outcome]:
        flow = self.flow
        soft = flow.soft_delete if flow.deletes == "soft" else None
        upserts = [i for i in items if i.op == "upsert" or (soft is not None and i.op == "delete")]
        deletes = [i for i in items if i.op == "delete" and soft is None]
        by_item: dict[int, Outcome] = {}
        if upserts:
            marks = {soft.field: soft.value} if soft is not None else {}
            rows = [WriteRow(key=i.key, values=i.values or dict(i.key)) if i.op == "upsert"
                    else WriteRow(key=i.key, values={**i.key, **marks}, update_only=True)
                    for i in upserts]
            for item, outcome in zip(upserts, self.target.upsert(self.entity, rows), strict=True):
                by_item[item.index] = outcome
                if item.op == "upsert":
                    self.stats.upserted += outcome.ok
                else:
                    self.stats.deleted += outcome.ok
        if deletes:
            keys = [i.key for i in deletes]
            for item, outcome in zip(deletes, self.target.delete(self.entity, keys), strict=True):
                by_item[item.index] = outcome
                self.stats.deleted += outcome.ok
        return [by_item[i.index] for i in items]

    # -- decisions ----------------------------------------------------------------------

    def _decide(self, item: Planned, outcome: Outcome) -> Decision:
        if outcome.status is OutcomeStatus.APPLIED:
            return Decision.ack()
        self.stats.failed += 1
        verdict = Verdict.RETRY if outcome.status is OutcomeStatus.TRANSIENT else Verdict.DEAD
        self._log.warning("record_failed", event_id=item.event_id, key=item.record_key,
                          verdict=verdict.value, error=outcome.error, code=outcome.code)
        return Decision(verdict, error=outcome.error, retry_after=outcome.retry_after,
                        error_class="RecordRejected" if verdict is Verdict.DEAD else "Transient",
                        response=outcome.code)

    def _dead(self, delivery: Delivery, exc: BusError) -> Decision:
        self.stats.failed += 1
        self._log.warning("event_rejected", message_id=delivery.message_id,
                          error=exc.message, error_class=type(exc).__name__)
        return Decision(Verdict.DEAD, error=exc.message, error_class=type(exc).__name__)

    def _fail(self, delivery: Delivery, exc: BusError) -> Decision:
        if isinstance(exc, PermanentError):
            return self._dead(delivery, exc)
        return Decision(Verdict.RETRY, error=exc.message, error_class=type(exc).__name__,
                        retry_after=getattr(exc, "retry_after", None))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _newer(a: Any, b: Any) -> bool:
    """True when version ``a`` is newer than ``b`` (ints compare; otherwise arrival order)."""
    if isinstance(a, int) and isinstance(b, int):
        return a > b
    return False


def _pair_id(guard: AppliedGuard, item: Planned, side: str) -> str | None:
    value = (guard.pair(item.record_key) or {}).get(f"{side}_id")
    return None if value is None else str(value)


def _jsonable(values: dict[str, Any] | None) -> dict[str, Any] | None:
    if values is None:
        return None
    out: dict[str, Any] = json.loads(json.dumps(values, default=str))
    return out

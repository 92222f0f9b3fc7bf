"""The mapping consumer of one link direction: map, guard, write, decide.

For each batch of change events:

1. decode and map every event (a malformed event or a mapping error is permanent:
   dead-letter it, with the reason, and go on with the rest);
2. coalesce events of the same target record, keeping the newest version;
3. under the state store's lock for those records, drop events whose version is not
   newer than the version already applied (the ordering rule), upsert and delete
   the rest in the target in one batch each, and record the applied versions;
4. turn each record's outcome into a decision: applied → ack, transient → retry,
   permanent → dead-letter with the target's own error text.

An optional ``on_batch`` hook receives an :class:`ApplyReport` per batch (metrics of
what the target confirmed, and the detection times of the applied events for the
change-to-target latency).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.consumer import Decision, Delivery, Verdict
from connectors.base import (
    BusError,
    Connector,
    Outcome,
    OutcomeStatus,
    PermanentError,
    SchemaError,
    TransientError,
    WriteRow,
)
from consumers.mapping import FieldMapper
from producers.state import StateStore
from schemas.config import LinkConfig
from schemas.event import canonical_key

__all__ = ["ApplyReport", "ApplyStats", "LinkApplier"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class ApplyStats:
    """Running totals of one applier."""

    upserted: int = 0
    deleted: int = 0
    stale: int = 0
    superseded: int = 0
    ignored: int = 0
    failed: int = 0


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
class _Item:
    index: int
    delivery: Delivery
    event_id: str
    op: str
    version: Any
    key: dict[str, Any]
    record_key: str
    values: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: The event's detection time (CloudEvents ``time``), if it has one.
    time: str | None = None


class LinkApplier:
    """Applies batches of change events to a link's target.

    Args:
        name: Link name (state-store namespace and log field).
        link: The link's configuration.
        target: The target connector.
        state: The state store (ordering rule).
        target_fields: Fields of the target entity (restricts identity mapping); when
            None they are read from the target before the first batch.
        on_batch: Called with an :class:`ApplyReport` after every batch.
    """

    def __init__(
        self,
        name: str,
        link: LinkConfig,
        target: Connector,
        state: StateStore,
        *,
        target_fields: Collection[str] | None = None,
        on_batch: Callable[[ApplyReport], None] | None = None,
    ) -> None:
        self.name = name
        self.link = link
        self.target = target
        self.state = state
        self.entity = link.target.entity
        self._mapper = (FieldMapper(link, target_fields=target_fields)
                        if target_fields is not None or link.fields is not None else None)
        self.stats = ApplyStats()
        self.on_batch = on_batch
        self._applied_times: list[str] = []
        self._log = log.bind(link=name, entity=self.entity)

    @property
    def mapper(self) -> FieldMapper:
        """The field mapper; an identity map needs the target's fields first.

        Raises:
            TransientError: the target cannot be described right now.
        """
        if self._mapper is None:
            info = self.target.describe([self.entity])[0]
            self._mapper = FieldMapper(self.link, target_fields=[f.name for f in info.fields])
        return self._mapper

    def __call__(self, batch: Sequence[Delivery]) -> list[Decision]:
        if self.on_batch is None:
            return self._handle(batch)
        st = self.stats
        before = (st.upserted, st.deleted, st.stale + st.superseded + st.ignored)
        self._applied_times = []
        decisions = self._handle(batch)
        self.on_batch(ApplyReport(
            upserted=st.upserted - before[0], deleted=st.deleted - before[1],
            skipped=st.stale + st.superseded + st.ignored - before[2], applied_at=time.time(),
            detected=self._applied_times))
        return decisions

    def _handle(self, batch: Sequence[Delivery]) -> list[Decision]:
        try:
            self.mapper  # noqa: B018 - resolve it before mapping anything
        except TransientError as exc:
            return [self._fail(d, exc) for d in batch]
        decisions: list[Decision | None] = [None] * len(batch)
        items: dict[str, _Item] = {}
        for index, delivery in enumerate(batch):
            try:
                item = self._prepare(index, delivery)
            except PermanentError as exc:
                decisions[index] = self._dead(delivery, exc)
                continue
            if item is None:
                decisions[index] = Decision.ack()
                continue
            older = items.get(item.record_key)
            if older is not None and _newer(older.version, item.version):
                decisions[index] = Decision.ack()
                self.stats.superseded += 1
                continue
            if older is not None:
                decisions[older.index] = Decision.ack()
                self.stats.superseded += 1
            items[item.record_key] = item
        if items:
            self._apply(list(items.values()), decisions)
        return [d if d is not None else Decision.ack() for d in decisions]

    # -- steps ------------------------------------------------------------------------

    def _prepare(self, index: int, delivery: Delivery) -> _Item | None:
        try:
            event = json.loads(delivery.body)
            data = event["data"]
            op, version, key = data["op"], data["version"], data["key"]
            event_id = str(event["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SchemaError(f"malformed change event: {type(exc).__name__}: {exc}") from exc
        if op not in ("upsert", "delete") or not isinstance(key, dict):
            raise SchemaError(f"malformed change event: op={op!r}, key={key!r}")
        if op == "delete" and self.link.deletes == "ignore":
            self.stats.ignored += 1
            return None
        if op == "upsert":
            record = data.get("record")
            if not isinstance(record, dict):
                raise SchemaError("malformed change event: upsert without a record")
            target_key = self.mapper.target_key(record)
            values = self.mapper.map_record(record)
        else:
            target_key, values = self.mapper.target_key(key), None
        return _Item(index, delivery, event_id, op, version, target_key,
                     canonical_key(target_key), values, time=event.get("time"))

    def _apply(self, items: list[_Item], decisions: list[Decision | None]) -> None:
        started = time.perf_counter()
        try:
            with self.state.guard(self.name, [i.record_key for i in items]) as guard:
                fresh = []
                for item in items:
                    if isinstance(item.version, int) and guard.is_stale(item.record_key, item.version):
                        decisions[item.index] = Decision.ack()
                        self.stats.stale += 1
                    else:
                        fresh.append(item)
                outcomes = self._write(fresh)
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

    def _write(self, items: list[_Item]) -> list[Outcome]:
        upserts = [i for i in items if i.op == "upsert"]
        deletes = [i for i in items if i.op == "delete"]
        by_item: dict[int, Outcome] = {}
        if upserts:
            rows = [WriteRow(key=i.key, values=i.values or {}) for i in upserts]
            for item, outcome in zip(upserts, self.target.upsert(self.entity, rows), strict=True):
                by_item[item.index] = outcome
                self.stats.upserted += outcome.ok
        if deletes:
            keys = [i.key for i in deletes]
            for item, outcome in zip(deletes, self.target.delete(self.entity, keys), strict=True):
                by_item[item.index] = outcome
                self.stats.deleted += outcome.ok
        return [by_item[i.index] for i in items]

    # -- decisions ----------------------------------------------------------------------

    def _decide(self, item: _Item, outcome: Outcome) -> Decision:
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


def _newer(a: Any, b: Any) -> bool:
    """True when version ``a`` is newer than ``b`` (ints compare; otherwise arrival order)."""
    if isinstance(a, int) and isinstance(b, int):
        return a > b
    return False

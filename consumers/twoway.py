"""Two-way links: content hashes, pair keys, the echo rule and the conflict rule.

**Content hash.** Each side's content is hashed over the fields the link keeps in
sync on that side (:func:`consumers.flow.side_fields`), with values normalised so
the same content compares equal however a system hands it back: numbers (int,
float, Decimal, decimal text) by their shortest decimal form, timestamps in UTC
(naive ones taken as UTC), booleans as 0/1, empty text as null. ``pairs.a_hash`` / ``b_hash`` hold each
side's hash as of the last sync.

**Echo rule.** A change whose content equals what the pair row says that side holds
is our own write coming back (or a change of fields the link does not sync): it is
not published by the detector (:class:`EchoFilter`) when every flow reading that
entity agrees, and it is acknowledged without effect by the consumer otherwise.
Where a system rewrites a value (rounds a timestamp), the content differs once,
makes one round trip, and then matches: links always go quiet.

**Conflict rule.** Before writing, a two-way consumer reads the target's current
record. If the target changed since the last sync (its hash is not the pair's), both
sides changed: the link's policy picks the winner (:func:`winner`), the losing
version is written to the conflict log with both values, and only a winning change
is written. ``manual`` writes nothing and dead-letters the change until an operator
picks a side (``syncbus tx resolve``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import structlog

from bus.state.store import StateStore
from connectors.base import ChangeRecord, Connector, EntityInfo, Op
from consumers.flow import Flow, filter_fields, side_fields
from consumers.mapping import FieldMapper
from schemas.event import canonical_key, json_value

__all__ = ["DELETED", "EchoFilter", "LinkSides", "content_hash", "normalize", "single_id", "winner"]

log = structlog.get_logger(__name__)

#: The hash a side has once the link deleted its record (so the deletion's echo is known).
DELETED = "deleted"

_NUMBER = re.compile(r"^-?(0|[1-9]\d*)(\.\d+)?$")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


def normalize(value: Any) -> Any:
    """A value in the form its content hash compares it by (see the module docstring)."""
    value = json_value(value)
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return _decimal_text(Decimal(repr(value)) if isinstance(value, float) else Decimal(value))
    if isinstance(value, str):
        if not value:
            return None  # Business Central has no null text, Dataverse no empty text
        if _NUMBER.match(value):
            return _decimal_text(Decimal(value))
        if _TIMESTAMP.match(value):
            return _utc_text(value)
        return value
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def _decimal_text(d: Decimal) -> str:
    try:
        d = d.normalize()
    except InvalidOperation:
        return str(d)
    text = format(d, "f")
    return "0" if text in ("-0", "0") else text


def _utc_text(text: str) -> str:
    moment = _moment(text)
    return text if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def content_hash(record: Mapping[str, Any], fields: Iterable[str]) -> str:
    """The hash of ``record``'s ``fields`` (absent fields count as null)."""
    body = json.dumps([(f, normalize(record.get(f))) for f in sorted(fields)],
                      separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def winner(policy: str, source_side: str, source_time: str | None,
           target_time: str | datetime | None) -> str | None:
    """The side (``a``/``b``) that wins a conflict; None for ``manual``.

    ``newest_wins`` compares modification times; a tie goes to side a; when a time is
    unknown (SQL tables without one) the change being applied wins.
    """
    if policy == "source_wins":
        return "a"
    if policy == "target_wins":
        return "b"
    if policy == "manual":
        return None
    target_side = "b" if source_side == "a" else "a"
    mine, theirs = _moment(source_time), _moment(target_time)
    if mine is None or theirs is None:
        return source_side
    if mine == theirs:
        return "a"
    return source_side if mine > theirs else target_side


def _moment(value: str | datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class LinkSides:
    """What both flows of a link (and the detectors' echo filter) share about it.

    Args:
        flows: The link's flows.
        connectors: Connector by connection name (to describe identity-mapped sides).
    """

    def __init__(self, flows: Sequence[Flow], connectors: Mapping[str, Connector]) -> None:
        self.flows = list(flows)
        self.link = flows[0].link
        self.config = flows[0].config
        self.connectors = connectors
        self._fields = side_fields(self.flows)
        self._mappers: dict[str, FieldMapper] = {}

    @property
    def two_way(self) -> bool:
        return self.config.direction == "both"

    def fields(self, side: str) -> frozenset[str]:
        """The fields side ``a`` or ``b`` is hashed over."""
        if self._fields is None:
            a = self._describe(self.config.source.connection, self.config.source.entity)
            b = self._describe(self.config.target.connection, self.config.target.entity)
            common = frozenset(f.name for f in a.fields) & frozenset(f.name for f in b.fields)
            extra = filter_fields(self.flows)
            self._fields = {"a": common | extra["a"], "b": common | extra["b"]}
        return self._fields[side]

    def _describe(self, connection: str, entity: str) -> EntityInfo:
        return self.connectors[connection].describe([entity])[0]

    def mapper(self, flow: Flow, target_fields: Collection[str] | None = None) -> FieldMapper:
        """The field mapper of ``flow`` (one per flow, shared)."""
        mapper = self._mappers.get(flow.direction)
        if mapper is None:
            if flow.specs is None and target_fields is None:
                target_fields = self.fields(flow.target_side)
            mapper = FieldMapper(flow, target_fields=target_fields)
            self._mappers[flow.direction] = mapper
        return mapper

    def pair_key(self, flow: Flow, record: Mapping[str, Any]) -> str:
        """The pair key (side a's key values) of a record read from ``flow``'s source."""
        if flow.direction == "a2b":
            return canonical_key({k: record.get(k) for k in flow.key})
        return canonical_key(self.mapper(flow).target_key(record))


class EchoFilter:
    """Drops from a detector's pages the changes that only echo our own writes.

    A change is dropped when, for every flow that reads this entity, its content
    equals the content the pair row records for that side. Any flow that is one-way,
    or whose pair differs, keeps the change published.

    Args:
        flows: Every flow whose source is this detector's entity, with its link.
        state: The state store (pair hashes).
    """

    def __init__(self, flows: Sequence[tuple[Flow, LinkSides]], state: StateStore) -> None:
        self.flows = list(flows)
        self.state = state
        self.active = bool(self.flows) and all(s.two_way for _, s in self.flows)
        self.dropped = 0

    def __call__(self, records: list[ChangeRecord]) -> list[ChangeRecord]:
        if not self.active:
            return records
        echo = [True] * len(records)
        for flow, sides in self.flows:
            fields = sides.fields(flow.source_side)
            keys: list[str | None] = []
            for rec in records:
                try:
                    keys.append(sides.pair_key(flow, rec.values or {})
                                if rec.op is Op.UPSERT else None)
                except Exception:  # noqa: BLE001 - a record the consumer will reject
                    keys.append(None)
            known = self.state.pair_hashes(flow.link, [k for k in keys if k])
            column = 0 if flow.source_side == "a" else 1
            for i, (rec, key) in enumerate(zip(records, keys, strict=True)):
                if not echo[i]:
                    continue
                stored = known.get(key) if key else None
                echo[i] = (stored is not None and stored[column] is not None
                           and stored[column] == content_hash(rec.values or {}, fields))
        kept = [rec for rec, is_echo in zip(records, echo, strict=True) if not is_echo]
        dropped = len(records) - len(kept)
        if dropped:
            self.dropped += dropped
            log.debug("echoes_dropped", count=dropped, flows=[f.name for f, _ in self.flows])
        return kept


def single_id(key: Mapping[str, Any] | None) -> str | None:
    """A connector key as id-map text: its one value (multi-column keys: canonical JSON)."""
    if not key:
        return None
    if len(key) == 1:
        value = json_value(next(iter(key.values())))
        return None if value is None else str(value)
    return canonical_key(dict(key))


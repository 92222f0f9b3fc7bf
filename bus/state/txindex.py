"""The offline-transaction index: one row per transaction that left the happy path.

Tables (created with the others by :class:`bus.state.store.StateStore`):
  ``syncbus_tx`` — per transaction (event id, link, direction): its status (Pending,
  Processed, Error, Archived), what the event is (entity, key, operation, version),
  its failures (attempts, round, first and last failure, error class and text, the
  target's response, the failure history) and where its body lies in the
  dead-letter log (the letter id and the stream offset).
  ``syncbus_tx_moves`` — every status change of a transaction: when, to which
  status, who or what moved it (the consumer, an operator, the reconciliation
  sweep) and why. A transaction's path (Error → Pending → Processed) is read here.

Listing, filtering, counting and paging read these tables only; RabbitMQ keeps the
bodies (see :mod:`bus.ops.txlog`). Writes happen per settled batch, never per message,
and only for messages that failed, were replayed, or waited inside a connector's
retries: the happy path writes nothing here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

__all__ = [
    "INDEX_STATUSES",
    "TX_COLUMNS",
    "TxIndexMixin",
    "TxKey",
    "TxPage",
    "TxQuery",
    "tx_metadata",
]

#: Metadata of the transaction index tables (created next to the core tables).
tx_metadata = sa.MetaData()

#: Statuses a row of the index can have. A purged transaction keeps its row (hidden
#: from listings): its letter stays in the log, and a sweep must not bring it back.
INDEX_STATUSES = ("pending", "processed", "error", "archived", "purged")

_TS = sa.DateTime(timezone=True)

tx = sa.Table(
    "syncbus_tx",
    tx_metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("link", sa.String(200), primary_key=True),  # "?" when no header says
    sa.Column("direction", sa.String(8), primary_key=True),  # a2b, b2a or "?"
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("status_at", _TS, nullable=False),
    sa.Column("entity", sa.String(200), nullable=True),
    sa.Column("op", sa.String(16), nullable=True),
    sa.Column("record_key", sa.Text, nullable=True),
    sa.Column("version", sa.String(100), nullable=True),
    sa.Column("routing_key", sa.String(255), nullable=False, default=""),
    sa.Column("attempts", sa.Integer, nullable=True),
    sa.Column("round", sa.Integer, nullable=True),
    sa.Column("replays", sa.Integer, nullable=False, default=0),
    sa.Column("deliveries", sa.Integer, nullable=True),
    sa.Column("first_failure", _TS, nullable=True),
    sa.Column("last_failure", _TS, nullable=True),
    sa.Column("error_class", sa.String(200), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("response", sa.Text, nullable=True),
    sa.Column("failures", sa.Text, nullable=True),  # JSON: [{"at", "class", "error"}]
    sa.Column("unreadable", sa.Text, nullable=True),  # why the body cannot be read
    sa.Column("preview", sa.String(300), nullable=True),  # its first bytes, escaped
    sa.Column("size", sa.Integer, nullable=True),
    # The dead letter holding the body: its id and, once the log was read, its offset.
    sa.Column("letter", sa.String(80), nullable=True),
    sa.Column("log_offset", sa.BigInteger, nullable=True),
    sa.Index("ix_syncbus_tx_status_link", "status", "link"),
    sa.Index("ix_syncbus_tx_entity", "entity"),
    sa.Index("ix_syncbus_tx_last_failure", "last_failure"),
    sa.Index("ix_syncbus_tx_letter", "letter"),
)

moves = sa.Table(
    "syncbus_tx_moves",
    tx_metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(200), nullable=False),
    sa.Column("link", sa.String(200), nullable=False),
    sa.Column("direction", sa.String(8), nullable=False),
    sa.Column("at", _TS, nullable=False),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("by", sa.String(200), nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.Index("ix_syncbus_tx_moves_tx", "id", "link", "direction"),
)

#: Columns of an index row (what :meth:`TxIndexMixin.tx_record` accepts).
TX_COLUMNS = tuple(c.name for c in tx.columns)
_KEY = ("id", "link", "direction")
_UPDATABLE = tuple(c for c in TX_COLUMNS if c not in _KEY)
#: Rows per statement when many keys are written or read at once.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class TxKey:
    """A transaction: an event on one link direction."""

    id: str
    link: str
    direction: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> TxKey:
        return cls(str(row["id"]), str(row["link"]), str(row["direction"]))


@dataclass(slots=True)
class TxQuery:
    """Which index rows to read; every given criterion must match.

    ``links`` scopes a query to one configuration's links (rows whose link is unknown,
    ``"?"``, belong to every configuration).
    """

    statuses: tuple[str, ...] = ("error",)
    links: tuple[str, ...] | None = None
    link: str | None = None
    entity: str | None = None
    ids: frozenset[str] = frozenset()
    since: datetime | None = None
    error_contains: str | None = None
    #: A key value: rows whose key holds it (exact check by the caller).
    key_contains: str | None = None


@dataclass(slots=True)
class TxPage:
    """One page of rows, and the cursor of the next (None: this was the last)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


class TxIndexMixin:
    """The index operations of :class:`bus.state.store.StateStore`."""

    engine: sa.Engine
    dialect: str

    # -- writes ------------------------------------------------------------------------

    def tx_record(self, rows: Sequence[dict[str, Any]], *, by: str,
                  notes: Sequence[str | None] | None = None) -> None:
        """Insert or replace index rows (the consumer's and the sweep's writes), and
        add a move per row to its ``status``.

        Args:
            rows: Column values (:data:`TX_COLUMNS`); ``status_at`` defaults to now.
            by: Who moved them (``consumer``, ``sweep``, ``operator:<name>``).
            notes: One note per row for its move (None: none).
        """
        if not rows:
            return
        now = _now()
        full = [{**dict.fromkeys(_UPDATABLE), "replays": 0, "routing_key": "",
                 **row, "status_at": row.get("status_at") or now} for row in rows]
        with self._tx_available(), self.engine.begin() as conn:
            for chunk in _chunks(full, 5000):
                conn.execute(self._upsert(), chunk)  # one compiled statement, executemany
            self._add_moves(conn, [(TxKey.of(r), r["status"]) for r in full], by, now,
                            notes or [None] * len(full))

    def tx_move(self, keys: Sequence[TxKey], status: str, *, by: str,
                from_statuses: Iterable[str] | None = None, note: str | None = None,
                changes: dict[str, Any] | None = None,
                letters: Mapping[TxKey, str] | None = None) -> list[TxKey]:
        """Set ``keys`` to ``status`` where their status is one of ``from_statuses``
        (any when None); returns the keys that moved. Each row is checked and moved in
        one statement, so a concurrent writer (a consumer settling the same transaction)
        is never overwritten.

        Args:
            changes: Other columns to set on the moved rows (``replays="+1"`` adds one).
            letters: Move a row only while its letter is still this one (a replay: the
                consumer may have settled the copy, with a new letter, meanwhile).
        """
        if not keys:
            return []
        now = _now()
        values = {"status": status, "status_at": now, **(changes or {})}
        if values.get("replays") == "+1":
            values["replays"] = tx.c.replays + 1
        moved: list[TxKey] = []
        with self._tx_available(), self.engine.begin() as conn:
            for chunk in _chunks(list(keys)):
                if letters is not None:
                    where = sa.tuple_(tx.c.id, tx.c.link, tx.c.direction, tx.c.letter).in_(
                        [(k.id, k.link, k.direction, letters[k]) for k in chunk if letters.get(k)])
                else:
                    where = _key_in(chunk)
                stmt = tx.update().where(where)
                if from_statuses is not None:
                    stmt = stmt.where(tx.c.status.in_(list(from_statuses)))
                done = conn.execute(stmt.values(**values).returning(
                    tx.c.id, tx.c.link, tx.c.direction))
                moved.extend(TxKey(*r) for r in done)
            self._add_moves(conn, [(k, status) for k in moved], by, now, [note] * len(moved))
        return moved

    def tx_processed(self, keys: Sequence[TxKey], *, by: str = "consumer") -> int:
        """Mark transactions that were applied as Processed (only those in the index)."""
        return len(self.tx_move(keys, "processed", by=by,
                                from_statuses=("pending", "error", "archived")))

    def tx_locate(self, located: Sequence[tuple[TxKey, str, int]]) -> None:
        """Record where the letters of transactions lie: (key, letter id, offset)."""
        if not located:
            return
        stmt = (tx.update()
                .where(tx.c.id == sa.bindparam("k_id"), tx.c.link == sa.bindparam("k_link"),
                       tx.c.direction == sa.bindparam("k_dir"),
                       tx.c.letter == sa.bindparam("k_letter"))
                .values(log_offset=sa.bindparam("k_offset")))
        params = [{"k_id": k.id, "k_link": k.link, "k_dir": k.direction, "k_letter": letter,
                   "k_offset": offset} for k, letter, offset in located]
        with self._tx_available(), self.engine.begin() as conn:
            for chunk in _chunks(params):
                conn.execute(stmt, chunk)

    # -- reads -------------------------------------------------------------------------

    def tx_rows(self, query: TxQuery, *, limit: int | None = None, after: str | None = None,
                columns: Sequence[str] | None = None) -> TxPage:
        """A page of rows matching ``query``, the most recent failure first.

        Args:
            limit: Rows per page (None: all).
            after: The cursor of the previous page (:attr:`TxPage.next_cursor`).
            columns: Only these columns (the key and sort columns are always included).
        """
        cols = [tx.c[c] for c in (columns or TX_COLUMNS)]
        for name in ("id", "link", "direction", "status_at", "last_failure"):
            if columns and name not in columns:
                cols.append(tx.c[name])
        stmt = sa.select(*cols).where(*self._conditions(query))
        sort = sa.func.coalesce(tx.c.last_failure, tx.c.status_at)
        if after:
            when, key = _decode_cursor(after)
            stmt = stmt.where(sa.or_(sort < when, sa.and_(
                sort == when, sa.tuple_(tx.c.id, tx.c.link, tx.c.direction) > key)))
        stmt = stmt.order_by(sort.desc(), tx.c.id, tx.c.link, tx.c.direction)
        if limit:
            stmt = stmt.limit(limit + 1)
        with self._tx_available(), self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        page = TxPage(rows[:limit] if limit else rows)
        if limit and len(rows) > limit:
            last = page.rows[-1]
            page.next_cursor = _encode_cursor(last.get("last_failure") or last["status_at"],
                                              TxKey.of(last))
        return page

    def tx_iter(self, query: TxQuery, *, batch: int = 2000) -> Iterator[Mapping[str, Any]]:
        """Every row matching ``query``, the most recent failure first, read ``batch``
        rows at a time (one query; memory stays flat however many match)."""
        sort = sa.func.coalesce(tx.c.last_failure, tx.c.status_at)
        stmt = (sa.select(*(tx.c[c] for c in TX_COLUMNS)).where(*self._conditions(query))
                .order_by(sort.desc(), tx.c.id, tx.c.link, tx.c.direction))
        with self._tx_available(), self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=batch).execute(stmt)
            yield from cast("Iterator[Mapping[str, Any]]", iter(result.mappings()))

    def tx_counts(self, links: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
        """Rows per link and status (``links``: only these and ``"?"``)."""
        stmt = sa.select(tx.c.link, tx.c.status, sa.func.count()).group_by(tx.c.link,
                                                                            tx.c.status)
        if links is not None:
            stmt = stmt.where(tx.c.link.in_([*links, "?"]))
        out: dict[str, dict[str, int]] = {}
        with self._tx_available(), self.engine.connect() as conn:
            for link, status, n in conn.execute(stmt):
                out.setdefault(link, dict.fromkeys(INDEX_STATUSES, 0))[status] = int(n)
        return out

    def tx_count_by_direction(self, status: str = "error") -> dict[tuple[str, str], int]:
        """Rows of ``status`` per (link, direction)."""
        stmt = (sa.select(tx.c.link, tx.c.direction, sa.func.count())
                .where(tx.c.status == status).group_by(tx.c.link, tx.c.direction))
        with self._tx_available(), self.engine.connect() as conn:
            return {(link, d): int(n) for link, d, n in conn.execute(stmt)}

    def tx_moves(self, key: TxKey) -> list[dict[str, Any]]:
        """The status changes of one transaction, oldest first."""
        stmt = (sa.select(moves.c.at, moves.c.status, moves.c.by, moves.c.note)
                .where(moves.c.id == key.id, moves.c.link == key.link,
                       moves.c.direction == key.direction).order_by(moves.c.seq))
        with self._tx_available(), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def tx_letters(self, letters: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Index rows by letter id (which of these letters the index knows)."""
        out: dict[str, dict[str, Any]] = {}
        with self._tx_available(), self.engine.connect() as conn:
            for chunk in _chunks(list(letters)):
                for r in conn.execute(sa.select(tx).where(tx.c.letter.in_(chunk))):
                    out[r.letter] = dict(r._mapping)
        return out

    def tx_get(self, keys: Sequence[TxKey]) -> dict[TxKey, dict[str, Any]]:
        """Index rows by key (missing keys are left out)."""
        out: dict[TxKey, dict[str, Any]] = {}
        with self._tx_available(), self.engine.connect() as conn:
            for chunk in _chunks(list(keys)):
                for r in conn.execute(sa.select(tx).where(_key_in(chunk))):
                    row = dict(r._mapping)
                    out[TxKey.of(row)] = row
        return out

    def tx_unlocated(self, statuses: Sequence[str] = ("error", "archived")) -> list[dict[str, Any]]:
        """Rows whose letter was never found in the log (offset unknown)."""
        stmt = sa.select(tx).where(tx.c.status.in_(statuses), tx.c.log_offset.is_(None))
        with self._tx_available(), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    # -- internals ---------------------------------------------------------------------

    def _tx_available(self) -> Any:
        return self._available()  # type: ignore[attr-defined]

    def _upsert(self) -> Any:
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = insert(tx)
        return stmt.on_conflict_do_update(
            index_elements=list(_KEY), set_={c: stmt.excluded[c] for c in _UPDATABLE})

    def _add_moves(self, conn: Connection, rows: Sequence[tuple[TxKey, str]], by: str,
                   at: datetime, notes: Sequence[str | None]) -> None:
        values = [{"id": k.id, "link": k.link, "direction": k.direction, "at": at,
                   "status": status, "by": by[:200], "note": note}
                  for (k, status), note in zip(rows, notes, strict=True)]
        for chunk in _chunks(values, 2000):
            conn.execute(moves.insert(), chunk)

    def _conditions(self, query: TxQuery) -> Iterator[Any]:
        yield tx.c.status.in_(query.statuses)
        if query.links is not None:
            yield tx.c.link.in_([*query.links, "?"])
        if query.link:
            yield tx.c.link == query.link
        if query.entity:
            yield tx.c.entity == query.entity
        if query.ids:
            yield tx.c.id.in_(sorted(query.ids))
        if query.since:
            yield sa.func.coalesce(tx.c.last_failure, tx.c.status_at) >= query.since
        if query.error_contains:
            needle = query.error_contains.lower()
            yield sa.or_(sa.func.lower(tx.c.error).contains(needle, autoescape=True),
                         sa.func.lower(tx.c.unreadable).contains(needle, autoescape=True),
                         # "unreadable (N bytes): …" is how such a row describes itself
                         sa.and_(tx.c.unreadable.is_not(None),
                                 sa.literal(needle in "unreadable (")))
        if query.key_contains:
            yield tx.c.record_key.contains(query.key_contains, autoescape=True)


def _key_in(keys: Sequence[TxKey]) -> Any:
    return sa.tuple_(tx.c.id, tx.c.link, tx.c.direction).in_(
        [(k.id, k.link, k.direction) for k in keys])


def _chunks(items: list[Any], size: int = _CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _encode_cursor(when: datetime, key: TxKey) -> str:
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    raw = json.dumps([when.isoformat(), key.id, key.link, key.direction])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, tuple[str, str, str]]:
    """The sort position a cursor holds.

    Raises:
        ValueError: the cursor was not made by :meth:`TxIndexMixin.tx_rows`.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, tx_id, link, direction = json.loads(raw)
        return datetime.fromisoformat(when), (str(tx_id), str(link), str(direction))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a page cursor: {cursor[:40]!r}") from exc

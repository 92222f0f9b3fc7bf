"""The offline-transaction log: what has not been delivered, and the tools to act on it.

Statuses (from Resco CRM Sync's Offline Transactions tab):

- **Pending** — waiting in a link's retry queues (including while its target is
  offline), set to Pending by an operator (replayed), or being applied for longer
  than a second (a slow target, a connector inside its own retries).
- **Processed** — applied; kept in the state store's history for its retention.
- **Error** — dead-lettered: its body is in the dead-letter log ``syncbus.dead.log``.
- **Archived** — set aside by an operator; kept, never delivered.

Where things are: the state store's index (:mod:`bus.state.txindex`) holds a row per
transaction and its status; listing, filtering, counting and paging read the index
only. RabbitMQ keeps the bodies in the dead-letter log, a stream read by offset
(:mod:`bus.amqp.deadlog`). Archiving and purging change the index only. A replay
("Set to Pending") reads the bodies at their offsets, publishes the copies to their
work queues with publisher confirms, and only then moves the rows to Pending: a crash
in between leaves a row in Error whose copy was delivered, and the consumer moves it
to Processed when it applies the copy (a replay run again meanwhile is harmless:
consumers skip versions already applied). Every command acts on the links of its
configuration only (and on letters whose link no header names).

Before a replay, and in a running worker, :mod:`bus.amqp.txsweep` brings the index up to
date with the log (letters RabbitMQ dead-lettered itself, a crash between a letter
and its row).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from bus.amqp.headers import LETTER_HEADER, MARKER_HEADER, headers
from bus.amqp.peek import Unreadable, read_body, read_failure
from bus.state.store import StateStore
from bus.state.txindex import TxKey, TxPage, TxQuery
from connectors.base import BusError
from schemas.config import SyncConfig, parse_duration
from schemas.event import canonical_key

if TYPE_CHECKING:  # the broker clients are imported by the commands that need them
    from bus.amqp.deadlog import Letter
    from bus.amqp.integrity import Signer
    from bus.amqp.publisher import OutMessage, Publisher
    from bus.amqp.txsweep import SweepReport

__all__ = [
    "MoveResult",
    "STATUSES",
    "Transaction",
    "TxFilter",
    "TxLog",
    "parse_since",
]

#: Statuses an operator filters by (``all`` lists every one).
STATUSES = ("pending", "processed", "error", "archived")
#: Transactions moved per confirmed publish (then their rows are moved).
MOVE_CHUNK = 2000
#: Headers a replayed copy does not carry over from its dead letter.
_NOT_REPLAYED = (headers.ROUND, headers.RETRY_SINCE, headers.ARCHIVED_AT, LETTER_HEADER,
                 MARKER_HEADER, "x-stream-offset")


@dataclass(slots=True)
class Transaction:
    """One transaction of the log, as an operator sees it.

    Made from its index row; :meth:`TxLog.find` adds the event and headers read from
    the dead-letter log. An unreadable body is described in :attr:`unreadable`.
    """

    id: str
    status: str
    link: str | None
    routing_key: str
    entity: str | None
    op: str | None
    key: str | None
    version: int | str | None = None
    direction: str = "?"
    #: Failed attempts; None when the header is there but not a number.
    attempts: int | None = 0
    replays: int = 0
    first_failure: str | None = None
    last_failure: str | None = None
    error_class: str | None = None
    error: str | None = None
    response: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    #: When it took its current status (applied, for Processed ones).
    at: str | None = None
    #: Deliveries before RabbitMQ's delivery limit dead-lettered it (None: not that case).
    deliveries: int | None = None
    #: Why the body cannot be read (None: it can, or there is none, as for Processed).
    unreadable: Unreadable | None = None
    #: Its status changes, oldest first: [{"at", "status", "by", "note"}].
    moves: list[dict[str, Any]] = field(default_factory=list)
    #: Where its body lies in the dead-letter log (None: not known yet, or none).
    offset: int | None = None
    #: The id of the dead letter holding its body.
    letter: str | None = None
    #: The event as parsed JSON when read from the log, readable and small enough.
    event: dict[str, Any] | None = field(default=None, repr=False)
    size: int = 0
    preview: str = field(default="", repr=False)
    headers: dict[str, Any] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)

    @property
    def key_of(self) -> TxKey:
        return TxKey(self.id, self.link or "?", self.direction)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Transaction:
        """A transaction from its index row."""
        reason = row.get("unreadable")
        return cls(
            id=row["id"], status=row["status"], link=row["link"],
            routing_key=row.get("routing_key") or "", entity=row.get("entity"),
            op=row.get("op"), key=row.get("record_key"), version=_version(row.get("version")),
            direction=row.get("direction") or "?", attempts=row.get("attempts"),
            replays=row.get("replays") or 0, first_failure=_iso(row.get("first_failure")),
            last_failure=_iso(row.get("last_failure")), error_class=row.get("error_class"),
            error=row.get("error"), response=row.get("response"),
            history=json.loads(row["failures"]) if row.get("failures") else [],
            at=_iso(row.get("status_at")), deliveries=row.get("deliveries"),
            unreadable=Unreadable(row.get("size") or 0, row.get("preview") or "", reason)
            if reason else None,
            offset=row.get("log_offset"), letter=row.get("letter"), size=row.get("size") or 0)

    def read_letter(self, letter: Letter) -> None:
        """Add what the dead letter holds: the event (or why it cannot be read), headers."""
        read = read_body(letter.body)
        self.event, self.size, self.preview = read.value, read.size, read.preview
        self.unreadable = read.unreadable
        self.headers = {k: v for k, v in letter.headers.items() if k != "x-stream-offset"}
        self.body = letter.body

    @property
    def problem(self) -> str:
        """The error and, for an unreadable body, why it cannot be read: what
        ``--error-contains`` searches."""
        parts = [self.error or "", self.unreadable.describe() if self.unreadable else ""]
        return "; ".join(p for p in parts if p)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view: the event parsed (when read from the log), or what can be
        said about the body.

        An unreadable body adds ``unreadable: {size, preview, reason}``, a readable one
        too large to show whole (over 64 KiB) adds ``event_preview: {size, preview}``.
        """
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "id", "status", "link", "direction", "routing_key", "entity", "op", "key",
            "version", "attempts", "replays", "first_failure", "last_failure", "error_class",
            "error", "response", "history", "at", "deliveries", "offset")}
        out["moves"] = [{**m, "at": _iso(m.get("at"))} for m in self.moves]
        out["event"] = self.event
        if self.unreadable is not None:
            out["unreadable"] = {"size": self.unreadable.size,
                                 "preview": self.unreadable.preview,
                                 "reason": self.unreadable.reason}
        elif self.event is None and self.size and self.preview:
            out["event_preview"] = {"size": self.size, "preview": self.preview}
        return out


@dataclass(slots=True)
class TxFilter:
    """Which transactions a command acts on; every given criterion must match.

    An unreadable transaction has no entity or key: those criteria never match it;
    ``error_contains`` also searches why its body cannot be read.
    """

    ids: set[str] = field(default_factory=set)
    link: str | None = None
    entity: str | None = None
    key: str | None = None
    since: datetime | None = None
    error_contains: str | None = None

    def match(self, tx: Transaction) -> bool:
        if self.ids and tx.id not in self.ids:
            return False
        if self.link and tx.link != self.link:
            return False
        if self.entity and tx.entity != self.entity:
            return False
        if self.key and not _key_matches(self.key, tx.key):
            return False
        if self.since:
            when = _time_or_none(tx.at)
            if when is None or when < self.since:
                return False
        return not self.error_contains or self.error_contains.lower() in tx.problem.lower()

    @property
    def empty(self) -> bool:
        return not (self.ids or self.link or self.entity or self.key or self.since
                    or self.error_contains)

    def query(self, statuses: tuple[str, ...], links: tuple[str, ...]) -> TxQuery:
        """The index query for this filter (the key is checked exactly afterwards)."""
        return TxQuery(statuses=statuses, links=links, link=self.link, entity=self.entity,
                       ids=frozenset(self.ids), since=self.since,
                       error_contains=self.error_contains, key_contains=_key_needle(self.key))


@dataclass(slots=True)
class MoveResult:
    """What a replay, archive or purge did, per transaction where ids were given."""

    moved: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    #: Per explicitly given id: what happened to it (moved, or why not). A move by
    #: filter or ``--all`` reports counts only (:attr:`moved`, :attr:`skipped`).
    outcomes: dict[str, str] = field(default_factory=dict)
    #: Whether ids were given (then :attr:`outcomes` has one entry per id).
    per_id: bool = False
    #: Explicitly given ids that matched no transaction of this configuration.
    unmatched: list[str] = field(default_factory=list)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


Progress = Callable[[int], None]


class TxLog:
    """Operations on the offline-transaction log of one configuration.

    Args:
        config: The syncbus configuration (broker, state store, links).
        by: Who acts, recorded with every move (default: ``operator:<login name>``).
    """

    def __init__(self, config: SyncConfig, *, by: str | None = None) -> None:
        self.config = config
        self.url = config.broker.url
        self.by = by or f"operator:{_login()}"
        self.links = tuple(config.links)
        self._state: StateStore | None = None
        self._refreshed = False
        #: Things a command should tell its user (e.g. bodies no longer in the log).
        self.warnings: list[str] = []

    @property
    def state(self) -> StateStore:
        if self._state is None:
            self._state = StateStore(self.config.state.url)
        return self._state

    def close(self) -> None:
        if self._state is not None:
            self._state.close()

    # -- reading ----------------------------------------------------------------------

    def refresh(self) -> None:
        """Sweep the dead-letter log when no worker did lately
        (:func:`bus.amqp.txsweep.catch_up_if_stale`), so a listing also shows what RabbitMQ
        dead-lettered itself; a log that cannot be read leaves a warning."""
        from bus.amqp.txsweep import catch_up_if_stale  # noqa: PLC0415 - listings need no broker

        if self._refreshed:
            return
        self._refreshed = True
        warning = catch_up_if_stale(self.state, self.url,
                                    delivery_limit=self.config.broker.delivery_limit)
        if warning:
            self.warnings.append(warning)

    def select(self, status: str = "error", flt: TxFilter | None = None,
               limit: int | None = None) -> list[Transaction]:
        """Transactions of ``status`` (or ``all``) matching ``flt``, the most recent
        failure first (Processed ones: the most recently applied first)."""
        return list(self.iter_select(status, flt, limit))

    def iter_select(self, status: str = "error", flt: TxFilter | None = None,
                    limit: int | None = None) -> Iterator[Transaction]:
        """:meth:`select`, one transaction at a time: memory stays flat however many
        match (what ``tx list --json`` prints)."""
        flt = flt or TxFilter()
        if status == "processed":
            yield from self._processed(flt, limit)
            return
        self.refresh()
        n = 0
        for row in self.state.tx_iter(flt.query(_statuses(status), self.links)):
            tx = Transaction.from_row(row)
            if flt.key and not flt.match(tx):
                continue
            yield tx
            n += 1
            if limit is not None and n >= limit:
                return
        if status == "all":
            yield from self._processed(flt, None if limit is None else limit - n)

    def page(self, status: str = "error", flt: TxFilter | None = None, *, limit: int = 100,
             after: str | None = None) -> tuple[list[Transaction], str | None]:
        """One page of the index (the web console's listing): transactions of
        ``status`` matching ``flt``, the most recent failure first, and the cursor of
        the next page (None: this was the last).

        Raises:
            ValueError: ``after`` is not a cursor this method made.
        """
        flt = flt or TxFilter()
        query = flt.query(_statuses(status, index_only=True), self.links)
        txs: list[Transaction] = []
        cursor = after
        while len(txs) < limit:
            page: TxPage = self.state.tx_rows(query, limit=limit, after=cursor)
            txs += [t for t in map(Transaction.from_row, page.rows) if flt.match(t)]
            cursor = page.next_cursor
            if cursor is None:
                break
        return txs[:limit], cursor if len(txs) >= limit else None

    def find(self, tx_id: str) -> list[Transaction]:
        """Every transaction with id ``tx_id`` (one per link direction), with its moves
        and, when the log still holds it, the event; Processed history included."""
        flt = TxFilter(ids={tx_id})
        self.refresh()
        found = self._indexed(("pending", "processed", "error", "archived", "purged"), flt,
                              None)
        for tx in found:
            tx.moves = self.state.tx_moves(tx.key_of)
        located = {tx.offset: tx for tx in found if tx.offset is not None}
        if located:
            from bus.amqp.deadlog import DeadLog  # noqa: PLC0415
            try:
                with DeadLog(self.url) as log:
                    for letter in log.fetch(located):
                        located[letter.offset].read_letter(letter)
            except BusError as exc:  # the index still says what it knows
                self.warnings.append(f"the event was not read from the dead-letter log "
                                     f"({exc.message})")
        seen = {(t.link, t.status) for t in found}
        found += [t for t in self._processed(flt, None) if (t.link, "processed") not in seen]
        return found

    def stats(self) -> dict[str, dict[str, int]]:
        """Counts per link and status, from the index (Processed: the history)."""
        self.refresh()
        counts = {name: dict.fromkeys(STATUSES, 0) for name in self.links}
        for link, row in self.state.tx_counts(self.links).items():
            target = counts.setdefault(link, dict.fromkeys(STATUSES, 0))
            for status in ("pending", "error", "archived"):
                target[status] += row.get(status, 0)
        for link, n in self.state.processed_counts().items():
            if link in counts:
                counts[link]["processed"] += n
        return counts

    # -- moving -----------------------------------------------------------------------

    def sweep(self, progress: Progress | None = None, *, check: bool = False) -> SweepReport:
        """Bring the index up to date with the dead-letter log (:mod:`bus.amqp.txsweep`)."""
        from bus.amqp.txsweep import catch_up  # noqa: PLC0415

        return catch_up(self.state, self.url, delivery_limit=self.config.broker.delivery_limit,
                        progress=progress, check=check)

    def replay(self, flt: TxFilter, progress: Progress | None = None, *,
               extra_headers: dict[str, Any] | None = None, signer: Signer | None = None,
               status: str = "error") -> MoveResult:
        """Set matching Error (or, with ``status="archived"``, Archived) transactions to
        Pending: their copies go back to their link's work queue.

        Args:
            extra_headers: Set on every replayed copy (e.g. a conflict's chosen winner).
            signer: Signs the copies anew when ``extra_headers`` holds a header the
                signature covers (only copies of events the bus had signed).
            status: Which transactions: ``error`` (the default) or ``archived``.

        Raises:
            NoDeadLog: no worker declared the topology yet.
        """
        from bus.amqp.topology import all_link_queues  # noqa: PLC0415

        self.sweep()
        self._refreshed = True
        result = MoveResult()
        txs = self._candidates(flt, status, result)
        work: dict[tuple[str | None, str], str] = {
            (n, lq.direction): lq.work for n, lk in self.config.links.items() if lk.enabled
                for lq in all_link_queues(n, lk)}
        wanted: dict[int, Transaction] = {}
        for tx in txs:
            if (tx.link, tx.direction) not in work:
                self._refuse(result, tx, f"unknown or disabled link {tx.link!r} "
                                         f"({tx.direction}) in this config")
            elif tx.offset is None:
                self._refuse(result, tx, "its body is not in the dead-letter log "
                                         "(see syncbus tx reconcile)")
            else:
                wanted[tx.offset] = tx
        now = datetime.now(UTC).isoformat()
        from bus.amqp.publisher import OutMessage  # noqa: PLC0415

        def copy(tx: Transaction, letter: Letter) -> OutMessage:
            hdrs = {k: v for k, v in letter.headers.items()
                    if k not in _NOT_REPLAYED and not k.startswith(("x-death", "x-first-death",
                                                                      "x-last-death"))}
            hdrs[headers.REPLAYS] = tx.replays + 1
            hdrs[headers.HISTORY] = json.dumps(
                [*read_failure(letter.headers).history,
                 {"at": now, "class": "Replayed", "error": ""}][-20:], separators=(",", ":"))
            hdrs[headers.ROUTING_KEY] = tx.routing_key
            hdrs[headers.LINK] = tx.link
            hdrs[headers.QUEUE] = work[(tx.link, tx.direction)]
            if extra_headers:
                hdrs.update(extra_headers)
                if signer is not None:
                    hdrs = signer.rebind(letter.body, letter.headers, hdrs)
            return OutMessage("", work[(tx.link, tx.direction)], letter.body, hdrs,
                              tx.id or None, mandatory=True,
                              content_type=letter.props.content_type
                              or "application/cloudevents+json")

        self._replay(wanted, copy, status, result, progress)
        return result

    def archive(self, flt: TxFilter, progress: Progress | None = None) -> MoveResult:
        """Set matching Error transactions to Archived (kept, never delivered)."""
        result = MoveResult()
        txs = self._candidates(flt, "error", result)
        self._move_rows(txs, "archived", ("error",), result, progress)
        return result

    def purge_archived(self, older_than: float, progress: Progress | None = None,
                       flt: TxFilter | None = None) -> MoveResult:
        """Delete Archived transactions archived more than ``older_than`` seconds ago:
        they leave every listing and count (the index keeps a row with status
        ``purged``, so that a sweep never brings one back; the body stays in the log,
        see docs/operations.md)."""
        result = MoveResult()
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        txs = [t for t in self._candidates(flt or TxFilter(), "archived", result)
               if (_time_or_none(t.at) or cutoff) < cutoff]
        self._move_rows(txs, "purged", ("archived",), result, progress)
        return result

    def purge_processed(self, older_than: float) -> int:
        """Delete Processed history older than ``older_than`` seconds."""
        return self.state.purge_processed(older_than)

    # -- internals ----------------------------------------------------------------------

    def _indexed(self, statuses: tuple[str, ...], flt: TxFilter,
                 limit: int | None) -> list[Transaction]:
        query = flt.query(statuses, self.links)
        if not flt.key:
            if limit:
                return [Transaction.from_row(r) for r in self.state.tx_rows(query,
                                                                           limit=limit).rows]
            return [Transaction.from_row(r) for r in self.state.tx_iter(query)]
        found = [t for t in map(Transaction.from_row, self.state.tx_iter(query))
                 if flt.match(t)]
        return found[:limit] if limit else found

    def _candidates(self, flt: TxFilter, status: str, result: MoveResult) -> list[Transaction]:
        """The transactions of ``status`` a move acts on; explicit ids that are not there
        (or have another status) are reported in ``result``."""
        self.refresh()
        txs = self._indexed((status,), flt, None)
        result.per_id = bool(flt.ids)
        if flt.ids:
            found = {t.id for t in txs}
            for tx_id in sorted(flt.ids - found):
                elsewhere = self._indexed(STATUSES, TxFilter(ids={tx_id}), None)
                if not elsewhere:
                    result.unmatched.append(tx_id)
                    result.outcomes[tx_id] = "no such transaction in this config"
                    continue
                now = ", ".join(sorted({t.status for t in elsewhere}))
                hint = " (replay it with --status archived)" if now == "archived" else ""
                result.outcomes[tx_id] = f"not {status} but {now}{hint}"
                result.skip(f"not {status}")
        return txs

    def _refuse(self, result: MoveResult, tx: Transaction, reason: str) -> None:
        result.skip(reason)
        if result.per_id:
            result.outcomes.setdefault(tx.id, reason)

    def _replay(self, wanted: dict[int, Transaction],
                copy: Callable[[Transaction, Letter], OutMessage], status: str,
                result: MoveResult, progress: Progress | None) -> None:
        if not wanted:
            return
        from bus.amqp.deadlog import DeadLog  # noqa: PLC0415
        from bus.amqp.publisher import Publisher  # noqa: PLC0415

        publisher = Publisher(self.url, name="syncbus-tx")
        chunk: list[tuple[Transaction, OutMessage]] = []
        seen: set[int] = set()
        try:
            with DeadLog(self.url) as log:
                for letter in log.fetch(wanted):
                    seen.add(letter.offset)
                    tx = wanted[letter.offset]
                    chunk.append((tx, copy(tx, letter)))
                    if len(chunk) >= MOVE_CHUNK:
                        self._publish_moved(publisher, chunk, status, result, progress)
                        chunk = []
            self._publish_moved(publisher, chunk, status, result, progress)
        except KeyboardInterrupt:
            result.interrupted = True  # what was confirmed and moved stays moved
        finally:
            publisher.close()
        for offset in wanted.keys() - seen:
            self._refuse(result, wanted[offset], "its body is no longer in the dead-letter log")

    def _publish_moved(self, publisher: Publisher, chunk: list[tuple[Transaction, OutMessage]],
                       status: str, result: MoveResult, progress: Progress | None) -> None:
        """Publish a chunk of copies (confirmed), then move their rows to Pending."""
        if not chunk:
            return
        publisher.publish_batch([m for _, m in chunk])
        self._move_rows([t for t, _ in chunk], "pending", (status,), result, progress,
                        changes={"replays": "+1"},
                        letters={t.key_of: t.letter for t, _ in chunk if t.letter})

    def _move_rows(self, txs: list[Transaction], to: str, from_statuses: tuple[str, ...],
                   result: MoveResult, progress: Progress | None,
                   changes: dict[str, Any] | None = None,
                   letters: dict[TxKey, str] | None = None) -> None:
        for start in range(0, len(txs), MOVE_CHUNK):
            part = txs[start:start + MOVE_CHUNK]
            moved = set(self.state.tx_move([t.key_of for t in part], to, by=self.by,
                                           from_statuses=from_statuses, changes=changes,
                                           letters=letters))
            for tx in part:
                if tx.key_of in moved:
                    result.moved += 1
                    if result.per_id:
                        result.outcomes.setdefault(tx.id, f"set to {to}")
                else:
                    self._refuse(result, tx, "changed meanwhile (a consumer settled it, or another command moved it)")
            if progress:
                progress(result.moved)

    def _processed(self, flt: TxFilter, limit: int | None) -> list[Transaction]:
        rows = self.state.processed_events(
            link=flt.link, entity=flt.entity, since=flt.since, limit=None if flt.key else limit,
            event_id=next(iter(flt.ids)) if len(flt.ids) == 1 else None)
        out = []
        for row in rows:
            if row["link"] not in self.links:
                continue
            tx = Transaction(id=row["event_id"], status="processed", link=row["link"],
                             routing_key="", entity=row["entity"], op=row["op"],
                             key=row["record_key"], version=row["version"],
                             at=_iso(row["applied_at"]))
            if flt.match(tx):
                out.append(tx)
        return out[:limit] if limit else out


def _statuses(status: str, *, index_only: bool = False) -> tuple[str, ...]:
    """The index statuses a listing of ``status`` reads.

    Raises:
        ValueError: not a status.
    """
    if status == "all":
        return ("pending", "error", "archived") + (("processed",) if index_only else ())
    if status in STATUSES:
        return (status,)
    raise ValueError(f"unknown status {status!r} (one of {', '.join(STATUSES)} or all)")


def _key_needle(wanted: str | None) -> str | None:
    """Text every matching key contains (to narrow the query; the match is exact)."""
    if not wanted:
        return None
    if wanted.startswith("{"):
        try:
            return canonical_key(json.loads(wanted))
        except (ValueError, AttributeError, TypeError, RecursionError):
            return wanted
    return wanted


def _version(value: str | None) -> int | str | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def parse_since(value: str) -> datetime:
    """``2h`` / ``30m`` / ``7d`` ago, or an ISO 8601 time (UTC when no zone is given)."""
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = None
    if isinstance(seconds, float):
        return datetime.now(UTC) - timedelta(seconds=seconds)
    return _parse_time(value)


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _time_or_none(value: str | None) -> datetime | None:
    """An ISO time from a header, or None when there is none or it is not one."""
    try:
        return _parse_time(value) if value else None
    except ValueError:
        return None


def _text_or_none(value: object) -> str | None:
    """A message property as text (pika hands over bytes when it is not UTF-8)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return None if value is None else str(value)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        text = value.isoformat()
        return text if value.tzinfo else text + "+00:00"  # the store keeps UTC
    return str(value)


def _key_matches(wanted: str, key: str | None) -> bool:
    """``{"id":17}`` matches exactly; a bare value matches any key field equal to it."""
    if key is None:
        return False
    if wanted.startswith("{"):
        try:
            return canonical_key(json.loads(wanted)) == key
        except (ValueError, AttributeError, TypeError, RecursionError):
            return False
    try:
        return any(str(v) == wanted for v in json.loads(key).values())
    except (ValueError, AttributeError, TypeError, RecursionError):
        return False



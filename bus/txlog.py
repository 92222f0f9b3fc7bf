"""The offline-transaction log: what has not been delivered, and the tools to act on it.

Statuses (from Resco CRM Sync's Offline Transactions tab):

- **Pending** — waiting in a link's retry queues (including while its target is
  offline); ready messages in the work queues are counted, not listed.
- **Processed** — applied; kept in the state store's history for its retention.
- **Error** — in the dead-letter queue ``syncbus.dead``.
- **Archived** — set aside by an operator in ``syncbus.archive``; never delivered.

Moving a transaction (replay = "Set to Pending", archive = "Set to Archived") publishes
its copy with a publisher confirm and only then removes the original, so a crash or
Ctrl-C in the middle duplicates a transaction at worst and never loses one; duplicates
are harmless because consumers skip versions already applied.

Browsing a queue consumes its messages without acknowledging them; they return to the
queue, in order, when the browsing channel closes. Messages are read with
:mod:`bus.peek`: one that cannot be read is listed as unreadable (size, first bytes,
why), never skipped and never a crash; it can be archived or replayed like any other.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions

from bus.browse import BROWSE_IDLE, Handle, NoSuchQueue, QueueBrowser
from bus.consumer import headers
from bus.integrity import Signer
from bus.peek import Unreadable, body_bytes, cap_headers, read_body, read_failure
from bus.publisher import OutMessage, Publisher
from bus.topology import ARCHIVE_QUEUE, DEAD_QUEUE, all_link_queues
from producers.state import StateStore
from schemas.config import SyncConfig, parse_duration
from schemas.event import canonical_key

__all__ = [
    "MoveResult",
    "NoSuchQueue",
    "QueueBrowser",
    "STATUSES",
    "Transaction",
    "TxFilter",
    "TxLog",
    "parse_since",
]

#: Statuses an operator filters by.
STATUSES = ("pending", "processed", "error", "archived")
#: Seconds to wait for the confirms of one chunk of copies.
CONFIRM_WAIT = 120.0
#: Transactions moved per confirmed publish (then their originals are acked).
MOVE_CHUNK = 2000


@dataclass(slots=True)
class Transaction:
    """One transaction of the log, as an operator sees it.

    Read with :mod:`bus.peek`, so any message gives one: an unreadable body is kept
    as :attr:`unreadable` (size, first bytes, why) and its event fields stay None.
    """

    id: str
    status: str
    link: str | None
    routing_key: str
    entity: str | None
    op: str | None
    key: str | None
    version: int | str | None = None
    #: Failed attempts; None when the header is there but not a number.
    attempts: int | None = 0
    replays: int = 0
    first_failure: str | None = None
    last_failure: str | None = None
    error_class: str | None = None
    error: str | None = None
    response: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    at: str | None = None
    #: Deliveries before RabbitMQ's delivery limit dead-lettered it (None: not that case).
    deliveries: int | None = None
    #: Why the body cannot be read (None: it can, or there is none, as for Processed).
    unreadable: Unreadable | None = None
    #: The event as parsed JSON when readable and small enough to show whole.
    event: dict[str, Any] | None = field(default=None, repr=False)
    size: int = 0
    preview: str = field(default="", repr=False)
    headers: dict[str, Any] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)

    @classmethod
    def from_message(cls, status: str, props: pika.BasicProperties, body: bytes, *,
                     delivery_limit: int | None = None) -> Transaction:
        """Read a dead-lettered, archived or retried message; never raises.

        Args:
            delivery_limit: The link queues' ``x-delivery-limit``, to tell how often a
                message RabbitMQ dead-lettered itself was delivered.
        """
        hdrs = cap_headers(props.headers)
        failure = read_failure(hdrs, delivery_limit)
        read = read_body(body)
        fields = read.fields
        entity, op = None, None
        parts = failure.routing_key.split(".")
        if len(parts) == 3 and read.unreadable is None:
            entity, op = parts[1], parts[2]
        return cls(
            id=_text_or_none(props.message_id) or fields.id or "", status=status,
            link=failure.link, routing_key=failure.routing_key,
            entity=fields.entity or entity, op=fields.op or op, key=fields.key,
            version=fields.version, attempts=failure.attempts, replays=failure.replays,
            first_failure=failure.first_failure, last_failure=failure.last_failure,
            error_class=failure.error_class, error=failure.error, response=failure.response,
            history=failure.history, deliveries=failure.deliveries,
            at=failure.archived_at if status == "archived" else failure.last_failure,
            unreadable=read.unreadable, event=read.value, size=read.size, preview=read.preview,
            headers=hdrs, body=body if isinstance(body, bytes) else body_bytes(body) or b"",
        )

    @property
    def problem(self) -> str:
        """The error and, for an unreadable body, why it cannot be read: what
        ``--error-contains`` searches."""
        parts = [self.error or "", self.unreadable.describe() if self.unreadable else ""]
        return "; ".join(p for p in parts if p)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view: the event parsed, or what can be said about the body.

        ``event`` is the parsed event (None for Processed ones and unreadable bodies);
        an unreadable body adds ``unreadable: {size, preview, reason}``, a readable one
        too large to show whole (over 64 KiB) adds ``event_preview: {size, preview}``.
        """
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "id", "status", "link", "routing_key", "entity", "op", "key", "version", "attempts",
            "replays", "first_failure", "last_failure", "error_class", "error", "response",
            "history", "at", "deliveries")}
        out["event"] = self.event
        if self.unreadable is not None:
            out["unreadable"] = {"size": self.unreadable.size,
                                 "preview": self.unreadable.preview,
                                 "reason": self.unreadable.reason}
        elif self.event is None and self.size:
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


@dataclass(slots=True)
class MoveResult:
    """What a replay, archive or purge did."""

    moved: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False


Progress = Callable[[int], None]


class TxLog:
    """Operations on the offline-transaction log of one configuration.

    Args:
        config: The syncbus configuration (broker, state store, links).
    """

    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self.url = config.broker.url
        self._state: StateStore | None = None
        #: Per queue: messages a read missed (see :attr:`QueueBrowser.missed`).
        self._missed: dict[str, int] = {}

    @property
    def state(self) -> StateStore:
        if self._state is None:
            self._state = StateStore(self.config.state.url)
        return self._state

    def close(self) -> None:
        if self._state is not None:
            self._state.close()

    # -- reading ----------------------------------------------------------------------

    def select(self, status: str = "error", flt: TxFilter | None = None,
             limit: int | None = None) -> list[Transaction]:
        """Transactions of ``status`` matching ``flt`` (oldest first; Processed newest first)."""
        flt = flt or TxFilter()
        if status == "processed":
            return self._processed(flt, limit)
        found = []
        for queue in self._queues(status):
            with self._browser() as browser, contextlib.suppress(NoSuchQueue):
                for _tag, props, body in browser.browse(queue):  # none before it is declared
                    tx = self._read(status, props, body)
                    if flt.match(tx):
                        found.append(tx)
                        if limit and len(found) >= limit:
                            return found
        return found

    def find(self, tx_id: str) -> list[Transaction]:
        """Every copy of transaction ``tx_id`` in any status."""
        flt = TxFilter(ids={tx_id})
        return [tx for status in ("error", "archived", "pending", "processed")
                for tx in self.select(status, flt)]

    def stats(self) -> dict[str, dict[str, int]]:
        """Counts per link and status (Pending includes ready messages of work queues)."""
        counts: dict[str, dict[str, int]] = {}

        def add(link: str | None, status: str, n: int = 1) -> None:
            row = counts.setdefault(link or "?", dict.fromkeys(STATUSES, 0))
            row[status] += n

        with self._browser() as browser:
            for status, queue in (("error", DEAD_QUEUE), ("archived", ARCHIVE_QUEUE)):
                for link_name, n in count_by_link(browser, queue).items():
                    add(link_name, status, n)
            for name, link in self.config.links.items():
                for lq in all_link_queues(name, link):
                    add(name, "pending", sum(_ready(browser, q) for q in
                                             (lq.work, *(r for _, r in lq.retries))))
        for link_name, n in self.state.processed_counts().items():
            add(link_name, "processed", n)
        return counts

    # -- moving -----------------------------------------------------------------------

    def replay(self, flt: TxFilter, progress: Progress | None = None, *,
               extra_headers: dict[str, Any] | None = None,
               signer: Signer | None = None) -> MoveResult:
        """Set matching Error transactions to Pending: back to their link's work queue.

        Args:
            extra_headers: Set on every replayed copy (e.g. a conflict's chosen winner).
            signer: Signs the copies anew when ``extra_headers`` holds a header the
                signature covers (only copies of events the bus had signed).
        """
        now = datetime.now(UTC).isoformat()
        known = {lq.work: n for n, lk in self.config.links.items() if lk.enabled
                 for lq in all_link_queues(n, lk)}

        def copy(tx: Transaction) -> OutMessage | str:
            queue = read_failure(tx.headers).queue or _work_queue(tx.link) or ""
            if queue not in known:
                return f"unknown link {tx.link!r} (not in this config)"
            hdrs = {k: v for k, v in tx.headers.items()
                    if k not in (headers.ROUND, headers.RETRY_SINCE) and not k.startswith("x-death")
                    and not k.startswith("x-first-death") and not k.startswith("x-last-death")}
            hdrs[headers.REPLAYS] = tx.replays + 1
            hdrs[headers.HISTORY] = [*tx.history, {"at": now, "class": "Replayed", "error": ""}][
                -20:]
            hdrs[headers.ROUTING_KEY] = tx.routing_key
            hdrs[headers.LINK] = tx.link
            if extra_headers:
                hdrs.update(extra_headers)
                if signer is not None:
                    hdrs = signer.rebind(tx.body, tx.headers, hdrs)
            return OutMessage("", queue, tx.body, hdrs, tx.id or None, mandatory=True)

        return self._move(DEAD_QUEUE, "error", flt, copy, progress)

    def archive(self, flt: TxFilter, progress: Progress | None = None) -> MoveResult:
        """Set matching Error transactions to Archived (kept, never delivered)."""
        now = datetime.now(UTC).isoformat()

        def copy(tx: Transaction) -> OutMessage:
            hdrs = {**tx.headers, headers.ARCHIVED_AT: now, headers.LINK: tx.link,
                    headers.ROUTING_KEY: tx.routing_key, headers.ERROR: tx.error or "",
                    headers.ERROR_CLASS: tx.error_class or ""}
            return OutMessage("", ARCHIVE_QUEUE, tx.body, hdrs, tx.id or None, mandatory=True)

        return self._move(DEAD_QUEUE, "error", flt, copy, progress)

    def purge_archived(self, older_than: float, progress: Progress | None = None) -> MoveResult:
        """Delete Archived transactions archived more than ``older_than`` seconds ago."""
        flt = TxFilter()
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)

        def drop(tx: Transaction) -> None | str:
            when = _time_or_none(tx.at)
            if when is None:
                return "no readable archive time"
            return "younger than the cut-off" if when >= cutoff else None

        return self._move(ARCHIVE_QUEUE, "archived", flt, drop, progress)

    def purge_processed(self, older_than: float) -> int:
        """Delete Processed history older than ``older_than`` seconds."""
        return self.state.purge_processed(older_than)

    # -- internals ----------------------------------------------------------------------

    def _move(self, queue: str, status: str, flt: TxFilter,
              copy: Callable[[Transaction], OutMessage | str | None],
              progress: Progress | None) -> MoveResult:
        """Copy (or drop, when ``copy`` returns None) matching messages, then ack them."""
        result = MoveResult()
        publisher = Publisher(self.url, name="syncbus-tx")
        in_flight: _InFlight | None = None
        try:
            with self._browser() as browser:
                chunk: list[tuple[Handle, OutMessage | None]] = []
                try:
                    for tag, props, body in browser.browse(queue):
                        tx = self._read(status, props, body)
                        if not flt.match(tx):
                            continue
                        out = copy(tx)
                        if isinstance(out, str):
                            result.skipped[out] = result.skipped.get(out, 0) + 1
                            continue
                        chunk.append((tag, out))
                        if len(chunk) >= MOVE_CHUNK:
                            # Confirm and remove the previous chunk while this one is sent.
                            result.moved += _finish(browser, in_flight)
                            in_flight = _InFlight(chunk, publisher)
                            chunk = []
                            if progress:
                                progress(result.moved)
                    result.moved += _finish(browser, in_flight)
                    in_flight = None
                    result.moved += _finish(browser, _InFlight(chunk, publisher))
                except KeyboardInterrupt:
                    result.interrupted = True  # unacked originals return to the queue
        finally:
            publisher.close()
        if progress:
            progress(result.moved)
        return result

    def _processed(self, flt: TxFilter, limit: int | None) -> list[Transaction]:
        rows = self.state.processed_events(
            link=flt.link, entity=flt.entity, since=flt.since, limit=None if flt.key else limit,
            event_id=next(iter(flt.ids)) if len(flt.ids) == 1 else None)
        out = []
        for row in rows:
            tx = Transaction(id=row["event_id"], status="processed", link=row["link"],
                             routing_key="", entity=row["entity"], op=row["op"],
                             key=row["record_key"], version=row["version"],
                             at=_iso(row["applied_at"]))
            if flt.match(tx):
                out.append(tx)
        return out[:limit] if limit else out

    def _queues(self, status: str) -> list[str]:
        if status == "error":
            return [DEAD_QUEUE]
        if status == "archived":
            return [ARCHIVE_QUEUE]
        if status == "pending":
            return [r for n, lk in self.config.links.items() for lq in all_link_queues(n, lk)
                    for _, r in lq.retries]
        raise ValueError(f"unknown status {status!r} (one of {', '.join(STATUSES)})")

    @contextlib.contextmanager
    def _browser(self) -> Iterator[QueueBrowser]:
        with QueueBrowser(self.url) as browser:
            try:
                yield browser
            finally:
                for queue, n in browser.missed.items():
                    self._missed[queue] = self._missed.get(queue, 0) + n

    @property
    def warnings(self) -> list[str]:
        """Reads so far that may be incomplete (see :attr:`QueueBrowser.missed`)."""
        return [f"{n} message(s) counted in {queue} were not delivered within "
                f"{BROWSE_IDLE:g}s (taken by a consumer meanwhile, or slow to deliver): the "
                "result may be incomplete; run the command again"
                for queue, n in self._missed.items()]

    def _read(self, status: str, props: pika.BasicProperties, body: bytes) -> Transaction:
        return Transaction.from_message(status, props, body,
                                        delivery_limit=self.config.broker.delivery_limit)


def count_by_link(browser: QueueBrowser, queue: str) -> dict[str, int]:
    """Messages of ``queue`` per link ("?" when unknown), from their headers only.

    Raises:
        BrokerConnectionError: the connection broke while browsing.
    """
    counts: dict[str, int] = {}
    try:
        for _handle, props, _body in browser.browse(queue):
            link = read_failure(props.headers).link or "?"
            counts[link] = counts.get(link, 0) + 1
    except NoSuchQueue:
        pass  # no worker declared the topology yet: nothing in it
    return counts


class _InFlight:
    """A chunk whose copies are being confirmed; its originals are acked once they are."""

    def __init__(self, chunk: list[tuple[Handle, OutMessage | None]],
                 publisher: Publisher) -> None:
        self.handles = [handle for handle, _ in chunk]
        self.wait = publisher.publish_async([m for _, m in chunk if m is not None])


def _finish(browser: QueueBrowser, in_flight: _InFlight | None) -> int:
    """Wait for the chunk's confirms, then remove its originals (the apply rule)."""
    if in_flight is None or not in_flight.handles:
        return 0
    in_flight.wait(CONFIRM_WAIT)
    browser.ack_all(in_flight.handles)
    return len(in_flight.handles)


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


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
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


def _ready(browser: QueueBrowser, queue: str) -> int:
    try:
        return browser.count(queue)
    except NoSuchQueue:
        return 0  # not declared yet: nothing waits in it


def _work_queue(link: str | None) -> str | None:
    return f"syncbus.link.{link}.a2b" if link else None

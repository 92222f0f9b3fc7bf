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
queue, in order, when the browsing channel closes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions

from bus.browse import Handle, QueueBrowser
from bus.consumer import headers
from bus.integrity import Signer
from bus.publisher import OutMessage, Publisher
from bus.topology import ARCHIVE_QUEUE, DEAD_QUEUE, all_link_queues
from producers.state import StateStore
from schemas.config import SyncConfig, parse_duration
from schemas.event import canonical_key

__all__ = [
    "MoveResult",
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
    """One transaction of the log, as an operator sees it."""

    id: str
    status: str
    link: str | None
    routing_key: str
    entity: str | None
    op: str | None
    key: str | None
    version: Any = None
    attempts: int = 0
    replays: int = 0
    first_failure: str | None = None
    last_failure: str | None = None
    error_class: str | None = None
    error: str | None = None
    response: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    at: str | None = None
    headers: dict[str, Any] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)

    @classmethod
    def from_message(cls, status: str, props: pika.BasicProperties, body: bytes) -> Transaction:
        """Read a dead-lettered, archived or retried message."""
        hdrs = dict(props.headers or {})
        routing_key = str(hdrs.get(headers.ROUTING_KEY) or "")
        link = hdrs.get(headers.LINK)
        error, error_class = hdrs.get(headers.ERROR), hdrs.get(headers.ERROR_CLASS)
        death = _death(hdrs)
        if death and not error:  # dead-lettered by RabbitMQ itself
            reason, count = death.get("reason", "?"), death.get("count", 1)
            error_class = f"Broker.{reason}"
            error = (f"dead-lettered by RabbitMQ: {reason} after {count} deliveries "
                     "(the message kept crashing or stalling the consumer)")
            queue = str(hdrs.get("x-first-death-queue") or death.get("queue") or "")
            link = link or _link_of_queue(queue)
            routing_key = routing_key or _first(death.get("routing-keys"))
        tx = cls(
            id=str(props.message_id or ""), status=status, link=link, routing_key=routing_key,
            entity=None, op=None, key=None, attempts=int(hdrs.get(headers.ATTEMPTS, 0) or 0),
            replays=int(hdrs.get(headers.REPLAYS, 0) or 0),
            first_failure=hdrs.get(headers.FIRST_FAILURE),
            last_failure=hdrs.get(headers.LAST_FAILURE) or (death or {}).get("time-iso"),
            error_class=error_class, error=error, response=hdrs.get(headers.RESPONSE),
            history=list(hdrs.get(headers.HISTORY) or []),
            at=hdrs.get(headers.ARCHIVED_AT) if status == "archived" else hdrs.get(
                headers.LAST_FAILURE),
            headers=hdrs, body=body,
        )
        tx._read_event()
        return tx

    def _read_event(self) -> None:
        parts = self.routing_key.split(".")
        if len(parts) == 3:
            self.entity, self.op = parts[1], parts[2]
        try:
            data = json.loads(self.body)["data"]
            self.key = canonical_key(data["key"])
            self.version = data.get("version")
            self.entity = data.get("entity") or self.entity
            self.op = data.get("op") or self.op
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # not a valid event: shown as is, its error says why

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (the event parsed when it is JSON, else its text)."""
        out = {k: getattr(self, k) for k in (
            "id", "status", "link", "routing_key", "entity", "op", "key", "version", "attempts",
            "replays", "first_failure", "last_failure", "error_class", "error", "response",
            "history", "at")}
        try:
            out["event"] = json.loads(self.body)
        except ValueError:
            out["event"] = self.body.decode("utf-8", "replace")
        return out


@dataclass(slots=True)
class TxFilter:
    """Which transactions a command acts on; every given criterion must match."""

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
        if self.since and (tx.at is None or _parse_time(tx.at) < self.since):
            return False
        return not self.error_contains or self.error_contains.lower() in (tx.error or "").lower()

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
            with self._browser() as browser:
                for _tag, props, body in browser.browse(queue):
                    tx = Transaction.from_message(status, props, body)
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

        for status in ("error", "archived"):
            for tx in self.select(status):
                add(tx.link, status)
        with self._browser() as browser:
            for name, link in self.config.links.items():
                for lq in all_link_queues(name, link):
                    add(name, "pending", sum(browser.count(q) for q in
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
            queue = str(tx.headers.get(headers.QUEUE) or _work_queue(tx.link) or "")
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
            if tx.at is None or _parse_time(tx.at) >= cutoff:
                return "younger than the cut-off"
            return None

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
                        tx = Transaction.from_message(status, props, body)
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

    def _browser(self) -> QueueBrowser:
        return QueueBrowser(self.url)


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
        except ValueError:
            return False
    try:
        return any(str(v) == wanted for v in json.loads(key).values())
    except (ValueError, AttributeError):
        return False


def _death(hdrs: dict[str, Any]) -> dict[str, Any] | None:
    deaths = hdrs.get("x-death")
    if not isinstance(deaths, list) or not deaths:
        return None
    death = dict(deaths[0])  # most recent first
    stamp = death.get("time")
    if isinstance(stamp, datetime):
        death["time-iso"] = _iso(stamp)
    return death


def _first(values: Any) -> str:
    return str(values[0]) if isinstance(values, list) and values else ""


def _link_of_queue(queue: str) -> str | None:
    parts = queue.split(".")
    return parts[2] if len(parts) == 4 and parts[:2] == ["syncbus", "link"] else None


def _work_queue(link: str | None) -> str | None:
    return f"syncbus.link.{link}.a2b" if link else None

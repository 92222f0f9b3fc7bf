"""Reconciliation of the offline-transaction index with the dead-letter log.

The consumer writes an index row after the broker confirmed a dead letter and before
it acks the original, so a crash in between leaves a letter in the log without its
row; RabbitMQ's own dead-lettering (a message past the delivery limit) writes letters
no consumer saw. The sweep is the one place that reads the log from end to end: it
reads every letter after the last one it swept, up to a marker it appended itself (so
it knows it saw the whole log, never guesses), and

- gives a row to each letter the index does not know (status Error; Archived for a
  letter a pre-index syncbus archived),
- records the offset of letters the index knew only by id (the consumer's rows),
- leaves out letters older than their transaction's last move (a transaction that
  failed, was replayed and moved on),
- moves what the quorum queues of syncbus before the index still hold
  (``syncbus.dead``, ``syncbus.archive``) into the log, once.

It runs when a worker starts, every :data:`SWEEP_INTERVAL` seconds in a worker, before
every replay, and as ``syncbus tx reconcile``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions

from bus.amqp.deadlog import DEAD_LOG, DeadLog, Letter, NoDeadLog
from bus.amqp.headers import headers
from bus.amqp.peek import cap_headers
from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import DEAD_EXCHANGE, LEGACY_ARCHIVE_QUEUE, LEGACY_DEAD_QUEUE
from bus.amqp.txrecord import index_row
from bus.state.rows import aware
from bus.state.store import StateStore
from bus.state.txindex import TxKey
from connectors.base import BusError

__all__ = ["FRESH_FOR", "SWEEP_CURSOR", "SWEEP_INTERVAL", "SweepReport", "catch_up",
           "catch_up_if_stale", "migrate_legacy"]

#: The state store cursor (checkpoint) holding the last swept offset of the log.
SWEEP_CURSOR = "txlog:syncbus.dead.log"
#: Seconds between two sweeps in a running worker.
SWEEP_INTERVAL = 30.0
#: Seconds a sweep keeps the index fresh for readers (listings, ``status``).
FRESH_FOR = 60.0
#: Letters indexed per state-store transaction (the cursor moves with each).
SWEEP_CHUNK = 2000
#: Messages of a legacy queue moved per confirmed publish.
MIGRATE_CHUNK = 1000


@dataclass(slots=True)
class SweepReport:
    """What one sweep did."""

    read: int = 0
    indexed: int = 0
    located: int = 0
    stale: int = 0
    migrated: dict[str, int] = field(default_factory=dict)
    #: Rows (Error or Archived) whose letter is not in the log after a complete read.
    unlocated: list[dict[str, Any]] = field(default_factory=list)
    end_offset: int | None = None


Progress = Callable[[int], None]


def catch_up(state: StateStore, url: str, *, delivery_limit: int | None = None,
             progress: Progress | None = None, check: bool = False) -> SweepReport:
    """Index every letter the log gained since the last sweep (see module docstring).

    Args:
        check: Also list rows whose letter the log does not hold
            (:attr:`SweepReport.unlocated`).

    Raises:
        NoDeadLog: no worker declared the topology yet.
        BrokerConnectionError: RabbitMQ cannot be reached or stopped delivering.
        ConnectorUnavailable: the state store cannot be reached.
    """
    report = SweepReport()
    saved = state.load_cursor(SWEEP_CURSOR)
    start = int(saved) + 1 if saved else None
    with DeadLog(url) as log:
        chunk: list[Letter] = []
        for letter in log.read_to_end(start):
            chunk.append(letter)
            if len(chunk) >= SWEEP_CHUNK:
                _index(state, chunk, report, delivery_limit)
                chunk = []
                if progress:
                    progress(report.read)
        _index(state, chunk, report, delivery_limit)
        report.end_offset = log.end_offset
    if report.end_offset is not None:
        state.save_cursor(SWEEP_CURSOR, str(report.end_offset))
    if check:
        report.unlocated = state.tx_unlocated()
    return report


def catch_up_if_stale(state: StateStore, url: str, *,
                      delivery_limit: int | None = None) -> str | None:
    """Sweep unless one ran in the last :data:`FRESH_FOR` seconds (a running worker
    sweeps every :data:`SWEEP_INTERVAL`), so a reader also sees what RabbitMQ
    dead-lettered itself.

    Returns:
        None, or a warning for the reader when the log could not be read (the index
        is shown as it is).

    Raises:
        ConnectorUnavailable: the state store cannot be reached.
    """
    row = state.checkpoint_rows().get(SWEEP_CURSOR)
    swept = aware(row["updated_at"]) if row else None
    if swept is not None and datetime.now(UTC) - swept < timedelta(seconds=FRESH_FOR):
        return None
    try:
        catch_up(state, url, delivery_limit=delivery_limit)
    except NoDeadLog:
        return None  # no worker declared the topology yet: nothing was dead-lettered
    except BusError as exc:  # RabbitMQ cannot be reached or stopped delivering
        return (f"the dead-letter log was not read ({exc.message}): messages RabbitMQ "
                "dead-lettered itself since the last sweep may be missing")
    return None


def _index(state: StateStore, letters: Sequence[Letter], report: SweepReport,
           delivery_limit: int | None) -> None:
    """Index one chunk of letters, then move the cursor past them."""
    if not letters:
        return
    report.read += len(letters)
    now = datetime.now(UTC)
    known = state.tx_letters([ltr.letter_id for ltr in letters])
    located: list[tuple[TxKey, str, int]] = []
    fresh: dict[TxKey, dict[str, Any]] = {}
    for letter in letters:
        row = known.get(letter.letter_id)
        if row is not None:
            if row["log_offset"] is None:
                located.append((TxKey.of(row), letter.letter_id, letter.offset))
            continue
        status = "archived" if headers.ARCHIVED_AT in letter.headers else "error"
        new = index_row(letter.headers, letter.body, message_id=letter.props.message_id,
                        status=status, letter=letter.letter_id, offset=letter.offset,
                        delivery_limit=delivery_limit, routing_key=letter.routing_key,
                        found_at=now)
        fresh[TxKey.of(new)] = new  # a later letter of the same transaction wins
    current = state.tx_get(list(fresh))
    rows = []
    for key, new in fresh.items():
        old = current.get(key)
        if old is not None and _moved_since(old, new):
            report.stale += 1
            continue
        rows.append(new)
    state.tx_locate(located)
    state.tx_record(rows, by="sweep", notes=["found in the dead-letter log"] * len(rows))
    report.located += len(located)
    report.indexed += len(rows)
    state.save_cursor(SWEEP_CURSOR, str(letters[-1].offset), changes=len(rows))


def _moved_since(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether the transaction moved after this letter was written (the letter is old)."""
    failed: datetime | None = new["last_failure"]
    moved = aware(old["status_at"])
    return failed is not None and moved is not None and moved > failed


# -- the quorum queues of syncbus before the index --------------------------------------


def migrate_legacy(url: str, report: SweepReport | None = None) -> dict[str, int]:
    """Move what ``syncbus.dead`` and ``syncbus.archive`` (quorum queues) still hold into
    the dead-letter log, then delete them; each message's copy is confirmed before the
    original is acked. Returns messages moved per queue (none when they do not exist).

    Raises:
        BrokerConnectionError: RabbitMQ cannot be reached.
    """
    moved: dict[str, int] = {}
    conn = pika.BlockingConnection(pika.URLParameters(url))
    publisher = Publisher(url, name="syncbus-migrate")
    try:
        for queue in (LEGACY_DEAD_QUEUE, LEGACY_ARCHIVE_QUEUE):
            n = _migrate_queue(conn, publisher, queue)
            if n is not None:
                moved[queue] = n
    finally:
        publisher.close()
        with contextlib.suppress(Exception):
            conn.close()
    if report is not None:
        report.migrated = moved
    return moved


def _migrate_queue(conn: Any, publisher: Publisher, queue: str) -> int | None:
    channel = conn.channel()
    try:
        declared = channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return None  # no such queue: nothing to move
    if queue == LEGACY_DEAD_QUEUE:
        with contextlib.suppress(pika.exceptions.AMQPError):
            channel.queue_unbind(queue, DEAD_EXCHANGE)  # new letters go to the log only
    moved = 0
    remaining = declared.method.message_count
    while remaining:
        chunk = []
        for _ in range(min(MIGRATE_CHUNK, remaining)):
            method, props, body = channel.basic_get(queue)
            if method is None:
                break
            chunk.append((method.delivery_tag, props, body))
        if not chunk:
            break
        publisher.publish_batch([_copy(props, body) for _, props, body in chunk])
        channel.basic_ack(chunk[-1][0], multiple=True)
        moved += len(chunk)
        remaining = channel.queue_declare(queue, passive=True).method.message_count
    with contextlib.suppress(pika.exceptions.AMQPError):
        channel.queue_delete(queue, if_empty=True)
    return moved


def _copy(props: pika.BasicProperties, body: bytes) -> OutMessage:
    hdrs = dict(cap_headers(props.headers))
    message_id = props.message_id if isinstance(props.message_id, str) else None
    return OutMessage("", DEAD_LOG, body, hdrs, message_id, mandatory=True,
                      content_type=props.content_type or "application/cloudevents+json")

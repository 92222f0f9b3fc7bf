"""Index rows of the offline-transaction log, made from messages.

:func:`index_row` reads a retried, dead-lettered or legacy archived message (headers
and body, through :mod:`bus.amqp.peek`, so any message gives a row) into the columns of
:mod:`bus.state.txindex`. :class:`TxRecorder` is the consumer's side: after a
batch's retry and dead-letter copies are confirmed, and before the originals are
acked, it writes what happened to the index — Error for a dead letter, Pending for a
retry, Processed for a transaction the index knew that was applied now — and marks a
batch Pending while it is still being applied after :data:`INFLIGHT_AFTER` seconds
(a target that is slow, or a connector inside its own retries).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bus.amqp.headers import LETTER_HEADER
from bus.amqp.peek import Failure, read_body, read_failure, time_header

if TYPE_CHECKING:
    from bus.amqp.consumer import Decision, Delivery
    from bus.amqp.publisher import OutMessage
    from bus.state.store import StateStore
    from bus.state.txindex import TxKey

__all__ = ["INFLIGHT_AFTER", "TxRecorder", "direction_of_queue", "event_id_of", "index_row"]

#: Seconds a batch may be applied before its transactions are listed as Pending.
INFLIGHT_AFTER = 1.0
#: An event id as syncbus makes them (a UUID).
_TX_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
#: Characters of a text column kept in the index.
MAX_TEXT = 2000


def event_id_of(message_id: str | None, body_id: str | None) -> str | None:
    """The transaction id of a message, or None when it has none to trust.

    The AMQP message id names a transaction (syncbus sets it to the event id; a
    foreign publisher that reuses one says its messages are the same) when it is
    1-200 printable characters without spaces. Without one, the body's ``id`` does
    when it is a UUID, as every syncbus event id is: a damaged or foreign body may say
    anything ("", "x", one id shared by thousands of messages), and keyed by that,
    distinct messages would fold into one transaction. Such a message is named by
    its dead letter instead.
    """
    if message_id and len(message_id) <= 200 and message_id.isprintable() and not any(
            ch.isspace() for ch in message_id):
        return message_id
    if body_id and _TX_ID.fullmatch(body_id):
        return body_id
    return None


def direction_of_queue(queue: str | None) -> str:
    """``a2b`` / ``b2a`` of a link work or retry queue name; ``?`` for anything else."""
    parts = (queue or "").split(".")
    if len(parts) >= 4 and parts[0] == "syncbus" and parts[1] in ("link", "retry"):
        return parts[3] if parts[3] in ("a2b", "b2a") else "?"
    return "?"


def index_row(headers: Mapping[str, Any], body: object, *, message_id: object, status: str,
              letter: str | None = None, offset: int | None = None,
              delivery_limit: int | None = None, routing_key: str = "",
              found_at: datetime | None = None) -> dict[str, Any]:
    """The index columns of one message; never raises.

    Args:
        headers: The message's headers (capped or not).
        body: Its body as handed over by the client.
        message_id: The AMQP message id (the event id); the body's id otherwise.
        status: The status the row gets.
        letter: The dead letter's id (dead letters only).
        offset: The letter's offset in the dead-letter log, when known.
        delivery_limit: The link queues' ``x-delivery-limit`` (see :func:`read_failure`).
        routing_key: The key it was delivered with (when no header says).
        found_at: When it was found (the failure time when no header says: a RabbitMQ
            stream drops ``x-death``, so a letter the broker wrote has no time of its own).
    """
    failure = read_failure(headers, delivery_limit)
    if not failure.routing_key and routing_key:
        failure = replace(failure, routing_key=routing_key)
    if not failure.last_failure and found_at is not None:
        failure = replace(failure, last_failure=found_at.isoformat())
    read = read_body(body)
    fields = read.fields
    entity = op = None
    parts = failure.routing_key.split(".")
    if len(parts) == 3 and read.unreadable is None:
        entity, op = parts[1], parts[2]
    tx_id = event_id_of(_text(message_id), fields.id) or letter or f"o:{offset}"
    return {
        "id": tx_id[:200], "link": (failure.link or "?")[:200],
        "direction": direction_of_queue(failure.queue), "status": status,
        "entity": _cut(fields.entity or entity, 200), "op": _cut(fields.op or op, 16),
        "record_key": fields.key, "version": _cut(fields.version, 100),
        "routing_key": failure.routing_key[:255], "attempts": failure.attempts,
        "round": _round(headers), "replays": failure.replays, "deliveries": failure.deliveries,
        "first_failure": time_header(failure.first_failure),
        "last_failure": time_header(failure.last_failure),
        "error_class": _cut(failure.error_class, 200), "error": _cut(failure.error, MAX_TEXT),
        "response": _cut(failure.response, MAX_TEXT), "failures": _history(failure),
        "unreadable": read.unreadable.reason if read.unreadable else None,
        "preview": read.unreadable.preview[:300] if read.unreadable else None,
        "size": read.size, "letter": letter, "log_offset": offset,
    }


class TxRecorder:
    """Writes one link direction's settled batches to the index (see module docstring).

    Args:
        state: The state store.
        link: The link's name.
        direction: ``a2b`` or ``b2a``.
        delivery_limit: The link queues' ``x-delivery-limit``.
    """

    def __init__(self, state: StateStore, link: str, direction: str,
                 delivery_limit: int | None = None) -> None:
        self.state = state
        self.link = link
        self.direction = direction
        self.delivery_limit = delivery_limit

    def settled(self, batch: Sequence[Delivery], decisions: Sequence[Decision],
                copies: Sequence[OutMessage | None], inflight: set[int]) -> None:
        """Record a settled batch: one copy (or None for an ack) per delivery.

        Args:
            inflight: Positions of deliveries :meth:`inflight` listed as Pending.
        """
        from bus.amqp.consumer import Verdict, headers  # noqa: PLC0415 - bus.amqp.consumer imports us

        rows, applied = [], []
        for i, (delivery, decision, copy) in enumerate(zip(batch, decisions, copies,
                                                           strict=True)):
            key = self.key(delivery)
            if decision.verdict is Verdict.ACK or copy is None:
                if key is not None and (i in inflight or headers.REPLAYS in delivery.headers
                                        or headers.ATTEMPTS in delivery.headers):
                    applied.append(key)
                continue
            dead = LETTER_HEADER in (copy.headers or {})
            if dead or key is not None:  # a retry of a message without an id is not listed
                rows.append(self._row(key, copy, "error" if dead else "pending"))
        if rows:
            self.state.tx_record(_last_per_key(rows), by="consumer")
        if applied:
            self.state.tx_processed(applied)

    def inflight(self, batch: Sequence[Delivery], since: datetime) -> None:
        """List a batch still being applied as Pending (transactions the index does not
        know yet; a replayed one is Pending already)."""
        keys = [self.key(d) for d in batch]
        known = self.state.tx_get([k for k in keys if k is not None])
        note = (f"being applied since {since:%H:%M:%S} UTC: the target is slow or the "
                "connector is retrying")
        rows = []
        for delivery, key in zip(batch, keys, strict=True):
            if key is None or key in known:
                continue
            row = index_row(delivery.headers, delivery.body, message_id=delivery.message_id,
                            status="pending", delivery_limit=self.delivery_limit)
            row.update(id=key.id, link=self.link, direction=self.direction,
                       error_class="InFlight", error=note,
                       routing_key=row["routing_key"] or delivery.original_routing_key)
            rows.append(row)
        if rows:
            self.state.tx_record(_last_per_key(rows), by="consumer", notes=[note] * len(rows))

    def key(self, delivery: Delivery) -> TxKey | None:
        """The delivery's transaction: its event id; None for a message without a
        valid one (its dead letter becomes a transaction of its own, named by the
        letter)."""
        from bus.state.txindex import TxKey  # noqa: PLC0415

        tx_id = event_id_of(delivery.message_id, read_body(delivery.body).fields.id)
        return TxKey(tx_id, self.link, self.direction) if tx_id else None

    def _row(self, key: TxKey | None, copy: OutMessage, status: str) -> dict[str, Any]:
        hdrs = copy.headers or {}
        letter = hdrs.get(LETTER_HEADER) if status == "error" else None
        row = index_row(hdrs, copy.body, message_id=copy.message_id, status=status,
                        letter=letter if isinstance(letter, str) else None,
                        delivery_limit=self.delivery_limit)
        row.update(link=self.link, direction=self.direction)
        if key is not None:
            row["id"] = key.id
        return row


def _last_per_key(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per key, the last one winning (a statement may write a key only once)."""
    by_key = {(r["id"], r["link"], r["direction"]): r for r in rows}
    return list(by_key.values())


def _round(headers: Mapping[str, Any]) -> int | None:
    value = headers.get("x-syncbus-round")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _history(failure: Failure) -> str | None:
    return json.dumps(failure.history, default=str) if failure.history else None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace") or None
    return str(value) if value else None


def _cut(value: object, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]

"""The consumer runtime: prefetch, batching, and ack / retry / dead-letter.

A :class:`BatchConsumer` drains one work queue with kombu, hands batches to a
handler, and settles every message by the handler's :class:`Decision`:

- ``ACK``: the target confirmed the write (or the event was stale / a duplicate).
- ``RETRY``: a copy goes to the link's delayed retry queue (attempts + 1), and comes
  back to the work queue when its TTL expires; after ``max_attempts`` it is dead.
- ``DEAD``: a copy goes to the dead-letter queue with the error in its headers.

The apply rule: a message is acked only after the target confirmed, or after its
copy was confirmed by the broker in the retry or dead-letter queue. A handler that
crashes is retried message by message so one poison message cannot take its batch
with it; a message that still crashes it is retried with delay like a transient
failure (an outage of something the handler needs looks the same), so it reaches
the dead-letter queue with the exception's text once its attempts run out. A
message that kills the whole process is redelivered by RabbitMQ, which
dead-letters it itself once ``x-delivery-limit`` is reached.

Pausing (:attr:`BatchConsumer.paused`, set by the worker for a paused link) cancels
the consumer and closes its channel between two batches: the messages prefetched but
not yet handled go back to the queue, where they wait, with everything published
meanwhile, until the event is cleared. After each settled batch the optional
``on_settled`` hook gets a :class:`Settled` summary (metrics, activity counters,
alert rules); it is called once per batch, never per message.
"""

from __future__ import annotations

import contextlib
import enum
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from bus.amqp.headers import LETTER_HEADER, headers
from bus.amqp.peek import (
    ROUTING_KEY_RE,
    UNDECODABLE,
    body_bytes,
    count_header,
    harden_amqp_decoders,
    header_history,
    safe_headers,
    time_header,
)
from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import DEAD_EXCHANGE, LinkQueues
from bus.amqp.txrecord import INFLIGHT_AFTER
from bus.core.redact import redact_url
from schemas.config import RetryPolicy

if TYPE_CHECKING:
    from bus.amqp.txrecord import TxRecorder

__all__ = ["BatchConsumer", "Decision", "Delivery", "Settled", "Verdict", "headers"]

log = structlog.get_logger(__name__)

#: Seconds to wait for more messages before a partial batch is processed.
BATCH_WAIT = 0.05
#: Characters of an error text kept in message headers.
MAX_ERROR_CHARS = 2000
#: Failures kept in the history header (the oldest drop out first).
MAX_HISTORY = 20
#: Seconds between two looks at the pause flag while paused.
PAUSE_POLL = 0.2
#: Error class of a message the consumer cannot read at all (never reaches the handler).
UNREADABLE = "Unreadable"

_ROUTING_KEY_RE = ROUTING_KEY_RE
harden_amqp_decoders()  # no header or property may break the connection


class Verdict(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Decision:
    """How to settle one message."""

    verdict: Verdict
    error: str | None = None
    error_class: str | None = None
    retry_after: float | None = None
    response: str | None = None

    @classmethod
    def ack(cls) -> Decision:
        return _ACK


_ACK = Decision(Verdict.ACK)


@dataclass(slots=True)
class Delivery:
    """One message as the handler sees it: plain data, no broker object.

    Handlers (the applier, the subscriber, ``syncbus preview``) build and read these
    fields only; settling the message is the :class:`BatchConsumer`'s business, through
    a handle it keeps to itself.
    """

    body: bytes
    headers: dict[str, Any]
    routing_key: str
    message_id: str | None
    _: KW_ONLY
    #: The ``content_type`` property, when the message has one as text.
    content_type: str | None = None
    #: True when the broker delivered the message before (a consumer died holding it).
    redelivered: bool = False
    #: Why the message cannot be handled at all (its body could not be read as bytes);
    #: such a delivery is dead-lettered by the consumer without reaching the handler.
    problem: str | None = None
    #: The broker's delivery tag, the consumer's handle to ack the message (0: made
    #: elsewhere, never acked); handlers have no use for it.
    _tag: int = field(default=0, repr=False, compare=False)

    @property
    def attempts(self) -> int:
        """Failed attempts so far (our own header, not x-death; 0 when unreadable)."""
        return count_header(self.headers.get(headers.ATTEMPTS))

    @property
    def original_routing_key(self) -> str:
        """The routing key the message was first published with (where its copies say
        it came from); the delivery's own when the header is missing or not a name."""
        value = self.headers.get(headers.ROUTING_KEY)
        if isinstance(value, str) and _ROUTING_KEY_RE.match(value):
            return value
        return self.routing_key


Handler = Callable[[Sequence[Delivery]], list[Decision]]


@dataclass(slots=True)
class ConsumerStats:
    acked: int = 0
    retried: int = 0
    dead: int = 0
    crashed: int = 0
    in_flight: int = 0
    #: Monotonic time since which the consumer has had no message in hand (None: busy).
    idle_since: float | None = None
    connected: bool = False
    #: True while the link is paused (the consumer is cancelled).
    paused: bool = False


@dataclass(frozen=True, slots=True)
class Settled:
    """One settled batch, as the ``on_settled`` hook sees it."""

    size: int
    retried: int
    dead: int
    #: Seconds the handler took (map, write, record).
    seconds: float
    #: The first failure's text, when something was retried or dead-lettered.
    error: str | None = None


class BatchConsumer:
    """Consumes one link direction's work queue in batches.

    Args:
        url: AMQP URL.
        queues: The link direction's queue names.
        handler: Maps and applies a batch; returns one Decision per delivery.
        publisher: Confirmed publisher for retry and dead-letter copies.
        retry: The link's retry policy.
        prefetch: Unacked messages the broker may push to us.
        batch_size: Largest batch handed to ``handler``.
        on_settled: Called after each batch is settled (acked, copies confirmed).
        tx_index: Writes settled batches to the offline-transaction index (after the
            copies are confirmed, before the originals are acked), and lists a batch
            as Pending while it is applied for longer than a second.
    """

    def __init__(
        self,
        *,
        url: str,
        queues: LinkQueues,
        handler: Handler,
        publisher: Publisher,
        retry: RetryPolicy,
        prefetch: int,
        batch_size: int,
        on_settled: Callable[[Settled], None] | None = None,
        tx_index: TxRecorder | None = None,
    ) -> None:
        self.url = url
        self.queues = queues
        self.handler = handler
        self.publisher = publisher
        self.retry = retry
        self.prefetch = max(prefetch, batch_size)
        self.batch_size = batch_size
        self.stats = ConsumerStats()
        self.on_settled = on_settled
        self.tx_index = tx_index
        #: When the batch being applied was handed over, and whether it is listed Pending.
        self._pending_since = 0.0
        self._inflight_listed = False
        #: Set to pause this link direction, clear to resume (see the module docstring).
        self.paused = threading.Event()
        self._buffer: list[Delivery] = []
        #: The batch being applied on the pool thread, and its decisions to come.
        self._pending: tuple[list[Delivery], Future[tuple[list[Decision], float]]] | None = None
        self._log = log.bind(link=queues.link, direction=queues.direction)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; reconnects after broker failures.

        The batch in hand when ``stop`` is set is finished and settled first.
        """
        backoff = 0.5
        while not stop.is_set():
            if self.paused.is_set():
                self._wait_resumed(stop)
                continue
            try:
                with Connection(self.url, heartbeat=30, connect_timeout=10) as conn:
                    conn.connect()
                    backoff = 0.5
                    self._consume(conn, stop)
            except Exception as exc:  # noqa: BLE001 - any failure: unacked messages come back
                self._pending = None
                self._buffer.clear()
                self.stats.in_flight = 0
                self.stats.connected = False
                self.stats.idle_since = None
                if stop.is_set():
                    break
                self._log.warning("consumer_reconnecting", url=redact_url(self.url),
                                  error=str(exc) or type(exc).__name__, wait=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 15.0)

    # -- the loop -----------------------------------------------------------------------

    def _consume(self, conn: Connection, stop: threading.Event) -> None:
        channel = conn.channel()
        channel.auto_decode = False  # bodies stay the bytes that were sent (see bus.amqp.peek)
        channel.basic_qos(0, self.prefetch, False)
        consumer = Consumer(
            channel, queues=[Queue(self.queues.work, no_declare=True)],
            on_message=self._on_message, no_ack=False,
        )
        consumer.consume()
        self.stats.connected = True
        self._log.info("consumer_started", queue=self.queues.work)
        with ThreadPoolExecutor(1, thread_name_prefix=f"apply-{self.queues.link}") as pool:
            try:
                self._drain(conn, channel, pool, stop)
            finally:
                self._wait_pending()  # never leave a batch being applied behind
        if self.paused.is_set() and not stop.is_set():
            # Not handled: closing the channel returns every unacked (prefetched) message
            # to the queue, where it waits with the rest.
            self._buffer = []
            self.stats.in_flight = 0
            consumer.cancel()
            channel.close()
            self._log.warning("consumer_paused", queue=self.queues.work)
            return
        consumer.cancel()

    def _drain(self, conn: Connection, channel: Any, pool: ThreadPoolExecutor,
               stop: threading.Event) -> None:
        """Read messages while the previous batch is being applied (one batch ahead).

        Batches are applied one at a time and in order, on the pool's single thread;
        this thread keeps draining the socket meanwhile, and settles (publishes the
        copies, acks) each batch once its decisions are in.
        """
        while not stop.is_set() and not self.paused.is_set():
            try:
                conn.drain_events(timeout=BATCH_WAIT)
                if self._pending is not None and self._pending[1].done():
                    self._settle(channel)
                if len(self._buffer) < self.batch_size:
                    continue
            except TimeoutError:
                conn.heartbeat_check()
                if self._pending is not None and (self._pending[1].done() or not self._buffer):
                    self._settle(channel)
                if (not self._buffer and self._pending is None
                        and self.stats.idle_since is None):
                    self.stats.idle_since = time.monotonic()
            if self._buffer:
                self._settle(channel)  # the previous batch first: acks stay in order
                batch, self._buffer = self._buffer, []
                self._hand_over(batch, pool)
            self._list_inflight()
        self._settle(channel)  # the batch being applied is finished and settled
        if self._buffer and stop.is_set():  # stopping: the batch in hand is applied too
            batch, self._buffer = self._buffer, []
            self._hand_over(batch, pool)
            self._settle(channel)

    def _hand_over(self, batch: list[Delivery], pool: ThreadPoolExecutor) -> None:
        self._pending = (batch, pool.submit(self._timed_decide, batch))
        self._pending_since, self._inflight_listed = time.monotonic(), False

    def _list_inflight(self) -> None:
        """List the batch being applied as Pending once it took longer than
        :data:`bus.amqp.txrecord.INFLIGHT_AFTER` (a slow target, a connector's retries)."""
        if (self.tx_index is None or self._pending is None or self._inflight_listed
                or self._pending[1].done()
                or time.monotonic() - self._pending_since < INFLIGHT_AFTER):
            return
        self._inflight_listed = True
        since = datetime.now(UTC) - timedelta(seconds=time.monotonic() - self._pending_since)
        try:
            self.tx_index.inflight(self._pending[0], since)
        except Exception as exc:  # noqa: BLE001 - a view of work in progress, never a reason to stop
            self._log.warning("inflight_listing_failed", error=str(exc) or type(exc).__name__)

    def _timed_decide(self, batch: list[Delivery]) -> tuple[list[Decision], float]:
        started = time.perf_counter()
        readable = [d for d in batch if d.problem is None]
        if len(readable) == len(batch):
            decisions = self._decide(batch)
        else:
            made = iter(self._decide(readable) if readable else [])
            decisions = [next(made) if d.problem is None else _unreadable(d) for d in batch]
        return decisions, time.perf_counter() - started

    def _wait_pending(self) -> None:
        """Let a batch still being applied finish; unsettled, it comes back redelivered."""
        if self._pending is not None:
            with contextlib.suppress(Exception):
                self._pending[1].result()
            self._pending = None

    def _wait_resumed(self, stop: threading.Event) -> None:
        """Stay disconnected while :attr:`paused` is set (or until ``stop``)."""
        self.stats.paused, self.stats.connected = True, False
        self.stats.idle_since = time.monotonic()
        while self.paused.is_set() and not stop.is_set():
            stop.wait(PAUSE_POLL)
        self.stats.paused = False
        if not stop.is_set():
            self._log.info("consumer_resumed", queue=self.queues.work)

    def _on_message(self, message: Message) -> None:
        self._buffer.append(_delivery(message))
        self.stats.in_flight = len(self._buffer) + (len(self._pending[0]) if self._pending else 0)
        self.stats.idle_since = None

    def _settle(self, channel: Any) -> None:
        """Wait for the batch being applied, then settle it (see the apply rule)."""
        if self._pending is None:
            return
        batch, future = self._pending
        if not future.done() and self.tx_index is not None and not self._inflight_listed:
            remaining = INFLIGHT_AFTER - (time.monotonic() - self._pending_since)
            with contextlib.suppress(Exception):  # a timeout: still being applied
                future.result(timeout=max(0.0, remaining))
            self._list_inflight()
        decisions, seconds = future.result()
        self._pending = None
        copies: list[OutMessage] = []
        per_delivery: list[OutMessage | None] = []
        retried = dead_count = 0
        error: str | None = None
        for delivery, dec in zip(batch, decisions, strict=True):
            if dec.verdict is Verdict.ACK:
                self.stats.acked += 1
                per_delivery.append(None)
                continue
            copy, dead = self._copy(delivery, dec)
            copies.append(copy)
            per_delivery.append(copy)
            error = error or dec.error or dec.error_class
            if dead:
                dead_count += 1
            else:
                retried += 1
        self.stats.dead += dead_count
        self.stats.retried += retried
        # Apply rule: the copies must be confirmed before the originals are acked.
        self.publisher.publish_batch(copies)
        if self.tx_index is not None:  # the index row: after the copy, before the ack
            listed = set(range(len(batch))) if self._inflight_listed else set()
            self.tx_index.settled(batch, decisions, per_delivery, listed)
        self._inflight_listed = False
        # Everything delivered before this batch is settled already: one frame acks all.
        channel.basic_ack(max(d._tag for d in batch), multiple=True)
        self.stats.in_flight = len(self._buffer)
        if self.on_settled is not None:
            try:
                self.on_settled(Settled(len(batch), retried, dead_count, seconds, error))
            except Exception:  # noqa: BLE001 - bookkeeping must never stop the consumer
                self._log.exception("settled_hook_failed")

    def _decide(self, batch: list[Delivery]) -> list[Decision]:
        try:
            decisions = list(self.handler(batch))
            if len(decisions) != len(batch):
                raise RuntimeError(f"handler returned {len(decisions)} decisions for {len(batch)}")
            return decisions
        except Exception:  # noqa: BLE001 - a bug or a poison message: isolate it
            self._log.exception("batch_handler_crashed", size=len(batch))
        return [self._decide_one(delivery) for delivery in batch]

    def _decide_one(self, delivery: Delivery) -> Decision:
        try:
            return self.handler([delivery])[0]
        except Exception as exc:  # noqa: BLE001
            self.stats.crashed += 1
            self._log.error("message_crashed_handler", event_id=delivery.message_id,
                            error=str(exc), attempts=delivery.attempts)
            return Decision(Verdict.RETRY, error=f"{type(exc).__name__}: {exc}",
                            error_class=f"Crash.{type(exc).__name__}")

    def _copy(self, delivery: Delivery, decision: Decision) -> tuple[OutMessage, bool]:
        """The retry or dead-letter copy of ``delivery``, and whether it is dead.

        Transient failures are retried for the link's offline window (counted from the
        first failure of this round; a replay starts a new round); a message that
        crashes the consumer gets ``max_attempts`` tries; permanent failures are dead
        at once. The headers keep the whole history across rounds and replays.
        """
        now = datetime.now(UTC)
        stamp = now.isoformat()
        attempts = delivery.attempts + 1
        round_ = count_header(delivery.headers.get(headers.ROUND)) + 1
        hdrs = safe_headers(delivery.headers)
        hdrs.pop(LETTER_HEADER, None)  # a replayed copy's old letter is not this one
        for name in (headers.FIRST_FAILURE, headers.RETRY_SINCE):  # a forged time is no time
            if name in hdrs and time_header(hdrs[name]) is None:
                del hdrs[name]
        hdrs.update({
            headers.ATTEMPTS: attempts,
            headers.ROUND: round_,
            headers.LINK: self.queues.link,
            headers.QUEUE: self.queues.work,
            headers.ROUTING_KEY: delivery.original_routing_key,
            headers.LAST_FAILURE: stamp,
            headers.ERROR: (decision.error or "")[:MAX_ERROR_CHARS],
            headers.ERROR_CLASS: decision.error_class or "",
        })
        hdrs.setdefault(headers.FIRST_FAILURE, stamp)
        hdrs.setdefault(headers.RETRY_SINCE, stamp)
        hdrs[headers.HISTORY] = _history(hdrs, stamp, decision)
        if decision.response:
            hdrs[headers.RESPONSE] = decision.response[:MAX_ERROR_CHARS]
        content_type = delivery.content_type
        if content_type is None or not ROUTING_KEY_RE.match(content_type):
            content_type = "application/cloudevents+json"
        give_up = self._give_up(decision, round_, hdrs[headers.RETRY_SINCE], now)
        if decision.verdict is Verdict.RETRY and give_up is None:
            delay, queue = self._tier(round_, decision.retry_after)
            self._log.info("message_retry", event_id=delivery.message_id,
                           routing_key=delivery.original_routing_key, attempts=attempts,
                           delay=delay, error=decision.error)
            return OutMessage("", queue, delivery.body, hdrs, delivery.message_id,
                              mandatory=True, content_type=content_type), False
        if give_up is not None:
            hdrs[headers.ERROR] = f"{give_up}: {decision.error}"[:MAX_ERROR_CHARS]
        hdrs[LETTER_HEADER] = uuid.uuid4().hex
        self._log.warning("message_dead_lettered", event_id=delivery.message_id,
                          routing_key=delivery.original_routing_key, attempts=attempts,
                          error=hdrs[headers.ERROR])
        return OutMessage(DEAD_EXCHANGE, delivery.original_routing_key, delivery.body, hdrs,
                          delivery.message_id, mandatory=True, content_type=content_type), True

    def _give_up(self, decision: Decision, round_: int, since: str, now: datetime) -> str | None:
        """Why a retried message stops retrying now, or None to retry again."""
        if decision.verdict is not Verdict.RETRY:
            return None
        if (decision.error_class or "").startswith("Crash."):
            if round_ >= self.retry.max_attempts:
                return f"crashed the consumer {round_} times"
            return None
        began = time_header(since) or now
        waited = (now - began).total_seconds()
        if waited >= self.retry.offline_window:
            return f"still failing after {waited:.0f}s (offline window {self.retry.offline_window:g}s)"
        return None

    def _tier(self, attempts: int, retry_after: float | None) -> tuple[float, str]:
        delay, queue = self.queues.retry_queue(attempts)
        if retry_after:
            # Honour Retry-After: the first tier at least as long as asked.
            later = [t for t in self.queues.retries if t[0] >= retry_after]
            if later and later[0][0] > delay:
                delay, queue = later[0]
        return delay, queue


def _delivery(message: Message) -> Delivery:
    """A delivery as the handler sees it; never raises, whatever the message holds.

    A message whose body cannot be turned back into its bytes, or whose properties
    py-amqp could not decode, carries the reason in :attr:`Delivery.problem`.
    """
    props = message.properties if isinstance(message.properties, dict) else {}
    raw_headers = message.headers if isinstance(message.headers, dict) else {}
    encoding = props.get("content_encoding")
    body = body_bytes(message.body, encoding if isinstance(encoding, str) else None)
    problem = None if body is not None else f"body is a {type(message.body).__name__}, not bytes"
    if UNDECODABLE in raw_headers:
        problem = f"AMQP properties could not be decoded ({raw_headers[UNDECODABLE]})"
    message_id = props.get("message_id")
    content_type = props.get("content_type")
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    routing_key = info.get("routing_key", "")
    return Delivery(
        body=body or b"",
        headers=dict(raw_headers),
        routing_key=routing_key if isinstance(routing_key, str) else "",
        message_id=message_id if isinstance(message_id, str) else None,
        content_type=content_type if isinstance(content_type, str) else None,
        redelivered=info.get("redelivered") is True,
        problem=problem,
        _tag=message.delivery_tag,
    )


def _unreadable(delivery: Delivery) -> Decision:
    log.warning("message_unreadable", event_id=delivery.message_id, error=delivery.problem)
    return Decision(Verdict.DEAD, error=f"unreadable message: {delivery.problem}",
                    error_class=UNREADABLE)


def _history(hdrs: dict[str, Any], stamp: str, decision: Decision) -> str:
    """The history header with this failure added, as JSON text (a RabbitMQ stream,
    where dead letters are kept, drops header values that are lists or tables)."""
    entries: list[dict[str, str]] = [
        e for e in header_history(hdrs, headers.HISTORY) if "unreadable" not in e]
    entries.append({"at": stamp, "class": decision.error_class or "",
                    "error": (decision.error or "")[:300]})
    return json.dumps(entries[-MAX_HISTORY:], separators=(",", ":"))

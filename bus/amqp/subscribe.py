"""Durable subscriptions to change events, with retries and dead letters.

A subscriber owns a durable quorum queue bound to ``syncbus.changes`` with one or
more topic patterns, and processes every event in it with a handler — the way the
mapping consumers do, on the same runtime (:class:`bus.amqp.consumer.BatchConsumer`)::

    from bus.amqp.subscribe import subscribe

    def on_change(event):            # a schemas.event.ChangeEvent
        print(event.data.key, event.data.record)

    subscribe("crm.customers.*", on_change, queue="billing.customers")

How the handler's outcome settles an event:

=====================================  =================================================
handler                                the event
=====================================  =================================================
returns                                is acked
raises ``TransientError``              comes back after a delay (``retry.delays``, at least
                                       its ``retry_after``), for ``retry.offline_window``
raises any other exception             comes back after a delay, ``retry.max_attempts``
                                       times in all
raises ``PermanentError``              goes to the dead-letter queue ``syncbus.dead`` at once
(body is not a change event)           goes to the dead-letter queue at once
=====================================  =================================================

A dead letter keeps the original body and routing key, with the attempts, the first
and last failure time and the error in ``x-syncbus-*`` headers, like every other
transaction in the offline-transaction log. Delivery is at least once: deduplicate
on ``event.id`` when a handler's effect must not happen twice.

Queues: ``<queue>`` (quorum, ``x-delivery-limit``, dead-lettered to ``syncbus.dead``)
and one delayed retry queue per delay, ``<queue>.retry.<delay>s``. Bindings are only
ever added: to stop receiving a pattern, unbind it (or delete the queue).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from amqp.exceptions import NotFound, PreconditionFailed
from kombu import Connection, Exchange, Queue

from bus.amqp.consumer import BatchConsumer, Decision, Delivery, Verdict
from bus.amqp.events import amqp_url, parse_event
from bus.amqp.publisher import Publisher
from bus.amqp.topology import (
    CHANGES_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_LOG,
    LinkQueues,
    declare_dead_log,
)
from bus.core.redact import redact_url
from connectors.base import (
    BrokerConnectionError,
    ConfigError,
    PermanentError,
    SchemaError,
    TransientError,
)
from schemas.config import RetryPolicy
from schemas.event import ChangeEvent

__all__ = [
    "EventHandler",
    "PermanentError",
    "Subscriber",
    "SubscriberStats",
    "TransientError",
    "subscribe",
]

log = structlog.get_logger(__name__)

#: Called with each event; its outcome settles the event (see the module docstring).
EventHandler = Callable[[ChangeEvent], object]

#: Events the broker may push ahead of the handler.
DEFAULT_PREFETCH = 200
#: Events settled together (one ack frame, one confirm round trip for failures).
DEFAULT_BATCH_SIZE = 50
#: Deliveries after which RabbitMQ dead-letters an event that keeps killing the process.
DEFAULT_DELIVERY_LIMIT = 20
#: Dead-lettering of quorum queues that never loses a message (RabbitMQ >= 3.10).
_AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(slots=True)
class SubscriberStats:
    """What a subscriber's handler did so far."""

    handled: int = 0
    failed: int = 0
    invalid: int = 0


class Subscriber:
    """A durable, pattern-bound subscription processed by ``handler``.

    Args:
        pattern: Topic pattern(s) the queue is bound with, e.g. ``crm.customers.*``,
            ``*.*.delete``, ``#``.
        handler: Called with each :class:`~schemas.event.ChangeEvent`.
        queue: Name of the subscriber's durable queue (keep it stable: events wait in
            it while the subscriber is down).
        url: AMQP URL (default: ``$SYNCBUS_AMQP_URL``, then the local broker).
        retry: Retry delays, offline window and attempts (default: the links' defaults).
        prefetch: Events the broker may push ahead of the handler.
        batch_size: Events settled together.
        delivery_limit: Deliveries after which RabbitMQ dead-letters an event whose
            handling keeps killing the process (``x-delivery-limit``).

    Use :meth:`run` to block, or :meth:`start` / :meth:`stop` (or ``with``) to run it
    in a background thread.
    """

    def __init__(
        self,
        pattern: str | Sequence[str],
        handler: EventHandler,
        *,
        queue: str,
        url: str | None = None,
        retry: RetryPolicy | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        batch_size: int = DEFAULT_BATCH_SIZE,
        delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    ) -> None:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        if not patterns or not all(patterns):
            raise ValueError("give at least one non-empty topic pattern")
        if not queue or queue.startswith("amq."):
            raise ValueError(f"invalid queue name {queue!r}")
        self.patterns = patterns
        self.handler = handler
        self.url = amqp_url(url)
        self.retry = retry or RetryPolicy()
        self.delivery_limit = delivery_limit
        self.queues = LinkQueues(
            link=queue, direction="subscriber", work=queue,
            retries=tuple((d, f"{queue}.retry.{d:g}s") for d in sorted(set(self.retry.delays))),
            binding=patterns[0],
        )
        self.stats = SubscriberStats()
        self._prefetch, self._batch_size = prefetch, batch_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: BatchConsumer | None = None
        self._log = log.bind(queue=queue)

    @property
    def queue(self) -> str:
        """The subscriber's work queue."""
        return self.queues.work

    # -- declaration ---------------------------------------------------------------------

    def declare(self) -> None:
        """Declare the exchanges, the queue with its bindings, and its retry queues.

        Idempotent. :meth:`run` and :meth:`start` call it first.

        Raises:
            BrokerConnectionError: RabbitMQ cannot be reached.
            ConfigError: a queue of that name exists with other arguments (e.g. a
                classic queue).
        """
        conn = Connection(self.url, connect_timeout=10)
        try:
            with conn:
                conn.ensure_connection(max_retries=3, interval_start=0.5, interval_step=1)
                self._declare(conn)
        except PreconditionFailed as exc:
            raise ConfigError(f"cannot subscribe with queue {self.queue!r}: {exc}") from exc
        except conn.connection_errors + (OSError,) as exc:
            raise BrokerConnectionError(
                f"cannot reach RabbitMQ at {redact_url(self.url)}: {exc}") from exc

    def _declare(self, conn: Connection) -> None:
        changes = Exchange(CHANGES_EXCHANGE, type="topic", durable=True)
        dead = Exchange(DEAD_EXCHANGE, type="fanout", durable=True)
        channel = conn.channel()
        for exchange in (changes, dead):  # passive first: no configure permission needed
            channel = self._ensure_exchange(conn, channel, exchange)
        channel = self._ensure_dead_log(conn, channel)
        work = Queue(self.queue, durable=True, queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": DEAD_EXCHANGE,
            **_AT_LEAST_ONCE,
        })
        work.declare(channel=channel)
        for pattern in self.patterns:
            channel.queue_bind(self.queue, CHANGES_EXCHANGE, pattern)
        for delay, name in self.queues.retries:
            Queue(name, durable=True, queue_arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": int(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue,
                **_AT_LEAST_ONCE,
            }).declare(channel=channel)
        channel.close()

    @staticmethod
    def _ensure_exchange(conn: Connection, channel: Any, exchange: Exchange) -> Any:
        """Declare ``exchange`` only when it does not exist yet, so a subscriber's user needs
        no configure permission on syncbus's exchanges (see docs/operations.md).

        Returns:
            A usable channel (a failed passive declaration closes the one given).
        """
        try:
            channel.exchange_declare(exchange=exchange.name, type=exchange.type, passive=True)
            return channel
        except NotFound:
            channel = conn.channel()
        exchange.declare(channel=channel)
        return channel

    @staticmethod
    def _ensure_dead_log(conn: Connection, channel: Any) -> Any:
        """The dead-letter log as the topology declares it, unless it exists already.

        Returns:
            A usable channel (a failed passive declaration closes the one given).
        """
        try:
            channel.queue_declare(queue=DEAD_LOG, passive=True)
            return channel
        except NotFound:
            channel = conn.channel()
        declare_dead_log(conn)
        return channel

    # -- running ---------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Declare, then process events until ``stop`` is set, :meth:`stop` is called or
        Ctrl-C; the batch in hand is finished and settled first. Reconnects after
        broker failures.

        Raises:
            BrokerConnectionError: RabbitMQ cannot be reached at the start.
            ConfigError: the queue exists with other arguments.
        """
        self.start()
        try:
            while not self._stop.wait(0.2):
                if stop is not None and stop.is_set():
                    break
        except KeyboardInterrupt:
            self._log.info("subscriber_interrupted")
        finally:
            self.stop()

    def start(self) -> Subscriber:
        """Declare and process events in a background thread; returns at once.

        Raises:
            BrokerConnectionError: RabbitMQ cannot be reached.
            ConfigError: the queue exists with other arguments.
        """
        if self._thread is not None:
            raise RuntimeError("this subscriber is running already")
        self.declare()
        self._stop.clear()
        publisher = Publisher(self.url, name=f"syncbus-subscriber-{self.queue}")
        self._consumer = BatchConsumer(
            url=self.url, queues=self.queues, handler=self._settle, publisher=publisher,
            retry=self.retry, prefetch=self._prefetch, batch_size=self._batch_size,
        )
        self._thread = threading.Thread(target=self._run, args=(self._consumer, publisher),
                                        name=f"subscriber-{self.queue}", daemon=True)
        self._thread.start()
        self._log.info("subscriber_started", patterns=self.patterns)
        return self

    def stop(self, timeout: float | None = 60.0) -> None:
        """Finish the batch in hand, settle it, and stop; safe to call more than once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def connected(self) -> bool:
        """True while the subscriber is consuming its queue."""
        return self._consumer is not None and self._consumer.stats.connected

    @property
    def idle(self) -> bool:
        """True while consuming with no message in hand: everything delivered so far is
        handled and settled (with an empty queue, nothing more is on its way)."""
        stats = None if self._consumer is None else self._consumer.stats
        return (stats is not None and stats.connected and stats.in_flight == 0
                and stats.idle_since is not None)

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self, consumer: BatchConsumer, publisher: Publisher) -> None:
        try:
            consumer.run(self._stop)
        finally:
            publisher.close()
            self._log.info("subscriber_stopped", handled=self.stats.handled,
                           failed=self.stats.failed)

    # -- settling -----------------------------------------------------------------------

    def _settle(self, batch: Sequence[Delivery]) -> list[Decision]:
        """The BatchConsumer handler: one decision per event, never raising."""
        return [self._decide(delivery) for delivery in batch]

    def _decide(self, delivery: Delivery) -> Decision:
        try:
            event = parse_event(delivery.body)
        except SchemaError as exc:
            self.stats.invalid += 1
            return Decision(Verdict.DEAD, error=exc.message, error_class="SchemaError")
        try:
            self.handler(event)
        except PermanentError as exc:
            return self._failed(event, exc, Verdict.DEAD, type(exc).__name__)
        except TransientError as exc:
            return self._failed(event, exc, Verdict.RETRY, type(exc).__name__,
                                exc.retry_after)
        except Exception as exc:  # noqa: BLE001 - the handler's bug: retry, then dead-letter
            return self._failed(event, exc, Verdict.RETRY, f"Crash.{type(exc).__name__}")
        self.stats.handled += 1
        return Decision.ack()

    def _failed(self, event: ChangeEvent, exc: Exception, verdict: Verdict, error_class: str,
                retry_after: float | None = None) -> Decision:
        self.stats.failed += 1
        self._log.warning("subscriber_handler_failed", event_id=event.id,
                          error=f"{type(exc).__name__}: {exc}", verdict=verdict.value)
        return Decision(verdict, error=f"{type(exc).__name__}: {exc}", error_class=error_class,
                        retry_after=retry_after)


def subscribe(
    pattern: str | Sequence[str],
    handler: EventHandler,
    *,
    queue: str,
    url: str | None = None,
    retry: RetryPolicy | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    batch_size: int = DEFAULT_BATCH_SIZE,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    stop: threading.Event | None = None,
) -> None:
    """Process the events matching ``pattern`` with ``handler``; blocks until ``stop`` is
    set or Ctrl-C. See :class:`Subscriber` for the arguments and the module docstring
    for how the handler's outcome settles each event.

    Example::

        subscribe("crm.customers.*", print, queue="demo.customers")

    Raises:
        BrokerConnectionError: RabbitMQ cannot be reached at the start.
        ConfigError: the queue exists with other arguments.
    """
    Subscriber(pattern, handler, queue=queue, url=url, retry=retry, prefetch=prefetch,
               batch_size=batch_size, delivery_limit=delivery_limit).run(stop)

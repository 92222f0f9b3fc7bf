"""Reading change events: parsing, topic patterns, and watching them live.

Every change event is published to the topic exchange ``syncbus.changes`` with the
routing key ``<connection>.<entity>.<op>`` (see ``docs/events.md``). This module has
what every reader needs:

- :func:`parse_event` turns a message body into a :class:`~schemas.event.ChangeEvent`;
- :func:`topic_matches` applies an AMQP topic pattern (``*`` one word, ``#`` any);
- :func:`watch` yields events live through a temporary queue (gone when it stops).

Durable subscriptions with retries and dead letters are in :mod:`bus.amqp.subscribe`,
replays of the history stream in :mod:`bus.amqp.history`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import structlog
from kombu import Connection, Consumer, Exchange, Queue
from kombu.message import Message
from pydantic import ValidationError

from bus.amqp.peek import body_bytes, harden_amqp_decoders
from bus.amqp.topology import CHANGES_EXCHANGE
from bus.core.redact import redact_url, userinfo_problem
from connectors.base import BrokerConnectionError, ConfigError, SchemaError
from schemas.event import ChangeEvent

__all__ = [
    "AMQP_URL_ENV",
    "DEFAULT_AMQP_URL",
    "EventMessage",
    "amqp_url",
    "connect",
    "drain",
    "parse_event",
    "topic_matches",
    "watch",
]

log = structlog.get_logger(__name__)

harden_amqp_decoders()  # no header table may break the connection

#: Environment variable naming the broker when no URL is given.
AMQP_URL_ENV = "SYNCBUS_AMQP_URL"
#: The broker used when neither a URL nor ``$SYNCBUS_AMQP_URL`` is given.
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: Seconds one wait for the broker lasts; ``stop`` is checked in between.
POLL_INTERVAL = 0.25
#: Messages the broker may push ahead of the reader.
READ_PREFETCH = 200
#: Longest backlog of a temporary watch queue; older messages are dropped beyond it, so a
#: forgotten ``tail`` cannot fill the broker's memory.
WATCH_MAX_LENGTH = 100_000


def amqp_url(url: str | None = None) -> str:
    """``url``, else ``$SYNCBUS_AMQP_URL``, else the local broker.

    Raises:
        ConfigError: the URL's user or password needs percent-encoding (the message
            names where the URL came from, never the password).
    """
    chosen = url or os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL
    problem = userinfo_problem(chosen)
    if problem is not None:
        where = f"--amqp-url (or ${AMQP_URL_ENV})" if url else f"${AMQP_URL_ENV}"
        raise ConfigError(f"{where}: {problem}")
    return chosen


def parse_event(body: bytes | str) -> ChangeEvent:
    """Parse and validate one message body as a change event.

    Raises:
        SchemaError: the body is not JSON or not a change event.
    """
    try:
        return ChangeEvent.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) or "body"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise SchemaError(f"not a change event: {where}: {errors[0]['msg']}{more}") from exc


def topic_matches(pattern: str, routing_key: str) -> bool:
    """True when an AMQP topic ``pattern`` matches ``routing_key``.

    Words are separated by dots; ``*`` matches exactly one word and ``#`` zero or
    more, as RabbitMQ's topic exchange does: ``crm.*.delete`` matches
    ``crm.customers.delete``, ``crm.#`` matches every key starting with ``crm.``.
    """
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


@dataclass(frozen=True)
class EventMessage:
    """One change event as it arrived.

    Attributes:
        routing_key: ``<connection>.<entity>.<op>``.
        body: The message body, exactly as published (CloudEvents JSON).
        offset: Position in the history stream (history reads only); start a later
            read at ``offset + 1`` to continue after this event.
        message_id: The AMQP ``message_id`` (the event id).
    """

    routing_key: str
    body: bytes = field(repr=False)
    offset: int | None = None
    message_id: str | None = None

    @cached_property
    def event(self) -> ChangeEvent:
        """The parsed event.

        Raises:
            SchemaError: the body is not a change event.
        """
        return parse_event(self.body)

    @classmethod
    def of(cls, message: Message) -> EventMessage:
        """Wrap a kombu message."""
        headers = message.headers or {}
        offset = headers.get("x-stream-offset")
        # py-amqp hands over str when content_encoding is set (and for an empty body).
        body = body_bytes(message.body, message.content_encoding)
        return cls(
            routing_key=str(message.delivery_info.get("routing_key", "")),
            body=body if body is not None else b"",
            offset=offset if isinstance(offset, int) else None,
            message_id=message.properties.get("message_id"),
        )


def drain(
    conn: Connection,
    queue: Queue,
    *,
    stop: threading.Event | None = None,
    idle_timeout: float | None = None,
    prefetch: int = READ_PREFETCH,
    on_ready: Callable[[], object] | None = None,
) -> Iterator[Message]:
    """Consume ``queue`` on ``conn`` and yield each message; it is acked when the caller
    asks for the next one, so at most ``prefetch`` messages wait in memory.

    Args:
        conn: An open kombu connection.
        queue: The queue to consume (declared by the caller).
        stop: Ends the iteration when set.
        idle_timeout: Ends the iteration after this many seconds without a message.
        prefetch: Unacked messages the broker may push ahead (streams need a limit).
        on_ready: Called once the consumer is registered with the broker.
    """
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    buffer: deque[Message] = deque()
    consumer = Consumer(channel, queues=[queue], on_message=buffer.append, no_ack=False)
    consumer.consume()
    if on_ready is not None:
        on_ready()
    last = time.monotonic()
    try:
        while stop is None or not stop.is_set():
            if not buffer:
                try:
                    conn.drain_events(timeout=POLL_INTERVAL)
                except TimeoutError:
                    conn.heartbeat_check()
                    if idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                        return
                    continue
            while buffer:
                message = buffer.popleft()
                last = time.monotonic()
                yield message
                message.ack()
                if stop is not None and stop.is_set():
                    return
    finally:
        with contextlib.suppress(Exception):  # the connection may be gone already
            consumer.cancel()
            channel.close()


def watch(
    pattern: str = "#",
    *,
    url: str | None = None,
    stop: threading.Event | None = None,
    idle_timeout: float | None = None,
    on_ready: Callable[[], object] | None = None,
) -> Iterator[EventMessage]:
    """Yield change events live, from now on, through a temporary queue.

    The queue is exclusive and auto-deleted: it lives as long as the iteration and
    sees only events published after it was bound. Nothing is retried or
    dead-lettered; use :func:`bus.amqp.subscribe.subscribe` for durable processing.

    Args:
        pattern: Topic pattern the queue is bound with (``#``: every event).
        url: AMQP URL (default: ``$SYNCBUS_AMQP_URL``, then the local broker).
        stop: Ends the iteration when set.
        idle_timeout: Ends the iteration after this many seconds without an event.
        on_ready: Called once the queue is bound and consumed: events published from
            then on are seen.

    Raises:
        BrokerConnectionError: the broker cannot be reached or the connection dropped.
    """
    url = amqp_url(url)
    changes = Exchange(CHANGES_EXCHANGE, type="topic", durable=True)
    queue = Queue(
        f"syncbus.watch.{uuid.uuid4().hex[:12]}",
        exchange=changes, routing_key=pattern, exclusive=True, auto_delete=True,
        durable=False,
        queue_arguments={"x-max-length": WATCH_MAX_LENGTH, "x-overflow": "drop-head"},
    )
    with connect(url) as conn:
        try:
            queue.maybe_bind(conn)
            changes.maybe_bind(conn)
            changes.declare()
            queue.declare()
            for message in drain(conn, queue, stop=stop, idle_timeout=idle_timeout,
                                 on_ready=on_ready):
                yield EventMessage.of(message)
        except conn.connection_errors as exc:
            raise BrokerConnectionError(
                f"lost the connection to {redact_url(url)}: {exc}") from exc


def connect(url: str) -> Connection:
    """An open kombu connection to ``url`` for reading events.

    Heartbeats are checked while waiting for messages; a reader that spends more
    than two minutes on one event loses the connection.

    Raises:
        BrokerConnectionError: the broker cannot be reached.
    """
    conn = Connection(url, connect_timeout=10, heartbeat=60)
    try:
        conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=1)
    except Exception as exc:  # noqa: BLE001 - every failure here means "cannot connect"
        conn.release()
        raise BrokerConnectionError(f"cannot reach RabbitMQ at {redact_url(url)}: {exc}") from exc
    return conn

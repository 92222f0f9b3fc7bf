"""Reading a RabbitMQ queue without consuming it: the operator's view of a queue.

Browsing consumes messages without acknowledging them; they return to the queue,
in order, when the browser closes. A quorum queue hands one consumer at most its
prefetch (≤ 65,535; with prefetch 0 only 2,000) unacknowledged messages, so a large
queue is read through several channels at once. Returning many messages takes a
quorum queue a moment, so closing the browser waits until they are back: the next
command then sees the whole queue.

Any message can be browsed: the AMQP decoders are hardened
(:func:`bus.peek.harden_amqp_decoders`: a header table nested thousands of levels deep
or an impossible timestamp would otherwise break the connection), and each message's
headers are cut with :func:`bus.peek.cap_headers` before it is yielded.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import pika
import pika.exceptions

from bus.peek import cap_headers, harden_amqp_decoders
from bus.redact import redact_url
from connectors.base import BrokerConnectionError, PermanentError

__all__ = ["BROWSE_IDLE", "BROWSE_WINDOW", "Handle", "NoSuchQueue", "QueueBrowser", "RETURN_WAIT"]

harden_amqp_decoders()  # no header table may break the connection

#: Seconds without a delivery after which a browse decides the queue is exhausted.
BROWSE_IDLE = 1.0
#: Seconds to wait for browsed, unacknowledged messages to be back in their queue.
RETURN_WAIT = 60.0
#: Unacknowledged messages per browsing channel (AMQP's prefetch maximum is 65,535).
BROWSE_WINDOW = 60_000

#: A browsed message's channel and delivery tag, to acknowledge it.
Handle = tuple[Any, int]


class NoSuchQueue(PermanentError):
    """The queue does not exist (no worker declared the topology on this vhost yet)."""


class QueueBrowser:
    """Reads a queue without acknowledging (see module docstring).

    A quorum queue hands a consumer at most its prefetch (≤ 65,535) unacknowledged
    messages, so a large queue is read through several channels at once.
    """

    def __init__(self, url: str) -> None:
        self.params_url = url
        self.params = pika.URLParameters(url)
        try:
            self.conn = pika.BlockingConnection(self.params)
        except pika.exceptions.AMQPError as exc:
            raise BrokerConnectionError(f"cannot reach RabbitMQ at {redact_url(url)}: "
                                        f"{exc!r}") from exc
        self.channel = self.conn.channel()
        #: Per browsed queue: messages expected back once the browse ends.
        self._returning: dict[str, int] = {}
        self._handles: dict[tuple[int, int], str] = {}
        #: Per channel: delivered, unacked tags in delivery (ascending) order.
        self._outstanding: dict[int, list[int]] = {}
        #: Per queue: messages counted but not delivered before the browse went idle
        #: (a consumer took them meanwhile, or the broker was slow): the read is incomplete.
        self.missed: dict[str, int] = {}

    def __enter__(self) -> QueueBrowser:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.conn.is_open:
            self.conn.close()
        self._await_returns()

    def _await_returns(self) -> None:
        """Wait until the broker put the unacked messages back (a quorum queue takes a
        moment for large numbers), so that the next command sees the whole queue."""
        if not any(self._returning.values()):
            return
        deadline = time.monotonic() + RETURN_WAIT
        with pika.BlockingConnection(self.params) as conn:
            channel = conn.channel()
            for queue, expected in self._returning.items():
                while time.monotonic() < deadline:
                    count = channel.queue_declare(queue, passive=True).method.message_count
                    if count >= expected:
                        break
                    time.sleep(0.1)

    def count(self, queue: str) -> int:
        """Messages ready in ``queue``.

        Raises:
            NoSuchQueue: the queue does not exist.
            BrokerConnectionError: the connection broke.
        """
        try:
            return int(self.channel.queue_declare(queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self.channel = self.conn.channel()
            if exc.reply_code == 404:
                raise NoSuchQueue(f"no queue {queue!r} on {redact_url(self.params_url)}: it "
                                  "is created when a worker starts (syncbus run)") from exc
            raise self._lost(queue, exc) from exc
        except pika.exceptions.AMQPError as exc:
            raise self._lost(queue, exc) from exc

    def browse(self, queue: str) -> Iterator[tuple[Handle, pika.BasicProperties, bytes]]:
        """Every message of ``queue`` once, unacknowledged: (handle for ack, properties, body).

        The properties' headers are capped (:func:`bus.peek.cap_headers`).

        Raises:
            NoSuchQueue: the queue does not exist.
            BrokerConnectionError: the connection broke while browsing.
        """
        expected = self.count(queue)
        if not expected:
            return
        self._returning[queue] = expected
        inbox: deque[tuple[Handle, pika.BasicProperties, bytes]] = deque()

        def received(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            props.headers = cap_headers(props.headers)
            inbox.append(((ch, method.delivery_tag), props, body))

        try:
            channels = [self.conn.channel() for _ in range(-(-expected // BROWSE_WINDOW))]
            for channel in channels:
                channel.basic_qos(prefetch_count=BROWSE_WINDOW)
                channel.basic_consume(queue, received)
        except pika.exceptions.AMQPError as exc:
            raise self._lost(queue, exc) from exc
        seen, idle_since = 0, time.monotonic()
        while seen < expected and time.monotonic() - idle_since < BROWSE_IDLE:
            if not inbox:
                try:
                    self.conn.process_data_events(time_limit=0.1)
                except pika.exceptions.AMQPError as exc:
                    raise self._lost(queue, exc) from exc
                continue
            seen += 1
            item = inbox.popleft()
            channel, tag = item[0]
            self._handles[id(channel), tag] = queue
            self._outstanding.setdefault(id(channel), []).append(tag)
            yield item
            idle_since = time.monotonic()  # the caller's time is not idle time
        if seen < expected:
            self.missed[queue] = self.missed.get(queue, 0) + expected - seen
        # The channels stay open so the caller can still ack; closing the browser returns
        # whatever was not acked to the queue.

    def _lost(self, queue: str, exc: BaseException) -> BrokerConnectionError:
        return BrokerConnectionError(f"lost the connection to {redact_url(self.params_url)} "
                                     f"while reading {queue}: {exc!r}")

    def ack_all(self, handles: Sequence[Handle]) -> None:
        """Acknowledge (remove) browsed messages; one frame per channel when possible."""
        by_channel: dict[int, tuple[Any, list[int]]] = {}
        for channel, tag in handles:
            by_channel.setdefault(id(channel), (channel, []))[1].append(tag)
        for key, (channel, tags) in by_channel.items():
            tags.sort()
            outstanding = self._outstanding.get(key, [])
            if bisect.bisect_right(outstanding, tags[-1]) == len(tags):
                # Nothing else is held below the last tag: one multiple-ack removes them all.
                channel.basic_ack(tags[-1], multiple=True)
                self._outstanding[key] = outstanding[len(tags):]
            else:
                for tag in tags:
                    channel.basic_ack(tag)
                acked = set(tags)
                self._outstanding[key] = [t for t in outstanding if t not in acked]
            for tag in tags:
                queue = self._handles.pop((key, tag), None)
                if queue is not None:
                    self._returning[queue] -= 1

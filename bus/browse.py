"""Reading a RabbitMQ queue without consuming it: the operator's view of a queue.

Browsing consumes messages without acknowledging them; they return to the queue,
in order, when the browser closes. A quorum queue hands one consumer at most its
prefetch (≤ 65,535; with prefetch 0 only 2,000) unacknowledged messages, so a large
queue is read through several channels at once. Returning many messages takes a
quorum queue a moment, so closing the browser waits until they are back: the next
command then sees the whole queue.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import pika
import pika.exceptions

from bus.redact import redact_url
from connectors.base import BrokerConnectionError

__all__ = ["BROWSE_IDLE", "BROWSE_WINDOW", "Handle", "QueueBrowser", "RETURN_WAIT"]

#: Seconds without a delivery after which a browse decides the queue is exhausted.
BROWSE_IDLE = 1.0
#: Seconds to wait for browsed, unacknowledged messages to be back in their queue.
RETURN_WAIT = 60.0
#: Unacknowledged messages per browsing channel (AMQP's prefetch maximum is 65,535).
BROWSE_WINDOW = 60_000

#: A browsed message's channel and delivery tag, to acknowledge it.
Handle = tuple[Any, int]


class QueueBrowser:
    """Reads a queue without acknowledging (see module docstring).

    A quorum queue hands a consumer at most its prefetch (≤ 65,535) unacknowledged
    messages, so a large queue is read through several channels at once.
    """

    def __init__(self, url: str) -> None:
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
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def browse(self, queue: str) -> Iterator[tuple[Handle, pika.BasicProperties, bytes]]:
        """Every message of ``queue`` once, unacknowledged: (handle for ack, properties, body)."""
        expected = self.count(queue)
        if not expected:
            return
        self._returning[queue] = expected
        inbox: deque[tuple[Handle, pika.BasicProperties, bytes]] = deque()
        channels = [self.conn.channel() for _ in range(-(-expected // BROWSE_WINDOW))]
        for channel in channels:
            channel.basic_qos(prefetch_count=BROWSE_WINDOW)
            channel.basic_consume(queue, lambda ch, m, p, b: inbox.append(((ch, m.delivery_tag), p, b)))
        seen, idle_since = 0, time.monotonic()
        while seen < expected and time.monotonic() - idle_since < BROWSE_IDLE:
            if not inbox:
                self.conn.process_data_events(time_limit=0.1)
                continue
            seen += 1
            item = inbox.popleft()
            channel, tag = item[0]
            self._handles[id(channel), tag] = queue
            self._outstanding.setdefault(id(channel), []).append(tag)
            yield item
            idle_since = time.monotonic()  # the caller's time is not idle time
        # The channels stay open so the caller can still ack; closing the browser returns
        # whatever was not acked to the queue.

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

"""Raw RabbitMQ ceiling: how fast can *plain pika* push durable messages through a quorum queue?

This is the yardstick for the bus's own throughput: whatever syncbus adds
(serialisation, outbox, idempotency, acks) can only be slower than this.

Method (one connection, one channel, pika ``SelectConnection``):

1. declare a fresh durable quorum queue with a unique name;
2. publish ``count`` persistent messages of ``size`` bytes through the default
   exchange with publisher confirms *pipelined*: up to ``window`` messages are
   unconfirmed at any time, and the window is refilled as (possibly multiple)
   acks arrive;
3. when every message is confirmed, consume them all with ``prefetch`` and acknowledge
   in batches (``basic_ack(multiple=True)`` every ``ack_every`` messages); the
   consume phase ends when a passive declare (sent after the last ack) reports the
   queue empty;
4. delete the queue (also on failure).

Reported: publish msg/s, consume msg/s and the combined "publish then consume"
rate ``count / (publish_seconds + consume_seconds)``.

Usage::

    .venv/bin/python -m tests.bench.raw_ceiling --count 100000 --size 600
    .venv/bin/python tests/bench/raw_ceiling.py --amqp-url amqp://guest:guest@127.0.0.1:5672/%2F
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from typing import Any

import pika
import pika.exceptions
from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

__all__ = ["measure_raw_ceiling", "main"]


class _Run:
    """State machine driven by pika's ``SelectConnection`` callbacks."""

    def __init__(
        self, url: str, count: int, size: int, window: int, prefetch: int, ack_every: int,
        timeout: float,
    ) -> None:
        self.url = url
        self.count = count
        self.window = window
        self.prefetch = prefetch
        self.ack_every = ack_every
        self.timeout = timeout
        self.queue = f"sbtest.bench.raw-ceiling.{secrets.token_hex(4)}"
        self.body = os.urandom(size)
        self.props = BasicProperties(delivery_mode=2, content_type="application/octet-stream")
        self.connection: pika.SelectConnection | None = None
        self.channel: Channel | None = None
        self.error: BaseException | str | None = None
        self.declared = False
        # publish side
        self.published = 0
        self.low = 1  # lowest delivery tag not yet confirmed
        self.acked_above_low: set[int] = set()
        self.t_publish_start = 0.0
        self.t_publish_end = 0.0
        # consume side
        self.received = 0
        self.acked = 0
        self.consumer_tag: str | None = None
        self.t_consume_start = 0.0
        self.t_consume_end = 0.0
        self.left_in_queue: int | None = None

    # ------------------------------------------------------------- connection

    def run(self) -> None:
        self.connection = pika.SelectConnection(
            pika.URLParameters(self.url),
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
        )
        self.connection.ioloop.call_later(self.timeout, self._on_timeout)
        self.connection.ioloop.start()

    def _fail(self, error: BaseException | str) -> None:
        if self.error is None:
            self.error = error
        if self.connection is not None and self.connection.is_open:
            self.connection.close()

    def _on_timeout(self) -> None:
        self._fail(
            f"timed out after {self.timeout}s (published={self.published}, "
            f"confirmed={self.confirmed}, received={self.received})"
        )

    def _on_connection_open(self, connection: pika.BaseConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, _connection: pika.BaseConnection, error: BaseException) -> None:
        self.error = error
        assert self.connection is not None
        self.connection.ioloop.stop()

    def _on_connection_closed(self, _connection: pika.BaseConnection, reason: BaseException) -> None:
        if self.left_in_queue is None and self.error is None:
            self.error = reason
        assert self.connection is not None
        self.connection.ioloop.stop()

    def _on_channel_open(self, channel: Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_channel_closed(self, _channel: Channel, reason: BaseException) -> None:
        if self.left_in_queue is None:
            self._fail(reason)

    # ---------------------------------------------------------------- publish

    def _on_confirm_mode(self, _frame: Method) -> None:
        assert self.channel is not None
        self.channel.queue_declare(
            self.queue, durable=True, arguments={"x-queue-type": "quorum"},
            callback=self._on_declared,
        )

    def _on_declared(self, _frame: Method) -> None:
        self.declared = True
        self.t_publish_start = time.perf_counter()
        self._publish_more()

    @property
    def confirmed(self) -> int:
        return self.low - 1 + len(self.acked_above_low)

    def _publish_more(self) -> None:
        assert self.channel is not None
        limit = min(self.count, self.confirmed + self.window)
        publish = self.channel.basic_publish
        while self.published < limit:
            publish("", self.queue, self.body, self.props)
            self.published += 1

    def _on_confirm(self, frame: Method) -> None:
        method = frame.method
        if isinstance(method, Basic.Nack):
            self._fail(f"broker nacked delivery tag {method.delivery_tag}")
            return
        tag = method.delivery_tag
        if method.multiple:
            if tag >= self.low:
                self.low = tag + 1
                self.acked_above_low = {t for t in self.acked_above_low if t > tag}
        elif tag >= self.low:
            self.acked_above_low.add(tag)
        while self.low in self.acked_above_low:
            self.acked_above_low.discard(self.low)
            self.low += 1
        if self.confirmed >= self.count:
            self.t_publish_end = time.perf_counter()
            self._start_consuming()
        else:
            self._publish_more()

    # ---------------------------------------------------------------- consume

    def _start_consuming(self) -> None:
        assert self.channel is not None
        self.t_consume_start = time.perf_counter()
        self.channel.basic_qos(prefetch_count=self.prefetch, callback=self._on_qos)

    def _on_qos(self, _frame: Method) -> None:
        assert self.channel is not None
        self.consumer_tag = self.channel.basic_consume(self.queue, self._on_message)

    def _on_message(
        self, channel: Channel, method: Basic.Deliver, _props: BasicProperties, _body: bytes
    ) -> None:
        self.received += 1
        if self.received - self.acked >= self.ack_every or self.received == self.count:
            channel.basic_ack(method.delivery_tag, multiple=True)
            self.acked = self.received
        if self.received == self.count:
            assert self.consumer_tag is not None
            channel.basic_cancel(self.consumer_tag, callback=self._on_cancelled)

    def _on_cancelled(self, _frame: Method) -> None:
        assert self.channel is not None
        # Processed after the final ack on this channel: its answer means "all settled".
        self.channel.queue_declare(self.queue, passive=True, callback=self._on_drained)

    def _on_drained(self, frame: Method) -> None:
        self.t_consume_end = time.perf_counter()
        self.left_in_queue = frame.method.message_count
        assert self.channel is not None
        self.channel.queue_delete(self.queue, callback=self._on_deleted)

    def _on_deleted(self, _frame: Method) -> None:
        self.declared = False
        assert self.connection is not None
        self.connection.close()


def _delete_queue_quietly(url: str, queue: str) -> None:
    """Best-effort cleanup after a failed run."""
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError:
        return
    try:
        connection.channel().queue_delete(queue)
    except pika.exceptions.AMQPError:
        pass
    finally:
        if connection.is_open:
            connection.close()


def measure_raw_ceiling(
    amqp_url: str,
    count: int,
    size: int,
    *,
    window: int = 2000,
    prefetch: int = 1000,
    ack_every: int | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Measure the raw publish/consume ceiling of the broker at ``amqp_url``.

    Args:
        amqp_url: broker (and vhost) to use; a unique quorum queue is created there
            and deleted afterwards.
        count: number of messages.
        size: body size in bytes.
        window: maximum number of unconfirmed published messages.
        prefetch: consumer prefetch (``basic.qos``).
        ack_every: acknowledge (``multiple=True``) after this many deliveries;
            defaults to ``prefetch // 4``. Must be at most ``prefetch``.
        timeout: give up after this many seconds in total.

    Returns:
        A dict with ``queue`` (the deleted queue's name), ``count``, ``size``, ``window``, ``prefetch``, ``ack_every``,
        ``publish_seconds``, ``consume_seconds``, ``publish_rate``,
        ``consume_rate`` and ``combined_rate`` (all rates in msg/s).

    Raises:
        RuntimeError: the run failed (connection lost, nack, timeout, leftovers).
    """
    if count < 1 or size < 0 or window < 1 or prefetch < 1:
        raise ValueError("count, window and prefetch must be positive, size non-negative")
    ack_every = max(1, prefetch // 4) if ack_every is None else ack_every
    if not 1 <= ack_every <= prefetch:
        raise ValueError("ack_every must be between 1 and prefetch (or consuming stalls)")

    run = _Run(amqp_url, count, size, window, prefetch, ack_every, timeout)
    try:
        run.run()
    finally:
        if run.declared:
            _delete_queue_quietly(amqp_url, run.queue)
    if run.left_in_queue is None:
        raise RuntimeError(f"raw ceiling run failed: {run.error!r}")
    if run.left_in_queue != 0 or run.received != count:
        raise RuntimeError(
            f"raw ceiling run inconsistent: received {run.received}/{count}, "
            f"{run.left_in_queue} left in queue"
        )
    publish_seconds = run.t_publish_end - run.t_publish_start
    consume_seconds = run.t_consume_end - run.t_consume_start
    return {
        "queue": run.queue,
        "count": count,
        "size": size,
        "window": window,
        "prefetch": prefetch,
        "ack_every": ack_every,
        "publish_seconds": publish_seconds,
        "consume_seconds": consume_seconds,
        "publish_rate": count / publish_seconds,
        "consume_rate": count / consume_seconds,
        "combined_rate": count / (publish_seconds + consume_seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure the raw RabbitMQ ceiling (pika, durable quorum queue, "
        "persistent messages, pipelined confirms, prefetch + batched acks)."
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("SYNCBUS_TEST_AMQP_URL", DEFAULT_URL),
        help="broker URL (default: $SYNCBUS_TEST_AMQP_URL or %(default)s)",
    )
    parser.add_argument("--count", type=int, default=100_000, help="messages (default %(default)s)")
    parser.add_argument("--size", type=int, default=600, help="body bytes (default %(default)s)")
    parser.add_argument("--window", type=int, default=2000,
                        help="max unconfirmed publishes (default %(default)s)")
    parser.add_argument("--prefetch", type=int, default=1000,
                        help="consumer prefetch (default %(default)s)")
    parser.add_argument("--ack-every", type=int, default=None,
                        help="batched ack interval (default prefetch/4)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args(argv)

    try:
        result = measure_raw_ceiling(
            args.amqp_url, args.count, args.size, window=args.window, prefetch=args.prefetch,
            ack_every=args.ack_every, timeout=args.timeout,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"raw ceiling: {result['count']} x {result['size']} B, durable quorum queue, "
            f"confirm window {result['window']}, prefetch {result['prefetch']}, "
            f"ack every {result['ack_every']}\n"
            f"  publish : {result['publish_rate']:10.0f} msg/s  ({result['publish_seconds']:.2f} s)\n"
            f"  consume : {result['consume_rate']:10.0f} msg/s  ({result['consume_seconds']:.2f} s)\n"
            f"  combined: {result['combined_rate']:10.0f} msg/s  (publish then consume)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

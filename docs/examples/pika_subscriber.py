#!/usr/bin/env python3
"""A syncbus change-event subscriber written with nothing but pika.

It relies only on the published contract (docs/events.md), never on syncbus code:
the topic exchange ``syncbus.changes``, routing keys ``<connection>.<entity>.<op>``,
CloudEvents JSON bodies, and the history stream ``syncbus.history``.

Live, through a queue of its own::

    python pika_subscriber.py 'crm.customers.*'                     # a temporary queue
    python pika_subscriber.py --queue billing.customers 'crm.customers.*' '*.*.delete'

``--queue`` makes the queue durable (a quorum queue): events wait in it while the
subscriber is down. Without it the queue disappears with the subscriber.

Replaying the history stream (``--from first``, ``last``, ``next``, an offset, or an
ISO 8601 time), then following new events::

    python pika_subscriber.py --from first --limit 100 '#'
    python pika_subscriber.py --from 2026-03-01T08:00:00+00:00 'crm.#'

Every event is printed as one JSON line:
``{"offset", "routing_key", "id", "op", "entity", "key", "version", "changed"}``.
Requires ``pip install pika``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import OrderedDict
from datetime import datetime
from typing import Any

import pika
import pika.exceptions

EXCHANGE = "syncbus.changes"
HISTORY = "syncbus.history"
#: Event ids remembered for deduplication (delivery is at least once).
SEEN_MAX = 100_000


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)  # streams require a prefetch limit
    if args.from_ is None:
        queue, consumer_args = _own_queue(channel, args.queue, args.patterns), None
    else:  # the stream holds every event: the patterns are applied below
        queue, consumer_args = HISTORY, {"x-stream-offset": _offset(args.from_)}
    print(f"listening on {queue}", file=sys.stderr, flush=True)

    seen: OrderedDict[str, None] = OrderedDict()
    received = 0
    for method, properties, body in channel.consume(
            queue, arguments=consumer_args, inactivity_timeout=args.idle):
        if method is None:  # nothing arrived for --idle seconds
            break
        if any(_matches(p, method.routing_key) for p in args.patterns):
            received += _handle(method, properties, body, seen)
        channel.basic_ack(method.delivery_tag)  # ack only after the event was handled
        if args.limit and received >= args.limit:
            break
    if queue != HISTORY:
        channel.cancel()  # returns unacked messages to the queue
        connection.close()
        return 0
    # Closing cancels the consumer, and pika hands back (nacks) the deliveries it had
    # buffered beyond --limit; a stream refuses nacks and closes the connection. The
    # events we handled were acked already: nothing is lost, the stream keeps them.
    with contextlib.suppress(pika.exceptions.ConnectionClosedByBroker):
        connection.close()
    return 0


def _handle(method: Any, properties: Any, body: bytes, seen: OrderedDict[str, None]) -> int:
    """Print one event; returns 1 when it was new, 0 for a duplicate."""
    try:
        event = json.loads(body)
        major = str(event["dataschema"]).rsplit("/", 1)[1].split(".")[0]
    except (ValueError, KeyError, IndexError, TypeError):
        major = None
    if major != "1":  # a later major version may break this code: do not guess
        print(f"skipped, not a version 1 change event: {body[:200]!r}", file=sys.stderr)
        return 0
    if event["id"] in seen:  # the same change delivered twice
        return 0
    seen[event["id"]] = None
    if len(seen) > SEEN_MAX:
        seen.popitem(last=False)
    data = event["data"]
    offset = (properties.headers or {}).get("x-stream-offset")
    print(json.dumps({
        "offset": offset, "routing_key": method.routing_key, "id": event["id"],
        "op": data["op"], "entity": data["entity"], "key": data["key"],
        "version": data["version"], "changed": data["changed"],
    }), flush=True)
    return 1


def _own_queue(channel: Any, name: str | None, patterns: list[str]) -> str:
    """Declare the subscriber's queue and bind it with ``patterns``."""
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    if name:
        result = channel.queue_declare(name, durable=True,
                                       arguments={"x-queue-type": "quorum"})
    else:
        result = channel.queue_declare("", exclusive=True, auto_delete=True)
    queue = result.method.queue
    for pattern in patterns:
        channel.queue_bind(queue, EXCHANGE, routing_key=pattern)
    return str(queue)


def _offset(text: str) -> Any:
    """``x-stream-offset``: first, last, next, an offset, or a time (AMQP timestamp)."""
    if text in ("first", "last", "next"):
        return text
    if text.isdigit():
        return int(text)
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone()


def _matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])
    return match(pattern.split("."), routing_key.split("."))


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", default=["#"],
                        help="routing-key patterns <connection>.<entity>.<op> (default #)")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--queue", help="a durable queue of this name (default: temporary)")
    parser.add_argument("--from", dest="from_",
                        help="replay the history stream: first, last, next, OFFSET or TIME")
    parser.add_argument("--limit", type=int, default=0, help="exit after N events")
    parser.add_argument("--idle", type=float, default=None,
                        help="exit after N seconds without a message")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())

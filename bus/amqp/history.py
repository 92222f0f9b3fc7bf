"""Replaying change events from the history stream ``syncbus.history``.

Every change event published to ``syncbus.changes`` is also appended to the
RabbitMQ stream ``syncbus.history`` (declared with the topology; retention by age
and size, see ``docs/events.md``). A stream is read without consuming it: any
number of readers can start wherever they like, as often as they like.

Where a read starts (:data:`Start`)::

    "first"               the oldest event still kept
    "last"                the last chunk written (the newest few events), then new ones
    "next"                only events published from now on
    1234                  the event at stream offset 1234 (offsets grow by one per event)
    datetime(...)         events the broker stored at or after that time (whole seconds;
                          a naive datetime is local time)
    timedelta(hours=1)    the same, one hour ago by the broker's clock

A read yields :class:`~bus.amqp.events.EventMessage` objects whose ``offset`` a reader
keeps to continue later at ``offset + 1`` (AMQP 0.9.1 has no server-side offset
tracking). The stream holds every event, so a ``pattern`` is applied here, on the
client. After the history, the read follows new events until it is stopped.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Literal

from amqp.exceptions import NotFound
from kombu import Queue

from bus.amqp.events import EventMessage, amqp_url, connect, drain, topic_matches
from bus.amqp.topology import HISTORY_STREAM
from bus.core.redact import redact_url
from connectors.base import BrokerConnectionError, PermanentError

__all__ = [
    "HistoryUnavailable",
    "Start",
    "parse_start",
    "read_history",
    "stream_offset",
]

#: Where a history read starts: see the module docstring.
Start = Literal["first", "last", "next"] | int | datetime | timedelta

_AGO_RE = re.compile(r"^(\d+)\s*(s|m|h|d)$")
_AGO_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class HistoryUnavailable(PermanentError):
    """The broker has no history stream (no worker declared the topology yet)."""


def parse_start(text: str) -> Start:
    """Parse a ``--from`` value.

    Accepts ``first``, ``last``, ``next``, an offset (``1234``), a time ago (``90s``,
    ``15m``, ``2h``, ``7d``) or an ISO 8601 time (``2026-03-01T08:00``; local time
    unless it has an offset or ``Z``).

    Raises:
        ValueError: ``text`` is none of these.
    """
    value = text.strip()
    if value in ("first", "last", "next"):
        return value  # type: ignore[return-value]  # narrowed by the test above
    if value.isdigit():
        return int(value)
    if match := _AGO_RE.match(value):
        return timedelta(seconds=int(match.group(1)) * _AGO_UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not first, last, next, an offset (1234), a time ago (15m, 2h, 7d) "
            "or an ISO 8601 time (2026-03-01T08:00:00Z)") from None
    return when


def stream_offset(start: Start) -> str | int | datetime:
    """The ``x-stream-offset`` consumer argument for ``start``.

    Raises:
        ValueError: a negative offset or duration.
    """
    if isinstance(start, bool):
        raise ValueError("a stream offset is not a bool")
    if isinstance(start, int):
        if start < 0:
            raise ValueError("stream offsets start at 0")
        return start
    if isinstance(start, timedelta):
        seconds = int(start.total_seconds())
        if seconds < 0:
            raise ValueError("a time ago cannot be negative")
        return f"{max(seconds, 1)}s"  # an interval: the broker counts back from its clock
    if isinstance(start, datetime):
        # AMQP timestamps are whole UTC seconds; a naive time is the reader's local time.
        return start if start.tzinfo is not None else start.astimezone()
    return start


def read_history(
    *,
    start: Start = "first",
    pattern: str = "#",
    url: str | None = None,
    stop: threading.Event | None = None,
    idle_timeout: float | None = None,
    prefetch: int = 500,
    on_ready: Callable[[], object] | None = None,
) -> Iterator[EventMessage]:
    """Yield change events from the history stream, then new ones as they arrive.

    Args:
        start: Where to begin (see :data:`Start`).
        pattern: Topic pattern the routing keys must match (``#``: every event).
        url: AMQP URL (default: ``$SYNCBUS_AMQP_URL``, then the local broker).
        stop: Ends the iteration when set.
        idle_timeout: Ends the iteration after this many seconds without a message,
            e.g. to stop once the history is read.
        prefetch: Messages the broker may push ahead (streams require a limit).
        on_ready: Called once the stream is being read.

    Yields:
        Events in stream order, each with its ``offset``.

    Raises:
        HistoryUnavailable: the broker has no ``syncbus.history`` stream.
        BrokerConnectionError: the broker cannot be reached or the connection dropped
            (start again at the last offset + 1).
        ValueError: ``start`` is invalid.
    """
    url = amqp_url(url)
    queue = Queue(HISTORY_STREAM, no_declare=True,
                  consumer_arguments={"x-stream-offset": stream_offset(start)})
    with connect(url) as conn:
        try:
            for message in drain(conn, queue, stop=stop, idle_timeout=idle_timeout,
                                 prefetch=prefetch, on_ready=on_ready):
                got = EventMessage.of(message)
                if topic_matches(pattern, got.routing_key):
                    yield got
        except NotFound as exc:
            raise HistoryUnavailable(
                f"no history stream {HISTORY_STREAM!r} at {redact_url(url)}: it is created "
                "with the topology when a worker starts (syncbus run)") from exc
        except conn.connection_errors as exc:
            raise BrokerConnectionError(
                f"lost the connection to {redact_url(url)}: {exc}") from exc

"""``syncbus tail``: watch change events, live or from the history stream.

One line per event::

    2026-03-01 08:00:01.250  crm.customers.upsert  {"id":7}  v42  name, credit
    2026-03-01 08:00:01.251  crm.customers.delete  {"id":9}  v43  (deleted)

time (local) · routing key · key · version · changed fields (``*`` when the source
does not tell which). History reads start each line with the stream offset
(``#1234``), so a later read can continue with ``--from 1235``. With ``as_json``
every event is printed as its raw CloudEvents JSON, one per line.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TextIO

from rich.console import Console
from rich.text import Text

from bus.events import EventMessage, watch
from bus.history import Start, read_history
from connectors.base import SchemaError

__all__ = ["format_event", "tail"]

_OP_STYLES = {"upsert": "green", "delete": "red"}


def tail(
    *,
    url: str | None = None,
    pattern: str = "#",
    start: Start | None = None,
    limit: int | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
    idle_timeout: float | None = None,
    on_ready: Callable[[], object] | None = None,
) -> int:
    """Print the events matching ``pattern`` until ``limit`` events, ``stop`` or Ctrl-C.

    Args:
        url: AMQP URL (default: ``$SYNCBUS_AMQP_URL``, then the local broker).
        pattern: Topic pattern, e.g. ``crm.customers.*`` (``#``: every event).
        start: None to watch live events (a temporary queue); else where to start
            reading the history stream (see :data:`bus.history.Start`).
        limit: Stop after printing this many events.
        as_json: Print each event's raw JSON instead of a readable line.
        out: Where to print (default: standard output).
        stop: Stops the watch when set.
        idle_timeout: Stop after this many seconds without an event.
        on_ready: Called once events are being received.

    Returns:
        How many events were printed.

    Raises:
        BrokerConnectionError: the broker cannot be reached or the connection dropped.
        HistoryUnavailable: ``start`` is given but the broker has no history stream.
        KeyboardInterrupt: Ctrl-C (the connection is closed first).
    """
    if limit is not None and limit <= 0:
        return 0
    stream = out or sys.stdout
    console = Console(file=stream, highlight=False, soft_wrap=True, emoji=False)
    events: Iterator[EventMessage]
    if start is None:
        events = watch(pattern, url=url, stop=stop, idle_timeout=idle_timeout,
                       on_ready=on_ready)
    else:
        events = read_history(start=start, pattern=pattern, url=url, stop=stop,
                              idle_timeout=idle_timeout, on_ready=on_ready)
    printed = 0
    try:
        for message in events:
            if as_json:
                stream.write(message.body.decode("utf-8", "replace").strip() + "\n")
                stream.flush()
            else:
                console.print(format_event(message))
            printed += 1
            if limit is not None and printed >= limit:
                break
    finally:
        close = getattr(events, "close", None)  # a generator: closes the connection now
        if close is not None:
            close()
    return printed


def format_event(message: EventMessage) -> Text:
    """The readable one-line form of ``message`` (see the module docstring)."""
    line = Text()
    if message.offset is not None:
        line.append(f"#{message.offset}  ", style="dim")
    try:
        event = message.event
    except SchemaError as exc:
        line.append(f"{message.routing_key}  ", style="bold")
        line.append(f"<{exc.message}>", style="yellow")
        return line
    data = event.data
    line.append(f"{_local_time(event.time)}  ", style="cyan")
    line.append(message.routing_key, style=f"bold {_OP_STYLES.get(data.op, '')}".strip())
    line.append(f"  {event.subject}  v{data.version}  ")
    if data.op == "delete":
        line.append("(deleted)", style="red")
    elif data.changed is not None:
        line.append(", ".join(data.changed) or "(no field changed)")
    else:
        line.append("*", style="dim")
    return line


def _local_time(stamp: str) -> str:
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if when.tzinfo is not None:
        when = when.astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"

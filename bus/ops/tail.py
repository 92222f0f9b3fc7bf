"""``syncbus tail``: watch change events, live or from the history stream.

One line per event::

    2026-03-01 08:00:01.250  crm.customers.upsert  {"id":7}  v42  name, credit
    2026-03-01 08:00:01.251  crm.customers.delete  {"id":9}  v43  (deleted)

time (local) · routing key · key · version · changed fields (``*`` when the source
does not tell which). History reads start each line with the stream offset
(``#1234``), so a later read can continue with ``--from 1235``. With ``as_json``
every event is printed as its raw CloudEvents JSON, one per line.

Any message is shown, never a crash: one that is not a change event says why
(``<not a change event: …>``), one whose body cannot be read at all says so with its
size and first bytes (``unreadable (5 bytes): not JSON: …; starts with b'…'``); with
``as_json`` the latter is a JSON line ``{"unreadable": {"size", "preview", "reason"},
"routing_key", "offset", "message_id"}``. Text from the message is printed with its
control characters escaped.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TextIO

from rich.console import Console
from rich.text import Text

from bus.amqp.events import EventMessage, watch
from bus.amqp.history import Start, read_history
from bus.amqp.peek import printable, read_body
from connectors.base import SchemaError

__all__ = ["format_event", "json_line", "tail"]

#: Characters of a key or of the changed fields shown on a line.
FIELD_CHARS = 200

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
            reading the history stream (see :data:`bus.amqp.history.Start`).
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
                stream.write(json_line(message) + "\n")
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
        line.append(f"{printable(message.routing_key, FIELD_CHARS)}  ", style="bold")
        body = read_body(message.body)
        why = body.unreadable.describe() if body.unreadable else exc.message
        ident = f"{body.fields.id or message.message_id or ''}"
        line.append(printable(f"<{why}>", 2 * FIELD_CHARS), style="yellow")
        if ident and not body.unreadable:
            line.append(f"  id {printable(ident, 80)}")
        return line
    data = event.data
    line.append(f"{printable(_local_time(event.time), 40)}  ", style="cyan")
    line.append(printable(message.routing_key, FIELD_CHARS),
                style=f"bold {_OP_STYLES.get(data.op, '')}".strip())
    line.append(f"  {printable(event.subject, FIELD_CHARS)}  v{printable(data.version, 80)}  ")
    if data.op == "delete":
        line.append("(deleted)", style="red")
    elif data.changed is not None:
        line.append(printable(", ".join(data.changed), FIELD_CHARS) or "(no field changed)")
    else:
        line.append("*", style="dim")
    return line


def json_line(message: EventMessage) -> str:
    """The ``as_json`` form of ``message``: its JSON on one line, or what is unreadable."""
    body = read_body(message.body)
    if body.unreadable is None:
        # Valid JSON holds line breaks only as whitespace between tokens.
        text = message.body.decode("utf-8").strip()
        return text.replace("\r", " ").replace("\n", " ")
    return json.dumps({
        "unreadable": {"size": body.unreadable.size, "preview": body.unreadable.preview,
                       "reason": body.unreadable.reason},
        "routing_key": message.routing_key, "offset": message.offset,
        "message_id": message.message_id}, default=str)


def _local_time(stamp: str) -> str:
    try:
        when = datetime.fromisoformat(stamp)
        if when.tzinfo is not None:
            when = when.astimezone()
    except (ValueError, OverflowError, OSError):  # not ISO, or out of the local clock's range
        return stamp
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"

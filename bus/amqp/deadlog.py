"""The dead-letter log: a RabbitMQ stream holding the body of every dead letter.

Every message that leaves a link's happy path for good — dead-lettered by a
consumer, or by RabbitMQ itself when a message exceeded the delivery limit — is
appended to the stream ``syncbus.dead.log`` (bound to the ``syncbus.dead`` fanout
exchange). A stream is an append-only log read by offset: nothing is ever
consumed from it, so reading never disturbs it, several readers never compete,
and one letter is fetched by its offset without reading the others. The state
store's index (:mod:`bus.state.txindex`) says what each letter is and which
status its transaction has; this module only reads and appends.

Reading to the end is exact, never a guess: :meth:`DeadLog.read_to_end` appends a
marker (a letter of its own with the ``x-syncbus-marker`` header, confirmed by the
broker) and reads until it meets that marker. Markers are skipped by every reader.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from bus.amqp.errors import explain
from bus.amqp.headers import LETTER_HEADER, MARKER_HEADER
from bus.amqp.peek import cap_headers, harden_amqp_decoders
from bus.core.redact import redact_url
from connectors.base import BrokerConnectionError, PermanentError

__all__ = [
    "DEAD_LOG",
    "DeadLog",
    "LETTER_HEADER",
    "Letter",
    "MARKER_HEADER",
    "NoDeadLog",
    "dead_log_arguments",
]

harden_amqp_decoders()  # no header table may break the connection

#: The stream every dead letter is appended to.
DEAD_LOG = "syncbus.dead.log"
#: Unacknowledged deliveries a stream reader accepts at once.
READ_WINDOW = 2000
#: Seconds a read may go without a delivery before the broker is deemed lost.
READ_STALL = 120.0
#: A gap (in offsets) to the next wanted letter above which a fetch re-attaches there
#: instead of reading through.
JUMP_GAP = 3000
#: Average gap between wanted offsets above which a fetch attaches at each one.
SPARSE_GAP = 20
#: Letters fetched at once when fetching scattered ones (a thread and connection each).
PARALLEL_FETCHES = 16


def dead_log_arguments() -> dict[str, Any]:
    """Arguments of the dead-letter stream (no retention: bodies of live transactions
    must never age out; see docs/operations.md)."""
    return {"x-queue-type": "stream"}


class NoDeadLog(PermanentError):
    """The dead-letter log does not exist (no worker declared the topology yet)."""


@dataclass(slots=True)
class Letter:
    """One message of the log: its offset, properties (headers capped) and body."""

    offset: int
    props: pika.BasicProperties
    body: bytes
    #: The routing key it was dead-lettered with (the original one).
    routing_key: str = ""

    @property
    def headers(self) -> dict[str, Any]:
        return self.props.headers or {}

    @property
    def letter_id(self) -> str:
        """The letter's id: the consumer's header, or ``o:<offset>`` for a letter
        RabbitMQ dead-lettered itself."""
        value = self.headers.get(LETTER_HEADER)
        return value if isinstance(value, str) and value else f"o:{self.offset}"

    @property
    def is_marker(self) -> bool:
        return MARKER_HEADER in self.headers


class DeadLog:
    """Reads the dead-letter log (and appends markers); one AMQP connection.

    Args:
        url: AMQP URL of the vhost.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.conn = pika.BlockingConnection(pika.URLParameters(url))
        except pika.exceptions.AMQPError as exc:
            raise explain(exc, url) or BrokerConnectionError(
                f"cannot reach RabbitMQ at {redact_url(url)}: {exc!r}") from exc
        self._channel: Any = None
        #: The offset of the marker the last :meth:`read_to_end` stopped at.
        self.end_offset: int | None = None

    def __enter__(self) -> DeadLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.conn.is_open:
                self.conn.close()

    # -- reading -----------------------------------------------------------------------

    def read_to_end(self, start: int | None) -> Iterator[Letter]:
        """Every letter from offset ``start`` (None: the first kept) to the end of the
        log as it was when called; markers are not yielded.

        Raises:
            NoDeadLog: the stream does not exist.
            BrokerConnectionError: the connection broke, or the log stopped delivering.
        """
        marker = self._append_marker()
        for letter in self._read(start):
            if letter.headers.get(MARKER_HEADER) == marker:
                self.end_offset = letter.offset
                return
            if not letter.is_marker:
                yield letter

    def fetch(self, offsets: Iterable[int]) -> Iterator[Letter]:
        """The letters at ``offsets`` (ascending), each once; offsets the log no longer
        holds (or never held) are left out. Reads through small gaps, re-attaches at
        the next wanted offset across large ones.

        Raises:
            NoDeadLog: the stream does not exist.
            BrokerConnectionError: the connection broke, or the log stopped delivering.
        """
        wanted = sorted(o for o in set(offsets) if o >= 0)
        if len(wanted) > 1 and (wanted[-1] - wanted[0]) / len(wanted) > SPARSE_GAP:
            yield from self._fetch_sparse(wanted)
            return
        marker = self._append_marker()  # reading up to it is reading to the end
        i = 0
        while i < len(wanted):
            for letter in self._read(wanted[i]):
                if letter.headers.get(MARKER_HEADER) == marker:
                    return  # the rest is not in the log (never was, or not any more)
                while i < len(wanted) and wanted[i] < letter.offset:
                    i += 1  # no longer held (retention): left out
                if i < len(wanted) and wanted[i] == letter.offset:
                    i += 1
                    yield letter
                if i >= len(wanted) or wanted[i] - letter.offset > JUMP_GAP:
                    break

    def _fetch_sparse(self, wanted: list[int]) -> Iterator[Letter]:
        """Fetch scattered letters one by one, :data:`PARALLEL_FETCHES` at a time, in
        ascending order: each is read on a channel of its own, attached at its offset
        and dropped after the first delivery. pika's blocking client waits for each
        channel's open and consume, so the fetches run in threads with a connection
        each (one connection must not be shared between threads). The offsets come
        from the index, so each was in the log; one retention removed is answered with
        a later letter and left out."""
        local = threading.local()
        opened: list[DeadLog] = []
        lock = threading.Lock()

        def fetch_one(offset: int) -> Letter | None:
            reader: DeadLog | None = getattr(local, "reader", None)
            if reader is None:
                reader = local.reader = DeadLog(self.url)
                with lock:
                    opened.append(reader)
            return reader._first_at(offset)  # noqa: SLF001 - its own kind

        try:
            with ThreadPoolExecutor(PARALLEL_FETCHES, "syncbus-deadlog") as pool:
                pending: deque[Future[Letter | None]] = deque()
                todo = iter(wanted)
                for offset in todo:
                    pending.append(pool.submit(fetch_one, offset))
                    if len(pending) >= PARALLEL_FETCHES * 4:
                        break
                while pending:
                    letter = pending.popleft().result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.append(pool.submit(fetch_one, nxt))
                    if letter is not None:
                        yield letter
        finally:
            for reader in opened:
                reader.close()

    def _first_at(self, offset: int) -> Letter | None:
        """The letter at ``offset`` (None: the log answered with a later one)."""
        channel = self._open_channel(prefetch=1)
        got: list[Letter] = []

        def received(_ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            if not got:
                props.headers = cap_headers(props.headers)
                got.append(Letter(offset, props, body, method.routing_key
                                  if isinstance(method.routing_key, str) else ""))
                self._drop(channel)  # at once: the log sends the rest of its chunk

        try:
            self._consume(channel, offset, received)
            since = time.monotonic()
            while not got:
                if time.monotonic() - since > READ_STALL:
                    raise self._stalled()
                self._events()
        finally:
            self._drop(channel)
        letter = got[0]
        return letter if letter.headers.get("x-stream-offset") == offset else None

    def _read(self, start: int | str | None) -> Iterator[Letter]:
        channel = self._open_channel()
        inbox: deque[Letter] = deque()

        first = start if isinstance(start, int) else -1

        def received(_ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            if method.delivery_tag % 500 == 0:
                channel.basic_ack(method.delivery_tag, multiple=True)
            props.headers = cap_headers(props.headers)
            offset = props.headers.get("x-stream-offset")
            if isinstance(offset, int) and offset < first:
                return  # the broker starts at the chunk holding ``start``: skip its head
            inbox.append(Letter(int(offset) if isinstance(offset, int) else -1, props, body,
                                method.routing_key if isinstance(method.routing_key, str) else ""))

        self._consume(channel, "first" if start is None else start, received)
        stalled_since = time.monotonic()
        try:
            while True:
                if not inbox:
                    if time.monotonic() - stalled_since > READ_STALL:
                        raise self._stalled()
                    self._events()
                    continue
                stalled_since = time.monotonic()
                yield inbox.popleft()
        finally:
            self._drop(channel)  # with whatever was still in flight

    # -- appending ---------------------------------------------------------------------

    def _append_marker(self) -> str:
        marker = uuid.uuid4().hex
        channel = self.conn.channel()
        try:
            channel.confirm_delivery()
            channel.basic_publish("", DEAD_LOG, b"", pika.BasicProperties(
                headers={MARKER_HEADER: marker}, delivery_mode=2), mandatory=True)
        except pika.exceptions.UnroutableError as exc:
            raise NoDeadLog(self._missing()) from exc
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise self._closed(exc) from exc
        except pika.exceptions.AMQPError as exc:
            raise self._lost(exc) from exc
        finally:
            with contextlib.suppress(Exception):
                channel.close()
        return marker

    # -- internals ---------------------------------------------------------------------

    def _stalled(self) -> BrokerConnectionError:
        return BrokerConnectionError(f"the dead-letter log {DEAD_LOG} on {redact_url(self.url)} "
                                     f"delivered nothing for {READ_STALL:g}s")

    def _open_channel(self, prefetch: int = READ_WINDOW) -> Any:
        try:
            channel = self.conn.channel()
            channel.basic_qos(prefetch_count=prefetch)
        except pika.exceptions.AMQPError as exc:
            raise self._lost(exc) from exc
        self._channel = channel
        return channel

    def _consume(self, channel: Any, offset: int | str, callback: Any) -> None:
        try:
            channel.basic_consume(DEAD_LOG, callback, arguments={"x-stream-offset": offset})
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            raise self._closed(exc) from exc
        except pika.exceptions.AMQPError as exc:
            raise self._lost(exc) from exc

    def _drop(self, channel: Any) -> None:
        """Close a reading channel without first cancelling its consumer the way
        pika's ``BlockingChannel.close`` does: that rejects every delivery still in
        flight, and a stream answers a reject by closing the whole connection
        (``NOT_IMPLEMENTED``). A stream delivers a chunk at a time whatever the
        prefetch, so deliveries are in flight after any early stop. The channel's
        own close leaves it closing at once, so later deliveries are ignored."""
        if channel is self._channel:
            self._channel = None
        if not channel.is_open:
            return
        with contextlib.suppress(Exception):
            channel._impl.close()  # noqa: SLF001 - the one way that rejects nothing

    def _events(self) -> None:
        try:
            self.conn.process_data_events(time_limit=0.05)
        except pika.exceptions.AMQPError as exc:
            raise self._lost(exc) from exc

    def _missing(self) -> str:
        return (f"no dead-letter log {DEAD_LOG} on {redact_url(self.url)}: it is created when "
                "a worker starts (syncbus run)")

    def _closed(self, exc: pika.exceptions.ChannelClosedByBroker) -> BusErrorLike:
        if exc.reply_code == 404:
            return NoDeadLog(self._missing())
        return self._lost(exc)

    def _lost(self, exc: BaseException) -> BrokerConnectionError:
        return BrokerConnectionError(f"lost the connection to {redact_url(self.url)} while "
                                     f"reading {DEAD_LOG}: {exc!r}")


BusErrorLike = NoDeadLog | BrokerConnectionError

"""The broker seam for bookkeeping: connect, count queues, declare, delete.

Everything above :mod:`bus.amqp` that needs RabbitMQ for something other than
publishing or consuming — the worker counting what is left, ``status`` and
``preview`` reading queue depths, the demo clearing its queues, ``validate``
checking permissions — goes through :class:`BrokerSession`. It is the one place
those floors open a connection, and what a RabbitMQ client raises leaves it
translated into the :mod:`connectors.base` tree: :class:`BrokerUnavailable` (one
line an operator can act on, :mod:`bus.amqp.errors`) when RabbitMQ cannot be used,
:class:`BrokerConnectionError` for any other broker failure. A queue that does not
exist is no error: its depth is None.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import amqp
from amqp.exceptions import NotFound
from kombu import Connection
from kombu.exceptions import KombuError

from bus.amqp.errors import BrokerUnavailable, broker_errors, explain
from bus.amqp.topology import CHANGES_EXCHANGE, LinkQueues, declare_topology
from bus.core.redact import redact_url
from connectors.base import BrokerConnectionError

if TYPE_CHECKING:
    from schemas.config import SyncConfig

__all__ = ["BrokerSession", "PermissionCheck", "check_permissions", "queue_depths"]


class BrokerSession:
    """One short-lived connection to a vhost (a context manager).

    Args:
        url: The AMQP URL.
        timeout: Seconds to wait for the connection.
        retries: Connection attempts before giving up (0: one attempt, no retry).
        name_url: Name the (redacted) URL in the error of an unreachable broker; off
            where the caller shows it already.

    Raises (on entering and from every method):
        BrokerUnavailable: RabbitMQ cannot be used (unreachable, login refused, vhost
            missing, a permission missing).
        BrokerConnectionError: any other failure of the broker or the connection.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, retries: int = 1,
                 name_url: bool = True) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.name_url = name_url
        self._conn: Connection | None = None
        self._channel: Any = None

    def __enter__(self) -> BrokerSession:
        conn = Connection(self.url, connect_timeout=self.timeout)
        with self._translated():
            try:
                conn.ensure_connection(max_retries=self.retries, interval_start=0.5,
                                       interval_step=1)
            except BaseException:
                conn.release()
                raise
        self._conn = conn
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
            self._conn = None

    # -- queues ---------------------------------------------------------------------------

    def depth(self, queue: str) -> int | None:
        """Ready messages in ``queue``; None when it does not exist."""
        with self._translated():
            try:
                return int(self._channel_().queue_declare(queue=queue, passive=True)[1])
            except NotFound:
                self._channel = None  # the refusal closed the channel
                return None

    def depths(self, queues: Iterable[str]) -> dict[str, int | None]:
        """:meth:`depth` of each queue."""
        return {queue: self.depth(queue) for queue in queues}

    def total(self, queues: Iterable[str]) -> int:
        """Ready messages in ``queues`` together (a missing queue holds none)."""
        return sum(self.depth(q) or 0 for q in queues)

    def declare(self, config: SyncConfig) -> list[LinkQueues]:
        """Declare the exchanges and queues of every enabled link (idempotent)."""
        with self._translated():
            return declare_topology(self._connection(), config)

    def delete(self, queues: Iterable[str]) -> None:
        """Delete ``queues`` with whatever they hold (a missing one is no error)."""
        with self._translated():
            for queue in queues:
                self._channel_().queue_delete(queue=queue)

    # -- internals ------------------------------------------------------------------------

    def _connection(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("BrokerSession used outside its with-block")
        return self._conn

    def _channel_(self) -> Any:
        if self._channel is None:
            self._channel = self._connection().channel()
        return self._channel

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (BrokerConnectionError, NotFound):
            raise
        except Exception as exc:
            problem = explain(exc, self.url, name_url=self.name_url)
            if problem is not None:
                raise problem from exc
            if isinstance(exc, (OSError, amqp.exceptions.AMQPError, KombuError)):
                raise BrokerConnectionError(
                    f"RabbitMQ at {redact_url(self.url)} failed: {exc!r}") from exc
            raise


def queue_depths(url: str, queues: Iterable[str], *, timeout: float = 10.0,
                 name_url: bool = True) -> dict[str, int | None]:
    """Ready messages per queue (None: the queue does not exist), on one connection.

    Raises:
        BrokerUnavailable, BrokerConnectionError: see :class:`BrokerSession`.
    """
    with BrokerSession(url, timeout=timeout, name_url=name_url) as broker:
        return broker.depths(queues)


# -- permissions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PermissionCheck:
    """One thing asked of RabbitMQ, e.g. ``publish to syncbus.changes (write
    permission)``, and how it went."""

    what: str
    #: Why it failed (one line, URL redacted); empty when it passed.
    problem: str = ""
    #: Not tried, because an earlier check failed.
    skipped: bool = False

    @property
    def ok(self) -> bool:
        """True when the check passed."""
        return not self.problem and not self.skipped

    def line(self) -> str:
        """``OK       what`` / ``PROBLEM  what: why`` / ``skipped  what``."""
        if self.skipped:
            return f"skipped  {self.what}"
        return f"PROBLEM  {self.what}: {self.problem}" if self.problem else f"OK       {self.what}"


def check_permissions(url: str, timeout: float) -> list[PermissionCheck]:
    """Try what a worker does on the vhost: connect, declare, consume, publish.

    Declares an exclusive queue that goes with the connection; the publish is
    rolled back in a transaction, so nothing is sent.

    Returns:
        The checks in order: connect, declare, consume, publish. After a failed
        connection the others are skipped.
    """
    conn = Connection(url, connect_timeout=timeout)
    checks = [PermissionCheck(f"connect to {redact_url(url)} as "
                              f"user {conn.userid!r}, vhost {conn.virtual_host!r}")]
    todo = [("declare queues and exchanges named syncbus.* (configure permission)", _declare),
            ("consume from syncbus.* queues (read permission)", _consume),
            (f"publish to {CHANGES_EXCHANGE} (write permission; rolled back, nothing is "
             "sent)", _publish)]
    try:
        with broker_errors(url, name_url=False):
            conn.connect()
    except BrokerUnavailable as exc:
        conn.release()
        return [PermissionCheck(checks[0].what, exc.message),
                *(PermissionCheck(what, skipped=True) for what, _ in todo)]
    queue = f"syncbus.validate.{secrets.token_hex(6)}"
    try:
        for what, probe in todo:
            try:
                with broker_errors(url):
                    channel = conn.channel()  # a refusal closes the channel: one per check
                    note = probe(channel, queue)
                    channel.close()
            except BrokerUnavailable as exc:
                checks.append(PermissionCheck(what, exc.message))
                continue
            checks.append(PermissionCheck(what + (f" — {note}" if note else "")))
    finally:
        conn.release()  # the exclusive queue goes with the connection
    return checks


def _declare(channel: Any, queue: str) -> str | None:
    channel.queue_declare(queue=queue, exclusive=True, auto_delete=True)
    return None


def _consume(channel: Any, queue: str) -> str | None:
    # Not declared (no configure permission) gives NOT_FOUND: read was checked first.
    with contextlib.suppress(NotFound):
        channel.basic_get(queue=queue)
    return None


def _publish(channel: Any, _queue: str) -> str | None:
    channel.tx_select()
    try:
        channel.basic_publish(amqp.Message(b""), exchange=CHANGES_EXCHANGE,
                              routing_key="syncbus.validate")
        channel.tx_rollback()
    except NotFound:  # the write permission is checked before the exchange is looked up
        return f"{CHANGES_EXCHANGE} does not exist yet; the first `syncbus run` declares it"
    return None


"""RabbitMQ topology: names and idempotent declaration.

::

    syncbus.changes (topic) ──<conn>.<entity>.*──▶ syncbus.link.<link>.<dir>   (quorum, work queue)
                                                     │ x-delivery-limit exceeded
    syncbus.retry.<link>.<dir>.<seconds>s (quorum, TTL) ──expired──▶ back to the work queue
    syncbus.dead (fanout) ─────────────────────────▶ syncbus.dead.log  (stream: bodies of the
                                                     offline-transaction log; bus.amqp.deadlog)

The statuses of the offline transactions (Pending, Processed, Error, Archived) live in
the state store's index (:mod:`bus.state.txindex`), not in queues. Configurations
of syncbus before the index kept Error transactions in a quorum queue ``syncbus.dead``
and Archived ones in ``syncbus.archive``; :mod:`bus.amqp.txsweep` moves what they still
hold into the log.

Everything is durable; the dead-lettering of quorum queues uses the at-least-once
strategy (RabbitMQ ≥ 3.10), so a message moved by the broker itself can be
duplicated but never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from amqp.exceptions import PreconditionFailed
from kombu import Connection, Exchange, Queue

from bus.amqp.deadlog import DEAD_LOG, dead_log_arguments
from schemas.config import BrokerConfig, LinkConfig, SyncConfig

__all__ = [
    "CHANGES_EXCHANGE",
    "DEAD_EXCHANGE",
    "DEAD_LOG",
    "HISTORY_STREAM",
    "LEGACY_ARCHIVE_QUEUE",
    "LEGACY_DEAD_QUEUE",
    "LinkQueues",
    "all_link_queues",
    "declare_dead_log",
    "declare_history_stream",
    "declare_topology",
    "link_queues",
]

#: Topic exchange every change event is published to.
CHANGES_EXCHANGE = "syncbus.changes"
#: Fanout exchange in front of the dead-letter log.
DEAD_EXCHANGE = "syncbus.dead"
#: The quorum queue that held Error transactions before the dead-letter log.
LEGACY_DEAD_QUEUE = "syncbus.dead"
#: The quorum queue that held Archived transactions before the index.
LEGACY_ARCHIVE_QUEUE = "syncbus.archive"

_AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(frozen=True, slots=True)
class LinkQueues:
    """Queue names of one link direction."""

    link: str
    direction: str
    work: str
    #: Retry tiers as (delay seconds, queue name), shortest first.
    retries: tuple[tuple[float, str], ...]
    #: Routing-key pattern the work queue is bound with.
    binding: str

    def retry_queue(self, attempt: int) -> tuple[float, str]:
        """The retry tier for the ``attempt``-th failure (1-based); the last tier repeats."""
        return self.retries[min(attempt, len(self.retries)) - 1]


def link_queues(name: str, link: LinkConfig, direction: str = "a2b") -> LinkQueues:
    """Names of the queues serving ``link`` in ``direction`` (``a2b`` or ``b2a``)."""
    work = f"syncbus.link.{name}.{direction}"
    delays = sorted(set(link.retry.delays))
    source = link.source if direction == "a2b" else link.target
    return LinkQueues(
        link=name,
        direction=direction,
        work=work,
        retries=tuple((d, f"syncbus.retry.{name}.{direction}.{_fmt(d)}") for d in delays),
        binding=f"{source.connection}.{source.entity}.*",
    )


def all_link_queues(name: str, link: LinkConfig) -> list[LinkQueues]:
    """The queues of every direction ``link`` flows in (one for a one-way link)."""
    return [link_queues(name, link, d) for d in link.directions]


def _fmt(seconds: float) -> str:
    return f"{seconds:g}s"


def declare_topology(conn: Connection, config: SyncConfig) -> list[LinkQueues]:
    """Declare exchanges and queues for every enabled link; safe to run again.

    Raises:
        kombu / amqp errors when the broker refuses a declaration (e.g. a queue
        exists with other arguments); callers translate them.
    """
    changes = Exchange(CHANGES_EXCHANGE, type="topic", durable=True)
    dead_x = Exchange(DEAD_EXCHANGE, type="fanout", durable=True)
    channel = conn.default_channel
    changes.declare(channel=channel)
    dead_x.declare(channel=channel)
    declare_dead_log(conn)
    declared = []
    for name, link in config.links.items():
        if not link.enabled:
            continue
        for lq in all_link_queues(name, link):
            _declare_link(channel, changes, lq, config.broker.delivery_limit)
            declared.append(lq)
    declare_history_stream(conn, config.broker)
    return declared


def _declare_link(channel: Any, changes: Exchange, lq: LinkQueues, delivery_limit: int) -> None:
    work_args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
        **_AT_LEAST_ONCE,
    }
    Queue(
        lq.work, exchange=changes, routing_key=lq.binding, durable=True,
        queue_arguments=work_args,
    ).declare(channel=channel)
    for delay, queue in lq.retries:
        Queue(
            queue, durable=True,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": int(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": lq.work,
                **_AT_LEAST_ONCE,
            },
        ).declare(channel=channel)


def declare_dead_log(conn: Connection) -> None:
    """Declare the dead-letter log (a stream) and bind it to the dead-letter exchange;
    safe to run again."""
    dead_x = Exchange(DEAD_EXCHANGE, type="fanout", durable=True)
    channel = conn.channel()
    try:
        dead_x.declare(channel=channel)
        Queue(DEAD_LOG, exchange=dead_x, routing_key="", durable=True,
              queue_arguments=dead_log_arguments()).declare(channel=channel)
    finally:
        channel.close()


#: The stream every change event is also stored in (bound to ``syncbus.changes`` with ``#``).
HISTORY_STREAM = "syncbus.history"


def declare_history_stream(conn: Connection, retention: BrokerConfig | None = None) -> bool:
    """Declare the history stream and bind it to every change event; safe to run again.

    Retention is by age and size (``x-max-age``, ``x-max-length-bytes``) and acts on
    whole segments (``x-stream-max-segment-size-bytes``). RabbitMQ cannot change the
    arguments of an existing queue: when the stream exists with other ones, it is kept
    as it is and a warning says how to change its retention (a policy).

    Args:
        conn: An open kombu connection; the declaration uses a channel of its own.
        retention: The broker config's ``history_*`` settings (default: the defaults).

    Returns:
        False when the stream exists with other retention arguments, else True.

    Raises:
        kombu / amqp errors other than a retention mismatch (callers translate them).
    """
    cfg = retention or BrokerConfig()
    arguments = {
        "x-queue-type": "stream",
        "x-max-age": f"{int(cfg.history_max_age)}s",
        "x-max-length-bytes": cfg.history_max_bytes,
        "x-stream-max-segment-size-bytes": cfg.history_segment_bytes,
    }
    changes = Exchange(CHANGES_EXCHANGE, type="topic", durable=True)
    channel = conn.channel()
    try:
        changes.declare(channel=channel)
        try:
            Queue(HISTORY_STREAM, exchange=changes, routing_key="#", durable=True,
                  queue_arguments=arguments).declare(channel=channel)
        except PreconditionFailed as exc:
            structlog.get_logger(__name__).warning(
                "history_stream_kept", stream=HISTORY_STREAM, reason=str(exc),
                hint="queue arguments cannot change; set the retention with a policy "
                     "(max-age, max-length-bytes, stream-max-segment-size-bytes) "
                     "or delete the stream")
            channel = conn.channel()
            channel.queue_bind(HISTORY_STREAM, CHANGES_EXCHANGE, "#")
            return False
        return True
    finally:
        channel.close()

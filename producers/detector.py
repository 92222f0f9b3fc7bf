"""The change detector: poll a source entity, publish its changes, move the cursor.

The cursor rule: a page's cursor is committed only after RabbitMQ confirmed every
event of that page. A crash in between re-publishes the same events (same ids),
which consumers recognise; a gap is impossible.

An optional :class:`DetectorObserver` hears of every page read and every page
confirmed (metrics); it is called per page, never per record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from bus.amqp.integrity import Signer
from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import CHANGES_EXCHANGE
from bus.state.store import StateStore
from connectors.base import ChangeRecord, Connector, Op
from schemas.event import dumps, new_event, routing_key

__all__ = ["Detector", "DetectorObserver", "PollResult", "change_event"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class PollResult:
    """What one poll found and published."""

    upserts: int = 0
    deletes: int = 0
    pages: int = 0
    #: Changes not published because they only echoed syncbus's own writes.
    echoes: int = 0

    @property
    def changes(self) -> int:
        return self.upserts + self.deletes


def change_event(connection: str, entity: str, rec: ChangeRecord,
                 cursor: str | None) -> dict[str, Any]:
    """The change event of one change record (what detectors, Sync All and conflict
    resolution publish, and what ``syncbus preview`` feeds the applier)."""
    return new_event(connection=connection, entity=entity, op=rec.op.value, key=rec.key,
                     version=rec.version, record=rec.values, modified_at=rec.modified_at,
                     cursor=cursor)


class DetectorObserver(Protocol):
    """Hears what a detector does, page by page."""

    def page_read(self, detector: Detector, upserts: int, deletes: int) -> None:
        """A page of changes was read from the source."""

    def page_published(self, detector: Detector, upserts: int, deletes: int,
                       seconds: float) -> None:
        """A page was confirmed by the broker (in ``seconds``) and its cursor committed."""


class Detector:
    """Detects changes of one entity in one connection.

    Args:
        connection: Name of the source connection (first part of the routing key).
        entity: The entity polled.
        connector: The source system.
        state: Where the cursor lives.
        publisher: Confirmed publisher.
        page_size: Changes per page (one publish-confirm-commit cycle).
        observer: Told of every page read and published.
        echo_filter: Drops the changes that only echo syncbus's own writes (two-way
            links: the echo rule); the cursor still moves past them.
        signer: Signs every event (:mod:`bus.amqp.integrity`); link consumers reject
            unsigned ones.
    """

    def __init__(
        self,
        *,
        connection: str,
        entity: str,
        connector: Connector,
        state: StateStore,
        publisher: Publisher,
        page_size: int,
        observer: DetectorObserver | None = None,
        echo_filter: Callable[[list[ChangeRecord]], list[ChangeRecord]] | None = None,
        signer: Signer,
    ) -> None:
        self.connection = connection
        self.entity = entity
        self.connector = connector
        self.state = state
        self.publisher = publisher
        self.page_size = page_size
        self.observer = observer
        self.echo_filter = echo_filter
        self.signer = signer
        self.name = f"{connection}.{entity}"

    def poll(self, stop: threading.Event | None = None,
             keep_going: Callable[[], bool] | None = None) -> PollResult:
        """Publish every change after the committed cursor, page by page.

        Stops between pages when ``stop`` is set or ``keep_going()`` returns False (the
        worker lost its lease on this source); the current page always completes.

        Raises:
            TransientError: the source or the broker is unavailable (the cursor stays
                at the last confirmed page, so the next poll resumes there).
            PermanentError: the entity is not prepared for change tracking.
        """
        result = PollResult()
        cursor = self.state.load_cursor(self.name)
        if not self.connector.has_changes(self.entity, cursor):
            return result
        for page in self.connector.read_changes(self.entity, cursor, self.page_size):
            records = self.echo_filter(page.records) if self.echo_filter else page.records
            result.echoes += len(page.records) - len(records)
            deletes = sum(1 for rec in records if rec.op is Op.DELETE)
            upserts = len(records) - deletes
            if self.observer is not None:
                self.observer.page_read(self, upserts, deletes)
            seconds = self._publish(records, cursor)
            self.state.save_cursor(self.name, page.next_cursor, changes=len(page.records))
            cursor = page.next_cursor
            result.pages += 1
            result.upserts += upserts
            result.deletes += deletes
            if self.observer is not None:
                self.observer.page_published(self, upserts, deletes, seconds)
            if (stop is not None and stop.is_set()) or (keep_going and not keep_going()):
                break
        if result.changes or result.echoes:
            log.info("changes_published", detector=self.name, upserts=result.upserts,
                     deletes=result.deletes, pages=result.pages, echoes=result.echoes)
        return result

    def _publish(self, records: list[ChangeRecord], cursor: str | None) -> float:
        """Publish one page and wait for its confirms; returns the seconds it took."""
        started = time.perf_counter()
        messages = []
        for rec in records:
            op = rec.op.value
            event = change_event(self.connection, self.entity, rec, cursor)
            body = dumps(event)
            messages.append(OutMessage(
                exchange=CHANGES_EXCHANGE,
                routing_key=routing_key(self.connection, self.entity, op),
                body=body,
                headers=self.signer.headers(body),
                message_id=event["id"],
            ))
        self.publisher.publish_batch(messages)
        seconds = time.perf_counter() - started
        log.debug("page_published", detector=self.name, count=len(messages),
                  ms=round(seconds * 1000, 1))
        return seconds

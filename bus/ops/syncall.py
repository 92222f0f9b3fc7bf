"""Sync All: copy every record of a link, matching records by key (initial sync).

``sync_all`` reads every current record of each side the link flows from (the
connector's change reader from the beginning, deletions left out), publishes each as
a change event to the work queue of its direction, and then lets the consumers apply
them: the same bus path as live sync, so filters, lookups, conflicts, retries and the
dead-letter queue all apply.

With a *master* side every event carries ``x-syncbus-master``: where both sides hold a
record and differ, the master's version wins (the other is logged in the conflict log);
records only on the other side are copied to the master. Without one, the link's
conflict policy decides.

Resumable: after each page RabbitMQ confirmed, its cursor is committed in the state
store (``sync-all:<link>:<direction>``); a run that crashed continues from there, and a
direction already read is not read again. A finished run clears its cursors, so the next
Sync All starts over; ``restart=True`` starts over at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.amqp.integrity import signer_for
from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import link_queues
from bus.worker.worker import RunSummary, Worker
from connectors.base import ConfigError, Op
from consumers.apply import MASTER_HEADER
from consumers.flow import Flow, flows
from producers.detector import change_event
from schemas.config import SyncConfig
from schemas.event import dumps

__all__ = ["Progress", "SyncAllResult", "checkpoint_name", "sync_all"]

log = structlog.get_logger(__name__)

#: The cursor value of a direction that was read to the end.
DONE = "done"


@dataclass(slots=True)
class Progress:
    """Where a Sync All stands (given to the progress callback after every page)."""

    direction: str
    #: Records of this direction published so far (this run and resumed ones).
    published: int
    #: Records the side holds (None when unknown).
    total: int | None
    #: Records published per second in this run.
    rate: float
    resumed: bool = False


@dataclass(slots=True)
class SyncAllResult:
    """What a Sync All did."""

    published: dict[str, int] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    delivery: RunSummary | None = None


def checkpoint_name(link: str, direction: str) -> str:
    """The state-store cursor of one direction of a Sync All."""
    return f"sync-all:{link}:{direction}"


def sync_all(config: SyncConfig, link: str, *, master: str | None = None, restart: bool = False,
             apply: bool = True, max_wait: float = 3600.0,
             on_progress: Callable[[Progress], None] | None = None,
             on_line: Callable[[str], None] | None = None) -> SyncAllResult:
    """Copy every record of ``link`` through the bus.

    Args:
        master: ``a`` or ``b``: the side whose version wins every difference.
        restart: Ignore the cursors of an interrupted run.
        apply: Also deliver the events (consumers of this process) and wait until the
            link's queues are empty; False leaves that to the running workers.
        max_wait: Seconds to wait for the delivery.
        on_progress: Called after every confirmed page.
        on_line: Called with one plain line per step.

    Raises:
        ConfigError: unknown or disabled link, or a master the link does not flow from.
        BusError: a system, the state store or the broker is unavailable (the cursors
            keep what was confirmed: run again to continue).
    """
    cfg = config.links.get(link)
    if cfg is None:
        raise ConfigError(f"no link {link!r} in the config (links: {', '.join(config.links)})")
    if not cfg.enabled:
        raise ConfigError(f"link {link!r} is disabled")
    link_flows = flows(link, cfg)
    if master is not None:
        if master not in ("a", "b"):
            raise ConfigError(f"--master must be a or b, not {master!r}")
        if cfg.direction != "both" and link_flows[0].source_side != master:
            raise ConfigError(f"link {link!r} flows {cfg.direction}: side {master} cannot be "
                              "the master of a one-way link")
    say = on_line or (lambda _line: None)
    # Only this link's consumers run here; the others stay in the config (lookup parents).
    only = {n: lk if n == link else lk.model_copy(update={"enabled": False})
            for n, lk in config.links.items()}
    worker = Worker(config.model_copy(update={"links": only}))
    worker.open()
    try:
        result = SyncAllResult()
        state = worker._state()  # noqa: SLF001 - the worker's own state store
        publisher = Publisher(config.broker.url, name="syncbus-sync-all")
        try:
            for flow in link_flows:
                name = checkpoint_name(link, flow.direction)
                if restart:
                    state.clear_cursor(name)
                result.published[flow.direction] = _read_side(
                    worker, flow, name, master, publisher, result, on_progress, say)
        finally:
            publisher.close()
        if apply:
            say("delivering: waiting for the consumers to apply every event")
            result.delivery = worker.run_until_idle(max_wait=max_wait, poll=False)
        if result.delivery is None or not result.delivery.timed_out:
            for flow in link_flows:
                state.clear_cursor(checkpoint_name(link, flow.direction))
        return result
    finally:
        worker.close()


def _read_side(worker: Worker, flow: Flow, name: str, master: str | None, publisher: Publisher,
               result: SyncAllResult, on_progress: Callable[[Progress], None] | None,
               say: Callable[[str], None]) -> int:
    state = worker._state()  # noqa: SLF001
    saved = state.load_cursor(name)
    mark: dict[str, Any] = json.loads(saved) if saved else {"cursor": None, "published": 0}
    published = int(mark["published"])
    side = f"{flow.source.connection}.{flow.source.entity}"
    if mark["cursor"] == DONE:
        say(f"{flow.direction}: {side} was read completely by the interrupted run "
            f"({published} records)")
        return published
    resumed = mark["cursor"] is not None
    if resumed:
        result.resumed.append(flow.direction)
        say(f"{flow.direction}: resuming {side} after {published} records")
    connector = worker.connectors[flow.source.connection]
    total = sum(1 for _ in connector.snapshot(flow.source.entity))
    say(f"{flow.direction}: reading {total} records of {side}")
    queue = link_queues(flow.link, flow.config, flow.direction).work
    headers = {MASTER_HEADER: master} if master else None
    signer = signer_for(worker.config, state)
    started, this_run = time.monotonic(), 0
    cursor: str | None = mark["cursor"]
    for page in connector.read_changes(flow.source.entity, cursor, flow.config.page_size):
        messages = []
        for rec in page.records:
            if rec.op is not Op.UPSERT:
                continue
            event = change_event(flow.source.connection, flow.source.entity, rec, cursor)
            body = dumps(event)
            messages.append(OutMessage("", queue, body, signer.headers(body, headers),
                                       event["id"], mandatory=True))
        publisher.publish_batch(messages)
        published += len(messages)
        this_run += len(messages)
        cursor = page.next_cursor
        state.save_cursor(name, json.dumps({"cursor": cursor, "published": published}))
        if on_progress is not None:
            rate = this_run / max(time.monotonic() - started, 1e-6)
            on_progress(Progress(flow.direction, published, total, rate, resumed))
    state.save_cursor(name, json.dumps({"cursor": DONE, "published": published}))
    say(f"{flow.direction}: {published} records of {side} published")
    return published

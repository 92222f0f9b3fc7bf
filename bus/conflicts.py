"""The conflict log of two-way links, and an operator's resolution of a conflict.

Every conflict a two-way consumer settles is a row of the state store's conflict log,
with both sides' values, modification times, the policy and the winner. A ``manual``
conflict has no winner until an operator picks one (``syncbus tx resolve``):

1. the record's open conflicts are marked resolved (who, when, which side);
2. the kept side's *current* record is read and sent, as a change event carrying the
   decision (``x-syncbus-winner``), to the work queue of the direction that writes
   the other side: the same bus path as live sync (retries, dead-letter queue);
3. the record's changes waiting in the dead-letter queue are replayed with the same
   decision: the kept side's are applied, the other side's skipped and logged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bus.integrity import Signer, signer_for
from bus.publisher import OutMessage, Publisher
from bus.topology import link_queues
from bus.txlog import TxFilter, TxLog
from connectors.base import ChangeRecord, ConfigError, Connector, Op
from connectors.registry import open_connector
from consumers.apply import WINNER_HEADER
from consumers.flow import Flow, flows
from consumers.twoway import LinkSides
from producers.detector import change_event
from producers.state import StateStore
from schemas.config import SyncConfig
from schemas.event import dumps

__all__ = ["Resolution", "find_conflict", "resolve"]


@dataclass(slots=True)
class Resolution:
    """What ``resolve`` did."""

    link: str
    pair_key: str
    keep: str
    conflicts: int = 0
    replayed: int = 0
    sent: bool = False
    notes: list[str] = field(default_factory=list)


def find_conflict(state: StateStore, ident: str) -> dict[str, Any]:
    """A conflict row by its number (``tx conflicts``) or by the id of its event.

    Raises:
        ConfigError: no such conflict.
    """
    if ident.isdigit():
        rows = state.conflict_rows(conflict_id=int(ident))
    else:
        rows = [r for r in state.conflict_rows() if r["event_id"] == ident]
    if not rows:
        raise ConfigError(f"no conflict {ident!r} (see `syncbus tx conflicts`)")
    return rows[0]


def resolve(config: SyncConfig, ident: str, keep: str, *, by: str) -> Resolution:
    """Settle the conflict ``ident`` by keeping side ``keep`` (``a`` or ``b``).

    Raises:
        ConfigError: unknown conflict, or its link is gone from the config.
        BusError: a system, the state store or the broker is unavailable.
    """
    if keep not in ("a", "b"):
        raise ConfigError(f"--keep must be a or b, not {keep!r}")
    state = StateStore(config.state.url)
    try:
        row = find_conflict(state, ident)
        name, pair_key = row["link"], row["pair_key"]
        link = config.links.get(name)
        if link is None:
            raise ConfigError(f"conflict {ident}: link {name!r} is not in this config")
        result = Resolution(name, pair_key, keep)
        result.conflicts = state.resolve_conflicts(name, pair_key, keep, by)
        signer = signer_for(config, state)
        link_flows = flows(name, link)
        flow = next((f for f in link_flows if f.source_side == keep), None)
        if flow is None:
            result.notes.append(f"link {name!r} does not flow from side {keep}: nothing to send")
        else:
            result.sent = _send_current(config, flow, link_flows, pair_key, signer)
            if not result.sent:
                result.notes.append(f"side {keep} no longer holds the record")
        events = {r["event_id"] for r in state.conflict_rows(link=name)
                  if r["pair_key"] == pair_key and r["event_id"]}
        log = TxLog(config)
        try:
            moved = log.replay(TxFilter(ids=events, link=name),
                               extra_headers={WINNER_HEADER: keep}, signer=signer) if events else None
        finally:
            log.close()
        result.replayed = moved.moved if moved else 0
        return result
    finally:
        state.close()


def _send_current(config: SyncConfig, flow: Flow, link_flows: list[Flow], pair_key: str,
                  signer: Signer) -> bool:
    """Read the kept side's record now and queue it for the other side; False if absent."""
    connectors: dict[str, Connector] = {}
    try:
        for endpoint in (flow.source, flow.target):
            if endpoint.connection not in connectors:
                connectors[endpoint.connection] = open_connector(
                    endpoint.connection, config.connections[endpoint.connection])
        sides = LinkSides(link_flows, connectors)
        a_key: dict[str, Any] = json.loads(pair_key)
        if flow.source_side == "a":
            key = a_key
        else:
            forward = next(f for f in link_flows if f.direction == "a2b")
            key = sides.mapper(forward).target_key(a_key)
        source = connectors[flow.source.connection]
        [current] = source.fetch(flow.source.entity, [key])
    finally:
        for connector in connectors.values():
            connector.close()
    if current is None:
        return False
    version = current.version if current.version is not None else "resolved"
    event = change_event(flow.source.connection, flow.source.entity,
                         ChangeRecord(current.key, Op.UPSERT, version, current.modified_at,
                                      current.values), None)
    queue = link_queues(flow.link, flow.config, flow.direction).work
    publisher = Publisher(config.broker.url, name="syncbus-resolve")
    try:
        body = dumps(event)
        publisher.publish_batch([OutMessage(
            "", queue, body, signer.headers(body, {WINNER_HEADER: flow.source_side}),
            event["id"], mandatory=True)])
    finally:
        publisher.close()
    return True

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

:func:`render_conflicts` lays the log out for a terminal (``syncbus tx conflicts``):
one block per conflict (number, link, record, policy, winner or pending, when), then
the fields whose values differ, side a next to side b, compared as the link maps them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bus.amqp.integrity import Signer, signer_for
from bus.amqp.peek import printable
from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import link_queues
from bus.ops.txlog import TxFilter, TxLog
from bus.state.store import StateStore
from connectors.base import ChangeRecord, ConfigError, Connector, MappingError, Op
from connectors.registry import open_connector
from consumers.apply import WINNER_HEADER
from consumers.flow import Flow, flows
from consumers.mapping import FieldMapper
from consumers.twoway import LinkSides, normalize
from producers.detector import change_event
from schemas.config import LinkConfig, SyncConfig
from schemas.event import dumps

__all__ = ["Resolution", "differing_fields", "find_conflict", "render_conflicts", "resolve"]

#: Characters of one value shown in the side-by-side (the whole value is in ``--json``).
VALUE_WIDTH = 200


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


# -- the conflict log for a terminal ------------------------------------------------------


def render_conflicts(rows: list[dict[str, Any]], config: SyncConfig | None = None, *,
                     config_path: str = "sync.yaml") -> RenderableType:
    """The conflict log as blocks readable in an 80-column terminal.

    Args:
        rows: Conflict rows (``StateStore.conflict_rows``), newest first.
        config: The configuration (its links' field maps pair a's fields with b's).
        config_path: The config file, as the resolve hint names it.

    Returns:
        A rich renderable: per conflict a heading, its facts, and the differing fields.
    """
    parts: list[RenderableType] = []
    for row in rows:
        link = config.links.get(row["link"]) if config is not None else None
        if parts:
            parts.append("")
        parts += _conflict_block(row, link, config_path)
    return Group(*parts)


def differing_fields(link: LinkConfig | None, a_values: dict[str, Any] | None,
                     b_values: dict[str, Any] | None) -> list[tuple[str, str, Any, Any]]:
    """The fields whose values differ between the sides, as the link maps them.

    Each a field is paired with the b field the link maps it to (lookups left out: their
    ids differ by nature); a's value is mapped (value maps, transforms) before it is
    compared, as the echo rule compares them. Without a link or field map, fields pair
    by name.

    Returns:
        ``(a field, b field, a value, b value)`` per differing field; a deleted side's
        values are all None.
    """
    a, b = a_values or {}, b_values or {}
    specs = link.field_specs() if link is not None else None
    if specs is None:
        pairs = [(name, name) for name in sorted(set(a) | set(b))]
        mapped = dict(a)
    else:
        pairs = [(spec.from_ or column, column) for column, spec in specs.items()
                 if not spec.lookup and not spec.has_const]
        mapped = _mapped(link, a) if link is not None else dict(a)
    out = []
    for a_field, b_field in pairs:
        ours = mapped.get(b_field) if a_values is not None else None
        theirs = b.get(b_field)
        if a_values is None or b_values is None or normalize(ours) != normalize(theirs):
            out.append((a_field, b_field, a.get(a_field), theirs))
    return out


def _mapped(link: LinkConfig, values: dict[str, Any]) -> dict[str, Any]:
    """a's record in b's fields; plain renames when the map refuses a value."""
    try:
        return FieldMapper(link).map_record(values)
    except (MappingError, ConfigError):
        specs = link.field_specs() or {}
        return {column: values.get(spec.from_ or column) for column, spec in specs.items()}


def _conflict_block(row: dict[str, Any], link: LinkConfig | None,
                    config_path: str) -> list[RenderableType]:
    pending = row["winner"] is None
    head = Text.assemble(
        (f"conflict #{row['id']}", "bold"), f"  link {printable(row['link'], 100)}  ",
        f"policy {printable(row['policy'], 40)}  ",
        ("pending: waiting for an operator", "bold yellow") if pending else (f"side {row['winner']} kept", "green"))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(no_wrap=True, style="dim")
    facts.add_column(overflow="fold")
    facts.add_row("record", printable(row["pair_key"], 300))
    direction = "a → b" if row.get("direction") == "a2b" else "b → a"
    facts.add_row("detected", f"{_when(row['detected_at'])} by a change {direction}"
                  + (f" ({printable(row['event_id'], 80)})" if row.get("event_id") else ""))
    if row.get("a_modified") or row.get("b_modified"):  # SQL sides keep no modification time
        facts.add_row("changed",
                      f"a {_when(row.get('a_modified'))}, b {_when(row.get('b_modified'))}")
    if row.get("resolved_by"):
        facts.add_row("resolved", f"side {row['winner']} kept by "
                      f"{printable(row['resolved_by'], 100)} at {_when(row.get('resolved_at'))}")
    if pending:
        facts.add_row("resolve", f"syncbus tx resolve -c {config_path} {row['id']} --keep a|b")
    return [head, facts, _side_by_side(row, link)]


def _side_by_side(row: dict[str, Any], link: LinkConfig | None) -> RenderableType:
    a_values, b_values = row.get("a_values"), row.get("b_values")
    diffs = differing_fields(link, a_values, b_values)
    if not diffs:
        return Text("  no differing field (both sides hold the same values)", style="dim")
    a_name = f"a: {link.source.connection}.{link.source.entity}" if link else "a"
    b_name = f"b: {link.target.connection}.{link.target.entity}" if link else "b"
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column("  field", overflow="fold", ratio=2)
    table.add_column(a_name + (" (deleted)" if a_values is None else ""), overflow="fold",
                     ratio=3)
    table.add_column(b_name + (" (deleted)" if b_values is None else ""), overflow="fold",
                     ratio=3)
    for a_field, b_field, ours, theirs in diffs:
        label = a_field if a_field == b_field else f"{a_field} → {b_field}"
        table.add_row(Text("  " + printable(label, 100)),
                      _value(ours, a_values is None), _value(theirs, b_values is None))
    return table


def _value(value: Any, deleted: bool) -> Text:
    if deleted:
        return Text("-", style="dim")
    if value is None:
        return Text("null", style="dim")
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return Text(printable(text, VALUE_WIDTH))


def _when(value: Any) -> str:
    """A time to the second, in UTC when its zone is known."""
    if value is None or value == "":
        return "unknown"
    moment = value
    if not isinstance(moment, datetime):
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            return printable(value, 40)
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

"""The mapping consumer of a link, without a broker: map → filter → lookups → echo and
conflict → write → the decision for each message.

Deliveries are built here as :class:`bus.amqp.consumer.BatchConsumer` hands them over.
Everything behind the applier is real: both sides are SQLite files behind the SQL
connector and the state store is SQLite too. Each test reads what a user would see:
the rows in the target, the verdict of each message and the error text it carries.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bus.amqp.consumer import Decision, Delivery, Verdict
from bus.amqp.headers import headers
from bus.state.store import StateStore
from connectors.sql import SqlConnector
from consumers.apply import ApplyReport, LinkApplier
from consumers.flow import flows
from consumers.twoway import LinkSides
from schemas.config import LinkConfig
from schemas.event import dumps, new_event, routing_key

#: Side a (the source, ``src``) and side b (the target, ``dst``) have their own column
#: names, and the customers of side b their own ids, so mapping and lookups show.
A_DDL = [
    "CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT, count INTEGER, customer INTEGER)",
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT)",
]
B_DDL = [
    """CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER,
       customer_id INTEGER)""",
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT)",
]
#: Retries a child waits for its parent before it is dead-lettered.
MAX_ATTEMPTS = 3


def _items(**extra: Any) -> LinkConfig:
    return LinkConfig.model_validate({
        "source": {"connection": "src", "entity": "items"},
        "target": {"connection": "dst", "entity": "items"},
        "key": "id",
        "fields": {"id": "id", "name": "title", "qty": "count"},
        "retry": {"delays": [1], "max_attempts": MAX_ATTEMPTS},
        **extra})


def _customers() -> LinkConfig:
    return LinkConfig.model_validate({
        "source": {"connection": "src", "entity": "customers"},
        "target": {"connection": "dst", "entity": "customers"},
        "key": "code", "fields": {"code": "code", "name": "name"}})


def _with_lookup() -> dict[str, LinkConfig]:
    """Items that name their customer, and the customers link that translates it."""
    fields = {"id": "id", "name": "title", "qty": "count",
              "customer_id": {"from": "customer", "lookup": "customers"}}
    return {"items": _items(fields=fields), "customers": _customers()}


class World:
    """Both sides, their connectors and the state store, in files under ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.urls = {"src": f"sqlite:///{tmp}/a.db", "dst": f"sqlite:///{tmp}/b.db"}
        for url, ddl in ((self.urls["src"], A_DDL), (self.urls["dst"], B_DDL)):
            engine = sa.create_engine(url)
            with engine.begin() as conn:
                for statement in ddl:
                    conn.exec_driver_sql(statement)
            engine.dispose()
        self.connectors = {name: SqlConnector(name, url, busy_timeout=0.2)
                           for name, url in self.urls.items()}
        self.state = StateStore(f"sqlite:///{tmp}/state.db")
        self._sides: dict[str, LinkSides] = {}

    def applier(self, name: str, links: dict[str, LinkConfig], *, direction: str = "a2b",
                **hooks: Any) -> LinkApplier:
        """The applier of ``links[name]`` in ``direction``, as the worker builds it."""
        config = links[name]
        link_flows = flows(name, config)
        flow = next(f for f in link_flows if f.direction == direction)
        parents = {s.lookup for c in links.values() for s in (c.field_specs() or {}).values()}
        sides = None
        if config.direction == "both" or name in parents:  # the links that keep pair state
            sides = self._sides.setdefault(name, LinkSides(link_flows, self.connectors))
        return LinkApplier(name, flow, self.connectors[flow.target.connection], self.state,
                           sides=sides, links=links, **hooks)

    def rows(self, side: str, sql: str) -> list[tuple[Any, ...]]:
        engine = sa.create_engine(self.urls[side])
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(sql))]
        finally:
            engine.dispose()

    def execute(self, side: str, sql: str) -> None:
        engine = sa.create_engine(self.urls[side])
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(sql))
        finally:
            engine.dispose()

    def close(self) -> None:
        for connector in self.connectors.values():
            connector.close()
        self.state.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path)
    yield made
    made.close()


def change(op: str, key: int, version: int, *, connection: str = "src", entity: str = "items",
           attempts: int = 0, **record: Any) -> Delivery:
    """A change event of the record ``key`` as a detector publishes it, delivered."""
    event = new_event(connection=connection, entity=entity, op=op, key={"id": key},
                      version=version, record={"id": key, **record} if op == "upsert" else None,
                      modified_at=None, cursor=None)
    hdrs: dict[str, Any] = {headers.ATTEMPTS: attempts} if attempts else {}
    return Delivery(dumps(event), hdrs, routing_key(connection, entity, op), event["id"])


def verdicts(decisions: list[Decision]) -> list[Verdict]:
    return [d.verdict for d in decisions]


# -- map and write ----------------------------------------------------------------------


def test_a_mapped_upsert_is_written_and_a_deletion_removes_it(world: World) -> None:
    apply = world.applier("items", {"items": _items()})

    decisions = apply([change("upsert", 1, 1, title="Widget", count=3),
                       change("upsert", 2, 1, title="Gadget", count=5)])

    assert verdicts(decisions) == [Verdict.ACK, Verdict.ACK]
    assert world.rows("dst", "SELECT id, name, qty FROM items ORDER BY id") == [
        (1, "Widget", 3), (2, "Gadget", 5)]
    assert verdicts(apply([change("delete", 1, 2)])) == [Verdict.ACK]
    assert world.rows("dst", "SELECT id, name FROM items") == [(2, "Gadget")]


def test_the_hook_hears_what_the_target_confirmed(world: World) -> None:
    reports: list[ApplyReport] = []
    apply = world.applier("items", {"items": _items()}, on_batch=reports.append)

    apply([change("upsert", 1, 1, title="Widget"), change("upsert", 1, 1, title="Widget")])

    [report] = reports
    assert (report.upserted, report.deleted, report.skipped) == (1, 0, 1)  # the duplicate
    assert len(report.detected) == 1


def test_only_the_newest_version_in_a_batch_is_written(world: World) -> None:
    apply = world.applier("items", {"items": _items()})

    decisions = apply([change("upsert", 1, 5, title="newest"),
                       change("upsert", 1, 3, title="older"),
                       change("upsert", 1, 4, title="old")])

    assert verdicts(decisions) == [Verdict.ACK] * 3
    assert world.rows("dst", "SELECT name FROM items") == [("newest",)]


def test_a_stale_version_is_acknowledged_without_overwriting_a_newer_one(world: World) -> None:
    apply = world.applier("items", {"items": _items()})
    apply([change("upsert", 1, 5, title="new")])

    late = apply([change("upsert", 1, 3, title="old"), change("delete", 1, 4)])

    assert verdicts(late) == [Verdict.ACK, Verdict.ACK]
    assert world.rows("dst", "SELECT id, name FROM items") == [(1, "new")]


# -- filter -----------------------------------------------------------------------------


def test_a_record_outside_the_filter_is_acknowledged_without_a_write(world: World) -> None:
    apply = world.applier("items", {"items": _items(filter="count > 0")})

    decisions = apply([change("upsert", 1, 1, title="none left", count=0),
                       change("upsert", 2, 1, title="in stock", count=4)])

    assert verdicts(decisions) == [Verdict.ACK, Verdict.ACK]
    assert world.rows("dst", "SELECT id, name FROM items") == [(2, "in stock")]


def test_a_record_that_leaves_the_filter_is_deleted_where_the_link_says_so(
        world: World) -> None:
    links = {"items": _items(filter="count > 0", filter_action="delete")}
    apply = world.applier("items", links)
    apply([change("upsert", 1, 1, title="in stock", count=4)])

    decisions = apply([change("upsert", 1, 2, title="sold out", count=0)])

    assert verdicts(decisions) == [Verdict.ACK]
    assert world.rows("dst", "SELECT id FROM items") == []


# -- lookups ----------------------------------------------------------------------------


def test_a_lookup_writes_the_parents_id_in_the_target(world: World) -> None:
    links = _with_lookup()
    world.execute("dst", "INSERT INTO customers (code, name) VALUES ('OLD', 'taken id 1')")
    parents, items = world.applier("customers", links), world.applier("items", links)
    assert verdicts(parents([change("upsert", 7, 1, entity="customers", code="C7",
                                    name="Contoso")])) == [Verdict.ACK]

    decisions = items([change("upsert", 1, 1, title="Widget", count=1, customer=7)])

    assert verdicts(decisions) == [Verdict.ACK]
    [(target_id,)] = world.rows("dst", "SELECT id FROM customers WHERE code = 'C7'")
    assert target_id != 7  # side b numbers its customers itself
    assert world.rows("dst", "SELECT id, customer_id FROM items") == [(1, target_id)]


def test_a_child_whose_parent_is_missing_waits_then_is_dead_lettered(world: World) -> None:
    items = world.applier("items", _with_lookup())

    waiting = items([change("upsert", 1, 1, title="Widget", customer=8)])
    last = items([change("upsert", 1, 1, title="Widget", customer=8,
                         attempts=MAX_ATTEMPTS - 1)])

    [wait] = waiting
    assert (wait.verdict, wait.error_class) == (Verdict.RETRY, "MissingParent")
    assert wait.error == ("waiting for parent record (customer_id: no 'customers' record "
                          "with key '8' in dst yet)")
    [dead] = last
    assert dead.verdict is Verdict.DEAD
    assert dead.error is not None
    assert dead.error.startswith(f"missing parent after {MAX_ATTEMPTS} attempts: customer_id")
    assert world.rows("dst", "SELECT id FROM items") == []


# -- two-way: echo and conflict ---------------------------------------------------------


def _two_way(**extra: Any) -> dict[str, LinkConfig]:
    return {"items": _items(direction="both", **extra)}


def test_the_echo_of_the_bus_own_write_is_skipped(world: World) -> None:
    links = _two_way()
    a2b, b2a = world.applier("items", links), world.applier("items", links, direction="b2a")
    world.execute("src", "INSERT INTO items (id, title, count) VALUES (1, 'Widget', 3)")
    a2b([change("upsert", 1, 1, title="Widget", count=3)])
    world.execute("src", "UPDATE items SET title = 'renamed on a meanwhile'")

    echo = b2a([change("upsert", 1, 1, connection="dst", name="Widget", qty=3)])

    assert verdicts(echo) == [Verdict.ACK]
    assert world.rows("src", "SELECT title FROM items") == [("renamed on a meanwhile",)]
    # A real edit on side b is no echo: it conflicts with the rename on side a and,
    # with no modification times to compare, the change being applied wins.
    edit = b2a([change("upsert", 1, 2, connection="dst", name="Gadget", qty=3)])
    assert verdicts(edit) == [Verdict.ACK]
    assert world.rows("src", "SELECT id, title, count FROM items") == [(1, "Gadget", 3)]


@pytest.mark.parametrize(("policy", "kept", "winner"), [
    ("source_wins", "changed on a", "a"),
    ("target_wins", "changed on b", "b"),
])
def test_a_conflict_is_decided_by_the_configured_winner(
        world: World, policy: str, kept: str, winner: str) -> None:
    a2b = world.applier("items", _two_way(conflict=policy))
    a2b([change("upsert", 1, 1, title="Widget", count=3)])
    world.execute("dst", "UPDATE items SET name = 'changed on b'")

    decisions = a2b([change("upsert", 1, 2, title="changed on a", count=3)])

    assert verdicts(decisions) == [Verdict.ACK]
    assert world.rows("dst", "SELECT name FROM items") == [(kept,)]
    [row] = world.state.conflict_rows(link="items")
    assert (row["policy"], row["winner"]) == (policy, winner)
    assert (row["a_values"]["title"], row["b_values"]["name"]) == ("changed on a", "changed on b")


def test_a_manual_conflict_is_dead_lettered_until_an_operator_picks_a_side(
        world: World) -> None:
    a2b = world.applier("items", _two_way(conflict="manual"))
    first = change("upsert", 1, 1, title="Widget", count=3)
    a2b([first])
    world.execute("dst", "UPDATE items SET name = 'changed on b'")

    second = change("upsert", 1, 2, title="changed on a", count=3)
    [dead] = a2b([second])

    assert (dead.verdict, dead.error_class) == (Verdict.DEAD, "Conflict")
    assert dead.error is not None and "both sides changed" in dead.error
    assert f"syncbus tx resolve {second.message_id} --keep a|b" in dead.error
    assert world.rows("dst", "SELECT name FROM items") == [("changed on b",)]
    [row] = world.state.conflict_rows(link="items", pending=True)
    assert row["policy"] == "manual"


# -- failures ---------------------------------------------------------------------------


def test_a_row_the_target_refuses_is_dead_with_its_error_and_the_rest_is_written(
        world: World) -> None:
    apply = world.applier("items", {"items": _items()})

    decisions = apply([change("upsert", 1, 1, title="Widget"),
                       change("upsert", 2, 1, title=None),
                       change("upsert", 3, 1, title="Gadget")])

    assert verdicts(decisions) == [Verdict.ACK, Verdict.DEAD, Verdict.ACK]
    refused = decisions[1]
    assert refused.error == "NOT NULL constraint failed: items.name"  # SQLite's own text
    assert (refused.error_class, refused.response) == ("RecordRejected",
                                                       "SQLITE_CONSTRAINT_NOTNULL")
    assert world.rows("dst", "SELECT id FROM items ORDER BY id") == [(1,), (3,)]


def test_a_value_the_map_does_not_know_is_dead_naming_the_field(world: World) -> None:
    fields = {"id": "id", "name": {"from": "title", "map": {"w": "Widget"}}}
    apply = world.applier("items", {"items": _items(fields=fields)})

    [dead] = apply([change("upsert", 1, 1, title="x")])

    assert (dead.verdict, dead.error_class) == (Verdict.DEAD, "MappingError")
    assert dead.error == ("target field 'name' (from source field 'title'): value not in "
                          "the map (known: 'w'); got 'x'")
    assert world.rows("dst", "SELECT id FROM items") == []


def test_an_event_of_another_source_is_dead_naming_the_field(world: World) -> None:
    apply = world.applier("items", {"items": _items()})

    [dead] = apply([change("upsert", 1, 1, entity="customers", code="C1")])

    assert (dead.verdict, dead.error_class) == (Verdict.DEAD, "SchemaError")
    assert dead.error is not None
    assert ("source \"/syncbus/src/customers\" is not this link's source '/syncbus/src/items'"
            in dead.error)
    assert world.rows("dst", "SELECT id FROM items") == []


def test_a_locked_target_is_retried_and_the_retry_writes(world: World, tmp_path: Path) -> None:
    apply = world.applier("items", {"items": _items()})
    batch = [change("upsert", 1, 1, title="Widget")]
    lock = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # another writer holds the database
        [retry] = apply(batch)
    finally:
        lock.close()

    assert (retry.verdict, retry.error_class) == (Verdict.RETRY, "TransientError")
    assert retry.error is not None and "database is locked" in retry.error
    assert verdicts(apply(batch)) == [Verdict.ACK]  # nothing was recorded as applied
    assert world.rows("dst", "SELECT name FROM items") == [("Widget",)]

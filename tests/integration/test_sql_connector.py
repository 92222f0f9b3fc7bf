"""SqlConnector against real databases: a SQLite file and a fresh PostgreSQL database.

Behaviour tests run on both dialects (the PostgreSQL ones are marked
``integration``). Changes are made through plain DBAPI connections, never through
the connector, to prove the database itself tracks them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from connectors.base import (
    ChangePage,
    ChangeRecord,
    Connector,
    Op,
    OutcomeStatus,
    SchemaError,
    TransientError,
    WriteRow,
)
from connectors.sql import SqlConnector

DDL = [
    """CREATE TABLE customers (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE,
        balance NUMERIC(12, 2), created TIMESTAMP, active BOOLEAN)""",
    """CREATE TABLE orders (
        id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers (id),
        code TEXT, total NUMERIC(12, 2))""",
    "CREATE UNIQUE INDEX orders_code ON orders (code)",
]


@dataclass
class Db:
    """A test database reached without the connector."""

    dialect: str
    url: str

    def connect(self) -> Any:
        """A plain DBAPI connection in manual-commit mode."""
        if self.dialect == "sqlite":
            conn = sqlite3.connect(make_url(self.url).database, isolation_level=None, timeout=10)
            conn.execute("BEGIN")
            return _SqliteTx(conn)
        import psycopg

        return psycopg.connect(make_url(self.url).set(drivername="postgresql")
                               .render_as_string(hide_password=False))

    def run(self, *statements: str) -> None:
        """Execute statements in one committed transaction."""
        conn = self.connect()
        try:
            for statement in statements:
                conn.execute(statement)
            conn.commit()
        finally:
            conn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.rollback()
            conn.close()

    def triggers(self) -> list[tuple[str, str]]:
        if self.dialect == "sqlite":
            sql = "SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'"
        else:
            sql = "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal"
        return sorted(self.query(sql))


class _SqliteTx:
    """sqlite3 with an explicit BEGIN, so it behaves like a psycopg connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str) -> sqlite3.Cursor:
        return self._conn.execute(sql)

    def commit(self) -> None:
        self._conn.execute("COMMIT")
        self._conn.execute("BEGIN")

    def rollback(self) -> None:
        self._conn.execute("ROLLBACK")
        self._conn.execute("BEGIN")

    def close(self) -> None:
        self._conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest, tmp_path: Any) -> Db:
    if request.param == "sqlite":
        database = Db("sqlite", f"sqlite:///{tmp_path / 'test.db'}")
    else:
        database = Db("postgresql", request.getfixturevalue("pg_url"))
    database.run(*DDL)
    return database


@pytest.fixture
def connector(db: Db) -> Iterator[SqlConnector]:
    conn = SqlConnector("test", db.url)
    yield conn
    conn.close()


@pytest.fixture
def pg(tmp_path: Any, request: pytest.FixtureRequest) -> Db:
    """PostgreSQL only, for the concurrency tests."""
    database = Db("postgresql", request.getfixturevalue("pg_url"))
    database.run(*DDL)
    return database


def read_all(connector: SqlConnector, entity: str, cursor: str | None,
             page_size: int = 100) -> tuple[list[ChangeRecord], str | None, list[ChangePage]]:
    pages = list(connector.read_changes(entity, cursor, page_size))
    records = [r for p in pages for r in p.records]
    return records, pages[-1].next_cursor, pages


def ops(records: list[ChangeRecord]) -> list[tuple[str, Any]]:
    return [(r.op.value, r.key["id"]) for r in records]


def customers(*ids: int) -> list[str]:
    return [f"INSERT INTO customers (id, name, email) VALUES ({i}, 'c{i}', 'c{i}@x')" for i in ids]


# ------------------------------------------------------------------ setup


def test_connector_implements_the_protocol(connector: SqlConnector) -> None:
    assert isinstance(connector, Connector)
    caps = connector.capabilities
    assert (caps.change_tracking, caps.deletes_tracked, caps.max_batch) == (True, True, 1000)


def test_prepare_tracking_is_idempotent(db: Db, connector: SqlConnector) -> None:
    db.run(*customers(1, 2))

    first = connector.prepare_tracking(["customers", "orders"])
    triggers = db.triggers()
    second = connector.prepare_tracking(["customers", "orders"])

    assert "customers: added column _sb_version" in first
    assert "customers: back-filled _sb_version of 2 existing row(s)" in first
    assert second == ["customers: already prepared", "orders: already prepared"]
    assert db.triggers() == triggers
    per_table = 4 if db.dialect == "sqlite" else 3
    assert len([t for t in triggers if t[0] == "customers"]) == per_table
    assert len(triggers) == 2 * per_table


def test_prepare_tracking_needs_a_primary_key_and_an_existing_table(
        db: Db, connector: SqlConnector) -> None:
    db.run("CREATE TABLE notes (body TEXT)")

    with pytest.raises(SchemaError, match="'notes' has no primary key"):
        connector.prepare_tracking(["customers", "notes"])
    with pytest.raises(SchemaError, match="did you mean 'customers'"):
        connector.prepare_tracking(["customer"])
    # all or nothing: customers was not prepared by the failed run
    assert not connector.describe(["customers"])[0].change_tracking


# ------------------------------------------------------------------ change feed


def test_initial_load_then_plain_sql_changes_in_version_order(
        db: Db, connector: SqlConnector) -> None:
    db.run(*customers(1, 2, 3))
    connector.prepare_tracking(["customers"])

    initial, cursor, _ = read_all(connector, "customers", None)
    db.run("UPDATE customers SET name = 'two' WHERE id = 2")
    db.run("DELETE FROM customers WHERE id = 1")
    db.run(*customers(4))
    db.run("UPDATE customers SET balance = 7.5 WHERE id = 4")
    changes, _, _ = read_all(connector, "customers", cursor)

    assert ops(initial) == [("upsert", 1), ("upsert", 2), ("upsert", 3)]
    assert ops(changes) == [("upsert", 2), ("delete", 1), ("upsert", 4)]
    versions = [int(r.version) for r in initial + changes]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    two, gone, four = changes
    assert two.values == {"id": 2, "name": "two", "email": "c2@x", "balance": None,
                          "created": None, "active": None}
    assert gone.values is None and gone.key == {"id": 1}
    assert four.values is not None and four.values["balance"] == Decimal("7.50")
    assert all(r.modified_at is None for r in changes)


def test_changes_in_one_transaction_and_a_changed_key(db: Db, connector: SqlConnector) -> None:
    db.run(*customers(1, 2))
    connector.prepare_tracking(["customers"])
    _, cursor, _ = read_all(connector, "customers", None)

    db.run("UPDATE customers SET id = 20 WHERE id = 2",
           "DELETE FROM customers WHERE id = 1",
           *customers(1))
    changes, _, _ = read_all(connector, "customers", cursor)

    assert sorted(ops(changes)) == [("delete", 1), ("delete", 2), ("upsert", 1), ("upsert", 20)]
    by_op = [(r.op, r.key["id"]) for r in changes]
    assert by_op.index((Op.DELETE, 1)) < by_op.index((Op.UPSERT, 1))  # delete, then re-insert


def test_paging_resumes_exactly_without_gaps_or_duplicates(
        db: Db, connector: SqlConnector) -> None:
    db.run(*customers(*range(1, 21)))
    connector.prepare_tracking(["customers"])
    _, cursor, _ = read_all(connector, "customers", None)
    db.run(*[f"UPDATE customers SET name = 'u{i}' WHERE id = {i}" for i in range(1, 21, 2)])
    db.run(*[f"DELETE FROM customers WHERE id = {i}" for i in range(2, 21, 4)])
    db.run(*customers(*range(21, 26)))

    records, _, pages = read_all(connector, "customers", cursor, page_size=7)

    assert [len(p.records) for p in pages] == [7, 7, 6]
    assert [p.more for p in pages] == [True, True, False]
    versions = [int(r.version) for r in records]
    assert versions == sorted(set(versions))
    assert sorted(ops(records)) == sorted(
        [("upsert", i) for i in range(1, 21, 2)] + [("delete", i) for i in range(2, 21, 4)]
        + [("upsert", i) for i in range(21, 26)]
    )
    # A detector that stops after each page and resumes from its cursor sees the same.
    resumed: list[ChangeRecord] = []
    position = cursor
    while True:
        page = next(iter(connector.read_changes("customers", position, 7)))
        resumed += page.records
        position = page.next_cursor
        if not page.more:
            break
    assert resumed == records


def test_has_changes_is_false_once_everything_is_consumed(db: Db, connector: SqlConnector) -> None:
    connector.prepare_tracking(["customers"])
    assert connector.has_changes("customers", None) is False

    db.run(*customers(1))
    assert connector.has_changes("customers", None) is True
    _, cursor, _ = read_all(connector, "customers", None)
    assert connector.has_changes("customers", cursor) is False

    db.run("DELETE FROM customers WHERE id = 1")
    assert connector.has_changes("customers", cursor) is True
    records, cursor, _ = read_all(connector, "customers", cursor)
    assert ops(records) == [("delete", 1)]
    assert connector.has_changes("customers", cursor) is False
    # an empty read still returns a cursor to store
    records, cursor, pages = read_all(connector, "customers", cursor)
    assert records == [] and len(pages) == 1 and cursor
    assert connector.has_changes("customers", cursor) is False


def test_unprepared_table_and_foreign_cursor_are_schema_errors(connector: SqlConnector) -> None:
    with pytest.raises(SchemaError, match="not prepared"):
        connector.read_changes("customers", None, 10)
    connector.prepare_tracking(["customers"])
    with pytest.raises(SchemaError, match="not a cursor"):
        connector.read_changes("customers", "12345", 10)
    with pytest.raises(SchemaError, match="unknown entity 'nope'"):
        connector.has_changes("nope", None)


def test_snapshot_streams_every_key_with_its_version(db: Db, connector: SqlConnector) -> None:
    db.run(*customers(*range(1, 2501)))
    connector.prepare_tracking(["customers"])
    db.run("DELETE FROM customers WHERE id = 7")
    feed, _, _ = read_all(connector, "customers", None, page_size=1000)

    snap = list(connector.snapshot("customers"))

    assert [k["id"] for k, _ in snap] == [i for i in range(1, 2501) if i != 7]
    assert {r.key["id"]: r.version for r in feed if r.op is Op.UPSERT} == {
        k["id"]: v for k, v in snap}


# ------------------------------------------------------------------ PostgreSQL concurrency


def _pg_tx(pg: Db) -> Any:
    return pg.connect()


@pytest.mark.integration
def test_pg_late_commit_of_a_lower_version_is_not_lost(pg: Db) -> None:
    """The MIN_ACTIVE_ROWVERSION trap: T1 takes the lower version but commits after a
    poll that already returned T2's higher version."""
    connector = SqlConnector("pg", pg.url)
    try:
        connector.prepare_tracking(["customers"])
        _, cursor, _ = read_all(connector, "customers", None)
        t1, t2 = _pg_tx(pg), _pg_tx(pg)
        try:
            t1.execute("INSERT INTO customers (id, name) VALUES (100, 'slow')")
            t2.execute("INSERT INTO customers (id, name) VALUES (101, 'fast')")
            t2.commit()

            seen, cursor, _ = read_all(connector, "customers", cursor)
            assert ops(seen) == [("upsert", 101)]
            t1.commit()
        finally:
            t1.close()
            t2.close()

        assert connector.has_changes("customers", cursor)
        late, cursor, _ = read_all(connector, "customers", cursor)
        assert ops(late) == [("upsert", 100)]
        assert int(late[0].version) < int(seen[0].version)  # a version cursor would skip it
        assert not connector.has_changes("customers", cursor)
    finally:
        connector.close()


@pytest.mark.integration
def test_pg_window_stays_fixed_while_paging(pg: Db) -> None:
    connector = SqlConnector("pg", pg.url)
    try:
        pg.run(*customers(1, 2, 3))
        connector.prepare_tracking(["customers"])
        pages = connector.read_changes("customers", None, 2)
        first = next(pages)
        pg.run(*customers(4))  # commits mid-window
        pg.run("UPDATE customers SET name = 'x' WHERE id = 3")  # moves 3 to the next window
        rest = list(pages)
        window = first.records + [r for p in rest for r in p.records]
        following, _, _ = read_all(connector, "customers", rest[-1].next_cursor)

        assert ops(window) == [("upsert", 1), ("upsert", 2)]
        assert ops(following) == [("upsert", 4), ("upsert", 3)]
    finally:
        connector.close()


@pytest.mark.integration
def test_pg_changes_made_inside_a_savepoint_wait_for_the_top_level_commit(pg: Db) -> None:
    connector = SqlConnector("pg", pg.url)
    try:
        connector.prepare_tracking(["customers"])
        _, cursor, _ = read_all(connector, "customers", None)
        tx = _pg_tx(pg)
        try:
            tx.execute("SAVEPOINT s1")
            tx.execute("INSERT INTO customers (id, name) VALUES (7, 'sub')")
            tx.execute("RELEASE SAVEPOINT s1")
            seen, cursor, _ = read_all(connector, "customers", cursor)
            tx.commit()
        finally:
            tx.close()
        late, _, _ = read_all(connector, "customers", cursor)

        assert seen == []
        assert ops(late) == [("upsert", 7)]
    finally:
        connector.close()


@pytest.mark.integration
def test_pg_schema_option_keeps_everything_in_that_schema(pg: Db) -> None:
    pg.run("CREATE SCHEMA sales",
           "CREATE TABLE sales.deals (id INTEGER PRIMARY KEY, title TEXT NOT NULL)",
           "INSERT INTO sales.deals VALUES (1, 'one')")
    connector = SqlConnector("pg", pg.url, schema="sales")
    try:
        connector.prepare_tracking(["deals"])
        assert [e.name for e in connector.describe()] == ["deals"]
        outcomes = connector.upsert("deals", [WriteRow({"id": 2}, {"title": "two"})])
        pg.run("DELETE FROM sales.deals WHERE id = 1")
        records, _, _ = read_all(connector, "deals", None)

        assert [o.ok for o in outcomes] == [True]
        assert ops(records) == [("upsert", 2), ("delete", 1)]
        assert pg.query("SELECT count(*) FROM sales._syncbus_tombstones") == [(1,)]
        assert pg.query("SELECT to_regclass('public._syncbus_tombstones')") == [(None,)]
    finally:
        connector.close()


# ------------------------------------------------------------------ SQLite specifics


def test_sqlite_update_trigger_does_not_loop_even_with_recursive_triggers(tmp_path: Any) -> None:
    db = Db("sqlite", f"sqlite:///{tmp_path / 'r.db'}")
    db.run(*DDL, *customers(1))
    connector = SqlConnector("lite", db.url)
    try:
        connector.prepare_tracking(["customers"])
        raw = sqlite3.connect(str(tmp_path / "r.db"))
        raw.execute("PRAGMA recursive_triggers = ON")
        raw.execute("UPDATE customers SET name = 'again' WHERE id = 1")
        raw.commit()
        raw.close()
        assert db.query("SELECT value FROM _syncbus_counter") == [(2,)]
        assert db.query("SELECT _sb_version FROM customers") == [(2,)]
    finally:
        connector.close()


def test_sqlite_locked_database_is_a_transient_error(tmp_path: Any) -> None:
    db = Db("sqlite", f"sqlite:///{tmp_path / 'l.db'}")
    db.run(*DDL)
    connector = SqlConnector("lite", db.url, busy_timeout=0.05)
    connector.describe()  # first connection switches the file to WAL
    holder = sqlite3.connect(str(tmp_path / "l.db"), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(TransientError, match="locked"):
            connector.upsert("customers", [WriteRow({"id": 1}, {"name": "a"})])
    finally:
        holder.close()
        connector.close()


# ------------------------------------------------------------------ metadata


def test_describe_reports_types_keys_unique_keys_and_references(
        db: Db, connector: SqlConnector) -> None:
    before = {e.name: e for e in connector.describe()}
    connector.prepare_tracking(["customers"])
    after = {e.name: e for e in connector.describe()}

    assert sorted(after) == ["customers", "orders"]  # no _syncbus_* tables
    cust, orders = after["customers"], after["orders"]
    assert [(f.name, f.type, f.nullable, f.key) for f in cust.fields] == [
        ("id", "integer", False, True), ("name", "string", False, False),
        ("email", "string", True, False), ("balance", "decimal", True, False),
        ("created", "datetime", True, False), ("active", "boolean", True, False),
    ]
    assert cust.key == ("id",) and cust.unique_keys == (("email",),)
    assert orders.unique_keys == (("code",),)  # from a unique index
    customer_id = orders.field("customer_id")
    assert customer_id is not None and customer_id.references == "customers"
    assert (before["customers"].change_tracking, cust.change_tracking) == (False, True)
    assert not orders.change_tracking
    assert before["customers"].fields == cust.fields  # _sb_* columns stay hidden


def test_describe_unknown_entity_lists_what_exists(connector: SqlConnector) -> None:
    with pytest.raises(SchemaError) as info:
        connector.describe(["ordres"])
    assert "unknown entity 'ordres'" in str(info.value)
    assert "did you mean 'orders'" in str(info.value)
    assert "customers, orders" in str(info.value)


# ------------------------------------------------------------------ writing


def test_upsert_inserts_then_updates_idempotently(db: Db, connector: SqlConnector) -> None:
    rows = [WriteRow({"id": i}, {"name": f"n{i}", "balance": f"{i}.50"}) for i in (1, 2, 3)]

    assert all(o.ok for o in connector.upsert("customers", rows))
    assert all(o.ok for o in connector.upsert("customers", rows))  # repeated: same result
    first = db.query("SELECT id, name, balance FROM customers ORDER BY id")
    changed = [WriteRow({"id": 2}, {"id": 2, "name": "two", "balance": "9"})]  # key in values too
    assert [o.ok for o in connector.upsert("customers", changed)] == [True]

    assert [(r[0], r[1], Decimal(str(r[2]))) for r in first] == [
        (1, "n1", Decimal("1.5")), (2, "n2", Decimal("2.5")), (3, "n3", Decimal("3.5"))]
    assert db.query("SELECT name, email FROM customers WHERE id = 2") == [("two", None)]


def test_not_null_violation_rejects_one_row_and_applies_nine(
        db: Db, connector: SqlConnector) -> None:
    connector.prepare_tracking(["customers"])  # a tracked target: our writes are changes too
    rows = [WriteRow({"id": i}, {"name": None if i == 4 else f"n{i}"}) for i in range(10)]

    outcomes = connector.upsert("customers", rows)
    feed, _, _ = read_all(connector, "customers", None)

    assert [o.status for o in outcomes].count(OutcomeStatus.APPLIED) == 9
    bad = outcomes[4]
    assert bad.status is OutcomeStatus.PERMANENT
    if db.dialect == "sqlite":
        assert bad.error == "NOT NULL constraint failed: customers.name"
    else:
        assert bad.error is not None
        assert bad.error.startswith('null value in column "name" of relation "customers"')
        assert bad.code == "23502"
    assert "INSERT" not in (bad.error or "")
    assert db.query("SELECT count(*) FROM customers") == [(9,)]
    assert sorted(r.key["id"] for r in feed) == [0, 1, 2, 3, 5, 6, 7, 8, 9]


def test_values_are_coerced_from_their_json_form(db: Db, connector: SqlConnector) -> None:
    outcomes = connector.upsert("customers", [
        WriteRow({"id": 1}, {"name": "a", "created": "2024-03-04T05:06:07Z",
                             "balance": "12.34", "active": "true"}),
        WriteRow({"id": "2"}, {"name": "b", "created": "2024-03-04T07:06:07+02:00",
                               "balance": 5, "active": False}),
        WriteRow({"id": 3}, {"name": "c", "balance": "12,34"}),
        WriteRow({"id": 4}, {"name": "d", "created": "yesterday"}),
    ])
    connector.prepare_tracking(["customers"])
    records, _, _ = read_all(connector, "customers", None)

    assert [o.ok for o in outcomes] == [True, True, False, False]
    assert outcomes[2].error is not None and "'balance'" in outcomes[2].error
    assert "'12,34'" in outcomes[2].error
    assert outcomes[3].error is not None and "'created'" in outcomes[3].error
    one, two = (r.values for r in records)
    assert one is not None and two is not None
    assert one["created"] == datetime(2024, 3, 4, 5, 6, 7)  # naive column: stored as UTC
    assert two["created"] == datetime(2024, 3, 4, 5, 6, 7)
    assert (one["balance"], two["balance"]) == (Decimal("12.34"), Decimal("5.00"))
    assert (one["active"], two["active"]) == (True, False)


def test_upsert_by_unique_key_and_refusal_of_a_non_unique_key(
        db: Db, connector: SqlConnector) -> None:
    db.run(*customers(1))
    assert connector.upsert("orders", [WriteRow({"code": "A"}, {"id": 1, "total": "1"})])[0].ok

    by_code = connector.upsert("orders", [WriteRow({"code": "A"}, {"id": 1, "total": "2.5"})])
    not_unique = connector.upsert("orders", [WriteRow({"total": "2.5"}, {"code": "B"})])
    unknown = connector.upsert("orders", [WriteRow({"id": 2}, {"colour": "red"})])
    fk = connector.upsert("orders", [WriteRow({"id": 3}, {"customer_id": 999})])

    assert by_code[0].ok
    assert db.query("SELECT id, code, total FROM orders")[0][:2] == (1, "A")
    assert not_unique[0].status is OutcomeStatus.PERMANENT
    assert "neither the primary key nor a unique key" in (not_unique[0].error or "")
    assert "no column(s) colour" in (unknown[0].error or "")
    assert fk[0].status is OutcomeStatus.PERMANENT
    assert (fk[0].code == "23503") if db.dialect == "postgresql" else (
        "FOREIGN KEY constraint failed" in (fk[0].error or ""))


def test_delete_present_and_missing_keys(db: Db, connector: SqlConnector) -> None:
    db.run(*customers(1, 2, 3))
    connector.prepare_tracking(["customers"])
    _, cursor, _ = read_all(connector, "customers", None)

    outcomes = connector.delete("customers", [{"id": 1}, {"id": 99}, {"id": "3"}, {"nope": 1}])

    assert [o.status for o in outcomes] == [OutcomeStatus.APPLIED] * 3 + [OutcomeStatus.PERMANENT]
    assert db.query("SELECT id FROM customers") == [(2,)]
    changes, _, _ = read_all(connector, "customers", cursor)
    assert ops(changes) == [("delete", 1), ("delete", 3)]


def test_delete_refused_by_a_foreign_key_is_permanent_for_that_key_only(
        db: Db, connector: SqlConnector) -> None:
    db.run(*customers(1, 2), "INSERT INTO orders (id, customer_id) VALUES (1, 1)")

    outcomes = connector.delete("customers", [{"id": 1}, {"id": 2}])

    assert [o.status for o in outcomes] == [OutcomeStatus.PERMANENT, OutcomeStatus.APPLIED]
    assert db.query("SELECT id FROM customers") == [(1,)]


def test_last_write_of_a_record_wins_even_across_column_sets(
        db: Db, connector: SqlConnector) -> None:
    rows = [WriteRow({"id": 1}, {"name": "a"}),
            WriteRow({"id": 1}, {"name": "b", "balance": "1"}),
            WriteRow({"id": 2}, {"name": "x"}),
            WriteRow({"id": 1}, {"name": "c"})]

    assert all(o.ok for o in connector.upsert("customers", rows))
    assert db.query("SELECT id, name FROM customers ORDER BY id") == [(1, "c"), (2, "x")]


def test_purge_tombstones_removes_only_old_ones(db: Db, connector: SqlConnector) -> None:
    db.run(*customers(1, 2))
    connector.prepare_tracking(["customers"])
    db.run("DELETE FROM customers")

    assert connector.purge_tombstones(timedelta(days=1)) == 0
    assert connector.purge_tombstones(timedelta(0)) == 2
    assert db.query("SELECT count(*) FROM _syncbus_tombstones") == [(0,)]


def test_a_column_added_after_the_first_write_is_picked_up(db: Db, connector: SqlConnector) -> None:
    assert connector.upsert("customers", [WriteRow({"id": 1}, {"name": "a"})])[0].ok
    db.run("ALTER TABLE customers ADD COLUMN phone TEXT")

    assert connector.upsert("customers", [WriteRow({"id": 1}, {"name": "a", "phone": "12"})])[0].ok
    assert db.query("SELECT phone FROM customers") == [("12",)]

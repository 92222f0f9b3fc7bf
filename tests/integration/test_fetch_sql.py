"""SqlConnector.fetch against a real SQLite file and a fresh PostgreSQL database.

Rows are written through plain DBAPI connections (never through the connector), then
read back both ways: through the change feed and by key. Both must give the very
same record, whatever the column types.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from connectors.base import ChangeRecord, ConnectorUnavailable, FetchedRecord, SchemaError
from connectors.sql import SqlConnector
from connectors.sql.fetch import FETCH_CHUNK


def _ddl(dialect: str) -> list[str]:
    binary = "BLOB" if dialect == "sqlite" else "BYTEA"
    return [
        f"""CREATE TABLE items (
            id INTEGER PRIMARY KEY, sku TEXT NOT NULL UNIQUE, region TEXT, code INTEGER,
            price NUMERIC(12, 2), seen TIMESTAMP, born DATE, active BOOLEAN,
            weight DOUBLE PRECISION, data {binary}, UNIQUE (region, code))""",
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
    ]


class Db:
    """A test database reached without the connector."""

    def __init__(self, dialect: str, url: str) -> None:
        self.dialect = dialect
        self.url = url

    def run(self, *statements: str) -> None:
        """Execute statements in one committed transaction."""
        if self.dialect == "sqlite":
            with sqlite3.connect(str(make_url(self.url).database), timeout=10) as lite:
                for statement in statements:
                    lite.execute(statement)
            lite.close()
            return
        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn) as pg:
            for statement in statements:
                pg.execute(statement)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest, tmp_path: Any) -> Db:
    if request.param == "sqlite":
        database = Db("sqlite", f"sqlite:///{tmp_path / 'fetch.db'}")
    else:
        database = Db("postgresql", request.getfixturevalue("pg_url"))
    database.run(*_ddl(database.dialect))
    return database


@pytest.fixture
def connector(db: Db) -> Iterator[SqlConnector]:
    conn = SqlConnector("shop", db.url)
    yield conn
    conn.close()


def _blob(db: Db, hex_text: str) -> str:
    return f"X'{hex_text}'" if db.dialect == "sqlite" else f"'\\x{hex_text}'::bytea"


def _items(db: Db, ids: range | list[int]) -> list[str]:
    return [
        "INSERT INTO items (id, sku, region, code, price, seen, born, active, weight, data) "
        f"VALUES ({i}, 'SKU-{i}', 'r{i % 3}', {i}, {i}.5, '2026-03-0{1 + i % 9} 10:11:12.250', "
        f"'2001-02-0{1 + i % 9}', {'TRUE' if i % 2 else 'FALSE'}, {i}.25, {_blob(db, 'ab01')})"
        for i in ids
    ]


def _changes(connector: SqlConnector, entity: str) -> dict[int, ChangeRecord]:
    pages = connector.read_changes(entity, None, 500)
    return {r.key["id"]: r for page in pages for r in page.records}


def _same(fetched: FetchedRecord | None, change: ChangeRecord) -> bool:
    """Equal, and in the same Python types (repr tells True from 1 and 1.50 from 1.5)."""
    return fetched is not None and repr((fetched.key, fetched.values, fetched.version)) == repr(
        (change.key, change.values, change.version))


def test_a_fetched_record_equals_its_change_record(db: Db, connector: SqlConnector) -> None:
    db.run(*_items(db, [1, 2]), "INSERT INTO items (id, sku) VALUES (3, 'SKU-3')")
    connector.prepare_tracking(["items"])
    db.run("UPDATE items SET price = 9.99, active = TRUE WHERE id = 2")

    changes = _changes(connector, "items")
    fetched = connector.fetch("items", [{"id": 1}, {"id": 2}, {"id": 3}])

    assert [_same(f, changes[i]) for i, f in zip([1, 2, 3], fetched, strict=True)] == [True] * 3
    two = fetched[1]
    assert two is not None and str(two.values["price"]) == "9.99" and two.values["active"] is True
    assert fetched[2] is not None and fetched[2].values["seen"] is None
    assert all(f is not None and f.modified_at is None for f in fetched)


def test_fetch_by_unique_key_composite_key_and_json_shaped_values(
        db: Db, connector: SqlConnector) -> None:
    db.run(*_items(db, range(1, 6)))
    connector.prepare_tracking(["items"])
    changes = _changes(connector, "items")

    fetched = connector.fetch("items", [
        {"sku": "SKU-4"},
        {"code": 2, "region": "r2"},    # a unique key of two columns, in any order
        {"region": "r1", "code": "4"},  # JSON-shaped: "4" is coerced like upsert does
        {"id": "5"},
        {"region": "r0", "code": 4},    # no such combination
    ])

    assert _same(fetched[0], changes[4]) and fetched[0] is not None
    assert fetched[0].key == {"id": 4}  # the connector's own key, whatever was asked
    assert _same(fetched[1], changes[2])
    assert _same(fetched[2], changes[4])
    assert _same(fetched[3], changes[5])
    assert fetched[4] is None


def test_missing_keys_are_none_in_place_and_duplicates_repeat(
        db: Db, connector: SqlConnector) -> None:
    db.run(*_items(db, [1, 2]))
    connector.prepare_tracking(["items"])

    fetched = connector.fetch("items", [
        {"id": 99}, {"id": 2}, {"sku": "nope"}, {"id": 2}, {"id": None}, {"id": "abc"}, {"id": 1},
    ])

    assert [f.key["id"] if f else None for f in fetched] == [None, 2, None, 2, None, None, 1]
    assert connector.fetch("items", []) == []


def test_a_batch_of_many_keys_takes_one_query_per_chunk(db: Db, connector: SqlConnector) -> None:
    db.run(*_items(db, range(1, 1101)))
    connector.prepare_tracking(["items"])
    changes = _changes(connector, "items")
    wanted = list(range(1, 1201, 2)) + list(range(2, 1201, 2))  # 1200 keys, 100 missing
    random.Random(7).shuffle(wanted)
    selects: list[str] = []
    engine = connector._engine  # counting the round trips needs the engine itself

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        fetched = connector.fetch("items", [{"id": i} for i in wanted])
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)

    for i, record in zip(wanted, fetched, strict=True):
        if i > 1100:
            assert record is None, i
        else:
            assert _same(record, changes[i]), i
    assert len(selects) == -(-len(wanted) // FETCH_CHUNK)


def test_an_unprepared_table_is_fetched_without_a_version(db: Db, connector: SqlConnector) -> None:
    db.run("INSERT INTO notes (id, body) VALUES (1, 'hello')")

    fetched = connector.fetch("notes", [{"id": 1}, {"id": 2}])

    assert fetched == [FetchedRecord(key={"id": 1}, values={"id": 1, "body": "hello"}), None]


def test_a_version_moves_on_with_each_change(db: Db, connector: SqlConnector) -> None:
    db.run(*_items(db, [1]))
    connector.prepare_tracking(["items"])
    before = connector.fetch("items", [{"id": 1}])[0]

    db.run("UPDATE items SET sku = 'SKU-ONE' WHERE id = 1")
    after = connector.fetch("items", [{"sku": "SKU-ONE"}])[0]

    assert before is not None and after is not None
    assert int(after.version or 0) > int(before.version or 0)
    assert after.values["sku"] == "SKU-ONE"
    assert connector.fetch("items", [{"sku": "SKU-1"}]) == [None]


def test_unknown_table_column_or_non_unique_key_is_a_schema_error(
        db: Db, connector: SqlConnector) -> None:
    with pytest.raises(SchemaError, match="unknown entity 'itemz'.*did you mean 'items'") as table:
        connector.fetch("itemz", [{"id": 1}])
    with pytest.raises(SchemaError, match="'items' has no column.* colour") as column:
        connector.fetch("items", [{"id": 1}, {"colour": "red"}])
    with pytest.raises(SchemaError, match=r"key \(region\) is neither the primary key"):
        connector.fetch("items", [{"region": "r1"}])

    assert table.value.entity == "itemz" and column.value.entity == "items"


def test_unreachable_databases_raise_connector_unavailable(tmp_path: Any) -> None:
    pg = SqlConnector("erp", "postgresql+psycopg://sync:hunter2@127.0.0.1:1/erp?connect_timeout=2")
    lite = SqlConnector("lite", f"sqlite:///{tmp_path}/missing/dir/x.db")
    try:
        with pytest.raises(ConnectorUnavailable) as down:
            pg.fetch("items", [{"id": 1}])
        with pytest.raises(ConnectorUnavailable, match="unable to open"):
            lite.fetch("items", [{"id": 1}])
    finally:
        pg.close()
        lite.close()
    assert "hunter2" not in str(down.value)

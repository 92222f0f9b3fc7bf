# ruff: noqa: F811 - the tests take the imported ``sides`` fixture by name
"""Filter, soft-delete and lookup semantics found by trying syncbus against the seeds.

Resco CRM Sync's meaning: a sync filter decides which records take part, an upload
filter only decides what is uploaded (it never deletes on the server), a soft delete
marks the existing row, and a record whose parent is filtered out is settled at once.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from typer.testing import CliRunner

from bus.cli import app
from bus.cli.main import cli
from bus.config.load import load_config
from bus.ops.txlog import TxLog
from tests.integration.test_twoway_sql import (  # noqa: F401 - the fixture is used by name
    _a_accounts,
    _b_accounts,
    _exec,
    _settle,
    sides,
)
from tests.syncenv import insert_items, make_env, table_rows


def test_an_upload_filter_never_deletes_on_side_a_unless_asked(sides):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status) VALUES ('U1', 'one', 'A'), "
             "('U2', 'two', 'A')")
    # The link deletes records that leave its (a → b) sync filter; b → a has an upload filter.
    worker = make(filter="status == 'A'", filter_action="delete",
                  b2a={"filter": "title != 'private'"})
    try:
        _settle(worker)
        assert set(_b_accounts(b)) == {"U1", "U2"}
        _exec(b, "UPDATE accounts SET title = 'private' WHERE number = 'U1'")  # leaves it
        _settle(worker)
        assert set(_a_accounts(a)) == {"U1", "U2"}, "the upload filter deleted a master record"
    finally:
        worker.close()


def test_an_upload_filter_deletes_on_side_a_only_as_an_explicit_choice(sides, tmp_path):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status) VALUES ('E1', 'one', 'A')")
    worker = make(b2a={"filter": "title != 'private'", "filter_action": "delete"})
    try:
        _settle(worker)
        _exec(b, "UPDATE accounts SET title = 'private' WHERE number = 'E1'")
        _settle(worker)
        assert "E1" not in _a_accounts(a)
        result = CliRunner().invoke(cli, ["validate", "--config", str(worker.config_path)])
        assert "leaves the upload filter is DELETED in a.accounts (side a)" in result.output
    finally:
        worker.close()


def test_a_change_of_only_an_unmapped_filter_field_moves_the_record(sides):
    """is_deleted is no mapped field: before, its change counted as an echo."""
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status) VALUES ('M1', 'one', 'A'), "
             "('M2', 'two', 'A')")
    worker = make(filter="is_deleted == 0", filter_action="delete")
    try:
        _settle(worker)
        assert set(_b_accounts(b)) == {"M1", "M2"}
        _exec(a, "UPDATE accounts SET is_deleted = 1 WHERE code = 'M1'")  # leaves the filter
        _settle(worker)
        assert set(_b_accounts(b)) == {"M2"}
        _exec(a, "UPDATE accounts SET is_deleted = 0 WHERE code = 'M1'")  # enters it again
        _settle(worker)
        assert set(_b_accounts(b)) == {"M1", "M2"}
    finally:
        worker.close()


def test_a_child_whose_parent_is_filtered_out_is_settled_at_once(sides):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status) VALUES ('P1', 'active', 'A'), "
             "('P2', 'inactive', 'I')")
    _exec(a, "INSERT INTO contacts (code, name, account_id) VALUES "
             "('C1', 'of active', (SELECT id FROM accounts WHERE code = 'P1')), "
             "('C2', 'of inactive', (SELECT id FROM accounts WHERE code = 'P2'))")
    worker = make(filter="status == 'A'")
    try:
        started = time.monotonic()
        summary = _settle(worker)
        assert time.monotonic() - started < 60  # not retried until the offline window ends
        assert not summary.timed_out
        with b.connect() as conn:
            people = set(conn.scalars(sa.text("SELECT code FROM people")))
        assert people == {"C1"}  # skipped (the default), nothing dead-lettered
        log = TxLog(worker.config)
        assert log.select("error") == []
        log.close()
    finally:
        worker.close()


def test_a_child_whose_parent_is_filtered_out_can_be_dead_lettered_with_the_reason(
        sides, tmp_path):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status) VALUES ('Q2', 'inactive', 'I')")
    _exec(a, "INSERT INTO contacts (code, name, account_id) VALUES "
             "('D2', 'of inactive', (SELECT id FROM accounts WHERE code = 'Q2'))")
    worker = make(filter="status == 'A'")
    worker.close()
    path = worker.config_path
    text = path.read_text().replace("      max_attempts: 6\n", "      max_attempts: 6\n"
                                    "    filtered_parents: dead\n")
    path.write_text(text)
    config = load_config(path).config
    assert config.links["contacts"].filtered_parents == "dead"
    code = app.run(path, until_idle=True, max_wait=60, echo=lambda _l: None)
    assert code == app.EXIT_FAILED
    log = TxLog(config)
    [tx] = log.select("error")
    log.close()
    assert "parent filtered out: account_id: the 'accounts' record with key" in (tx.error or "")
    assert "left out by link 'accounts''s filter" in (tx.error or "")


NOT_NULL_TARGET = """CREATE TABLE items (
    id BIGINT PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL,
    price NUMERIC(12, 2), updated TIMESTAMP, deleted BOOLEAN NOT NULL DEFAULT false)"""


def test_a_soft_delete_marks_the_row_without_writing_nulls(tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, target_ddl=NOT_NULL_TARGET,
                   link={"deletes": "soft", "soft_delete": {"field": "deleted", "value": True},
                         "fields": {"id": "id", "name": "name", "qty": "qty",
                                    "price": "price", "updated": "updated"}})
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 11))
    assert app.setup(env.config_path, echo=lambda _l: None) == app.EXIT_OK
    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lambda _l: None) == 0
    before = table_rows(dst, columns=("id", "name", "qty"))
    with src.begin() as conn:
        conn.execute(sa.text("DELETE FROM items WHERE id IN (2, 3)"))
    lines: list[str] = []
    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lines.append) == 0, lines
    assert table_rows(dst, columns=("id", "name", "qty")) == before  # nothing nulled
    marked = table_rows(dst, columns=("id", "deleted"))
    assert {k for k, (d,) in marked.items() if d} == {2, 3}


def test_a_key_named_no_is_read_as_text(tmp_path):
    path = tmp_path / "sync.yaml"
    path.write_text("""connections:
  bc: {type: sql, url: "sqlite:///a.db"}
  hub: {type: sql, url: "sqlite:///b.db"}
links:
  items:
    source: {connection: bc, entity: items}
    target: {connection: hub, entity: items}
    key: No
    enabled: yes
""")
    link = load_config(path).config.links["items"]
    assert link.key == ["No"]
    assert link.enabled is True  # boolean settings still take yes/no

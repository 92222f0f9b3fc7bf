"""``syncbus preview``: the counts equal what the following real sync does, and the
preview itself writes nothing (target, state store, broker, connector bookkeeping).

Each scenario: sync once, change the source (inserts, updates, no-op updates,
deletes, records a filter skips, a record created and deleted between two polls,
a record changed twice), snapshot everything, preview, check that nothing moved,
then sync for real and compare the preview record by record with what changed in
the target.
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from kombu import Connection
from typer.testing import CliRunner

from bus.cli.main import cli
from bus.config.load import load_config
from bus.ops.preview import PreviewReport, preview
from bus.worker.worker import RunSummary, Worker
from connectors.base import WriteRow
from connectors.dataverse import DataverseConnector
from connectors.dataverse.emulator import DataverseEmulator, Limits
from consumers.apply import ApplyStats
from tests.syncenv import ITEMS_DDL, insert_items, table_rows

pytestmark = pytest.mark.integration

RETRY = {"delays": [0.3, 0.6], "max_attempts": 6}


# -- helpers ------------------------------------------------------------------------------


def _write_config(tmp: Path, amqp_url: str, connections: dict[str, Any],
                  links: dict[str, Any], *, state_url: str | None = None) -> Path:
    """A config file: connections given as a SQL URL (or a whole connection), link sides
    as ``connection.entity``."""

    def side(text: str) -> dict[str, str]:
        connection, _, entity = text.partition(".")
        return {"connection": connection, "entity": entity}

    config = {
        "broker": {"url": amqp_url},
        "state": {"url": state_url or f"sqlite:///{tmp}/state.db"},
        "connections": {name: {"type": "sql", "url": c} if isinstance(c, str) else c
                        for name, c in connections.items()},
        "links": {name: {"poll_interval": 0.5, "retry": RETRY, **link,
                         "source": side(link["source"]), "target": side(link["target"])}
                  for name, link in links.items()},
    }
    path = tmp / "sync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _sql(engine: sa.Engine, *statements: str) -> None:
    """Run ``statements`` in one transaction."""
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _prepare(path: Path) -> None:
    worker = Worker(load_config(path).config)
    try:
        worker.prepare_sources()
    finally:
        worker.close()


def _sync(path: Path) -> tuple[RunSummary, dict[str, ApplyStats]]:
    """One `run --until-idle`; the summary and each direction's applier totals."""
    worker = Worker(load_config(path).config)
    worker.open()
    try:
        summary = worker.run_until_idle(max_wait=120)
        stats = {applier.flow.name: applier.stats for _, applier in worker.consumers}
    finally:
        worker.close()
    assert summary.ok, summary
    return summary, stats


def _preview(path: Path, link: str, direction: str | None = None) -> PreviewReport:
    """Every record (the sample holds them all), no broker notes expected."""
    report = preview(load_config(path).config, link, direction, limit=100_000)
    assert report.queued == 0, report.notes
    return report


def _state(url: str) -> dict[str, list[str]]:
    """Every row of every state-store table (absent tables: absent keys)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            names = [t for t in sa.inspect(conn).get_table_names() if t.startswith("syncbus_")]
            return {t: sorted(repr(tuple(r)) for r in conn.execute(sa.text(f"SELECT * FROM {t}")))
                    for t in names}
    finally:
        engine.dispose()


def _queue_depth(amqp_url: str, queue: str) -> int:
    with Connection(amqp_url) as conn:
        return int(conn.default_channel.queue_declare(queue=queue, passive=True)[1])


def _keys(report: PreviewReport, field: str) -> dict[str, set[Any]]:
    """Target key values (as text) per action, from the sample (which holds every record)."""
    out: dict[str, set[Any]] = {}
    for record in report.sample:
        out.setdefault(record.action, set()).add(str(record.key.get(field)))
    return out


def _diff(before: dict[Any, Any], after: dict[Any, Any]) -> dict[str, set[Any]]:
    return {"create": set(after) - set(before), "delete": set(before) - set(after),
            "update": {k for k in before.keys() & after.keys() if before[k] != after[k]}}


def _detected(summary: RunSummary) -> int:
    return sum(r.changes for r in summary.detected.values())


# -- SQLite → PostgreSQL, state store on PostgreSQL ----------------------------------------


def test_preview_of_a_one_way_link_equals_the_sync_and_writes_nothing(tmp_path, pg_url,
                                                                       amqp_url):
    source_url = f"sqlite:///{tmp_path}/source.db"
    source, target = sa.create_engine(source_url), sa.create_engine(pg_url)
    _sql(source, ITEMS_DDL["sqlite"])
    _sql(target, ITEMS_DDL["postgresql"])
    path = _write_config(tmp_path, amqp_url, {"src": source_url, "dst": pg_url}, {"items": {
        "source": "src.items", "target": "dst.items", "key": "id", "filter": "qty < 90",
        "fields": {"id": "id", "name": {"from": "name", "transform": ["upper"]},
                   "qty": "qty", "price": "price"},
    }}, state_url=pg_url)
    insert_items(source, range(1, 121))  # qty = id % 97: ids 90..96 are left out
    _prepare(path)

    # Given no sync yet (no cursor, no state tables), When previewed,
    # Then everything is a create or filtered, and the state store is not even created.
    first = _preview(path, "items")
    assert first.cursor is None and first.changes == 120
    assert (first.counts.creates, first.counts.filtered, first.counts.updates) == (113, 7, 0)
    assert _state(pg_url) == {}
    sample = next(r for r in first.sample if r.key == {"id": 1})
    assert [(f.field, f.now, f.after) for f in sample.fields] == [
        ("id", None, 1), ("name", None, "N-1"), ("qty", None, 1), ("price", None, "1.01")]
    summary, stats = _sync(path)
    assert stats["items.a2b"].upserted == 113 and stats["items.a2b"].filtered == 7

    # When the source changes in every way a sync handles,
    with source.begin() as conn:
        conn.exec_driver_sql("UPDATE items SET name = 'renamed ' || id WHERE id % 10 = 0")
        conn.exec_driver_sql("UPDATE items SET name = 'twice' WHERE id = 5")
        conn.exec_driver_sql("UPDATE items SET name = 'twice again' WHERE id = 5")
        conn.exec_driver_sql("UPDATE items SET qty = qty WHERE id IN (1, 2, 3)")  # no-op
        conn.exec_driver_sql("UPDATE items SET qty = 95 WHERE id = 4")  # leaves the filter
        conn.exec_driver_sql("DELETE FROM items WHERE id % 15 = 7")
    insert_items(source, [*range(200, 206), *range(281, 286)])  # 284, 285 filtered
    insert_items(source, [300])
    with source.begin() as conn:
        conn.exec_driver_sql("DELETE FROM items WHERE id = 300")  # never reaches the target
    state_before, target_before = _state(pg_url), table_rows(target)

    report = _preview(path, "items")

    # Then nothing moved: target, state store (cursor included), queues.
    assert _state(pg_url) == state_before and table_rows(target) == target_before
    assert _queue_depth(amqp_url, "syncbus.link.items.a2b") == 0
    counts = report.counts
    assert report.cursor is not None and report.records == report.changes == 37
    assert (counts.creates, counts.updates, counts.deletes, counts.filtered) == (9, 12, 8, 4)
    assert counts.unchanged == 4 and counts.errors == counts.waiting == 0  # 1-3, and 300
    assert _keys(report, "id")["unchanged"] == {"1", "2", "3", "300"}
    twice = next(r for r in report.sample if r.key == {"id": 5})
    assert [(f.now, f.after, f.changed) for f in twice.fields if f.field == "name"] == [
        ("N-5", "TWICE AGAIN", True)]

    # When the real sync runs, Then it reads the same changes and does what was previewed.
    summary, stats = _sync(path)
    assert _detected(summary) == report.changes
    applied = stats["items.a2b"]
    assert applied.filtered == counts.filtered and applied.waiting == 0
    assert applied.upserted + applied.deleted == (counts.creates + counts.updates
                                                  + counts.deletes + counts.unchanged)
    done = _diff(target_before, table_rows(target))
    previewed = _keys(report, "id")
    for action in ("create", "update", "delete"):
        assert {str(k) for k in done[action]} == previewed[action], action
    source.dispose()
    target.dispose()


def test_preview_names_children_waiting_for_their_parent(tmp_path, amqp_url):
    a_url, b_url = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    a, b = sa.create_engine(a_url), sa.create_engine(b_url)
    for engine in (a, b):
        _sql(engine, "CREATE TABLE accounts (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, "
                     "name TEXT)",
             "CREATE TABLE contacts (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, "
             "name TEXT, account_id INTEGER)")
    _sql(a, "INSERT INTO accounts VALUES (1, 'A1', 'First'), (2, 'A2', 'Second')",
         "INSERT INTO contacts VALUES (1, 'C1', 'Ann', 1), (2, 'C2', 'Bob', 2)")
    # b numbers its own rows: ids differ from a's
    _sql(b, "INSERT INTO accounts VALUES (50, 'OTHER', 'not synced')")
    path = _write_config(tmp_path, amqp_url, {"a": a_url, "b": b_url}, {
        "accounts": {"source": "a.accounts", "target": "b.accounts",
                     "key": "code", "fields": {"code": "code", "name": "name"}},
        "contacts": {"source": "a.contacts", "target": "b.contacts", "key": "code",
                     "fields": {"code": "code", "name": "name",
                                "account_id": {"from": "account_id", "lookup": "accounts"}}},
    })
    _prepare(path)

    # Given accounts not synced yet, When the contacts are previewed, Then they wait.
    report = _preview(path, "contacts")
    assert report.counts.waiting == 2 and report.counts.creates == 0
    assert {r.action for r in report.sample} == {"waiting"}
    assert all("'accounts'" in (r.note or "") for r in report.sample)

    # Given both synced, When a new contact of A2 is previewed,
    # Then its account_id is already translated into b's id of A2.
    _sync(path)
    with a.begin() as conn:
        conn.exec_driver_sql("INSERT INTO contacts (id, code, name, account_id) "
                             "VALUES (3, 'C3', 'Cid', 2)")
    with b.connect() as conn:
        b_a2 = conn.exec_driver_sql("SELECT id FROM accounts WHERE code = 'A2'").scalar()
    report = _preview(path, "contacts")
    assert (report.counts.creates, report.counts.waiting) == (1, 0)
    created = report.sample[0]
    assert {f.field: f.after for f in created.fields}["account_id"] == str(b_a2)
    _sync(path)
    with b.connect() as conn:
        assert conn.exec_driver_sql("SELECT account_id FROM contacts WHERE code = 'C3'"
                                    ).scalar() == b_a2
    a.dispose()
    b.dispose()


def test_preview_of_soft_deletes_and_records_leaving_a_filter(tmp_path, amqp_url):
    source_url, target_url = f"sqlite:///{tmp_path}/s.db", f"sqlite:///{tmp_path}/t.db"
    source, target = sa.create_engine(source_url), sa.create_engine(target_url)
    _sql(source, ITEMS_DDL["sqlite"])
    _sql(target, "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, "
                 "is_deleted INTEGER NOT NULL DEFAULT 0)")
    path = _write_config(tmp_path, amqp_url, {"src": source_url, "dst": target_url}, {"items": {
        "source": "src.items", "target": "dst.items", "key": "id", "fields": {"id": "id", "name": "name", "qty": "qty"},
        "filter": "qty < 90", "filter_action": "delete",
        "deletes": "soft", "soft_delete": {"field": "is_deleted", "value": 1},
    }})
    insert_items(source, range(1, 11))
    _prepare(path)
    _sync(path)
    with source.begin() as conn:
        conn.exec_driver_sql("DELETE FROM items WHERE id = 3")
        conn.exec_driver_sql("UPDATE items SET qty = 95 WHERE id = 4")  # leaves the filter
        conn.exec_driver_sql("UPDATE items SET name = 'new name' WHERE id = 5")

    report = _preview(path, "items")

    assert (report.counts.soft_deletes, report.counts.updates, report.counts.deletes) == (2, 1, 0)
    marked = next(r for r in report.sample if r.key == {"id": 3})
    assert marked.action == "soft delete"
    assert [(f.field, f.now, f.after, f.changed) for f in marked.fields] == [
        ("id", 3, 3, False), ("is_deleted", 0, 1, True)]
    _sync(path)
    with target.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT id, is_deleted FROM items").all())
    assert {i for i, gone in rows.items() if gone} == {3, 4} and len(rows) == 10
    source.dispose()
    target.dispose()


# -- two-way: SQLite (a) ↔ PostgreSQL (b), preview of b → a ----------------------------------


def test_preview_of_the_b2a_direction_of_a_two_way_link(tmp_path, pg_url, amqp_url):
    a_url = f"sqlite:///{tmp_path}/a.db"
    a, b = sa.create_engine(a_url), sa.create_engine(pg_url)
    _sql(a, "CREATE TABLE accounts (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, "
            "name TEXT, credit NUMERIC(12, 2))")
    _sql(b, "CREATE TABLE accounts (id SERIAL PRIMARY KEY, number TEXT NOT NULL UNIQUE, "
            "title TEXT, credit NUMERIC(12, 2))")
    path = _write_config(tmp_path, amqp_url, {"a": a_url, "b": pg_url}, {"accounts": {
        "source": "a.accounts", "target": "b.accounts", "direction": "both", "key": "code", "conflict": "source_wins",
        "fields": {"number": "code", "title": "name", "credit": "credit"},
    }})
    with a.begin() as conn:
        conn.execute(sa.text("INSERT INTO accounts (code, name, credit) VALUES (:c, :n, :m)"),
                     [{"c": f"K{i:02d}", "n": f"Account {i}", "m": f"{i}.50"} for i in range(20)])
    _prepare(path)
    for _ in range(4):  # until quiet: b's echoes of the first copy are settled
        summary, _stats = _sync(path)
        if _detected(summary) == 0:
            break
    assert _detected(summary) == 0

    # When b changes (and one record changes on both sides: a wins, source_wins),
    with b.begin() as conn:
        conn.exec_driver_sql("UPDATE accounts SET title = title || ' (b)' "
                             "WHERE number IN ('K01', 'K02', 'K03')")
        conn.exec_driver_sql("UPDATE accounts SET credit = 9.75 WHERE number = 'K02'")
        conn.exec_driver_sql("UPDATE accounts SET credit = credit WHERE number = 'K04'")  # no-op
        conn.exec_driver_sql("UPDATE accounts SET title = 'b says' WHERE number = 'K05'")
        conn.exec_driver_sql("DELETE FROM accounts WHERE number IN ('K06', 'K07')")
        conn.exec_driver_sql("INSERT INTO accounts (number, title, credit) VALUES "
                             "('N1', 'New 1', 1), ('N2', 'New 2', NULL)")
    with a.begin() as conn:
        conn.exec_driver_sql("UPDATE accounts SET name = 'a says' WHERE code = 'K05'")
    state_file = tmp_path / "state.db"
    before = (_state(f"sqlite:///{state_file}"), table_rows(a, "accounts",
                                                             ("code", "name", "credit")))

    report = _preview(path, "accounts", "b2a")
    a2b = _preview(path, "accounts", "a2b")

    # Then b → a: 3 updates, 2 creates, 2 deletes, the no-op unchanged, K05 kept on a.
    assert (report.source, report.target) == ("b.accounts", "a.accounts")
    keys = _keys(report, "code")
    assert keys["update"] == {"K01", "K02", "K03"} and keys["create"] == {"N1", "N2"}
    assert keys["delete"] == {"K06", "K07"} and keys["unchanged"] == {"K04"}
    assert keys["conflict"] == {"K05"} and "source_wins" in report.sample[
        [r.key.get("code") for r in report.sample].index("K05")].note
    k02 = next(r for r in report.sample if r.key == {"code": "K02"})
    assert {f.field: (f.now, f.after) for f in k02.fields if f.changed} == {
        "name": ("Account 2", "Account 2 (b)"), "credit": ("2.50", "9.75")}
    # and a → b: K05's change of a wins the conflict.
    assert [(r.action, r.key) for r in a2b.sample] == [("update", {"number": "K05"})]
    assert "this change wins" in (a2b.sample[0].note or "")
    assert (_state(f"sqlite:///{state_file}"),
            table_rows(a, "accounts", ("code", "name", "credit"))) == before

    # When synced for real, Then a changed exactly as previewed.
    summary, stats = _sync(path)
    # (b's detector reads K04's no-op too, and drops it as an echo before publishing)
    assert _detected(summary) + summary.detected["b.accounts"].echoes == (
        report.changes + a2b.changes)
    done = _diff(before[1], table_rows(a, "accounts", ("code", "name", "credit")))
    for action in ("create", "update", "delete"):
        assert done[action] == keys[action], action
    assert (stats["accounts.b2a"].upserted, stats["accounts.b2a"].deleted) == (5, 2)
    with a.connect() as conn:  # the conflict: a's version stayed (and went to b)
        assert conn.exec_driver_sql("SELECT name FROM accounts WHERE code = 'K05'"
                                    ).scalar() == "a says"
    a.dispose()
    b.dispose()


# -- the Dataverse emulator: as a target, and as a source ------------------------------------


@pytest.fixture
def emu(tmp_path, monkeypatch):
    limits = Limits(requests=None, concurrent=None, execution=None)
    with DataverseEmulator(cert_dir=tmp_path / "certs", limits=limits) as emulator:
        monkeypatch.setenv("DV_SECRET", emulator.connection()["client_secret"])
        yield emulator


def _crm(tmp_path: Path, emu: DataverseEmulator) -> dict[str, Any]:
    return emu.connection(client_secret="${DV_SECRET}", state_dir=str(tmp_path / "dataverse"))


def test_preview_into_dataverse_compares_with_the_live_rows(tmp_path, pg_url, amqp_url, emu):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id BIGINT PRIMARY KEY, name TEXT NOT NULL, "
                             "revenue NUMERIC(12, 2), employees INTEGER)")
        conn.execute(sa.text("INSERT INTO customers VALUES (:id, :name, :revenue, :employees)"),
                     [{"id": i, "name": f"Customer {i}", "revenue": f"{i * 10}.50",
                       "employees": i * 10} for i in range(1, 41)])
    path = _write_config(tmp_path, amqp_url, {"pg": pg_url, "crm": _crm(tmp_path, emu)}, {"customers": {
        "source": "pg.customers", "target": "crm.account",
        "key": "id", "filter": "employees < 350",
        "fields": {"accountnumber": "id", "name": "name", "revenue": "revenue",
                   "numberofemployees": "employees"},
    }})
    _prepare(path)
    _sync(path)

    def accounts() -> dict[str, Any]:
        return {r["accountnumber"]: copy.deepcopy(r)
                for r in emu.store.tables["account"].rows.values()}

    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE customers SET name = name || ' Ltd' WHERE id IN (1, 2, 3)")
        conn.exec_driver_sql("UPDATE customers SET revenue = revenue WHERE id IN (4, 5)")  # no-op
        conn.exec_driver_sql("DELETE FROM customers WHERE id IN (6, 7)")
        conn.exec_driver_sql("INSERT INTO customers VALUES (100, 'Late Co', 1.25, 5), "
                             "(101, 'Big Co', NULL, 900)")  # Big Co is filtered
    before = accounts()

    report = _preview(path, "customers")

    assert accounts() == before  # versions and modification times included
    keys = _keys(report, "accountnumber")
    assert keys["update"] == {"1", "2", "3"} and keys["create"] == {"100"}
    assert keys["delete"] == {"6", "7"} and keys["unchanged"] == {"4", "5"}
    assert report.counts.filtered == 1
    no_op = next(r for r in report.sample if r.key == {"accountnumber": 4})
    assert {f.field: f.changed for f in no_op.fields}["revenue"] is False  # 40.5 == "40.50"

    # The CLI shows the same, in tables and as JSON.
    runner = CliRunner()
    shown = runner.invoke(cli, ["preview", "-c", str(path), "--link", "customers", "--limit", "2"],
                          env={"COLUMNS": "160", "NO_COLOR": "1"})
    assert shown.exit_code == 0, shown.output
    lines = [line.strip() for line in shown.output.splitlines()]
    assert "Preview of link customers, a2b: pg.customers → crm.account" in lines
    assert {"1  creates", "3  updates", "2  deletes", "2  unchanged", "1  skipped by filters",
            "Nothing was written: not to the target, the broker or the state store."} <= set(lines)
    assert shown.output.count("target now") == 2
    as_json = runner.invoke(cli, ["preview", "-c", str(path), "--link", "customers", "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["counts"]["creates"] == 1 and data["counts"]["updates"] == 3
    assert len(data["sample"]) == 8  # every record: the changes first, then unchanged
    assert [r["action"] for r in data["sample"]][-2:] == ["unchanged", "unchanged"]

    summary, _stats = _sync(path)
    assert _detected(summary) == report.changes
    done = _diff(before, accounts())
    assert done["create"] == keys["create"] and done["delete"] == keys["delete"]
    changed = {k for k in done["update"]
               if {f: before[k].get(f) for f in ("name", "revenue", "numberofemployees")}
               != {f: accounts()[k].get(f) for f in ("name", "revenue", "numberofemployees")}}
    assert changed == keys["update"]
    engine.dispose()


def test_preview_from_dataverse_leaves_its_key_set_and_cursor_alone(tmp_path, pg_url, amqp_url,
                                                                    emu):
    from connectors.dataverse.emulator.seed import seed

    seed(emu.store, 30)
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE crm_accounts (accountid UUID PRIMARY KEY, "
                             "name TEXT NOT NULL, accountnumber TEXT, employees INTEGER)")
    path = _write_config(tmp_path, amqp_url, {"pg": pg_url, "crm": _crm(tmp_path, emu)}, {"accounts": {
        "source": "crm.account", "target": "pg.crm_accounts",
        "key": "accountid",
        "fields": {"accountid": "accountid", "name": "name", "accountnumber": "accountnumber",
                   "employees": "numberofemployees"},
    }})
    _sync(path)
    editor = DataverseConnector("editor", **emu.connection(state_dir=str(tmp_path / "editor")))
    ids = sorted(emu.store.tables["account"].rows)
    editor.upsert("account", [WriteRow({"accountid": i}, {"name": f"Renamed {n}"})
                              for n, i in enumerate(ids[:4])])
    editor.delete("account", [{"accountid": i} for i in ids[4:7]])
    editor.upsert("account", [WriteRow({"accountnumber": f"NEW-{n}"}, {"name": f"New {n}"})
                              for n in range(2)])
    brief = str(uuid.uuid4())
    editor.upsert("account", [WriteRow({"accountid": brief}, {"name": "brief"})])
    editor.delete("account", [{"accountid": brief}])
    editor.close()
    key_set = tmp_path / "dataverse" / "crm.keys.db"
    state_url = f"sqlite:///{tmp_path}/state.db"

    def fingerprint() -> tuple[str, dict[str, list[str]], dict[Any, Any]]:
        return (hashlib.sha256(key_set.read_bytes()).hexdigest(), _state(state_url),
                table_rows(engine, "crm_accounts", ("accountid", "name", "accountnumber")))

    before = fingerprint()
    report = _preview(path, "accounts")
    assert fingerprint() == before

    keys = _keys(report, "accountid")
    assert keys["update"] == set(ids[:4]) and keys["delete"] == set(ids[4:7])
    assert len(keys["create"]) == 2 and brief not in keys["create"]
    assert report.counts.unchanged == (1 if brief in keys.get("unchanged", ()) else 0)
    summary, _stats = _sync(path)
    assert _detected(summary) == report.changes
    after = table_rows(engine, "crm_accounts", ("accountid", "name", "accountnumber"))
    done = {action: {str(k) for k in found} for action, found in _diff(before[2], after).items()}
    assert done == {"create": keys["create"], "update": keys["update"],
                    "delete": keys["delete"]}
    engine.dispose()


# -- Business Central as a source: deletions by reconciliation, key index untouched ----------


def test_preview_from_business_central_leaves_its_key_index_alone(tmp_path, pg_url, amqp_url,
                                                                  monkeypatch):
    from connectors.business_central.emulator import BusinessCentralEmulator

    engine = sa.create_engine(pg_url)
    _sql(engine, "CREATE TABLE customers (number TEXT PRIMARY KEY, name TEXT, city TEXT)")
    index = tmp_path / "bc.db"
    with BusinessCentralEmulator(cert_dir=tmp_path / "certs", seed=40) as emu:
        monkeypatch.setenv("BC_SECRET", emu.client_secret)
        erp = {"type": "business_central", **emu.connection(
            client_secret="${BC_SECRET}", index_url=f"sqlite:///{index}", backoff=0.05,
            entities={"customers": {"sync_deletion": True, "reconcile_interval": 0}})}
        path = _write_config(tmp_path, amqp_url, {"pg": pg_url, "erp": erp}, {"customers": {
            "source": "erp.customers", "target": "pg.customers", "key": "number",
            "fields": {"number": "number", "name": "displayName", "city": "city"},
        }})
        _sync(path)
        rows = emu.rows("customers")
        for row in rows[:5]:
            emu.update("customers", row["id"], {"city": "Bratislava"})
        for row in rows[5:8]:
            emu.delete("customers", row["id"])
        for i in range(2):
            emu.insert("customers", {"displayName": f"Late {i}"})
        state_url = f"sqlite:///{tmp_path}/state.db"

        def fingerprint() -> tuple[str, dict[str, list[str]], dict[Any, Any]]:
            return (hashlib.sha256(index.read_bytes()).hexdigest(), _state(state_url),
                    table_rows(engine, "customers", ("number", "name", "city")))

        before = fingerprint()
        report = _preview(path, "customers")
        assert fingerprint() == before

        keys = _keys(report, "number")
        assert keys["delete"] == {r["number"] for r in rows[5:8]}
        assert keys["update"] == {r["number"] for r in rows[:5] if r.get("city") != "Bratislava"}
        assert len(keys["create"]) == 2
        summary, _stats = _sync(path)
        assert _detected(summary) == report.changes
        done = _diff(before[2], table_rows(engine, "customers", ("number", "name", "city")))
        assert done == {action: keys[action] for action in ("create", "update", "delete")}
    engine.dispose()

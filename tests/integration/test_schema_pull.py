"""``syncbus schema pull``: tables from Dataverse, Business Central and SQL metadata.

Pull, change the source (a new field, a new entity, a field removed, a type
changed), pull again: what is new is added, nothing is dropped or altered, rows are
kept, and what cannot be applied is reported. The emitted link config is accepted
by ``syncbus validate`` and syncs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from bus.cli import app
from bus.cli.main import cli
from connectors.business_central.emulator import BusinessCentralEmulator
from connectors.dataverse.emulator import DataverseEmulator, Limits
from connectors.dataverse.emulator.model import ACCOUNT, attribute, entity
from connectors.dataverse.emulator.seed import seed
from connectors.sql.coerce import portable_type
from connectors.sql.ddl import PULLS_TABLE

pytestmark = pytest.mark.integration

NO_LIMITS = Limits(requests=None, concurrent=None, execution=None)


@pytest.fixture(autouse=True)
def _logging_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands point structlog at the stderr of the moment, which CliRunner closes."""
    monkeypatch.setattr("bus.cli.meta.configure_logging", lambda *_args: None)


def _write(tmp_path: Path, connections: dict[str, Any], **extra: Any) -> Path:
    path = tmp_path / "sync.yaml"
    config = {"state": {"url": f"sqlite:///{tmp_path}/state.db"}, "connections": connections,
              **extra}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _pull(path: Path, *args: str, code: int = 0) -> list[str]:
    result = CliRunner().invoke(cli, ["schema", "pull", "-c", str(path), *args])
    assert result.exit_code == code, result.output
    return result.output.splitlines()


def _columns(engine: sa.Engine, table: str) -> dict[str, str]:
    """Column → portable type, as the SQL connector will read the table."""
    return {c["name"]: portable_type(c["type"]) for c in sa.inspect(engine).get_columns(table)}


def _indexes(engine: sa.Engine, table: str) -> dict[tuple[str, ...], bool]:
    return {tuple(ix["column_names"]): bool(ix["unique"])
            for ix in sa.inspect(engine).get_indexes(table)}


@pytest.fixture
def emu(tmp_path: Path):
    with DataverseEmulator(cert_dir=tmp_path / "certs", limits=NO_LIMITS) as emulator:
        yield emulator


def test_dataverse_pull_then_update_server(tmp_path, pg_url, emu, monkeypatch):
    monkeypatch.setenv("DV_SECRET", emu.connection()["client_secret"])
    path = _write(tmp_path, {
        "crm": emu.connection(client_secret="${DV_SECRET}", state_dir=str(tmp_path / "dv")),
        "wh": {"type": "sql", "url": pg_url}})

    # Given a first pull of two tables
    lines = _pull(path, "--from", "crm", "--into", "wh", "--entities", "account,contact")
    assert lines[0] == ("account: create table (21 columns, primary key (accountid), "
                        "unique (accountnumber))")
    assert "account.primarycontactid: lookup → contact, indexed" in lines
    assert "contact.parentcustomerid: lookup → account, indexed" in lines
    wh = sa.create_engine(pg_url)
    columns = _columns(wh, "account")
    assert columns["accountid"] == "uuid" and columns["revenue"] == "decimal"
    assert columns["creditonhold"] == "boolean" and columns["createdon"] == "datetime"
    assert columns["numberofemployees"] == "integer" and columns["name"] == "string"
    assert sa.inspect(wh).get_pk_constraint("account")["constrained_columns"] == ["accountid"]
    assert _indexes(wh, "account") == {("accountnumber",): True, ("primarycontactid",): False}
    assert _columns(wh, "contact")["parentcustomeridtype"] == "string"
    with wh.begin() as conn:
        conn.exec_driver_sql("INSERT INTO account (accountid, name, websiteurl, telephone1) VALUES "
                             "('6f1c3a52-0000-4000-8000-000000000001', 'Kept Co', 'kept.example', "
                             "'+421 2 1234')")

    # When the source gains a field and a table, loses a field and retypes another
    changed = dataclasses.replace(ACCOUNT, attributes=tuple(
        attribute("telephone1", "Integer") if a.logical_name == "telephone1" else a
        for a in ACCOUNT.attributes if a.logical_name != "websiteurl"
    ) + (attribute("new_rating", "Integer"),))
    emu.define_entity(changed)
    emu.define_entity(entity("new_project", attributes=[
        attribute("name", max_length=100), attribute("budget", "Money"),
        attribute("new_accountid", "Lookup", targets=("account",))],
        keys={"name_key": ("name",)}))
    lines = _pull(path, "--from", "crm", "--into", "wh",
                  "--entities", "account,contact,new_project")

    # Then new things are added and the rest is reported, never applied
    assert lines == [
        "account.telephone1: is integer in the source now; the column stays TEXT (not changed)",
        "account.new_rating: add column BIGINT (integer)",
        "account.websiteurl: no longer in the source; the column is kept",
        "contact: up to date",
        "new_project: create table (7 columns, primary key (new_projectid), unique (name))",
        "new_project.new_accountid: lookup → account, indexed",
    ]
    assert _columns(wh, "account")["new_rating"] == "integer"
    assert _columns(wh, "account")["websiteurl"] == "string"
    assert _columns(wh, "account")["telephone1"] == "string"
    assert set(_columns(wh, "new_project")) >= {"new_projectid", "name", "budget", "new_accountid"}
    with wh.connect() as conn:
        rows = conn.exec_driver_sql("SELECT name, websiteurl, telephone1 FROM account").all()
        pulls = conn.exec_driver_sql(f"SELECT entity FROM {PULLS_TABLE} ORDER BY entity").all()
    assert rows == [("Kept Co", "kept.example", "+421 2 1234")]
    assert [p[0] for p in pulls] == ["account", "contact", "new_project"]
    # A dry run reports what would happen and changes nothing
    emu.define_entity(dataclasses.replace(changed, attributes=(
        *changed.attributes, attribute("new_score", "Double"))))
    lines = _pull(path, "--from", "crm", "--into", "wh", "--entities", "account", "--dry-run")
    assert "account.new_score: would add column DOUBLE PRECISION (float)" in lines
    assert "new_score" not in _columns(wh, "account")
    wh.dispose()


def test_the_emitted_config_validates_and_syncs(tmp_path, pg_url, amqp_url, emu, monkeypatch):
    monkeypatch.setenv("DV_SECRET", emu.connection()["client_secret"])
    seed(emu.store, 30)
    path = _write(tmp_path, {
        "crm": emu.connection(client_secret="${DV_SECRET}", state_dir=str(tmp_path / "dv")),
        "wh": {"type": "sql", "url": pg_url}}, broker={"url": amqp_url})
    emitted = tmp_path / "links.yaml"
    lines = _pull(path, "--from", "crm", "--into", "wh", "--emit-config", str(emitted))
    assert lines[-1].startswith(f"wrote {emitted}: 2 link(s)")
    # The broker URL of the test holds guest's password inline: it became a reference
    assert lines[-2].startswith("warning: broker.url: a password was written inline")
    monkeypatch.setenv("BROKER_PASSWORD", "guest")
    config = yaml.safe_load(emitted.read_text())
    assert config["connections"]["crm"]["client_secret"] == "${DV_SECRET}"
    assert emu.connection()["client_secret"] not in emitted.read_text()
    assert config["links"]["account"]["key"] == ["accountid"]
    assert config["links"]["account"]["fields"]["primarycontactid"] == "primarycontactid"

    out: list[str] = []
    assert app.validate(emitted, echo=out.append) == app.EXIT_OK, out
    assert app.run(emitted, until_idle=True, max_wait=120, echo=out.append) == app.EXIT_OK, out
    wh = sa.create_engine(pg_url)
    with wh.connect() as conn:
        names = {r[0] for r in conn.exec_driver_sql("SELECT name FROM account")}
        contacts = conn.exec_driver_sql("SELECT count(*) FROM contact").scalar()
    assert names == {r["name"] for r in emu.store.tables["account"].rows.values()}
    assert contacts == len(emu.store.tables["contact"].rows) > 0
    wh.dispose()


def test_business_central_pull_into_sqlite(tmp_path, monkeypatch):
    with BusinessCentralEmulator(cert_dir=tmp_path / "certs") as emu:
        monkeypatch.setenv("BC_SECRET", emu.client_secret)
        erp = {"type": "business_central", **emu.connection(
            client_secret="${BC_SECRET}", index_url=f"sqlite:///{tmp_path}/bc.db")}
        path = _write(tmp_path, {"erp": erp, "lite": {"type": "sql",
                                                      "url": f"sqlite:///{tmp_path}/lite.db"}})
        emitted = tmp_path / "links.yaml"
        lines = _pull(path, "--from", "erp", "--into", "lite", "--entities", "customers,items",
                      "--emit-config", str(emitted))
        out: list[str] = []
        assert app.validate(emitted, echo=out.append) == app.EXIT_OK, out
    assert lines[0].startswith("customers: create table (") and "primary key (id)" in lines[0]
    assert "unique (number)" in lines[0]
    lite = sa.create_engine(f"sqlite:///{tmp_path}/lite.db")
    columns = _columns(lite, "customers")
    assert columns["id"] == "string"  # SQLite has no UUID type: GUIDs are text
    assert columns["displayName"] == "string" and columns["creditLimit"] == "decimal"
    assert columns["lastModifiedDateTime"] == "datetime"
    assert _indexes(lite, "customers")[("number",)] is True
    assert "items" in sa.inspect(lite).get_table_names()
    lite.dispose()


_SOURCE_DDL = """CREATE TABLE products (
    id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name VARCHAR(80), price NUMERIC(12, 2),
    weight DOUBLE PRECISION, active BOOLEAN, launched DATE, changed TIMESTAMP, opens TIME,
    photo BLOB, attrs JSON, category_id INTEGER REFERENCES categories (id))"""


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_sql_pull_keeps_every_type_and_reports_a_vanished_table(tmp_path, pg_url, target):
    src_url = f"sqlite:///{tmp_path}/src.db"
    src = sa.create_engine(src_url)
    with src.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE categories (id INTEGER PRIMARY KEY, name TEXT)")
        conn.exec_driver_sql(_SOURCE_DDL)
    dst_url = pg_url if target == "postgresql" else f"sqlite:///{tmp_path}/dst.db"
    path = _write(tmp_path, {"src": {"url": src_url}, "dst": {"url": dst_url}})
    lines = _pull(path, "--from", "src", "--into", "dst")
    assert lines[0] == "categories: create table (2 columns, primary key (id))"
    assert "products.category_id: lookup → categories, indexed" in lines
    dst = sa.create_engine(dst_url)
    assert _columns(dst, "products") == _columns(src, "products")
    assert _indexes(dst, "products")[("code",)] is True

    with src.begin() as conn:
        conn.exec_driver_sql("DROP TABLE products")
    with dst.begin() as conn:
        conn.exec_driver_sql("INSERT INTO products (id, code) VALUES (1, 'P-1')")
    lines = _pull(path, "--from", "src", "--into", "dst")
    assert lines == ["categories: up to date",
                     "products: no longer in the source; the table is kept"]
    with dst.connect() as conn:
        assert conn.exec_driver_sql("SELECT code FROM products").all() == [("P-1",)]
    src.dispose()
    dst.dispose()


def test_a_unique_key_over_duplicates_is_reported_and_the_rest_applied(tmp_path):
    src_url, dst_url = f"sqlite:///{tmp_path}/src.db", f"sqlite:///{tmp_path}/dst.db"
    src, dst = sa.create_engine(src_url), sa.create_engine(dst_url)
    with src.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE a (id INTEGER PRIMARY KEY, code TEXT)")
        conn.exec_driver_sql("CREATE TABLE b (id INTEGER PRIMARY KEY)")
    path = _write(tmp_path, {"src": {"url": src_url}, "dst": {"url": dst_url}})
    _pull(path, "--from", "src", "--into", "dst")
    with dst.begin() as conn:
        conn.exec_driver_sql("INSERT INTO a (id, code) VALUES (1, 'same'), (2, 'same')")
    with src.begin() as conn:
        conn.exec_driver_sql("CREATE UNIQUE INDEX a_code ON a (code)")
        conn.exec_driver_sql("ALTER TABLE b ADD COLUMN label TEXT")
    lines = _pull(path, "--from", "src", "--into", "dst", code=1)
    assert lines[0] == "a: add unique index ux_a_code (code)"
    assert lines[1] == "b.label: add column TEXT (string)"
    assert lines[2].startswith("a: failed: UNIQUE constraint failed")
    assert "label" in _columns(dst, "b")
    src.dispose()
    dst.dispose()


def test_pull_refuses_a_target_that_is_not_sql_and_an_unknown_entity(tmp_path, emu, monkeypatch):
    monkeypatch.setenv("DV_SECRET", emu.connection()["client_secret"])
    path = _write(tmp_path, {
        "crm": emu.connection(client_secret="${DV_SECRET}", state_dir=str(tmp_path / "dv")),
        "wh": {"url": f"sqlite:///{tmp_path}/wh.db"}})
    assert "schema pull creates tables in a sql connection" in _pull(
        path, "--from", "wh", "--into", "crm", code=2)[0]
    assert "no such connection" in _pull(path, "--from", "crmm", "--into", "wh", code=2)[0]
    lines = _pull(path, "--from", "crm", "--into", "wh", "--entities", "acount", code=1)
    assert "acount" in lines[0] and emu.connection()["client_secret"] not in "\n".join(lines)

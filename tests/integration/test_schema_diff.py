"""``syncbus schema diff`` and the worker refusing drifted links (the others keep syncing).

Real PostgreSQL (source, with change tracking), SQLite (target), RabbitMQ and the
Dataverse emulator: remove a mapped field or change its type in the source, then
``schema diff`` names it and a worker refuses only that link.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from bus.cli import app
from bus.cli.main import cli
from bus.config.drift import link_drift
from bus.config.load import load_config
from bus.worker.worker import Worker
from connectors.dataverse.emulator import DataverseEmulator, Limits
from connectors.dataverse.emulator.model import CONTACT

pytestmark = pytest.mark.integration

LINKS = {
    "customers": {
        "source": {"connection": "src", "entity": "customers"},
        "target": {"connection": "dst", "entity": "clients"},
        "key": ["id"],
        "fields": {"client_id": "id", "name": "name", "mail": {"from": "email"}},
    },
    "products": {
        "source": {"connection": "src", "entity": "products"},
        "target": {"connection": "dst", "entity": "products"},
        "key": ["id"],
    },
}


@pytest.fixture(autouse=True)
def _logging_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands point structlog at the stderr of the moment, which CliRunner closes."""
    monkeypatch.setattr("bus.cli.meta.configure_logging", lambda *_args: None)


@pytest.fixture
def env(tmp_path: Path, pg_url: str, amqp_url: str) -> tuple[Path, sa.Engine, sa.Engine]:
    src, dst_url = sa.create_engine(pg_url), f"sqlite:///{tmp_path}/dst.db"
    dst = sa.create_engine(dst_url)
    with src.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id BIGINT PRIMARY KEY, name TEXT, email TEXT)")
        conn.exec_driver_sql("CREATE TABLE products (id BIGINT PRIMARY KEY, name TEXT, "
                             "price NUMERIC(10, 2))")
        conn.exec_driver_sql("INSERT INTO customers VALUES (1, 'Anna', 'anna@example.com')")
        conn.exec_driver_sql("INSERT INTO products VALUES (1, 'Tea', 3.50)")
    with dst.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE clients (client_id INTEGER PRIMARY KEY, name TEXT, "
                             "mail TEXT)")
        conn.exec_driver_sql("CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, "
                             "price NUMERIC)")
    config = {
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "connections": {"src": {"url": pg_url}, "dst": {"url": dst_url}},
        "links": {n: {**link, "poll_interval": 0.5, "retry": {"delays": [0.5], "max_attempts": 3}}
                  for n, link in LINKS.items()},
    }
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert app.setup(path, echo=lambda _line: None) == app.EXIT_OK
    yield path, src, dst
    src.dispose()
    dst.dispose()


def _diff(path: Path, *args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, ["schema", "diff", "-c", str(path), *args])
    return result.exit_code, result.output.splitlines()


def _run(path: Path) -> tuple[int, list[str]]:
    lines: list[str] = []
    return app.run(path, until_idle=True, max_wait=60, echo=lines.append), lines


def _execute(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for sql in statements:
            conn.exec_driver_sql(sql)


def _rows(engine: sa.Engine, sql: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


def test_a_removed_field_is_reported_and_only_its_link_is_refused(env):
    path, src, dst = env
    code, lines = _run(path)
    assert code == app.EXIT_OK, lines
    assert _diff(path) == (0, ["link customers: OK", "link products: OK"])

    # Given a mapped source field removed, and new rows on both links
    _execute(src, "ALTER TABLE customers DROP COLUMN email",
             "INSERT INTO customers VALUES (2, 'Boris')",
             "INSERT INTO products VALUES (2, 'Coffee', 4.20)")

    # Then schema diff names it
    code, lines = _diff(path)
    assert code == 1
    assert lines == ["link customers: 1 problem(s)",
                     "  fields.mail.from: source field 'email' is not a field of src.customers",
                     "link products: OK"]
    code, out = _diff(path, "--json", "--link", "customers")
    assert json.loads("\n".join(out)) == {
        "customers": ["fields.mail.from: source field 'email' is not a field of src.customers"]}

    # And a worker refuses that link only; the other one syncs
    worker = Worker(load_config(path).config)
    try:
        worker.open()
        summary = worker.run_until_idle(max_wait=60)
    finally:
        worker.close()
    assert summary.errors == ["link customers refused, its schema drifted: fields.mail.from: "
                              "source field 'email' is not a field of src.customers"]
    assert [s.link for s in summary.links] == ["products"]
    assert _rows(dst, "SELECT id, name FROM products ORDER BY id") == [(1, "Tea"), (2, "Coffee")]
    assert _rows(dst, "SELECT client_id, name FROM clients") == [(1, "Anna")]
    assert not summary.ok

    # And `syncbus run --until-idle` says so and runs the other link (exit 1, not 2)
    _execute(src, "INSERT INTO products VALUES (3, 'Cocoa', 3.10)")
    code, lines = _run(path)
    assert code == app.EXIT_FAILED, lines
    assert any("link 'customers' does not match the live schema" in line for line in lines)
    assert _rows(dst, "SELECT id FROM products ORDER BY id") == [(1,), (2,), (3,)]


def test_a_changed_type_refuses_the_link_until_accepted(env):
    path, src, dst = env
    code, lines = _run(path)  # the worker records the types it sees first
    assert code == app.EXIT_OK, lines
    _execute(src, "ALTER TABLE products ALTER COLUMN price TYPE TEXT",
             "INSERT INTO products VALUES (2, 'Coffee', '4.20')",
             "INSERT INTO customers VALUES (2, 'Boris', 'boris@example.com')")

    code, lines = _diff(path)
    assert code == 1
    assert lines[1] == "link products: 1 problem(s)"
    assert lines[2].startswith("  source field src.products.price changed type: decimal → string "
                               "(first seen as decimal on ")

    # `syncbus run` starts (the config is valid) and refuses products only
    code, lines = _run(path)
    assert code == app.EXIT_FAILED
    assert any(line.startswith("error: link products refused, its schema drifted: source field "
                               "src.products.price changed type: decimal → string") for line in lines)
    assert _rows(dst, "SELECT client_id, mail FROM clients ORDER BY client_id") == [
        (1, "anna@example.com"), (2, "boris@example.com")]
    assert _rows(dst, "SELECT id FROM products") == [(1,)]

    # Once accepted, the link runs again and catches up
    assert _diff(path, "--accept")[0] == 0
    code, lines = _run(path)
    assert code == app.EXIT_OK, lines
    assert _rows(dst, "SELECT id, name FROM products ORDER BY id") == [(1, "Tea"), (2, "Coffee")]


def test_a_vanished_entity_is_drift(env):
    path, src, _dst = env
    _execute(src, "DROP TABLE products")
    code, lines = _diff(path)
    assert code == 1
    assert lines[1:] == ["link products: 1 problem(s)",
                         "  source.entity: entity 'products' not found in connection 'src' (it has: customers)"]


def test_dataverse_field_removed_from_the_metadata(tmp_path, pg_url, monkeypatch):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE people (id UUID PRIMARY KEY, last TEXT, job TEXT)")
    with DataverseEmulator(cert_dir=tmp_path / "certs",
                           limits=Limits(requests=None, concurrent=None, execution=None)) as emu:
        monkeypatch.setenv("DV_SECRET", emu.connection()["client_secret"])
        config = {
            "state": {"url": f"sqlite:///{tmp_path}/state.db"},
            "connections": {"crm": emu.connection(client_secret="${DV_SECRET}",
                                                  state_dir=str(tmp_path / "dv")),
                            "pg": {"url": pg_url}},
            "links": {"people": {"source": {"connection": "crm", "entity": "contact"},
                                 "target": {"connection": "pg", "entity": "people"},
                                 "key": "contactid",
                                 "fields": {"id": "contactid", "last": "lastname",
                                            "job": "jobtitle"}}},
        }
        path = tmp_path / "sync.yaml"
        path.write_text(yaml.safe_dump(config))
        assert _diff(path) == (0, ["link people: OK"])
        emu.define_entity(dataclasses.replace(CONTACT, attributes=tuple(
            a for a in CONTACT.attributes if a.logical_name != "jobtitle")))
        code, lines = _diff(path)
        assert code == 1
        assert lines[1] == "  fields.job: source field 'jobtitle' is not a field of crm.contact"
        worker = Worker(load_config(path).config)
        try:
            worker.open_connectors()
            report = link_drift(worker.config, worker.describe)
        finally:
            worker.close()
        assert report == {"people": [lines[1].strip()]}
    engine.dispose()

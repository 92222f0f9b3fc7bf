"""SQL ↔ Dataverse through the real bus: PostgreSQL, RabbitMQ and the emulator over HTTPS.

Each direction: an initial load, then inserts, updates and deletes (and, from
Dataverse, a row created and deleted between two polls); afterwards the target
equals the source.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from bus.cli import app
from connectors.base import WriteRow
from connectors.dataverse import DataverseConnector
from connectors.dataverse.emulator import DataverseEmulator, Limits

pytestmark = pytest.mark.integration

NO_LIMITS = Limits(requests=None, concurrent=None, execution=None)


@pytest.fixture
def emu(tmp_path):
    with DataverseEmulator(cert_dir=tmp_path / "certs", limits=NO_LIMITS) as emulator:
        yield emulator


def _config(tmp_path: Path, amqp_url: str, pg_url: str, emu: DataverseEmulator,
            links: dict) -> Path:
    crm = emu.connection(client_secret="${DV_SECRET}", state_dir=str(tmp_path / "dataverse"))
    config = {
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "connections": {"pg": {"type": "sql", "url": pg_url}, "crm": crm},
        "links": {name: {"poll_interval": 0.5, "retry": {"delays": [0.5, 1, 2], "max_attempts": 5},
                         **link} for name, link in links.items()},
    }
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _sync(path: Path) -> list[str]:
    lines: list[str] = []
    code = app.run(path, until_idle=True, max_wait=120, echo=lines.append)
    assert code == app.EXIT_OK, "\n".join(lines)
    return lines


def _num(value):
    return None if value is None else Decimal(str(value)).normalize()


def test_postgresql_to_dataverse(tmp_path, pg_url, amqp_url, emu, monkeypatch):
    monkeypatch.setenv("DV_SECRET", emu.connection()["client_secret"])
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id BIGINT PRIMARY KEY, name TEXT NOT NULL, "
                             "city TEXT, revenue NUMERIC(12, 2), employees INTEGER)")
        conn.execute(sa.text("INSERT INTO customers VALUES (:id, :name, :city, :revenue, :employees)"),
                     [{"id": i, "name": f"Customer {i}", "city": ["Bratislava", "Vienna", None][i % 3],
                       "revenue": f"{i * 10}.{i % 100:02d}", "employees": i % 500} for i in range(1, 1201)])
    path = _config(tmp_path, amqp_url, pg_url, emu, {"customers": {
        "source": {"connection": "pg", "entity": "customers"},
        "target": {"connection": "crm", "entity": "account"},
        "key": ["id"],
        "fields": {"accountnumber": "id", "name": "name", "address1_city": "city",
                   "revenue": "revenue", "numberofemployees": "employees"},
    }})
    assert app.setup(path, echo=lambda _line: None) == app.EXIT_OK

    def source():
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, name, city, revenue, employees FROM customers"))
            return {str(r[0]): (r[1], r[2], _num(r[3]), r[4]) for r in rows}

    def target():
        return {r["accountnumber"]: (r["name"], r.get("address1_city"), _num(r.get("revenue")),
                                     r.get("numberofemployees"))
                for r in emu.store.tables["account"].rows.values()}

    _sync(path)
    assert len(target()) == 1200 and target() == source()
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE customers SET name = name || ' (renamed)', revenue = revenue + 1, "
                             "city = 'Prague' WHERE id %% 4 = 0")
        conn.exec_driver_sql("DELETE FROM customers WHERE id %% 10 = 7")
        conn.exec_driver_sql("INSERT INTO customers VALUES (5000, 'Late Co', NULL, NULL, NULL)")
    _sync(path)
    expected = source()
    assert len(expected) == 1081 and target() == expected
    engine.dispose()


def test_dataverse_to_postgresql(tmp_path, pg_url, amqp_url, emu, monkeypatch):
    monkeypatch.setenv("DV_SECRET", emu.connection()["client_secret"])
    from connectors.dataverse.emulator.seed import seed

    seed(emu.store, 400)
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE crm_accounts (accountid UUID PRIMARY KEY, name TEXT NOT NULL, "
                             "accountnumber TEXT, city TEXT, revenue NUMERIC(16, 2), employees INTEGER, "
                             "primary_contact UUID, modified TIMESTAMPTZ)")
        conn.exec_driver_sql("CREATE TABLE crm_contacts (contactid UUID PRIMARY KEY, lastname TEXT, "
                             "firstname TEXT, parent UUID, parent_type TEXT, birthdate DATE)")
    path = _config(tmp_path, amqp_url, pg_url, emu, {
        "accounts": {
            "source": {"connection": "crm", "entity": "account"},
            "target": {"connection": "pg", "entity": "crm_accounts"},
            "key": ["accountid"],
            "fields": {"accountid": "accountid", "name": "name", "accountnumber": "accountnumber",
                       "city": "address1_city", "revenue": "revenue",
                       "employees": "numberofemployees", "primary_contact": "primarycontactid",
                       "modified": "modifiedon"},
        },
        "contacts": {
            "source": {"connection": "crm", "entity": "contact"},
            "target": {"connection": "pg", "entity": "crm_contacts"},
            "key": ["contactid"],
            "fields": {"contactid": "contactid", "lastname": "lastname", "firstname": "firstname",
                       "parent": "parentcustomerid", "parent_type": "parentcustomeridtype",
                       "birthdate": "birthdate"},
        },
    })

    def source():
        return {r["accountid"]: (r["name"], r["accountnumber"], r.get("address1_city"),
                                 _num(r.get("revenue")), r.get("numberofemployees"),
                                 (r.get("primarycontactid") or {}).get("id"), r["modifiedon"])
                for r in emu.store.tables["account"].rows.values()}

    def target():
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT accountid, name, accountnumber, city, revenue, "
                                        "employees, primary_contact, modified FROM crm_accounts"))
            return {str(r[0]): (r[1], r[2], r[3], _num(r[4]), r[5], r[6] and str(r[6]),
                                r[7].strftime("%Y-%m-%dT%H:%M:%SZ")) for r in rows}

    def contacts():
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT contactid, lastname, parent, parent_type, birthdate "
                                        "FROM crm_contacts"))
            return {str(r[0]): (r[1], str(r[2]), r[3], r[4].isoformat()) for r in rows}

    _sync(path)
    assert len(target()) == 400 and target() == source()
    assert contacts() == {r["contactid"]: (r["lastname"], r["parentcustomerid"]["id"], "account",
                                           r["birthdate"])
                          for r in emu.store.tables["contact"].rows.values()}

    crm = DataverseConnector("editor", **emu.connection(state_dir=str(tmp_path / "editor")))
    ids = sorted(source())
    crm.upsert("account", [WriteRow({"accountid": i}, {"name": f"Renamed {n}", "revenue": n + 0.25})
                           for n, i in enumerate(ids[:60])])
    crm.delete("account", [{"accountid": i} for i in ids[60:85]])
    crm.upsert("account", [WriteRow({"accountnumber": f"NEW-{n}"}, {"name": f"New {n}"})
                           for n in range(15)])
    brief = str(uuid.uuid4())
    crm.upsert("account", [WriteRow({"accountid": brief}, {"name": "brief"})])
    crm.delete("account", [{"accountid": brief}])
    crm.close()
    _sync(path)
    expected = source()
    assert len(expected) == 390 and target() == expected


def test_429s_of_a_connection_are_counted_in_the_workers_metrics(tmp_path, pg_url, amqp_url,
                                                                 monkeypatch):
    from bus.config.load import load_config
    from bus.worker.worker import Worker

    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id BIGINT PRIMARY KEY, name TEXT NOT NULL)")
        conn.execute(sa.text("INSERT INTO customers VALUES (:id, :name)"),
                     [{"id": i, "name": f"Customer {i}"} for i in range(1, 301)])
    limits = Limits(requests=8, window=2.0, concurrent=None, execution=None)
    with DataverseEmulator(cert_dir=tmp_path / "certs", limits=limits) as emu:
        monkeypatch.setenv("DV_SECRET", emu.connection()["client_secret"])
        path = _config(tmp_path, amqp_url, pg_url, emu, {"customers": {
            "source": {"connection": "pg", "entity": "customers"},
            "target": {"connection": "crm", "entity": "account"},
            "key": ["id"], "batch_size": 20,
            "fields": {"accountnumber": "id", "name": "name"},
        }})
        assert app.setup(path, echo=lambda _line: None) == app.EXIT_OK
        worker = Worker(load_config(path).config)
        worker.open()
        try:
            summary = worker.run_until_idle(max_wait=120)
            text = worker.metrics.render().decode()
        finally:
            worker.close()
    assert summary.ok and summary.links[0].upserted == 300
    throttled = [line for line in text.splitlines()
                 if line.startswith('syncbus_throttled_total{connection="crm"}')]
    assert throttled and float(throttled[0].split()[-1]) > 0, throttled
    assert 'syncbus_throttle_wait_seconds_count{connection="crm"}' in text

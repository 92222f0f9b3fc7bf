"""Business Central ↔ SQL through the real bus: PostgreSQL, RabbitMQ, the emulator over HTTPS.

Each direction: an initial load, then inserts, updates and deletes; afterwards the
target equals the source. From Business Central, deletions come from key-set
reconciliation ("Sync Deletion").
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from bus.cli import app
from connectors.business_central.emulator import BusinessCentralEmulator

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, amqp_url: str, pg_url: str, emu: BusinessCentralEmulator,
            link: dict, **bc: object) -> Path:
    erp = {"type": "business_central",
           **emu.connection(client_secret="${BC_SECRET}", index_url=f"sqlite:///{tmp_path}/bc.db",
                            backoff=0.05, **bc)}
    config = {
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "connections": {"pg": {"type": "sql", "url": pg_url}, "erp": erp},
        "links": {"customers": {"poll_interval": 0.5,
                                "retry": {"delays": [0.5, 1, 2], "max_attempts": 5}, **link}},
    }
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _sync(path: Path) -> list[str]:
    lines: list[str] = []
    code = app.run(path, until_idle=True, max_wait=120, echo=lines.append)
    assert code == app.EXIT_OK, "\n".join(lines)
    return lines


def _num(value: object) -> Decimal:
    return Decimal(str(value)).normalize()


def test_business_central_to_postgresql(tmp_path, pg_url, amqp_url, monkeypatch):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (number TEXT PRIMARY KEY, name TEXT, "
                             "email TEXT, city TEXT, credit NUMERIC(12, 2), blocked TEXT, "
                             "modified TIMESTAMPTZ)")
    with BusinessCentralEmulator(cert_dir=tmp_path / "certs", seed=400) as emu:
        monkeypatch.setenv("BC_SECRET", emu.client_secret)
        path = _config(tmp_path, amqp_url, pg_url, emu, {
            "source": {"connection": "erp", "entity": "customers"},
            "target": {"connection": "pg", "entity": "customers"},
            "key": ["number"],
            "fields": {"number": "number", "name": "displayName", "email": "email",
                       "city": "city", "credit": "creditLimit", "blocked": "blocked",
                       "modified": "lastModifiedDateTime"},
        }, entities={"customers": {"sync_deletion": True, "reconcile_interval": 0}})

        def source() -> dict:
            return {r["number"]: (r["displayName"], r["email"], r["city"], _num(r["creditLimit"]),
                                  r["blocked"], r["lastModifiedDateTime"])
                    for r in emu.rows("customers")}

        def target() -> dict:
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT number, name, email, city, credit, blocked, "
                                            "modified FROM customers")).all()
            return {r[0]: (r[1], r[2], r[3], _num(r[4]), r[5],
                           r[6].strftime("%Y-%m-%dT%H:%M:%S.") + f"{r[6].microsecond // 1000:03d}Z")
                    for r in rows}

        _sync(path)
        assert len(target()) == 400 and target() == source()

        rows = emu.rows("customers")
        for row in rows[:40]:
            emu.update("customers", row["id"], {"city": "Bratislava", "creditLimit": 777.7})
        for row in rows[40:52]:
            emu.delete("customers", row["id"])
        for i in range(15):
            emu.insert("customers", {"displayName": f"Late {i}", "blocked": "Ship"})
        _sync(path)
        expected = source()
        assert len(expected) == 403 and target() == expected
    engine.dispose()


def test_postgresql_to_business_central(tmp_path, pg_url, amqp_url, monkeypatch):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE accounts (code TEXT PRIMARY KEY, name TEXT NOT NULL, "
                             "email TEXT, city TEXT, credit NUMERIC(12, 2), vip BOOLEAN)")
        conn.execute(sa.text("INSERT INTO accounts VALUES (:code, :name, :email, :city, :credit, :vip)"),
                     [{"code": f"A{i:05d}", "name": f"Account {i}", "email": f"a{i}@x.example",
                       "city": ["Vienna", "Prague", None][i % 3], "credit": f"{i * 10}.{i % 100:02d}",
                       "vip": i % 7 == 0} for i in range(1, 501)])
    with BusinessCentralEmulator(cert_dir=tmp_path / "certs") as emu:
        monkeypatch.setenv("BC_SECRET", emu.client_secret)
        path = _config(tmp_path, amqp_url, pg_url, emu, {
            "source": {"connection": "pg", "entity": "accounts"},
            "target": {"connection": "erp", "entity": "customers"},
            "key": ["code"],
            "fields": {"number": "code", "displayName": "name", "email": "email",
                       "city": "city", "creditLimit": "credit",
                       "taxLiable": "vip"},
        })
        assert app.setup(path, echo=lambda _line: None) == app.EXIT_OK

        def source() -> dict:
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT code, name, email, city, credit, vip "
                                            "FROM accounts")).all()
            return {r[0]: (r[1], r[2] or "", r[3] or "", _num(r[4]), r[5]) for r in rows}  # no NULL in BC

        def target() -> dict:
            return {r["number"]: (r["displayName"], r["email"], r["city"], _num(r["creditLimit"]),
                                  r["taxLiable"]) for r in emu.rows("customers")}

        _sync(path)
        assert len(target()) == 500 and target() == source()

        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE accounts SET city = 'Brno', credit = credit + 1 "
                                 "WHERE code < 'A00100'")
            conn.exec_driver_sql("DELETE FROM accounts WHERE RIGHT(code, 1) = '7'")
            conn.exec_driver_sql("INSERT INTO accounts VALUES ('B00001', 'Brand new', NULL, "
                                 "'Linz', 5, true)")
        _sync(path)
        expected = source()
        assert len(expected) == 451 and target() == expected
    engine.dispose()


def test_a_webhook_notification_wakes_the_detector_long_before_its_interval(
        tmp_path, pg_url, amqp_url, monkeypatch):
    import threading

    from tests.support import pick_free_port, wait_for

    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (number TEXT PRIMARY KEY, city TEXT)")
    port = pick_free_port()
    with BusinessCentralEmulator(cert_dir=tmp_path / "certs", seed=20) as emu:
        monkeypatch.setenv("BC_SECRET", emu.client_secret)
        path = _config(tmp_path, amqp_url, pg_url, emu, {
            "source": {"connection": "erp", "entity": "customers"},
            "target": {"connection": "pg", "entity": "customers"},
            "key": ["number"], "fields": {"number": "number", "city": "city"},
            "poll_interval": "10m",
        }, entities={"customers": {"webhook": True}},
            webhooks={"notification_url": f"http://127.0.0.1:{port}/bc",
                      "listen": f"127.0.0.1:{port}"})

        def cities() -> dict:
            with engine.connect() as conn:
                return dict(conn.execute(sa.text("SELECT number, city FROM customers")).all())

        stop = threading.Event()
        lines: list[str] = []
        worker = threading.Thread(target=lambda: app.run(path, echo=lines.append, stop=stop),
                                  daemon=True)
        worker.start()
        try:
            wait_for(lambda: len(cities()) == 20, timeout=60, message=lambda: f"initial {lines}")
            wait_for(lambda: emu.webhooks.all(), timeout=30, message="no subscription")
            row = emu.rows("customers")[0]
            emu.update("customers", row["id"], {"city": "Woken"})
            emu.webhooks.flush()
            wait_for(lambda: cities().get(row["number"]) == "Woken", timeout=20,
                     message="the notification did not trigger a poll")
        finally:
            stop.set()
            worker.join(30)
    engine.dispose()

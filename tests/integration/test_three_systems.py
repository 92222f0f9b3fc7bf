"""Dataverse ↔ SQL hub ↔ Business Central, both links two-way, random edits everywhere.

The hub (PostgreSQL) is the middle: a change made in Dataverse reaches the hub through
one link and Business Central through the other, and back. After rounds of random
edits, inserts and deletes on all three systems (some on the same record in two of
them between two syncs: conflicts), every system holds the same accounts on the
mapped fields, contacts keep their parent account across the id map, and one more
poll of every source publishes nothing (the quiet state).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from bus.config.load import load_config
from bus.state.store import StateStore
from bus.worker.worker import RunSummary, Worker
from connectors.base import WriteRow
from connectors.business_central.emulator import BusinessCentralEmulator
from connectors.dataverse import DataverseConnector
from connectors.dataverse.emulator import DataverseEmulator, Limits
from connectors.dataverse.emulator.model import CONTACT, KeyDef
from connectors.dataverse.emulator.seed import seed

pytestmark = pytest.mark.integration

HUB_DDL = [
    """CREATE TABLE accounts (id SERIAL PRIMARY KEY, number TEXT NOT NULL UNIQUE,
       name TEXT, city TEXT, credit NUMERIC(14, 2))""",
    """CREATE TABLE contacts (id SERIAL PRIMARY KEY, email TEXT NOT NULL UNIQUE,
       lastname TEXT, account_id INTEGER REFERENCES accounts (id) ON DELETE SET NULL)""",
]


def _num(value: Any) -> str | None:
    return None if value is None else str(Decimal(str(value)).normalize())


def _text(value: Any) -> str | None:
    return value or None


@pytest.fixture
def world(tmp_path: Path, pg_url: str, amqp_url: str, monkeypatch):
    hub = sa.create_engine(pg_url)
    with hub.begin() as conn:
        for ddl in HUB_DDL:
            conn.exec_driver_sql(ddl)
    no_limits = Limits(requests=None, concurrent=None, execution=None)
    with DataverseEmulator(cert_dir=tmp_path / "dv-certs", limits=no_limits) as dv, \
            BusinessCentralEmulator(cert_dir=tmp_path / "bc-certs", seed=25) as bc:
        # Upserts from the hub find Dataverse contacts by e-mail: an alternate key.
        dv.define_entity(replace(CONTACT, keys=(KeyDef("email_key", ("emailaddress1",)),)))
        seed(dv.store, 30)
        monkeypatch.setenv("DV_SECRET", dv.connection()["client_secret"])
        monkeypatch.setenv("BC_SECRET", bc.client_secret)
        retry = {"delays": [0.3, 1], "max_attempts": 8}
        config = {
            "broker": {"url": amqp_url},
            "state": {"url": f"sqlite:///{tmp_path}/state.db"},
            "connections": {
                "crm": dv.connection(client_secret="${DV_SECRET}",
                                     state_dir=str(tmp_path / "dataverse")),
                "hub": {"type": "sql", "url": pg_url},
                "erp": {"type": "business_central",
                        **bc.connection(client_secret="${BC_SECRET}",
                                        index_url=f"sqlite:///{tmp_path}/bc.db", backoff=0.05,
                                        entities={"customers": {"sync_deletion": True,
                                                                "reconcile_interval": 0}})},
            },
            "links": {
                "crm_accounts": {
                    "source": {"connection": "crm", "entity": "account"},
                    "target": {"connection": "hub", "entity": "accounts"},
                    "direction": "both", "key": "accountnumber", "conflict": "newest_wins",
                    "fields": {"number": "accountnumber", "name": "name",
                               "city": "address1_city", "credit": "creditlimit"},
                    "retry": retry,
                },
                "crm_contacts": {
                    "source": {"connection": "crm", "entity": "contact"},
                    "target": {"connection": "hub", "entity": "contacts"},
                    "direction": "both", "key": "emailaddress1",
                    "fields": {"email": "emailaddress1", "lastname": "lastname",
                               "account_id": {"from": "parentcustomerid",
                                              "lookup": "crm_accounts"}},
                    "retry": retry,
                },
                "erp_customers": {
                    "source": {"connection": "hub", "entity": "accounts"},
                    "target": {"connection": "erp", "entity": "customers"},
                    "direction": "both", "key": "number", "conflict": "target_wins",
                    "fields": {"number": "number", "displayName": "name", "city": "city",
                               "creditLimit": "credit"},
                    "retry": retry,
                },
            },
        }
        path = tmp_path / "sync.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        worker = Worker(load_config(path).config)
        worker.prepare_sources()
        worker.open()
        editor = DataverseConnector("editor", **dv.connection(state_dir=str(tmp_path / "ed")))
        try:
            yield {"dv": dv, "bc": bc, "hub": hub, "worker": worker, "editor": editor}
        finally:
            editor.close()
            worker.close()
    hub.dispose()


def _published(summary: RunSummary) -> int:
    return sum(r.changes for r in summary.detected.values())


def _settle(worker: Worker, rounds: int = 8) -> RunSummary:
    for _ in range(rounds):
        summary = worker.run_until_idle(max_wait=120)
        assert not summary.timed_out, summary
        if _published(summary) == 0:
            return summary
    raise AssertionError(f"still publishing after {rounds} rounds: {summary.detected}")


def _dv_accounts(dv: DataverseEmulator) -> dict[str, tuple[Any, ...]]:
    return {r["accountnumber"]: (r["name"], _text(r.get("address1_city")),
                                 _num(r.get("creditlimit")))
            for r in dv.store.tables["account"].rows.values()}


def _hub_accounts(hub: sa.Engine) -> dict[str, tuple[Any, ...]]:
    with hub.connect() as conn:
        rows = conn.execute(sa.text("SELECT number, name, city, credit FROM accounts"))
        return {r[0]: (r[1], _text(r[2]), _num(r[3])) for r in rows}


def _bc_customers(bc: BusinessCentralEmulator) -> dict[str, tuple[Any, ...]]:
    return {r["number"]: (r["displayName"], _text(r["city"]), _num(r["creditLimit"]))
            for r in bc.rows("customers")}


def _dv_contacts(dv: DataverseEmulator) -> dict[str, tuple[Any, ...]]:
    accounts = dv.store.tables["account"].rows
    out = {}
    for r in dv.store.tables["contact"].rows.values():
        parent = (r.get("parentcustomerid") or {}).get("id")
        out[r["emailaddress1"]] = (r.get("lastname"),
                                   accounts[parent]["accountnumber"] if parent in accounts else None)
    return out


def _hub_contacts(hub: sa.Engine) -> dict[str, tuple[Any, ...]]:
    with hub.connect() as conn:
        rows = conn.execute(sa.text("SELECT c.email, c.lastname, a.number FROM contacts c "
                                    "LEFT JOIN accounts a ON a.id = c.account_id"))
        return {r[0]: (r[1], r[2]) for r in rows}


def _assert_equal(world: dict[str, Any]) -> None:
    dv, hub, bc = _dv_accounts(world["dv"]), _hub_accounts(world["hub"]), _bc_customers(world["bc"])
    assert dv == hub, "Dataverse and the hub differ"
    assert hub == bc, "the hub and Business Central differ"
    assert _dv_contacts(world["dv"]) == _hub_contacts(world["hub"])


def test_random_edits_on_three_systems_converge_and_go_quiet(world):
    worker, dv, bc, hub, editor = (world[k] for k in ("worker", "dv", "bc", "hub", "editor"))
    _settle(worker)
    _assert_equal(world)
    assert len(_hub_accounts(hub)) == 30 + 25
    rng = random.Random(2026)
    for round_ in range(3):
        accounts = {r["accountnumber"]: r["accountid"]
                    for r in dv.store.tables["account"].rows.values()}
        numbers = sorted(accounts)
        for n in rng.sample(numbers, 12):
            where = rng.choice(["dv", "hub", "bc", "dv+hub"])
            if "dv" in where:
                editor.upsert("account", [WriteRow({"accountid": accounts[n]}, {
                    "name": f"dv {round_} {n}", "address1_city": rng.choice(["Wien", "Brno"])})])
            if "hub" in where:
                with hub.begin() as conn:
                    conn.execute(sa.text("UPDATE accounts SET name = :v, credit = :c "
                                         "WHERE number = :n"),
                                 {"v": f"hub {round_} {n}", "c": rng.randint(1, 9) * 1000, "n": n})
            if where == "bc":
                customer = next((c for c in bc.rows("customers") if c["number"] == n), None)
                if customer is not None:
                    bc.update("customers", customer["id"],
                              {"displayName": f"bc {round_} {n}", "city": "Graz"})
        editor.upsert("account", [WriteRow({"accountnumber": f"NEW-{round_}"},
                                           {"name": f"born in dv {round_}"})])
        bc.insert("customers", {"displayName": f"born in bc {round_}", "city": "Linz"})
        with hub.begin() as conn:
            conn.execute(sa.text("INSERT INTO accounts (number, name) VALUES (:n, :v)"),
                         {"n": f"HUB-{round_}", "v": f"born in hub {round_}"})
        gone = rng.choice([n for n in numbers if n.startswith("ACC-")])
        contacts = [r for r in dv.store.tables["contact"].rows.values()
                    if (r.get("parentcustomerid") or {}).get("id") == accounts[gone]]
        editor.delete("contact", [{"contactid": c["contactid"]} for c in contacts])
        editor.delete("account", [{"accountid": accounts[gone]}])
        _settle(worker)
        _assert_equal(world)
        assert gone not in _bc_customers(bc)
    # A contact created in the hub under an account born in Business Central.
    born = next(n for n in _hub_accounts(hub) if n not in accounts and not n.startswith(
        ("NEW-", "HUB-")))
    with hub.begin() as conn:
        conn.execute(sa.text("INSERT INTO contacts (email, lastname, account_id) SELECT "
                             ":e, 'Hubson', id FROM accounts WHERE number = :n"),
                     {"e": f"{uuid.uuid4().hex[:8]}@hub.example", "n": born})
    _settle(worker)
    _assert_equal(world)
    assert ("Hubson", born) in _dv_contacts(dv).values()
    quiet = worker.run_until_idle(max_wait=60)
    assert _published(quiet) == 0
    assert quiet.dead_total == 0
    log = StateStore(worker.config.state.url).conflict_rows()
    assert all(row["winner"] in ("a", "b") for row in log)

"""``syncbus demo``: a SQLite → SQLite sync on built-in data, one plain line per step.

A 'crm' database holds customers; an 'erp' database holds clients. The link renames
fields, upper-cases countries, maps status codes, rounds credit limits and stamps a
constant origin. The demo prepares change tracking, syncs, edits the source
(inserts, updates, deletes) through plain SQL, syncs again, and checks each time
that the target equals what the mapping promises.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from bus import app

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = """\
# syncbus demo: customers of a CRM database → clients of an ERP database.
broker:
  url: {amqp_url}
state:
  url: sqlite:///{dir}/state.db
connections:
  crm: {{type: sql, url: "sqlite:///{dir}/crm.db"}}
  erp: {{type: sql, url: "sqlite:///{dir}/erp.db"}}
links:
  customers:
    source: {{connection: crm, entity: customers}}
    target: {{connection: erp, entity: clients}}
    key: [id]
    fields:
      client_id: id
      name: {{from: name, transform: [strip]}}
      email: {{from: email, transform: [lower]}}
      country: {{from: country, transform: [upper], default: SK}}
      status: {{from: status, map: {{A: active, I: inactive, P: prospect}}}}
      credit: {{from: credit_limit, transform: [{{round: 0}}]}}
      origin: {{const: crm}}
    poll_interval: 1
"""

_SOURCE_DDL = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, country TEXT,
    status TEXT NOT NULL, credit_limit NUMERIC)
"""
_TARGET_DDL = """
CREATE TABLE clients (
    client_id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, country TEXT,
    status TEXT NOT NULL, credit NUMERIC, origin TEXT)
"""
_STATUS = {"A": "active", "I": "inactive", "P": "prospect"}
_FIRST = ["Anna", "Peter", "Jana", "Martin", "Eva", "Tomas", "Lucia", "Marek", "Zuzana", "Jan"]
_LAST = ["Novak", "Horvath", "Kovac", "Varga", "Toth", "Nagy", "Balaz", "Molnar", "Szabo"]


def run_demo(directory: Path, *, rows: int, amqp_url: str, echo: Callable[[str], None]) -> int:
    """Run the demo in ``directory`` (recreated); returns the exit code."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("crm.db", "erp.db", "state.db"):
        for suffix in ("", "-wal", "-shm"):
            (directory / f"{name}{suffix}").unlink(missing_ok=True)
    config = directory / "syncbus.yaml"
    config.write_text(DEMO_CONFIG.format(amqp_url=amqp_url, dir=directory.resolve()))
    rng = random.Random(7)
    with sqlite3.connect(directory / "crm.db") as db:
        db.execute(_SOURCE_DDL)
        db.executemany("INSERT INTO customers (id, name, email, country, status, credit_limit) VALUES (?,?,?,?,?,?)",
                       [_customer(i, rng) for i in range(1, rows + 1)])
    with sqlite3.connect(directory / "erp.db") as db:
        db.execute(_TARGET_DDL)
    echo(f"1. created {rows} customers in {directory}/crm.db and an empty clients table")
    echo(f"   config: {config}")

    echo("2. syncbus setup: row-version triggers and a tombstone table on the source")
    if (code := app.setup(config, echo=lambda line: echo(f"   {line}"))) != app.EXIT_OK:
        return code
    if (code := _sync(config, "3. first sync (initial load)", echo)) != app.EXIT_OK:
        return code
    if not _check(directory, echo):
        return app.EXIT_FAILED

    with sqlite3.connect(directory / "crm.db") as db:
        changed = max(1, rows // 10)
        db.execute("UPDATE customers SET status = 'I', credit_limit = credit_limit + 100.4 "
                   "WHERE id <= ?", (changed,))
        db.execute("DELETE FROM customers WHERE id > ?", (rows - max(1, rows // 50),))
        db.executemany("INSERT INTO customers (id, name, email, country, status, credit_limit) VALUES (?,?,?,?,?,?)",
                       [_customer(i, rng) for i in range(rows + 1, rows + 21)])
    echo(f"4. edited the source with plain SQL: {changed} updated, {max(1, rows // 50)} deleted, "
         "20 inserted")
    if (code := _sync(config, "5. incremental sync", echo)) != app.EXIT_OK:
        return code
    if not _check(directory, echo):
        return app.EXIT_FAILED
    echo(f"done. Explore: syncbus run --config {config} --until-idle")
    return app.EXIT_OK


def _customer(i: int, rng: random.Random) -> tuple[object, ...]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    country = rng.choice(["sk", "cz", "at", "de", None])
    credit = str(Decimal(rng.randrange(0, 5_000_000)) / 100)
    return (i, f" {first} {last} ", f"{first}.{last}{i}@Example.com", country,
            rng.choice(list(_STATUS)), credit)


def _sync(config: Path, title: str, echo: Callable[[str], None]) -> int:
    echo(f"{title}: syncbus run --until-idle")
    return app.run(config, until_idle=True, max_wait=120, echo=lambda line: echo(f"   {line}"))


def _check(directory: Path, echo: Callable[[str], None]) -> bool:
    """Compare the target with the mapped source; print the verdict."""
    with sqlite3.connect(directory / "crm.db") as db:
        source = db.execute("SELECT id, name, email, country, status, credit_limit "
                            "FROM customers").fetchall()
    with sqlite3.connect(directory / "erp.db") as db:
        target = {r[0]: r[1:] for r in db.execute(
            "SELECT client_id, name, email, country, status, credit, origin FROM clients")}
    expected = {
        i: (name.strip(), email.lower() if email else None, (country or "sk").upper(),
            _STATUS[status], Decimal(str(credit)).quantize(Decimal(1), ROUND_HALF_UP), "crm")
        for i, name, email, country, status, credit in source
    }
    bad = [k for k, v in expected.items()
           if k not in target or _normal(target[k]) != _normal(v)]
    extra = target.keys() - expected.keys()
    if bad or extra:
        echo(f"   MISMATCH: {len(bad)} rows differ, {len(extra)} rows should not exist "
             f"(first: {(bad or sorted(extra))[:5]})")
        return False
    echo(f"   target matches the source: {len(target)} clients")
    return True


def _normal(row: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(str(Decimal(str(v))) if isinstance(v, (int, float, Decimal)) else v for v in row)

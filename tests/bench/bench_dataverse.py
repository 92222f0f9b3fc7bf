"""Benchmark: 50,000 accounts Dataverse emulator → PostgreSQL, then 50,000 back, through RabbitMQ.

The emulator runs in this process and enforces a scaled-down service protection
limit (default 600 requests per 30 s per user, i.e. 20 requests/s); the worker runs
as ``syncbus run --until-idle`` in a subprocess, like production. For each direction
the script prints records/s, the requests Dataverse accepted, the 429 answers, and
the share of the allowed request rate used (accepted requests / (seconds × limit
rate), and against the most a sliding window admits in the run's duration, which
counts the initial burst into an empty window) and the records per accepted request.
Upserts go out as ``UpsertMultiple`` requests of ``--bulk-size`` records (``--bulk-size
0``: ``$batch`` requests of ``--batch-size`` operations, the former way). Targets:
PG → Dataverse ≥ 2,600 records/s (5 × the 520 of ``$batch`` of 25), zero failed
records, target equal to source; Dataverse → PG unchanged or better.

Usage: .venv/bin/python tests/bench/bench_dataverse.py [--count 50000] [--requests 600]
       [--window 30] [--batch-size 25] [--bulk-size 1000]
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from connectors.dataverse.emulator import DataverseEmulator, Limits  # noqa: E402
from connectors.identity import DEFAULT_CLIENT_SECRET  # noqa: E402
from tests.bench.bench_sync import _database, _vhost  # noqa: E402

CMD = [sys.executable, "-m", "bus.cli"]


def _seed(emulator: DataverseEmulator, count: int) -> None:
    rng = random.Random(count)
    table = emulator.store.tables["account"]
    cities = ["Bratislava", "Vienna", "Prague", "Berlin", "Seattle", None]
    with emulator.store.request():
        for n in range(count):
            emulator.store.insert(table, str(uuid.UUID(int=rng.getrandbits(128), version=4)), {
                "name": f"Account {n}", "accountnumber": f"ACC-{n:06d}",
                "address1_city": rng.choice(cities), "numberofemployees": rng.randint(1, 5000),
                "revenue": round(rng.uniform(1000, 1_000_000), 2)})


def _config(tmp: Path, name: str, amqp_url: str, pg_url: str, emulator: DataverseEmulator,
            batch_size: int, bulk_size: int, link: dict) -> Path:
    crm = emulator.connection(state_dir=str(tmp / "dataverse"), batch_size=batch_size,
                              bulk_size=bulk_size, client_secret=DEFAULT_CLIENT_SECRET,
                              retry_attempts=8)
    config = {"broker": {"url": amqp_url, "prefetch": 2000},
              "state": {"url": f"sqlite:///{tmp}/state.db"},
              "connections": {"pg": {"type": "sql", "url": pg_url}, "crm": crm},
              "links": {name: {"page_size": 5000, "batch_size": max(500, bulk_size),
                               "poll_interval": 1,
                               "retry": {"delays": [1, 5, 10], "max_attempts": 10}, **link}}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(path: Path, emulator: DataverseEmulator, limits: Limits, label: str,
         count: int) -> None:
    requests0, throttled0 = emulator.faults.requests, emulator.throttled
    started = time.perf_counter()
    proc = subprocess.run([*CMD, "run", "--config", str(path), "--until-idle", "--max-wait", "900",
                           "--log-level", "warning"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
        raise SystemExit(f"{label}: sync failed (exit {proc.returncode})")
    throttled = emulator.throttled - throttled0
    accepted = emulator.faults.requests - requests0 - throttled
    assert limits.requests is not None
    rate = limits.requests / limits.window
    # A sliding window admits at most `requests` in any `window` seconds: starting empty,
    # at most requests × ceil(seconds / window) in the run.
    most = limits.requests * math.ceil(seconds / limits.window)
    print(f"{label}: {count} records in {seconds:.1f} s = {count / seconds:,.0f} records/s; "
          f"{accepted} requests accepted, {throttled} answered 429; allowed rate used: "
          f"{accepted / most:.0%} of the most the window admits in {seconds:.0f} s ({most}), "
          f"{accepted / (seconds * rate):.0%} of {rate:g} requests/s; "
          f"{count / max(accepted, 1):,.1f} records per request")
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("link ", "done"))]
    for line in summary:
        print(f"    {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=50_000)
    ap.add_argument("--requests", type=int, default=600, help="requests per window")
    ap.add_argument("--window", type=float, default=30.0, help="seconds")
    ap.add_argument("--batch-size", type=int, default=25, help="operations per $batch")
    ap.add_argument("--bulk-size", type=int, default=1000,
                    help="records per UpsertMultiple (0: upserts through $batch)")
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()

    amqp_url, _vhost_name = _vhost(args.amqp_url)
    pg_url, _db = _database(args.pg_url)
    tmp = Path(tempfile.mkdtemp(prefix="syncbus-bench-dataverse-"))
    limits = Limits(requests=args.requests, window=args.window, concurrent=52,
                    execution=1200.0 * args.window / 300)
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE bench_accounts (accountid UUID PRIMARY KEY, name TEXT NOT NULL, "
            "accountnumber TEXT, city TEXT, revenue NUMERIC(16, 2), employees INTEGER)")
    with DataverseEmulator(cert_dir=tmp / "certs", limits=limits) as emulator:
        _seed(emulator, args.count)
        print(f"emulator {emulator.url}: {args.count} accounts; limit {args.requests} requests / "
              f"{args.window:g} s per user; UpsertMultiple of {args.bulk_size}, "
              f"$batch of {args.batch_size}")
        fields = {"accountid": "accountid", "name": "name", "accountnumber": "accountnumber",
                  "city": "address1_city", "revenue": "revenue", "employees": "numberofemployees"}
        down = _config(tmp, "down", amqp_url, pg_url, emulator, args.batch_size, args.bulk_size, {
            "source": {"connection": "crm", "entity": "account"},
            "target": {"connection": "pg", "entity": "bench_accounts"},
            "key": ["accountid"], "fields": fields})
        _run(down, emulator, limits, "Dataverse → PostgreSQL", args.count)
        _check(emulator, engine, suffix="")

        up = _config(tmp, "up", amqp_url, pg_url, emulator, args.batch_size, args.bulk_size, {
            "source": {"connection": "pg", "entity": "bench_accounts"},
            "target": {"connection": "crm", "entity": "account"},
            "key": ["accountid"], "fields": {v: k for k, v in fields.items()}})
        subprocess.run([*CMD, "setup", "--config", str(up)], cwd=ROOT, check=True,
                       capture_output=True)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE bench_accounts SET name = name || ' (pg)', "
                                 "revenue = revenue + 1")
        _run(up, emulator, limits, "PostgreSQL → Dataverse", args.count)
        _check(emulator, engine, suffix=" (pg)")
    engine.dispose()


def _check(emulator: DataverseEmulator, engine: sa.Engine, *, suffix: str) -> None:
    """Target equals source, and every name carries the last direction's mark."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT accountid, name, accountnumber, city, revenue, "
                                    "employees FROM bench_accounts")).all()
    pg = {str(r[0]): (r[1], r[2], r[3], Decimal(str(r[4])).normalize(), r[5]) for r in rows}
    dv = {r["accountid"]: (r["name"], r["accountnumber"], r.get("address1_city"),
                           Decimal(str(r["revenue"])).normalize(), r.get("numberofemployees"))
          for r in emulator.store.tables["account"].rows.values()}
    assert pg == dv, "target differs from source"
    assert all(v[0].endswith(suffix) for v in dv.values())
    print(f"    check: {len(pg)} rows equal on both sides")


if __name__ == "__main__":
    main()

"""Benchmark: 100,000 changes SQLite → PostgreSQL end to end through RabbitMQ.

Prints the end-to-end rate (changes/s), the worker's peak RSS, and — in the same run,
on the same broker — the raw ceiling: pika publishing the same number of same-size
persistent messages to a quorum queue with asynchronous confirms, then consuming them
with batched acks. Target: end-to-end ≥ 0.3 × raw ceiling, peak RSS ≤ 250 MB.

Usage: .venv/bin/python tests/bench/bench_sync.py [--count 100000]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.raw_ceiling import measure_raw_ceiling  # noqa: E402
from tests.syncenv import insert_items, make_env, table_rows  # noqa: E402


def _vhost(base: str) -> tuple[str, str | None]:
    name = f"sbbench-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*",
                        ".*"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return base, None
    return base.rstrip("/") + "/" + name, name


def _database(pg_base: str) -> tuple[str, str]:
    name = f"sbbench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(pg_base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return pg_base.rsplit("/", 1)[0] + "/" + name, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()

    amqp_url, vhost = _vhost(args.amqp_url)
    pg_url, db = _database(args.pg_url)
    tmp = Path(tempfile.mkdtemp(prefix="syncbus-bench-"))
    env = make_env(tmp, source_url=f"sqlite:///{tmp}/src.db", target_url=pg_url,
                   amqp_url=amqp_url, link={"page_size": 5000, "batch_size": 1000})
    insert_items(env.source(), range(1, args.count + 1))
    cmd = [sys.executable, "-m", "bus.cli"]
    subprocess.run([*cmd, "setup", "--config", str(env.config_path)], cwd=ROOT, check=True,
                   capture_output=True)
    sample = env.source().connect().execute(sa.text("SELECT * FROM items LIMIT 1")).first()
    print(f"synced rows: {args.count}, sample row: {tuple(sample)}")

    started = time.perf_counter()
    proc = subprocess.run([*cmd, "run", "--config", str(env.config_path), "--until-idle",
                           "--log-level", "warning"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        raise SystemExit("sync failed")
    assert table_rows(env.target()) == table_rows(env.source()), "target differs from source"
    e2e = args.count / seconds

    raw = measure_raw_ceiling(amqp_url, args.count, _event_size(env))
    ratio = e2e / raw["combined_rate"]
    print(f"end to end:     {e2e:10,.0f} changes/s  ({seconds:.1f}s for {args.count:,}, "
          "process start included)")
    print(f"worker peak RSS: {rss_mb:9,.0f} MB  (target ≤ 250)")
    print(f"raw publish:    {raw['publish_rate']:10,.0f} msg/s")
    print(f"raw consume:    {raw['consume_rate']:10,.0f} msg/s")
    print(f"raw ceiling:    {raw['combined_rate']:10,.0f} msg/s  (publish then consume)")
    print(f"ratio:          {ratio:10.2f}  × raw ceiling  (target ≥ 0.30)")
    if vhost:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
    engine = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {db} WITH (FORCE)")


def _event_size(env: object) -> int:
    """Bytes of one change event of this table, for a like-for-like raw measurement."""
    from schemas.event import dumps, new_event

    event = new_event(connection="src", entity="items", op="upsert", key={"id": 12345},
                      version=12345, modified_at=None, cursor="12000",
                      record={"id": 12345, "name": "n-12345", "qty": 26, "price": "345.45",
                              "updated": None})
    return len(dumps(event))


if __name__ == "__main__":
    main()

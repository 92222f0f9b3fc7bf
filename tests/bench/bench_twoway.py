"""Benchmark: what two-way sync costs next to one-way, SQLite ↔ PostgreSQL.

For the same table and data it measures, through RabbitMQ and the CLI (process start
included):

* one-way initial load (``direction: a2b``) of N rows;
* two-way initial load (``direction: both``): the consumer also reads the target's
  current records (conflict check), keeps the pair state, and the next poll of the
  target finds only echoes;
* the echo poll: how long the target's detector takes to recognise N echoes, and that
  it publishes none;
* two-way edits on side b: N/4 updates flowing b → a.

Prints rates and the ratio two-way / one-way.

Usage: .venv/bin/python tests/bench/bench_twoway.py [--count 20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_sync import _database, _vhost  # noqa: E402
from tests.syncenv import insert_items, make_env, table_rows  # noqa: E402

CLI = [sys.executable, "-m", "bus.cli"]


def _run(config: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([*CLI, "run", "--config", str(config), "--until-idle", "--log-level",
                           "warning"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        raise SystemExit("sync failed")
    return seconds, proc.stdout


def _published(output: str, detector: str) -> str:
    return next((line for line in output.splitlines() if line.startswith(detector)), "?")


def _measure(direction: str, count: int, amqp_base: str, pg_base: str) -> dict[str, float]:
    amqp_url, vhost = _vhost(amqp_base)
    pg_url, db = _database(pg_base)
    tmp = Path(tempfile.mkdtemp(prefix=f"syncbus-bench-{direction}-"))
    env = make_env(tmp, source_url=f"sqlite:///{tmp}/src.db", target_url=pg_url,
                   amqp_url=amqp_url, link={"page_size": 5000, "batch_size": 1000,
                                            "direction": direction})
    insert_items(env.source(), range(1, count + 1))
    subprocess.run([*CLI, "setup", "--config", str(env.config_path)], cwd=ROOT, check=True,
                   capture_output=True)
    out: dict[str, float] = {}
    seconds, _ = _run(env.config_path)
    assert table_rows(env.target()) == table_rows(env.source()), "target differs"
    out["load"] = count / seconds
    if direction == "both":
        seconds, output = _run(env.config_path)
        out["echo_poll_s"] = seconds
        print(f"  echo poll: {_published(output, 'dst.items')}")
        edits = count // 4
        with env.target().begin() as conn:
            conn.execute(sa.text("UPDATE items SET qty = qty + 1 WHERE id <= :n"), {"n": edits})
        seconds, _ = _run(env.config_path)
        assert table_rows(env.target()) == table_rows(env.source()), "source differs"
        out["b2a_edits"] = edits / seconds
    if vhost:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
    engine = sa.create_engine(pg_base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {db} WITH (FORCE)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    print(f"rows: {args.count:,}")
    one = _measure("a2b", args.count, args.amqp_url, args.pg_url)
    print(f"one-way load:   {one['load']:10,.0f} changes/s")
    two = _measure("both", args.count, args.amqp_url, args.pg_url)
    print(f"two-way load:   {two['load']:10,.0f} changes/s  "
          f"({two['load'] / one['load']:.2f} × one-way)")
    print(f"echo poll:      {two['echo_poll_s']:10.1f} s for {args.count:,} echoes "
          "(process start included; nothing published)")
    print(f"b → a edits:    {two['b2a_edits']:10,.0f} changes/s")


if __name__ == "__main__":
    main()

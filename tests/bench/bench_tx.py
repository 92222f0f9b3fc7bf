"""Benchmark: the offline-transaction log with 100,000 dead-lettered transactions.

Times ``syncbus tx list --entity …`` (filtered listing) and ``syncbus tx replay --all``
as an operator runs them (process start included). Targets: listing under 5 s,
replay ≥ 5,000 transactions/s.

Usage: .venv/bin/python tests/bench/bench_tx.py [--count 100000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kombu import Connection  # noqa: E402

from bus.config import load_config  # noqa: E402
from bus.publisher import OutMessage, Publisher  # noqa: E402
from bus.topology import DEAD_EXCHANGE, declare_topology  # noqa: E402
from schemas.event import dumps, new_event  # noqa: E402
from tests.bench.bench_sync import _vhost  # noqa: E402
from tests.syncenv import make_env  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = ap.parse_args()
    amqp_url, vhost = _vhost(args.amqp_url)
    tmp = Path(tempfile.mkdtemp(prefix="syncbus-bench-tx-"))
    env = make_env(tmp, source_url=f"sqlite:///{tmp}/s.db", target_url=f"sqlite:///{tmp}/t.db",
                   amqp_url=amqp_url)
    with Connection(amqp_url) as conn:
        declare_topology(conn, load_config(env.config_path).config)
    publisher = Publisher(amqp_url)
    hdrs = {"x-syncbus-link": "items", "x-syncbus-queue": "syncbus.link.items.a2b",
            "x-syncbus-routing-key": "src.items.upsert", "x-syncbus-attempts": 1,
            "x-syncbus-error": 'null value in column "name" violates not-null constraint',
            "x-syncbus-error-class": "RecordRejected"}
    for start in range(0, args.count, 5_000):
        batch = []
        for i in range(start, min(start + 5_000, args.count)):
            event = new_event(connection="src", entity="items" if i % 2 else "orders",
                              op="upsert", key={"id": i}, version=i, modified_at=None,
                              cursor=None, record={"id": i, "name": None, "qty": i})
            batch.append(OutMessage(DEAD_EXCHANGE, "src.items.upsert", dumps(event), hdrs,
                                    event["id"]))
        publisher.publish_batch(batch)
    publisher.close()
    cli = [sys.executable, "-m", "bus.cli", "tx"]
    cfg = ["--config", str(env.config_path)]

    started = time.perf_counter()
    listed = subprocess.run([*cli, "list", "--entity", "orders", "--json", *cfg], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    list_s = time.perf_counter() - started
    matches = listed.stdout.count('"status": "error"')

    started = time.perf_counter()
    subprocess.run([*cli, "replay", "--all", *cfg], cwd=ROOT, capture_output=True, check=True)
    replay_s = time.perf_counter() - started

    print(f"dead-lettered:   {args.count:,}")
    print(f"tx list --entity: {list_s:6.2f} s  ({matches:,} matches; target < 5 s)")
    print(f"tx replay --all:  {replay_s:6.2f} s  = {args.count / replay_s:,.0f} transactions/s "
          "(target ≥ 5,000/s)")
    if vhost:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)


if __name__ == "__main__":
    main()

"""Benchmark: the offline-transaction log with 100,000 dead-lettered transactions.

Times the ``syncbus tx`` commands as an operator runs them (process start included):
``reconcile`` (indexing 100,000 letters RabbitMQ wrote without the consumer, once),
``list --entity`` (50,000 matches, JSON; target < 1 s), ``stats`` (< 0.2 s), a replay
of 1,000 ids picked from the 100,000 (< 2 s) and ``replay --all`` (≥ 10,000/s); with
the largest resident memory of the commands so far (target < 200 MB each).

Usage: .venv/bin/python tests/bench/bench_tx.py [--count 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kombu import Connection  # noqa: E402

from bus.amqp.publisher import OutMessage, Publisher  # noqa: E402
from bus.amqp.topology import DEAD_EXCHANGE, declare_topology  # noqa: E402
from bus.config.load import load_config  # noqa: E402
from schemas.event import dumps, new_event  # noqa: E402
from tests.bench.bench_sync import _vhost  # noqa: E402
from tests.syncenv import make_env  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--seed-only", action="store_true",
                    help="Only fill the log and print the config path (for profiling).")
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
    if args.seed_only:
        print(env.config_path)
        return
    cli = [sys.executable, "-m", "bus.cli", "tx"]
    cfg = ["--config", str(env.config_path)]
    print(f"dead-lettered: {args.count:,} (half of them entity 'orders')")

    # Peak memory of each command as GNU time reports it: a forked child's own
    # rusage also counts the pages it shared with this (large) process before exec.
    gnu_time = ["/usr/bin/time", "-f", "maxrss-kb=%M"] if Path("/usr/bin/time").exists() else []

    def timed(label: str, *argv: str, target: str = "") -> tuple[float, str]:
        started = time.perf_counter()
        done = subprocess.run([*gnu_time, *cli, *argv, *cfg], cwd=ROOT, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{label} failed ({done.returncode}): {done.stderr[-2000:]}")
        kb = [ln.split("=", 1)[1] for ln in done.stderr.splitlines() if ln.startswith("maxrss-kb=")]
        mem = f"{int(kb[-1]) / 1024:,.0f} MB" if kb else "n/a (no /usr/bin/time)"
        print(f"{label:<34} {seconds:7.2f} s  {target}  (max RSS {mem}; target < 200 MB)")
        return seconds, done.stdout

    timed("tx reconcile (index 100k letters)", "reconcile", target="one-time")
    seconds, out = timed("tx list --entity orders --json", "list", "--entity", "orders", "--json",
                         target="target < 1 s")
    print(f"{'':<34} {out.count(chr(10) + '  {') or len(json.loads(out)):,} matches")
    timed("tx stats", "stats", "--json", target="target < 0.2 s")
    startup = min(_startup() for _ in range(3))
    print(f"{'(python + import bus.cli.main alone)':<34} {startup:7.2f} s")
    ids = random.Random(7).sample(_ids(env.config_path), 1000)
    seconds, _ = timed("tx replay <1,000 ids>", "replay", *ids, target="target < 2 s")
    seconds, _ = timed("tx replay --all", "replay", "--all", target="")
    left = args.count - 1000
    print(f"{'':<34} = {left / seconds:,.0f} transactions/s (target ≥ 10,000/s)")
    if vhost:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)


def _startup() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import bus.cli.main"], cwd=ROOT, check=True)
    return time.perf_counter() - started


def _ids(config: Path) -> list[str]:
    from bus.ops.txlog import TxLog  # noqa: PLC0415

    log = TxLog(load_config(config).config)
    try:
        return [t.id for t in log.select("error")]
    finally:
        log.close()


if __name__ == "__main__":
    main()

"""The offline-transaction index: complete listings, exact moves, every status visible.

Real RabbitMQ (the dead-letter log is a stream) and real state stores (SQLite and
PostgreSQL). What an operator relies on:

- the index lists exactly what the log and the queues hold, after thousands of random
  moves interleaved with deliveries (a real consumer settling replayed copies);
- a replay, archive or purge killed with SIGKILL at a random point, on a loaded
  machine, loses nothing: run again (after ``tx reconcile``) it finishes the job;
- a transaction waiting inside a connector's retries is listed as Pending;
- two configurations sharing a vhost never touch each other's transactions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pytest
import sqlalchemy as sa
import yaml
from kombu import Connection

from bus.amqp.consumer import BatchConsumer, Decision, Verdict
from bus.amqp.deadlog import DeadLog
from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import DEAD_EXCHANGE, declare_topology, link_queues
from bus.amqp.txrecord import TxRecorder
from bus.cli import app
from bus.config.load import load_config
from bus.ops.txlog import TxFilter, TxLog
from bus.state.store import StateStore
from tests.proxy import TcpProxy
from tests.support import wait_for
from tests.syncenv import ROOT, insert_items, make_env, table_rows

pytestmark = pytest.mark.integration

WORK = "syncbus.link.items.a2b"


def _letters(ids: list[str], link: str = "items") -> Iterator[list[OutMessage]]:
    """Dead letters as a consumer writes them, in publishable chunks."""
    hdrs = {"x-syncbus-link": link, "x-syncbus-queue": f"syncbus.link.{link}.a2b",
            "x-syncbus-routing-key": "src.items.upsert", "x-syncbus-error": "boom",
            "x-syncbus-error-class": "RecordRejected", "x-syncbus-attempts": 1,
            "x-syncbus-last-failure": "2026-01-01T00:00:00+00:00"}
    for start in range(0, len(ids), 5_000):
        yield [OutMessage(DEAD_EXCHANGE, "src.items.upsert",
                          json.dumps({"id": i, "data": {"key": {"id": n}}}).encode(),
                          {**hdrs, "x-syncbus-letter": uuid.uuid4().hex}, i)
               for n, i in enumerate(ids[start:start + 5_000], start)]


def _uuids(n: int, seed: int) -> list[str]:
    """``n`` event ids (UUIDs, as syncbus's are), the same for a seed."""
    rnd = random.Random(seed)
    return [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(n)]


def _fill(amqp_url: str, ids: list[str], link: str = "items") -> None:
    publisher = Publisher(amqp_url)
    try:
        for chunk in _letters(ids, link):
            publisher.publish_batch(chunk)
    finally:
        publisher.close()


def _count(amqp_url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def _take_all(amqp_url: str, queue: str) -> list[str]:
    """Consume (and remove) every message of ``queue``: their message ids."""
    expected = _count(amqp_url, queue)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    got: list[str] = []
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=5000)
        channel.basic_consume(queue, lambda _c, _m, props, _b: got.append(props.message_id),
                              auto_ack=True)
        deadline = time.monotonic() + 300
        while len(got) < expected and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.5)
    finally:
        conn.close()
    assert len(got) >= expected, f"read {len(got)} of {expected} messages of {queue}"
    return got


def _declare(config) -> None:
    with Connection(config.broker.url) as conn:
        declare_topology(conn, config)


def _cli(config: Path, *args: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bus.cli", "tx", *args, "--config",
                             str(config)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, **kw)


def _state_url(request, tmp_path: Path) -> str:
    return request.getfixturevalue("pg_url") if request.param == "postgresql" else (
        f"sqlite:///{tmp_path}/state.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def indexed_env(request, tmp_path, amqp_url):
    """A config (one link ``items``) whose state store is SQLite or PostgreSQL."""
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/s.db",
                   target_url=f"sqlite:///{tmp_path}/t.db", amqp_url=amqp_url)
    raw = yaml.safe_load(env.config_path.read_text())
    raw["state"]["url"] = _state_url(request, tmp_path)
    env.config_path.write_text(yaml.safe_dump(raw))
    config = load_config(env.config_path).config
    _declare(config)
    return env, config


@contextmanager
def _consumer(config, decide) -> Iterator[BatchConsumer]:
    """The link's real consumer, settling each delivery by ``decide(id, replays)``."""
    state = StateStore(config.state.url)
    publisher = Publisher(config.broker.url)
    link = config.links["items"]

    def handler(batch):
        return [decide(d.message_id, d.headers.get("x-syncbus-replays", 0)) for d in batch]

    consumer = BatchConsumer(url=config.broker.url, queues=link_queues("items", link),
                             handler=handler, publisher=publisher, retry=link.retry,
                             prefetch=200, batch_size=50,
                             tx_index=TxRecorder(state, "items", "a2b"))
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        stop.set()
        thread.join(30)
        publisher.close()
        state.close()


@pytest.mark.slow
def test_the_listing_equals_the_log_and_queues_after_10000_random_moves(indexed_env):
    env, config = indexed_env
    rnd = random.Random(1510)
    ids = _uuids(1500, 1)
    _fill(config.broker.url, ids)
    applied: Counter[tuple[str, int]] = Counter()

    def decide(tx_id: str, replays: int) -> Decision:
        applied[(tx_id, replays)] += 1
        if (hash(tx_id) + replays) % 3 == 0:  # fails again: back to Error, a new letter
            return Decision(Verdict.DEAD, error="still failing", error_class="RecordRejected")
        return Decision.ack()

    log = TxLog(config, by="operator:test")
    purged: set[str] = set()
    moves = fresh = 0
    with _consumer(config, decide):
        while moves < 10_000:
            errors = [t.id for t in log.select("error")]
            archived = [t.id for t in log.select("archived")]
            op = rnd.choice(["replay", "replay", "archive", "unarchive", "purge", "fail"])
            if op == "replay" and errors:
                moves += log.replay(TxFilter(ids=set(rnd.sample(errors, min(60, len(errors)))))
                                    ).moved
            elif op == "archive" and errors:
                moves += log.archive(TxFilter(ids=set(rnd.sample(errors, min(40, len(errors)))))
                                     ).moved
            elif op == "unarchive" and archived:
                picked = set(rnd.sample(archived, min(30, len(archived))))
                moves += log.replay(TxFilter(ids=picked), status="archived").moved
            elif op == "purge" and archived and rnd.random() < 0.3:
                gone = {t.id for t in log.select("archived")}
                done = log.purge_archived(0).moved
                assert done == len(gone), (done, len(gone))
                moves += done
                purged |= gone
            elif op == "fail":
                new = _uuids(50, 1000 + fresh)
                fresh += 50
                _fill(config.broker.url, new)
                ids += new
                log.sweep()
                moves += 50
        wait_for(lambda: _count(config.broker.url, WORK) == 0 and not log.select("pending"),
                 timeout=120, message="replayed copies never settled")
    log.sweep()
    # Every transaction has exactly one status; none was lost, none applied twice.
    index = {t.id: t for s in ("error", "archived", "pending") for t in log.select(s)}
    processed = {r["id"] for r in log.state.tx_rows(
        TxFilter().query(("processed",), ("items",))).rows}
    assert not index.keys() & purged, sorted(index.keys() & purged)[:10]
    assert not processed & purged, sorted(processed & purged)[:10]
    assert set(index) | processed | purged == set(ids)
    assert all(n == 1 for n in applied.values()), [k for k, n in applied.items() if n > 1]
    # Each Error or Archived row points at its newest letter in the log, which holds it.
    newest: dict[str, int] = {}
    with DeadLog(config.broker.url) as dl:
        for letter in dl.read_to_end(None):
            newest[str(letter.props.message_id)] = letter.offset
    for tx in index.values():
        assert tx.status != "pending"
        assert tx.offset == newest[tx.id], (tx.id, tx.status, tx.offset, newest[tx.id])
    log.close()


def _loaded() -> list[subprocess.Popen[bytes]]:
    """A busy process per core, as on a loaded CI machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]


def _kill_when(proc: subprocess.Popen[str], ready) -> None:
    wait_for(lambda: proc.poll() is not None or ready(), timeout=300, interval=0.05,
             message="the command never got going")
    assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


@pytest.mark.slow
def test_killing_replay_archive_and_purge_of_100000_transactions_loses_none(tmp_path,
                                                                             amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/s.db",
                   target_url=f"sqlite:///{tmp_path}/t.db", amqp_url=amqp_url)
    config = load_config(env.config_path).config
    _declare(config)
    ids = [str(uuid.uuid4()) for _ in range(100_000)]
    _fill(amqp_url, ids)
    rnd = random.Random()
    log = TxLog(config)
    load = _loaded()
    try:
        assert subprocess.run([sys.executable, "-m", "bus.cli", "tx", "reconcile", "--config",
                               str(env.config_path)], cwd=ROOT, capture_output=True,
                              timeout=600).returncode == 0
        counts = lambda: log.stats()["items"]  # noqa: E731

        # Archive killed part-way: every transaction is Error or Archived, never both.
        proc = _cli(env.config_path, "archive", "--all")
        stop_at = rnd.randrange(2_000, 90_000)
        _kill_when(proc, lambda: counts()["archived"] >= stop_at)
        mid = counts()
        assert mid["error"] + mid["archived"] == 100_000 and 0 < mid["archived"] < 100_000
        # Purge killed part-way: what is left is still Archived, the rest gone.
        proc = _cli(env.config_path, "purge", "--archived", "--older-than", "0s")
        _kill_when(proc, lambda: counts()["archived"] < mid["archived"])
        assert counts()["error"] == mid["error"]
        assert subprocess.run([sys.executable, "-m", "bus.cli", "tx", "replay", "--all",
                               "--status", "archived", "--config", str(env.config_path)],
                              cwd=ROOT, capture_output=True, timeout=600).returncode == 0
        left = counts()
        assert left["archived"] == 0 and left["error"] == mid["error"]
        replayed = left["pending"]

        # Replay killed part-way, then reconciled and run again.
        proc = _cli(env.config_path, "replay", "--all")
        stop_at = rnd.randrange(2_000, max(2_001, mid["error"] - 2_000))
        _kill_when(proc, lambda: _count(amqp_url, WORK) >= replayed + stop_at)
        for again in (("reconcile",), ("replay", "--all")):
            done = subprocess.run([sys.executable, "-m", "bus.cli", "tx", *again, "--config",
                                   str(env.config_path)], cwd=ROOT, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        for p in load:
            p.kill()
    final = log.stats()["items"]
    assert final["error"] == 0 and final["archived"] == 0
    queued = _take_all(amqp_url, WORK)
    purged = 100_000 - final["pending"]
    assert set(queued) <= set(ids) and len(set(queued)) == final["pending"]
    # Only the chunk in flight when the replay was killed can be queued twice; the
    # consumer skips such a copy (its version was applied already).
    assert len(queued) - len(set(queued)) <= 2_000
    assert purged == mid["archived"] - replayed
    log.close()


def test_a_transaction_inside_a_connector_retry_is_listed_as_pending(tmp_path, pg_url,
                                                                     amqp_url):
    url = sa.make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db",
                   target_url=url.set(port=proxy.port).render_as_string(hide_password=False),
                   amqp_url=amqp_url, link={"retry": {"delays": ["3s"]}})
    # A PostgreSQL state store: with SQLite the apply transaction holds the store's only
    # write lock while the target hangs, so nothing can be listed until it gives up.
    raw = yaml.safe_load(env.config_path.read_text())
    raw["state"]["url"] = pg_url
    env.config_path.write_text(yaml.safe_dump(raw))
    insert_items(env.source(), range(1, 4))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    stop = threading.Event()
    worker = threading.Thread(target=lambda: app.run(env.config_path, echo=lambda _l: None,
                                                     stop=stop), daemon=True)
    worker.start()
    log = TxLog(load_config(env.config_path).config)
    try:
        wait_for(lambda: len(table_rows(sa.create_engine(pg_url))) == 3, timeout=60,
                 message="the first rows never arrived")
        proxy.stall()  # the target hangs: the connector waits inside its own timeouts
        insert_items(env.source(), [4])
        pending = wait_for(lambda: [t for t in log.select("pending")
                                    if t.error_class == "InFlight"], timeout=30,
                           message="the change inside the connector's retries is not listed")
        assert [json.loads(t.key or "{}").get("id") for t in pending] == [4]
        assert "connector is retrying" in (pending[0].error or "")
        shown = subprocess.run([sys.executable, "-m", "bus.cli", "tx", "list", "--status",
                                "pending", "--config", str(env.config_path)], cwd=ROOT,
                               capture_output=True, text=True, env={**os.environ,
                                                                    "COLUMNS": "250"})
        assert "1 pending transaction(s)" in shown.stdout, shown.stdout + shown.stderr
        stats = json.loads(subprocess.run(
            [sys.executable, "-m", "bus.cli", "tx", "stats", "--json", "--config",
             str(env.config_path)], cwd=ROOT, capture_output=True, text=True).stdout)
        assert stats["items"]["pending"] == 1
        proxy.cut()  # the hung calls fail now, the change waits in a retry queue
        proxy.restore()
        wait_for(lambda: not log.select("pending"), timeout=90,
                 message="the transaction never left Pending")
        (done,) = log.find(pending[0].id)
        assert done.status == "processed"
        assert [m["status"] for m in done.moves][0] == "pending"
    finally:
        stop.set()
        worker.join(60)
        proxy.close()
        log.close()


def test_two_configs_on_one_vhost_never_touch_each_others_transactions(tmp_path, amqp_url):
    envs = []
    for name in ("left", "right"):
        (tmp_path / name).mkdir()
        env = make_env(tmp_path / name, source_url=f"sqlite:///{tmp_path}/{name}/s.db",
                       target_url=f"sqlite:///{tmp_path}/{name}/t.db", amqp_url=amqp_url)
        raw = yaml.safe_load(env.config_path.read_text())
        raw["links"] = {name: raw["links"]["items"]}
        env.config_path.write_text(yaml.safe_dump(raw))
        _declare(load_config(env.config_path).config)
        envs.append(env)
    left_ids = _uuids(30, 2)
    right_ids = _uuids(20, 3)
    _fill(amqp_url, left_ids, "left")
    _fill(amqp_url, right_ids, "right")
    left, right = (TxLog(load_config(e.config_path).config) for e in envs)
    try:
        assert {t.id for t in left.select("error")} == set(left_ids)
        assert {t.id for t in right.select("error")} == set(right_ids)
        assert left.archive(TxFilter()).moved == 30
        assert left.purge_archived(0).moved == 30
        assert left.replay(TxFilter(ids={right_ids[1]})).unmatched == [right_ids[1]]
        assert left.stats() == {"left": {"pending": 0, "processed": 0, "error": 0,
                                         "archived": 0}}
        assert {t.id for t in right.select("error")} == set(right_ids)
        assert right.replay(TxFilter()).moved == 20
        assert _count(amqp_url, "syncbus.link.left.a2b") == 0
        assert sorted(_take_all(amqp_url, "syncbus.link.right.a2b")) == sorted(right_ids)
    finally:
        left.close()
        right.close()

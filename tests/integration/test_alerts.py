"""Alert rules and pause / resume: a paused link keeps its changes queued, loses nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pika
import pytest
import sqlalchemy as sa
import yaml

from bus.cli import app
from bus.config.load import load_config
from bus.ops.links import set_link_paused
from bus.ops.runs import history_records
from bus.ops.status import collect_status
from bus.ops.txlog import TxFilter, TxLog
from bus.state.store import StateStore
from bus.worker.worker import Worker
from tests.support import dead_letter_count, wait_for
from tests.syncenv import ROOT, insert_items, make_env, table_rows

pytestmark = pytest.mark.integration

NULLABLE = ("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, "
            "price NUMERIC, updated TIMESTAMP)")
WORK_QUEUE = "syncbus.link.items.a2b"


@contextmanager
def running(config_path, count: int = 1) -> Iterator[list[Worker]]:
    workers = [Worker(load_config(config_path).config) for _ in range(count)]
    stop = threading.Event()
    threads = []
    for worker in workers:
        worker.open()
        threads.append(threading.Thread(target=worker.run, args=(stop,), daemon=True))
        threads[-1].start()
    try:
        yield workers
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for worker in workers:
            worker.close()


def depth(amqp_url: str, queue: str) -> int:
    return queue_facts(amqp_url, queue)[0]


def queue_facts(amqp_url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``, as the broker counts them."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        method = conn.channel().queue_declare(queue, passive=True).method
        return method.message_count, method.consumer_count
    finally:
        conn.close()


def paused(config) -> bool:
    state = StateStore(config.state.url)
    try:
        return bool((state.link_rows().get("items") or {}).get("paused"))
    finally:
        state.close()


def link_cli(path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", "link", *args, "--config", str(path)],
                          cwd=ROOT, text=True, capture_output=True, timeout=60)


def test_an_alert_pauses_the_link_under_a_burst_of_failures_and_resume_drains_it(
        tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, source_ddl=NULLABLE,
                   link={"batch_size": 10, "alert": {"errors": 5, "minutes": 10}})
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 401))
    with src.begin() as conn:  # every fourth row is rejected by the target (NOT NULL)
        conn.execute(sa.text("UPDATE items SET name = NULL WHERE id % 4 = 0"))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    config = load_config(env.config_path).config

    with running(env.config_path) as (worker,):
        consumer = worker.consumers[0][0]
        wait_for(lambda: consumer.stats.paused, timeout=60, message="the alert never paused")
        assert paused(config)
        def counts() -> tuple[int, int, int]:
            return (dead_letter_count(amqp_url), len(table_rows(dst)),
                    depth(amqp_url, WORK_QUEUE))

        # The prefetched messages go back to the queue when the paused consumer's
        # channel closes: wait until every message is accounted for.
        wait_for(lambda: sum(counts()) == 400, timeout=30,
                 message="the prefetched messages never returned to the queue")
        dead, applied, ready = counts()
        assert 5 < dead < 100, "paused after the burst, not at its end"
        assert ready > 0 and dead + applied + ready == 400, (dead, applied, ready)

        report = collect_status(config)
        assert not report.healthy
        assert any("paused: alert: " in p for p in report.problems), report.problems
        assert report.links[0].error == dead

        with src.begin() as conn:  # the detector keeps publishing into the paused link
            conn.execute(sa.text("UPDATE items SET qty = 1000 WHERE id <= 20"))
        wait_for(lambda: depth(amqp_url, WORK_QUEUE) == ready + 20, timeout=30,
                 message="changes queued while paused")
        assert len(table_rows(dst)) == applied

        # Fix the cause, resume, and replay what failed: nothing was lost.
        with dst.begin() as conn:
            conn.execute(sa.text("ALTER TABLE items ALTER COLUMN name DROP NOT NULL"))
        assert set_link_paused(env.config_path, "items", False) == 0
        log = TxLog(config)
        try:
            assert log.replay(TxFilter(link="items")).moved == dead
        finally:
            log.close()
        wait_for(lambda: table_rows(dst) == table_rows(src), timeout=60,
                 message="target never matched the source after resume and replay")
        assert not consumer.stats.paused and not paused(config)
    assert collect_status(config).healthy
    assert not log.select("error")


def test_pause_and_resume_by_hand_are_obeyed_by_every_worker(tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db",
                   target_url=f"sqlite:///{tmp_path}/target.db", amqp_url=amqp_url,
                   link={"batch_size": 50})
    config = yaml.safe_load(env.config_path.read_text())
    config["state"]["url"] = pg_url  # shared by both workers
    env.config_path.write_text(yaml.safe_dump(config))
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 101))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    loaded = load_config(env.config_path).config

    with running(env.config_path, count=2) as workers:
        wait_for(lambda: len(table_rows(dst)) == 100, timeout=30, message="first sync")
        done = link_cli(env.config_path, "pause", "items", "--reason", "ERP maintenance")
        assert done.returncode == 0 and "paused" in done.stdout, done.stdout + done.stderr
        consumers = [w.consumers[0][0] for w in workers]
        wait_for(lambda: all(c.stats.paused for c in consumers), timeout=10,
                 message="not every worker paused")

        with src.begin() as conn:
            conn.execute(sa.text("UPDATE items SET qty = -3"))
        wait_for(lambda: depth(amqp_url, WORK_QUEUE) == 100, timeout=30,
                 message="the changes wait in the queue")
        # Nothing can apply them: no consumer is on the queue (a broker-side fact).
        assert queue_facts(amqp_url, WORK_QUEUE) == (100, 0)
        assert all(row[1] != -3 for row in table_rows(dst).values())
        report = collect_status(loaded)
        assert "paused: ERP maintenance" in " ".join(report.problems)
        assert report.links[0].paused_by and report.links[0].ready == 100

        again = link_cli(env.config_path, "pause", "items")
        assert again.returncode == 0 and "already paused" in again.stdout
        assert link_cli(env.config_path, "resume", "items").returncode == 0
        wait_for(lambda: table_rows(dst) == table_rows(src), timeout=30,
                 message="not drained after resume")
        wait_for(lambda: not any(c.stats.paused for c in consumers), timeout=10,
                 message="not every worker resumed")
    assert link_cli(env.config_path, "pause", "nope").returncode == 2


def test_run_until_idle_reports_a_paused_link_without_waiting_for_it(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url)
    insert_items(env.source(), range(1, 31))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    assert set_link_paused(env.config_path, "items", True, reason="cut-over") == 0

    lines: list[str] = []
    started = time.monotonic()
    code = app.run(env.config_path, until_idle=True, max_wait=120, echo=lines.append)
    assert code == app.EXIT_FAILED and time.monotonic() - started < 30
    assert any("link items is paused (cut-over); 30 change(s) wait" in line for line in lines), lines
    assert table_rows(env.target()) == {}
    config = load_config(env.config_path).config
    link = history_records(config, kinds=["link"])[0]
    assert (link["status"], link["upserts"]) == ("paused", 0)

    assert set_link_paused(env.config_path, "items", False) == 0
    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lines.append) == 0
    assert table_rows(env.target()) == table_rows(env.source())

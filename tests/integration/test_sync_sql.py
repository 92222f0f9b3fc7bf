"""The whole path between SQL databases: detect → publish → consume → upsert.

Real RabbitMQ (a vhost per test), real PostgreSQL (a database per test), SQLite files.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from pathlib import Path

import pika
import pytest
import sqlalchemy as sa
import yaml

from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import CHANGES_EXCHANGE, link_queues
from bus.cli import app
from bus.config.load import load_config
from bus.state.store import StateStore
from bus.worker.worker import Worker
from connectors.sql import SqlConnector
from schemas.event import ChangeEvent, dumps, new_event, routing_key
from tests.proxy import TcpProxy
from tests.support import dead_letters, wait_for
from tests.syncenv import insert_items, make_env, stop, syncbus, table_rows

pytestmark = pytest.mark.integration


def _sync(env, echo=None) -> int:
    lines: list[str] = []
    code = app.run(env.config_path, until_idle=True, max_wait=120, echo=(echo or lines.append))
    assert code == app.EXIT_OK, "\n".join(lines)
    return code


def _setup(env) -> None:
    lines: list[str] = []
    assert app.setup(env.config_path, echo=lines.append) == app.EXIT_OK, lines


def _mutate(engine: sa.Engine) -> None:
    """3,000 updates and 1,000 deletes, spread over the table."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET name = name || '-u', qty = qty + 1, "
                             "price = price + 1.5 WHERE id % 10 < 3"))
        conn.execute(sa.text("DELETE FROM items WHERE id % 10 = 9"))


@pytest.mark.parametrize("direction", ["sqlite_to_pg", "pg_to_sqlite"])
def test_inserts_updates_deletes_reach_the_target_exactly(direction, tmp_path, pg_url, amqp_url):
    sqlite = f"sqlite:///{tmp_path}/lite.db"
    source, target = (sqlite, pg_url) if direction == "sqlite_to_pg" else (pg_url, sqlite)
    env = make_env(tmp_path, source_url=source, target_url=target, amqp_url=amqp_url)
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 10_001))
    _setup(env)

    _sync(env)
    assert len(table_rows(dst)) == 10_000
    assert table_rows(dst) == table_rows(src)

    _mutate(src)
    _sync(env)
    expected = table_rows(src)
    assert len(expected) == 9_000
    assert sum(1 for v in expected.values() if v[0].endswith("-u")) == 3_000
    assert table_rows(dst) == expected


def test_rejected_row_goes_to_the_dead_letter_queue_and_its_batch_is_applied(
        tmp_path, pg_url, amqp_url):
    env = make_env(
        tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
        amqp_url=amqp_url,
        source_ddl="CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, "
                   "price NUMERIC, updated TIMESTAMP)",
    )
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 51))
    with src.begin() as conn:
        conn.execute(sa.text("UPDATE items SET name = NULL WHERE id = 17"))
    _setup(env)

    lines: list[str] = []
    code = app.run(env.config_path, until_idle=True, max_wait=60, echo=lines.append)

    assert code == app.EXIT_FAILED
    assert any("1 change(s) went to the dead-letter queue" in line for line in lines), lines
    rows = table_rows(dst)
    assert len(rows) == 49 and 17 not in rows
    dead = dead_letters(amqp_url)
    assert len(dead) == 1
    props, body = dead[0]
    event = json.loads(body)
    assert event["data"]["key"] == {"id": 17}
    assert "null value" in props.headers["x-syncbus-error"]  # PostgreSQL's own text
    assert props.headers["x-syncbus-link"] == "items"
    assert props.headers["x-syncbus-routing-key"] == "src.items.upsert"
    assert props.headers["x-syncbus-attempts"] == 1


def test_duplicate_and_out_of_order_events_leave_the_target_equal_to_the_source(
        tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url)
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 201))
    _setup(env)
    _sync(env)

    # Capture every intermediate version of rows edited three times, then deleted/re-inserted.
    connector = SqlConnector("src", env.source_url)
    state = StateStore(f"sqlite:///{tmp_path}/state.db")
    cursor = state.load_cursor("src.items")
    events = []
    for round_ in range(3):
        with src.begin() as conn:
            conn.execute(sa.text("UPDATE items SET qty = qty + 1000, name = :n WHERE id <= 100"),
                         {"n": f"round-{round_}"})
            if round_ == 1:
                conn.execute(sa.text("DELETE FROM items WHERE id > 180"))
        for page in connector.read_changes("items", cursor, 500):
            cursor = page.next_cursor
            for rec in page.records:
                events.append(new_event(connection="src", entity="items", op=rec.op.value,
                                        key=rec.key, version=rec.version, record=rec.values,
                                        modified_at=None, cursor=None))
    state.save_cursor("src.items", cursor)  # the detector will not publish these itself
    connector.close()
    assert len(events) == 320
    for event in events[:5]:
        ChangeEvent.model_validate(event)

    shuffled = events + random.Random(3).sample(events, 150)  # duplicates
    random.Random(4).shuffle(shuffled)
    publisher, signer = Publisher(amqp_url), env.signer()
    publisher.publish_batch([
        OutMessage(CHANGES_EXCHANGE, routing_key("src", "items", e["data"]["op"]), dumps(e),
                   signer.headers(dumps(e)), message_id=e["id"]) for e in shuffled
    ])
    publisher.close()

    _sync(env)
    assert table_rows(dst) == table_rows(src)
    assert all(v[0] == "round-2" for k, v in table_rows(dst).items() if k <= 100)


@pytest.mark.slow
def test_worker_killed_mid_sync_then_restarted_loses_nothing(tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, link={"page_size": 1000, "batch_size": 200})
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 50_001))
    _setup(env)

    proc = syncbus("run", "--config", str(env.config_path), "--log-level", "warning")
    count = lambda: len(table_rows(dst, columns=("id", "name")))  # noqa: E731
    try:
        wait_for(lambda: count() > 5_000, timeout=120, message="worker never applied 5,000 rows")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = count()
    assert partial < 50_000, "the kill came too late to prove anything"

    _sync(env)
    assert table_rows(dst) == table_rows(src)


@pytest.mark.slow
def test_broker_restart_mid_sync_publishers_and_consumers_reconnect(
        tmp_path, pg_url, rabbit_node):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=rabbit_node.url, link={"page_size": 500, "batch_size": 100})
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 20_001))
    _setup(env)

    proc = syncbus("run", "--config", str(env.config_path), "--log-level", "warning")
    try:
        count = lambda: len(table_rows(dst, columns=("id", "name")))  # noqa: E731
        wait_for(lambda: count() > 1_000, timeout=120, interval=0.1,
                 message="worker never started applying")
        rabbit_node.stop()
        at_stop = count()
        with src.begin() as conn:  # changes made while the broker is down
            conn.execute(sa.text("UPDATE items SET qty = -1 WHERE id % 7 = 0"))
        rabbit_node.start()
        wait_for(lambda: table_rows(dst) == table_rows(src), timeout=180, interval=2,
                 message="target never caught up with the source after the broker restart")
    finally:
        code, out = stop(proc)
    assert code == 0, out
    assert at_stop < 20_000, "the broker stopped too late to interrupt the initial sync"


def _drain(amqp_url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = conn.channel()
        out = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))
    finally:
        conn.close()


def test_config_errors_stop_run_with_exit_code_2(tmp_path, amqp_url):
    path = Path(tmp_path, "bad.yaml")
    path.write_text("connections:\n  a: {type: sql, url: 'sqlite:///x.db'}\nlinks:\n"
                    "  l:\n    source: {connection: a, entity: t}\n"
                    "    target: {connection: b, entity: t}\n")
    lines: list[str] = []
    assert app.run(path, until_idle=True, echo=lines.append) == app.EXIT_CONFIG
    text = "\n".join(lines)
    assert "bad.yaml:4" in text and "key" in text, text


def test_target_outage_is_retried_with_delay_and_delivered_once_it_is_back(
        tmp_path, pg_url, amqp_url):
    url = sa.make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=proxied,
                   amqp_url=amqp_url,
                   link={"retry": {"delays": [0.5, 1, 2], "max_attempts": 30}})
    src, dst = env.source(), sa.create_engine(pg_url)
    insert_items(src, range(1, 2_001))
    _setup(env)
    worker = Worker(load_config(env.config_path).config)
    worker.open()
    stop_event = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop_event,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(table_rows(dst)) == 2_000, timeout=60, message="initial sync")
        proxy.cut()
        with src.begin() as conn:
            conn.execute(sa.text("UPDATE items SET qty = -5 WHERE id <= 500"))
        consumer = worker.consumers[0][0]
        wait_for(lambda: consumer.stats.retried > 0, timeout=30,
                 message="the outage never caused a retry")
        first = consumer.stats.retried
        wait_for(lambda: consumer.stats.retried > first, timeout=30,  # still down: again
                 message="the retried changes never came back for another try")
        proxy.restore()
        wait_for(lambda: table_rows(dst) == table_rows(src), timeout=60,
                 message="target never caught up after the outage")
    finally:
        stop_event.set()
        thread.join(30)
        worker.close()
        proxy.close()
    assert consumer.stats.dead == 0
    assert not thread.is_alive()


@pytest.mark.slow
def test_two_workers_share_the_work_and_only_one_polls_each_source(tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, link={"batch_size": 100, "page_size": 500})
    config = yaml.safe_load(env.config_path.read_text())
    config["state"]["url"] = pg_url  # several workers share a PostgreSQL state store
    config["broker"]["prefetch"] = 200
    env.config_path.write_text(yaml.safe_dump(config))
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 20_001))
    _setup(env)

    workers = [Worker(load_config(env.config_path).config) for _ in range(2)]
    stop_event = threading.Event()
    threads = []
    for worker in workers:
        worker.open()
        threads.append(threading.Thread(target=worker.run, args=(stop_event,), daemon=True))
        threads[-1].start()
    try:
        owner = wait_for(lambda: workers[0].state.lease_owner("src.items"), timeout=30,
                         message="no worker took the detector lease")
        assert owner in {w.owner for w in workers}
        with src.begin() as conn:
            conn.execute(sa.text("UPDATE items SET qty = qty * 2 WHERE id % 3 = 0"))
        wait_for(lambda: table_rows(dst) == table_rows(src), timeout=120, interval=1,
                 message="target never matched the source")
    finally:
        stop_event.set()
        for thread in threads:
            thread.join(30)
        for worker in workers:
            worker.close()
    applied = [w.consumers[0][1].stats.upserted for w in workers]
    assert all(n > 0 for n in applied), f"one worker did all the work: {applied}"


@pytest.mark.slow
def test_sigterm_finishes_the_batches_in_flight_and_exits_cleanly(tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, link={"page_size": 1000, "batch_size": 200})
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 30_001))
    _setup(env)

    proc = syncbus("run", "--config", str(env.config_path))
    wait_for(lambda: len(table_rows(dst, columns=("id", "name"))) > 3_000, timeout=120,
             message="worker never applied 3,000 rows")
    code, out = stop(proc, timeout=60)

    assert code == 0, out
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events and len(events) == len(out.splitlines()), "logs are not JSON lines off a tty"
    names = [e["event"] for e in events]
    assert "shutdown_requested" in names and names[-1] == "worker_stopped"
    assert all("link" in e and "entity" in e for e in events if e["event"] == "batch_applied")
    _sync(env)
    assert table_rows(dst) == table_rows(src)


def test_a_worker_started_while_the_target_is_down_catches_up_when_it_is_back(
        tmp_path, pg_url, amqp_url):
    url = sa.make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=proxied,
                   amqp_url=amqp_url, link={"retry": {"delays": [0.5, 1], "max_attempts": 50}})
    src, dst = env.source(), sa.create_engine(pg_url)
    insert_items(src, range(1, 1_001))
    _setup(env)
    proxy.cut()

    lines: list[str] = []
    stop_event = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        app.run(env.config_path, echo=lines.append, stop=stop_event)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: any("'dst' is unreachable" in line for line in lines), timeout=30,
                 message=lambda: f"no unreachable warning: {lines}")
        # The changes pile up in the retry queues meanwhile (the broker's count).
        config = load_config(env.config_path).config
        retries = [q for _, q in link_queues("items", config.links["items"]).retries]
        wait_for(lambda: _ready(amqp_url, retries) > 0, timeout=60,
                 message="no change ever waited in a retry queue")
        assert table_rows(dst) == {}
        proxy.restore()
        wait_for(lambda: table_rows(dst) == table_rows(src), timeout=60,
                 message="target never caught up")
    finally:
        stop_event.set()
        thread.join(30)
        proxy.close()
    assert result == [app.EXIT_OK], lines


def _ready(amqp_url: str, queues: list[str]) -> int:
    """Messages ready in ``queues``, as the broker counts them (0 before they exist)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        total = 0
        for queue in queues:
            channel = conn.channel()
            try:
                total += channel.queue_declare(queue, passive=True).method.message_count
            except pika.exceptions.ChannelClosedByBroker:
                continue  # not declared yet (the worker declares at start)
        return total
    finally:
        conn.close()

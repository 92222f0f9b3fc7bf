"""Poison-proof: foreign and malformed messages are isolated with a reason, nothing valid lost.

Thousands of hostile messages (tests/fuzz_messages.py) are published straight into a
link's work queue and onto ``syncbus.changes`` while real source changes flow, and a
real ``syncbus run`` worker takes them all: it must stay up without reconnecting,
apply every valid change, and dead-letter every bad message itself, with a syncbus
reason (RabbitMQ's delivery limit never fires). The operator commands must then work
with those messages in the log.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from decimal import Decimal
from typing import Any

import pika
import pytest
import sqlalchemy as sa

from bus.amqp.consumer import headers as H
from bus.amqp.topology import CHANGES_EXCHANGE
from bus.cli import app
from tests.fuzz_messages import FUZZ_ID, Hostile, event_body, hostile_messages
from tests.support import dead_letter_count, dead_letters, wait_for
from tests.syncenv import ROOT, insert_items, make_env, table_rows

pytestmark = pytest.mark.integration

WORK_QUEUE = "syncbus.link.items.a2b"
BAD_COUNT = 2_800
VALID_SOURCE_CHANGES = 1_000


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300)


def _publish(amqp_url: str, messages: list[Hostile], rng: random.Random) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    channel.confirm_delivery()
    for msg in messages:
        props = pika.BasicProperties(
            delivery_mode=2, headers=msg.headers or None, message_id=msg.message_id,
            content_encoding=msg.content_encoding, content_type=msg.content_type)
        if rng.random() < 0.5:
            channel.basic_publish("", WORK_QUEUE, msg.body, props)
        else:
            op = rng.choice(["upsert", "delete"])
            channel.basic_publish(CHANGES_EXCHANGE, f"src.items.{op}", msg.body, props)
    conn.close()


def _drain_dead(amqp_url: str) -> list[tuple[dict[str, Any], bytes]]:
    """Every dead letter in the log, with its headers."""
    return [(dict(props.headers or {}), body)  # type: ignore[attr-defined]
            for props, body in dead_letters(amqp_url)]


def _queue_exists(amqp_url: str, name: str) -> bool:
    try:
        _queue_depths(amqp_url, [name])
    except pika.exceptions.ChannelClosedByBroker:
        return False
    return True


def _queue_depths(amqp_url: str, names: list[str]) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = conn.channel()
        return sum(channel.queue_declare(n, passive=True).method.message_count for n in names)
    finally:
        conn.close()


@pytest.mark.slow
def test_thousands_of_hostile_messages_never_stall_the_link_and_lose_nothing(
        tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, link={"batch_size": 200, "poll_interval": 0.3})
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 401))
    assert app.setup(env.config_path, echo=lambda _l: None) == app.EXIT_OK
    bad = list(hostile_messages(env.signer(), BAD_COUNT))
    dead_expected = [m for m in bad if m.dead is not None]
    applied_expected = {m.values[0]: m.values[1:] for m in bad if m.values is not None}
    assert len(dead_expected) >= 2_000
    assert len({m.category for m in bad}) >= 15

    # The worker logs a line per dead letter: into a file, not a pipe that could fill up.
    log_path = tmp_path / "worker.log"
    log_file = log_path.open("w")
    worker = subprocess.Popen([sys.executable, "-m", "bus.cli", "run", "--config",
                               str(env.config_path), "--log-level", "warning"], cwd=ROOT,
                              stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    rng = random.Random(7)
    try:
        wait_for(lambda: _queue_exists(amqp_url, WORK_QUEUE), timeout=60,
                 message="the worker never declared its queues")
        # 1,000 real source changes (inserts, then updates of them) while the bad
        # messages arrive, in chunks, on the work queue and on syncbus.changes.
        chunks = [bad[i::4] for i in range(4)]
        publisher = threading.Thread(target=lambda: [_publish(amqp_url, c, rng) for c in chunks])
        publisher.start()
        insert_items(src, range(401, 801), tag="late")
        with src.begin() as conn:
            conn.execute(sa.text("UPDATE items SET name = name || '-u', qty = qty + 1 "
                                 "WHERE id % 2 = 0"))
        publisher.join()

        expected = {**table_rows(src, columns=("id", "name", "qty")),
                    **{k: (name, Decimal(qty)) for k, (name, qty) in applied_expected.items()}}

        def settled() -> bool:
            return (worker.poll() is None
                    and table_rows(dst, columns=("id", "name", "qty")) == expected
                    and dead_letter_count(amqp_url) >= len(dead_expected))

        wait_for(settled, timeout=400, interval=1.0,
                 message="the target never held every valid change, or dead letters are missing")
        assert worker.poll() is None, "the worker died"
        wait_for(lambda: _queue_depths(amqp_url, [WORK_QUEUE]) == 0, timeout=60,
                 message="the work queue never emptied")
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
        log_file.close()
    err = log_path.read_text()
    assert code == 0, err[-3000:]
    assert "consumer_reconnecting" not in err, "a message crashed the consumer"

    # The operator tools work with all of it in the log.
    config = str(env.config_path)
    status = run_cli("status", "--config", config)
    assert status.returncode == 1, status.stderr[-2000:]  # 1: something needs attention
    if f"{len(dead_expected)} transaction(s) in error" not in status.stdout:
        listed = json.loads(run_cli("tx", "list", "--json", "--config", config).stdout or "[]")
        pytest.fail(f"{status.stdout}\nlisted by class: "
                    f"{Counter(t.get('error_class') for t in listed)}\nexpected by class: "
                    f"{Counter(m.dead for m in dead_expected)}\nids seen twice: "
                    f"{[i for i, n in Counter(t.get('id') for t in listed).items() if n > 1]}")
    for args in (["tx", "list"], ["tx", "list", "--json"], ["tx", "stats"]):
        result = run_cli(*args, "--config", config)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    # The history stream holds every hostile message published to syncbus.changes.
    tail = run_cli("tail", "#", "--from", "first", "--idle", "3", "--json", "--config", config)
    assert tail.returncode == 0, tail.stderr[-2000:]
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert sum(1 for line in lines if "unreadable" in line) >= 50
    assert sum(1 for line in lines if "unreadable" not in line) >= VALID_SOURCE_CHANGES
    listing = json.loads(run_cli("tx", "list", "--json", "--config", config).stdout)
    assert len(listing) >= len(dead_expected)
    shown = run_cli("tx", "show", str(listing[0].get("id") or ""), "--config", config)
    assert shown.returncode == 0, shown.stderr[-2000:]

    dead = _drain_dead(amqp_url)
    reasonless = [h for h, _ in dead if not h.get(H.ERROR_CLASS) or not h.get(H.ERROR)]
    assert reasonless == [], f"{len(reasonless)} dead letters without a syncbus reason"
    by_id = {h.get(FUZZ_ID): h for h, _ in dead if h.get(FUZZ_ID)}
    missing = [m.ident for m in dead_expected if m.category != "undecodable" and m.ident not in by_id]
    assert missing == [], f"{len(missing)} bad messages not in the dead-letter queue"
    wrong = Counter((m.category, m.dead, by_id[m.ident][H.ERROR_CLASS]) for m in dead_expected
                    if m.ident in by_id and by_id[m.ident][H.ERROR_CLASS] != m.dead)
    assert not wrong, f"dead-lettered for another reason than expected: {wrong}"
    undecodable = [m for m in dead_expected if m.category == "undecodable"]
    unreadable = [h for h, _ in dead if h.get(H.ERROR_CLASS) == "Unreadable" and FUZZ_ID not in h]
    assert len(unreadable) == len(undecodable)
    assert not {m.ident for m in bad if m.dead is None} & set(by_id), "a valid message died"


def test_a_forged_high_version_is_rejected_and_the_next_real_update_arrives(
        tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url)
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 6))
    assert app.setup(env.config_path, echo=lambda _l: None) == app.EXIT_OK
    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lambda _l: None) == 0

    # A foreign publisher's event for row 3 with the highest version there is, unsigned:
    # trusted, it would make the ordering guard skip every later change of row 3.
    forged = event_body(3, 2**63 - 1, record__name="forged", record__qty=0)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().basic_publish(CHANGES_EXCHANGE, "src.items.upsert", forged,
                                 pika.BasicProperties(delivery_mode=2, message_id="forged"))
    conn.close()
    with src.begin() as c:
        c.execute(sa.text("UPDATE items SET name = 'real update' WHERE id = 3"))

    lines: list[str] = []
    code = app.run(env.config_path, until_idle=True, max_wait=60, echo=lines.append)
    assert code == app.EXIT_FAILED, lines  # something was dead-lettered: the forgery
    assert table_rows(dst, columns=("id", "name"))[3] == ("real update",)
    dead = _drain_dead(amqp_url)
    assert [(h[H.ERROR_CLASS], h["x-syncbus-error"]) for h, _ in dead] == [
        ("Unverified", "unverified event: not signed by this bus (no x-syncbus-signature header)")]

    with src.begin() as c:  # and later changes still arrive
        c.execute(sa.text("UPDATE items SET name = 'later' WHERE id = 3"))
    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lambda _l: None) == 0
    assert table_rows(dst, columns=("id", "name"))[3] == ("later",)


def test_a_valid_event_sent_with_a_content_encoding_is_applied(tmp_path, pg_url, amqp_url):
    """py-amqp decodes such bodies to str; that crashed the consumer before."""
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url)
    assert app.setup(env.config_path, echo=lambda _l: None) == app.EXIT_OK
    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lambda _l: None) == 0
    signer = env.signer()
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = conn.channel()
    for key in range(1, 6):
        body = event_body(key, 1, record__name=f"e{key}", record__qty=key)
        channel.basic_publish(CHANGES_EXCHANGE, "src.items.upsert", body, pika.BasicProperties(
            delivery_mode=2, content_encoding="utf-8", headers=signer.headers(body)))
    channel.basic_publish(CHANGES_EXCHANGE, "src.items.upsert", b"", pika.BasicProperties(
        delivery_mode=2, message_id="empty"))
    conn.close()
    lines: list[str] = []
    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lines.append) == 1, lines
    assert table_rows(dst := env.target(), columns=("id", "name")) == {
        k: (f"e{k}",) for k in range(1, 6)}, dst
    [(hdrs, body)] = _drain_dead(amqp_url)
    assert (hdrs[H.ERROR_CLASS], body) == ("Unverified", b"")

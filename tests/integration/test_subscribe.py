"""The Python subscriber API against a real RabbitMQ: bindings, retries, dead letters."""

from __future__ import annotations

import threading

import pika
import pytest
import sqlalchemy as sa

from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.subscribe import PermanentError, Subscriber, TransientError, subscribe
from bus.amqp.topology import CHANGES_EXCHANGE
from bus.cli import app
from schemas.config import RetryPolicy
from schemas.event import ChangeEvent, dumps, new_event, routing_key
from tests.support import dead_letters, wait_for
from tests.syncenv import insert_items, make_env

pytestmark = pytest.mark.integration

FAST_RETRY = RetryPolicy(delays=[0.2, 0.4], max_attempts=3, offline_window=30)


def _event(connection: str, entity: str, op: str, n: int) -> OutMessage:
    version = n * 10 + (op == "delete")  # a delete is a newer version of the record
    event = new_event(connection=connection, entity=entity, op=op, key={"id": n}, version=version,
                      record=None if op == "delete" else {"id": n}, modified_at=None,
                      cursor=None)
    return OutMessage(CHANGES_EXCHANGE, routing_key(connection, entity, op), dumps(event),
                      message_id=event["id"])


def _publish(url: str, messages: list[OutMessage]) -> None:
    publisher = Publisher(url)
    try:
        publisher.publish_batch(messages)
    finally:
        publisher.close()


def _drain(url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        out = []
        while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
            out.append((got[1], got[2]))
        return out
    finally:
        conn.close()


def test_a_pattern_bound_subscriber_receives_exactly_the_matching_events(amqp_url):
    received: list[ChangeEvent] = []
    messages = [_event(c, e, op, n) for c in ("crm", "erp") for e in ("customers", "orders")
                for op in ("upsert", "delete") for n in (1, 2)]
    patterns = ["crm.customers.*", "*.*.delete"]
    with Subscriber(patterns, received.append, queue="test.matching", url=amqp_url) as sub:
        _publish(amqp_url, messages)  # confirmed: routed into the queue already
        expected = {str(m.message_id) for m in messages
                    if m.routing_key.startswith("crm.customers.") or m.routing_key.endswith(".delete")}
        wait_for(lambda: len(received) >= len(expected), timeout=30,
                 message=lambda: f"received {len(received)} of {len(expected)}")
        # Nothing else can come: the queue is empty and the subscriber has nothing in hand.
        wait_for(lambda: sub.idle and _ready(amqp_url, "test.matching") == 0, timeout=30,
                 message="the subscriber never went idle")
    assert len(expected) == 10
    assert sorted(e.id for e in received) == sorted(expected)
    keys = {(e.data.origin.connection, e.data.entity, e.data.op) for e in received}
    assert keys == {("crm", "customers", "upsert"), ("crm", "customers", "delete"),
                    ("crm", "orders", "delete"), ("erp", "customers", "delete"),
                    ("erp", "orders", "delete")}


def test_failures_are_retried_with_delay_or_dead_lettered_like_the_internal_consumers(amqp_url):
    calls: dict[int, int] = {}
    handled: list[int] = []

    def handler(event: ChangeEvent) -> None:
        n = int(event.data.key["id"])
        calls[n] = calls.get(n, 0) + 1
        if n == 1 and calls[n] < 3:
            raise RuntimeError("flaky handler")  # a bug or outage: retried with delay
        if n == 2:
            raise PermanentError("customer 2 is invalid")  # never retried
        if n == 3 and calls[n] == 1:
            raise TransientError("service busy", retry_after=0.3)
        if n == 4:
            raise KeyError("always broken")  # retried max_attempts times, then dead
        handled.append(n)

    subscriber = Subscriber("crm.customers.#", handler, queue="test.failures", url=amqp_url,
                            retry=FAST_RETRY, batch_size=10)
    with subscriber:
        _publish(amqp_url, [_event("crm", "customers", "upsert", n) for n in (1, 2, 3, 4, 5)]
                 + [OutMessage(CHANGES_EXCHANGE, "crm.customers.upsert", b"not json",
                               message_id="junk")])
        dead: list[tuple[pika.BasicProperties, bytes]] = []

        def three_dead() -> bool:
            dead[:] = dead_letters(amqp_url)
            return len(dead) >= 3

        wait_for(three_dead, timeout=30, message=lambda: f"dead letters: {len(dead)}")
        wait_for(lambda: sorted(handled) == [1, 3, 5], timeout=30,
                 message=lambda: f"handled {handled}")

    assert calls == {1: 3, 2: 1, 3: 2, 4: 3, 5: 1}
    by_id = {props.message_id: props.headers for props, _ in dead}
    assert set(by_id) == {_event("crm", "customers", "upsert", 2).message_id,
                          _event("crm", "customers", "upsert", 4).message_id, "junk"}
    permanent = by_id[_event("crm", "customers", "upsert", 2).message_id]
    assert permanent["x-syncbus-error-class"] == "PermanentError"
    assert "customer 2 is invalid" in permanent["x-syncbus-error"]
    assert permanent["x-syncbus-attempts"] == 1
    assert permanent["x-syncbus-link"] == "test.failures"
    assert permanent["x-syncbus-routing-key"] == "crm.customers.upsert"
    crashed = by_id[_event("crm", "customers", "upsert", 4).message_id]
    assert crashed["x-syncbus-error-class"] == "Crash.KeyError"
    assert crashed["x-syncbus-attempts"] == 3
    assert by_id["junk"]["x-syncbus-error-class"] == "SchemaError"
    assert subscriber.stats.invalid == 1 and subscriber.stats.handled == 3


def test_events_wait_in_the_durable_queue_while_the_subscriber_is_down(amqp_url):
    received: list[ChangeEvent] = []
    Subscriber("crm.#", received.append, queue="test.durable", url=amqp_url).declare()
    _publish(amqp_url, [_event("crm", "customers", "upsert", n) for n in range(5)])

    stop = threading.Event()
    thread = threading.Thread(target=subscribe, args=("crm.#", received.append),
                              kwargs={"queue": "test.durable", "url": amqp_url, "stop": stop})
    thread.start()
    try:
        wait_for(lambda: len(received) == 5, timeout=30, message="queued events not delivered")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert sorted(e.data.key["id"] for e in received) == [0, 1, 2, 3, 4]


def test_a_subscriber_sees_exactly_the_deletes_of_a_real_sync(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/src.db",
                   target_url=f"sqlite:///{tmp_path}/dst.db", amqp_url=amqp_url)
    src = env.source()
    insert_items(src, range(1, 21))
    lines: list[str] = []
    assert app.setup(env.config_path, echo=lines.append) == app.EXIT_OK, lines
    deleted: list[ChangeEvent] = []
    with Subscriber("src.items.delete", deleted.append, queue="test.deletes",
                    url=amqp_url) as sub:
        assert app.run(env.config_path, until_idle=True, max_wait=60,
                       echo=lines.append) == app.EXIT_OK, lines
        with src.begin() as conn:
            conn.execute(sa.text("DELETE FROM items WHERE id IN (3, 7, 11)"))
        assert app.run(env.config_path, until_idle=True, max_wait=60,
                       echo=lines.append) == app.EXIT_OK, lines
        wait_for(lambda: len(deleted) >= 3, timeout=30, message="deletes not delivered")
        wait_for(lambda: sub.idle and _ready(amqp_url, "test.deletes") == 0, timeout=30,
                 message="the subscriber never went idle")
    assert sorted(e.data.key["id"] for e in deleted) == [3, 7, 11]
    assert all(e.data.op == "delete" and e.data.record is None for e in deleted)


def test_a_queue_of_another_kind_is_a_clear_error(amqp_url):
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare("test.classic", durable=True)
    conn.close()
    from connectors.base import ConfigError

    with pytest.raises(ConfigError, match="test.classic"):
        Subscriber("#", print, queue="test.classic", url=amqp_url).declare()


def _ready(amqp_url: str, queue: str) -> int:
    """Messages ready in ``queue`` (the broker's count)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()

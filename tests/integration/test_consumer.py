"""The consumer runtime against a real RabbitMQ: batching, retry tiers, dead letters."""

from __future__ import annotations

import json
import threading

import pika
import pytest
from kombu import Connection

from bus.amqp.consumer import BatchConsumer, Decision, Verdict
from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import declare_topology, link_queues
from schemas.config import SyncConfig
from tests.support import dead_letters, wait_for

pytestmark = pytest.mark.integration


def _config(amqp_url: str) -> SyncConfig:
    return SyncConfig.model_validate({
        "broker": {"url": amqp_url},
        "connections": {"a": {"url": "sqlite://"}, "b": {"url": "sqlite://"}},
        "links": {"l": {"source": {"connection": "a", "entity": "t"},
                        "target": {"connection": "b", "entity": "t"}, "key": ["id"],
                        "retry": {"delays": [0.2, 0.4], "max_attempts": 3}}},
    })


def _dead(amqp_url: str) -> list[tuple[pika.BasicProperties, bytes]]:
    return dead_letters(amqp_url)  # type: ignore[return-value]


def test_a_poison_message_is_retried_with_delay_then_dead_lettered_with_its_error(amqp_url):
    config = _config(amqp_url)
    with Connection(amqp_url) as conn:
        declare_topology(conn, config)
    queues = link_queues("l", config.links["l"])
    seen: dict[int, int] = {}

    def handler(batch):
        numbers = [json.loads(delivery.body)["n"] for delivery in batch]
        if 3 in numbers:  # fails before any side effect, like a mapping bug would
            raise RuntimeError("poison pill")
        for n in numbers:
            seen[n] = seen.get(n, 0) + 1
        return [Decision.ack() for _ in batch]

    publisher = Publisher(amqp_url)
    publisher.publish_batch([
        OutMessage("syncbus.changes", "a.t.upsert", json.dumps({"n": n}).encode(),
                   message_id=f"m{n}") for n in range(10)
    ])
    consumer = BatchConsumer(url=amqp_url, queues=queues, handler=handler, publisher=publisher,
                             retry=config.links["l"].retry, prefetch=50, batch_size=10)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        dead = wait_for(lambda: _dead(amqp_url), timeout=30, message="nothing dead-lettered")
    finally:
        stop.set()
        thread.join(10)
        publisher.close()

    assert seen == {n: 1 for n in range(10) if n != 3}  # the batch was applied once, poison aside
    assert len(dead) == 1
    props, body = dead[0]
    assert json.loads(body) == {"n": 3}  # the original bytes
    assert props.message_id == "m3"
    assert props.headers["x-syncbus-attempts"] == 3
    assert "RuntimeError: poison pill" in props.headers["x-syncbus-error"]
    assert props.headers["x-syncbus-error-class"] == "Crash.RuntimeError"
    assert props.headers["x-syncbus-routing-key"] == "a.t.upsert"
    assert props.headers["x-syncbus-first-failure"] <= props.headers["x-syncbus-last-failure"]
    assert consumer.stats.retried == 2 and consumer.stats.dead == 1


def test_retry_after_picks_a_tier_at_least_that_long(amqp_url):
    config = _config(amqp_url)
    queues = link_queues("l", config.links["l"])
    consumer = BatchConsumer(url=amqp_url, queues=queues, handler=lambda b: [],
                             publisher=None, retry=config.links["l"].retry,  # type: ignore[arg-type]
                             prefetch=1, batch_size=1)
    assert consumer._tier(1, None)[0] == 0.2
    assert consumer._tier(1, 0.3)[0] == 0.4
    assert consumer._tier(5, None)[0] == 0.4  # the last tier repeats
    assert Verdict.RETRY.value == "retry"

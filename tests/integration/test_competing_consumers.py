"""Four worker processes compete on a two-way link's queues; deliveries are shuffled
and duplicated. The ordering guard (versions in the shared PostgreSQL state store)
keeps every record from regressing: the target ends equal to the source.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from kombu import Connection

from bus.amqp.topology import link_queues
from bus.config.load import load_config
from bus.state.rows import aware
from bus.state.store import StateStore
from bus.worker.worker import Worker
from tests.support import wait_for
from tests.syncenv import stop, syncbus

pytestmark = pytest.mark.integration

ROWS = 400


@pytest.fixture
def env(tmp_path: Path, pg_url: str, amqp_url: str):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        for schema in ("side_a", "side_b"):
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
            conn.exec_driver_sql(f"CREATE TABLE {schema}.items (id INTEGER PRIMARY KEY, "
                                 "name TEXT, qty INTEGER)")
        conn.execute(sa.text("INSERT INTO side_a.items VALUES (:i, :n, 0)"),
                     [{"i": i, "n": f"item {i}"} for i in range(ROWS)])
    config = {
        "broker": {"url": amqp_url, "prefetch": 50},
        "state": {"url": pg_url},
        "connections": {"a": {"url": pg_url, "schema": "side_a"},
                        "b": {"url": pg_url, "schema": "side_b"}},
        "links": {"items": {
            "source": {"connection": "a", "entity": "items"},
            "target": {"connection": "b", "entity": "items"},
            "direction": "both", "key": "id", "batch_size": 25, "poll_interval": 0.5,
        }},
    }
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(config))
    yield path, engine, amqp_url
    engine.dispose()


def _table(engine: sa.Engine, schema: str) -> dict[int, tuple[str, int]]:
    with engine.connect() as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute(sa.text(f"SELECT id, name, qty FROM {schema}.items"))}


def _shuffle_queue(amqp_url: str, queue: str, rng: random.Random) -> int:
    """Take every message off ``queue``, then put them back shuffled, some twice."""
    with Connection(amqp_url) as conn:
        channel = conn.channel()
        taken = []
        while (message := channel.basic_get(queue)) is not None:
            taken.append(message)
        bodies = [(m.body, m.properties) for m in taken]
        bodies += rng.sample(bodies, len(bodies) // 3)  # duplicates
        rng.shuffle(bodies)
        producer = conn.Producer(channel)
        for body, props in bodies:
            producer.publish(body, routing_key=queue, exchange="", serializer=None,
                             content_type=props.get("content_type"),
                             content_encoding=props.get("content_encoding"),
                             headers=props.get("application_headers") or {},
                             message_id=props.get("message_id"), delivery_mode=2)
        for message in taken:
            channel.basic_ack(message.delivery_info["delivery_tag"])
        return len(bodies)


def test_four_processes_with_shuffled_duplicates_end_equal(env):
    path, engine, amqp_url = env
    config = load_config(path).config
    worker = Worker(config)
    worker.prepare_sources()
    worker.open()
    rng = random.Random(4)
    try:
        detector = next(d for d, _ in worker.detectors if d.name == "a.items")
        detector.poll()
        for version in range(1, 6):  # several versions of each record wait in the queue
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE side_a.items SET qty = :v, name = :n WHERE id = :i"),
                             [{"v": version, "n": f"v{version} {i}", "i": i}
                              for i in rng.sample(range(ROWS), ROWS // 2)])
            detector.poll()
        worker.state.clear_cursor(detector.name)  # and every current version once more
        detector.poll()
    finally:
        worker.close()
    queue = link_queues("items", config.links["items"], "a2b").work
    queued = _shuffle_queue(amqp_url, queue, rng)
    assert queued > ROWS * 3

    procs = [syncbus("run", "-c", str(path), "--log-format", "json", "--log-level", "warning")
             for _ in range(4)]
    try:
        expected = _table(engine, "side_a")
        wait_for(lambda: _table(engine, "side_b") == expected, timeout=120, interval=0.5,
                 message=lambda: f"side b differs in {sum(1 for k, v in expected.items() if _table(engine, 'side_b').get(k) != v)} rows")
        # Side b is polled again after convergence and publishes nothing (echoes only):
        # a state-store fact, so nothing can come back and regress side a.
        converged = datetime.now(UTC)
        wait_for(lambda: _polled_quietly_since(config.state.url, "b.items", converged),
                 timeout=60, message="side b was never polled quietly after convergence")
        assert _table(engine, "side_a") == expected
    finally:
        outputs = [stop(p) for p in procs]
    for code, out in outputs:
        assert code == 0, out
        assert "dead_lettered" not in out, out


def _polled_quietly_since(state_url: str, detector: str, since: datetime) -> bool:
    """True when ``detector`` finished a poll that started after ``since`` and found
    nothing to publish."""
    state = StateStore(state_url)
    try:
        row = state.detector_rows().get(detector) or {}
    finally:
        state.close()
    started = aware(row.get("last_ok_at"))
    return started is not None and started > since and row.get("last_changes") == 0

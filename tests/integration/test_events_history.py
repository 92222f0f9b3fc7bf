"""The history stream: every event of a real sync is kept; late readers replay it."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pika
import pytest
import sqlalchemy as sa
from kombu import Connection

from bus.amqp.history import HistoryUnavailable, read_history
from bus.amqp.topology import HISTORY_STREAM, declare_history_stream
from bus.cli import app
from schemas.config import BrokerConfig
from tests.support import wait_for
from tests.syncenv import insert_items, make_env

pytestmark = pytest.mark.integration


def _sync(env) -> None:
    lines: list[str] = []
    assert app.run(env.config_path, until_idle=True, max_wait=60,
                   echo=lines.append) == app.EXIT_OK, lines


def _replay(url: str, **kw) -> list:
    return list(read_history(url=url, idle_timeout=1.5, **kw))


@pytest.fixture
def synced_twice(tmp_path, amqp_url):
    """20 inserts synced; then, after a pause, 5 updates and 2 deletes synced.

    Returns ``(amqp_url, between)``: ``between`` is a time after the first sync was
    stored and before the second began.
    """
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/src.db",
                   target_url=f"sqlite:///{tmp_path}/dst.db", amqp_url=amqp_url)
    src = env.source()
    insert_items(src, range(1, 21))
    lines: list[str] = []
    assert app.setup(env.config_path, echo=lines.append) == app.EXIT_OK, lines
    _sync(env)
    stored = time.time()  # the broker stamped the first sync's events at or before this
    # A reader starts at whole seconds: begin the second sync in a later second than the
    # first one's events (the stream's timestamps are the behaviour under test).
    wait_for(lambda: int(time.time()) > int(stored), timeout=5, interval=0.01,
             message="the clock to reach the next whole second")
    between = datetime.now(UTC)
    with src.begin() as conn:
        conn.execute(sa.text("UPDATE items SET qty = -1 WHERE id <= 5"))
        conn.execute(sa.text("DELETE FROM items WHERE id IN (19, 20)"))
    _sync(env)
    return amqp_url, between


def test_every_event_of_the_sync_is_in_the_stream_in_order(synced_twice):
    url, _ = synced_twice
    events = _replay(url, start="first")
    assert [m.offset for m in events] == list(range(27))
    assert [m.routing_key for m in events] == (
        ["src.items.upsert"] * 25 + ["src.items.delete"] * 2)
    assert sorted(m.event.data.key["id"] for m in events[:20]) == list(range(1, 21))
    assert len({m.event.id for m in events}) == 27  # a new version is a new event


def test_a_late_subscriber_replays_the_history_from_a_timestamp(synced_twice):
    url, between = synced_twice
    events = _replay(url, start=between)
    assert sorted(m.event.data.key["id"] for m in events) == [1, 2, 3, 4, 5, 19, 20]
    assert {m.event.data.op for m in events} == {"upsert", "delete"}
    assert all(m.event.data.record["qty"] == -1 for m in events if m.event.data.op == "upsert")


def test_replay_from_an_offset_from_last_and_with_a_pattern(synced_twice):
    url, _ = synced_twice
    assert [m.offset for m in _replay(url, start=24)] == [24, 25, 26]
    last = _replay(url, start="last")
    assert last and last[-1].offset == 26
    deletes = _replay(url, start="first", pattern="*.*.delete")
    assert [(m.offset, m.event.data.key) for m in deletes] == [(25, {"id": 19}), (26, {"id": 20})]
    assert _replay(url, start="next") == []


def test_the_stream_is_declared_with_retention_and_kept_when_its_settings_change(amqp_url):
    with Connection(amqp_url) as conn:
        assert declare_history_stream(conn, BrokerConfig(history_max_age=2 * 86400)) is True
        assert declare_history_stream(conn, BrokerConfig(history_max_age=2 * 86400)) is True
        # Queue arguments cannot change: the existing stream is kept, with a warning.
        assert declare_history_stream(conn, BrokerConfig(history_max_age=3 * 86400)) is False
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker,
                           match="x-max-age.*received '1s' but current is '172800s'"):
            connection.channel().queue_declare(HISTORY_STREAM, durable=True, arguments={
                "x-queue-type": "stream", "x-max-age": "1s",
                "x-max-length-bytes": 10_000_000_000,
                "x-stream-max-segment-size-bytes": 100_000_000})
    finally:
        connection.close()


def test_reading_a_broker_without_history_says_how_it_comes_to_be(amqp_url):
    with pytest.raises(HistoryUnavailable, match="syncbus run"):
        _replay(amqp_url, start="first")

"""Proof that the shared test fixtures (tests/conftest.py) do what they promise."""

from __future__ import annotations

import secrets
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.rabbit_node import RabbitNode
from tests.support import port_is_open, wait_for

pytestmark = pytest.mark.integration

#: What the parametrised "first"/"second" tests below hand over to each other.
_seen: dict[str, dict[str, str]] = {"vhost": {}, "database": {}}


@contextmanager
def amqp_channel(url: str) -> Iterator[BlockingChannel]:
    """A pika channel on ``url``; the connection is always closed afterwards."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def queue_exists(url: str, queue: str) -> bool:
    """Passive declare on a throw-away connection (a 404 closes the channel)."""
    with amqp_channel(url) as channel:
        try:
            channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
    return True


def vhost_of(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:])


# --------------------------------------------------------------------------- vhosts


@pytest.mark.parametrize("step", ["first", "second"])
def test_each_test_gets_its_own_vhost(step: str, amqp_url: str, amqp_base_url: str) -> None:
    vhost = vhost_of(amqp_url)
    assert vhost.startswith("sbtest-"), f"no per-test vhost: {amqp_url}"
    assert pika.URLParameters(amqp_url).virtual_host == vhost
    assert amqp_url != amqp_base_url

    # Same queue name in both steps: it must not be there yet in this test's vhost.
    probe = "sbtest.infra.isolation-probe"
    assert not queue_exists(amqp_url, probe)
    with amqp_channel(amqp_url) as channel:
        channel.queue_declare(probe, durable=True)
    assert queue_exists(amqp_url, probe)

    _seen["vhost"][step] = amqp_url
    if step == "second" and "first" in _seen["vhost"]:
        first_url = _seen["vhost"]["first"]
        assert vhost_of(first_url) != vhost
        # The first test's vhost was deleted by the fixture's teardown.
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(pika.URLParameters(first_url)).close()


def test_queue_in_one_vhost_is_invisible_in_another(amqp_url: str, amqp_session_url: str) -> None:
    assert vhost_of(amqp_url) != vhost_of(amqp_session_url)
    queue = f"sbtest.infra.{secrets.token_hex(4)}"
    with amqp_channel(amqp_url) as channel:
        channel.queue_declare(queue, durable=True)
        channel.basic_publish("", queue, b"only here")
    assert queue_exists(amqp_url, queue)
    assert not queue_exists(amqp_session_url, queue)


def test_session_vhost_is_shared(amqp_session_url: str, request: pytest.FixtureRequest) -> None:
    assert vhost_of(amqp_session_url).startswith("sbtest-")
    assert request.getfixturevalue("amqp_session_url") == amqp_session_url


# --------------------------------------------------------------------------- PostgreSQL


@pytest.mark.parametrize("step", ["first", "second"])
def test_each_test_gets_its_own_database(step: str, pg_url: str, pg_base_url: str) -> None:
    url = make_url(pg_url)
    assert url.drivername == "postgresql+psycopg"
    assert url.database is not None and url.database.startswith("sbtest_")
    engine = sa.create_engine(pg_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == url.database
            # Would fail in "second" if the database were shared.
            conn.execute(sa.text("CREATE TABLE probe (id int PRIMARY KEY, note text)"))
            conn.execute(sa.text("INSERT INTO probe VALUES (1, :note)"), {"note": step})
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT note FROM probe")).scalar_one() == step
    finally:
        engine.dispose()

    _seen["database"][step] = url.database
    if step == "second" and "first" in _seen["database"]:
        first = _seen["database"]["first"]
        assert first != url.database
        admin = sa.create_engine(pg_base_url, poolclass=NullPool)
        try:
            with admin.connect() as conn:
                gone = conn.execute(
                    sa.text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": first}
                ).scalar_one()
        finally:
            admin.dispose()
        assert gone == 0, f"database {first} was not dropped"


@pytest.fixture(scope="module")
def leaked_connections() -> Iterator[list[tuple[sa.Engine, sa.Connection]]]:
    """Connections a test leaves open on purpose; closed only when the module ends,
    i.e. after the function-scoped ``pg_url`` teardown has run."""
    leaks: list[tuple[sa.Engine, sa.Connection]] = []
    yield leaks
    for engine, conn in leaks:
        with suppress(Exception):
            conn.close()
        engine.dispose()


def test_database_drop_survives_open_connections(
    pg_url: str, leaked_connections: list[tuple[sa.Engine, sa.Connection]]
) -> None:
    """Teardown uses WITH (FORCE): a connection left open must not break it."""
    engine = sa.create_engine(pg_url, poolclass=NullPool)
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))
    leaked_connections.append((engine, conn))


def test_sqlite_url_factory(sqlite_url: Callable[[str], str], tmp_path: Path) -> None:
    url = sqlite_url("events")
    assert url == f"sqlite:///{tmp_path}/events.db"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x int)"))
            conn.execute(sa.text("INSERT INTO t VALUES (42)"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT x FROM t")).scalar_one() == 42
    finally:
        engine.dispose()
    assert (tmp_path / "events.db").is_file()


# --------------------------------------------------------------------------- private node


def _publish_persistent(url: str, queue: str, body: bytes) -> None:
    with amqp_channel(url) as channel:
        channel.confirm_delivery()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        # With confirms on, pika raises if the broker nacks or cannot route it.
        channel.basic_publish(
            "", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True
        )


def _get_one(url: str, queue: str) -> bytes | None:
    """basic_get + ack one message; ``None`` if the queue is empty."""
    with amqp_channel(url) as channel:
        method, _props, body = channel.basic_get(queue)
        if method is None:
            return None
        channel.basic_ack(method.delivery_tag)
        return body


def _wait_for_message(node: RabbitNode, queue: str) -> bytes:
    # Right after boot the quorum queue may still be electing its leader.
    return wait_for(
        lambda: _get_one(node.url, queue),
        timeout=30,
        interval=0.2,
        message=f"a message on {queue} after restarting {node.nodename}",
        ignore=(pika.exceptions.AMQPError,),
    )


def test_private_node_keeps_messages_across_graceful_restart(rabbit_node: RabbitNode) -> None:
    assert rabbit_node.is_running
    assert rabbit_node.nodename.startswith("sbtest")
    assert rabbit_node.amqp_port != 5672
    url_before = rabbit_node.url
    _publish_persistent(rabbit_node.url, "sbtest.durable", b"survives stop")

    rabbit_node.stop()
    assert not rabbit_node.is_running
    assert not port_is_open("127.0.0.1", rabbit_node.amqp_port)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(rabbit_node.url)).close()

    rabbit_node.start()
    assert rabbit_node.url == url_before
    assert _wait_for_message(rabbit_node, "sbtest.durable") == b"survives stop"
    assert _get_one(rabbit_node.url, "sbtest.durable") is None


def test_private_node_keeps_messages_across_kill(rabbit_node: RabbitNode) -> None:
    _publish_persistent(rabbit_node.url, "sbtest.crash", b"survives kill -9")
    # RabbitMQ 3.10 quirk: a new quorum queue's Ra member is registered in a DETS
    # table that is written to disk only after 500 ms without writes. A crash inside
    # that window makes the node come back with a *new, empty, leaderless* member for
    # the queue (every operation times out after 60 s, the message is gone). A real
    # broker has written its queues long before it crashes: have this one write them now.
    rabbit_node.sync_registries()
    beam_pid = rabbit_node.beam_pid
    assert beam_pid is not None

    rabbit_node.kill()
    assert not rabbit_node.is_running
    assert not port_is_open("127.0.0.1", rabbit_node.amqp_port)

    rabbit_node.start()
    assert rabbit_node.beam_pid not in (None, beam_pid)
    assert _wait_for_message(rabbit_node, "sbtest.crash") == b"survives kill -9"
    listed = rabbit_node.ctl("list_queues", "-q", "name", "type").stdout
    assert "sbtest.crash" in listed and "quorum" in listed

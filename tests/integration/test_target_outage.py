"""A target that goes down: its connector retries briefly, the retry queues do the waiting.

With Dataverse unreachable, a connector call gives up within ``MAX_RETRY_SECONDS`` and
the consumer moves the batch to the link's retry queues; no batch holds its messages
unacked for minutes, so RabbitMQ never drops the consumer (no missed heartbeats), and
every change is delivered once the target is back.
"""

from __future__ import annotations

import threading
import time
import urllib.parse

import pytest
import sqlalchemy as sa
import structlog
import yaml
from amqp.exceptions import NotFound
from kombu import Connection

from bus.amqp.topology import link_queues
from bus.cli import app
from bus.config.load import load_config
from bus.worker.worker import Worker
from connectors.base import MAX_RETRY_SECONDS
from connectors.dataverse.emulator import DataverseEmulator, Limits
from tests.proxy import TcpProxy
from tests.support import dead_letter_count, wait_for

pytestmark = pytest.mark.integration

#: How long the target stays down: longer than RabbitMQ tolerates a silent consumer
#: (two missed 30 s heartbeats), so a consumer stuck in in-process retries would be reset.
OUTAGE = 80.0


@pytest.fixture
def emu(tmp_path):
    limits = Limits(requests=None, concurrent=None, execution=None)
    with DataverseEmulator(cert_dir=tmp_path / "certs", limits=limits) as emulator:
        yield emulator


def _depth(amqp_url: str, queues: list[str]) -> int:
    total = 0
    with Connection(amqp_url) as conn:
        channel = conn.channel()
        for queue in queues:
            try:
                total += int(channel.queue_declare(queue=queue, passive=True)[1])
            except NotFound:
                channel = conn.channel()
    return total


@pytest.mark.slow  # the outage itself lasts OUTAGE seconds: heartbeats need real time
def test_a_target_down_for_minutes_waits_in_the_retry_queues_not_in_the_consumer(
        tmp_path, amqp_url, emu, monkeypatch):
    monkeypatch.setenv("DV_SECRET", emu.connection()["client_secret"])
    parts = urllib.parse.urlsplit(emu.url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 443)
    proxied = f"https://127.0.0.1:{proxy.port}"
    source = sa.create_engine(f"sqlite:///{tmp_path}/crm.db")
    with source.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute(sa.text("INSERT INTO customers (id, name) VALUES (:id, :name)"),
                     [{"id": i, "name": f"c{i}"} for i in range(1, 21)])
    crm = emu.connection(client_secret="${DV_SECRET}", url=proxied, authority_host=proxied,
                         state_dir=str(tmp_path / "dataverse"))
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "connections": {"src": {"type": "sql", "url": f"sqlite:///{tmp_path}/crm.db"},
                        "crm": crm},
        "links": {"customers": {
            "source": {"connection": "src", "entity": "customers"},
            "target": {"connection": "crm", "entity": "account"},
            "key": ["id"], "fields": {"accountnumber": "id", "name": "name"},
            "poll_interval": 0.5, "batch_size": 10,  # a full buffer waits for the batch
            "retry": {"delays": [1, 2], "max_attempts": 50},
        }},
    }, sort_keys=False))
    assert app.setup(path, echo=lambda _line: None) == app.EXIT_OK
    config = load_config(path).config
    retry_queues = [q for _, q in link_queues("customers", config.links["customers"]).retries]

    def accounts() -> int:
        return len(emu.store.tables["account"].rows)

    worker = Worker(config)
    worker.open()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    with structlog.testing.capture_logs() as logs:
        thread.start()
        try:
            wait_for(lambda: accounts() == 20, timeout=60, message="initial sync")

            proxy.cut()
            started = time.monotonic()
            with source.begin() as conn:
                conn.execute(sa.text("INSERT INTO customers (id, name) VALUES (:id, :name)"),
                             [{"id": i, "name": f"c{i}"} for i in range(21, 81)])
            wait_for(lambda: _depth(amqp_url, retry_queues) > 0,
                     timeout=MAX_RETRY_SECONDS + 15,
                     message="no change reached the retry queues within the retry bound")
            first_retry = time.monotonic() - started
            # While the target stays down, the changes wait in the retry queues; all of
            # them, not a batch held by the consumer.
            deepest = 0
            while time.monotonic() - started < OUTAGE:
                deepest = max(deepest, _depth(amqp_url, retry_queues))
                assert not [e for e in logs if e["event"] == "consumer_reconnecting"], \
                    "the consumer lost its RabbitMQ connection while the target was down"
                stop.wait(0.5)
            assert deepest == 60, deepest

            proxy.restore()
            wait_for(lambda: accounts() == 80, timeout=120, interval=1,
                     message="the changes were not delivered once the target was back")
        finally:
            stop.set()
            thread.join(30)
            worker.close()
            proxy.close()
    assert first_retry <= MAX_RETRY_SECONDS + 10, first_retry
    reconnects = [e for e in logs if e["event"] == "consumer_reconnecting"]
    assert reconnects == [], reconnects
    assert dead_letter_count(amqp_url) == 0  # nothing dead-lettered
    retried = [e for e in logs if e["event"] == "message_retry"]
    assert all(e["error"] for e in retried)  # the queue depths above prove the retries

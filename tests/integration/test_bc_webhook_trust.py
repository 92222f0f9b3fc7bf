"""Business Central webhooks are an accelerator, never the truth: through the real bus
(the emulator over HTTPS, RabbitMQ, a PostgreSQL target, the worker's own receiver and
metrics port, all over real HTTP).

- A notification without the subscription's ``clientState``, or with a wrong one, is
  refused with 401, counted, and deletes nothing.
- A genuine ``deleted`` notification for a record that still exists in Business Central
  deletes nothing: the detector asks Business Central first.
- A real deletion, notified, deletes the record in the target.
- The receiver and the metrics port bind 127.0.0.1 when no host is configured.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bus.state.store import StateStore
from bus.worker.worker import Worker
from connectors.business_central import BusinessCentralConnector
from connectors.business_central.emulator import BusinessCentralEmulator
from connectors.business_central.index import KeyIndex
from connectors.business_central.webhooks import SECRET_SCOPE
from tests.support import pick_free_port, wait_for
from tests.syncenv import running

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, amqp_url: str, pg_url: str, emu: BusinessCentralEmulator,
            port: int) -> Path:
    erp = {"type": "business_central",
           **emu.connection(client_secret="${BC_SECRET}", index_url=f"sqlite:///{tmp_path}/bc.db",
                            backoff=0.05, entities={"customers": {"webhook": True}},
                            webhooks={"notification_url": f"http://127.0.0.1:{port}/bc",
                                      "listen": f":{port}"})}  # no host: 127.0.0.1
    config = {
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "metrics": {"port": 0},  # no host: 127.0.0.1
        "connections": {"pg": {"type": "sql", "url": pg_url}, "erp": erp},
        "links": {"customers": {
            "source": {"connection": "erp", "entity": "customers"},
            "target": {"connection": "pg", "entity": "customers"},
            "key": ["number"], "fields": {"number": "number", "city": "city"},
            "poll_interval": "10m",  # only the first poll and notifications
        }},
    }
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path




def _rejected(worker: Worker) -> dict[str, float]:
    assert worker.health is not None
    text = httpx.get(f"http://127.0.0.1:{worker.health.port}/metrics", timeout=5).text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "syncbus_webhook_rejected_total"
            and s.labels.get("connection") == "erp"}


def _deleted(emu: BusinessCentralEmulator, row: dict, state: str | None) -> dict:
    item = {"subscriptionId": "0" * 32, "changeType": "deleted",
            "resource": f"api/v2.0/companies({emu.company.id})/customers({row['id']})",
            "expirationDateTime": "2099-01-01T00:00:00Z",
            "lastModifiedDateTime": "2024-01-01T00:00:00Z"}
    if state is not None:
        item["clientState"] = state
    return {"value": [item]}


def test_forged_and_unconfirmed_deletions_delete_nothing_real_ones_do(
        tmp_path, pg_url, amqp_url, monkeypatch):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (number TEXT PRIMARY KEY, city TEXT)")
    port = pick_free_port()

    def numbers() -> set[str]:
        with engine.connect() as conn:
            return set(conn.execute(sa.text("SELECT number FROM customers")).scalars())

    with BusinessCentralEmulator(cert_dir=tmp_path / "certs", seed=20) as emu:
        monkeypatch.setenv("BC_SECRET", emu.client_secret)
        path = _config(tmp_path, amqp_url, pg_url, emu, port)
        forged, kept, gone = emu.rows("customers")[:3]
        index = KeyIndex("erp", f"sqlite:///{tmp_path}/bc.db")
        with running(path) as worker:
            # Given: the first poll copied everything and the subscription was made
            wait_for(lambda: len(numbers()) == 20, timeout=60, message="no initial load")
            (sub,) = wait_for(emu.webhooks.all, timeout=30, message="no subscription")
            assert worker.health is not None and worker.health.host == "127.0.0.1"
            connector = worker.connectors["erp"]
            assert isinstance(connector, BusinessCentralConnector)
            assert connector.webhook_address == ("127.0.0.1", port)

            # The clientState was generated for the subscription and kept in the state store
            store = StateStore(f"sqlite:///{tmp_path}/state.db")
            assert store.get_secret(SECRET_SCOPE, "erp/v2.0/customers") == sub.client_state
            assert len(sub.client_state) >= 32
            store.close()

            # When: forged deletions arrive, without a clientState and with a wrong one
            url = f"http://127.0.0.1:{port}/bc"
            missing = httpx.post(url, json=_deleted(emu, forged, None), timeout=5)
            wrong = httpx.post(url, json=_deleted(emu, forged, "guessed"), timeout=5)
            # Then: both are refused with 401, counted, and not even noted
            assert (missing.status_code, wrong.status_code) == (401, 401)
            assert sub.client_state not in missing.text + wrong.text
            assert wait_for(lambda: _rejected(worker)) == {
                "missing_client_state": 1.0, "wrong_client_state": 1.0}
            assert index.suspects("customers") == []

            # When: a genuine-looking notification says a record was deleted that exists
            genuine = httpx.post(url, json=_deleted(emu, kept, sub.client_state), timeout=5)
            assert genuine.status_code == 202
            # Then: the detector asks Business Central, which still has it: nothing happens
            wait_for(lambda: index.suspects("customers") == [], timeout=20,
                     message="the detector did not check the claimed deletion")

            # When: a record really is deleted and Business Central notifies it
            emu.delete("customers", gone["id"])
            emu.webhooks.flush()
            # Then: it is deleted in the target, and only it
            wait_for(lambda: gone["number"] not in numbers(), timeout=20,
                     message="the confirmed deletion did not reach the target")
            assert numbers() == {r["number"] for r in emu.rows("customers")}
            assert {forged["number"], kept["number"]} <= numbers()
            assert _rejected(worker) == {"missing_client_state": 1.0,
                                         "wrong_client_state": 1.0}
        index.close()
    engine.dispose()


def test_workers_sharing_a_postgresql_state_store_keep_one_secret(pg_url):
    stores = [StateStore(pg_url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    got: list[str] = []

    def keep(i: int) -> None:
        start.wait()
        got.append(stores[i].keep_secret(SECRET_SCOPE, "erp/v2.0/customers", lambda: f"w{i}"))

    threads = [threading.Thread(target=keep, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1
    assert stores[0].get_secret(SECRET_SCOPE, "erp/v2.0/customers") == got[0]
    for store in stores:
        store.close()

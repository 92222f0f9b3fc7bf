"""Metrics and health endpoints of a real worker, scraped over HTTP during a real sync."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bus.cli import app
from bus.worker.worker import Worker
from tests.proxy import TcpProxy
from tests.support import wait_for
from tests.syncenv import insert_items, make_env, running, table_rows

pytestmark = pytest.mark.integration




def scrape(worker: Worker) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{worker.health.port}/metrics", timeout=5).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _with_metrics(env, **link) -> None:
    config = yaml.safe_load(env.config_path.read_text())
    config["metrics"] = {"port": 0, "host": "127.0.0.1", "sample_interval": 0.5}
    config["links"]["items"].update(link)
    env.config_path.write_text(yaml.safe_dump(config))


def test_metrics_follow_a_real_sync_and_a_target_outage(tmp_path, pg_url, amqp_url):
    url = sa.make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=proxied,
                   amqp_url=amqp_url)
    _with_metrics(env, retry={"delays": [0.5, 1], "max_attempts": 50})
    src, dst = env.source(), sa.create_engine(pg_url)
    insert_items(src, range(1, 301))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    item = {"link": "items", "entity": "items"}
    source = {"connection": "src", "entity": "items"}
    try:
        with running(env.config_path) as worker:
            wait_for(lambda: len(table_rows(dst)) == 300, timeout=60, message="initial sync")
            got = wait_for(lambda: (m := scrape(worker)) and value(
                m, "syncbus_events_applied_total", op="upsert", **item) == 300 and m,
                timeout=10, message="applied counter")
            assert value(got, "syncbus_events_detected_total", op="upsert", **source) == 300
            assert value(got, "syncbus_events_published_total", op="upsert", **source) == 300
            assert value(got, "syncbus_publish_confirm_seconds_count", **source) >= 1
            assert value(got, "syncbus_detector_poll_seconds_count", **source) >= 1
            assert value(got, "syncbus_change_to_target_seconds_count", **item) == 300
            assert 0 < value(got, "syncbus_change_to_target_seconds_sum", **item) < 300 * 60
            assert value(got, "syncbus_apply_batch_seconds_count", **item) >= 1
            assert value(got, "syncbus_events_dead_lettered_total", **item) == 0
            assert value(got, "syncbus_link_paused", link="items") == 0

            with src.begin() as conn:
                conn.execute(sa.text("DELETE FROM items WHERE id <= 40"))
            got = wait_for(lambda: (m := scrape(worker)) and value(
                m, "syncbus_events_applied_total", op="delete", **item) == 40 and m,
                timeout=30, message="40 deletes applied")
            assert value(got, "syncbus_events_published_total", op="delete", **source) == 40

            # The target goes away: changes are retried, the queue depth gauges see them.
            proxy.cut()
            with src.begin() as conn:
                conn.execute(sa.text("UPDATE items SET qty = -1 WHERE id > 200"))
            wait_for(lambda: value(scrape(worker), "syncbus_events_retried_total", **item) > 0,
                     timeout=30, message="retries counted")
            wait_for(lambda: value(scrape(worker), "syncbus_queue_messages", link="items",
                                   queue="retry") > 0,
                     timeout=30, message="retry queue depth sampled")
            proxy.restore()
            wait_for(lambda: table_rows(dst) == table_rows(src), timeout=60,
                     message="caught up after the outage")
            got = scrape(worker)
            assert value(got, "syncbus_events_applied_total", op="upsert", **item) >= 400
            assert value(got, "syncbus_events_dead_lettered_total", **item) == 0
    finally:
        proxy.close()


def test_health_endpoints_report_liveness_and_readiness_as_json(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url)
    _with_metrics(env)
    insert_items(env.source(), range(1, 11))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    with running(env.config_path) as worker:
        base = f"http://127.0.0.1:{worker.health.port}"
        ready = wait_for(lambda: (r := httpx.get(f"{base}/readyz")).status_code == 200 and r,
                         timeout=15, message="ready")
        checks = ready.json()["checks"]
        assert checks["broker"]["ok"] and checks["state_store"]["ok"]
        assert checks["links"]["items"] == {"ok": True, "consuming": True, "paused": False}
        live = httpx.get(f"{base}/healthz")
        assert live.status_code == 200 and live.json()["dead_threads"] == []
        assert live.json()["worker"] == worker.owner


def test_two_workers_in_one_process_count_separately(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url)
    _with_metrics(env)
    insert_items(env.source(), range(1, 201))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    with running(env.config_path) as first, running(env.config_path) as second:
        assert first.health.port != second.health.port
        wait_for(lambda: len(table_rows(env.target())) == 200, timeout=60, message="sync")

        def applied(worker: Worker) -> float:
            return value(scrape(worker), "syncbus_events_applied_total", link="items",
                         entity="items", op="upsert")

        wait_for(lambda: applied(first) + applied(second) == 200, timeout=10,
                 message=lambda: f"counts add up: {applied(first)} + {applied(second)}")
        published = [value(scrape(w), "syncbus_events_published_total", connection="src",
                           entity="items", op="upsert") for w in (first, second)]
        assert sorted(published) == [0, 200]  # one detector lease: one worker published

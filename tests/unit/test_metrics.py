"""Metrics registries, the throttle hook, the health server (no broker needed)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.worker.health import HealthServer
from bus.worker.metrics import Metrics, record_throttle
from schemas.config import MetricsConfig


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_each_worker_has_its_own_registry_and_conventional_names():
    a, b = Metrics(["crm"]), Metrics(["crm"])
    a.page_published("crm", "customers", 3, 1, 0.02)
    a.batch_applied("customers", "clients", upserted=3, deleted=1, skipped=2,
                    latencies=[0.5, 1.5, 2.0, 0.1])
    a.batch_settled("customers", "clients", retried=1, dead=2, seconds=0.05)

    got = _samples(a)
    assert got["syncbus_events_published_total",
               (("connection", "crm"), ("entity", "customers"), ("op", "upsert"))] == 3
    assert got["syncbus_events_applied_total",
               (("entity", "clients"), ("link", "customers"), ("op", "delete"))] == 1
    assert got["syncbus_events_skipped_total", (("entity", "clients"), ("link", "customers"))] == 2
    assert got["syncbus_events_retried_total", (("entity", "clients"), ("link", "customers"))] == 1
    assert got["syncbus_events_dead_lettered_total",
               (("entity", "clients"), ("link", "customers"))] == 2
    assert got["syncbus_change_to_target_seconds_count",
               (("entity", "clients"), ("link", "customers"))] == 4
    assert got["syncbus_change_to_target_seconds_sum",
               (("entity", "clients"), ("link", "customers"))] == pytest.approx(4.1)
    assert not [k for k in _samples(b) if k[0].startswith("syncbus_events")]
    a.close()
    b.close()


def test_record_throttle_reaches_the_workers_serving_that_connection_only():
    serving, other = Metrics(["dataverse"]), Metrics(["erp"])
    record_throttle("dataverse", 7.0)
    record_throttle("dataverse")
    record_throttle("unknown", 1.0)  # nobody serves it: a no-op

    got = _samples(serving)
    assert got["syncbus_throttled_total", (("connection", "dataverse"),)] == 2
    assert got["syncbus_throttle_wait_seconds_sum", (("connection", "dataverse"),)] == 7.0
    assert not [k for k in _samples(other) if k[0].startswith("syncbus_throttled")]
    serving.close()
    record_throttle("dataverse", 1.0)  # a closed registry no longer counts
    assert _samples(serving)["syncbus_throttled_total", (("connection", "dataverse"),)] == 2
    other.close()


def test_health_server_answers_metrics_and_json_probes():
    metrics = Metrics()
    metrics.link_paused("customers", True)
    ready = {"ok": False}
    server = HealthServer(
        metrics, host="127.0.0.1", port=0,
        liveness=lambda: (True, {"worker": "w1"}),
        readiness=lambda: (ready["ok"], {"checks": {"broker": {"ok": ready["ok"]}}}),
    )
    try:
        base = f"http://127.0.0.1:{server.port}"
        scraped = httpx.get(f"{base}/metrics")
        assert scraped.status_code == 200
        assert 'syncbus_link_paused{link="customers"} 1.0' in scraped.text
        live = httpx.get(f"{base}/healthz")
        assert live.status_code == 200 and live.json() == {"status": "ok", "worker": "w1"}
        not_ready = httpx.get(f"{base}/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["checks"]["broker"] == {"ok": False}
        ready["ok"] = True
        assert httpx.get(f"{base}/readyz").json()["status"] == "ok"
        assert httpx.get(f"{base}/nothing").status_code == 404
    finally:
        server.close()
        metrics.close()


def test_a_crashing_probe_answers_503_with_the_error():
    def broken() -> tuple[bool, dict[str, object]]:
        raise RuntimeError("boom")

    server = HealthServer(Metrics(), host="127.0.0.1", port=0, liveness=broken, readiness=broken)
    try:
        answer = httpx.get(f"http://127.0.0.1:{server.port}/healthz")
        assert answer.status_code == 503 and "boom" in answer.json()["error"]
    finally:
        server.close()


def test_refused_webhook_notifications_are_counted_by_connection_and_reason():
    metrics = Metrics(["erp"])
    metrics.webhook_rejected("erp", "wrong_client_state")
    metrics.webhook_rejected("erp", "wrong_client_state")
    metrics.webhook_rejected("erp", "missing_client_state")
    got = _samples(metrics)
    assert got["syncbus_webhook_rejected_total",
               (("connection", "erp"), ("reason", "wrong_client_state"))] == 2
    assert got["syncbus_webhook_rejected_total",
               (("connection", "erp"), ("reason", "missing_client_state"))] == 1
    metrics.close()


def test_the_health_server_listens_on_loopback_unless_told_otherwise():
    assert MetricsConfig().host == "127.0.0.1"
    server = HealthServer(Metrics(), liveness=lambda: (True, {}), readiness=lambda: (True, {}))
    try:
        assert server.host == "127.0.0.1"
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200
    finally:
        server.close()
    everywhere = HealthServer(Metrics(), liveness=lambda: (True, {}),
                              readiness=lambda: (True, {}), host="0.0.0.0")
    try:
        assert everywhere.host == "0.0.0.0"  # only when configured
    finally:
        everywhere.close()

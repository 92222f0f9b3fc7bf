"""The sync history: runs, links and detector cycles recorded with the right counts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from bus.cli import app
from bus.config.load import load_config
from bus.ops.runs import history_records
from bus.state.rows import RunRecord
from bus.state.store import StateStore
from bus.worker.worker import Worker
from tests.support import wait_for
from tests.syncenv import ROOT, insert_items, make_env, table_rows

pytestmark = pytest.mark.integration

NULLABLE = ("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, "
            "price NUMERIC, updated TIMESTAMP)")


def _history(path, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "bus.cli", "history", "--config", str(path),
                           "--json", *args], cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_a_run_until_idle_records_the_run_each_link_and_each_poll(tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, source_ddl=NULLABLE)
    src = env.source()
    insert_items(src, range(1, 41))
    with src.begin() as conn:
        conn.execute(sa.text("UPDATE items SET name = NULL WHERE id IN (7, 17, 27)"))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    config = load_config(env.config_path).config

    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lambda _l: None) == 1
    records = history_records(config)
    by_kind = {r["kind"]: r for r in records}
    assert len(records) == 3 and len({r["run_id"] for r in records}) == 1
    run, link, poll = by_kind["run"], by_kind["link"], by_kind["poll"]
    assert (run["status"], run["upserts"], run["deletes"], run["dead"]) == ("failed", 37, 0, 3)
    assert run["started_at"] <= poll["started_at"] <= poll["ended_at"] <= run["ended_at"]
    assert (link["name"], link["status"], link["upserts"], link["dead"]) == ("items", "failed",
                                                                           37, 3)
    assert (poll["name"], poll["status"], poll["upserts"], poll["deletes"]) == (
        "src.items", "ok", 40, 0)

    with src.begin() as conn:
        conn.execute(sa.text("UPDATE items SET qty = 0 WHERE id IN (1, 2, 3, 4, 5)"))
        conn.execute(sa.text("DELETE FROM items WHERE id IN (7, 17, 30)"))
    assert app.run(env.config_path, until_idle=True, max_wait=60, echo=lambda _l: None) == 0
    latest = [r for r in history_records(config, kinds=["link"])][0]
    assert (latest["status"], latest["upserts"], latest["deletes"], latest["dead"]) == (
        "ok", 5, 3, 0)

    listed = _history(env.config_path, "--link", "items")
    assert [r["kind"] for r in listed].count("run") == 2 and len(listed) == 6
    assert all(r["name"] in ("items", "src.items", "until-idle") for r in listed)
    assert listed[0]["started_at"] >= listed[-1]["started_at"]  # newest first
    assert [r["status"] for r in _history(env.config_path, "--kind", "run")] == ["ok", "failed"]
    assert _history(env.config_path, "--since", "2099-01-01T00:00") == []
    assert _history(env.config_path, "--link", "nothing") == []


def test_a_running_worker_records_detector_cycles_that_found_changes(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url)
    src, dst = env.source(), env.target()
    insert_items(src, range(1, 11))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    config = load_config(env.config_path).config
    worker = Worker(config)
    worker.open()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(table_rows(dst)) == 10, timeout=30, message="first sync")
        wait_for(lambda: history_records(config), timeout=10, message="a record")
        state = worker.state
        polls = wait_for(lambda: (state.detector_rows().get("src.items") or {}).get(
            "last_ok_at"), timeout=10, message="polls recorded")
        wait_for(lambda: state.detector_rows()["src.items"]["last_ok_at"] > polls, timeout=10,
                 message="idle polls go on")
        assert [(r["kind"], r["upserts"]) for r in history_records(config)] == [("poll", 10)]

        with src.begin() as conn:
            conn.execute(sa.text("DELETE FROM items WHERE id > 8"))
        wait_for(lambda: len(history_records(config)) == 2, timeout=30, message="second cycle")
        newest = history_records(config)[0]
        assert (newest["upserts"], newest["deletes"], newest["status"]) == (0, 2, "ok")
    finally:
        stop.set()
        thread.join(30)
        worker.close()


def test_housekeeping_trims_the_history_to_its_retention(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url)
    config = load_config(env.config_path).config
    state = StateStore(config.state.url)
    now = datetime.now(UTC)
    state.add_runs([
        RunRecord(run_id=f"r{age}", kind="run", name="until-idle",
                  started_at=now - timedelta(days=age), ended_at=now - timedelta(days=age))
        for age in (1, 29, 31, 90)])
    state.close()
    worker = Worker(config)
    worker.open()
    try:
        worker._purge_history()
    finally:
        worker.close()
    assert sorted(r["run_id"] for r in history_records(config, limit=None)) == ["r1", "r29"]

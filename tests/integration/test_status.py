"""``syncbus status``: what it reports and its exit code, against real services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from kombu import Connection

from bus.amqp.topology import DEAD_EXCHANGE, declare_topology
from bus.cli import app
from bus.config.load import load_config
from bus.ops.status import collect_status, show_status
from bus.ops.txlog import TxFilter, TxLog
from bus.state.store import StateStore
from bus.worker.worker import Worker
from tests.hostile import hostile_cases, publish, valid_cases
from tests.proxy import TcpProxy
from tests.support import pick_free_port, wait_for
from tests.syncenv import ROOT, insert_items, make_env, table_rows

pytestmark = pytest.mark.integration

NULLABLE = ("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, "
            "price NUMERIC, updated TIMESTAMP)")


def _status(path: Path, **kw) -> tuple[int, dict]:
    """Run the status check as the CLI does; returns (exit code, JSON report)."""
    config = load_config(path).config
    report = collect_status(config, **kw)
    code = 0 if report.healthy else 4 if not report.broker.ok else 1  # 4: RabbitMQ unusable
    assert show_status(path, as_json=True, console=_quiet(), **kw) == code
    return code, report.to_json()


def _quiet():
    from rich.console import Console

    return Console(file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the process


def _cli(path: Path, *args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", "status", "--config", str(path),
                           *args], cwd=ROOT, text=True, capture_output=True, timeout=120,
                          env={**os.environ, "COLUMNS": str(columns)})


def _sync(env) -> int:
    return app.run(env.config_path, until_idle=True, max_wait=60, echo=lambda _l: None)


def test_status_before_and_after_a_sync_and_its_exit_codes(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url)
    insert_items(env.source(), range(1, 51))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0

    code, report = _status(env.config_path)
    assert code == 1
    assert any("never polled" in p for p in report["problems"]), report["problems"]
    assert any("queues do not exist" in p for p in report["problems"]), report["problems"]

    assert _sync(env) == app.EXIT_OK
    code, report = _status(env.config_path)
    assert code == 0, report["problems"]
    assert report["broker"]["ok"] and report["state"]["ok"]
    assert [c["name"] for c in report["connections"]] == ["dst", "src"]
    (detector,) = report["detectors"]
    assert detector["name"] == "src.items" and detector["cursor"]
    assert detector["last_poll_at"] and detector["last_change_at"] and detector["lag"] < 30
    (link,) = report["links"]
    assert (link["ready"], link["retry"], link["error"]) == (0, 0, 0)
    assert link["applied_last_minute"] == 50 and link["last_applied_at"]
    assert link["paused"] is False

    # A detector lagging behind (here: a limit of 0 s and no worker running) is unhealthy.
    code, report = _status(env.config_path, max_lag=0.0)
    assert code == 1 and any("no successful poll" in p for p in report["problems"])

    done = _cli(env.config_path, "--json", "--max-lag", "3600")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["healthy"] is True
    lagging = _cli(env.config_path, "--max-lag", "0", "--no-probe")
    assert lagging.returncode == 1 and "UNHEALTHY" in lagging.stdout, lagging.stdout


def test_status_reports_a_stopped_target_as_unhealthy_and_recovers(tmp_path, pg_url, amqp_url):
    url = sa.make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=proxied,
                   amqp_url=amqp_url, link={"retry": {"delays": [0.5, 1], "max_attempts": 50}})
    src, dst = env.source(), sa.create_engine(pg_url)
    insert_items(src, range(1, 201))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    worker = Worker(load_config(env.config_path).config)
    worker.open()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(table_rows(dst)) == 200, timeout=60, message="initial sync")
        assert _status(env.config_path)[0] == 0

        proxy.cut()
        with src.begin() as conn:
            conn.execute(sa.text("UPDATE items SET qty = -7 WHERE id <= 50"))
        code, report = wait_for(
            lambda: (r := _status(env.config_path)) and r[1]["links"][0]["retry"]
            and r[1]["links"][0]["last_failure"] and r,
            timeout=30, message="changes waiting in retry, the failure recorded")
        assert code == 1
        assert any(p.startswith("connection dst unreachable") for p in report["problems"]), \
            report["problems"]
        (link,) = report["links"]
        assert link["error"] == 0 and "unavailable" in link["last_failure"], link
        assert [c["ok"] for c in report["connections"]] == [False, True]  # dst, src

        proxy.restore()
        wait_for(lambda: table_rows(dst) == table_rows(src), timeout=60,
                 message="caught up after the outage")
        code, report = wait_for(lambda: (r := _status(env.config_path))[0] == 0 and r,
                                timeout=30, message="healthy again")
        assert report["links"][0]["retry"] == 0
        wait_for(lambda: _status(env.config_path)[1]["links"][0]["last_failure"] is None,
                 timeout=10, message="the failure superseded by later writes")
    finally:
        stop.set()
        thread.join(30)
        worker.close()
        proxy.close()


def test_status_is_unhealthy_when_the_broker_or_the_state_store_is_down(
        tmp_path, pg_url, amqp_url):
    url = sa.make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    state_url = url.set(port=proxy.port).render_as_string(hide_password=False)
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url)
    config = yaml.safe_load(env.config_path.read_text())
    config["state"]["url"] = state_url
    env.config_path.write_text(yaml.safe_dump(config))
    insert_items(env.source(), range(1, 11))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    assert _sync(env) == app.EXIT_OK
    try:
        assert _status(env.config_path)[0] == 0

        proxy.cut()
        code, report = _status(env.config_path, timeout=5)
        assert code == 1 and not report["state"]["ok"]
        assert any(p.startswith("state store unreachable") for p in report["problems"])
        proxy.restore()
        assert _status(env.config_path)[0] == 0
    finally:
        proxy.close()

    config["broker"]["url"] = f"amqp://guest:guest@127.0.0.1:{pick_free_port()}/"
    env.config_path.write_text(yaml.safe_dump(config))
    code, report = _status(env.config_path, timeout=5)
    assert code == 4 and not report["broker"]["ok"]
    assert any(p.startswith("broker not usable") and p.endswith(
        "cannot reach RabbitMQ (connection refused); is it running?") for p in report["problems"])


def test_errors_per_link_stay_right_across_failures_replays_and_archives(
        tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, source_ddl=NULLABLE)
    copy_url = f"sqlite:///{tmp_path}/copy.db"
    with sa.create_engine(copy_url).begin() as conn:
        conn.exec_driver_sql(NULLABLE)
    config = yaml.safe_load(env.config_path.read_text())
    config["connections"]["copy"] = {"type": "sql", "url": copy_url}
    config["links"]["copy"] = {**config["links"]["items"],
                               "target": {"connection": "copy", "entity": "items"}}
    env.config_path.write_text(yaml.safe_dump(config))
    insert_items(env.source(), range(1, 41))
    with env.source().begin() as conn:
        conn.execute(sa.text("UPDATE items SET name = NULL WHERE id IN (7, 17, 27)"))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    assert _sync(env) == app.EXIT_FAILED  # three rows rejected by PostgreSQL (NOT NULL)

    def errors() -> dict[str, int]:
        code, report = _status(env.config_path)
        counts = {lk["name"]: lk["error"] for lk in report["links"]}
        assert code == (1 if any(counts.values()) else 0), report["problems"]
        return counts

    assert errors() == {"items": 3, "copy": 0}
    log = TxLog(load_config(env.config_path).config)
    try:
        # Replayed without a fix: it fails again (the counters see +1 after the replay's -1).
        assert log.replay(TxFilter(key="7")).moved == 1
        assert errors() == {"items": 2, "copy": 0}  # the queue holds 2 now: counted again
        assert _sync(env) == app.EXIT_FAILED
        assert errors() == {"items": 3, "copy": 0}
        assert log.archive(TxFilter(key="17")).moved == 1
        assert errors() == {"items": 2, "copy": 0}

        with env.target().begin() as conn:
            conn.execute(sa.text("ALTER TABLE items ALTER COLUMN name DROP NOT NULL"))
        assert log.replay(TxFilter(link="items")).moved == 2
        assert _sync(env) == app.EXIT_OK
        assert errors() == {"items": 0, "copy": 0}
    finally:
        log.close()
    expected = {k: v for k, v in table_rows(env.source()).items() if k != 17}
    assert table_rows(env.target()) == expected


def test_status_of_every_config_on_the_broker_survives_hostile_dead_letters(
        tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url)
    config = yaml.safe_load(env.config_path.read_text())
    config["links"] = {"copy": config["links"]["items"]}
    other = tmp_path / "other.yaml"  # a second config sharing the broker (and syncbus.dead)
    other.write_text(yaml.safe_dump(config))
    for path in (env.config_path, other):
        with Connection(amqp_url) as conn:
            declare_topology(conn, load_config(path).config)
    cases = valid_cases() + hostile_cases()
    publish(amqp_url, DEAD_EXCHANGE, "src.items.upsert", cases)

    for path, link, errors in ((env.config_path, "items", len(cases)), (other, "copy", 0)):
        result = _cli(path, "--json", "--no-probe")
        assert result.returncode == 1 and not result.stderr, result.stderr  # unhealthy, no crash
        report = json.loads(result.stdout)
        assert report["broker"]["ok"], report["broker"]
        assert [(lk["name"], lk["error"]) for lk in report["links"]] == [(link, errors)]
        table = _cli(path, "--no-probe")
        assert table.returncode == 1 and not table.stderr, table.stderr
        assert (f"{errors} transaction(s) in error" in table.stdout) == bool(errors)


def test_a_two_way_link_shows_each_direction_and_both_sides_detectors(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/a.db",
                   target_url=f"sqlite:///{tmp_path}/b.db", amqp_url=amqp_url,
                   link={"direction": "both"}, target_ddl=NULLABLE)
    insert_items(env.source(), range(1, 11))
    with env.target().begin() as conn:  # side b's own records; 106 has no name, which a refuses
        conn.execute(sa.text("INSERT INTO items (id, name, qty) VALUES (:id, :name, 1)"),
                     [{"id": i, "name": None if i == 106 else f"b-{i}"} for i in range(101, 107)])
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    assert _sync(env) == app.EXIT_FAILED

    code, report = _status(env.config_path)
    assert code == 1
    assert [d["name"] for d in report["detectors"]] == ["src.items", "dst.items"]
    assert all(d["last_poll_at"] and d["cursor"] for d in report["detectors"])
    rows = {lk["direction"]: lk for lk in report["links"]}
    assert list(rows) == ["a2b", "b2a"] and {lk["name"] for lk in rows.values()} == {"items"}
    assert (rows["a2b"]["source"], rows["a2b"]["target"]) == ("src.items", "dst.items")
    assert (rows["b2a"]["source"], rows["b2a"]["target"]) == ("dst.items", "src.items")
    assert (rows["a2b"]["applied_last_minute"], rows["a2b"]["error"]) == (10, 0)
    assert (rows["b2a"]["applied_last_minute"], rows["b2a"]["error"]) == (5, 1)
    assert rows["b2a"]["retry"] == rows["b2a"]["ready"] == 0
    assert "link items (b → a): 1 transaction(s) in error (syncbus tx list --link items)" \
        in report["problems"]

    # Counted again from the dead-letter queue itself, the error stays with b → a.
    StateStore(load_config(env.config_path).config.state.url).set_dead_counts({})
    rows = {lk["direction"]: lk for lk in _status(env.config_path)[1]["links"]}
    assert (rows["a2b"]["error"], rows["b2a"]["error"]) == (0, 1)

    shown = _cli(env.config_path, "--no-probe", columns=80)
    assert shown.returncode == 1, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, shown.stdout
    cells = {line.split()[0] + " " + " ".join(line.split()[1:4]): line.split()[4:]
             for line in lines if line.startswith("items (")}
    # link, pending, retry, error, applied/min, last applied, state
    assert cells["items (a → b)"][:4] == ["0", "0", "0", "10"], shown.stdout
    assert cells["items (b → a)"][:4] == ["0", "0", "1", "5"], shown.stdout
    assert cells["items (b → a)"][-1] == "errors", shown.stdout
    assert "  src.items → dst.items" in shown.stdout and "  dst.items → src.items" in shown.stdout
    detectors = [line.split()[0] for line in lines if line.startswith(("src.items", "dst.items"))]
    assert detectors == ["src.items", "dst.items"], shown.stdout
    assert " - link items (b → a): 1 transaction(s) in error" in shown.stdout

"""Sync All (initial sync): master wins, other side's extra records copied, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from bus.cli.main import cli
from bus.config.load import load_config
from bus.ops.syncall import Progress, sync_all
from bus.state.store import StateStore
from bus.worker.worker import Worker

A_DDL = "CREATE TABLE accounts (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT)"
B_DDL = "CREATE TABLE clients (id SERIAL PRIMARY KEY, number TEXT NOT NULL UNIQUE, title TEXT)"


class Crash(Exception):
    pass


@pytest.fixture
def env(tmp_path: Path, pg_url: str, amqp_url: str) -> dict[str, Any]:
    a_url = f"sqlite:///{tmp_path}/a.db"
    a, b = sa.create_engine(a_url), sa.create_engine(pg_url)
    with a.begin() as conn:
        conn.exec_driver_sql(A_DDL)
        conn.execute(sa.text("INSERT INTO accounts (code, name) VALUES (:c, :n)"),
                     [{"c": f"K{i:05d}", "n": f"a {i}"} for i in range(3000)])
    with b.begin() as conn:
        conn.exec_driver_sql(B_DDL)
        conn.execute(sa.text("INSERT INTO clients (number, title) VALUES (:c, :n)"),
                     [{"c": f"K{i:05d}", "n": f"b {i}"} for i in range(2000, 5000)])
    config = {
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "connections": {"a": {"url": a_url}, "b": {"url": pg_url}},
        "links": {"accounts": {
            "source": {"connection": "a", "entity": "accounts"},
            "target": {"connection": "b", "entity": "clients"},
            "direction": "both", "key": "code", "page_size": 500, "conflict": "target_wins",
            "fields": {"number": "code", "title": "name"},
        }},
    }
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(config))
    worker = Worker(load_config(path).config)
    worker.prepare_sources()
    worker.close()
    yield {"a": a, "b": b, "path": path}
    a.dispose()
    b.dispose()


def _table(engine: sa.Engine, sql: str) -> dict[str, str]:
    with engine.connect() as conn:
        return {k: v for k, v in conn.execute(sa.text(sql))}


def test_master_wins_differences_and_a_crashed_run_resumes(env):
    config = load_config(env["path"]).config
    seen: list[Progress] = []

    def crash_after_two_pages(p: Progress) -> None:
        seen.append(p)
        if p.published >= 1000:
            raise Crash

    with pytest.raises(Crash):
        sync_all(config, "accounts", master="a", on_progress=crash_after_two_pages)
    assert seen[-1].published == 1000 and seen[-1].total == 3000

    resumed: list[Progress] = []
    result = sync_all(config, "accounts", master="a", on_progress=resumed.append, max_wait=120)
    assert result.resumed == ["a2b"]
    assert resumed[0].direction == "a2b" and resumed[0].published == 1500  # continued, not restarted
    assert resumed[0].resumed
    assert result.published == {"a2b": 3000, "b2a": 3000}
    assert result.delivery is not None and result.delivery.ok, result.delivery

    a = _table(env["a"], "SELECT code, name FROM accounts")
    b = _table(env["b"], "SELECT number, title FROM clients")
    assert a == b
    assert len(a) == 5000
    assert a["K02500"] == "a 2500"  # both had it: the master's version won
    assert a["K04000"] == "b 4000"  # only b had it: copied to the master
    conflicts = StateStore(config.state.url).conflict_rows(link="accounts")
    assert len({c["pair_key"] for c in conflicts}) == 1000  # every overwritten version is logged
    assert {c["winner"] for c in conflicts} == {"a"}


def test_cli_sync_all_reports_counts_and_starts_over_once_finished(env):
    first = CliRunner().invoke(cli, ["sync-all", "-c", str(env["path"]), "--link", "accounts",
                                     "--master", "b", "--max-wait", "120"])
    assert first.exit_code == 0, first.output
    assert "a2b: 3000 record(s) sent" in first.output
    assert "b2a: 3000 record(s) sent" in first.output
    a = _table(env["a"], "SELECT code, name FROM accounts")
    assert a == _table(env["b"], "SELECT number, title FROM clients")
    assert a["K02500"] == "b 2500"  # master b
    again = CliRunner().invoke(cli, ["sync-all", "-c", str(env["path"]), "--link", "accounts",
                                     "--no-apply"])
    assert again.exit_code == 0, again.output
    assert "a2b: 5000 record(s) sent" in again.output  # a finished run starts over


def test_sync_all_refuses_an_unknown_link_and_a_bad_master(env):
    out = CliRunner().invoke(cli, ["sync-all", "-c", str(env["path"]), "--link", "nope"])
    assert out.exit_code == 2
    assert "no link 'nope'" in out.output
    out = CliRunner().invoke(cli, ["sync-all", "-c", str(env["path"]), "--link", "accounts",
                                   "--master", "c"])
    assert out.exit_code == 2
    assert "--master must be a or b" in out.output

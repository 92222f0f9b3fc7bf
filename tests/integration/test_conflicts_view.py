"""``syncbus tx conflicts`` in an 80-column terminal: one block per conflict, fields side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from bus.config.load import load_config
from bus.worker.worker import Worker
from tests.syncenv import ROOT

pytestmark = pytest.mark.integration

LONG_NAME = "Acme Holding International, renamed on side a with a name longer than a column"


def _exec(engine: sa.Engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql))


def _conflicts(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", "tx", "conflicts", "-c", str(path),
                           *args], cwd=ROOT, text=True, capture_output=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})


@pytest.fixture
def conflicted(tmp_path: Path, amqp_url: str) -> Path:
    """A two-way link with a manual conflict on record A1: both sides edited it."""
    a, b = (sa.create_engine(f"sqlite:///{tmp_path}/{side}.db") for side in "ab")
    _exec(a, "CREATE TABLE accounts (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, "
             "name TEXT, status TEXT, credit NUMERIC(12, 2))")
    _exec(b, "CREATE TABLE clients (id INTEGER PRIMARY KEY, number TEXT NOT NULL UNIQUE, "
             "title TEXT, state TEXT, credit NUMERIC(12, 2))")
    _exec(a, "INSERT INTO accounts (code, name, status, credit) VALUES ('A1', 'Acme', 'A', 10)")
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "connections": {"crm": {"type": "sql", "url": f"sqlite:///{tmp_path}/a.db"},
                        "erp": {"type": "sql", "url": f"sqlite:///{tmp_path}/b.db"}},
        "links": {"accounts": {
            "source": {"connection": "crm", "entity": "accounts"},
            "target": {"connection": "erp", "entity": "clients"},
            "direction": "both", "key": "code", "conflict": "manual",
            "fields": {"number": "code", "title": "name", "credit": "credit",
                       "state": {"from": "status", "map": {"A": "active", "I": "inactive"}}},
            "retry": {"delays": [0.2, 0.5], "max_attempts": 4},
        }},
    }, sort_keys=False))
    worker = Worker(load_config(path).config)
    worker.prepare_sources()
    worker.open()
    try:
        assert not worker.run_until_idle(max_wait=60).timed_out
        _exec(a, f"UPDATE accounts SET name = '{LONG_NAME}', status = 'I' WHERE code = 'A1'")
        _exec(b, "UPDATE clients SET title = 'Acme from b', credit = 99 WHERE number = 'A1'")
        assert worker.run_until_idle(max_wait=60).dead >= 1  # waits for an operator
    finally:
        worker.close()
        a.dispose()
        b.dispose()
    return path


def test_each_conflict_is_a_block_with_the_differing_fields_side_by_side(conflicted):
    shown = _conflicts(conflicted)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # Every line fits, but the closing hint: left to the terminal to wrap, so it pastes whole.
    assert max(len(line) for line in lines if "conflict(s)" not in line) <= 80, shown.stdout
    heads = [line for line in lines if line.startswith("conflict #")]
    assert heads and all("link accounts" in h and "policy manual" in h and "pending: waiting for an operator" in h
                         for h in heads), shown.stdout
    facts = {line.split()[0]: line for line in lines if line[:1].isalpha()}
    assert facts["record"].split()[1] == '{"code":"A1"}', shown.stdout
    assert "by a change" in facts["detected"]
    assert "changed" not in facts  # SQL keeps no modification time: nothing made up

    # The side-by-side: a's value next to b's, only for fields that differ.
    header = next(line for line in lines if line.startswith("  field"))
    assert header.split()[1:] == ["a:", "crm.accounts", "b:", "erp.clients"], shown.stdout
    at = lines.index(next(line for line in lines if line.startswith("  name → title")))
    assert lines[at].split("  ")[-1].strip() == "Acme from b" or \
        lines[at].rstrip().endswith("Acme from b"), shown.stdout
    a_cell = lines[at][header.index("a:"):header.index("b:")].strip() + " " + \
        lines[at + 1][header.index("a:"):header.index("b:")].strip()
    assert a_cell == LONG_NAME, shown.stdout  # wrapped in its column, never cut short
    cells = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert cells["status"] == ["→", "state", "I", "active"], shown.stdout
    assert cells["credit"] in (["10", "99"], ["10.00", "99.00"]), shown.stdout
    assert "code" not in cells  # the same on both sides: not shown
    assert (f"2 conflict(s); resolve one: syncbus tx resolve -c {conflicted} 2 --keep a|b"
            in shown.stdout), shown.stdout


def test_conflicts_json_keeps_its_shape(conflicted):
    shown = subprocess.run([sys.executable, "-m", "bus.cli", "tx", "conflicts", "-c",
                            str(conflicted), "--json"], cwd=ROOT, text=True, capture_output=True,
                           timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert rows and set(rows[0]) == {
        "id", "link", "pair_key", "detected_at", "policy", "winner", "a_values", "b_values",
        "a_modified", "b_modified", "event_id", "direction", "resolved_at", "resolved_by"}
    assert rows[0]["winner"] is None and rows[0]["a_values"]["name"] == LONG_NAME

"""The documented plain-pika subscriber receives the events of a real sync.

Proof that the contract stands alone: ``docs/examples/pika_subscriber.py`` imports
nothing of syncbus, runs as its own process, and still gets every event.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from bus.cli import app
from tests.syncenv import ROOT, insert_items, make_env

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "docs" / "examples" / "pika_subscriber.py"
OUR_PACKAGES = {"bus", "schemas", "producers", "consumers", "connectors", "tests"}


def _example(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(EXAMPLE), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _lines(proc: subprocess.Popen[str]) -> list[dict]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _sync(env) -> None:
    lines: list[str] = []
    assert app.run(env.config_path, until_idle=True, max_wait=60,
                   echo=lines.append) == app.EXIT_OK, lines


def test_the_example_imports_nothing_of_syncbus():
    tree = ast.parse(EXAMPLE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "pika" in imported
    assert not imported & OUR_PACKAGES


def test_the_plain_pika_example_receives_the_events_of_a_real_sync(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/src.db",
                   target_url=f"sqlite:///{tmp_path}/dst.db", amqp_url=amqp_url)
    src = env.source()
    insert_items(src, range(1, 31))
    lines: list[str] = []
    assert app.setup(env.config_path, echo=lines.append) == app.EXIT_OK, lines

    live = _example(tmp_path, "--url", amqp_url, "--queue", "example.items", "--limit", "30",
                    "--idle", "60", "src.items.*")
    assert live.stderr is not None
    assert live.stderr.readline().startswith("listening on example.items")
    _sync(env)
    got = _lines(live)
    assert sorted(e["key"]["id"] for e in got) == list(range(1, 31))
    assert {(e["routing_key"], e["op"], e["entity"]) for e in got} == {
        ("src.items.upsert", "upsert", "items")}
    assert len({e["id"] for e in got}) == 30

    # The durable queue keeps what happens while the subscriber is away.
    with src.begin() as conn:
        conn.execute(sa.text("DELETE FROM items WHERE id <= 4"))
    _sync(env)
    later = _lines(_example(tmp_path, "--url", amqp_url, "--queue", "example.items",
                            "--limit", "4", "--idle", "30", "src.items.*"))
    assert sorted((e["op"], e["key"]["id"]) for e in later) == [("delete", i) for i in range(1, 5)]

    # And the history stream has all of it, in order, for a reader that comes later still.
    replay = _lines(_example(tmp_path, "--url", amqp_url, "--from", "first", "--limit", "34",
                             "--idle", "30", "#"))
    assert [e["offset"] for e in replay] == list(range(34))
    assert [e["id"] for e in replay[:30]] == [e["id"] for e in got]

"""``syncbus tail`` as a user runs it: a subprocess printing the events of a real sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from jsonschema import Draft202012Validator
from kombu import Connection

from bus.amqp.topology import CHANGES_EXCHANGE, declare_topology
from bus.cli import app
from bus.config.load import load_config
from schemas.event import SCHEMA_FILE
from tests.hostile import Case, event_body, hostile_cases, publish
from tests.syncenv import ROOT, insert_items, make_env

pytestmark = pytest.mark.integration


def _tail(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bus.cli", "tail", *args], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )


def _output(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.splitlines()


def _sync(env) -> None:
    lines: list[str] = []
    assert app.run(env.config_path, until_idle=True, max_wait=60,
                   echo=lines.append) == app.EXIT_OK, lines


@pytest.fixture
def env(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/src.db",
                   target_url=f"sqlite:///{tmp_path}/dst.db", amqp_url=amqp_url)
    insert_items(env.source(), range(1, 11))
    lines: list[str] = []
    assert app.setup(env.config_path, echo=lines.append) == app.EXIT_OK, lines
    return env


def test_tail_prints_the_matching_live_events_one_line_each(env):
    proc = _tail("src.items.delete", "--config", str(env.config_path), "--limit", "2")
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("watching live events matching 'src.items.delete'")
    _sync(env)  # ten upserts: not matching
    with env.source().begin() as conn:
        conn.execute(sa.text("DELETE FROM items WHERE id IN (4, 6)"))
    _sync(env)
    lines = _output(proc)
    assert len(lines) == 2, lines
    for line, key in zip(lines, (4, 6), strict=True):
        words = line.split()
        assert words[2:] == ["src.items.delete", f'{{"id":{key}}}', words[4], "(deleted)"]
        assert words[4].startswith("v")


def test_tail_from_first_replays_the_history_with_offsets(env):
    _sync(env)
    lines = _output(_tail("src.items.*", "--amqp-url", env.amqp_url, "--from", "first",
                          "--limit", "3"))
    assert [line.split()[0] for line in lines] == ["#0", "#1", "#2"]
    assert all("src.items.upsert" in line and line.endswith("*") for line in lines)


def test_tail_idle_replays_what_is_there_then_exits_when_quiet(env):
    _sync(env)
    with env.source().connect() as conn:
        total = conn.scalar(sa.text("SELECT count(*) FROM items"))
    started = time.monotonic()
    lines = _output(_tail("src.items.*", "--amqp-url", env.amqp_url, "--from", "first",
                          "--limit", str(total + 100), "--idle", "2"))
    assert len(lines) == total  # fewer than --limit: it stopped because nothing came
    assert time.monotonic() - started < 40


def test_tail_json_prints_raw_events_that_validate_against_the_schema(env):
    _sync(env)
    lines = _output(_tail("--amqp-url", env.amqp_url, "--from", "5", "--json", "-n", "5"))
    validator = Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    events = [json.loads(line) for line in lines]
    assert [e["data"]["key"]["id"] for e in events] == [6, 7, 8, 9, 10]
    assert all(not list(validator.iter_errors(e)) for e in events)


def test_tail_explains_bad_arguments_and_a_missing_history(env, amqp_url):
    bad = _tail("--from", "yesterday", "--amqp-url", amqp_url)
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "first, last, next" in err
    missing = _tail("--from", "first", "--amqp-url", amqp_url)  # no worker ran yet
    _, err = missing.communicate(timeout=60)
    assert missing.returncode == 1 and "no history stream" in err


def test_tail_shows_every_hostile_message_of_the_history_and_goes_on(env, amqp_url):
    with Connection(amqp_url) as conn:
        declare_topology(conn, load_config(env.config_path).config)  # the history stream
    cases = [Case("ok-1", event_body(1)), *hostile_cases(), Case("ok-2", event_body(2))]
    publish(amqp_url, CHANGES_EXCHANGE, "src.items.upsert", cases)

    lines = _output(_tail("--amqp-url", amqp_url, "--from", "first", "--idle", "2"))
    assert len(lines) == len(cases), lines
    for offset, (case, line) in enumerate(zip(cases, lines, strict=True)):
        assert line.startswith(f"#{offset}  "), line
        assert len(line) < 600 and "\x1b" not in line and "\x00" not in line
        if case.reason:
            assert f"<unreadable ({len(case.body)} bytes): {case.reason}" in line, line
        elif case.message_id in ("ok-1", "ok-2"):
            assert line.split()[3:5] == ["src.items.upsert", f'{{"id":{case.message_id[-1]}}}']
    (odd,) = [ln for case, ln in zip(cases, lines, strict=True) if case.message_id is None]
    assert "<not a change event: " in odd and odd.endswith("  id 5")  # an integer id as text

    raw = _output(_tail("--amqp-url", amqp_url, "--from", "first", "--idle", "2", "--json"))
    assert len(raw) == len(cases)
    for offset, (case, line) in enumerate(zip(cases, raw, strict=True)):
        shown = json.loads(line)
        if case.reason:
            assert case.reason in shown["unreadable"]["reason"]
            assert (shown["offset"], shown["routing_key"]) == (offset, "src.items.upsert")
        else:
            assert shown == json.loads(case.body), line[:200]

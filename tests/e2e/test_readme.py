"""Every `syncbus` command the README shows runs, in order, as written.

The walkthrough is executed verbatim in an empty directory: its emulator command, its
`sync.yaml` and each step (only the port and the broker's vhost are swapped for the
test's own). The operations commands then run against what the walkthrough left.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.support import pick_free_port, wait_for_port
from tests.syncenv import ROOT

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands(block: str) -> list[list[str]]:
    out = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "syncbus":
            out.append(words[1:])
    return out


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=90)


@pytest.mark.slow
def test_the_walkthrough_and_the_operations_commands_run_as_written(tmp_path, amqp_url):
    walkthrough = _section("Walkthrough")
    [emulate, steps] = _blocks(walkthrough, "sh")
    [config] = _blocks(walkthrough, "yaml")
    port = str(pick_free_port())
    exports = dict(re.findall(r"^export (\w+)=(\S+)", steps, re.M))
    env = {**os.environ, **exports, "PYTHONPATH": str(ROOT)}
    loaded = yaml.safe_load(config.replace("8701", port))
    # The README practises what it preaches: no secret is inline (the broker's password
    # is a reference with a default), and the test keeps the reference, only the vhost
    # (and a non-default password, through the variable) is the test's own.
    reference = "${RABBIT_PASSWORD:-guest}"
    assert loaded["broker"]["url"] == f"amqp://guest:{reference}@127.0.0.1:5672/"
    assert all("${" in str(c.get("client_secret", "${")) for c in loaded["connections"].values())
    parts = urllib.parse.urlsplit(amqp_url)
    env.pop("RABBIT_PASSWORD", None)
    if parts.password != "guest":
        env["RABBIT_PASSWORD"] = urllib.parse.unquote(parts.password or "")
    loaded["broker"]["url"] = urllib.parse.urlunsplit(parts._replace(
        netloc=f"{parts.username}:{reference}@{parts.hostname}:{parts.port or 5672}"))
    (tmp_path / "sync.yaml").write_text(yaml.safe_dump(loaded, sort_keys=False))

    [emulator_args] = _commands(emulate)
    emulator = subprocess.Popen(
        [sys.executable, "-m", "bus.cli", *[a.replace("8701", port) for a in emulator_args]],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port("127.0.0.1", int(port), timeout=30)
        ran = []
        for args in _commands(steps):
            result = _run(args, tmp_path, env)
            assert result.returncode == 0, f"syncbus {' '.join(args)}:\n{result.stdout}{result.stderr}"
            ran.append((args, result.stdout + result.stderr))
        outputs = {args[0]: out for args, out in ran}
        assert "OK — 2 connections, 1 link" in outputs["validate"]
        assert "a2b: 50 record(s) sent" in outputs["sync-all"]
        assert "crm.account.upsert" in outputs["tail"]
        # Export and re-import keep every reference as written, without warnings, and
        # need no variable the README does not set.
        exported = (tmp_path / "backup.yaml").read_text()
        assert reference in exported and "${CRM_SECRET}" in exported
        assert "ca_bundle: .syncbus/certs/ca.pem" in exported  # paths as written
        assert not [out for args, out in ran if args[0] == "config" and "inline" in out]
        assert yaml.safe_load((tmp_path / "restored.yaml").read_text()) == \
            yaml.safe_load(exported)

        operations = _section("Operations")
        commands = _commands(_blocks(operations, "sh")[0])
        assert len(commands) >= 8
        for args in commands:
            result = _run(args, tmp_path, env)
            assert result.returncode == 0, f"syncbus {' '.join(args)}:\n{result.stdout}{result.stderr}"
        [subscriber] = _blocks(_section("Subscribing to changes"), "sh")
        words = shlex.split(subscriber, comments=True)
        assert words[:2] == ["python", "docs/examples/pika_subscriber.py"]
        result = subprocess.run([sys.executable, str(ROOT / words[1]), *words[2:], "--url",
                                 amqp_url], text=True, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) == 3
        assert '"routing_key": "crm.account.upsert"' in result.stdout
    finally:
        emulator.terminate()
        emulator.wait(30)

    import sqlite3

    with sqlite3.connect(tmp_path / "hub.db") as db:
        assert db.execute("SELECT count(*) FROM account").fetchone() == (50,)


@pytest.mark.parametrize("command", ["python3 -m venv .venv && .venv/bin/pip install -q -e . "
                                     "&& .venv/bin/syncbus demo", "bash tests/run"])
def test_the_two_commands_are_in_the_readme(command):
    assert command in README

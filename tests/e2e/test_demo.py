"""``syncbus demo`` as a user runs it: every step, the state it leaves, --keep-running, no broker.

The demo runs in a subprocess (stdout a pipe, as in CI: no live view) against this
test's own vhost; the state it leaves is read afterwards from its directory: the hub,
the emulators' store files, the state store and the offline-transaction log.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bus.config.load import load_config
from bus.demo.run import LONG_NAME, syncbus_command
from bus.ops.txlog import TxLog
from bus.state.store import StateStore
from connectors.business_central.emulator import BusinessCentralEmulator
from connectors.dataverse.emulator.model import DEFAULT_ENTITIES
from connectors.dataverse.emulator.store import Store
from connectors.registry import open_connector
from tests.support import wait_for
from tests.syncenv import ROOT

pytestmark = pytest.mark.integration

#: Seconds the whole demo may take here (it takes about 20).
DEMO_TIMEOUT = 180


def _norm(*values: Any) -> tuple[str | None, ...]:
    return tuple(f"{Decimal(str(v)).normalize():f}" if isinstance(v, (int, float, Decimal))
                 and not isinstance(v, bool) else (v or None) for v in values)


def _hub(demo: Path) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
    with sqlite3.connect(demo / "hub.db") as db:
        accounts = {r[0]: _norm(*r[1:]) for r in db.execute(
            "SELECT number, name, city, phone, credit FROM accounts")}
        contacts = {r[0]: _norm(*r[1:]) for r in db.execute(
            "SELECT c.email, c.firstname, c.lastname, a.number FROM contacts c "
            "LEFT JOIN accounts a ON a.id = c.account_id")}
    return accounts, contacts


def _dataverse(demo: Path) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
    store = Store(DEFAULT_ENTITIES, path=demo / "dataverse.db")
    try:
        rows = store.tables["account"].rows.values()
        accounts = {r["accountnumber"]: _norm(r["name"], r.get("address1_city"),
                                              r.get("telephone1"), r.get("creditlimit"))
                    for r in rows}
        numbers = {r["accountid"]: r["accountnumber"] for r in rows}
        contacts = {r["emailaddress1"]: _norm(r.get("firstname"), r.get("lastname"), numbers.get(
            (r.get("parentcustomerid") or {}).get("id")))
            for r in store.tables["contact"].rows.values()}
    finally:
        store.close()
    return accounts, contacts


def _business_central(demo: Path) -> dict[str, tuple[Any, ...]]:
    bc = BusinessCentralEmulator(https=False, store=demo / "business-central.db")
    try:
        return {r["number"]: _norm(r["displayName"], r["city"], r["phoneNumber"],
                                   r["creditLimit"]) for r in bc.rows("customers")}
    finally:
        bc.store.close()


def _venv_script(bin_dir: Path) -> Path:
    """A ``syncbus`` console script like pip's, in ``bin_dir`` (not on the PATH)."""
    bin_dir.mkdir(parents=True)
    script = bin_dir / "syncbus"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                      "from bus.cli.main import main\nsys.exit(main())\n")
    script.chmod(0o755)
    (bin_dir / "activate").write_text("# the venv's activation script\n")
    return script


@pytest.mark.slow
def test_the_demo_plays_every_step_and_leaves_the_three_systems_equal(tmp_path, amqp_url):
    # Run as after the README's one-liner: .venv/bin/syncbus, with syncbus not on the PATH.
    _venv_script(tmp_path / ".venv" / "bin")
    demo = tmp_path / "demo"
    started = time.monotonic()
    env = {**os.environ, "PATH": os.defpath}
    result = subprocess.run(
        [".venv/bin/syncbus", "demo", "--dir", "demo", "--amqp-url", amqp_url],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=DEMO_TIMEOUT)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert time.monotonic() - started < DEMO_TIMEOUT
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == [f"step {n}/8" for n in range(1, 9)], out
    assert "┏" not in result.stdout  # no live view when stdout is not a terminal
    assert "demo_accounts (dynamics.account → hub.accounts): " in result.stdout

    # Every syncbus command it suggests starts as the demo was started (pasteable).
    suggested = re.findall(r"([^\s(`]*)syncbus (?:tx|status|tail|demo) ", result.stdout)
    assert suggested and set(suggested) == {".venv/bin/"}, out
    assert "source .venv/bin/activate" in result.stdout
    # The last screen says what is left and how to keep exploring.
    last = result.stdout[result.stdout.index("The demo has ended"):]
    assert "emulators and the worker stopped" in last
    assert f"{demo}" in last and "hub.db" in last
    assert ".venv/bin/syncbus demo --keep-running --dir demo --amqp-url" in last
    pasted = [line.strip() for line in last.splitlines()
              if line.startswith("  .venv/bin/syncbus tx ")]
    assert len(pasted) == 3, last
    outputs = []
    for command in pasted:  # they work after the demo, with the emulators gone
        ran = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, text=True,
                             capture_output=True, timeout=60)
        assert ran.returncode == 0, f"{command}:\n{ran.stdout}{ran.stderr}"
        assert "Traceback" not in ran.stderr
        outputs.append(ran.stdout)
    assert "5 processed transaction(s)" in outputs[0]
    assert "demo_acc" in outputs[1]  # the conflict of demo_accounts

    # The three systems hold the same accounts, the hub and Dataverse the same contacts.
    hub_accounts, hub_contacts = _hub(demo)
    dv_accounts, dv_contacts = _dataverse(demo)
    assert hub_accounts == dv_accounts
    assert hub_accounts == _business_central(demo)
    assert len(hub_accounts) == 100 + 100 + 3 - 2 + 1  # seeds, hub inserts, deletes, replay
    assert hub_contacts == dv_contacts
    assert len(hub_contacts) > 100
    assert hub_contacts["jana.kralova@hub-0001.example"][2] == "HUB-0001"

    # The rejected record arrived after the hub's column was widened and it was replayed.
    assert hub_accounts["ACC-900001"][0] == LONG_NAME
    assert len(LONG_NAME) > 50
    config = load_config(demo / "sync.yaml").config
    log = TxLog(config)
    try:
        assert log.select("error") == []
        assert log.select("archived") == []
    finally:
        log.close()

    # The conflict: Dynamics' edit won everywhere and the log keeps the hub's version.
    assert hub_accounts["ACC-000007"][0].endswith("(Dynamics edit)")
    state = StateStore(config.state.url)
    try:
        rows = state.conflict_rows(link="demo_accounts")
    finally:
        state.close()
    # Each direction may meet the conflict (whichever change is applied first): one or two rows.
    assert rows and {(r["policy"], r["winner"]) for r in rows} == {("source_wins", "a")}
    assert any("(hub edit)" in json.dumps(r["b_values"]) for r in rows)


class _Terminal:
    """A command run on a pseudo-terminal (so it sees a terminal), its output collected."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bus.cli", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=slave, stderr=slave, start_new_session=True,
            env={**os.environ, "COLUMNS": "160", "LINES": "60", "TERM": "xterm"})
        os.close(slave)
        self._master, self._chunks = master, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the command closed the terminal
                return
            if not data:
                return
            self._chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode("utf-8", "replace")

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(60)
        self._reader.join(10)
        os.close(self._master)
        return code


@pytest.mark.slow
def test_keep_running_shows_the_live_view_and_leaves_the_bus_up_until_ctrl_c(tmp_path, amqp_url):
    demo = tmp_path / "demo"
    config_path = demo / "sync.yaml"
    term = _Terminal("demo", "--dir", str(demo), "--amqp-url", amqp_url, "--keep-running")
    try:
        wait_for(lambda: "until Ctrl-C" in term.output, timeout=DEMO_TIMEOUT, interval=0.5,
                 message=lambda: f"the demo to keep running:\n{term.output[-3000:]}")
        out = term.output
        assert "events per link direction" in out and "┏" in out  # the live table
        assert "step 8/8: " in out
        assert f"syncbus status -c {config_path}" in out or \
            f"-m bus.cli status -c {config_path}" in out
        assert "After Ctrl-C the emulators stop" in out
        status = subprocess.run([sys.executable, "-m", "bus.cli", "status", "-c",
                                 str(config_path)], cwd=ROOT, text=True, capture_output=True,
                                timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        conflicts = subprocess.run([sys.executable, "-m", "bus.cli", "tx", "conflicts", "-c",
                                    str(config_path), "--all", "--json"], cwd=ROOT, text=True,
                                   capture_output=True, timeout=60)
        assert {r["winner"] for r in json.loads(conflicts.stdout)} == {"a"}, conflicts.stderr

        # A change made in the hub now reaches Dynamics through the running worker.
        with sqlite3.connect(demo / "hub.db") as db:
            db.execute("UPDATE accounts SET city = 'Graz' WHERE number = 'ACC-000001'")
        config = load_config(config_path).config
        crm = open_connector("demo_crm", config.connections["demo_crm"])
        try:
            wait_for(lambda: (crm.fetch("account", [{"accountnumber": "ACC-000001"}])[0]
                              .values["address1_city"] == "Graz"),
                     timeout=30, interval=0.5, message="the hub's edit to reach Dynamics")
        finally:
            crm.close()
        term.proc.send_signal(signal.SIGINT)  # Ctrl-C
        term.proc.wait(60)
    finally:
        code = term.close()
    assert code == 0, term.output[-3000:]
    assert "stopping: the worker finishes its batches" in term.output


def test_without_rabbitmq_the_demo_says_how_to_get_one(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bus.cli", "demo", "--dir", str(tmp_path / "demo"),
         "--amqp-url", "amqp://guest:s3cret-pw@127.0.0.1:1/"],
        cwd=ROOT, text=True, capture_output=True, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in out
    assert "s3cret-pw" not in out
    assert "docker compose -f docker/compose.yml up -d rabbitmq" in out
    assert "rabbitmq-server" in out
    assert not (tmp_path / "demo").exists()  # nothing was started


def test_the_commands_shown_start_as_syncbus_was_started(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = _venv_script(tmp_path / ".venv" / "bin")
    elsewhere = tmp_path / "other-bin"
    elsewhere.mkdir()
    # After the one-liner: not on the PATH, so the path as typed, and how to activate.
    assert syncbus_command(".venv/bin/syncbus", path=str(elsewhere)) == (
        ".venv/bin/syncbus", "(or run `source .venv/bin/activate` once, then type just "
        "`syncbus`)")
    # Activated (or installed on the PATH): plain syncbus.
    assert syncbus_command(str(script), path=f"{elsewhere}:{script.parent}") == (
        "syncbus", None)
    # Another syncbus on the PATH is not the one running: the running one is named.
    other = elsewhere / "syncbus"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    assert syncbus_command(str(script), path=str(elsewhere))[0] == str(script)
    # python -m bus.cli: this Python, unless a syncbus is on the PATH.
    assert syncbus_command(str(ROOT / "bus" / "cli.py"), executable="/opt/py/bin/python3",
                           path=str(tmp_path)) == ("/opt/py/bin/python3 -m bus.cli", None)
    # A path with a space is quoted for the shell.
    spaced = _venv_script(tmp_path / "my env" / "bin")
    assert syncbus_command(str(spaced), path=str(tmp_path))[0] == f"'{spaced}'"

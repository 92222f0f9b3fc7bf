"""The ``syncbus`` command line as a user runs it: exit codes, messages, no secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.syncenv import ROOT, insert_items, make_env

pytestmark = pytest.mark.integration


def syncbus(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def test_help_teaches_by_example():
    out = syncbus("--help").stdout
    for command in ("validate", "setup", "run", "demo"):
        assert command in out
    assert "--until-idle" in out
    assert "syncbus run --config sync.yaml --until-idle" in syncbus("run", "--help").stdout


def test_validate_reports_located_errors_and_exits_2(tmp_path):
    config = tmp_path / "sync.yaml"
    config.write_text(
        "connections:\n"
        f"  a: {{type: sql, url: 'sqlite:///{tmp_path}/a.db'}}\n"
        "links:\n"
        "  l:\n"
        "    source: {connection: a, entity: t}\n"
        "    target: {connection: zz, entity: t}\n"
        "    key: [id]\n")
    sa.create_engine(f"sqlite:///{tmp_path}/a.db").connect().exec_driver_sql(
        "CREATE TABLE t (id INTEGER PRIMARY KEY)")
    result = syncbus("validate", "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{config}:6: links.l.target.connection: unknown connection 'zz'" in result.stdout


def test_setup_then_run_until_idle_then_setup_again(tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/s.db",
                   target_url=f"sqlite:///{tmp_path}/t.db", amqp_url=amqp_url)
    insert_items(env.source(), range(1, 101))
    cfg = str(env.config_path)

    before = syncbus("run", "--config", cfg, "--until-idle")
    assert before.returncode == 2 and "syncbus setup" in before.stdout  # not prepared yet

    first = syncbus("setup", "--config", cfg)
    assert first.returncode == 0 and "added column _sb_version" in first.stdout
    again = syncbus("setup", "--config", cfg)
    assert again.returncode == 0 and "added column" not in again.stdout

    assert syncbus("validate", "--config", cfg).returncode == 0
    run = syncbus("run", "--config", cfg, "--until-idle", "--log-level", "warning")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "link items: 100 upserted" in run.stdout
    with env.target().connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM items").scalar() == 100


def test_secrets_never_appear_in_output(tmp_path):
    secret = "s3cr3t-Pa55"
    config = tmp_path / "sync.yaml"
    config.write_text(yaml.safe_dump({
        "broker": {"url": f"amqp://guest:{secret}@127.0.0.1:5672/"},
        "connections": {
            "a": {"url": f"sqlite:///{tmp_path}/a.db"},
            "b": {"url": f"postgresql+psycopg://bob:{secret}@127.0.0.1:1/nowhere"},
        },
        "links": {"l": {"source": {"connection": "a", "entity": "t"},
                        "target": {"connection": "b", "entity": "t"}, "key": ["id"]}},
    }))
    sa.create_engine(f"sqlite:///{tmp_path}/a.db").connect().exec_driver_sql(
        "CREATE TABLE t (id INTEGER PRIMARY KEY)")
    for args in (("validate",), ("run", "--until-idle"), ("setup",)):
        result = syncbus(*args, "--config", str(config), "--log-level", "debug")
        assert result.returncode != 0
        text = result.stdout + result.stderr
        if args == ("validate",):  # the unreachable URL is named, masked
            assert "bob:***@127.0.0.1:1/nowhere" in text, text
        assert secret not in text, text


def test_readme_commands_are_the_ones_tested():
    readme = Path(ROOT, "README.md").read_text()
    assert ".venv/bin/syncbus demo" in readme
    assert "bash tests/run" in readme
    assert Path(ROOT, ".ci/run").read_text().strip().endswith('tests/run"')


def test_login_signs_an_operator_in_to_a_dataverse_connection(tmp_path):
    import threading

    from bus.cli import app
    from connectors.dataverse.emulator import DataverseEmulator
    from tests.support import wait_for

    with DataverseEmulator(cert_dir=tmp_path / "certs") as emu:
        connection = emu.connection(client_secret=None, state_dir=str(tmp_path / "state"))
        config = tmp_path / "sync.yaml"
        config.write_text(yaml.safe_dump({"connections": {
            "crm": {"type": "dataverse", **{k: v for k, v in connection.items() if v is not None}},
            "db": {"url": f"sqlite:///{tmp_path}/db.sqlite"}}}))
        assert app.login(config, "db", echo=lambda _l: None) == app.EXIT_CONFIG
        lines: list[str] = []
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(
            app.login(config, "crm", echo=lines.append)))
        thread.start()
        code = wait_for(lambda: emu.entra.pending_device_codes(), timeout=20,
                        message="a pending device code")[0]
        assert any(code in line for line in lines)  # the operator is told the code
        emu.entra.approve_device_code(code)
        thread.join(30)
    assert result == [app.EXIT_OK], lines
    assert "signed in" in lines[-1]

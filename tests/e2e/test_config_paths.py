"""Relative paths in a config file mean "next to the config file", from any directory.

Each test writes a config with relative paths into one directory and runs `syncbus`
from another one: the SQLite files, the default state store, the CA bundle and the
token cache are found (or created) beside the config, and nothing lands in the
working directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from bus.config.load import load_config
from connectors.base import PermanentError
from connectors.business_central.emulator import BusinessCentralEmulator
from connectors.registry import open_connector
from schemas.config import SyncConfig
from tests.support import wait_for
from tests.syncenv import ITEMS_DDL, ROOT, insert_items

pytestmark = pytest.mark.integration


def _syncbus(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    return project, elsewhere


def test_sqlite_files_and_the_default_state_store_are_next_to_the_config(tmp_path, amqp_url):
    project, elsewhere = _dirs(tmp_path)
    for name in ("source", "target"):
        engine = sa.create_engine(f"sqlite:///{project}/{name}.db")
        with engine.begin() as conn:
            conn.exec_driver_sql(ITEMS_DDL["sqlite"])
        engine.dispose()
    insert_items(sa.create_engine(f"sqlite:///{project}/source.db"), range(1, 21))
    (project / "sync.yaml").write_text(yaml.safe_dump({
        "broker": {"url": amqp_url},                      # state: the default
        "connections": {"src": {"type": "sql", "url": "sqlite:///source.db"},
                        "dst": {"type": "sql", "url": "sqlite:///target.db"}},
        "links": {"items": {"source": {"connection": "src", "entity": "items"},
                            "target": {"connection": "dst", "entity": "items"},
                            "key": ["id"], "poll_interval": 0.5}}}))
    config = str(project / "sync.yaml")

    for args in (("validate", "-c", config), ("setup", "-c", config),
                 ("run", "-c", config, "--until-idle", "--log-level", "warning")):
        result = _syncbus(*args, cwd=elsewhere)
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    assert "link items: 20 upserted" in result.stdout

    with sa.create_engine(f"sqlite:///{project}/target.db").connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM items").scalar() == 20
    assert (project / ".syncbus" / "state.db").is_file()
    assert list(elsewhere.iterdir()) == []  # no stray target.db or .syncbus/ here


def test_paths_as_written_and_resolved():
    base = Path("/srv/sync")
    config = SyncConfig.model_validate({
        "state": {"url": "sqlite:///state/s.db?timeout=5"},
        "connections": {
            "a": {"type": "sql", "url": "sqlite:///a.db"},
            "b": {"type": "sql", "url": "sqlite:////var/b.db"},
            "m": {"type": "sql", "url": "sqlite://"},
            "p": {"type": "sql", "url": "postgresql+psycopg://u@db/x"},
            "crm": {"type": "dataverse", "url": "https://o.crm.dynamics.com", "tenant_id": "t",
                    "client_id": "c", "ca_bundle": "certs/ca.pem",
                    "certificate_path": "/run/secrets/app.pem"},
            "erp": {"type": "business_central", "tenant_id": "t", "client_id": "c",
                    "company": "X"}}}).resolve_paths(base)
    conns = config.connections
    assert config.state.url == "sqlite:////srv/sync/state/s.db?timeout=5"
    assert conns["a"].url == "sqlite:////srv/sync/a.db"
    assert (conns["b"].url, conns["m"].url) == ("sqlite:////var/b.db", "sqlite://")
    assert conns["p"].url == "postgresql+psycopg://u@db/x"
    crm, erp = conns["crm"], conns["erp"]
    assert crm.type == "dataverse" and erp.type == "business_central"
    assert crm.ca_bundle == "/srv/sync/certs/ca.pem"
    assert crm.certificate_path == "/run/secrets/app.pem"
    assert crm.state_dir == "/srv/sync/.syncbus/dataverse"
    assert erp.state_dir == "/srv/sync/.syncbus/business-central"
    assert erp.index_url == "sqlite:////srv/sync/.syncbus/bc-erp.db"


def test_business_central_device_code_login_from_another_directory(tmp_path):
    """`syncbus login` for Business Central: real MSAL against the emulator's Entra ID;
    the relative ca_bundle and the token cache are next to the config."""
    project, elsewhere = _dirs(tmp_path)
    with BusinessCentralEmulator(cert_dir=project / "certs", seed=5) as emu:
        connection = {k: v for k, v in emu.connection(client_secret=None).items()
                      if v is not None}
        assert Path(connection["ca_bundle"]).is_relative_to(project)
        connection["ca_bundle"] = str(Path(connection["ca_bundle"]).relative_to(project))
        (project / "sync.yaml").write_text(yaml.safe_dump({"connections": {
            "erp": {"type": "business_central", **connection}}}))
        config = str(project / "sync.yaml")
        loaded = load_config(config).config

        # Before the sign-in, the connector says what to do.
        erp = open_connector("erp", loaded.connections["erp"])
        try:
            with pytest.raises(PermanentError, match="syncbus login -c CONFIG erp"):
                erp.describe(["customers"])
        finally:
            erp.close()

        login = subprocess.Popen(
            [sys.executable, "-m", "bus.cli", "login", "-c", config, "erp"], cwd=elsewhere,
            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(login.stdout or []), daemon=True)
        reader.start()
        try:
            code = wait_for(emu.entra.pending_device_codes, timeout=30,
                            message=lambda: f"a pending device code: {lines}")[0]
            emu.entra.approve_device_code(code, user="operator@contoso.example")
            assert login.wait(30) == 0, lines
        finally:
            if login.poll() is None:
                login.send_signal(signal.SIGTERM)
                login.wait(10)
        reader.join(10)
        out = "".join(lines)
        assert code in out and "/devicelogin" in out  # the operator was told where and what
        cache = project / ".syncbus" / "business-central" / "erp.tokens.json"
        assert f"signed in; tokens kept in {cache}" in out
        assert cache.stat().st_mode & 0o777 == 0o600
        assert list(elsewhere.iterdir()) == []

        # The connector now reads Business Central as the operator.
        erp = open_connector("erp", loaded.connections["erp"])
        try:
            assert [e.name for e in erp.describe(["customers"])] == ["customers"]
        finally:
            erp.close()


def test_login_refuses_a_sql_connection_naming_the_ones_it_signs_in_to(tmp_path):
    config = tmp_path / "sync.yaml"
    config.write_text(yaml.safe_dump({"connections": {
        "db": {"type": "sql", "url": "sqlite:///db.sqlite"},
        "erp": {"type": "business_central", "tenant_id": "t", "client_id": "c",
                "company": "X"}}}))
    result = _syncbus("login", "-c", str(config), "db", cwd=tmp_path)
    assert result.returncode == 2
    assert "'db' is not a Dataverse or Business Central connection" in result.stdout
    assert "(those are: erp)" in result.stdout

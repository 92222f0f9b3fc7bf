"""docker/compose.yml's syncbus services, run here without Docker.

The emulators start with the exact commands of their compose services and are probed
with their compose healthchecks; `syncbus setup` and a worker then run with
docker/sync.yaml and the environment compose gives them. Only the addresses change:
compose service names become 127.0.0.1 (on free ports), the broker and databases
become this test's RabbitMQ vhost and PostgreSQL database, and /var/lib/syncbus a
temporary directory. The hub tables come from docker/postgres/20-hub-tables.sql.
What this cannot cover (the image build, container networking, the RabbitMQ cluster,
HAProxy) is listed in docs/deployment.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bus.cli import app
from tests.support import pick_free_port, wait_for
from tests.syncenv import ROOT
from tests.unit.test_docker_files import (
    DOCKER,
    HEALTHCHECK,
    SYNC_YAML,
    emulator_command,
    emulators,
    service_env,
    services,
)

pytestmark = pytest.mark.integration

IMAGE_HOME = "/var/lib/syncbus"


class Local:
    """Rewrites compose addresses into local ones."""

    def __init__(self, tmp_path: Path, amqp_url: str, pg_url: str) -> None:
        self.home = tmp_path / "var"
        for sub in ("certs", "data"):
            (self.home / sub).mkdir(parents=True)  # as the image creates them
        self.amqp_url, self.pg_url = amqp_url, pg_url
        self.ports: dict[str, int] = {}
        for svc in emulators():
            self.ports[svc] = pick_free_port(avoid=self.ports.values())
        self.metrics_port = pick_free_port(avoid=self.ports.values())

    def text(self, text: str) -> str:
        for svc, port in self.ports.items():
            _, flags = emulator_command(svc)
            text = text.replace(f"https://{svc}:{flags['--port']}", f"https://127.0.0.1:{port}")
        text = text.replace(IMAGE_HOME, str(self.home))
        text = re.sub(r"amqp://\S+@rabbitmq:5672/", self.amqp_url, text)
        text = re.sub(r"postgresql\+psycopg://\S+@postgres:5432/\w+", self.pg_url, text)
        text = text.replace("host: 0.0.0.0", "host: 127.0.0.1")  # compose network → local
        return text.replace("port: 9464", f"port: {self.metrics_port}")

    def command(self, svc: str) -> list[str]:
        words: list[str] = services()[svc]["command"]
        out = [self.text(w) for w in words]
        out[out.index("--host") + 1] = "127.0.0.1"
        out[out.index("--port") + 1] = str(self.ports[svc])
        return out


@pytest.fixture
def local(tmp_path: Path, amqp_url: str, pg_url: str) -> Local:
    return Local(tmp_path, amqp_url, pg_url)


@pytest.fixture
def running_emulators(local: Local, tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[str]]]:
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for svc in emulators():
            log = open(tmp_path / f"{svc}.log", "w")  # noqa: SIM115 - closed with the process
            procs[svc] = subprocess.Popen([sys.executable, "-m", "bus.cli", *local.command(svc)],
                                          cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                          text=True)
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _healthcheck(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _counts(pg_url: str) -> dict[str, int]:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("crm_accounts", "crm_contacts", "erp_customers")}
    finally:
        engine.dispose()


def test_the_compose_services_sync_the_emulators_into_the_hub(
        local: Local, running_emulators: dict[str, Any], tmp_path, pg_url, monkeypatch):
    # Given the emulators as compose runs them, healthy by their compose probes,
    for svc, proc in running_emulators.items():
        probe = [local.text(w) for w in services()[svc]["healthcheck"]["test"][2:]]

        def healthy(probe: list[str] = probe, svc: str = svc, proc: Any = proc) -> bool:
            assert proc.poll() is None, (tmp_path / f"{svc}.log").read_text()
            return _healthcheck(probe).returncode == 0

        wait_for(healthy, timeout=90, interval=0.5, message=f"{svc} healthy")
    # the hub tables of the postgres init script, and the workers' config and environment,
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql((DOCKER / "postgres" / "20-hub-tables.sql").read_text())
    engine.dispose()
    config = tmp_path / "sync.yaml"
    config.write_text(local.text(SYNC_YAML.read_text()))
    for name, value in service_env("worker").items():
        monkeypatch.setenv(name, value)
    lines: list[str] = []
    # When the setup job runs, then a worker,
    assert app.setup(config, echo=lines.append) == app.EXIT_OK, "\n".join(lines)
    stop = threading.Event()
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(
        app.run(config, stop=stop, echo=lines.append)), daemon=True)
    worker.start()
    try:
        # Then the image's HEALTHCHECK (the worker's /healthz) passes,
        def worker_healthy() -> bool:
            assert worker.is_alive(), "\n".join(lines)
            return _healthcheck([], {"SYNCBUS_CONFIG": str(config)}).returncode == 0

        wait_for(worker_healthy, timeout=60, interval=0.5, message="worker /healthz")
        # and every seeded record reaches the hub.
        accounts = int(emulator_command("dataverse")[1]["--seed"])
        customers = int(emulator_command("bc")[1]["--seed"])

        def synced() -> bool:
            counts = _counts(pg_url)
            return (counts["crm_accounts"] == accounts and counts["erp_customers"] == customers
                    and counts["crm_contacts"] >= accounts)

        wait_for(synced, timeout=180, interval=1,
                 message=lambda: f"hub counts {_counts(pg_url)} (log: {lines[-5:]})")
    finally:
        stop.set()
        worker.join(60)
    assert result == [app.EXIT_OK], "\n".join(lines)

"""Building blocks for end-to-end sync tests: configs, tables, comparisons, workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from bus.amqp.integrity import Signer, signer_for
from bus.config.load import load_config
from bus.state.store import StateStore
from bus.worker.worker import Worker

ROOT = Path(__file__).resolve().parents[1]

ITEMS_DDL = {
    "sqlite": """CREATE TABLE items (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER,
        price NUMERIC(12, 2), updated TIMESTAMP)""",
    "postgresql": """CREATE TABLE items (
        id BIGINT PRIMARY KEY, name TEXT NOT NULL, qty INTEGER,
        price NUMERIC(12, 2), updated TIMESTAMP)""",
}


@dataclass
class SyncEnv:
    """One source → target link in files under ``tmp``."""

    config_path: Path
    source_url: str
    target_url: str
    amqp_url: str

    def source(self) -> sa.Engine:
        return sa.create_engine(self.source_url)

    def target(self) -> sa.Engine:
        return sa.create_engine(self.target_url)

    def signer(self) -> Signer:
        """Signs events as this config's workers do (a test publishing its own events)."""
        return config_signer(self.config_path)


@contextmanager
def running(config_path: Path | str) -> Iterator[Worker]:
    """A worker of the config at ``config_path``, running in a thread until the block ends."""
    worker = Worker(load_config(config_path).config)
    worker.open()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(30)
        worker.close()


def config_signer(config_path: Path) -> Signer:
    """The event signer of the config at ``config_path`` (its state store's key)."""
    config = load_config(config_path).config
    state = StateStore(config.state.url)
    try:
        return signer_for(config, state)
    finally:
        state.close()


def make_env(tmp: Path, *, source_url: str, target_url: str, amqp_url: str,
             link: dict[str, Any] | None = None, source_ddl: str | None = None,
             target_ddl: str | None = None) -> SyncEnv:
    """Create the ``items`` tables and write a config linking them."""
    for url, ddl in ((source_url, source_ddl), (target_url, target_ddl)):
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql(ddl or ITEMS_DDL[engine.dialect.name])
        engine.dispose()
    config = {
        "broker": {"url": amqp_url, "prefetch": 2000},
        "state": {"url": f"sqlite:///{tmp}/state.db"},
        "connections": {"src": {"type": "sql", "url": source_url},
                        "dst": {"type": "sql", "url": target_url}},
        "links": {"items": {
            "source": {"connection": "src", "entity": "items"},
            "target": {"connection": "dst", "entity": "items"},
            "key": ["id"],
            "poll_interval": 0.5,
            "retry": {"delays": [0.5, 1, 2], "max_attempts": 5},
            **(link or {}),
        }},
    }
    path = tmp / "sync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return SyncEnv(path, source_url, target_url, amqp_url)


def insert_items(engine: sa.Engine, ids: Iterable[int], *, tag: str = "n") -> None:
    rows = [{"id": i, "name": f"{tag}-{i}", "qty": i % 97, "price": f"{i % 1000}.{i % 100:02d}",
             "updated": None} for i in ids]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (id, name, qty, price, updated) "
                             "VALUES (:id, :name, :qty, :price, :updated)"), rows)


def table_rows(engine: sa.Engine, table: str = "items",
               columns: Sequence[str] = ("id", "name", "qty", "price", "updated")) -> dict:
    """The table as {id: normalized row} for exact comparison across dialects."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {', '.join(columns)} FROM {table}")).all()
    return {r[0]: tuple(_norm(v) for v in r[1:]) for r in rows}


def _norm(value: Any) -> Any:
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return Decimal(str(value)).normalize()
    return value


def syncbus(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start the CLI in a subprocess (its own process group, killable)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bus.cli", *args], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})}, start_new_session=True,
    )


def stop(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    """SIGTERM the process (graceful shutdown) and return its exit code and output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out

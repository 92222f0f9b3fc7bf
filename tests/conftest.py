"""Shared pytest fixtures: real RabbitMQ and PostgreSQL, isolated per test.

Brokers and databases are found in this order, and a test that needs one
*fails* (never skips) with instructions when none can be had:

RabbitMQ (``amqp_base_url``)
    1. ``$SYNCBUS_TEST_AMQP_URL``;
    2. the local service on ``amqp://guest:guest@127.0.0.1:5672/``;
    3. a throw-away ``rabbitmq:3.10-management`` container, if a Docker engine answers.

PostgreSQL (``pg_base_url``)
    1. ``$SYNCBUS_TEST_PG_URL`` (any SQLAlchemy URL; plain ``postgresql://`` is
       switched to the psycopg 3 driver);
    2. the local service, ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``;
    3. a throw-away ``postgres:15`` container, if a Docker engine answers.

Isolation
    ``amqp_url`` gives every test its own vhost, ``amqp_session_url`` one vhost for
    the whole session, ``pg_url`` a fresh database per test, ``rabbit_node`` a whole
    private broker node that the test may stop, start and kill.

Environment variables
    ``SYNCBUS_TEST_AMQP_URL``, ``SYNCBUS_TEST_PG_URL``: use these servers.
    ``SYNCBUS_TEST_RABBITMQ_NODE``: Erlang node name for ``rabbitmqctl -n`` when the
    broker of ``SYNCBUS_TEST_AMQP_URL`` is local but not the default node.
    ``SYNCBUS_TEST_RABBITMQ_SBIN``: directory of the real ``rabbitmq-server`` and
    ``rabbitmqctl`` scripts for ``rabbit_node`` (see ``tests/rabbit_node.py``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from tests.rabbit_node import RabbitNode, RabbitNodeError, sweep_stale_dirs
from tests.support import port_is_open, wait_for

#: Every change event published in the suite is checked against the JSON Schema.
pytest_plugins = ["tests.event_contract"]

__all__ = ["wait_for"]  # re-exported for convenience; prefer `from tests.support import ...`

AMQP_ENV = "SYNCBUS_TEST_AMQP_URL"
PG_ENV = "SYNCBUS_TEST_PG_URL"
RABBIT_NODE_ENV = "SYNCBUS_TEST_RABBITMQ_NODE"

LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
RABBIT_IMAGE = "rabbitmq:3.10-management"
PG_IMAGE = "postgres:15"

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

_AMQP_HOWTO = f"""No RabbitMQ broker for the tests. Provide one of:
  * the local service: `rabbitmq-server -detached` (as root), then check with
    `rabbitmqctl await_startup` -- tests use {LOCAL_AMQP_URL};
  * an existing broker: `export {AMQP_ENV}=amqp://USER:PASS@HOST:PORT/VHOST`;
  * a running Docker engine (`docker info` must succeed): a {RABBIT_IMAGE}
    container is then started automatically.
`tests/run` starts the local service for you."""

_PG_HOWTO = f"""No PostgreSQL server for the tests. Provide one of:
  * the local service: `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`
    (as root) -- tests use {LOCAL_PG_URL};
  * an existing server: `export {PG_ENV}=postgresql+psycopg://USER:PASS@HOST:PORT/DB`
    (the user must be allowed to CREATE DATABASE);
  * a running Docker engine (`docker info` must succeed): a {PG_IMAGE}
    container is then started automatically.
`tests/run` starts the local service for you."""


# --------------------------------------------------------------------------- helpers


def _docker_available() -> bool:
    """True if a Docker engine answers (the client alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(
            ["docker", "info"], capture_output=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def amqp_url_with_vhost(url: str, vhost: str) -> str:
    """Return ``url`` with its vhost replaced by ``vhost`` (percent-encoded, so ``/`` is ``%2F``)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(
        parts._replace(path="/" + urllib.parse.quote(vhost, safe=""))
    )


def _amqp_host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    default_port = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "localhost", parts.port or default_port


def _amqp_user(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).username or "guest")


class VhostAdmin(Protocol):
    """Creates and deletes vhosts on the broker behind :class:`AmqpBroker`."""

    def add_vhost(self, vhost: str, user: str) -> None:
        """Create ``vhost`` and give ``user`` full permissions on it."""

    def delete_vhost(self, vhost: str) -> None:
        """Delete ``vhost`` and everything in it."""


@dataclass(frozen=True)
class _CtlAdmin:
    """Vhost admin through the local ``rabbitmqctl`` (Debian's wrapper re-execs it as
    the ``rabbitmq`` user when run as root, so the Erlang cookie matches)."""

    node: str | None = None

    def _run(self, *args: str) -> None:
        node_args = ["-n", self.node] if self.node else []
        result = subprocess.run(
            ["rabbitmqctl", *node_args, "-q", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )

    def add_vhost(self, vhost: str, user: str) -> None:
        self._run("add_vhost", vhost)
        try:
            self._run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        except Exception:
            self._run("delete_vhost", vhost)
            raise

    def delete_vhost(self, vhost: str) -> None:
        self._run("delete_vhost", vhost)

    @classmethod
    def probe(cls, url: str, node: str | None = None) -> _CtlAdmin | None:
        """Return an admin if ``rabbitmqctl`` works *and* talks to the node behind ``url``.

        The check is ``rabbitmq-diagnostics check_port_listener PORT``: the node the
        CLI reaches must have an AMQP listener on the URL's port.
        """
        host, port = _amqp_host_port(url)
        if host not in _LOOPBACK_HOSTS:
            return None
        if not (shutil.which("rabbitmqctl") and shutil.which("rabbitmq-diagnostics")):
            return None
        node_args = ["-n", node] if node else []
        try:
            result = subprocess.run(
                ["rabbitmq-diagnostics", *node_args, "-q", "check_port_listener", str(port)],
                capture_output=True, timeout=60, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return cls(node) if result.returncode == 0 else None


@dataclass(frozen=True)
class _ContainerAdmin:
    """Vhost admin through ``rabbitmqctl`` inside a testcontainers RabbitMQ container."""

    container: Any

    def _run(self, *args: str) -> None:
        exit_code, output = self.container.exec(["rabbitmqctl", "-q", *args])
        if exit_code != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({exit_code}): {output!r}")

    def add_vhost(self, vhost: str, user: str) -> None:
        self._run("add_vhost", vhost)
        try:
            self._run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        except Exception:
            self._run("delete_vhost", vhost)
            raise

    def delete_vhost(self, vhost: str) -> None:
        self._run("delete_vhost", vhost)


@dataclass
class AmqpBroker:
    """The broker the session uses: its base URL and, if possible, a vhost admin."""

    url: str
    source: str
    admin: VhostAdmin | None = None
    _stop: Callable[[], None] | None = field(default=None, repr=False)

    def new_vhost_url(self) -> tuple[str, str | None]:
        """Create a fresh ``sbtest-<hex>`` vhost; return ``(url, vhost)``.

        Without an admin, return ``(base url, None)``.
        """
        if self.admin is None:
            return self.url, None
        vhost = f"sbtest-{secrets.token_hex(6)}"
        try:
            self.admin.add_vhost(vhost, _amqp_user(self.url))
        except Exception as exc:
            pytest.fail(f"could not create test vhost {vhost!r}: {exc}", pytrace=False)
        return amqp_url_with_vhost(self.url, vhost), vhost

    def drop_vhost(self, vhost: str | None) -> None:
        if vhost is not None and self.admin is not None:
            self.admin.delete_vhost(vhost)


def _start_rabbit_container() -> AmqpBroker:
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:  # testcontainers < 4.10
        from testcontainers.rabbitmq import RabbitMqContainer
    container = RabbitMqContainer(RABBIT_IMAGE)
    container.start()
    params = container.get_connection_params()
    url = f"amqp://{container.username}:{container.password}@{params.host}:{params.port}/"
    return AmqpBroker(url, f"docker {RABBIT_IMAGE}", _ContainerAdmin(container), container.stop)


def _normalise_pg_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` / ``postgres://`` URLs; keep anything explicit."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _pg_connect_error(url: str) -> str | None:
    """Return why ``url`` cannot be used (``None`` if ``SELECT 1`` works)."""
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        engine.dispose()
    return None


# --------------------------------------------------------------------------- RabbitMQ


@pytest.fixture(scope="session")
def amqp_broker() -> Iterator[AmqpBroker]:
    """The session's RabbitMQ broker (see the module docstring for the lookup order).

    Most tests want ``amqp_url`` instead. ``amqp_broker.admin`` is ``None`` when
    vhosts cannot be managed (a remote broker): then ``amqp_url`` falls back to the
    base URL.
    """
    env_url = os.environ.get(AMQP_ENV)
    broker: AmqpBroker
    if env_url:
        if not port_is_open(*_amqp_host_port(env_url), timeout=5):
            pytest.fail(
                f"${AMQP_ENV} points to {_amqp_host_port(env_url)}, which does not accept "
                f"connections.\n\n{_AMQP_HOWTO}",
                pytrace=False,
            )
        node = os.environ.get(RABBIT_NODE_ENV) or None
        broker = AmqpBroker(env_url, f"${AMQP_ENV}", _CtlAdmin.probe(env_url, node))
    elif port_is_open("127.0.0.1", 5672):
        broker = AmqpBroker(LOCAL_AMQP_URL, "local service", _CtlAdmin.probe(LOCAL_AMQP_URL))
    elif _docker_available():
        try:
            broker = _start_rabbit_container()
        except Exception as exc:
            pytest.fail(f"{_AMQP_HOWTO}\n(starting the container failed: {exc})", pytrace=False)
    else:
        pytest.fail(_AMQP_HOWTO, pytrace=False)
    try:
        yield broker
    finally:
        if broker._stop is not None:
            broker._stop()


@pytest.fixture(scope="session")
def amqp_base_url(amqp_broker: AmqpBroker) -> str:
    """AMQP URL of the session's broker, default vhost (or the vhost the env var names).

    Shared by everything: prefer ``amqp_url`` / ``amqp_session_url`` unless a test
    really needs the base vhost.
    """
    return amqp_broker.url


@pytest.fixture
def amqp_url(amqp_broker: AmqpBroker) -> Iterator[str]:
    """AMQP URL (guest/guest on the local broker) of a fresh vhost ``sbtest-<hex>``
    that only this test uses; the vhost and everything in it is deleted afterwards.

    The vhost is percent-encoded in the URL path; ``pika.URLParameters`` and kombu
    both accept it. Costs about 0.5-1 s of ``rabbitmqctl`` calls per test.

    Fallback: if ``rabbitmqctl`` cannot manage the broker (e.g. a remote broker from
    ``$SYNCBUS_TEST_AMQP_URL`` without ``$SYNCBUS_TEST_RABBITMQ_NODE``), this is the
    base URL and tests are *not* isolated -- use unique queue/exchange names anyway.
    """
    url, vhost = amqp_broker.new_vhost_url()
    try:
        yield url
    finally:
        amqp_broker.drop_vhost(vhost)


@pytest.fixture(scope="session")
def amqp_session_url(amqp_broker: AmqpBroker) -> Iterator[str]:
    """Like ``amqp_url`` but one vhost for the whole session: cheap, yet shared
    between tests, so use unique names for queues and exchanges."""
    url, vhost = amqp_broker.new_vhost_url()
    try:
        yield url
    finally:
        amqp_broker.drop_vhost(vhost)


@pytest.fixture
def rabbit_node() -> Iterator[RabbitNode]:
    """A private, started RabbitMQ node (``tests/rabbit_node.py``) this test may
    ``stop()``, ``start()`` and ``kill()``; ``.url`` is its AMQP URL (guest/guest,
    default vhost). Starting takes ~4 s. It is always killed and its directory
    removed afterwards. Needs the rabbitmq-server package and root (or running
    as the broker's own OS user)."""
    sweep_stale_dirs()
    try:
        node = RabbitNode()
    except RabbitNodeError as exc:
        pytest.fail(f"cannot create a private RabbitMQ node: {exc}", pytrace=False)
    try:
        try:
            node.start()
        except RabbitNodeError as exc:
            pytest.fail(f"cannot start a private RabbitMQ node: {exc}", pytrace=False)
        yield node
    finally:
        node.cleanup()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_base_url() -> Iterator[str]:
    """SQLAlchemy URL (``postgresql+psycopg://``) of the session's PostgreSQL server,
    pointing at its maintenance database. Prefer ``pg_url`` in tests."""
    env_url = os.environ.get(PG_ENV)
    stop: Callable[[], None] | None = None
    if env_url:
        url = _normalise_pg_url(env_url)
        error = _pg_connect_error(url)
        if error:
            pytest.fail(f"${PG_ENV} is not usable: {error}\n\n{_PG_HOWTO}", pytrace=False)
    elif port_is_open("127.0.0.1", 5432):
        url = LOCAL_PG_URL
        error = _pg_connect_error(url)
        if error:
            pytest.fail(f"local PostgreSQL refused {url}: {error}\n\n{_PG_HOWTO}", pytrace=False)
    elif _docker_available():
        try:
            try:
                from testcontainers.community.postgres import PostgresContainer
            except ImportError:  # testcontainers < 4.10
                from testcontainers.postgres import PostgresContainer
            container = PostgresContainer(PG_IMAGE, driver="psycopg")
            container.start()
        except Exception as exc:
            pytest.fail(f"{_PG_HOWTO}\n(starting the container failed: {exc})", pytrace=False)
        url, stop = container.get_connection_url(), container.stop
    else:
        pytest.fail(_PG_HOWTO, pytrace=False)
    try:
        yield url
    finally:
        if stop is not None:
            stop()


@pytest.fixture(scope="session")
def pg_admin_engine(pg_base_url: str) -> Iterator[sa.Engine]:
    """Autocommit engine on the maintenance database (for CREATE/DROP DATABASE)."""
    engine = sa.create_engine(pg_base_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def pg_url(pg_base_url: str, pg_admin_engine: sa.Engine) -> Iterator[str]:
    """SQLAlchemy URL (``postgresql+psycopg://``, password included) of a fresh,
    empty database ``sbtest_<hex>`` for this test only. Dropped afterwards with
    ``DROP DATABASE ... WITH (FORCE)``, which also ends leftover connections."""
    name = f"sbtest_{secrets.token_hex(6)}"
    with pg_admin_engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url: URL = make_url(pg_base_url).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with pg_admin_engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --------------------------------------------------------------------------- misc


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Callable[[str], str]:
    """Factory ``make_sqlite_url(name) -> "sqlite:///<tmp_path>/<name>.db"``
    (an absolute path, so four slashes in total); files vanish with ``tmp_path``."""

    def make_sqlite_url(name: str) -> str:
        return f"sqlite:///{tmp_path / name}.db"

    return make_sqlite_url

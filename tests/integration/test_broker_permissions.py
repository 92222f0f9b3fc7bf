"""The least-privilege RabbitMQ users of docs/operations.md, run against the real broker.

The ``rabbitmqctl`` commands are read from the documentation itself (vhost and user
names replaced by this test's), so the page and this test cannot drift apart. Users
are created for the test and deleted afterwards; the vhost is the test's own.
"""

from __future__ import annotations

import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import amqp
import pytest
import sqlalchemy as sa
import yaml
from amqp.exceptions import AccessRefused

from bus.amqp.errors import BrokerUnavailable
from bus.amqp.subscribe import Subscriber
from bus.amqp.topology import CHANGES_EXCHANGE
from bus.cli import app
from bus.config.validate import check_broker
from schemas.event import ChangeEvent
from tests.conftest import AmqpBroker
from tests.support import skip_or_fail_in_ci, wait_for
from tests.syncenv import ROOT

pytestmark = pytest.mark.integration

#: The names the documented commands use, and what they stand for.
DOC_VHOST = "prod"
DOC_USERS = ("syncbus", "billing", "auditor")


def documented_commands() -> list[list[str]]:
    """The ``rabbitmqctl`` command lines of the least-privilege section, as argv lists."""
    text = Path(ROOT, "docs/operations.md").read_text()
    section = text.split("## RabbitMQ users with least privilege", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "the section shows its commands in a ```sh block"
    commands = [shlex.split(line) for line in block.group(1).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert all(c[0] == "rabbitmqctl" for c in commands)
    return commands


class Users:
    """Test users named after the documented ones, with awkward passwords."""

    def __init__(self, broker: AmqpBroker, vhost: str) -> None:
        assert broker.admin is not None
        self.admin: Any = broker.admin
        self.vhost = vhost
        self.base = urlsplit(broker.url)
        tag = secrets.token_hex(4)
        self.names = {user: f"sbtest-{tag}-{user}" for user in DOC_USERS}
        # characters that must be percent-encoded in a URL: they work when encoded
        self.passwords = {user: f"Pw@{secrets.token_hex(4)}/#?%:{user}" for user in DOC_USERS}
        self.created: list[str] = []

    def run_documented(self, commands: list[list[str]]) -> None:
        for argv in commands:
            args = argv[1:]
            if args[0] == "add_vhost":
                continue  # the test's vhost exists
            if args[0] == "add_user":
                user = args[1]
                self.admin._run("add_user", self.names[user], self.passwords[user])
                self.created.append(self.names[user])
                continue
            args = [self.vhost if a == DOC_VHOST else self.names.get(a, a) for a in args]
            self.admin._run(*args)

    def url(self, user: str) -> str:
        netloc = (f"{quote(self.names[user], safe='')}:{quote(self.passwords[user], safe='')}"
                  f"@{self.base.hostname}:{self.base.port or 5672}")
        return f"amqp://{netloc}/{quote(self.vhost, safe='')}"

    def delete(self) -> None:
        for name in self.created:
            self.admin._run("delete_user", name)


@pytest.fixture
def users(amqp_broker: AmqpBroker, amqp_url: str) -> Iterator[Users]:
    if amqp_broker.admin is None:
        skip_or_fail_in_ci("creating RabbitMQ users needs rabbitmqctl for the test broker "
                           "(apt-get install rabbitmq-server; see tests/conftest.py)")
    made = Users(amqp_broker, unquote(urlsplit(amqp_url).path[1:]))
    try:
        yield made
    finally:
        made.delete()


def write_config(tmp_path: Path, amqp_url: str) -> Path:
    """crm.customers → erp.customers, SQLite on both sides."""
    for name in ("crm", "erp"):
        engine = sa.create_engine(f"sqlite:///{tmp_path}/{name}.db")
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        engine.dispose()
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump({
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "connections": {"crm": {"type": "sql", "url": f"sqlite:///{tmp_path}/crm.db"},
                        "erp": {"type": "sql", "url": f"sqlite:///{tmp_path}/erp.db"}},
        "links": {"customers": {"source": {"connection": "crm", "entity": "customers"},
                                "target": {"connection": "erp", "entity": "customers"},
                                "key": ["id"], "poll_interval": 0.5}},
    }, sort_keys=False))
    return path


def insert(tmp_path: Path, ids: range) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/crm.db")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO customers (id, name) VALUES (:id, :name)"),
                     [{"id": i, "name": f"c{i}"} for i in ids])
    engine.dispose()


def refused(url: str, action: str) -> str:
    """What RabbitMQ says when ``url``'s user tries ``action`` ('' when allowed)."""
    parts = urlsplit(url)
    conn = amqp.Connection(f"{parts.hostname}:{parts.port}", userid=unquote(parts.username or ""),
                           password=unquote(parts.password or ""),
                           virtual_host=unquote(parts.path[1:]))
    conn.connect()
    try:
        channel = conn.channel()
        if action == "publish to syncbus.changes":
            channel.tx_select()
            channel.basic_publish(amqp.Message(b"{}"), exchange=CHANGES_EXCHANGE,
                                  routing_key="crm.customers.upsert")
            channel.tx_rollback()
        elif action.startswith("bind "):
            channel.queue_bind("billing.customers", CHANGES_EXCHANGE, action.split()[1])
        elif action.startswith("read "):
            channel.basic_get(action.split()[1])
        elif action.startswith("delete exchange "):
            channel.exchange_delete(action.split()[2])
        return ""
    except AccessRefused as exc:
        return str(exc)
    finally:
        conn.collect()


def test_the_documented_least_privilege_users_do_their_jobs_and_nothing_more(tmp_path, users):
    users.run_documented(documented_commands())
    config = write_config(tmp_path, users.url("syncbus"))
    out: list[str] = []
    assert app.setup(config, echo=out.append) == app.EXIT_OK, out

    # the worker's user passes every broker check of validate, and syncs
    assert app.validate(config, echo=out.append) == app.EXIT_OK, out
    assert [line for line in out if line.startswith("broker  ")] == [
        line for line in out if line.startswith("broker  OK")], out
    assert app.run(config, until_idle=True, max_wait=60, echo=out.append) == app.EXIT_OK, out

    # the subscriber's user: its own queue, the bound events, nothing else
    received: list[ChangeEvent] = []
    with Subscriber(["crm.customers.*"], received.append, queue="billing.customers",
                    url=users.url("billing")):
        insert(tmp_path, range(1, 21))
        assert app.run(config, until_idle=True, max_wait=60, echo=out.append) == app.EXIT_OK, out
        wait_for(lambda: len(received) >= 20, timeout=30, message="20 events at the subscriber")
    assert sorted(e.data.key["id"] for e in received) == list(range(1, 21))
    billing = users.url("billing")
    assert "access to exchange 'syncbus.changes'" in refused(billing, "publish to syncbus.changes")
    assert "ACCESS_REFUSED" in refused(billing, "bind #")
    assert refused(billing, "bind crm.customers.upsert") == ""
    assert "ACCESS_REFUSED" in refused(billing, "read syncbus.link.customers.a2b")
    assert "ACCESS_REFUSED" in refused(billing, "read syncbus.dead")
    assert "ACCESS_REFUSED" in refused(billing, "delete exchange syncbus.changes")

    # the auditor reads the history stream and nothing else
    auditor = users.url("auditor")
    tail = subprocess.run(
        [sys.executable, "-m", "bus.cli", "tail", "crm.#", "--from", "first", "--limit", "5",
         "--idle", "10", "--amqp-url", auditor], cwd=ROOT, text=True, capture_output=True,
        timeout=120)
    assert tail.returncode == 0, tail.stderr
    assert len(tail.stdout.splitlines()) == 5 and "crm.customers.upsert" in tail.stdout
    for action in ("publish to syncbus.changes", "read syncbus.dead",
                   "delete exchange syncbus.changes"):
        assert "ACCESS_REFUSED" in refused(auditor, action), action

    # only the worker may publish change events: validate says so for the others
    for user in ("billing", "auditor"):
        checks = {c.what.split(" (")[0]: c for c in check_broker(users.url(user))}
        publish = checks["publish to syncbus.changes"]
        assert "ACCESS_REFUSED on Basic.publish: write permission" in publish.problem, publish


def test_a_worker_without_permissions_is_told_which_one_it_lacks(tmp_path, users, amqp_broker):
    users.run_documented(documented_commands())
    config = write_config(tmp_path, users.url("auditor"))  # read-only: cannot run a worker
    out: list[str] = []
    assert app.setup(config, echo=out.append) == app.EXIT_OK, out
    assert app.validate(config, echo=out.append) == app.EXIT_BROKER
    problems = [line for line in out if line.startswith("broker  PROBLEM")]
    assert len(problems) == 3, out  # connects, but may neither declare, read nor publish
    assert "ACCESS_REFUSED on Queue.declare: configure permission" in problems[0]
    assert f"user '{users.names['auditor']}'" in problems[0]
    assert out[-1].endswith("but RabbitMQ cannot be used as configured (see the broker lines above)")
    with pytest.raises(BrokerUnavailable) as caught:
        app.run(config, until_idle=True, max_wait=10, echo=out.append)
    assert caught.value.reason == "permission"
    assert "(ACCESS_REFUSED on Exchange.declare: configure permission)" in caught.value.message
    assert users.passwords["auditor"] not in caught.value.message


def test_validate_checks_publishing_without_sending_anything(amqp_url):
    parts = urlsplit(amqp_url)
    vhost = unquote(parts.path[1:])
    conn = amqp.Connection(f"{parts.hostname}:{parts.port}", userid="guest", password="guest",
                           virtual_host=vhost)
    conn.connect()
    try:
        channel = conn.channel()
        channel.exchange_declare(CHANGES_EXCHANGE, "topic", durable=True, auto_delete=False)
        channel.queue_declare("everything", durable=True, auto_delete=False)
        channel.queue_bind("everything", CHANGES_EXCHANGE, "#")
        checks = check_broker(amqp_url)
        assert [c.ok for c in checks] == [True] * 4, [c.line() for c in checks]
        assert channel.queue_declare("everything", passive=True).message_count == 0
    finally:
        conn.collect()
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail_in_ci("the checks above passed; listing the vhost's queues needs "
                           "rabbitmqctl (apt-get install rabbitmq-server)")
    # The exclusive queue of the check (a random name) went with its connection.
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert "syncbus.validate" not in listed and "everything" in listed


def test_a_vhost_that_does_not_exist_yet_is_not_a_missing_exchange(amqp_url):
    checks = check_broker(amqp_url)  # a fresh vhost: syncbus.changes is not declared yet
    assert all(c.ok for c in checks), [c.line() for c in checks]
    assert "syncbus.changes does not exist yet; the first `syncbus run` declares it" in \
        checks[-1].what

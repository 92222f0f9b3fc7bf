"""The edges of the command line as an operator meets them: RabbitMQ unreachable, a
refused login, a missing vhost, a password that needs percent-encoding, an inline
secret. Each is one line with a documented exit code, and no output ever holds a
fragment of a password.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import sqlalchemy as sa
import yaml

from tests.support import pick_free_port
from tests.syncenv import ROOT

pytestmark = pytest.mark.integration

EXIT_CONFIG = 2
EXIT_BROKER = 4
#: Passwords whose every 4-character piece is unlikely to occur in any output.
NASTY = "Qz7@Wk#9/Xv?Jm%q"


def syncbus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, env={**os.environ, **(env or {})})


def leaks(secret: str, text: str) -> list[str]:
    """Every piece of 4 or more characters of ``secret`` that ``text`` contains."""
    pieces = {secret[i:i + 4] for i in range(len(secret) - 3)}
    return sorted(p for p in pieces if p in text) + ([secret] if secret in text else [])


def write_config(tmp_path: Path, broker_url: str, **extra: object) -> Path:
    for name in ("a", "b"):
        engine = sa.create_engine(f"sqlite:///{tmp_path}/{name}.db")
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, name TEXT)")
        engine.dispose()
    config = {
        "broker": {"url": broker_url},
        "state": {"url": f"sqlite:///{tmp_path}/state.db"},
        "connections": {"a": {"type": "sql", "url": f"sqlite:///{tmp_path}/a.db"},
                        "b": {"type": "sql", "url": f"sqlite:///{tmp_path}/b.db"}},
        "links": {"l": {"source": {"connection": "a", "entity": "t"},
                        "target": {"connection": "b", "entity": "t"}, "key": ["id"]}},
        **extra,
    }
    path = tmp_path / "sync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"guest:{quote(password, safe='')}@{host}"))


def broker_commands(config: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """The commands that talk to RabbitMQ, each run once (``setup`` prepares the source)."""
    assert syncbus("setup", "-c", str(config)).returncode == 0
    return {" ".join(args): syncbus(*args, "-c", str(config)) for args in (
        ("run", "--until-idle", "--max-wait", "5"), ("status", "--no-probe"), ("tx", "list"),
        ("tx", "stats"), ("tail", "--idle", "1"))}


def assert_one_line(results: dict[str, subprocess.CompletedProcess[str]], line: str,
                    shown: str) -> None:
    """Exit code 4, ``line`` last on stderr, no traceback; ``status`` reports it in its
    problems (after the URL ``shown``, so without it); ``tx`` commands list the index
    and warn with ``line``."""
    in_report = line.removeprefix("syncbus: ").replace(f" at {shown}", "")
    for command, result in results.items():
        out = result.stdout + result.stderr
        assert "Traceback" not in out, f"syncbus {command}: {out}"
        if command.startswith("tx"):
            # The transaction log is read from the index in the state store: it is
            # shown, with why the dead-letter log could not be swept first.
            assert result.returncode == 0, f"syncbus {command}: {out}"
            assert (f"the dead-letter log was not read ({line.removeprefix('syncbus: ')})"
                    in " ".join(result.stderr.split())), f"syncbus {command}: {out}"
            continue
        assert result.returncode == EXIT_BROKER, f"syncbus {command}: {out}"
        if command.startswith("status"):
            assert f"broker not usable: {shown}: {in_report}" in " ".join(out.split()), out
        else:
            assert result.stderr.strip().splitlines()[-1] == line, f"syncbus {command}: {out}"


def test_an_unreachable_broker_is_one_line_with_exit_code_4(tmp_path):
    port = pick_free_port()
    config = write_config(tmp_path, f"amqp://guest:guest@127.0.0.1:{port}/")
    shown = f"amqp://guest:***@127.0.0.1:{port}/"
    line = f"syncbus: cannot reach RabbitMQ at {shown} (connection refused); is it running?"
    assert_one_line(broker_commands(config), line, shown)
    result = syncbus("validate", "-c", str(config))
    assert result.returncode == EXIT_BROKER, result.stdout
    assert (f"broker  PROBLEM  connect to amqp://guest:***@127.0.0.1:{port}/ as user 'guest', "
            "vhost '/': cannot reach RabbitMQ (connection refused); is it running?") in result.stdout
    assert "broker  skipped  publish to syncbus.changes" in result.stdout


def test_a_refused_login_names_the_user_and_shows_no_part_of_the_password(tmp_path, amqp_url):
    vhost = urlsplit(amqp_url).path[1:]
    config = write_config(tmp_path, with_password(amqp_url, NASTY))
    shown = f"amqp://guest:***@{urlsplit(amqp_url).netloc.rpartition('@')[2]}/{vhost}"
    results = broker_commands(config)
    results["validate"] = syncbus("validate", "-c", str(config), "--log-level", "debug")
    results["run --log-level debug"] = syncbus("run", "--until-idle", "-c", str(config),
                                               "--log-level", "debug")
    line = (f"syncbus: RabbitMQ at {shown} refused the login of user 'guest' on vhost "
            f"'{vhost}' (ACCESS_REFUSED): check the user name and password in broker.url")
    assert_one_line({k: v for k, v in results.items() if k in (
        "run --until-idle --max-wait 5", "status --no-probe", "tx list", "tail --idle 1")},
        line, shown)
    assert "refused the login of user 'guest'" in results["validate"].stdout
    debug = results["run --log-level debug"]
    assert debug.returncode == EXIT_BROKER and "Traceback" in debug.stderr  # only with debug
    assert debug.stderr.strip().splitlines()[-1] == line
    for command, result in results.items():
        for secret in (NASTY, quote(NASTY, safe="")):
            assert not leaks(secret, result.stdout + result.stderr), command


def test_a_missing_vhost_says_how_to_create_it(tmp_path, amqp_url):
    vhost = f"sbtest-missing-{secrets.token_hex(4)}"
    url = urlunsplit(urlsplit(amqp_url)._replace(path=f"/{vhost}"))
    config = write_config(tmp_path, url)
    shown = f"amqp://guest:***@{urlsplit(amqp_url).netloc.rpartition('@')[2]}/{vhost}"
    results = broker_commands(config)
    line = (f"syncbus: vhost '{vhost}' does not exist on the broker at {shown}: create it with "
            f"rabbitmqctl add_vhost {vhost}")
    assert_one_line(results, line, shown)
    result = syncbus("validate", "-c", str(config))
    assert result.returncode == EXIT_BROKER
    assert f"vhost '{vhost}' does not exist on the broker: create it with rabbitmqctl" in result.stdout


@pytest.mark.parametrize("where", ["inline", "env", "file", "state", "connection"])
def test_a_password_that_needs_encoding_is_refused_before_anything_connects(tmp_path, where):
    env = {"BROKER_PW": NASTY}
    (tmp_path / "pw").write_text(NASTY + "\n")
    broker = {"inline": f"amqp://relpw:{NASTY}@127.0.0.1:5672/vhost",
              "env": "amqp://relpw:${BROKER_PW}@127.0.0.1:5672/vhost",
              "file": "amqp://relpw:${file:pw}@127.0.0.1:5672/vhost"}.get(
        where, "amqp://guest:guest@127.0.0.1:5672/")
    extra: dict[str, object] = {}
    config = write_config(tmp_path, broker)
    if where in ("state", "connection"):
        data = yaml.safe_load(config.read_text())
        pg = f"postgresql+psycopg://sync:{NASTY}@127.0.0.1:5432/erp"
        if where == "state":
            data["state"]["url"] = pg
        else:
            data["connections"]["b"]["url"] = pg
        config.write_text(yaml.safe_dump({**data, **extra}, sort_keys=False))
    key = {"state": "state.url", "connection": "connections.b.url"}.get(where, "broker.url")
    line_no = next(i for i, text in enumerate(config.read_text().splitlines(), 1)
                   if ("relpw" in text or "sync:" in text))
    commands = [("validate",), ("run", "--until-idle"), ("status",), ("tx", "list")]
    for args in commands if where == "inline" else commands[:1]:
        result = syncbus(*args, "-c", str(config), env=env)
        out = result.stdout + result.stderr
        assert result.returncode == EXIT_CONFIG, f"syncbus {' '.join(args)}: {out}"
        assert f"{config}:{line_no}: {key}: the user name or password must be percent-encoded: " \
               "@ → %40, / → %2F, # → %23, ? → %3F, % → %25" in " ".join(out.split()), out
        if where in ("env", "file"):
            ref = "${BROKER_PW}" if where == "env" else "${file:pw}"
            assert f"the URL is built from {ref}: write it percent-encoded there" in out
        assert not leaks(NASTY, out), (args, out)
        assert "Traceback" not in out


def test_validate_warns_about_an_inline_password_and_checks_the_broker(tmp_path, amqp_url):
    config = write_config(tmp_path, amqp_url)
    assert syncbus("setup", "-c", str(config)).returncode == 0
    result = syncbus("validate", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"warning: {config}:2: broker.url: a password was written inline in the URL: write "
            "${BROKER_PASSWORD} instead and set that environment variable where syncbus runs "
            "(or use ${file:/run/secrets/...})") in result.stdout
    assert "broker  OK       publish to syncbus.changes (write permission; rolled back, " \
           "nothing is sent)" in result.stdout
    assert f"{config}: OK — 2 connections, 1 link" in result.stdout
    assert not leaks("guest", result.stdout.replace("'guest'", "").replace("guest:***", ""))

    config.write_text(config.read_text().replace("guest:guest@", "guest:${RABBIT_PW}@"))
    referenced = syncbus("validate", "-c", str(config), env={"RABBIT_PW": "guest"})
    assert referenced.returncode == 0, referenced.stdout
    assert "warning" not in referenced.stdout


def test_a_broker_url_on_the_command_line_that_needs_encoding_is_refused():
    secret = "p@ss#S3cr3t/x"
    result = syncbus("tail", "--idle", "1",
                     env={"SYNCBUS_AMQP_URL": f"amqp://relpw:{secret}@127.0.0.1:5672/"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: --amqp-url (or $SYNCBUS_AMQP_URL): the user name "
                                    "or password must be percent-encoded")
    assert leaks(secret, result.stdout + result.stderr) == []

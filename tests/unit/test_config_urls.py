"""A URL whose user name or password needs percent-encoding is refused while the config
is loaded — located, with the fix, and without any piece of the password."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bus.config.load import load_config
from connectors.base import ConfigError

SECRET = "Qz7@Wk#9/Xv?Jm"

BASE = """\
broker:
  url: "amqp://relpw:{broker}@127.0.0.1:5672/vhost"
state:
  url: "{state}"
connections:
  crm: {{type: sql, url: "{crm}"}}
  dv:
    type: dataverse
    url: "{dv}"
    tenant_id: t
    client_id: c
    client_secret: ${{DV_SECRET:-x}}
"""


def write(tmp_path: Path, broker: str = "guest", state: str = "sqlite:///state.db",
          crm: str = "sqlite:///crm.db", dv: str = "https://contoso.crm4.dynamics.com") -> Path:
    path = tmp_path / "sync.yaml"
    path.write_text(textwrap.dedent(BASE.format(broker=broker, state=state, crm=crm, dv=dv)))
    return path


def problems(path: Path, **environ: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    return caught.value.problems


def assert_secret_hidden(lines: list[str], secret: str = SECRET) -> None:
    text = "\n".join(lines)
    assert not [secret[i:i + 4] for i in range(len(secret) - 3) if secret[i:i + 4] in text], text


def test_an_inline_broker_password_that_needs_encoding(tmp_path):
    path = write(tmp_path, broker=SECRET)
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:2: broker.url: the user name or password must be "
                              "percent-encoded: @ → %40, / → %2F, # → %23, ? → %3F, % → %25")
    assert problem.endswith("; better, keep it out of the file: ${VAR} or ${file:…}, "
                            "percent-encoded")
    assert_secret_hidden([problem])


@pytest.mark.parametrize("reference", ["${RABBIT_PW}", "${file:pw.txt}"])
def test_a_referenced_password_that_needs_encoding_names_the_reference(tmp_path, reference):
    (tmp_path / "pw.txt").write_text(SECRET + "\n")
    path = write(tmp_path, broker=reference)
    (problem,) = problems(path, RABBIT_PW=SECRET)
    assert f"{path}:2: broker.url: the user name or password must be percent-encoded" in problem
    assert problem.endswith(f"; the URL is built from {reference}: write it percent-encoded there")
    assert_secret_hidden([problem])


def test_sql_and_https_urls_are_checked_too(tmp_path):
    path = write(tmp_path, state=f"postgresql+psycopg://sync:{SECRET}@db/state",
                 crm="postgresql+psycopg://sync:p@ss@db/crm", dv=f"https://u:{SECRET}@contoso.com")
    found = problems(path)
    assert [p.split(": ", 2)[:2] for p in found] == [
        [f"{path}:4", "state.url"], [f"{path}:6", "connections.crm.url"],
        [f"{path}:9", "connections.dv.url"]]
    assert "connections.crm.url: the password must be percent-encoded" in found[1]
    assert_secret_hidden(found)
    assert_secret_hidden(found, "p@ss@db")


def test_encoded_passwords_and_at_signs_in_file_paths_are_fine(tmp_path):
    path = write(tmp_path, broker="Qz7%40Wk%239%2FXv%3FJm", state="sqlite:///data@2/state.db",
                 crm="postgresql+psycopg://sync:${CRM_PW}@db/crm")
    loaded = load_config(path, environ={"CRM_PW": "pa%40ss"})
    assert loaded.config.broker.url.endswith("Qz7%40Wk%239%2FXv%3FJm@127.0.0.1:5672/vhost")


def test_an_unset_variable_is_the_only_problem_of_its_url(tmp_path):
    (problem,) = problems(write(tmp_path, broker="${RABBIT_PW}"))
    assert problem.endswith("broker.url: environment variable RABBIT_PW is not set (write "
                            "${RABBIT_PW:-default} to give a default)")

"""``syncbus config export|import``: canonical, round-tripping, and never writing a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bus.cli.main import cli
from bus.config.io import EXPORT_HEADER, export_config, import_config
from bus.config.load import load_config
from connectors.base import ConfigError
from schemas.config import SyncConfig

ENV = {"ERP_PASSWORD": "erp-Pa55word-from-env", "RABBIT_PASSWORD": "rabbit-from-env"}

SOURCE = """\
# a comment that is not kept
x-defaults: &defaults
  poll_interval: 30s
  retry: {delays: [1s, 5s, 2m], offline_window: 24h}
broker:
  url: amqp://sync:${RABBIT_PASSWORD}@rabbit:5672/
  prefetch: 2000            # the default: left out
state:
  url: sqlite:///.syncbus/state.db
connections:
  erp: {type: sql, url: "postgresql+psycopg://sync:${ERP_PASSWORD}@db/erp"}
  crm: {url: "sqlite:///crm.db"}
  dv:
    type: dataverse
    url: https://contoso.crm4.dynamics.com
    tenant_id: contoso.onmicrosoft.com
    client_id: 11111111-2222-3333-4444-555555555555
    client_secret: ${file:dv_secret.txt}
links:
  customers:
    <<: *defaults
    source: {connection: crm, entity: customers}
    target: {connection: erp, entity: clients}
    key: id
    fields:
      client_id: id
      plain: {from: plain}
      name: {from: name, transform: [strip, upper]}
      country: {from: country, default: SK}
      origin: {const: crm}
      cleared: {const: null}
      status: {from: status, map: {A: active, I: inactive}, unmapped: keep}
      credit: {from: credit_limit, transform: [{round: 2}]}
    alert: {errors: 3, minutes: 10}
  accounts:
    source: {connection: dv, entity: account}
    target: {connection: erp, entity: accounts}
    key: [accountid]
    enabled: false
"""


@pytest.fixture(autouse=True)
def _logging_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands point structlog at the stderr of the moment, which CliRunner closes."""
    monkeypatch.setattr("bus.cli.meta.configure_logging", lambda *_args: None)


def _meaning(config: SyncConfig) -> dict[str, Any]:
    """The config as data, field shorthands expanded (`x` and `{from: x}` mean the same)."""
    data = config.model_dump()
    for name, link in config.links.items():
        data["links"][name]["fields"] = {t: s.model_dump()
                                         for t, s in (link.field_specs() or {}).items()}
    return data


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return ENV


@pytest.fixture
def source(tmp_path: Path, env: dict[str, str]) -> Path:
    (tmp_path / "dv_secret.txt").write_text("dataverse-secret-from-file\n")
    path = tmp_path / "sync.yaml"
    path.write_text(SOURCE)
    return path


def test_export_is_canonical_and_short(source: Path):
    text = export_config(source).text
    assert text.startswith(EXPORT_HEADER)
    data = yaml.safe_load(text)
    assert list(data) == ["broker", "connections", "links"]  # state and prefetch are defaults
    assert data["broker"] == {"url": "amqp://sync:${RABBIT_PASSWORD}@rabbit:5672/"}
    assert list(data["connections"]["dv"])[0] == "type"
    customers = data["links"]["customers"]
    assert customers["key"] == ["id"]
    assert customers["poll_interval"] == "30s"
    assert customers["retry"] == {"delays": ["1s", "5s", "2m"]}  # offline_window 24h: default
    assert customers["fields"]["plain"] == "plain"                  # {from: x} → shorthand
    assert customers["fields"]["cleared"] == {"const": None}       # const null is a value
    assert "  source: {connection: crm, entity: customers}\n" in text
    assert "      name: {from: name, transform: [strip, upper]}\n" in text
    assert data["links"]["accounts"]["enabled"] is False
    assert "a comment" not in text and "x-defaults" not in text


def test_the_export_means_the_same_config(source: Path, tmp_path: Path):
    out = tmp_path / "exported.yaml"
    out.write_text(export_config(source).text)
    assert _meaning(load_config(out).config) == _meaning(load_config(source).config)


def test_export_import_export_is_byte_identical(source: Path, tmp_path: Path):
    first = export_config(source).text
    exported = tmp_path / "exported.yaml"
    exported.write_text(first)
    target = tmp_path / "imported.yaml"
    done = import_config(exported, target)
    assert done.written and done.backup is None
    assert target.read_bytes() == first.encode()
    assert export_config(target).text == first
    again = import_config(exported, target)
    assert not again.changed and not again.written


def test_secrets_stay_references(source: Path):
    text = export_config(source).text
    assert "${ERP_PASSWORD}" in text and "${RABBIT_PASSWORD}" in text
    assert "${file:dv_secret.txt}" in text
    for value in (*ENV.values(), "dataverse-secret-from-file"):
        assert value not in text


def test_an_inline_secret_becomes_a_reference_with_a_warning(tmp_path: Path, env: dict[str, str]):
    path = tmp_path / "sync.yaml"
    path.write_text(SOURCE.replace("${ERP_PASSWORD}", "Inline-Pw-123")
                    .replace("${file:dv_secret.txt}", "Inline-Client-Secret-456")
                    .replace("sqlite:///crm.db", "postgresql://crm@db/crm?password=Query-Pw-789"))
    exported = export_config(path)
    for secret in ("Inline-Pw-123", "Inline-Client-Secret-456", "Query-Pw-789"):
        assert secret not in exported.text
        assert not any(secret in w for w in exported.warnings)
    data = yaml.safe_load(exported.text)["connections"]
    assert data["erp"]["url"] == "postgresql+psycopg://sync:${ERP_PASSWORD}@db/erp"
    assert data["dv"]["client_secret"] == "${DV_CLIENT_SECRET}"
    assert data["crm"]["url"] == "postgresql://crm@db/crm?password=${CRM_PASSWORD}"
    assert len(exported.warnings) == 3
    assert any("connections.erp.url" in w and "ERP_PASSWORD" in w for w in exported.warnings)
    assert any("DV_CLIENT_SECRET" in w and "connections.dv.client_secret" in w
               for w in exported.warnings)
    # The variables named in the warnings bring the same configuration back.
    out = tmp_path / "exported.yaml"
    out.write_text(exported.text)
    secrets = {"ERP_PASSWORD": "Inline-Pw-123", "DV_CLIENT_SECRET": "Inline-Client-Secret-456",
               "CRM_PASSWORD": "Query-Pw-789", "RABBIT_PASSWORD": env["RABBIT_PASSWORD"]}
    assert _meaning(load_config(out, environ=secrets).config) == _meaning(load_config(path).config)


def test_the_same_inline_secret_twice_shares_one_variable(tmp_path: Path, env: dict[str, str]):
    path = tmp_path / "sync.yaml"
    path.write_text("connections:\n"
                    "  a: {url: 'postgresql://u:same-pw@db/a'}\n"
                    "  b: {url: 'postgresql://u:other-pw@db/b'}\n")
    text = export_config(path).text
    assert "${A_PASSWORD}" in text and "${B_PASSWORD}" in text
    assert "same-pw" not in text and "other-pw" not in text


def test_import_validates_before_writing(tmp_path: Path, source: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SOURCE.replace("key: id", "key: []"))
    target = tmp_path / "target.yaml"
    target.write_text("unchanged\n")
    with pytest.raises(ConfigError) as info:
        import_config(bad, target)
    assert any("links.customers.key" in p for p in info.value.problems)
    assert target.read_text() == "unchanged\n"


def test_import_runs_the_live_check_and_writes_nothing_when_it_fails(tmp_path: Path, source: Path):
    target = tmp_path / "target.yaml"
    with pytest.raises(ConfigError) as info:
        import_config(source, target, live=lambda loaded: [loaded.problem(("links",), "no!")])
    assert info.value.problems and not target.exists()


def test_import_over_another_config_needs_replace_and_keeps_a_backup(tmp_path: Path, source: Path):
    target = tmp_path / "target.yaml"
    target.write_text("connections: {old: {url: 'sqlite:///old.db'}}\n")
    with pytest.raises(ConfigError, match="--replace"):
        import_config(source, target)
    dry = import_config(source, target, dry_run=True)
    assert dry.changed and not dry.written and "+  customers:" in dry.diff
    assert "old.db" in target.read_text()
    done = import_config(source, target, replace=True)
    assert done.backup is not None and "old.db" in done.backup.read_text()
    assert target.read_text() == export_config(source).text


def test_cli_export_prints_yaml_and_warns_on_stderr(tmp_path: Path, env: dict[str, str]):
    path = tmp_path / "sync.yaml"
    path.write_text("connections:\n  erp: {url: 'postgresql://u:Inline-Pw@db/a'}\n")
    result = CliRunner().invoke(cli, ["config", "export", "-c", str(path)])
    assert result.exit_code == 0
    assert result.stdout == export_config(path).text
    assert "warning: connections.erp.url" in result.stderr and "ERP_PASSWORD" in result.stderr
    assert "Inline-Pw" not in result.stdout + result.stderr


def test_cli_import_offline_and_again(tmp_path: Path, source: Path):
    target = tmp_path / "target.yaml"
    runner = CliRunner()
    first = runner.invoke(cli, ["config", "import", str(source), "-c", str(target), "--offline"])
    assert first.exit_code == 0, first.output
    assert f"wrote {target}" in first.output
    second = runner.invoke(cli, ["config", "import", str(source), "-c", str(target), "--offline"])
    assert second.exit_code == 0 and "already up to date" in second.output


def test_cli_export_of_an_invalid_config_exits_2(tmp_path: Path):
    path = tmp_path / "sync.yaml"
    path.write_text("connections: {}\n")
    result = CliRunner().invoke(cli, ["config", "export", "-c", str(path)])
    assert result.exit_code == 2 and "connections" in result.output


def test_values_that_only_quote_a_url_are_left_alone(source: Path):
    path = source
    path.write_text(SOURCE.replace(
        "    key: id\n",
        "    key: id\n    filter: 'websiteurl != \"https://u:pw@x/?token=abc\"'\n"))
    exported = export_config(path)
    assert exported.warnings == []
    assert yaml.safe_load(exported.text)["links"]["customers"]["filter"] == (
        'websiteurl != "https://u:pw@x/?token=abc"')

"""Every documented config error: its message, and the line it points at.

Checks needing the live systems get their metadata from ``EntityInfo`` objects built
here, through a fake ``describe``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from bus.config.load import LoadedConfig, load_config
from bus.config.validate import check_urls, validate_config
from connectors.base import ConfigError, ConnectorUnavailable, EntityInfo, FieldInfo

BASE = """\
broker:
  url: amqp://guest:guest@127.0.0.1:5672/
connections:
  crm: {type: sql, url: "sqlite:///crm.db"}
  erp: {type: sql, url: "sqlite:///erp.db"}
links:
  customers:
    source: {connection: crm, entity: customers}
    target: {connection: erp, entity: clients}
    key: [id]
    fields:
      client_id: id
      name: {from: name, transform: [strip]}
      status: {from: status, map: {A: active, I: inactive}}
      code: {from: code}
"""

ENTITIES = {
    "crm": {"customers": EntityInfo(
        "customers",
        (FieldInfo("id", "integer", nullable=False, key=True), FieldInfo("name", "string"),
         FieldInfo("status", "string"), FieldInfo("code", "string")),
        key=("id",))},
    "erp": {"clients": EntityInfo(
        "clients",
        (FieldInfo("client_id", "integer", nullable=False, key=True),
         FieldInfo("code", "string", nullable=False), FieldInfo("name", "string"),
         FieldInfo("status", "string")),
        key=("client_id",), unique_keys=(("code",),))},
}


def describe(connection: str) -> Mapping[str, EntityInfo]:
    return ENTITIES[connection]


def write(tmp_path: Path, text: str, name: str = "sync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def line(text: str, needle: str) -> int:
    """1-based line of the first line of ``text`` containing ``needle``."""
    return next(i for i, ln in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in ln)


def load_problems(path: Path, **environ: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert caught.value.problems, "a ConfigError always lists its problems"
    return caught.value.problems


def live_problems(tmp_path: Path, text: str, **environ: str) -> list[str]:
    return validate_config(load_config(write(tmp_path, text), environ=environ), describe)


# -- loading --------------------------------------------------------------------------------


def test_the_example_config_is_valid(tmp_path):
    loaded = load_config(write(tmp_path, BASE))
    assert isinstance(loaded, LoadedConfig)
    assert loaded.config.links["customers"].key == ["id"]
    assert validate_config(loaded, describe) == []


def test_line_of_finds_keys_and_falls_back_to_the_nearest_parent(tmp_path):
    loaded = load_config(write(tmp_path, BASE))
    assert loaded.line_of(("links", "customers", "fields", "name")) == line(BASE, "name: {from")
    assert loaded.line_of(("links", "customers", "fields", "name", "transform", 0)) == line(
        BASE, "name: {from")
    assert loaded.line_of(("links", "customers", "retry", "delays")) == line(BASE, "customers:")
    assert loaded.line_of(("links", "customers", "key", 0)) == line(BASE, "key: [id]")


def test_a_yaml_syntax_error_names_line_and_column(tmp_path):
    text = BASE.replace("key: [id]", "key: [id")
    (problem,) = load_problems(write(tmp_path, text))
    assert problem.startswith(f"{tmp_path / 'sync.yaml'}:")
    assert "YAML syntax error" in problem
    where = problem.split(": YAML")[0].rsplit(":", 2)
    assert int(where[1]) >= line(text, "key: [id") and int(where[2]) >= 1


def test_an_unknown_top_level_key_is_named_with_a_suggestion(tmp_path):
    text = BASE + "linkz: {}\n"
    (problem,) = load_problems(write(tmp_path, text))
    assert problem == (f"{tmp_path / 'sync.yaml'}:{line(text, 'linkz')}: linkz: unknown field "
                       "'linkz' (did you mean 'links'? allowed: broker, state, connections, links, "
                       "metrics)")


def test_an_unknown_field_in_a_field_spec(tmp_path):
    text = BASE.replace("code: {from: code}", "code: {fromm: code}")
    (problem,) = load_problems(write(tmp_path, text))
    assert f":{line(text, 'fromm')}: links.customers.fields.code.fromm: unknown field 'fromm' " \
           "(did you mean 'from'?" in problem


def test_a_missing_required_field_points_at_its_parent(tmp_path):
    text = BASE.replace("    key: [id]\n", "")
    (problem,) = load_problems(write(tmp_path, text))
    assert problem.endswith(f":{line(text, 'customers:')}: links.customers.key: "
                            "required field is missing")


def test_a_broker_url_that_is_not_amqp(tmp_path):
    text = BASE.replace("amqp://guest:guest@", "http://guest:guest@")
    (problem,) = load_problems(write(tmp_path, text))
    assert f":{line(text, 'url: http')}: broker.url: must be an AMQP URL" in problem
    assert "guest:guest" not in problem


def test_a_broker_url_that_does_not_parse(tmp_path):
    text = BASE.replace("127.0.0.1:5672", "127.0.0.1:56x2")
    (problem,) = check_urls(load_config(write(tmp_path, text)))
    assert f":{line(text, 'url: amqp')}: broker.url: cannot parse the AMQP URL: the port " \
           "is not a number" in problem


def test_an_unsupported_database(tmp_path):
    text = BASE.replace("sqlite:///erp.db", "mysql://erp@db/erp")
    (problem,) = check_urls(load_config(write(tmp_path, text)))
    assert f":{line(text, 'mysql')}: connections.erp.url: unsupported database 'mysql' " \
           "(supported: postgresql, sqlite" in problem


def test_a_sql_url_that_does_not_parse(tmp_path):
    text = BASE.replace("sqlite:///erp.db", "erp.db")
    (problem,) = check_urls(load_config(write(tmp_path, text)))
    assert f":{line(text, 'erp.db')}: connections.erp.url: is not a SQLAlchemy URL" in problem


def test_an_unknown_connection_type(tmp_path):
    text = BASE.replace("erp: {type: sql", "erp: {type: soap")
    (problem,) = load_problems(write(tmp_path, text))
    assert problem.endswith(f":{line(text, 'type: soap')}: connections.erp.type: "
                            "unknown connection type 'soap' (known: sql, dataverse, business_central)")


def test_an_unknown_transform_gets_a_suggestion(tmp_path):
    text = BASE.replace("transform: [strip]", "transform: [strp]")
    (problem,) = load_problems(write(tmp_path, text))
    assert f":{line(text, 'strp')}: links.customers.fields.name.transform[0]: unknown " \
           "transform 'strp' (did you mean 'strip'?" in problem


def test_a_duplicate_key(tmp_path):
    text = BASE.replace("      code: {from: code}\n", "      code: {from: code}\n      name: code\n")
    (problem,) = load_problems(write(tmp_path, text))
    assert problem.endswith(f":{line(text, 'name: code')}: links.customers.fields.name: duplicate "
                            f"key 'name' (first at line {line(text, 'name: {from')}); remove one "
                            "of them")


def test_problems_come_in_file_order_and_all_at_once(tmp_path):
    text = BASE.replace("key: [id]", "key: []").replace("prefetch", "").replace(
        "url: amqp://guest:guest@127.0.0.1:5672/", "url: amqp://h/\n  prefetch: lots")
    problems = load_problems(write(tmp_path, text))
    assert [p.split(": ", 2)[1] for p in problems] == ["broker.prefetch", "links.customers.key"]
    assert problems[0].endswith("must be a whole number (got 'lots')")
    assert problems[1].endswith("must not be empty")


def test_shorthands_one_key_name_and_number_map_keys(tmp_path):
    text = BASE.replace("key: [id]", "key: id").replace("{A: active, I: inactive}", "{1: one, 2.0: two}")
    link = load_config(write(tmp_path, text)).config.links["customers"]
    specs = link.field_specs()
    assert link.key == ["id"]
    assert specs is not None and specs["status"].map == {"1": "one", "2": "two"}


def test_top_level_x_keys_are_ignored_and_hold_anchors(tmp_path):
    text = "x-defaults: &defaults {poll_interval: 2}\n" + BASE.replace(
        "    key: [id]\n", "    key: [id]\n    <<: *defaults\n    page_size: lots\n")
    (problem,) = load_problems(write(tmp_path, text))
    assert problem.endswith(f":{line(text, 'lots')}: links.customers.page_size: must be a whole "
                            "number (got 'lots')")
    fixed = load_config(write(tmp_path, text.replace("    page_size: lots\n", ""))).config
    assert fixed.links["customers"].poll_interval == 2


def test_an_unreadable_config_file(tmp_path):
    (problem,) = load_problems(tmp_path / "nope.yaml")
    assert problem == f"{tmp_path / 'nope.yaml'}: cannot read the config file: No such file or directory"


# -- interpolation and secrets ------------------------------------------------------------


def test_environment_variables_and_defaults_are_interpolated(tmp_path):
    text = BASE.replace("guest:guest@127.0.0.1", "${RABBIT_USER}:${RABBIT_PASSWORD}@${RABBIT_HOST:-rabbit}")
    loaded = load_config(write(tmp_path, text), environ={"RABBIT_USER": "sync",
                                                         "RABBIT_PASSWORD": "pw"})
    assert loaded.config.broker.url == "amqp://sync:pw@rabbit:5672/"


def test_a_missing_environment_variable_is_named_with_its_line(tmp_path):
    text = BASE.replace("guest:guest", "sync:${RABBIT_PASSWORD}")
    (problem,) = load_problems(write(tmp_path, text))
    assert problem.endswith(f":{line(text, 'RABBIT_PASSWORD')}: broker.url: environment variable "
                            "RABBIT_PASSWORD is not set (write ${RABBIT_PASSWORD:-default} to give a "
                            "default)")


def test_a_secret_file_is_interpolated_stripped(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "erp_pw").write_text("s3cr3t-pw\n")
    absolute = tmp_path / "secrets" / "erp_pw"
    text = BASE.replace("sqlite:///erp.db", "postgresql+psycopg://sync:${file:secrets/erp_pw}@db/erp"
                        ).replace("guest:guest", f"guest:${{file:{absolute}}}")
    cfg = load_config(write(tmp_path, text)).config
    assert cfg.connections["erp"].url == "postgresql+psycopg://sync:s3cr3t-pw@db/erp"
    assert cfg.broker.url == "amqp://guest:s3cr3t-pw@127.0.0.1:5672/"


def test_a_missing_secret_file(tmp_path):
    text = BASE.replace("guest:guest", "guest:${file:/run/secrets/nope}")
    (problem,) = load_problems(write(tmp_path, text))
    assert problem.endswith(f":{line(text, 'nope')}: broker.url: cannot read secret file "
                            "/run/secrets/nope: No such file or directory")


def test_a_literal_dollar_brace_is_written_twice(tmp_path):
    text = BASE.replace("code: {from: code}", "code: {const: \"$${not_a_var}\"}")
    cfg = load_config(write(tmp_path, text)).config
    specs = cfg.links["customers"].field_specs()
    assert specs is not None and specs["code"].const == "${not_a_var}"


def test_secret_values_never_appear_in_messages(tmp_path):
    (tmp_path / "pw").write_text("Sup3rSecret\n")
    bad_scheme = BASE.replace("amqp://guest:guest@", "http://guest:${file:pw}@").replace(
        "sqlite:///erp.db", "${ERP_URL}").replace("name: {from: name", "name: {from: \"${COL}\"")
    environ = {"ERP_URL": "mysql://u:An0therSecret@db/x", "COL": "Th1rdSecret"}
    problems = load_problems(write(tmp_path, bad_scheme), **environ)
    problems += check_urls(load_config(write(tmp_path, BASE.replace(
        "sqlite:///erp.db", "${ERP_URL}"), "b.yaml"), environ=environ))
    problems += live_problems(tmp_path, BASE.replace("name: {from: name", "name: {from: \"${COL}\""),
                              COL="Th1rdSecret")

    def failing(connection: str) -> Mapping[str, EntityInfo]:
        raise ConnectorUnavailable("connection to postgresql+psycopg://sync:Sup3rSecret@db failed")

    loaded = load_config(write(tmp_path, BASE.replace("guest:guest", "guest:${file:pw}"), "c.yaml"))
    problems += validate_config(loaded, failing)
    assert len(problems) >= 4
    for secret in ("Sup3rSecret", "An0therSecret", "Th1rdSecret"):
        assert not [p for p in problems if secret in p], secret


# -- checks against the live metadata -----------------------------------------------------


def test_an_unknown_connection_in_a_link(tmp_path):
    text = BASE.replace("connection: crm,", "connection: crmm,")
    (problem,) = live_problems(tmp_path, text)
    assert problem.endswith(f":{line(text, 'crmm')}: links.customers.source.connection: unknown "
                            "connection 'crmm' (did you mean 'crm'? known: crm, erp)")


def test_an_unknown_entity(tmp_path):
    text = BASE.replace("entity: customers", "entity: custommers")
    (problem,) = live_problems(tmp_path, text)
    assert problem.endswith(f":{line(text, 'custommers')}: links.customers.source.entity: entity "
                            "'custommers' not found in connection 'crm' (did you mean 'customers'?)")


def test_an_unknown_source_field(tmp_path):
    text = BASE.replace("{from: name,", "{from: nmae,")
    (problem,) = live_problems(tmp_path, text)
    assert problem.endswith(f":{line(text, 'nmae')}: links.customers.fields.name.from: source "
                            "field 'nmae' is not a field of crm.customers (did you mean 'name'?)")


def test_an_unknown_target_field(tmp_path):
    text = BASE.replace("status: {from: status", "state: {from: status")
    (problem,) = live_problems(tmp_path, text)
    assert problem.endswith(f":{line(text, 'state:')}: links.customers.fields.state: target "
                            "field 'state' is not a field of erp.clients (did you mean 'status'?)")


def test_a_key_field_that_is_not_in_the_source(tmp_path):
    text = BASE.replace("key: [id]", "key: [idd]")
    (problem,) = live_problems(tmp_path, text)
    assert problem.endswith(f":{line(text, 'key: [idd]')}: links.customers.key[0]: key field "
                            "'idd' is not a field of crm.customers (did you mean 'id'?)")


def test_an_unmapped_key(tmp_path):
    text = BASE.replace("      client_id: id\n", "")
    (problem,) = live_problems(tmp_path, text)
    assert f":{line(text, 'key: [id]')}: links.customers.key[0]: key field 'id' is not mapped " \
           "to any target field" in problem


def test_a_target_key_that_is_not_unique(tmp_path):
    text = BASE.replace("client_id: id", "legacy_id: id")
    clients = ENTITIES["erp"]["clients"]
    widened = EntityInfo(clients.name, (*clients.fields, FieldInfo("legacy_id", "integer")),
                         clients.key, clients.unique_keys)
    loaded = load_config(write(tmp_path, text))
    (problem,) = validate_config(loaded, lambda c: {"clients": widened} if c == "erp"
                                 else ENTITIES[c])
    assert problem.endswith(
        f":{line(text, 'key: [id]')}: links.customers.key: the key maps to (legacy_id) in "
        "erp.clients, which is not unique there: upserts need the primary key (client_id) or a "
        "unique key [(code)]; map the key to one of them or add a unique constraint on (legacy_id)")


def test_a_required_target_field_without_a_mapping(tmp_path):
    text = BASE.replace("      code: {from: code}\n", "")
    (problem,) = live_problems(tmp_path, text)
    assert problem.endswith(f":{line(text, 'fields:')}: links.customers.fields: target field "
                            "'code' of erp.clients is required (NOT NULL) but nothing maps to it")


def test_identity_mapping_needs_the_key_in_the_target(tmp_path):
    text = BASE.split("    fields:")[0]
    problems = live_problems(tmp_path, text)
    assert any(p.endswith("links.customers.key[0]: key field 'id' has no same-named field in "
                          "erp.clients: records could not be matched; map it, e.g. "
                          "`fields: {<target key column>: id}`") for p in problems)


def test_an_unreachable_connection_is_one_problem_and_its_checks_are_skipped(tmp_path):
    def describe_down(connection: str) -> Mapping[str, EntityInfo]:
        if connection == "erp":
            raise ConnectorUnavailable("could not connect to postgresql://sync:pw123@db/erp")
        return ENTITIES[connection]

    text = BASE.replace("sqlite:///erp.db", "postgresql+psycopg://sync:pw123@db/erp")
    problems = validate_config(load_config(write(tmp_path, text)), describe_down)
    assert problems == [
        f"{tmp_path / 'sync.yaml'}:{line(text, 'erp: {')}: connections.erp.url: cannot read the "
        "metadata of postgresql+psycopg://sync:***@db/erp: could not connect to "
        "postgresql://sync:***@db/erp"]


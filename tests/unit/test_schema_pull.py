"""The documented type mapping of ``schema pull`` is the one the code uses."""

from __future__ import annotations

import re

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from bus.ops.schema_pull import link_config, table_creator
from connectors.base import ConfigError, EntityInfo, FieldInfo
from connectors.business_central.metadata import _PORTABLE as BC_TYPES
from connectors.dataverse import DataverseConnector
from connectors.dataverse.metadata import _PORTABLE as DATAVERSE_TYPES
from connectors.sql import SqlConnector
from connectors.sql.coerce import PORTABLE_TYPES
from connectors.sql.ddl import _index_name, column_type
from tests.syncenv import ROOT

DIALECTS = {"postgresql": postgresql.dialect(), "sqlite": sqlite.dialect()}


def _mapping_table() -> dict[str, list[str]]:
    """Portable type → the cells of its row in docs/metadata.md's type mapping table."""
    text = (ROOT / "docs" / "metadata.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.split("### Type mapping", 1)[1].splitlines():
        match = re.match(r"^\| `(\w+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [c.strip().strip("`") for c in match.group(2).split("|")]
    return rows


def _names(cell: str) -> set[str]:
    return {n.strip() for n in cell.split(",") if n.strip()}


def test_every_portable_type_has_a_row():
    assert list(_mapping_table()) == list(PORTABLE_TYPES)


@pytest.mark.parametrize("kind", PORTABLE_TYPES)
def test_the_documented_sql_types_are_the_created_ones(kind: str):
    *_, pg, lite = _mapping_table()[kind]
    assert column_type("postgresql", kind).compile(dialect=DIALECTS["postgresql"]) == pg
    assert column_type("sqlite", kind).compile(dialect=DIALECTS["sqlite"]) == lite


def test_the_documented_source_types_are_the_connectors_ones():
    table = _mapping_table()
    documented_dv = {t: kind for kind, row in table.items() for t in _names(row[0])}
    documented_bc = {t: kind for kind, row in table.items() for t in _names(row[1])}
    assert documented_dv == {t: k for t, k in DATAVERSE_TYPES.items() if t != "EntityName"}
    assert documented_bc == BC_TYPES


def test_one_link_per_entity_with_a_key_and_a_valid_name():
    entities = [
        EntityInfo("account", (FieldInfo("accountid", "uuid", key=True), FieldInfo("name", "string")),
                   ("accountid",)),
        EntityInfo("log", (FieldInfo("text", "string"),), ()),
        EntityInfo("2fa", (FieldInfo("id", "integer", key=True),), ("id",)),
    ]
    links, skipped = link_config("crm", "wh", entities)
    assert list(links) == ["account"]
    assert links["account"].source.entity == links["account"].target.entity == "account"
    assert links["account"].key == ["accountid"]
    assert links["account"].fields == {"accountid": "accountid", "name": "name"}
    assert skipped == {"log": "it has no key to match records by",
                       "2fa": "its name is not a valid config name (a letter, then letters, "
                              "digits, '_' and '-')"}


def test_index_names_fit_postgresql():
    long = _index_name("ux", "a" * 60, ["b" * 30, "c" * 30])
    assert len(long) == 63 and long != _index_name("ux", "a" * 60, ["b" * 30, "d" * 30])
    assert _index_name("ix", "account", ["primarycontactid"]) == "ix_account_primarycontactid"


def test_only_a_connector_that_declares_table_creation_is_a_target(tmp_path):
    lite = SqlConnector("wh", f"sqlite:///{tmp_path}/wh.db")
    crm = DataverseConnector("crm", url="https://crm.example", tenant_id="t", client_id="c",
                             client_secret="s", state_dir=str(tmp_path))
    try:
        assert table_creator(lite) is lite
        with pytest.raises(ConfigError, match="connection 'crm' cannot create tables"):
            table_creator(crm)
    finally:
        lite.close()
        crm.close()

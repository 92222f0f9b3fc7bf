"""The config file's JSON Schema: current, valid draft-07, and agreeing with the loader."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from pydantic import ValidationError

from schemas.config import SyncConfig
from schemas.config_schema import SCHEMA_FILE, json_schema, render
from tests.syncenv import ROOT

_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def _validator() -> Draft7Validator:
    return Draft7Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))


def _pydantic_accepts(data: Any) -> bool:
    try:
        SyncConfig.model_validate({k: v for k, v in data.items() if not k.startswith("x-")})
    except ValidationError:
        return False
    return True


def _doc_configs() -> list[tuple[str, dict[str, Any]]]:
    """Every YAML example in the docs that is a whole config file (has `connections`)."""
    found = []
    for path in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        for number, match in enumerate(_BLOCK.finditer(path.read_text(encoding="utf-8"))):
            try:
                data = yaml.safe_load(match.group(1))
            except yaml.YAMLError:
                continue
            if isinstance(data, dict) and "connections" in data:
                found.append((f"{path.name}#{number}", data))
    return found


def test_the_checked_in_schema_is_the_one_generated_from_the_models():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == render(), (
        f"{SCHEMA_FILE.name} is out of date: run `python -m schemas.config_schema --write-schema`")


def test_check_command_agrees():
    result = subprocess.run([sys.executable, "-m", "schemas.config_schema", "--check"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_the_schema_is_valid_draft_07():
    Draft7Validator.check_schema(json_schema())
    assert json_schema()["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize(("where", "config"), _doc_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_example_config_in_the_docs_validates(where: str, config: dict[str, Any]):
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in _validator().iter_errors(config)]
    assert errors == [], where
    assert _pydantic_accepts(config), where


def test_the_docs_hold_whole_config_examples():
    assert len(_doc_configs()) >= 3  # configuration.md, dataverse.md, business-central.md, README


_BASE = {"connections": {"crm": {"url": "sqlite:///crm.db"}, "erp": {"type": "sql", "url": "x"}}}
_LINK = {"source": {"connection": "crm", "entity": "a"}, "target": {"connection": "erp", "entity": "b"},
         "key": ["id"]}


def _with_link(**changes: Any) -> dict[str, Any]:
    return {**_BASE, "links": {"customers": {**_LINK, **changes}}}


@pytest.mark.parametrize(("config", "accepted"), [
    (_with_link(), True),
    (_with_link(key="id"), True),                                    # one name, not a list
    (_with_link(poll_interval="30s", retry={"delays": ["1s", 5, "2m"]}), True),
    (_with_link(fields={"name": {"from": "name", "transform": ["strip", {"round": 2}]}}), True),
    ({**_with_link(), "x-defaults": {"poll_interval": 1}}, True),      # anchors' home
    ({**_BASE, "broker": {"history_max_age": "7d"}}, True),
    (_with_link(poll_interval="soon"), False),
    (_with_link(key=[]), False),
    (_with_link(fields={"name": {"from": "name", "transform": ["strp"]}}), False),
    (_with_link(fields={"name": {"form": "name"}}), False),
    (_with_link(batch_size=0), False),
    ({**_with_link(), "linkz": {}}, False),
    ({"connections": {"crm": {"url": "https://x", "tenant_id": "t", "client_id": "c"}}}, False),
    ({"connections": {"crm": {"type": "dataverse", "url": "https://x", "tenant_id": "t",
                              "client_id": "c", "client_secret": "${S}"}}}, True),
    ({"connections": {"crm": {"type": "soap", "url": "x"}}}, False),
    ({"connections": {}}, False),
    ({"connections": {"all crm": {"url": "x"}}}, False),
])
def test_the_schema_accepts_what_the_loader_accepts(config: dict[str, Any], accepted: bool):
    assert _validator().is_valid(config) is accepted
    assert _pydantic_accepts(config) is accepted


def test_the_schema_documents_the_fields():
    link = json_schema()["$defs"]["LinkConfig"]["properties"]
    assert "description" in link["key"] and "description" in link["fields"]


def test_the_schema_file_is_shipped_with_the_package():
    assert SCHEMA_FILE.parent == Path(ROOT / "schemas")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"*.json"' in pyproject

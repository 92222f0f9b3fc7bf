"""The JSON Schema of the config file, generated from :class:`schemas.config.SyncConfig`.

Editors use it to complete and check a config while it is written (VS Code with
the YAML extension: a first line ``# yaml-language-server: $schema=<path or URL>``;
see ``docs/configuration.md``). It is checked in as ``schemas/config.v1.json``;
regenerate it after changing the models::

    python -m schemas.config_schema --write-schema     # rewrite the checked-in schema
    python -m schemas.config_schema --check            # exit 1 when it is out of date

The schema accepts what the loader accepts, not only what pydantic's own schema
says: durations as numbers or ``30s``/``15m``/``24h``/``7d`` text, a link ``key``
as one name or a list, top-level ``x-`` keys (YAML anchors), and a connection
without ``type`` only as ``sql`` (Dataverse and Business Central connections must
say their type). It is written in draft-07, which every editor's schema support
reads. Like the models it checks shape only: ``syncbus validate`` also checks
URLs and the live systems, and a ``${VAR}`` reference in a number field is valid
for syncbus but flagged by an editor.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from schemas.config import SyncConfig, parse_duration

__all__ = [
    "CONFIG_SCHEMA_ID",
    "CONFIG_SCHEMA_VERSION",
    "DURATION_PATTERN",
    "SCHEMA_FILE",
    "json_schema",
    "render",
]

#: Major version of the config file format (the schema file is ``config.v<major>.json``).
CONFIG_SCHEMA_VERSION = "1"
#: The ``$id`` of the schema.
CONFIG_SCHEMA_ID = f"https://syncbus.dev/schemas/config/{CONFIG_SCHEMA_VERSION}"
#: The checked-in JSON Schema.
SCHEMA_FILE = Path(__file__).with_name(f"config.v{CONFIG_SCHEMA_VERSION}.json")

#: A duration written with a unit, as ``schemas.config.parse_duration`` reads it.
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"
# Connection types that must be named: a connection without `type` is `sql`.
_TYPED_CONNECTIONS = ("DataverseConnection", "BusinessCentralConnection")


class _ConfigSchema(GenerateJsonSchema):
    """Pydantic's generator, widened where a before-validator accepts more input."""

    def function_before_schema(
        self, schema: core_schema.BeforeValidatorFunctionSchema
    ) -> JsonSchemaValue:
        inner = super().function_before_schema(schema)
        function = schema["function"]["function"]
        if function is parse_duration:
            return {"anyOf": [inner, {"type": "string", "pattern": DURATION_PATTERN,
                                      "description": "seconds, or with a unit: 500ms, 30s, "
                                                     "15m, 24h, 7d"}]}
        if getattr(function, "__name__", "") == "_one_or_many":  # LinkConfig.key: one or a list
            return {"anyOf": [inner.get("items", {"type": "string"}), inner]}
        return inner


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft-07) of the config file, as checked in."""
    schema = _named_keys(SyncConfig.model_json_schema(schema_generator=_ConfigSchema))
    schema["patternProperties"] = {"^x-": {"description": "Ignored: a place for YAML anchors."}}
    for name in _TYPED_CONNECTIONS:
        required = schema["$defs"][name].setdefault("required", [])
        if "type" not in required:
            required.insert(0, "type")
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": CONFIG_SCHEMA_ID,
        **schema,
        "title": "syncbus configuration",
    }


def _named_keys(schema: Any) -> Any:
    """Maps keyed by names (connections, links): the name rule applies to every key.

    Pydantic writes them as ``patternProperties``, which leaves a key that does not
    match the pattern unchecked; ``propertyNames`` rejects it, as the loader does.
    """
    if isinstance(schema, list):
        return [_named_keys(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _named_keys(value) for key, value in schema.items()}
    patterns = out.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in out:
        (pattern, value), = patterns.items()
        del out["patternProperties"]
        out["propertyNames"] = {**out.get("propertyNames", {}), "pattern": pattern}
        out["additionalProperties"] = value
    return out


def render() -> str:
    """The schema file's text: indented JSON ending in a newline."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m schemas.config_schema [--write-schema | --check]``."""
    parser = argparse.ArgumentParser(
        prog="python -m schemas.config_schema",
        description="Print, check or rewrite the checked-in JSON Schema of the config file.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write-schema", action="store_true", help=f"rewrite {SCHEMA_FILE.name}")
    action.add_argument("--check", action="store_true",
                        help="exit 1 when the checked-in schema differs from the models")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = SCHEMA_FILE.read_text(encoding="utf-8") if SCHEMA_FILE.exists() else None
        if current != text:
            print(f"{SCHEMA_FILE} is out of date: run python -m schemas.config_schema "
                  "--write-schema")
            return 1
        return 0
    if not args.write_schema:
        sys.stdout.write(text)
        return 0
    SCHEMA_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())

"""Connector registry: a connection type name → its connector class, imported lazily."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from connectors.base import ConfigError, Connector

__all__ = ["CONNECTORS", "open_connector"]

#: Connection ``type`` → "module:Class". Imported only when a config uses it.
CONNECTORS: dict[str, str] = {
    "sql": "connectors.sql:SqlConnector",
    "dataverse": "connectors.dataverse:DataverseConnector",
    "business_central": "connectors.business_central:BusinessCentralConnector",
}


def open_connector(name: str, config: Any) -> Connector:
    """Create the connector for connection ``name`` from its config model.

    Raises:
        ConfigError: the connection type is unknown.
    """
    kind = config.type
    target = CONNECTORS.get(kind)
    if target is None:
        hint = difflib.get_close_matches(kind, CONNECTORS, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"connection {name!r}: unknown type {kind!r}{did_you_mean}")
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    options = config.model_dump(by_alias=False, exclude={"type"})
    if "schema_" in options:
        options["schema"] = options.pop("schema_")
    connector: Connector = cls(name, **options)
    return connector

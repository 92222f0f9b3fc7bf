"""Every optional feature a connector declares in its ``Capabilities`` is implemented.

The bus calls a feature's methods on the word of the declaration alone (no probing),
so a connector that declares one must have every method of its protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connectors import features
from connectors.base import Capabilities, Connector
from connectors.registry import CONNECTORS, open_connector
from schemas.config import BusinessCentralConnection, DataverseConnection, SqlConnection

#: Capabilities flag → the protocol it promises.
FEATURES: dict[str, type] = {
    "tracking_setup": features.TrackingSetup,
    "change_listener": features.ChangeNotifier,
    "webhooks": features.WebhookSource,
    "table_creation": features.TableCreator,
    "scratch_copy": features.ScratchCopyable,
}

_OAUTH = {"tenant_id": "t", "client_id": "c", "client_secret": "s"}


def _settings(tmp_path: Path) -> dict[str, Any]:
    """One connection per connector type (and one with webhooks), built without I/O."""
    hooks = {"webhooks": {"notification_url": "http://127.0.0.1:9/bc"},
             "entities": {"customers": {"webhook": True}}}
    index = f"sqlite:///{tmp_path}/bc.db"
    return {
        "sql": SqlConnection(url=f"sqlite:///{tmp_path}/lite.db"),
        "dataverse": DataverseConnection(url="https://crm.example", state_dir=str(tmp_path),
                                         **_OAUTH),
        "business_central": BusinessCentralConnection(company="C", index_url=index, **_OAUTH),
        "business_central+webhooks": BusinessCentralConnection(company="C", index_url=index,
                                                               **_OAUTH, **hooks),
    }


def _methods(protocol: type) -> set[str]:
    """The methods a feature protocol adds to the connector protocol."""
    return {name for cls in protocol.__mro__ if cls.__module__ == features.__name__
            for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}


def test_every_flag_names_a_feature_protocol():
    flags = {name for name, default in Capabilities.__dataclass_fields__.items()
             if default.type in ("bool", bool) and name not in (
                 "change_tracking", "deletes_tracked", "alternate_keys")}
    assert flags == set(FEATURES)
    assert all(_methods(protocol) for protocol in FEATURES.values())


@pytest.mark.parametrize("kind", ["sql", "dataverse", "business_central",
                                  "business_central+webhooks"])
def test_a_declared_feature_is_implemented(tmp_path, kind):
    # Given a connector of each registered type
    settings = _settings(tmp_path)
    assert {k.partition("+")[0] for k in settings} == set(CONNECTORS)
    connector: Connector = open_connector("conn", settings[kind])
    try:
        # When it declares a feature, then it has every method of that feature's protocol
        caps = connector.capabilities
        for flag, protocol in FEATURES.items():
            if getattr(caps, flag):
                missing = [m for m in _methods(protocol) if not callable(getattr(connector, m, None))]
                assert not missing, f"{kind} declares {flag} but lacks {missing}"
    finally:
        connector.close()


def test_webhooks_are_declared_only_where_configured(tmp_path):
    settings = _settings(tmp_path)
    plain = open_connector("erp", settings["business_central"])
    hooked = open_connector("erp", settings["business_central+webhooks"])
    try:
        assert plain.capabilities.change_listener and not plain.capabilities.webhooks
        assert hooked.capabilities.webhooks
    finally:
        plain.close()
        hooked.close()

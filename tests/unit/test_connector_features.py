"""Every optional feature a connector declares in its ``Capabilities`` is implemented.

The bus calls a feature's methods on the word of the declaration alone (no probing),
so a connector that declares one must have every method of its protocol.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any, cast

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


# -- scratch copies (syncbus preview) -----------------------------------------------------


def _sqlite_file(path: Path) -> bytes:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (k TEXT)")
        db.execute("INSERT INTO t VALUES ('kept')")
        db.commit()
    return path.read_bytes()


def test_dataverse_copies_its_key_set_and_token_cache(tmp_path):
    # Given a Dataverse connection with a key set and a token cache
    books, scratch = tmp_path / "dv", tmp_path / "scratch"
    books.mkdir()
    scratch.mkdir()
    keys = _sqlite_file(books / "crm.keys.db")
    (books / "crm.tokens.json").write_text("{}")
    crm = open_connector("crm", DataverseConnection(url="https://crm.example",
                                                    state_dir=str(books), **_OAUTH))
    # When it is asked for a scratch copy
    copy = cast(features.ScratchCopyable, crm).scratch_copy(scratch)
    crm.close()
    # Then the copy's settings point at copied files and the originals are as they were
    assert copy.settings.state_dir == str(scratch / "dataverse-crm") and not copy.notes
    copied = scratch / "dataverse-crm"
    with contextlib.closing(sqlite3.connect(copied / "crm.keys.db")) as db:
        assert db.execute("SELECT k FROM t").fetchall() == [("kept",)]
    assert (copied / "crm.tokens.json").read_text() == "{}"
    assert (books / "crm.keys.db").read_bytes() == keys


def test_business_central_copies_its_key_index_and_subscribes_to_nothing(tmp_path):
    index = tmp_path / "bc.db"
    before = _sqlite_file(index)
    erp = open_connector("erp", BusinessCentralConnection(
        company="C", index_url=f"sqlite:///{index}", **_OAUTH,
        webhooks={"notification_url": "http://127.0.0.1:9/bc"},
        entities={"customers": {"webhook": True}, "items": {"webhook": True,
                                                            "sync_deletion": True}}))
    copy = cast(features.ScratchCopyable, erp).scratch_copy(tmp_path)
    erp.close()
    settings = copy.settings
    assert settings.index_url == f"sqlite:///{tmp_path / 'bc-erp.db'}"
    assert settings.webhooks is None
    assert not any(e.webhook for e in settings.entities.values())
    assert copy.notes == ("erp: deletions reported by webhooks (customers) are not previewed "
                          "(a preview subscribes to nothing)",)
    assert (tmp_path / "bc-erp.db").exists() and index.read_bytes() == before


def test_a_shared_key_index_is_not_copied_and_its_password_never_shown(tmp_path):
    erp = open_connector("erp", BusinessCentralConnection(
        company="C", index_url="postgresql+psycopg://bc:hunter2@db.example/index", **_OAUTH))
    copy = cast(features.ScratchCopyable, erp).scratch_copy(tmp_path)
    erp.close()
    assert copy.notes == ("erp: the key index is at postgresql+psycopg://bc:***@db.example/index, "
                          "not copied: deletions it holds are not previewed",)
    assert copy.settings.index_url == f"sqlite:///{tmp_path / 'bc-erp.db'}"

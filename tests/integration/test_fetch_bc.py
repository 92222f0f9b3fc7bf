"""BusinessCentralConnector.fetch against the emulator over HTTPS (real tokens, real HTTP).

Records read by key must be the very records the change feed gives: same change key,
values, version (ETag or row version, as the entity is detected) and modified time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.base import ChangeRecord, ConnectorUnavailable, FetchedRecord, Op, SchemaError
from connectors.business_central import BusinessCentralConnector
from connectors.business_central.emulator import BusinessCentralEmulator
from connectors.business_central.fetch import FETCH_CHUNK

pytestmark = pytest.mark.integration

Connect = Callable[..., BusinessCentralConnector]


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def emu(cert_dir: Path) -> Iterator[BusinessCentralEmulator]:
    with BusinessCentralEmulator(cert_dir=cert_dir, seed=40) as emulator:
        yield emulator


@pytest.fixture
def connect(emu: BusinessCentralEmulator, tmp_path: Path) -> Iterator[Connect]:
    made: list[BusinessCentralConnector] = []

    def make(**overrides: Any) -> BusinessCentralConnector:
        settings = {"index_url": f"sqlite:///{tmp_path}/bc-index.db", "backoff": 0.02,
                    **overrides}
        connector = BusinessCentralConnector("bc", **emu.connection(**settings))
        made.append(connector)
        return connector

    yield make
    for connector in made:
        connector.close()


def _changes(bc: BusinessCentralConnector, entity: str, field: str) -> dict[Any, ChangeRecord]:
    records = [r for p in bc.read_changes(entity, None, 1000) for r in p.records
               if r.op is Op.UPSERT]
    return {r.key[field]: r for r in records}


def _same(fetched: FetchedRecord | None, change: ChangeRecord) -> bool:
    """Equal, and in the same Python types (repr tells True from 1)."""
    return fetched is not None and repr(
        (fetched.key, fetched.values, fetched.version, fetched.modified_at)) == repr(
        (change.key, change.values, change.version, change.modified_at))


def test_fetched_records_equal_their_change_records(connect: Connect) -> None:
    bc = connect()
    changes = _changes(bc, "customers", "id")

    fetched = bc.fetch("customers", [{"id": i} for i in changes])

    assert len(fetched) == 40
    assert all(_same(f, c) for f, c in zip(fetched, changes.values(), strict=True))
    first = fetched[0]
    assert first is not None and set(first.key) == {"id", "number"}
    assert str(first.version).startswith('W/"') and first.modified_at is not None


def test_a_row_version_page_is_fetched_with_its_row_version(connect: Connect) -> None:
    bc = connect()
    changes = _changes(bc, "RescoCustomer", "No")
    numbers = sorted(changes)[:5]

    fetched = bc.fetch("RescoCustomer", [{"No": n} for n in numbers])

    assert all(_same(f, changes[n]) for f, n in zip(fetched, numbers, strict=True))
    assert all(f is not None and isinstance(f.version, int) for f in fetched)


def test_fetch_by_number_id_or_configured_key_case_insensitively(
        emu: BusinessCentralEmulator, connect: Connect) -> None:
    made = [emu.insert("customers", {"displayName": f"Key {n}", "email": f"key{n}@example.com"})
            for n in range(3)]
    bc = connect(entities={"customers": {"key": ["email"]}})
    changes = _changes(bc, "customers", "id")

    fetched = bc.fetch("customers", [
        {"number": made[0]["number"].lower()},
        {"email": "KEY1@example.com"},
        {"id": made[2]["id"].upper()},
        {"number": "NO-SUCH"},
        {"id": "not-a-guid"},
        {"email": "key1@example.com"},
    ])

    assert _same(fetched[0], changes[made[0]["id"]])
    assert _same(fetched[1], changes[made[1]["id"]]) and fetched[5] == fetched[1]
    assert _same(fetched[2], changes[made[2]["id"]])
    assert fetched[3] is None and fetched[4] is None
    assert fetched[1] is not None and fetched[1].key["email"] == "key1@example.com"


def test_keys_of_several_fields_match_exactly_and_ambiguous_keys_give_none(
        emu: BusinessCentralEmulator, connect: Connect) -> None:
    lima = emu.insert("vendors", {"displayName": "North", "city": "Lima"})
    quito = emu.insert("vendors", {"displayName": "South", "city": "Quito"})
    emu.insert("vendors", {"displayName": "Twin", "city": "Cusco"})
    emu.insert("vendors", {"displayName": "Twin", "city": "Cusco"})
    bc = connect()
    changes = _changes(bc, "vendors", "id")

    fetched = bc.fetch("vendors", [
        {"displayName": "North", "city": "Lima"},
        {"city": "quito", "displayName": "south"},
        {"displayName": "North", "city": "Quito"},  # each value exists, not together
        {"displayName": "Twin", "city": "Cusco"},   # two records: no answer
    ])

    assert _same(fetched[0], changes[lima["id"]]) and _same(fetched[1], changes[quito["id"]])
    assert fetched[2:] == [None, None]


def test_hundreds_of_keys_are_chunked_and_pages_followed(
        emu: BusinessCentralEmulator, connect: Connect) -> None:
    for n in range(100):
        emu.insert("items", {"displayName": f"Bulk {n}"})
    bc = connect()
    changes = _changes(bc, "items", "number")
    numbers = list(changes)
    keys = [{"number": n} for n in numbers] + [{"number": f"MISSING-{n}"} for n in range(30)]
    keys += [{"id": changes[n].key["id"]} for n in numbers[:20]]
    bc.fetch("items", keys[:1])  # the company id is resolved once, before counting
    bc.fetcher.page_size = 7  # several pages per chunk query
    requests: list[httpx.Request] = []
    bc.client.http.event_hooks["request"].append(requests.append)

    fetched = bc.fetch("items", keys)

    assert len(numbers) == 140
    for key, record in zip(keys, fetched, strict=True):
        if "id" in key:
            assert record is not None and _same(record, changes[record.key["number"]])
        elif key["number"].startswith("MISSING"):
            assert record is None
        else:
            assert _same(record, changes[key["number"]])
    chunks = -(-170 // FETCH_CHUNK) + 1
    rows = 140 + 20
    assert max(chunks, rows // 7) <= len(requests) <= chunks + rows // 7 + 1


def test_unknown_entity_or_field_is_a_schema_error(connect: Connect) -> None:
    bc = connect()

    with pytest.raises(SchemaError, match="no entity set 'customer'"):
        bc.fetch("customer", [{"number": "C1"}])
    with pytest.raises(SchemaError, match="has no field.* colour") as field:
        bc.fetch("customers", [{"number": "C1"}, {"colour": "red"}])
    assert field.value.entity == "customers"


def test_an_unreachable_business_central_is_connector_unavailable(
        emu: BusinessCentralEmulator, connect: Connect) -> None:
    bc = connect(max_retries=1)
    bc.fetch("customers", [{"id": str(uuid.uuid4())}])
    emu.stop()

    with pytest.raises(ConnectorUnavailable):
        bc.fetch("customers", [{"id": str(uuid.uuid4())}])

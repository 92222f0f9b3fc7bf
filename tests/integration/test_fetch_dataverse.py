"""DataverseConnector.fetch against the emulator over HTTPS (real MSAL tokens, real HTTP).

Rows read by key must be the very rows the change feed gives: same key, values
(lookups renamed, polymorphic target named) and version.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.base import (
    ChangeRecord,
    ConnectorUnavailable,
    FetchedRecord,
    Op,
    SchemaError,
    WriteRow,
)
from connectors.dataverse import DataverseConnector
from connectors.dataverse.emulator import DataverseEmulator, Limits
from connectors.dataverse.emulator.model import attribute, entity
from connectors.dataverse.fetch import FETCH_CHUNK

pytestmark = pytest.mark.integration

NO_LIMITS = Limits(requests=None, concurrent=None, execution=None)
Connect = Callable[..., DataverseConnector]


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def emu(cert_dir: Path) -> Iterator[DataverseEmulator]:
    with DataverseEmulator(cert_dir=cert_dir, limits=NO_LIMITS) as emulator:
        yield emulator


@pytest.fixture
def connect(emu: DataverseEmulator, tmp_path: Path) -> Iterator[Connect]:
    made: list[DataverseConnector] = []

    def make(**overrides: Any) -> DataverseConnector:
        connector = DataverseConnector("crm", **emu.connection(
            state_dir=str(tmp_path / "state"), **overrides))
        made.append(connector)
        return connector

    yield make
    for connector in made:
        connector.close()


def _changes(crm: DataverseConnector, entity: str) -> dict[str, ChangeRecord]:
    pages = crm.read_changes(entity, None, 1000)
    records = [r for p in pages for r in p.records if r.op is Op.UPSERT]
    return {str(next(iter(r.key.values()))): r for r in records}


def _same(fetched: FetchedRecord | None, change: ChangeRecord) -> bool:
    """Equal, and in the same Python types (repr tells True from 1)."""
    return fetched is not None and repr(
        (fetched.key, fetched.values, fetched.version, fetched.modified_at)) == repr(
        (change.key, change.values, change.version, change.modified_at))


def _accounts(crm: DataverseConnector, count: int, start: int = 0) -> None:
    outcomes = crm.upsert("account", [
        WriteRow({"accountnumber": f"A-{n}"},
                 {"name": f"Account {n}", "revenue": n * 10.5, "creditonhold": n % 2 == 0,
                  "numberofemployees": n, "industrycode": 1 + n % 30})
        for n in range(start, start + count)])
    assert all(o.ok for o in outcomes), outcomes


def test_fetched_rows_equal_their_change_records_lookups_included(connect: Connect) -> None:
    crm = connect()
    _accounts(crm, 2)
    person = str(uuid.uuid4())
    assert all(o.ok for o in crm.upsert("contact", [
        WriteRow({"contactid": person}, {
            "lastname": "Lovelace", "firstname": "Ada", "birthdate": "1815-12-10",
            "parentcustomerid": {"accountnumber": "A-1"}}),
        WriteRow({"contactid": str(uuid.uuid4())}, {
            "lastname": "Child", "parentcustomerid": person, "parentcustomeridtype": "contact"}),
    ]))
    accounts, contacts = _changes(crm, "account"), _changes(crm, "contact")

    fetched_accounts = crm.fetch("account", [{"accountid": i} for i in accounts])
    fetched_contacts = crm.fetch("contact", [{"contactid": i.upper()} for i in contacts])

    assert [_same(f, c) for f, c in zip(fetched_accounts, accounts.values(), strict=True)] == [
        True, True]
    assert [_same(f, c) for f, c in zip(fetched_contacts, contacts.values(), strict=True)] == [
        True, True]
    ada = next(f for f in fetched_contacts if f is not None and f.values["lastname"] == "Lovelace")
    parent = next(f for f in fetched_accounts if f is not None and f.values["accountnumber"] == "A-1")
    assert ada.values["parentcustomerid"] == parent.key["accountid"]
    assert ada.values["parentcustomeridtype"] == "account"
    assert "_parentcustomerid_value" not in ada.values and ada.version == ada.values["versionnumber"]


def test_fetch_by_alternate_key_matches_text_case_insensitively(connect: Connect) -> None:
    crm = connect()
    _accounts(crm, 3)
    changes = {r.values["accountnumber"]: r for r in _changes(crm, "account").values()
               if r.values is not None}

    fetched = crm.fetch("account", [{"accountnumber": "A-2"}, {"accountnumber": "a-0"},
                                    {"accountnumber": "A-9"}, {"accountnumber": "A-2"}])

    assert _same(fetched[0], changes["A-2"]) and _same(fetched[1], changes["A-0"])
    assert fetched[2] is None and fetched[3] == fetched[0]
    assert fetched[0] is not None and set(fetched[0].key) == {"accountid"}


def test_fetch_by_a_composite_alternate_key(emu: DataverseEmulator, connect: Connect) -> None:
    emu.define_entity(entity(
        "new_price", attributes=[attribute("name", max_length=100),
                                 attribute("new_region", max_length=10),
                                 attribute("new_code", "Integer")],
        keys={"new_region_code": ("new_region", "new_code")}))
    crm = connect()
    assert all(o.ok for o in crm.upsert("new_price", [
        WriteRow({"new_region": r, "new_code": c}, {"name": f"{r}{c}"})
        for r in ("EU", "US") for c in (1, 2)]))
    changes = {r.values["name"]: r for r in _changes(crm, "new_price").values()
               if r.values is not None}

    fetched = crm.fetch("new_price", [{"new_code": 2, "new_region": "US"},
                                      {"new_region": "eu", "new_code": "1"},
                                      {"new_region": "EU", "new_code": 3}])

    assert _same(fetched[0], changes["US2"]) and _same(fetched[1], changes["EU1"])
    assert fetched[2] is None


def test_missing_rows_and_ids_that_are_no_guid_are_none_in_place(connect: Connect) -> None:
    crm = connect()
    _accounts(crm, 1)
    (present,) = _changes(crm, "account")

    fetched = crm.fetch("account", [{"accountid": str(uuid.uuid4())}, {"accountid": present},
                                    {"accountid": "not-a-guid"}, {"accountid": present}])

    assert [f.key["accountid"] if f else None for f in fetched] == [None, present, None, present]
    assert crm.fetch("account", []) == []


def test_hundreds_of_keys_are_chunked_and_pages_followed(
        emu: DataverseEmulator, connect: Connect) -> None:
    crm = connect(page_size=20)  # smaller than a chunk: every chunk query has several pages
    _accounts(crm, 240)
    changes = _changes(crm, "account")
    ids = list(changes)
    keys: list[dict[str, Any]] = [{"accountid": i} for i in ids[:150]]
    keys += [{"accountid": str(uuid.uuid4())} for _ in range(30)]
    keys += [{"accountnumber": f"A-{n}"} for n in range(150, 260)]  # 20 of them missing
    crm.table("account")  # metadata first, so only the fetch's own requests are counted
    before = crm.client.requests

    fetched = crm.fetch("account", keys)

    for key, record in zip(keys, fetched, strict=True):
        number = key.get("accountnumber", "")
        if key.get("accountid") in changes:
            assert _same(record, changes[key["accountid"]])
        elif number and int(number[2:]) < 240:
            assert record is not None and record.values["accountnumber"] == number
            assert _same(record, changes[record.key["accountid"]])
        else:
            assert record is None, key
    chunks = -(-180 // FETCH_CHUNK) + -(-110 // FETCH_CHUNK)
    # one query per chunk, its 240 matching rows 20 a page: at most one part-page per chunk
    assert max(chunks, 240 // 20) <= crm.client.requests - before <= chunks + 240 // 20


def test_unknown_table_column_or_non_key_is_a_schema_error(connect: Connect) -> None:
    crm = connect()

    with pytest.raises(SchemaError, match="no table 'acount'.*did you mean 'account'"):
        crm.fetch("acount", [{"accountid": str(uuid.uuid4())}])
    with pytest.raises(SchemaError, match="'account' has no column.* colour") as column:
        crm.fetch("account", [{"colour": "red"}])
    with pytest.raises(SchemaError, match=r"cannot fetch by \(name\).*alternate keys: "
                                          r"\(accountnumber\)"):
        crm.fetch("account", [{"name": "Contoso"}])
    assert column.value.entity == "account"


def test_an_unreachable_organisation_is_connector_unavailable(
        emu: DataverseEmulator, connect: Connect) -> None:
    crm = connect(retry_attempts=1)
    crm.table("account")
    emu.stop()

    with pytest.raises(ConnectorUnavailable):
        crm.fetch("account", [{"accountid": str(uuid.uuid4())}])

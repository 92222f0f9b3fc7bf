"""Pieces of the Business Central emulator without HTTP: $filter, paging tokens,
transactions and savepoints, ETags, validation rules, $metadata."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from connectors.business_central.emulator import errors, rules
from connectors.business_central.emulator.metadata import metadata_xml
from connectors.business_central.emulator.model import PAGES, PageDef, find_page
from connectors.business_central.emulator.query import parse_query, run_query
from connectors.business_central.emulator.store import Store, make_etag
from connectors.business_central.metadata import entity_info, parse_metadata


def _page(name: str) -> PageDef:
    page = find_page("v2.0", name)
    assert page is not None
    return page


CUSTOMERS = _page("customers")


def _rows(n: int) -> list[dict]:
    return [{"@odata.etag": f"e{i}", "id": f"{i:08d}-0000-0000-0000-000000000000",
             "number": f"C{i:05d}", "displayName": f"Name {i}", "city": "Oslo" if i % 2 else "Rome",
             "creditLimit": i * 10, "taxLiable": i % 3 == 0,
             "lastModifiedDateTime": f"2024-01-0{1 + i % 3}T10:00:00.{i:03d}Z"} for i in range(1, 10)]


def _numbers(params: dict, size: int = 100) -> list[str]:
    chunk, _, _ = run_query(parse_query(params, CUSTOMERS), CUSTOMERS, _rows(9), size)
    return [r["number"] for r in chunk]


@pytest.mark.parametrize(("expr", "expected"), [
    ("creditLimit gt 50", ["C00006", "C00007", "C00008", "C00009"]),
    ("creditLimit ge 50 and creditLimit le 60", ["C00005", "C00006"]),
    ("not (creditLimit lt 80)", ["C00008", "C00009"]),
    ("city eq 'OSLO' and taxLiable eq true", ["C00003", "C00009"]),
    ("number eq 'C00001' or number eq 'c00002'", ["C00001", "C00002"]),
    ("lastModifiedDateTime gt 2024-01-03T00:00:00Z", ["C00002", "C00005", "C00008"]),
    ("lastModifiedDateTime ge 2024-01-03T10:00:00.005Z", ["C00005", "C00008"]),
    ("startswith(displayName, 'name 1')", ["C00001"]),
    ("endswith(displayName,'9') or contains(displayName, ' 8')", ["C00008", "C00009"]),
    ("id eq 00000004-0000-0000-0000-000000000000", ["C00004"]),
    ("displayName eq 'It''s'", []),
])
def test_filter_expressions(expr, expected):
    assert _numbers({"$filter": expr}) == expected


@pytest.mark.parametrize("expr", ["city eq", "city eq 'x' or number eq 'y'", "(city eq 'x'",
                                  "nope eq 1", "city eq 'x' and", "$ eq 1"])
def test_bad_filters_are_400(expr):
    with pytest.raises(errors.BCError) as caught:
        parse_query({"$filter": expr}, CUSTOMERS)
    assert caught.value.status == 400


def test_keyset_paging_tokens_keep_order_and_top():
    params = {"$orderby": "city desc,creditLimit", "$top": "7"}
    q = parse_query(params, CUSTOMERS)
    first, token, total = run_query(q, CUSTOMERS, _rows(9), 3)
    assert total == 9 and token is not None
    second, token2, _ = run_query(parse_query({**params, "$skiptoken": token}, CUSTOMERS),
                                  CUSTOMERS, _rows(9), 3)
    assert token2 is not None
    third, token3, _ = run_query(parse_query({**params, "$skiptoken": token2}, CUSTOMERS),
                                 CUSTOMERS, _rows(9), 3)
    got = [r["number"] for r in first + second + third]
    assert got == ["C00002", "C00004", "C00006", "C00008", "C00001", "C00003", "C00005"]
    assert token3 is None
    with pytest.raises(errors.BCError):
        parse_query({"$skiptoken": base64.urlsafe_b64encode(b"[1]").decode()}, CUSTOMERS)


def test_savepoints_undo_only_the_failing_block_and_listeners_hear_commits():
    store = Store(clock=lambda: datetime(2024, 5, 1, tzinfo=UTC))
    heard: list[list] = []
    store.listeners.append(heard.append)
    company = store.add_company("Test")
    with store.transaction():
        kept = rules.create(store, company, CUSTOMERS, {"displayName": "Kept"})
        with pytest.raises(errors.BCError), store.transaction():
            rules.create(store, company, CUSTOMERS, {"displayName": "Gone"})
            rules.create(store, company, CUSTOMERS, {"number": kept.values["number"]})
    assert [r.values["displayName"] for r in company.rows("Customer").values()] == ["Kept"]
    assert company.by_number("Customer", "c00010") is kept
    assert [[c.kind for c in batch] for batch in heard] == [[], ["created"]]
    counter = store.counter
    with pytest.raises(errors.BCError), store.transaction():
        rules.create(store, company, CUSTOMERS, {"displayName": "x"})
        raise errors.bad_request("abort")
    assert store.counter == counter and company.series["Customer"] == 10


def test_etags_look_like_business_central_and_change_with_every_write():
    etag = make_etag("6d1a2b3c-0000-4000-8000-000000000001", 44)
    assert etag.startswith('W/"JzQ0O') and etag.endswith('"')
    decoded = base64.b64decode(etag[3:-1]).decode()
    assert decoded.startswith("'44;") and decoded.endswith(";'")
    assert etag != make_etag("6d1a2b3c-0000-4000-8000-000000000001", 45)


def test_rules_validate_types_options_and_lengths():
    store = Store()
    company = store.add_company("Rules")
    with store.transaction():
        row = rules.create(store, company, CUSTOMERS, {"displayName": "A", "blocked": "ship",
                                                        "creditLimit": "12.5"})
    assert row.values["blocked"] == "Ship" and row.values["creditLimit"] == 12.5
    for body, code in (({"blocked": "Never"}, "BadRequest_InvalidEnumValue"),
                       ({"creditLimit": "lots"}, "BadRequest"),
                       ({"taxLiable": "yes"}, "BadRequest"),
                       ({"balanceDue": 5}, "BadRequest_ReadOnlyProperty"),
                       ({"city": "x" * 31}, "Application_StringExceededLength")):
        with pytest.raises(errors.BCError) as caught, store.transaction():
            rules.create(store, company, CUSTOMERS, {"displayName": "B", **body})
        assert caught.value.code == code, body
    orders = _page("salesOrders")
    with pytest.raises(errors.BCError) as caught, store.transaction():
        rules.create(store, company, orders, {"customerNumber": "NOPE"})
    assert caught.value.code == "Internal_RecordNotFound"


def test_metadata_round_trips_into_entity_info():
    pages = parse_metadata(metadata_xml("v2.0") or "", "v2.0")
    assert set(pages) == {p.entity_set for p in PAGES if p.api == "v2.0"}
    customers = pages["customers"]
    assert customers.key == "id" and customers.key_is_guid
    assert customers.version_field is None and customers.modified_field == "lastModifiedDateTime"
    assert customers.fields["balanceDue"].read_only and not customers.fields["displayName"].read_only
    assert customers.fields["displayName"].max_length == 100
    assert pages["salesOrders"].children == ("salesOrderLines",)
    resco = parse_metadata(metadata_xml("resco/rescointegrations/v2.0") or "", "Resco/x")
    assert resco["RescoCustomer"].key == "No" and not resco["RescoCustomer"].key_is_guid
    assert resco["RescoCustomer"].version_field == "RowVersionNumber"
    assert resco["RescoItem"].version_field == "rowVersionNumber"
    info = entity_info(resco["RescoCustomer"])
    assert info.key == ("No",) and info.change_tracking and info.unique_keys == ()
    assert metadata_xml("nobody/nothing/v1.0") is None

"""The emulator's OData syntax: $filter, $orderby, key segments, paging cookies, $batch format."""

from __future__ import annotations

import pytest

from connectors.dataverse.emulator.errors import ODataError
from connectors.dataverse.emulator.keys import parse_key_segment
from connectors.dataverse.emulator.odata import compile_filter, compile_orderby
from connectors.dataverse.emulator.paging import PageCookie, make_skiptoken, parse_skiptoken
from connectors.dataverse.multipart import (
    Operation,
    OperationResult,
    boundary_of,
    decode_requests,
    decode_responses,
    encode_requests,
    encode_responses,
)

TYPES = {"name": "Edm.String", "n": "Edm.Int32", "d": "Edm.DateTimeOffset", "g": "Edm.Guid",
         "b": "Edm.Boolean", "m": "Edm.Decimal"}
GUID = "0f0c2a55-2f5e-4f39-9a53-7d5ad2b7a001"
ROWS = [
    {"id": 1, "name": "Contoso", "n": 5, "d": "2024-01-02T00:00:00Z", "g": GUID, "b": True, "m": 10.5},
    {"id": 2, "name": "Fabrikam", "n": None, "d": None, "g": None, "b": False, "m": None},
    {"id": 3, "name": "O'Neil", "n": 50, "d": "2023-06-30T23:59:59Z", "g": None, "b": False, "m": 3},
]


def _resolve(prop):
    if prop not in TYPES:
        raise ODataError(400, "0x80060888", f"Could not find a property named '{prop}'")
    return (lambda row: row.get(prop)), TYPES[prop]


def _match(text):
    pred = compile_filter(text, _resolve)
    return [r["id"] for r in ROWS if pred(r)]


@pytest.mark.parametrize(("text", "ids"), [
    ("name eq 'contoso'", [1]),  # case-insensitive, as Dataverse's collation
    ("name ne 'Contoso'", [2, 3]),
    ("name eq 'O''Neil'", [3]),
    ("n gt 4 and n lt 50", [1]),
    ("n ge 50 or b eq true", [1, 3]),
    ("n eq null", [2]),
    ("n ne null", [1, 3]),
    ("not (n gt 10)", [1, 2]),
    ("contains(name,'ABR')", [2]),
    ("startswith(name, 'co')", [1]),
    ("endswith(name,'neil')", [3]),
    ("d gt 2023-12-31T00:00:00Z", [1]),
    ("d lt 2024-01-01", [3]),
    (f"g eq {GUID.upper()}", [1]),
    ("m ge 3.5", [1]),
    ("(n eq 5 or n eq 50) and contains(name, 'o')", [1, 3]),
])
def test_filter_expressions(text, ids):
    assert _match(text) == ids


@pytest.mark.parametrize(("text", "message"), [
    ("name eq 5", "incompatible types"),
    ("nope eq 1", "Could not find a property"),
    ("name eq", "Syntax error"),
    ("name foo 'x'", "not a comparison operator"),
    ("Microsoft.Dynamics.CRM.LastXDays(PropertyName='d',PropertyValue=3)", "not supported"),
    ("contains(n, 'x')", "No function signature"),
])
def test_bad_filters_are_400(text, message):
    with pytest.raises(ODataError) as info:
        compile_filter(text, _resolve)
    assert info.value.status == 400 and message in info.value.message


def test_orderby_puts_nulls_first_ascending_and_breaks_ties_by_id():
    key = compile_orderby("n asc, name desc", _resolve, lambda r: r["id"])
    assert [r["id"] for r in sorted(ROWS, key=key)] == [2, 1, 3]
    key = compile_orderby("n desc", _resolve, lambda r: r["id"])
    assert [r["id"] for r in sorted(ROWS, key=key)] == [3, 1, 2]


@pytest.mark.parametrize(("segment", "expected"), [
    ("accounts", ("accounts", None)),
    (f"accounts({GUID.upper()})", ("accounts", GUID)),
    (f"accounts(accountid={GUID})", ("accounts", {"accountid": GUID})),
    ("accounts(accountnumber='A-1')", ("accounts", {"accountnumber": "A-1"})),
    ("contacts(firstname='Joe',emailaddress1='joe@x.com')",
     ("contacts", {"firstname": "Joe", "emailaddress1": "joe@x.com"})),
    ("accounts(accountnumber='it''s, (odd)')", ("accounts", {"accountnumber": "it's, (odd)"})),
    (f"accounts(_primarycontactid_value={GUID})", ("accounts", {"_primarycontactid_value": GUID})),
    ("EntityDefinitions(LogicalName='account')", ("EntityDefinitions", {"LogicalName": "account"})),
    ("things(code=42)", ("things", {"code": 42})),
])
def test_key_segments(segment, expected):
    assert parse_key_segment(segment) == expected


def test_skiptoken_round_trip_and_tampering():
    cookie = PageCookie(3, True, {"from": 1, "upto": 9, "phase": "u", "after": 4})
    token = make_skiptoken(cookie, "accountid", GUID, GUID)
    assert token.startswith('<cookie pagenumber="3" pagingcookie="') and 'istracking="True"' in token
    assert parse_skiptoken(token) == cookie
    with pytest.raises(ODataError):
        parse_skiptoken(token.replace("sbstate", "xxstate"))


def test_batch_requests_round_trip_with_change_sets():
    items = [
        Operation("GET", "/api/data/v9.2/accounts?$top=1", {"Accept": "application/json"}),
        [Operation("POST", "/api/data/v9.2/accounts", {"Content-Type": "application/json"},
                   b'{"name":"a"}', "1"),
         Operation("PATCH", "$1", {"Content-Type": "application/json"}, b'{"name":"b"}', "2")],
        Operation("DELETE", "/api/data/v9.2/accounts(x)"),
    ]
    body, content_type = encode_requests(items)
    assert b"\r\n" in body and content_type.startswith("multipart/mixed; boundary=batch_")
    decoded = decode_requests(body, boundary_of(content_type))
    assert decoded[0].method == "GET" and decoded[0].url.endswith("$top=1")
    assert [(o.method, o.url, o.body, o.content_id) for o in decoded[1]] == [
        ("POST", "/api/data/v9.2/accounts", b'{"name":"a"}', "1"),
        ("PATCH", "$1", b'{"name":"b"}', "2")]
    assert decoded[2].method == "DELETE" and decoded[2].body == b""


def test_batch_requests_with_lf_line_endings_parse():
    body = (b"--batch_x\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n\n"
            b"PATCH /api/data/v9.2/accounts(1) HTTP/1.1\nContent-Type: application/json\n\n"
            b'{"a":1}\n--batch_x--\n')
    (op,) = decode_requests(body, "batch_x")
    assert (op.method, op.body, op.headers["content-type"]) == ("PATCH", b'{"a":1}', "application/json")


def test_batch_responses_round_trip_flattening_change_sets():
    body, content_type = encode_responses([
        OperationResult(204, {"OData-EntityId": "u1"}),
        [OperationResult(204, {}, b"", "1"), OperationResult(400, {"Content-Type": "application/json"},
                                                             b'{"error":{}}', "2")],
    ])
    assert "batchresponse_" in content_type and b"changesetresponse_" in body
    results = decode_responses(body, content_type)
    assert [(r.status, r.content_id) for r in results] == [(204, None), (204, "1"), (400, "2")]
    assert results[0].headers["odata-entityid"] == "u1" and results[2].body == b'{"error":{}}'

"""Pieces of the Business Central connector without HTTP: cursors, value conversion,
notification parsing and the key index."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from connectors.base import SchemaError, WriteRow
from connectors.business_central.detection import _State, format_time, parse_time
from connectors.business_central.emulator.metadata import metadata_xml
from connectors.business_central.index import IndexRow, KeyIndex
from connectors.business_central.metadata import parse_metadata
from connectors.business_central.webhooks import (
    WebhookRejected,
    check_client_state,
    parse_notifications,
)
from connectors.business_central.writer import _convert, _literal, _payload, _Unconvertible
from schemas.config import BusinessCentralConnection

PAGES = parse_metadata(metadata_xml("v2.0") or "", "v2.0")


def test_cursor_state_round_trip_and_refusals():
    state = _State("modified", hw="2024-01-01T00:00:00.000Z",
                   seen={"2024-01-01T00:00:00.000Z": {"AAAAAAAAAAA", "BBBBBBBBBBB"}}, tomb=3)
    again = _State.load(state.dump(), "modified", "bc.customers")
    assert again == state
    with pytest.raises(SchemaError, match="not a Business Central cursor"):
        _State.load('{"id": 1}', "modified", "bc.customers")
    with pytest.raises(SchemaError, match="reset"):
        _State.load(_State("row_version", rv=5).dump(), "modified", "bc.customers")
    assert _State.load(None, "row_version", "x") is None


def test_times_keep_milliseconds_in_utc():
    assert format_time(parse_time("2024-03-01T10:20:30.1234+02:00")) == "2024-03-01T08:20:30.123Z"


def test_values_are_converted_to_the_page_types():
    fields = PAGES["customers"].fields
    assert _convert(fields["creditLimit"], "12.50") == 12.5
    assert _convert(fields["creditLimit"], "7.00") == 7
    assert _convert(fields["taxLiable"], "true") is True
    assert _convert(fields["displayName"], None) == ""
    assert _convert(fields["creditLimit"], None) == 0
    assert _convert(fields["lastModifiedDateTime"], "2024-01-01T00:00:00+00:00") == "2024-01-01T00:00:00Z"
    with pytest.raises(_Unconvertible):
        _convert(fields["creditLimit"], "much")
    orders = PAGES["salesOrders"].fields
    assert _convert(orders["orderDate"], "2024-02-03T10:00:00") == "2024-02-03"


def test_payload_leaves_out_read_only_fields_and_the_id():
    page = PAGES["customers"]
    row = WriteRow({"number": "C1"}, {"displayName": "A", "balanceDue": 5, "id": "x",
                                      "unknownField": 1})
    assert _payload(page, row, create=True) == {"number": "C1", "displayName": "A",
                                                "unknownField": 1}
    by_id = WriteRow({"id": "6D1A2B3C-0000-4000-8000-000000000001"}, {"displayName": "B"})
    assert _payload(page, by_id, create=True)["id"] == "6d1a2b3c-0000-4000-8000-000000000001"
    assert "id" not in _payload(page, by_id, create=False)
    assert _literal(page, "number", "O'Brien") == "'O''Brien'"


def test_notifications_are_parsed_and_checked():
    item = {"clientState": "s", "changeType": "deleted",
            "resource": "api/v2.0/companies(6d1a2b3c-0000-4000-8000-000000000001)/customers("
                        "11111111-0000-4000-8000-000000000001)"}
    (note,) = parse_notifications({"value": [item]})
    assert (note.api, note.entity_set, note.key, note.company) == (
        "v2.0", "customers", "11111111-0000-4000-8000-000000000001",
        "6d1a2b3c-0000-4000-8000-000000000001")
    assert "'s'" not in repr(note)  # the secret is never printed
    check_client_state(note, "s")
    for given, expected, reason in [(None, "s", "missing_client_state"),
                                    ("", "s", "missing_client_state"),
                                    ("other", "s", "wrong_client_state"),
                                    ("s", None, "unknown_resource")]:
        (forged,) = parse_notifications({"value": [{**item, "clientState": given}]})
        with pytest.raises(WebhookRejected) as refused:
            check_client_state(forged, expected)
        assert refused.value.reason == reason and refused.value.http_status == 401
        assert "other" not in refused.value.message
    resco, many = parse_notifications({"value": [
        {**item, "resource": "api/Resco/RescoIntegrations/v2.0/companies(x)/RescoCustomer('C''1')"},
        {**item, "changeType": "collection", "resource": "api/v2.0/companies(x)/customers"
                                                         "?$filter=lastModifiedDateTime gt "
                                                         "2024-01-01T00:00:00Z"}]})
    assert resco.key == "C'1" and resco.api == "Resco/RescoIntegrations/v2.0"
    assert many.key is None and many.change_type == "collection"


@pytest.mark.parametrize("body", [[], {}, {"value": {}}, {"value": ["x"]}, "text", None])
def test_a_body_that_is_not_a_notification_is_malformed(body):
    with pytest.raises(WebhookRejected) as refused:
        parse_notifications(body)
    assert (refused.value.reason, refused.value.http_status) == ("malformed", 400)


def test_a_resource_that_names_no_entity_set_is_refused():
    with pytest.raises(WebhookRejected) as refused:
        parse_notifications({"value": [{"clientState": "s", "resource": "/etc/passwd"}]})
    assert refused.value.reason == "unknown_resource"


@pytest.mark.parametrize(("listen", "address"), [
    ("8790", ("127.0.0.1", 8790)), (":8790", ("127.0.0.1", 8790)),
    ("0.0.0.0:8790", ("0.0.0.0", 8790)), ("[::1]:0", ("::1", 0)),
    ("localhost:1", ("localhost", 1))])
def test_listen_without_a_host_means_127_0_0_1(listen, address):
    assert BusinessCentralConnection.Webhooks.split_listen(listen) == address


@pytest.mark.parametrize("listen", ["x", "::1:80", "host:99999", "host:", ""])
def test_a_listen_that_is_no_address_is_a_config_error(listen):
    with pytest.raises(ValidationError, match="listen"):
        BusinessCentralConnection.Webhooks(notification_url="https://x", listen=listen)


def test_key_index_keeps_suspects_of_known_live_records_only(tmp_path):
    index = KeyIndex("bc", f"sqlite:///{tmp_path}/index.db")
    index.record("customers", [IndexRow(f"id{i}", {"id": f"id{i}"}, str(i)) for i in range(3)])
    assert index.suspect("customers", ["id1", "id2", "id1", "unknown"]) == 2
    assert index.suspect("customers", ["id1"]) == 0  # already a suspect
    assert index.suspects("customers") == ["id1", "id2"]
    assert index.pending("customers", 0) == []  # a suspect is no deletion
    index.clear_suspects("customers", ["id1"])
    assert index.suspects("customers") == ["id2"]
    assert index.suspects("vendors") == []
    index.close()


def test_key_index_tombstones_reconciles_and_purges(tmp_path):
    index = KeyIndex("bc", f"sqlite:///{tmp_path}/index.db")
    rows = [IndexRow(f"id{i}", {"id": f"id{i}", "number": f"N{i}"}, str(i)) for i in range(5)]
    index.record("customers", rows)
    assert index.tombstone("customers", ["id1", "unknown"]) == 1
    assert index.tombstone("customers", ["id1"]) == 0  # already a tombstone
    live = {r.page_key: r for r in rows if r.page_key not in ("id1", "id3")}
    live["id9"] = IndexRow("id9", {"id": "id9", "number": "N9"}, "9")
    assert index.reconcile("customers", live) == 1
    pending = index.pending("customers", 0)
    assert [(t.seq, t.page_key, t.change_key["number"]) for t in pending] == [
        (1, "id1", "N1"), (2, "id3", "N3")]
    assert index.pending("customers", 1)[0].page_key == "id3"
    index.purge("customers", 1)
    assert [t.page_key for t in index.pending("customers", 0)] == ["id3"]
    assert {r.page_key for r in index.rows("customers", ["id0", "id3", "id9"])} == {"id0", "id9"}
    index.record("customers", [IndexRow("id3", {"id": "id3", "number": "N3"}, "10")])
    assert index.pending("customers", 0) == []  # seen again: alive
    index.close()

"""Connector-side conversions: metadata → EntityInfo, rows → records, records → PATCH bodies."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from connectors.dataverse.convert import ConversionError, from_row, key_segment, to_body
from connectors.dataverse.metadata import parse_table

GUID = "0f0c2a55-2f5e-4f39-9a53-7d5ad2b7a001"
SETS = {"account": "accounts", "contact": "contacts"}


def _attr(name, kind, required="None", create=True, update=True, of=None):
    return {"LogicalName": name, "AttributeType": kind, "RequiredLevel": {"Value": required},
            "IsValidForCreate": create, "IsValidForUpdate": update, "IsValidForRead": True,
            "AttributeOf": of}


CONTACT = parse_table({
    "LogicalName": "contact", "EntitySetName": "contacts", "PrimaryIdAttribute": "contactid",
    "PrimaryNameAttribute": "fullname", "ChangeTrackingEnabled": True,
    "Attributes": [
        _attr("contactid", "Uniqueidentifier", update=False),
        _attr("lastname", "String", "ApplicationRequired"),
        _attr("fullname", "String", create=False, update=False),
        _attr("numberofchildren", "Integer"), _attr("creditlimit", "Money"),
        _attr("donotemail", "Boolean"), _attr("birthdate", "DateTime"),
        _attr("lastused", "DateTime"), _attr("employeeid", "String"),
        _attr("parentcustomerid", "Customer"), _attr("parentcustomeridtype", "EntityName",
                                                     of="parentcustomerid"),
        _attr("parentcustomeridname", "String", of="parentcustomerid"),
        _attr("createdon", "DateTime", create=False, update=False),
        _attr("versionnumber", "BigInt", create=False, update=False),
        _attr("entityimage", "Virtual"),
    ],
    "Keys": [{"LogicalName": "employee_key", "KeyAttributes": ["employeeid"]}],
    "ManyToOneRelationships": [
        {"ReferencingAttribute": "parentcustomerid", "ReferencedEntity": "contact",
         "ReferencingEntityNavigationPropertyName": "parentcustomerid_contact"},
        {"ReferencingAttribute": "parentcustomerid", "ReferencedEntity": "account",
         "ReferencingEntityNavigationPropertyName": "parentcustomerid_account"},
    ],
})


def test_metadata_becomes_entity_info():
    info = CONTACT.info()
    assert info.name == "contact" and info.key == ("contactid",)
    assert info.unique_keys == (("employeeid",),) and info.change_tracking
    fields = {f.name: f for f in info.fields}
    assert "parentcustomeridname" not in fields and "entityimage" not in fields
    assert fields["parentcustomerid"].type == "uuid"
    assert fields["parentcustomerid"].references == "account"  # account first: the usual customer
    assert fields["parentcustomeridtype"].type == "string"
    assert not fields["lastname"].nullable and fields["fullname"].nullable
    assert fields["contactid"].key and fields["contactid"].nullable  # Dataverse assigns it
    assert fields["creditlimit"].type == "decimal" and fields["versionnumber"].type == "integer"


def test_rows_become_flat_records():
    row = {"@odata.etag": 'W/"7"', "contactid": GUID, "lastname": "Novak",
           "_parentcustomerid_value": GUID,
           "_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "account",
           "_parentcustomerid_value@OData.Community.Display.V1.FormattedValue": "Contoso",
           "versionnumber": 7}
    assert from_row(CONTACT, row) == {"contactid": GUID, "lastname": "Novak",
                                      "parentcustomerid": GUID, "parentcustomeridtype": "account",
                                      "versionnumber": 7}


def test_bodies_convert_values_and_skip_read_only_and_key_columns():
    body = to_body(CONTACT, SETS, {
        "employeeid": 42, "lastname": 7, "numberofchildren": "3", "creditlimit": Decimal("12.50"),
        "donotemail": "yes", "lastused": datetime(2024, 5, 1, 10, 0), "birthdate": date(1990, 1, 2),
        "fullname": "ignored", "versionnumber": 3, "createdon": "x", "contactid": GUID,
    }, skip={"employeeid"})
    assert body == {"lastname": "7", "numberofchildren": 3, "creditlimit": 12.5,
                    "donotemail": True, "lastused": "2024-05-01T10:00:00Z",
                    "birthdate": "1990-01-02"}
    aware = to_body(CONTACT, SETS, {"lastused": "2024-05-01T12:00:00+02:00"}, set())
    assert aware == {"lastused": "2024-05-01T10:00:00Z"}


@pytest.mark.parametrize(("values", "expected"), [
    ({"parentcustomerid": GUID}, {"parentcustomerid_account@odata.bind": f"/accounts({GUID})"}),
    ({"parentcustomerid": uuid.UUID(GUID), "parentcustomeridtype": "contact"},
     {"parentcustomerid_contact@odata.bind": f"/contacts({GUID})"}),
    ({"parentcustomerid": {"accountnumber": "A-1"}},
     {"parentcustomerid_account@odata.bind": "/accounts(accountnumber='A-1')"}),
    ({"parentcustomerid": f"/contacts({GUID})"},
     {"parentcustomerid_contact@odata.bind": f"/contacts({GUID})"}),
    ({"parentcustomerid": None}, {"parentcustomerid_account@odata.bind": None}),
])
def test_lookups_become_binds(values, expected):
    assert to_body(CONTACT, SETS, values, set()) == expected


@pytest.mark.parametrize("values", [
    {"parentcustomerid": "not-a-guid"},
    {"parentcustomerid": GUID, "parentcustomeridtype": "lead"},
    {"parentcustomerid": f"/leads({GUID})"},
    {"numberofchildren": "2.5"},
    {"donotemail": "maybe"},
])
def test_unconvertible_values_are_refused(values):
    with pytest.raises(ConversionError):
        to_body(CONTACT, SETS, values, set())


def test_key_segments_by_id_and_alternate_key():
    assert key_segment(CONTACT, {"contactid": GUID.upper()}) == f"contacts({GUID})"
    assert key_segment(CONTACT, {"employeeid": "E/1 'x'"}) == "contacts(employeeid='E%2F1%20''x''')"
    assert key_segment(CONTACT, {"employeeid": 42}) == "contacts(employeeid='42')"
    with pytest.raises(ConversionError, match="neither the primary id .* nor an alternate key"):
        key_segment(CONTACT, {"lastname": "x"})


def test_unknown_columns_are_sent_for_dataverse_to_refuse():
    assert to_body(CONTACT, SETS, {"nope": datetime(2024, 1, 1, tzinfo=UTC)}, set()) == {
        "nope": "2024-01-01T00:00:00Z"}

"""The Dataverse emulator over real HTTPS: every behaviour of the Web API it promises.

Clients get their tokens from the emulator's fake Entra ID through MSAL
(``TokenProvider``), exactly as the connector does.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from connectors._http import TokenProvider, make_client
from connectors.dataverse.emulator import DataverseEmulator, Limits
from connectors.dataverse.emulator.model import attribute, entity
from connectors.dataverse.emulator.service import Settings
from connectors.dataverse.multipart import Operation, decode_responses, encode_requests
from schemas.config import DataverseConnection

pytestmark = pytest.mark.integration

NO_LIMITS = Limits(requests=None, concurrent=None, execution=None)
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def emu(cert_dir):
    with DataverseEmulator(cert_dir=cert_dir, limits=NO_LIMITS) as emulator:
        yield emulator


def _client(emulator: DataverseEmulator) -> httpx.Client:
    settings = DataverseConnection.model_validate(emulator.connection())
    provider = TokenProvider(settings, f"{emulator.url}/.default")
    client = make_client(base_url=emulator.api_url, ca_bundle=emulator.ca_bundle, timeout=30,
                         auth=provider)
    client.headers.update({"OData-Version": "4.0", "OData-MaxVersion": "4.0",
                           "Accept": "application/json"})
    return client


@pytest.fixture
def api(emu):
    with _client(emu) as client:
        yield client


def _create(api, entity_set, body, **headers):
    response = api.post(entity_set, json=body, headers=headers)
    assert response.status_code == 204, response.text
    return response.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")


def _error(response):
    return response.json()["error"]


# -- queries -----------------------------------------------------------------------------


def test_select_filter_orderby_top_and_count(api):
    contact = _create(api, "contacts", {"firstname": "Ann", "lastname": "Lee"})
    for n, name in enumerate(["Contoso", "Fabrikam", "Northwind", "Contoso Labs"]):
        body = {"name": name, "accountnumber": f"Q-{n}", "numberofemployees": n * 10,
                "revenue": n * 1000.5}
        if n == 1:
            body["primarycontactid@odata.bind"] = f"/contacts({contact})"
        _create(api, "accounts", body)

    def names(**params):
        response = api.get("accounts", params=params)
        assert response.status_code == 200, response.text
        return [r["name"] for r in response.json()["value"]]

    assert names(**{"$filter": "contains(name,'contoso')", "$orderby": "name desc"}) == [
        "Contoso Labs", "Contoso"]
    assert names(**{"$filter": "numberofemployees ge 10 and revenue lt 3000",
                    "$orderby": "numberofemployees"}) == ["Fabrikam", "Northwind"]
    assert names(**{"$filter": f"_primarycontactid_value eq {contact}"}) == ["Fabrikam"]
    since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert len(names(**{"$filter": f"createdon gt {since} or startswith(name,'x')"})) == 4
    assert names(**{"$orderby": "name", "$top": "2"}) == ["Contoso", "Contoso Labs"]
    response = api.get("accounts", params={"$select": "name", "$top": "1", "$count": "true"})
    body = response.json()
    assert body["@odata.count"] == 4 and set(body["value"][0]) == {"@odata.etag", "accountid", "name"}
    assert body["@odata.context"].endswith("/api/data/v9.2/$metadata#accounts(name)")
    assert api.get("accounts/$count").text == "4"
    bad = api.get("accounts", params={"$filter": "name eq 5"})
    assert bad.status_code == 400 and "incompatible types" in _error(bad)["message"]
    bad = api.get("accounts", params={"$select": "nope"})
    assert _error(bad) == {"code": "0x80060888", "message": "Could not find a property named "
                           "'nope' on type 'Microsoft.Dynamics.CRM.account'."}


def test_paging_by_maxpagesize_with_opaque_skiptokens(emu, api):
    table = emu.store.tables["account"]
    with emu.store.request():
        for n in range(5003):
            emu.store.insert(table, f"00000000-0000-0000-0000-{n:012d}", {"name": f"a{n}"})
    first = api.get("accounts", params={"$select": "name"})
    body = first.json()
    assert len(body["value"]) == 5000 and "$skiptoken=" in body["@odata.nextLink"]
    assert "Preference-Applied" not in first.headers  # the default page is 5,000
    rest = api.get(body["@odata.nextLink"]).json()
    assert len(rest["value"]) == 3 and "@odata.nextLink" not in rest

    big = api.get("accounts", params={"$select": "name"}, headers={"Prefer": "odata.maxpagesize=9000"})
    assert big.headers["Preference-Applied"] == "odata.maxpagesize=5000"
    seen, link, pages = [], "accounts?$select=name&$orderby=name desc&$top=2", 0
    while link:
        response = api.get(link, headers={"Prefer": "odata.maxpagesize=2000"})
        assert response.headers["Preference-Applied"] == "odata.maxpagesize=2000"
        page = response.json()
        seen += [r["name"] for r in page["value"]]
        link, pages = page.get("@odata.nextLink"), pages + 1
        if pages == 1:  # rows written between pages neither repeat nor shift later pages
            _create(api, "accounts", {"name": "zzz-new"})
    assert pages == 3 and len(seen) == 5003 and len(set(seen)) == 5003  # $top ignored
    assert seen == sorted(seen, reverse=True)

    skip = api.get("accounts", params={"$skip": "10"})
    assert skip.status_code == 400 and _error(skip)["code"] == "0x80060888"
    assert "$skip" in _error(skip)["message"]
    forged = api.get("accounts", params={"$skiptoken": "<cookie/>"})
    assert forged.status_code == 400


# -- writes ------------------------------------------------------------------------------


def test_create_returns_entity_id_or_representation(api):
    created = api.post("accounts", json={"name": "A", "accountnumber": "C-1"})
    assert created.status_code == 204 and created.content == b""
    assert created.headers["OData-EntityId"].startswith(str(api.base_url).rstrip("/") + "/accounts(")
    rep = api.post("accounts?$select=name", json={"name": "B"},
                   headers={"Prefer": "return=representation"})
    assert rep.status_code == 201 and "OData-EntityId" not in rep.headers
    assert rep.headers["Preference-Applied"] == "return=representation"
    body = rep.json()
    assert body["@odata.context"].endswith("$metadata#accounts(name)/$entity")
    assert body["@odata.etag"] == rep.headers["ETag"] and body["name"] == "B" and body["accountid"]


def test_upsert_by_id_and_alternate_key(api):
    url = "accounts(accountnumber='K-1')"
    created = api.patch(url, json={"name": "K"}, headers={"Prefer": "return=representation"})
    assert created.status_code == 201 and created.json()["accountnumber"] == "K-1"
    account_id = created.json()["accountid"]
    updated = api.patch(url, json={"name": "K2", "accountnumber": "IGNORED"},
                        headers={"Prefer": "return=representation"})
    assert updated.status_code == 200 and updated.json()["accountnumber"] == "K-1"
    plain = api.patch(url, json={"telephone1": "1"})
    assert plain.status_code == 204 and plain.headers["OData-EntityId"].endswith(f"({account_id})")
    body_wins = api.patch("accounts(accountnumber='K-2')", json={"name": "x", "accountnumber": "K-3"},
                          headers={"Prefer": "return=representation"})
    assert body_wins.status_code == 201 and body_wins.json()["accountnumber"] == "K-3"
    new_id = "11111111-2222-3333-4444-555555555555"
    by_id = api.patch(f"accounts({new_id})", json={"name": "by id"})
    assert by_id.status_code == 204 and api.get(f"accounts(accountid={new_id})").json()["name"] == "by id"
    first = api.get(f"accounts({account_id})").json()["versionnumber"]
    api.patch(f"accounts({account_id})", json={"name": "K2"})  # an unchanged value still counts
    assert api.get(f"accounts({account_id})").json()["versionnumber"] > first
    bad = api.patch("accounts(name='K')", json={"name": "x"})
    assert bad.status_code == 400 and "The key in the request URI is not valid" in _error(bad)["message"]
    taken = api.patch(f"accounts({new_id})", json={"accountnumber": "K-1"})
    assert taken.status_code == 412 and _error(taken)["code"] == "0x80040237"


def test_if_match_and_if_none_match(api):
    missing = api.patch("accounts(accountnumber='M-1')", json={"name": "x"}, headers={"If-Match": "*"})
    assert missing.status_code == 404 and "Does Not Exist" in _error(missing)["message"]
    assert api.get("accounts", params={"$filter": "accountnumber eq 'M-1'"}).json()["value"] == []
    assert api.patch("accounts(accountnumber='M-1')", json={"name": "x"},
                     headers={"If-None-Match": "*"}).status_code == 204
    again = api.patch("accounts(accountnumber='M-1')", json={"name": "y"}, headers={"If-None-Match": "*"})
    assert again.status_code == 412 and _error(again) == {
        "code": "0x80040237", "message": "A record with matching key values already exists."}
    row = api.get("accounts(accountnumber='M-1')")
    etag = row.headers["ETag"]
    assert api.get("accounts(accountnumber='M-1')", headers={"If-None-Match": etag}).status_code == 304
    assert api.patch("accounts(accountnumber='M-1')", json={"name": "z"},
                     headers={"If-Match": etag}).status_code == 204
    stale = api.patch("accounts(accountnumber='M-1')", json={"name": "w"}, headers={"If-Match": etag})
    assert stale.status_code == 412 and _error(stale) == {
        "code": "0x80060882",
        "message": "The version of the existing record doesn't match the RowVersion property provided."}
    assert api.delete("accounts(accountnumber='M-1')", headers={"If-Match": etag}).status_code == 412
    assert api.delete("accounts(accountnumber='M-1')/name").status_code == 204
    assert api.get("accounts(accountnumber='M-1')").json()["name"] is None
    assert api.delete("accounts(accountnumber='M-1')").status_code == 204
    assert api.delete("accounts(accountnumber='M-1')").status_code == 404


def test_lookups_bind_and_read_with_annotations(api):
    account = _create(api, "accounts", {"name": "Parent Co", "accountnumber": "P-1"})
    contact = _create(api, "contacts", {"lastname": "Child",
                                        "parentcustomerid_account@odata.bind": f"/accounts({account})"})
    by_key = _create(api, "contacts", {
        "lastname": "Key", "parentcustomerid_account@odata.bind": "/accounts(accountnumber='P-1')"})
    absolute = _create(api, "contacts", {
        "lastname": "Abs", "parentcustomerid_contact@odata.bind": f"{api.base_url}contacts({contact})"})
    rows = api.get("contacts", params={"$select": "lastname,_parentcustomerid_value",
                                       "$orderby": "lastname"},
                   headers={"Prefer": 'odata.include-annotations="*"'})
    assert rows.headers["Preference-Applied"] == 'odata.include-annotations="*"'
    by_name = {r["lastname"]: r for r in rows.json()["value"]}
    child = by_name["Child"]
    assert child["_parentcustomerid_value"] == account
    assert child["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "account"
    assert child["_parentcustomerid_value@OData.Community.Display.V1.FormattedValue"] == "Parent Co"
    assert child["_parentcustomerid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] == (
        "parentcustomerid_account")
    assert by_name["Key"]["_parentcustomerid_value"] == account
    assert by_name["Abs"]["_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
    plain = api.get(f"contacts({by_key})", params={"$select": "_parentcustomerid_value"}).json()
    assert set(plain) == {"@odata.context", "@odata.etag", "contactid", "_parentcustomerid_value"}
    assert api.patch(f"contacts({absolute})", json={
        "parentcustomerid_account@odata.bind": None}).status_code == 204
    assert api.get(f"contacts({absolute})").json()["_parentcustomerid_value"] is None
    undeclared = api.post("contacts", json={"lastname": "x", "parentcustomerid@odata.bind": f"/accounts({account})"})
    assert undeclared.status_code == 400 and "An undeclared property 'parentcustomerid'" in _error(undeclared)["message"]
    missing = api.post("contacts", json={"lastname": "x", "parentcustomerid_account@odata.bind":
                                         "/accounts(00000000-0000-0000-0000-000000000001)"})
    assert missing.status_code == 404 and _error(missing)["code"] == "0x80040217"
    read_only = api.post("contacts", json={"lastname": "x", "_parentcustomerid_value": account})
    assert read_only.status_code == 400


def test_values_are_validated_with_dataverse_errors(api):
    too_long = api.post("accounts", json={"name": "x" * 161})
    assert too_long.status_code == 400 and _error(too_long) == {
        "code": "0x80044331", "message": "A validation error occurred. The length of the 'name' "
        "attribute of the 'account' entity exceeded the maximum allowed length of '160'."}
    wrong = api.post("accounts", json={"name": "x", "numberofemployees": "many"})
    assert wrong.status_code == 400 and _error(wrong)["code"] == "0x80048d19"
    assert "Cannot convert the literal 'many' to the expected type 'Edm.Int32'" in _error(wrong)["message"]
    naive = api.post("accounts", json={"name": "x", "description": None, "revenue": 1.005,
                                       "creditonhold": True})
    assert naive.status_code == 204
    unknown = api.post("accounts", json={"name": "x", "colour": "red"})
    assert "The property 'colour' does not exist on type 'Microsoft.Dynamics.CRM.account'" in (
        _error(unknown)["message"])
    option = api.post("accounts", json={"name": "x", "industrycode": 99})
    assert _error(option)["code"] == "0x80044331"
    assert api.patch("accounts", json={}).status_code == 405


# -- $batch ------------------------------------------------------------------------------


def _batch(api, items, prefer=None):
    body, content_type = encode_requests(items)
    headers = {"Content-Type": content_type, **({"Prefer": prefer} if prefer else {})}
    response = api.post("$batch", content=body, headers=headers)
    return response, decode_responses(response.content, response.headers["content-type"])


def _op(method, url, body=None, content_id=None):
    raw = json.dumps(body).encode() if body is not None else b""
    return Operation(method, f"/api/data/v9.2/{url}", {"Content-Type": "application/json"}, raw,
                     content_id)


def test_batch_change_sets_are_atomic_and_reference_content_ids(api):
    response, results = _batch(api, [
        _op("GET", "accounts?$select=name"),
        [_op("POST", "accounts", {"name": "Batch Co"}, "1"),
         _op("POST", "contacts", {"lastname": "B", "parentcustomerid_account@odata.bind": "$1"}, "2"),
         Operation("PATCH", "$1", {"Content-Type": "application/json"}, b'{"telephone1":"5"}', "3")],
    ])
    assert response.status_code == 200 and "batchresponse_" in response.headers["content-type"]
    assert [r.status for r in results] == [200, 204, 204, 204]
    assert [r.content_id for r in results[1:]] == ["1", "2", "3"]
    assert results[1].headers["location"] == results[1].headers["odata-entityid"]
    account = api.get(results[1].headers["odata-entityid"]).json()
    assert account["telephone1"] == "5"
    contact = api.get(results[2].headers["odata-entityid"]).json()
    assert contact["_parentcustomerid_value"] == account["accountid"]

    before = api.get("accounts/$count").text
    response, results = _batch(api, [[
        _op("POST", "accounts", {"name": "rolled back"}, "1"),
        _op("POST", "accounts", {"name": "y" * 500}, "2")]], prefer="odata.continue-on-error")
    assert response.status_code == 200 and [r.status for r in results] == [400]
    assert api.get("accounts/$count").text == before
    response, results = _batch(api, [[
        _op("POST", "contacts", {"lastname": "x", "parentcustomerid_account@odata.bind": "$9"}, "1")]])
    assert response.status_code == 400
    assert json.loads(results[0].body)["error"]["message"] == (
        "Content-ID Reference: '$9' does not exist in the batch context.")


def test_batch_stops_at_first_error_unless_continue_on_error(api):
    ops = [_op("POST", "accounts", {"name": "one"}), _op("POST", "accounts", {"name": "z" * 200}),
           _op("POST", "accounts", {"name": "three"})]
    response, results = _batch(api, ops)
    assert response.status_code == 400 and [r.status for r in results] == [400]
    names = [r["name"] for r in api.get("accounts").json()["value"]]
    assert "one" in names and "three" not in names
    response, results = _batch(api, ops, prefer="odata.continue-on-error")
    assert response.status_code == 200 and [r.status for r in results] == [204, 400, 204]
    assert response.headers["Preference-Applied"] == "odata.continue-on-error"
    body, content_type = encode_requests([_op("GET", "WhoAmI")] * 1001)
    too_many = api.post("$batch", content=body, headers={"Content-Type": content_type})
    assert too_many.status_code == 400 and "1000" in _error(too_many)["message"]


# -- change tracking ----------------------------------------------------------------------


def _delta(api, link):
    response = api.get(link)
    assert response.status_code == 200, response.text
    return response.json()


def test_change_tracking_delta_links(emu, api):
    keep = _create(api, "accounts", {"name": "keep"})
    gone = _create(api, "accounts", {"name": "gone"})
    first = api.get("accounts", params={"$select": "name"},
                    headers={"Prefer": "odata.track-changes, odata.maxpagesize=1"})
    assert first.headers["Preference-Applied"] == "odata.track-changes,odata.maxpagesize=1"
    page = first.json()
    rows = page["value"]
    while "@odata.nextLink" in page:
        page = _delta(api, page["@odata.nextLink"])
        rows += page["value"]
    assert {r["name"] for r in rows} == {"keep", "gone"}
    link = page["@odata.deltaLink"]
    assert "$deltatoken=" in link and "%21" in link  # <version>!<timestamp>

    assert _delta(api, link)["value"] == []
    api.patch(f"accounts({keep})", json={"name": "kept"})
    api.patch(f"accounts({keep})", json={"name": "kept twice"})
    new = _create(api, "accounts", {"name": "new"})
    brief = _create(api, "accounts", {"name": "brief"})
    api.delete(f"accounts({brief})")
    api.delete(f"accounts({gone})")
    assert api.get(link.replace("accounts?", "accounts/$count?")).text == "4"
    delta = _delta(api, link)
    assert delta["@odata.context"].endswith("$metadata#accounts(name)/$delta")
    assert [(r.get("name"), r.get("accountid")) for r in delta["value"][:2]] == [
        ("kept twice", keep), ("new", new)]
    deleted = delta["value"][2:]
    assert {d["id"] for d in deleted} == {brief, gone}
    assert all(d == {"@odata.context": f"{emu.api_url}$metadata#accounts/$deletedEntity",
                     "id": d["id"], "reason": "deleted"} for d in deleted)
    assert _delta(api, delta["@odata.deltaLink"])["value"] == []

    for option in ("$filter=name eq 'x'", "$orderby=name", "$top=1"):
        refused = api.get(f"accounts?{option}", headers={"Prefer": "odata.track-changes"})
        assert refused.status_code == 400 and "isn't supported when Change Tracking is enabled" in (
            _error(refused)["message"])
    emu.expire_delta_tokens()
    expired = api.get(delta["@odata.deltaLink"])
    assert expired.status_code == 400 and _error(expired) == {
        "code": "0x80044352", "message": "Version stamp associated with the client has expired. "
        "Please perform a full sync."}
    assert api.get("accounts?$deltatoken=garbage").status_code == 400


def test_delta_tokens_expire_after_their_lifetime(cert_dir):
    now = [datetime(2025, 1, 1, tzinfo=UTC)]
    settings = Settings(delta_token_ttl=86400, expired_token_status=410)
    with DataverseEmulator(cert_dir=cert_dir, limits=NO_LIMITS, settings=settings,
                           clock=lambda: now[0]) as emulator, _client(emulator) as api:
        link = api.get("contacts", headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
        now[0] += timedelta(hours=23)
        assert api.get(link).status_code == 200
        now[0] += timedelta(hours=2)
        assert api.get(link).status_code == 410


def test_many_changes_page_before_the_delta_link(emu, api):
    link = api.get("accounts", headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
    ids = [_create(api, "accounts", {"name": f"n{i}"}) for i in range(5)]
    for row_id in ids[:3]:
        api.delete(f"accounts({row_id})")
    seen, page, pages = [], api.get(link, headers={"Prefer": "odata.maxpagesize=2"}).json(), 1
    while True:
        seen += page["value"]
        if "@odata.deltaLink" in page:
            break
        assert "@odata.deltaLink" not in page
        page, pages = api.get(page["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=2"}).json(), pages + 1
    assert pages == 3
    assert [r.get("name") for r in seen[:2]] == ["n3", "n4"]
    assert [r["id"] for r in seen[2:]] == ids[:3]


# -- metadata ------------------------------------------------------------------------------


def test_entity_definitions_and_attributes(api):
    tracked = api.get("EntityDefinitions", params={
        "$select": "LogicalName,EntitySetName", "$filter": "ChangeTrackingEnabled eq true"}).json()
    assert {e["LogicalName"]: e["EntitySetName"] for e in tracked["value"]} == {
        "account": "accounts", "contact": "contacts"}
    account = api.get("EntityDefinitions(LogicalName='account')", params={
        "$select": "PrimaryIdAttribute,PrimaryNameAttribute,ChangeTrackingEnabled",
        "$expand": "Keys($select=KeyAttributes)"}).json()
    assert account["PrimaryIdAttribute"] == "accountid" and account["PrimaryNameAttribute"] == "name"
    assert account["Keys"][0]["KeyAttributes"] == ["accountnumber"] and "MetadataId" in account
    attrs = api.get("EntityDefinitions(LogicalName='account')/Attributes", params={
        "$select": "LogicalName,AttributeType,RequiredLevel,IsValidForCreate",
        "$filter": "RequiredLevel/Value eq Microsoft.Dynamics.CRM.AttributeRequiredLevel'ApplicationRequired'"})
    assert [(a["LogicalName"], a["RequiredLevel"]["Value"]) for a in attrs.json()["value"]] == [
        ("name", "ApplicationRequired")]
    picklists = api.get("EntityDefinitions(LogicalName='account')/Attributes", params={
        "$filter": "AttributeType eq Microsoft.Dynamics.CRM.AttributeTypeCode'Picklist'",
        "$select": "LogicalName"}).json()["value"]
    assert [a["LogicalName"] for a in picklists] == ["industrycode"]
    lookup = api.get("EntityDefinitions(LogicalName='contact')/Attributes/"
                     "Microsoft.Dynamics.CRM.LookupAttributeMetadata",
                     params={"$select": "LogicalName,Targets"}).json()["value"]
    assert lookup == [{"@odata.type": "#Microsoft.Dynamics.CRM.LookupAttributeMetadata",
                       "MetadataId": lookup[0]["MetadataId"], "LogicalName": "parentcustomerid",
                       "Targets": ["account", "contact"]}]
    name = api.get("EntityDefinitions(LogicalName='account')/Attributes(LogicalName='name')").json()
    assert name["MaxLength"] == 160 and name["AttributeType"] == "String" and name["IsPrimaryName"]
    relations = api.get("EntityDefinitions(LogicalName='contact')/ManyToOneRelationships").json()["value"]
    assert {r["ReferencingEntityNavigationPropertyName"] for r in relations} == {
        "parentcustomerid_account", "parentcustomerid_contact"}
    assert api.get("EntityDefinitions(LogicalName='lead')").status_code == 404


def test_csdl_whoami_counts_and_service_document(api):
    xml = api.get("$metadata", params={"annotations": "true"})
    assert xml.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(xml.content)
    schema = root.find(f".//{EDM}Schema")
    assert schema.get("Namespace") == "Microsoft.Dynamics.CRM"
    account = schema.find(f"{EDM}EntityType[@Name='account']")
    assert account.find(f"{EDM}Key/{EDM}PropertyRef").get("Name") == "accountid"
    props = {p.get("Name"): p.get("Type") for p in account.findall(f"{EDM}Property")}
    assert props["_primarycontactid_value"] == "Edm.Guid" and props["revenue"] == "Edm.Decimal"
    contact = schema.find(f"{EDM}EntityType[@Name='contact']")
    assert {n.get("Name") for n in contact.findall(f"{EDM}NavigationProperty")} == {
        "parentcustomerid_account", "parentcustomerid_contact"}
    accounts_set = schema.find(f"{EDM}EntityContainer/{EDM}EntitySet[@Name='accounts']")
    capability = accounts_set.find(f"{EDM}Annotation[@Term='Org.OData.Capabilities.V1.ChangeTracking']")
    assert capability.find(f"{EDM}Record/{EDM}PropertyValue").get("Bool") == "true"
    plain = ET.fromstring(api.get("$metadata").content)
    assert plain.find(f".//{EDM}Annotation[@Term='Org.OData.Capabilities.V1.ChangeTracking']") is None

    who = api.get("WhoAmI").json()
    assert set(who) == {"@odata.context", "BusinessUnitId", "UserId", "OrganizationId"}
    _create(api, "accounts", {"name": "x"})
    counts = api.get("RetrieveTotalRecordCount(EntityNames=['account','contact'])").json()
    assert counts["EntityRecordCountCollection"]["Keys"] == ["account", "contact"]
    assert counts["EntityRecordCountCollection"]["Values"] == [1, 0]
    service = api.get("").json()
    assert {"name": "accounts", "kind": "EntitySet", "url": "accounts"} in service["value"]


def test_tables_declared_at_runtime_are_served(emu, api):
    emu.define_entity(entity("new_project", primary_name="new_name", attributes=[
        attribute("new_name", max_length=100, required="ApplicationRequired"),
        attribute("new_code", max_length=10),
        attribute("new_budget", "Money"),
        attribute("new_accountid", "Lookup", targets=("account",)),
    ], keys={"new_code_key": ("new_code",)}))
    account = _create(api, "accounts", {"name": "Owner"})
    created = api.patch("new_projects(new_code='P1')", json={
        "new_name": "Apollo", "new_budget": 10.5, "new_accountid@odata.bind": f"/accounts({account})"},
        headers={"Prefer": "return=representation"})
    assert created.status_code == 201 and created.json()["_new_accountid_value"] == account
    assert api.get("EntityDefinitions(LogicalName='new_project')").json()["EntitySetName"] == "new_projects"


# -- auth, limits, faults, persistence --------------------------------------------------------


def test_bad_or_expired_tokens_get_401(emu, api):
    assert api.get("WhoAmI").status_code == 200
    tls = ssl.create_default_context(cafile=emu.ca_bundle)

    def who(token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"{emu.api_url}WhoAmI", verify=tls, headers=headers)

    bare = who()
    assert bare.status_code == 401 and bare.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
    assert bare.json()["error"]["message"].startswith("Authentication failed")
    assert who("abc.def.ghi").status_code == 401
    assert who(emu.entra.issue_token(audience="https://other.crm.dynamics.com")).status_code == 401
    token = emu.entra.issue_token(audience=emu.url, ttl=60)
    assert who(token).status_code == 200
    emu.entra.advance(120)
    assert who(token).status_code == 401
    assert api.get("WhoAmI").status_code == 200  # MSAL's client renews after the 401


def test_service_protection_limits_answer_429_with_retry_after(cert_dir):
    with DataverseEmulator(cert_dir=cert_dir, limits=Limits(requests=5, window=3, concurrent=None,
                                                            execution=None)) as emulator, \
            _client(emulator) as api:
        statuses = [api.get("WhoAmI").status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        refused = api.get("WhoAmI")
        assert 1 <= int(refused.headers["Retry-After"]) <= 3
        assert _error(refused) == {"code": "0x80072322", "message": "Number of requests exceeded "
                                   "the limit of 5 over time window of 3 seconds."}
        # Honouring Retry-After is what is tested: the whole seconds it says, rounded up,
        # are enough for the oldest request to leave the window.
        time.sleep(int(refused.headers["Retry-After"]))
        assert api.get("WhoAmI").status_code == 200
        assert emulator.throttled == 2

    with DataverseEmulator(cert_dir=cert_dir, limits=Limits(requests=None, concurrent=1,
                                                            execution=None)) as emulator, \
            _client(emulator) as api:
        api.get("WhoAmI")  # token fetched before the race
        emulator.faults.latency = 0.5
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(api.get("WhoAmI"))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes[0] == 200 and 429 in codes
        refused = next(r for r in results if r.status_code == 429)
        assert _error(refused)["code"] == "0x80072326"


def test_fault_injection(emu, api):
    api.get("WhoAmI")
    emu.faults.fail_next(1, status=503)
    assert api.get("WhoAmI").status_code == 503
    emu.faults.drop_next(1)
    with pytest.raises(httpx.TransportError):
        api.get("WhoAmI")
    emu.faults.latency = 0.3
    started = time.monotonic()
    assert api.get("WhoAmI").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_store_keeps_data_across_restarts(cert_dir, tmp_path):
    path = tmp_path / "org.sqlite"
    project = entity("new_thing", attributes=[attribute("name")])
    with DataverseEmulator(cert_dir=cert_dir, store=path, seed=5, entities=[project]) as first, \
            _client(first) as api:
        assert api.get("accounts/$count").text == "5"
        kept = _create(api, "accounts", {"name": "kept", "accountnumber": "S-1"})
        gone = _create(api, "accounts", {"name": "gone"})
        link = api.get("accounts", headers={"Prefer": "odata.track-changes"}).json()["@odata.deltaLink"]
        api.delete(f"accounts({gone})")
        _create(api, "new_things", {"name": "t"})
        version = api.get(f"accounts({kept})").json()["versionnumber"]
        org = api.get("WhoAmI").json()["OrganizationId"]
    with DataverseEmulator(cert_dir=cert_dir, store=path, seed=5) as second, _client(second) as api:
        assert api.get("accounts/$count").text == "6"  # not seeded twice
        assert api.get("accounts(accountnumber='S-1')").json()["versionnumber"] == version
        assert api.get("new_things/$count").text == "1"
        assert api.get("WhoAmI").json()["OrganizationId"] == org
        link = link.replace(first.url, second.url)
        delta = api.get(link).json()["value"]
        assert [d["id"] for d in delta] == [gone]
        api.patch(f"accounts({kept})", json={"name": "again"})
        assert api.get(f"accounts({kept})").json()["versionnumber"] > version


def test_seed_loads_accounts_with_contacts(cert_dir):
    with DataverseEmulator(cert_dir=cert_dir, seed=40, limits=NO_LIMITS) as emulator, \
            _client(emulator) as api:
        accounts = api.get("accounts", params={"$select": "accountnumber,_primarycontactid_value"}).json()["value"]
        contacts = api.get("contacts", params={"$select": "_parentcustomerid_value"}).json()["value"]
        assert len(accounts) == 40 and 40 <= len(contacts) <= 120
        ids = {a["accountid"] for a in accounts}
        assert all(c["_parentcustomerid_value"] in ids for c in contacts)
        assert all(a["_primarycontactid_value"] for a in accounts)
        assert sorted(a["accountnumber"] for a in accounts)[0] == "ACC-000001"


# -- bulk operation messages ---------------------------------------------------------------

_ACCOUNT_TYPE = "Microsoft.Dynamics.CRM.account"


def test_create_multiple_returns_the_ids_of_the_created_records(api):
    """CreateMultiple answers 200 with ``Ids`` in request order.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/createmultiple
    (request and response example) and .../data-platform/bulk-operations.
    """
    targets = [{"@odata.type": _ACCOUNT_TYPE, "name": f"Bulk {n}", "accountnumber": f"BK-{n}"}
               for n in range(3)]
    response = api.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple",
                        json={"Targets": targets})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["@odata.context"].endswith("$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse")
    assert len(body["Ids"]) == 3
    for n, row_id in enumerate(body["Ids"]):
        assert api.get(f"accounts({row_id})").json()["accountnumber"] == f"BK-{n}"


def test_upsert_multiple_creates_and_updates_by_alternate_key_and_answers_204(api):
    """UpsertMultiple names rows by ``@odata.id`` (alternate key) or the primary id; 204.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/upsertmultiple
    ("The UpsertMultiple action returns 204 NoContent"; ``@odata.id`` with an alternate key).
    """
    existing = _create(api, "accounts", {"name": "Old", "accountnumber": "UP-1"})
    new_id = "5d9e4a1e-0000-4000-8000-000000000001"
    response = api.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [
        {"@odata.type": _ACCOUNT_TYPE, "@odata.id": "accounts(accountnumber='UP-1')",
         "name": "Updated"},
        {"@odata.type": _ACCOUNT_TYPE, "@odata.id": "accounts(accountnumber='UP-2')",
         "name": "Created by key"},
        {"@odata.type": _ACCOUNT_TYPE, "accountid": new_id, "name": "Created by id"}]})
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert api.get(f"accounts({existing})").json()["name"] == "Updated"
    assert api.get("accounts(accountnumber='UP-2')").json()["name"] == "Created by key"
    assert api.get(f"accounts({new_id})").json()["name"] == "Created by id"


def test_update_multiple_needs_existing_rows(api):
    """UpdateMultiple updates only: a missing row fails the request with a 404.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/updatemultiple
    and .../data-platform/bulk-operations (UpdateMultiple: each record needs its key).
    """
    row = _create(api, "accounts", {"name": "Before"})
    ok = api.post("accounts/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [
        {"@odata.type": _ACCOUNT_TYPE, "accountid": row, "name": "After"}]})
    assert ok.status_code == 204, ok.text
    assert api.get(f"accounts({row})").json()["name"] == "After"
    missing = api.post("accounts/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [
        {"@odata.type": _ACCOUNT_TYPE, "accountid": "00000000-0000-4000-8000-0000000000ff",
         "name": "Nobody"}]})
    assert missing.status_code == 404
    assert "Does Not Exist" in _error(missing)["message"]


def test_bulk_message_is_all_or_nothing_with_the_failing_records_error(api):
    """One bad record fails a bulk message on a standard table and nothing is written.

    Follows learn.microsoft.com/power-apps/developer/data-platform/bulk-operations
    (standard tables: an error in any record rolls the whole operation back).
    """
    targets = [{"@odata.type": _ACCOUNT_TYPE, "@odata.id": f"accounts(accountnumber='AN-{n}')",
                "name": f"Row {n}"} for n in range(5)]
    targets[3]["numberofemployees"] = -5  # out of range
    response = api.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
                        json={"Targets": targets})
    assert response.status_code == 400
    error = _error(response)
    assert "numberofemployees" in error["message"] and error["code"]
    assert api.get("accounts?$filter=startswith(accountnumber,'AN-')").json()["value"] == []


def test_bulk_message_limits_and_required_type_annotation(emu, api):
    """``@odata.type`` is required on every target; the record count is capped.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/createmultiple
    ("You must specify the @odata.type annotation with every item in the Targets
    parameter"). The cap is the emulator's ``Settings.max_bulk`` (Microsoft documents no
    fixed number; see docs/dataverse.md).
    """
    untyped = api.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple",
                       json={"Targets": [{"name": "No type"}]})
    assert untyped.status_code == 400 and "@odata.type" in _error(untyped)["message"]
    emu.service.settings.max_bulk = 2
    too_many = api.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple", json={
        "Targets": [{"@odata.type": _ACCOUNT_TYPE, "name": str(n)} for n in range(3)]})
    assert too_many.status_code == 400 and "maximum of 2" in _error(too_many)["message"]
    wrong_type = api.post("accounts/Microsoft.Dynamics.CRM.CreateMultiple", json={
        "Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.contact", "lastname": "X"}]})
    assert wrong_type.status_code == 400


def test_delete_multiple_is_for_elastic_tables_and_tables_may_lack_bulk_messages(emu, api):
    """DeleteMultiple is documented for elastic tables only; a table without the bulk
    messages answers like an unknown segment.

    Follows learn.microsoft.com/power-apps/developer/data-platform/bulk-operations
    ("DeleteMultiple: for elastic tables only"; not every table supports the messages).
    """
    response = api.post("accounts/Microsoft.Dynamics.CRM.DeleteMultiple",
                        json={"Targets": []})
    assert response.status_code == 400 and "elastic" in _error(response)["message"]
    emu.define_entity(entity("new_legacy", attributes=[attribute("name")],
                             bulk_messages=False))
    refused = api.post("new_legacys/Microsoft.Dynamics.CRM.CreateMultiple", json={
        "Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.new_legacy", "name": "x"}]})
    assert refused.status_code == 404
    assert "Microsoft.Dynamics.CRM.CreateMultiple" in _error(refused)["message"]


# -- option-set metadata and refusals instead of silent answers -----------------------------


def test_picklist_metadata_with_expanded_option_set(api):
    """The query client libraries send before writing option values.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api
    ("Retrieving attributes": cast to PicklistAttributeMetadata and
    ``$expand=OptionSet($select=Options),GlobalOptionSet($select=Options)``).
    """
    response = api.get("EntityDefinitions(LogicalName='account')/Attributes/"
                       "Microsoft.Dynamics.CRM.PicklistAttributeMetadata", params={
                           "$select": "LogicalName",
                           "$expand": "OptionSet($select=Options),GlobalOptionSet($select=Options)"})
    assert response.status_code == 200, response.text
    items = {i["LogicalName"]: i for i in response.json()["value"]}
    assert set(items) == {"industrycode"}
    options = items["industrycode"]["OptionSet"]["Options"]
    assert [o["Value"] for o in options] == list(range(1, 34))
    assert options[0]["Label"]["UserLocalizedLabel"]["Label"]
    assert items["industrycode"]["GlobalOptionSet"] is None
    state = api.get("EntityDefinitions(LogicalName='account')/Attributes/"
                    "Microsoft.Dynamics.CRM.StateAttributeMetadata",
                    params={"$select": "LogicalName", "$expand": "OptionSet"}).json()["value"][0]
    assert [(o["Value"], o["Label"]["UserLocalizedLabel"]["Label"])
            for o in state["OptionSet"]["Options"]] == [(0, "Active"), (1, "Inactive")]
    assert state["OptionSet"]["OptionSetType"] == "State"
    # OptionSet is a property of the enum attribute types only, not of AttributeMetadata
    plain = api.get("EntityDefinitions(LogicalName='account')/Attributes",
                    params={"$expand": "OptionSet"})
    assert plain.status_code == 400 and "OptionSet" in _error(plain)["message"]


def test_metadata_filter_on_an_unknown_property_is_a_400(api):
    """Dataverse validates ``$filter`` properties against the metadata type.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api
    (filtering EntityDefinitions and Attributes by their properties) and the error
    shape of .../webapi/compose-http-requests-handle-errors.
    """
    bad = api.get("EntityDefinitions", params={"$filter": "NoSuchProperty eq true"})
    assert bad.status_code == 400
    assert _error(bad)["message"] == ("Could not find a property named 'NoSuchProperty' on "
                                      "type 'Microsoft.Dynamics.CRM.EntityMetadata'.")
    bad_attr = api.get("EntityDefinitions(LogicalName='account')/Attributes",
                       params={"$filter": "Bogus eq 1"})
    assert bad_attr.status_code == 400 and "AttributeMetadata" in _error(bad_attr)["message"]
    good = api.get("EntityDefinitions", params={"$filter": "ChangeTrackingEnabled eq true",
                                                "$select": "LogicalName"})
    assert good.status_code == 200 and good.json()["value"]


@pytest.mark.parametrize("query", [
    {"fetchXml": "<fetch><entity name='account'><attribute name='name'/></entity></fetch>"},
    {"sql": "SELECT name FROM account WHERE name = 'x'"},
    {"savedQuery": "00000000-0000-0000-0000-000000000001"}])
def test_queries_the_emulator_does_not_run_are_refused_not_ignored(api, query):
    """Dataverse runs these (learn.microsoft.com/power-apps/developer/data-platform/fetchxml/
    retrieve-data?tabs=webapi, .../webapi/retrieve-and-execute-predefined-queries); the
    emulator answers 501 with Dataverse's error body instead of every row unfiltered."""
    _create(api, "accounts", {"name": "Visible"})
    response = api.get("accounts", params=query)
    assert response.status_code == 501
    assert "not supported by the emulator" in _error(response)["message"]


def test_unknown_options_and_expand_on_a_single_record_are_400(api):
    """Unknown system query options are an error in OData, and ``$expand`` on a record is
    not silently dropped.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/retrieve-entity-using-web-api
    (``$select``/``$expand`` on a single record) and .../webapi/compose-http-requests-handle-errors.
    """
    row = _create(api, "accounts", {"name": "One"})
    for target, params in [("accounts", {"$bogus": "1"}), (f"accounts({row})", {"$bogus": "1"}),
                           (f"accounts({row})", {"$expand": "primarycontactid"}),
                           (f"accounts({row})", {"$filter": "name eq 'One'"}),
                           (f"accounts({row})/name", {"$bogus": "1"})]:
        response = api.get(target, params=params)
        assert response.status_code == 400, (target, params, response.text)
        assert _error(response)["code"] == "0x80060888"
    assert api.get(f"accounts({row})", params={"$select": "name"}).json()["name"] == "One"


def test_relationships_carry_the_schema_names_of_a_real_organisation(api):
    """``$expand`` and associate code written against a real org use these names.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/associate-disassociate-entities-using-web-api
    (``contact_customer_accounts``) and the account/contact table references
    (.../reference/entities/account: ``account_primary_contact``).
    """
    to_one = api.get("EntityDefinitions(LogicalName='contact')/ManyToOneRelationships",
                     params={"$select": "SchemaName,ReferencedEntity"}).json()["value"]
    assert {(r["SchemaName"], r["ReferencedEntity"]) for r in to_one} >= {
        ("contact_customer_accounts", "account"), ("contact_customer_contacts", "contact")}
    from_account = api.get("EntityDefinitions(LogicalName='account')/ManyToOneRelationships",
                           params={"$select": "SchemaName"}).json()["value"]
    assert [r["SchemaName"] for r in from_account] == ["account_primary_contact"]
    to_many = api.get("EntityDefinitions(LogicalName='account')/OneToManyRelationships",
                      params={"$select": "SchemaName,ReferencedEntityNavigationPropertyName"})
    assert {r["ReferencedEntityNavigationPropertyName"] for r in to_many.json()["value"]} == {
        "contact_customer_accounts"}


def test_batch_request_lines_may_carry_unencoded_spaces(api):
    """The service takes the URL between the first and the last space of a request line.

    Follows learn.microsoft.com/power-apps/developer/data-platform/webapi/execute-batch-operations-using-web-api
    (its examples send ``$filter`` and ``$select`` unencoded inside the batch).
    """
    _create(api, "accounts", {"name": "Spaced Out", "accountnumber": "SP-1"})
    body = ("--batch_sp\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
            "\r\nGET /api/data/v9.2/accounts?$select=name&$filter=name eq 'Spaced Out' HTTP/1.1\r\n"
            "Accept: application/json\r\n\r\n--batch_sp--\r\n")
    response = api.post("$batch", content=body.encode(),
                        headers={"Content-Type": "multipart/mixed; boundary=batch_sp"})
    assert response.status_code == 200, response.text
    [result] = decode_responses(response.content, response.headers["content-type"])
    assert result.status == 200, result.body
    assert [r["name"] for r in json.loads(result.body)["value"]] == ["Spaced Out"]

"""The Business Central emulator's conformance to the reference (§2, §6.3), over real HTTP(S).

Raw httpx requests with tokens the fake Entra ID issued: routing, ETag and If-Match
rules, query options and paging, delta links refused, JSON $batch, Resco's row-version
pages on one counter, errors, throttling, faults, and --store persistence.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from connectors.business_central.emulator import BusinessCentralEmulator
from tests.support import wait_for

pytestmark = pytest.mark.integration

RESCO = "Resco/RescoIntegrations/v2.0"
CUSTOM = "syncbus/tracking/v1.0"
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def emu(cert_dir):
    with BusinessCentralEmulator(cert_dir=cert_dir, seed=12, max_page_size=50) as emulator:
        yield emulator


def _trust(emu: BusinessCentralEmulator) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=emu.ca_bundle) if emu.ca_bundle else True


@pytest.fixture
def http(emu):
    with httpx.Client(verify=_trust(emu), timeout=10,
                      headers={"Authorization": f"Bearer {emu.issue_token()}"}) as client:
        yield client


def _error(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    assert "CorrelationId:" in error["message"]
    return response.status_code, error["code"], error["message"]


def test_companies_and_entities_over_https_and_plain_http(emu, http, cert_dir):
    companies = http.get(f"{emu.api_url()}/companies").json()["value"]
    assert [c["name"] for c in companies] == ["CRONUS USA, Inc."]
    assert set(companies[0]) >= {"id", "systemVersion", "name", "displayName", "businessProfileId"}
    for entity in ("customers", "vendors", "contacts", "items", "salesOrders"):
        rows = http.get(f"{emu.company_url()}/{entity}").json()["value"]
        assert rows and all(GUID.match(r["id"]) and r["number"] for r in rows), entity
    order = http.get(f"{emu.company_url()}/salesOrders", params={"$top": "1"}).json()["value"][0]
    lines = http.get(f"{emu.company_url()}/salesOrders({order['id']})/salesOrderLines").json()
    assert lines["value"] and {ln["documentId"] for ln in lines["value"]} == {order["id"]}
    assert order["totalAmountExcludingTax"] == round(
        sum(ln["amountExcludingTax"] for ln in lines["value"]), 2)

    with BusinessCentralEmulator(https=False) as plain:
        token = plain.issue_token()
        answer = httpx.get(f"{plain.api_url()}/companies", headers={"Authorization": f"Bearer {token}"})
        assert plain.url.startswith("http://") and answer.status_code == 200


def test_bearer_token_is_required_and_checked(emu, http):
    url = f"{emu.company_url()}/customers"
    for headers in ({}, {"Authorization": "Bearer garbage"}):
        answer = httpx.get(url, headers=headers, verify=_trust(emu))
        assert _error(answer)[:2] == (401, "Authentication_InvalidCredentials")
        assert answer.headers["www-authenticate"].startswith("Bearer authorization_uri=")
    emu.entra.advance(7200)  # the token of `http` expires
    assert http.get(url).status_code == 401
    other = f"{emu.url}/v2.0/{emu.tenant}/sandbox/api/v2.0/companies"
    emu.entra.advance(-7200)
    assert http.get(other).status_code == 404


def test_post_assigns_id_number_series_time_and_etag(emu, http):
    before = datetime.now(UTC) - timedelta(seconds=1)
    created = http.post(f"{emu.company_url()}/customers", json={"displayName": "Alpine Ski"})
    assert created.status_code == 201
    body = created.json()
    assert GUID.match(body["id"]) and body["number"] == "C00130"  # 12 seeded: C00010…C00120
    assert body["@odata.etag"].startswith('W/"JzQ0O') and body["@odata.etag"].endswith('"')
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", body["lastModifiedDateTime"])
    assert datetime.fromisoformat(body["lastModifiedDateTime"].replace("Z", "+00:00")) >= before
    second = http.post(f"{emu.company_url()}/customers", json={"displayName": "B"}).json()
    assert second["number"] == "C00140"
    duplicate = http.post(f"{emu.company_url()}/customers", json={"number": "C00130"})
    assert _error(duplicate)[:2] == (400, "Internal_EntityWithSameKeyExists")
    too_long = http.post(f"{emu.company_url()}/customers", json={"displayName": "x" * 101})
    assert _error(too_long)[:2] == (400, "Application_StringExceededLength")
    unknown = http.post(f"{emu.company_url()}/customers", json={"nope": 1})
    assert _error(unknown)[:2] == (400, "BadRequest_PropertyNotFound")


def test_patch_and_delete_need_if_match_and_refuse_stale_etags(emu, http):
    url = f"{emu.company_url()}/customers"
    row = http.post(url, json={"displayName": "Etag Test"}).json()
    one = f"{url}({row['id']})"
    assert _error(http.patch(one, json={"displayName": "x"}))[:2] == (400, "BadRequest_InvalidToken")
    assert _error(http.delete(one))[:2] == (400, "BadRequest_InvalidToken")

    patched = http.patch(one, json={"displayName": "New"}, headers={"If-Match": row["@odata.etag"]})
    assert patched.status_code == 200 and patched.json()["displayName"] == "New"
    assert patched.json()["@odata.etag"] != row["@odata.etag"]
    assert set(patched.json()) == set(row) | {"@odata.context"}  # the full entity
    assert patched.json()["lastModifiedDateTime"] >= row["lastModifiedDateTime"]

    stale = http.patch(one, json={"displayName": "Late"}, headers={"If-Match": row["@odata.etag"]})
    status, code, message = _error(stale)
    assert (status, code) == (409, "Request_EntityChanged")
    assert message.startswith("Another user has already changed the record.")
    assert _error(http.delete(one, headers={"If-Match": row["@odata.etag"]}))[0] == 409
    assert http.patch(one, json={"city": "Oslo"}, headers={"If-Match": "*"}).status_code == 200
    assert http.delete(one, headers={"If-Match": "*"}).status_code == 204
    assert _error(http.get(one))[:2] == (404, "Internal_RecordNotFound")


def test_stale_etag_status_can_be_412(cert_dir):
    with BusinessCentralEmulator(cert_dir=cert_dir, seed=1, stale_status=412) as emu:
        headers = {"Authorization": f"Bearer {emu.issue_token()}", "If-Match": 'W/"JzE7Jw=="'}
        row = emu.rows("customers")[0]
        answer = httpx.patch(f"{emu.company_url()}/customers({row['id']})", json={"city": "X"},
                             headers=headers, verify=_trust(emu))
        assert _error(answer)[:2] == (412, "Request_EntityChanged")


def test_filter_select_orderby_top_skip_count(emu, http):
    url = f"{emu.company_url()}/customers"
    everyone = http.get(url).json()["value"]
    middle = sorted(r["lastModifiedDateTime"] for r in everyone)[0]
    emu.update("customers", everyone[3]["id"], {"city": "Zurich"})
    later = http.get(url, params={"$filter": f"lastModifiedDateTime gt {middle}"}).json()["value"]
    assert everyone[3]["id"] in {r["id"] for r in later}
    assert all(r["lastModifiedDateTime"] > middle for r in later)

    picked = http.get(url, params={"$filter": "city eq 'ZURICH' and creditLimit ge 0",
                                   "$select": "number,city"}).json()["value"]
    assert [set(r) for r in picked] == [{"@odata.etag", "number", "city"}]
    ordered = http.get(url, params={"$orderby": "number desc", "$top": "3", "$skip": "1",
                                    "$count": "true"}).json()
    numbers = sorted((r["number"] for r in everyone), reverse=True)
    assert [r["number"] for r in ordered["value"]] == numbers[1:4]
    assert ordered["@odata.count"] == len(everyone)
    contains = http.get(url, params={"$filter": f"contains(displayName, '{everyone[0]['displayName'][1:5]}')"})
    assert everyone[0]["id"] in {r["id"] for r in contains.json()["value"]}
    distinct_or = http.get(url, params={"$filter": "city eq 'A' or number eq 'B'"})
    assert "'OR' operator is not supported on distinct fields" in _error(distinct_or)[2]
    assert http.get(url, params={"$filter": "number eq 'C00010' or number eq 'C00020'"}).json()["value"]
    assert _error(http.get(url, params={"$select": "nope"}))[0] == 400
    assert _error(http.get(url, params={"$filter": "number eq"}))[0] == 400


def test_server_driven_paging_with_next_links_and_the_cap(cert_dir):
    with BusinessCentralEmulator(cert_dir=cert_dir, seed=60, max_page_size=25) as emu, \
            httpx.Client(verify=_trust(emu), headers={
                "Authorization": f"Bearer {emu.issue_token()}"}) as http:
        url = f"{emu.company_url()}/customers"
        first = http.get(url, headers={"Prefer": "odata.maxpagesize=7"})
        assert first.headers["preference-applied"] == "odata.maxpagesize=7"
        seen, body = [], first.json()
        while True:
            seen += [r["number"] for r in body["value"]]
            assert len(body["value"]) <= 7
            if "@odata.nextLink" not in body:
                break
            body = http.get(body["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=7"}).json()
        assert seen == sorted(r["number"] for r in emu.rows("customers")) and len(seen) == 60
        capped = http.get(url, headers={"Prefer": "odata.maxpagesize=1000"}).json()
        assert len(capped["value"]) == 25 and "@odata.nextLink" in capped  # the cap wins
        unasked = http.get(url).json()
        assert len(unasked["value"]) == 25 and "$skiptoken=" in unasked["@odata.nextLink"]
        topped = http.get(url, params={"$top": "30"}, headers={"Prefer": "odata.maxpagesize=20"})
        rest = http.get(topped.json()["@odata.nextLink"]).json()
        assert len(topped.json()["value"]) + len(rest["value"]) == 30 and "@odata.nextLink" not in rest


def test_delta_links_are_refused_like_current_business_central(emu, http):
    answer = http.get(f"{emu.company_url()}/customers", headers={"Prefer": "odata.track-changes"})
    status, _, message = _error(answer)
    assert status == 500 and message.startswith("Entity does not support delta requests")


def test_json_batch_limits_and_snapshot_isolation(emu, http):
    url = f"{emu.api_url()}/$batch"
    company = f"companies({emu.company.id})"
    ops = [{"id": str(i), "method": "POST", "url": f"{company}/vendors",
            "headers": {"Content-Type": "application/json"}, "body": {"displayName": f"V{i}"}}
           for i in range(101)]
    assert _error(http.post(url, json={"requests": ops}))[0] == 400
    before = len(emu.rows("vendors"))

    bad = {"id": "x", "method": "POST", "url": f"{company}/vendors", "body": {"displayName": "y" * 200}}
    atomic = http.post(url, json={"requests": [*ops[:3], bad]}, headers={"Isolation": "snapshot"})
    statuses = [r["status"] for r in atomic.json()["responses"]]
    assert atomic.status_code == 200 and statuses == [424, 424, 424, 400]
    assert len(emu.rows("vendors")) == before  # everything rolled back

    loose = http.post(url, json={"requests": [*ops[:3], bad]}).json()["responses"]
    assert [r["status"] for r in loose] == [201, 201, 201, 400]
    assert loose[3]["body"]["error"]["code"] == "Application_StringExceededLength"
    assert len(emu.rows("vendors")) == before + 3
    row = loose[0]["body"]
    mixed = http.post(url, json={"requests": [
        {"id": "g", "method": "GET", "url": f"{company}/vendors({row['id']})"},
        {"id": "p", "method": "PATCH", "url": f"{company}/vendors({row['id']})",
         "headers": {"If-Match": row["@odata.etag"]}, "body": {"city": "Rome"}},
        {"id": "d", "method": "DELETE", "url": f"{company}/vendors({row['id']})",
         "headers": {"If-Match": row["@odata.etag"]}}]}).json()["responses"]
    assert [(r["id"], r["status"]) for r in mixed] == [("g", 200), ("p", 200), ("d", 409)]


def test_resco_pages_and_custom_pages_share_one_row_version_counter(emu, http):
    resco = f"{emu.company_url(RESCO)}/RescoCustomer"
    custom = f"{emu.company_url(CUSTOM)}/trackedVendors"
    page = http.get(resco).json()["value"]
    assert set(page[0]) >= {"No", "Name", "Email", "SystemModifiedAt", "RowVersionNumber"}
    one = http.get(f"{resco}('{page[0]['No']}')").json()
    assert one["No"] == page[0]["No"]
    start = max(r["RowVersionNumber"] for r in page)

    customer = emu.rows("customers")[0]
    emu.update("customers", customer["id"], {"city": "Oslo"})
    vendor = emu.rows("vendors")[0]
    emu.update("vendors", vendor["id"], {"city": "Bergen"})
    emu.update("customers", customer["id"], {"city": "Paris"})
    first = http.get(resco, params={"$filter": f"RowVersionNumber gt {start}"}).json()["value"]
    assert [r["No"] for r in first] == [customer["number"]]
    vendors = http.get(custom, params={"$filter": "systemRowVersion gt 0",
                                       "$orderby": "systemRowVersion desc", "$top": "1"}).json()
    v_version = vendors["value"][0]["systemRowVersion"]
    c_version = first[0]["RowVersionNumber"]
    assert start < v_version < c_version  # customer, vendor, customer: one counter
    items = http.get(f"{emu.company_url(RESCO)}/RescoItem", params={"$top": "1"}).json()["value"]
    assert {"no", "rowVersionNumber", "systemModifiedAt"} <= set(items[0])
    meta = http.get(f"{emu.api_url(RESCO)}/$metadata")
    assert meta.status_code == 200 and '<PropertyRef Name="No"/>' in meta.text
    lower = http.get(f"{emu.url}/v2.0/{emu.tenant}/{emu.environment}/api/resco/rescointegrations"
                     f"/v2.0/companies({emu.company.id})/RescoCustomer", params={"$top": "1"})
    assert lower.status_code == 200  # the publisher is case-insensitive for plain calls


def test_429_without_retry_after_and_injected_faults(emu, http):
    url = f"{emu.company_url()}/items"
    emu.throttle(3, window=60)
    answers = [http.get(url) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert "retry-after" not in answers[3].headers
    assert _error(answers[3])[1] == "Application_TooManyRequests"
    emu.throttle(None)
    emu.faults.fail_next(2, status=503)
    assert [http.get(url).status_code for _ in range(3)] == [503, 503, 200]
    token = http.post(f"{emu.url}/{emu.tenant}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": emu.client_id,
        "client_secret": emu.client_secret,
        "scope": "https://api.businesscentral.dynamics.com/.default"})
    assert token.status_code == 200  # identity endpoints are never throttled


def test_store_keeps_data_series_counter_and_subscriptions_across_restarts(tmp_path, cert_dir):
    store = tmp_path / "bc.sqlite"
    with BusinessCentralEmulator(cert_dir=cert_dir, seed=3, store=store) as first:
        created = first.insert("customers", {"displayName": "Kept"})
        first.delete("customers", first.rows("customers")[0]["id"])
        company, counter = first.company.id, first.store.counter
    with BusinessCentralEmulator(cert_dir=cert_dir, seed=50, store=store) as second:
        assert second.company.id == company and len(second.rows("customers")) == 3  # not re-seeded
        kept = second.get("customers", created["id"])
        assert kept is not None and kept["displayName"] == "Kept"
        assert second.store.counter == counter
        assert second.insert("customers", {"displayName": "Next"})["number"] == "C00050"
        assert second.store.counter > counter


def test_syncbus_emulate_bc_serves_until_stopped(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "bus.cli", "emulate", "bc", "--port", "0",
                             "--seed", "2", "--cert-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        stdout = proc.stdout
        assert stdout is not None

        def listening() -> bool:
            lines.append(stdout.readline())
            return "listening on" in lines[-1]

        wait_for(listening, timeout=30, message=lambda: "".join(lines))
        text = "".join(lines)
        assert "tenant" in text and "client_secret" in text and "CRONUS USA, Inc." in text
    finally:
        proc.terminate()
        proc.wait(15)

"""Business Central webhooks, over real HTTP: the emulator's subscriptions (handshake,
expiry, renewal, notifications, collection, retries, deletion on errors) and the
connector's use of them (subscribe, renew, deletes from ``deleted`` notifications,
early polls)."""

from __future__ import annotations

import json
import ssl
import threading
from collections import deque
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from connectors.base import Op
from connectors.business_central import BusinessCentralConnector
from connectors.business_central.emulator import BusinessCentralEmulator
from tests.support import pick_free_port, wait_for

pytestmark = pytest.mark.integration

THREE_DAYS = 3 * 86400


class Receiver:
    """A notification endpoint whose answers the test scripts."""

    def __init__(self) -> None:
        self.handshakes: list[str] = []
        self.bodies: list[dict] = []
        self.script: deque[tuple[int, str | None]] = deque()  # (status, body) overrides
        self.echo_token = True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                query = parse_qs(urlsplit(self.path).query)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, text = outer.script.popleft() if outer.script else (200, None)
                if "validationToken" in query:
                    token = query["validationToken"][0]
                    outer.handshakes.append(token)
                    text = token if outer.echo_token and text is None else (text or "nope")
                else:
                    outer.bodies.append({"status": status, **json.loads(raw)})
                data = (text or "").encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self) -> list[dict]:
        return [n for b in self.bodies if 200 <= b["status"] < 300 for n in b["value"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def emu(cert_dir):
    with BusinessCentralEmulator(cert_dir=cert_dir, seed=5, webhook_debounce=0.05,
                                 webhook_collection_threshold=3,
                                 webhook_retry_delays=(0.05,)) as emulator:
        yield emulator


@pytest.fixture
def receiver():
    rec = Receiver()
    yield rec
    rec.close()


@pytest.fixture
def http(emu):
    with httpx.Client(verify=ssl.create_default_context(cafile=emu.ca_bundle), timeout=10,
                      headers={"Authorization": f"Bearer {emu.issue_token()}"}) as client:
        yield client


def _subscribe(emu, http, receiver, entity="customers", api="v2.0", state="s3cret"):
    return http.post(f"{emu.api_url(api)}/subscriptions", json={
        "notificationUrl": receiver.url, "clientState": state,
        "resource": f"/api/{api}/companies({emu.company.id})/{entity}"})


def _expiry(sub: dict) -> datetime:
    return datetime.fromisoformat(sub["expirationDateTime"].replace("Z", "+00:00"))


def test_subscription_needs_the_validation_handshake(emu, http, receiver):
    created = _subscribe(emu, http, receiver)
    assert created.status_code == 201, created.text
    sub = created.json()
    assert len(receiver.handshakes) == 1 and len(sub["subscriptionId"]) == 32
    assert abs(_expiry(sub) - (datetime.now(UTC) + timedelta(days=3))) < timedelta(minutes=1)
    assert sub["clientState"] == "s3cret" and sub["@odata.etag"].startswith('W/"')

    receiver.echo_token = False  # answers 200 without the token
    refused = _subscribe(emu, http, receiver, entity="vendors")
    assert refused.status_code == 400 and "not validated" in refused.json()["error"]["message"]
    receiver.script.append((500, None))
    assert _subscribe(emu, http, receiver, entity="items").status_code == 400
    listed = http.get(f"{emu.api_url()}/subscriptions").json()["value"]
    assert [s["subscriptionId"] for s in listed] == [sub["subscriptionId"]]


def test_only_supported_resources_on_their_own_route(emu, http, receiver):
    assert _subscribe(emu, http, receiver, entity="contacts").status_code == 400
    resco = "Resco/RescoIntegrations/v2.0"
    wrong_route = http.post(f"{emu.api_url()}/subscriptions", json={
        "notificationUrl": receiver.url,
        "resource": f"/api/{resco}/companies({emu.company.id})/RescoCustomer"})
    assert wrong_route.status_code == 400
    wrong_case = http.post(f"{emu.api_url(resco)}/subscriptions", json={
        "notificationUrl": receiver.url,
        "resource": f"/api/resco/RescoIntegrations/v2.0/companies({emu.company.id})/RescoCustomer"})
    assert wrong_case.status_code == 400  # the publisher is case-sensitive here
    assert _subscribe(emu, http, receiver, entity="RescoCustomer", api=resco).status_code == 201


def test_created_updated_deleted_notifications(emu, http, receiver):
    sub = _subscribe(emu, http, receiver).json()
    row = emu.insert("customers", {"displayName": "Hooked"})
    wait_for(lambda: len(receiver.notifications()) == 1)
    emu.update("customers", row["id"], {"city": "Oslo"})
    wait_for(lambda: len(receiver.notifications()) == 2)
    emu.delete("customers", row["id"])
    emu.insert("vendors", {"displayName": "not subscribed"})
    wait_for(lambda: len(receiver.notifications()) == 3)
    notes = receiver.notifications()
    assert [n["changeType"] for n in notes] == ["created", "updated", "deleted"]
    assert {n["resource"] for n in notes} == {
        f"api/v2.0/companies({emu.company.id})/customers({row['id']})"}
    assert all(n["subscriptionId"] == sub["subscriptionId"] and n["clientState"] == "s3cret"
               and n["expirationDateTime"] == sub["expirationDateTime"]
               and n["lastModifiedDateTime"].endswith("Z") for n in notes)


def test_many_changes_become_one_collection_notification(emu, http, receiver):
    _subscribe(emu, http, receiver)
    with emu.store.transaction():
        for i in range(5):  # above the threshold of 3
            emu.insert("customers", {"displayName": f"Bulk {i}"})
    wait_for(lambda: receiver.notifications())
    (note,) = receiver.notifications()
    assert note["changeType"] == "collection"
    assert "/customers?$filter=lastModifiedDateTime gt " in note["resource"]


def test_delivery_is_retried_on_503_and_the_subscription_deleted_on_404(emu, http, receiver):
    _subscribe(emu, http, receiver)
    receiver.script.extend([(503, None), (429, None)])
    emu.insert("customers", {"displayName": "Retry me"})
    wait_for(lambda: receiver.notifications(), timeout=10)
    assert [b["status"] for b in receiver.bodies] == [503, 429, 200]
    assert http.get(f"{emu.api_url()}/subscriptions").json()["value"]

    receiver.script.append((404, None))
    emu.insert("customers", {"displayName": "Gone"})
    wait_for(lambda: not http.get(f"{emu.api_url()}/subscriptions").json()["value"])
    emu.insert("customers", {"displayName": "Not delivered"})
    emu.webhooks.flush()
    assert [b["status"] for b in receiver.bodies] == [503, 429, 200, 404]


def test_three_day_expiry_and_renewal_with_a_new_handshake(emu, http, receiver):
    sub = _subscribe(emu, http, receiver).json()
    url = f"{emu.api_url()}/subscriptions('{sub['subscriptionId']}')"
    assert http.patch(url, json={}).status_code == 400  # If-Match is required
    emu.clock.advance(2 * 86400)
    renewed = http.patch(url, json={}, headers={"If-Match": sub["@odata.etag"]})
    assert renewed.status_code == 200 and len(receiver.handshakes) == 2
    assert _expiry(renewed.json()) - _expiry(sub) >= timedelta(days=2) - timedelta(seconds=5)
    stale = http.patch(url, json={}, headers={"If-Match": sub["@odata.etag"]})
    assert stale.status_code == 409

    emu.clock.advance(THREE_DAYS + 1)
    assert http.get(f"{emu.api_url()}/subscriptions").json()["value"] == []
    emu.insert("customers", {"displayName": "After expiry"})
    emu.webhooks.flush()
    assert receiver.notifications() == []


def test_connector_subscribes_renews_and_turns_deleted_notifications_into_deletes(
        emu, tmp_path):
    port = pick_free_port()
    woken: list[str] = []
    connector = BusinessCentralConnector("bc", **emu.connection(
        index_url=f"sqlite:///{tmp_path}/index.db",
        webhooks={"notification_url": f"http://127.0.0.1:{port}/bc", "client_state": "abc",
                  "listen": f"127.0.0.1:{port}", "renew_before": 4 * 86400},
        entities={"customers": {"webhook": True}}))
    connector.add_change_listener(woken.append)
    try:
        cursor = None
        for page in connector.read_changes("customers", cursor, 100):
            cursor = page.next_cursor
        subs = emu.webhooks.all()
        assert [(s.entity_set, s.client_state) for s in subs] == [("customers", "abc")]
        first_expiry = subs[0].expiration

        victim = emu.rows("customers")[2]
        emu.delete("customers", victim["id"])
        wait_for(lambda: "customers" in woken, message="no notification reached the connector")
        assert connector.has_changes("customers", cursor)
        records = [r for p in connector.read_changes("customers", cursor, 100) for r in p.records]
        assert [(r.op, r.key) for r in records] == [
            (Op.DELETE, {"id": victim["id"], "number": victim["number"]})]

        emu.clock.advance(3600)
        lines = connector.prepare_tracking(["customers"])  # checks now; renew_before > 3 days
        assert "deletions by webhook" in lines[0]
        assert emu.webhooks.all()[0].expiration > first_expiry
        assert len(emu.webhooks.all()) == 1
    finally:
        connector.close()


def test_connector_generates_a_client_state_and_renews_a_subscription_made_with_another(
        emu, http, tmp_path):
    port = pick_free_port()
    connector = BusinessCentralConnector("bc", **emu.connection(
        index_url=f"sqlite:///{tmp_path}/index.db",
        webhooks={"notification_url": f"http://127.0.0.1:{port}/bc", "listen": str(port)},
        entities={"customers": {"webhook": True}}))
    try:
        connector.start_webhooks()
        assert connector.webhook_address == ("127.0.0.1", port)  # a bare port: loopback only
        made_before = http.post(f"{emu.api_url()}/subscriptions", json={
            "notificationUrl": f"http://127.0.0.1:{port}/bc", "clientState": "",
            "resource": f"/api/v2.0/companies({emu.company.id})/customers"})
        assert made_before.status_code == 201, made_before.text
        assert connector.has_changes("customers", None)  # checks the subscription
        (sub,) = emu.webhooks.all()
        assert sub.id == made_before.json()["subscriptionId"] and len(sub.client_state) >= 32

        victim = emu.rows("customers")[0]
        cursor = None
        for page in connector.read_changes("customers", cursor, 100):
            cursor = page.next_cursor
        emu.delete("customers", victim["id"])
        emu.webhooks.flush()
        wait_for(lambda: [d.status for d in emu.webhooks.deliveries] == [202],  # secret echoed
                 message=lambda: f"deliveries {emu.webhooks.deliveries}")
        records = [r for p in connector.read_changes("customers", cursor, 100) for r in p.records]
        assert [(r.op, r.key["id"]) for r in records] == [(Op.DELETE, victim["id"])]
    finally:
        connector.close()


def test_receiver_refuses_what_is_not_a_notification_of_ours(emu, tmp_path):
    reasons: list[str] = []
    woken: list[str] = []
    connector = BusinessCentralConnector("bc", **emu.connection(
        index_url=f"sqlite:///{tmp_path}/index.db",
        webhooks={"notification_url": "http://127.0.0.1:9/bc", "listen": ":0",
                  "client_state": "abc"},
        entities={"customers": {"webhook": True}, "vendors": {}}))
    connector.add_rejection_listener(reasons.append)
    connector.add_change_listener(woken.append)
    try:
        connector.start_webhooks()
        host, port = connector.webhook_address or ("", 0)
        assert host == "127.0.0.1"
        url = f"http://127.0.0.1:{port}/bc"

        def note(entity: str = "customers", company: str = emu.company.id,
                 state: str = "abc") -> dict:
            return {"value": [{"clientState": state, "changeType": "updated",
                               "resource": f"api/v2.0/companies({company})/{entity}(x)"}]}

        assert httpx.post(url, content=b"{not json").status_code == 400
        assert httpx.post(url, json={"value": "x"}).status_code == 400
        too_big = httpx.post(url, content=b" " * (4 * 1024 * 1024 + 1))
        assert too_big.status_code == 413
        assert httpx.post(url, json=note("vendors")).status_code == 401  # not subscribed
        other = "6d1a2b3c-0000-4000-8000-00000000beef"
        assert httpx.post(url, json=note(company=other)).status_code == 401
        assert httpx.post(url, json=note(state="abd")).status_code == 401
        mixed = note()
        mixed["value"].append({**mixed["value"][0], "clientState": "nope"})
        assert httpx.post(url, json=mixed).status_code == 401  # one bad item: none is taken
        assert reasons == ["malformed", "malformed", "too_large", "unknown_resource",
                           "unknown_resource", "wrong_client_state", "wrong_client_state"]
        assert woken == []
        assert httpx.post(url, json=note()).status_code == 202
        assert woken == ["customers"]
    finally:
        connector.close()


def test_deleted_notifications_are_confirmed_with_business_central_before_deleting(
        emu, tmp_path):
    resco = "Resco/RescoIntegrations/v2.0"
    port = pick_free_port()
    connector = BusinessCentralConnector("bc", **emu.connection(
        index_url=f"sqlite:///{tmp_path}/index.db",
        webhooks={"notification_url": f"http://127.0.0.1:{port}/bc",
                  "listen": f"127.0.0.1:{port}", "client_state": "abc"},
        entities={"RescoCustomer": {"webhook": True}}))
    try:
        cursor = None
        for page in connector.read_changes("RescoCustomer", cursor, 100):
            cursor = page.next_cursor
        kept, gone = emu.rows("RescoCustomer", api=resco)[:2]
        emu.delete("RescoCustomer", gone["No"], api=resco)
        prefix = f"api/{resco}/companies({emu.company.id})/RescoCustomer"
        claims = {"value": [
            {"clientState": "abc", "changeType": "deleted",
             "resource": f"{prefix}('{row['No'].replace(chr(39), chr(39) * 2)}')"}
            for row in (kept, gone)]}
        # A claim about a record the index never saw is not even noted
        claims["value"].append({**claims["value"][0], "resource": f"{prefix}('NOPE')"})
        assert httpx.post(f"http://127.0.0.1:{port}/bc", json=claims).status_code == 202
        assert connector.has_changes("RescoCustomer", cursor)
        records = [r for p in connector.read_changes("RescoCustomer", cursor, 100)
                   for r in p.records]
        assert [(r.op, r.key["No"]) for r in records] == [(Op.DELETE, gone["No"])]
        assert emu.get("RescoCustomer", kept["No"], api=resco) is not None
    finally:
        connector.close()

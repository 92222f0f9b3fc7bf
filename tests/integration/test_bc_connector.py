"""BusinessCentralConnector against the emulator over HTTPS, MSAL fetching real tokens.

Reading (paging, equal timestamps across a page boundary, late commits, row versions,
reconciled deletions), writing (upserts by number, stale ETags, 429 storms, batches),
metadata and authentication.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from connectors.base import ConfigError, Op, OutcomeStatus, PermanentError, SchemaError, WriteRow
from connectors.business_central import BusinessCentralConnector
from connectors.business_central.emulator import BusinessCentralEmulator

pytestmark = pytest.mark.integration

RESCO = "Resco/RescoIntegrations/v2.0"


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def emu(cert_dir):
    with BusinessCentralEmulator(cert_dir=cert_dir, seed=40) as emulator:
        yield emulator


@pytest.fixture
def connect(emu, tmp_path):
    made: list[BusinessCentralConnector] = []

    def make(name="bc", emulator=None, **overrides):
        settings = {"index_url": f"sqlite:///{tmp_path}/{name}-index.db", "backoff": 0.02,
                    **overrides}
        connector = BusinessCentralConnector(name, **(emulator or emu).connection(**settings))
        made.append(connector)
        return connector

    yield make
    for connector in made:
        connector.close()


def _drain(connector, entity, cursor=None, page_size=1000):
    """Every record after ``cursor`` and the last cursor."""
    records = []
    for page in connector.read_changes(entity, cursor, page_size):
        records += page.records
        cursor = page.next_cursor
    return records, cursor


def test_describe_from_metadata(connect):
    connector = connect(apis=["v2.0", RESCO, "syncbus/tracking/v1.0"])
    entities = {e.name: e for e in connector.describe()}
    assert {"customers", "vendors", "contacts", "items", "salesOrders", "salesOrderLines",
            "RescoCustomer", "RescoContact", "RescoItem", "trackedVendors"} <= set(entities)
    customers = entities["customers"]
    assert customers.key == ("id",) and customers.unique_keys == (("number",),)
    assert customers.field("creditLimit").type == "decimal"
    assert customers.field("lastModifiedDateTime").type == "datetime"
    assert customers.field("id").type == "uuid" and customers.change_tracking
    assert entities["RescoCustomer"].key == ("No",)
    assert not entities["salesOrderLines"].change_tracking  # no lastModifiedDateTime there
    with pytest.raises(SchemaError, match="known:"):
        connector.describe(["nope"])


def test_company_by_name_or_id_and_bad_settings(emu, connect):
    assert connect(company=emu.company.id).describe(["items"])
    with pytest.raises(ConfigError, match="no company 'Other'"):
        connect(company="Other").describe(["items"])
    with pytest.raises(PermanentError):
        connect(client_secret="wrong").describe(["items"])
    with pytest.raises(ConfigError, match="webhooks"):
        connect(entities={"customers": {"webhook": True}})


def test_paging_delivers_every_record_once_and_resumes_at_any_page(connect, emu):
    connector = connect()
    pages = list(connector.read_changes("vendors", None, 7))
    assert [len(p.records) for p in pages][:6] == [7, 7, 7, 7, 7, 5]
    numbers = [r.key["number"] for p in pages for r in p.records]
    assert sorted(numbers) == sorted(r["number"] for r in emu.rows("vendors"))
    assert len(set(numbers)) == 40
    for k in range(len(pages) - 1):  # a crash after page k: resume from its cursor
        rest, _ = _drain(connector, "vendors", pages[k].next_cursor, 7)
        assert sorted(numbers[(k + 1) * 7:]) == sorted(r.key["number"] for r in rest)
    record = pages[0].records[0]
    assert record.op is Op.UPSERT and record.version.startswith('W/"')
    assert record.values["displayName"] and record.modified_at is not None


def test_equal_timestamps_across_a_page_boundary_are_not_missed(connect, emu):
    connector = connect(overlap=0)
    _, cursor = _drain(connector, "items")
    emu.clock.freeze(emu.clock() + timedelta(seconds=1))
    tied = [emu.insert("items", {"displayName": f"Tied {i}"}) for i in range(25)]
    emu.clock.unfreeze()
    assert len({t["lastModifiedDateTime"] for t in tied}) == 1
    numbers = {t["number"] for t in tied}
    got: list[str] = []
    for page in connector.read_changes("items", cursor, 10):  # crash after the first tied page
        got += [r.key["number"] for r in page.records if r.key["number"] in numbers]
        if got:
            break
    assert 0 < len(got) < 25 and json.loads(page.next_cursor)["hw"] == tied[0]["lastModifiedDateTime"]
    # A naive poll "lastModifiedDateTime gt <last seen>" would now lose the rest of the tie.
    rest, cursor = _drain(connector, "items", page.next_cursor, 10)
    got += [r.key["number"] for r in rest]
    assert sorted(got) == sorted(numbers)
    assert _drain(connector, "items", cursor)[0] == []


def test_a_late_commit_inside_the_overlap_window_is_picked_up_once(connect, emu):
    connector = connect(overlap=60)
    _, cursor = _drain(connector, "customers")
    now = emu.clock()
    emu.insert("customers", {"displayName": "Fresh"})
    seen, cursor = _drain(connector, "customers", cursor)
    assert [r.values["displayName"] for r in seen] == ["Fresh"]
    emu.clock.freeze(now - timedelta(seconds=20))  # committed now, stamped 20 s ago
    late = emu.insert("customers", {"displayName": "Late"})
    emu.clock.unfreeze()
    seen, cursor = _drain(connector, "customers", cursor)
    assert [r.key["number"] for r in seen] == [late["number"]]
    assert _drain(connector, "customers", cursor)[0] == []


def test_row_versions_of_the_resco_pages_are_the_cursor(connect, emu):
    connector = connect()
    records, cursor = _drain(connector, "RescoCustomer", page_size=15)
    assert len(records) == 40 and all(isinstance(r.version, int) for r in records)
    assert [r.version for r in records] == sorted(r.version for r in records)
    assert json.loads(cursor)["rv"] == max(r.version for r in records)
    assert not connector.has_changes("RescoCustomer", cursor)
    emu.update("vendors", emu.rows("vendors")[0]["id"], {"city": "Lima"})  # other table
    assert not connector.has_changes("RescoCustomer", cursor)
    customer = emu.rows("customers")[5]
    emu.update("customers", customer["id"], {"displayName": "Renamed"})
    assert connector.has_changes("RescoCustomer", cursor)
    changed, _ = _drain(connector, "RescoCustomer", cursor)
    assert [(r.key, r.values["Name"]) for r in changed] == [({"No": customer["number"]}, "Renamed")]
    assert changed[0].version > json.loads(cursor)["rv"]
    with pytest.raises(SchemaError, match="reset"):
        list(connector.read_changes("customers", cursor, 10))


def test_deletes_by_reconciliation_survive_a_crash_before_the_commit(connect, emu):
    connector = connect(entities={"customers": {"sync_deletion": True, "reconcile_interval": 0}})
    plain = connect("plain")
    _, cursor = _drain(connector, "customers")
    _, plain_cursor = _drain(plain, "customers")
    victims = emu.rows("customers")[:3]
    for victim in victims:
        emu.delete("customers", victim["id"])
    expected = sorted((v["id"], v["number"]) for v in victims)
    deleted, _ = _drain(connector, "customers", cursor)  # published, cursor NOT committed
    assert sorted((r.key["id"], r.key["number"]) for r in deleted if r.op is Op.DELETE) == expected
    again, cursor = _drain(connector, "customers", cursor)  # the worker restarted
    assert sorted((r.key["id"], r.key["number"]) for r in again if r.op is Op.DELETE) == expected
    assert _drain(connector, "customers", cursor)[0] == []
    assert _drain(plain, "customers", plain_cursor)[0] == []  # Sync Deletion is off by default


def test_sync_deletion_turned_on_later_back_fills_the_index(connect, emu):
    before = connect("before")
    records, cursor = _drain(before, "RescoCustomer")
    last = {r.key["No"]: r.version for r in records}
    after = connect("after", entities={"RescoCustomer": {"sync_deletion": True,
                                                         "reconcile_interval": 0}})
    assert _drain(after, "RescoCustomer", cursor)[0] == []  # the first reconciliation back-fills
    victim = emu.rows("customers")[7]
    emu.delete("customers", victim["id"])
    deleted, _ = _drain(after, "RescoCustomer", cursor)
    assert [(r.op, r.key) for r in deleted] == [(Op.DELETE, {"No": victim["number"]})]
    assert deleted[0].version == last[victim["number"]] + 1  # newer than what was applied


def test_a_renumbered_record_deletes_its_old_key(connect, emu):
    connector = connect(entities={"customers": {"sync_deletion": True}})
    _, cursor = _drain(connector, "customers")
    row = emu.rows("customers")[0]
    emu.update("customers", row["id"], {"number": "RENAMED-1"})
    changes, _ = _drain(connector, "customers", cursor)
    assert [(r.op, r.key["number"]) for r in changes] == [
        (Op.DELETE, row["number"]), (Op.UPSERT, "RENAMED-1")]


def test_upsert_by_number_inserts_updates_and_classifies(connect, emu):
    connector = connect(batch_size=10)
    existing = emu.rows("customers")[0]
    rows = [WriteRow({"number": existing["number"]}, {"displayName": "Updated", "creditLimit": "1500.50"}),
            *(WriteRow({"number": f"NEW-{i:03d}"}, {"displayName": f"New {i}", "taxLiable": "true",
                                                    "balanceDue": 99, "email": None})
              for i in range(25)),
            WriteRow({"number": "BAD-1"}, {"displayName": "x" * 101}),
            WriteRow({"number": "BAD-2"}, {"type": "Martian"}),
            WriteRow({"number": "BAD-3"}, {"creditLimit": "lots"})]
    outcomes = connector.upsert("customers", rows)
    assert [o.status for o in outcomes[:26]] == [OutcomeStatus.APPLIED] * 26
    assert [o.status for o in outcomes[26:]] == [OutcomeStatus.PERMANENT] * 3
    assert outcomes[26].code == "Application_StringExceededLength" and "CorrelationId" in outcomes[26].error
    assert emu.get("customers", existing["id"])["creditLimit"] == 1500.5
    made = {r["number"]: r for r in emu.rows("customers")}
    assert made["NEW-007"]["displayName"] == "New 7" and made["NEW-007"]["taxLiable"] is True
    assert made["NEW-007"]["balanceDue"] == 0 and made["NEW-007"]["email"] == ""
    again = connector.upsert("customers", rows[:3])  # idempotent
    assert all(o.ok for o in again) and len(emu.rows("customers")) == 40 + 25
    odd = [WriteRow({"number": "O'B+1 &#2"}, {"displayName": f"Odd {i}"}) for i in range(2)]
    assert all(o.ok for o in connector.upsert("customers", odd[:1]) + connector.upsert(
        "customers", odd[1:]))
    assert [r["displayName"] for r in emu.rows("customers") if r["number"] == "O'B+1 &#2"] == ["Odd 1"]
    gone = connector.delete("customers", [{"number": "NEW-001"}, {"number": "NEVER"},
                                          {"number": "O'B+1 &#2"}])
    assert all(o.ok for o in gone) and "NEW-001" not in {r["number"] for r in emu.rows("customers")}


def test_upsert_by_a_configured_alternate_key(connect, emu):
    connector = connect(entities={"vendors": {"key": ["email"]}})
    assert connector.describe(["vendors"])[0].unique_keys == (("number",), ("email",))
    target = emu.rows("vendors")[3]
    out = connector.upsert("vendors", [WriteRow({"email": target["email"]}, {"city": "Quito"}),
                                       WriteRow({"email": "new@vendor.example"}, {"displayName": "N"})])
    assert all(o.ok for o in out)
    assert emu.get("vendors", target["id"])["city"] == "Quito"
    assert any(r["email"] == "new@vendor.example" for r in emu.rows("vendors"))


def _concurrent_edit(emu, times):
    """Make "another user" change the record just before each of our next PATCHes."""
    left = [times]

    def edit(req):
        if req.method == "PATCH" and left[0] > 0:
            left[0] -= 1
            record_id = req.path.rsplit("(", 1)[1].rstrip(")")
            emu.update("customers", record_id, {"phoneNumber": f"+1 555-000-{left[0]:04d}"})
    emu.service.before_write = edit


def test_a_stale_etag_is_read_again_and_retried_once(connect, emu):
    seen = []

    def hook(entity, row, current):
        seen.append((entity, row.key, current["phoneNumber"] if current else None))
        return row

    connector = connect(on_conflict=hook)
    target = emu.rows("customers")[1]
    _concurrent_edit(emu, 1)
    (outcome,) = connector.upsert("customers", [WriteRow({"number": target["number"]},
                                                         {"displayName": "Mine"})])
    assert outcome.ok and emu.get("customers", target["id"])["displayName"] == "Mine"
    assert seen == [("customers", {"number": target["number"]}, "+1 555-000-0000")]

    _concurrent_edit(emu, 2)  # the retry meets a stale ETag again
    (outcome,) = connector.upsert("customers", [WriteRow({"number": target["number"]},
                                                         {"displayName": "Again"})])
    assert outcome.status is OutcomeStatus.PERMANENT and outcome.code == "Request_EntityChanged"
    assert "Another user has already changed the record." in outcome.error

    _concurrent_edit(emu, 1)
    strict = connect("strict", conflict="fail")
    (outcome,) = strict.upsert("customers", [WriteRow({"number": target["number"]},
                                                      {"displayName": "Strict"})])
    assert outcome.status is OutcomeStatus.PERMANENT and outcome.code == "Request_EntityChanged"


def test_429_storm_is_backed_off_and_nothing_is_lost(connect, emu):
    connector = connect(batch_size=50, max_retries=8)
    emu.throttle(4, window=0.5)
    rows = [WriteRow({"number": f"T-{i:04d}"}, {"displayName": f"Throttled {i}"}) for i in range(300)]
    outcomes = connector.upsert("customers", rows)
    records, _ = _drain(connector, "customers", page_size=20)
    refused = emu.limiter.hits["requests"]
    emu.throttle(None)
    assert all(o.ok for o in outcomes)
    assert refused > 0  # 429s happened and were absorbed
    assert {f"T-{i:04d}" for i in range(300)} <= {r.key["number"] for r in records}


def test_429_surfaces_as_transient_when_it_does_not_stop(connect, emu):
    connector = connect(max_retries=2)
    connector.describe(["customers"])
    emu.throttle(1, window=60)  # the lookup passes, the write never does
    outcomes = connector.upsert("customers", [WriteRow({"number": "Z1"}, {"displayName": "z"})])
    emu.throttle(None)
    assert outcomes[0].status is OutcomeStatus.TRANSIENT and "429" in outcomes[0].error


def test_expired_tokens_are_renewed(connect, emu):
    connector = connect()
    connector.describe(["items"])
    issued = emu.entra.tokens_issued
    emu.entra.expire_all_tokens()
    assert connector.upsert("items", [WriteRow({"number": "I-1"}, {"displayName": "i"})])[0].ok
    assert emu.entra.tokens_issued == issued + 1


def test_snapshot_lists_every_key_and_version(connect, emu):
    connector = connect()
    snap = dict((json.dumps(k, sort_keys=True), v) for k, v in connector.snapshot("RescoCustomer"))
    assert len(snap) == 40 and all(isinstance(v, int) for v in snap.values())
    keys = [k for k, _ in connector.snapshot("contacts")]
    assert {k["number"] for k in keys} == {r["number"] for r in emu.rows("contacts")}

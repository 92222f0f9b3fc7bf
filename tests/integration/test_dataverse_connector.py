"""DataverseConnector against the emulator over HTTPS, MSAL fetching real tokens.

Reading (paging, delta sync, expired delta tokens), writing ($batch outcomes, binds,
429 storms, faults), authentication (expiry, renewal, certificates, device code).
"""

from __future__ import annotations

import asyncio
import stat
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from connectors.base import Op, OutcomeStatus, PermanentError, SchemaError, WriteRow
from connectors.dataverse import DataverseConnector, login
from connectors.dataverse.emulator import DataverseEmulator, Limits
from connectors.dataverse.emulator.app import API_PREFIX
from connectors.dataverse.emulator.model import attribute, entity
from connectors.identity import DEFAULT_CLIENT_ID, DEFAULT_TENANT
from schemas.config import DataverseConnection
from tests.support import wait_for

pytestmark = pytest.mark.integration

NO_LIMITS = Limits(requests=None, concurrent=None, execution=None)


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
def emu(cert_dir):
    with DataverseEmulator(cert_dir=cert_dir, limits=NO_LIMITS) as emulator:
        yield emulator


@pytest.fixture
def connect(emu, tmp_path):
    made: list[DataverseConnector] = []

    def make(name="crm", emulator=None, **overrides):
        connector = DataverseConnector(name, **(emulator or emu).connection(
            state_dir=str(tmp_path / "state"), **overrides))
        made.append(connector)
        return connector

    yield make
    for connector in made:
        connector.close()


def _insert(emu, entity, rows):
    table = emu.store.tables[entity]
    with emu.store.request():
        return [emu.store.insert(table, str(uuid.uuid4()), values)[table.entity.primary_id]
                for values in rows]


def _read(connector, entity, cursor):
    pages = list(connector.read_changes(entity, cursor, 1000))
    return pages, [r for p in pages for r in p.records], pages[-1].next_cursor


# -- metadata -------------------------------------------------------------------------------


def test_describe_reports_types_keys_and_lookups(connect):
    crm = connect()
    infos = {i.name: i for i in crm.describe()}
    account, contact = infos["account"], infos["contact"]
    assert account.key == ("accountid",) and account.unique_keys == (("accountnumber",),)
    assert account.change_tracking and account.is_unique(["accountnumber"])
    fields = {f.name: f for f in account.fields}
    assert fields["primarycontactid"].references == "contact" and fields["revenue"].type == "decimal"
    assert not fields["name"].nullable and fields["createdon"].type == "datetime"
    assert {f.name for f in contact.fields} >= {"parentcustomerid", "parentcustomeridtype", "fullname"}
    assert [i.name for i in crm.describe(["contacts"])] == ["contact"]  # entity set names work too
    with pytest.raises(SchemaError, match="did you mean 'account'"):
        crm.describe(["acount"])
    assert crm.capabilities.alternate_keys and crm.capabilities.max_batch == 1000
    assert crm.whoami()["UserId"]


# -- reading --------------------------------------------------------------------------------


def test_initial_load_pages_over_5000_rows(emu, connect):
    _insert(emu, "account", [{"name": f"Account {n}", "accountnumber": f"A{n:05d}"}
                             for n in range(12_000)])
    crm = connect()
    assert crm.has_changes("account", None)
    pages, records, cursor = _read(crm, "account", None)
    assert [len(p.records) for p in pages] == [5000, 5000, 2000]
    assert [p.more for p in pages] == [True, True, False]
    assert len({r.key["accountid"] for r in records}) == 12_000
    assert all(r.op is Op.UPSERT and isinstance(r.version, int) for r in records)
    first = records[0]
    assert first.values["name"].startswith("Account ") and first.modified_at.tzinfo is not None
    assert first.version == first.values["versionnumber"]
    assert not crm.has_changes("account", cursor)
    assert sum(1 for _ in crm.snapshot("account")) == 12_000
    resumed = list(crm.read_changes("account", pages[0].next_cursor, 1000))  # resume mid-load
    assert sum(len(p.records) for p in resumed) == 7000


def test_delta_sync_reports_creates_updates_deletes_and_created_then_deleted(emu, connect):
    kept, changed, removed = _insert(emu, "account", [{"name": n} for n in ("kept", "changed", "removed")])
    crm = connect()
    _, records, cursor = _read(crm, "account", None)
    versions = {r.key["accountid"]: r.version for r in records}
    crm.upsert("account", [WriteRow({"accountid": changed}, {"name": "changed!"}),
                           WriteRow({"accountnumber": "NEW-1"}, {"name": "created"}),
                           WriteRow({"accountnumber": "TMP-1"}, {"name": "brief"})])
    crm.delete("account", [{"accountid": removed}, {"accountnumber": "TMP-1"},
                           {"accountid": str(uuid.uuid4())}])  # a missing row counts as deleted
    assert crm.has_changes("account", cursor)
    pages, records, cursor2 = _read(crm, "account", cursor)
    ups = [r for r in records if r.op is Op.UPSERT]
    dels = [r for r in records if r.op is Op.DELETE]
    assert [r.values["name"] for r in ups] == ["changed!", "created"]
    assert records[:2] == ups  # changed rows first, then the deletes
    assert {r.key["accountid"] for r in dels} >= {removed}
    assert len(dels) == 2  # the created-then-deleted row is reported as deleted too
    assert next(r for r in dels if r.key["accountid"] == removed).version == versions[removed] + 1
    assert ups[0].version > versions[changed]
    assert kept not in {r.key["accountid"] for r in records}
    assert not crm.has_changes("account", cursor2)
    assert _read(crm, "account", cursor2)[1] == []


def test_expired_delta_token_triggers_full_resync_that_finds_deletes(emu, connect):
    ids = _insert(emu, "account", [{"name": f"r{n}"} for n in range(10)])
    crm = connect()
    _, _, cursor = _read(crm, "account", None)
    crm.delete("account", [{"accountid": i} for i in ids[:3]])
    crm.upsert("account", [WriteRow({"accountid": ids[5]}, {"name": "updated in the gap"}),
                           WriteRow({"accountnumber": "GAP-1"}, {"name": "created in the gap"})])
    emu.expire_delta_tokens()
    assert crm.has_changes("account", cursor)
    with structlog.testing.capture_logs() as logs:
        pages, records, cursor2 = _read(crm, "account", cursor)
    warning = next(e for e in logs if e["event"] == "dataverse_delta_token_expired")
    assert warning["log_level"] == "warning" and warning["entity"] == "account"
    assert "full resync" in warning["action"]
    assert crm.reader.resyncs == 1
    upserts = {r.key["accountid"]: r for r in records if r.op is Op.UPSERT}
    deletes = {r.key["accountid"] for r in records if r.op is Op.DELETE}
    assert len(upserts) == 8 and deletes == set(ids[:3])
    assert upserts[ids[5]].values["name"] == "updated in the gap"
    crm.delete("account", [{"accountid": ids[6]}])
    _, after, _ = _read(crm, "account", cursor2)  # the new delta link works; gone rows forgotten
    assert [(r.op, r.key["accountid"]) for r in after] == [(Op.DELETE, ids[6])]


# -- writing --------------------------------------------------------------------------------


@pytest.mark.parametrize("bulk_size", [0, 500], ids=["batch", "upsertmultiple"])
def test_batch_partial_failures_give_per_record_outcomes(emu, connect, bulk_size):
    """The same per-record outcomes through $batch and through bisected UpsertMultiple."""
    _insert(emu, "account", [{"name": "holder", "accountnumber": "TAKEN"}])
    emu.add_plugin(lambda message, table, values, current: (
        "Accounts named 'forbidden' are not allowed." if values.get("name") == "forbidden" else None))
    crm = connect(bulk_size=bulk_size)
    outcomes = crm.upsert("account", [
        WriteRow({"accountnumber": "OK-1"}, {"name": "fine", "revenue": "1234.50"}),
        WriteRow({"accountnumber": "BAD-1"}, {"name": "x" * 200}),
        WriteRow({"accountid": str(uuid.uuid4())}, {"name": "dup", "accountnumber": "TAKEN"}),
        WriteRow({"accountnumber": "BAD-2"}, {"name": "n", "numberofemployees": "many"}),
        WriteRow({"accountnumber": "BAD-3"}, {"name": "forbidden"}),
        WriteRow({"accountnumber": "BAD-4"}, {"name": "orphan", "primarycontactid": str(uuid.uuid4())}),
        WriteRow({"name": "no key"}, {"telephone1": "1"}),
        WriteRow({"accountnumber": "OK-2"}, {"name": "fine too"}),
    ])
    statuses = [o.status for o in outcomes]
    assert statuses == [OutcomeStatus.APPLIED, OutcomeStatus.PERMANENT, OutcomeStatus.PERMANENT,
                        OutcomeStatus.PERMANENT, OutcomeStatus.PERMANENT, OutcomeStatus.TRANSIENT,
                        OutcomeStatus.PERMANENT, OutcomeStatus.APPLIED]
    assert outcomes[1].code == "0x80044331" and "maximum allowed length of '160'" in outcomes[1].error
    assert outcomes[2].code == "0x80040237" and "accountnumber_key" in outcomes[2].error
    assert outcomes[3].code == "conversion" and "numberofemployees" in outcomes[3].error
    assert outcomes[4].error == "Accounts named 'forbidden' are not allowed."
    assert "Does Not Exist" in outcomes[5].error
    assert "alternate key" in outcomes[6].error
    rows = {r["accountnumber"]: r for r in emu.store.tables["account"].rows.values()}
    assert set(rows) == {"TAKEN", "OK-1", "OK-2"} and rows["OK-1"]["revenue"] == 1234.5


def test_a_refused_bulk_message_is_bisected_so_only_the_bad_record_fails(emu, connect):
    """UpsertMultiple is all-or-nothing on a standard table (learn.microsoft.com/power-apps/
    developer/data-platform/bulk-operations); the writer splits a refused request until the
    bad record is alone, so the others are written and it fails with Dataverse's own text."""
    crm = connect(bulk_size=64)
    crm.upsert("account", [WriteRow({"accountnumber": "WARM"}, {"name": "warm-up"})])
    rows = [WriteRow({"accountnumber": f"BI-{n:02d}"}, {"name": f"Row {n}"}) for n in range(64)]
    rows[37] = WriteRow({"accountnumber": "BI-37"}, {"name": "Row 37", "numberofemployees": -1})
    before = crm.client.requests
    outcomes = crm.upsert("account", rows)
    sent = crm.client.requests - before
    assert [n for n, o in enumerate(outcomes) if not o.ok] == [37]
    assert outcomes[37].status is OutcomeStatus.PERMANENT and outcomes[37].code == "0x80044331"
    assert "numberofemployees" in outcomes[37].error and "answered" not in outcomes[37].error
    assert sent == 1 + 2 * 6  # one refused request, then two halves per level down to one
    numbers = {r["accountnumber"] for r in emu.store.tables["account"].rows.values()}
    assert numbers == {"WARM"} | {f"BI-{n:02d}" for n in range(64) if n != 37}


def test_tables_without_bulk_messages_are_written_through_batch(emu, connect):
    """Not every table offers UpsertMultiple (learn.microsoft.com/power-apps/developer/
    data-platform/webapi/reference/upsertmultiple: "doesn't represent all the tables");
    such a table falls back to $batch once and stays there."""
    emu.define_entity(entity("new_legacy", attributes=[attribute("name")], bulk_messages=False))
    crm = connect(bulk_size=500)
    crm.describe(["new_legacy"])
    before = crm.client.requests
    first = crm.upsert("new_legacy", [WriteRow({"new_legacyid": str(uuid.uuid4())}, {"name": "a"})])
    assert [o.status for o in first] == [OutcomeStatus.APPLIED]
    assert crm.client.requests - before == 2  # the refused UpsertMultiple, then the $batch
    before = crm.client.requests
    second = crm.upsert("new_legacy", [WriteRow({"new_legacyid": str(uuid.uuid4())}, {"name": "b"})])
    assert [o.status for o in second] == [OutcomeStatus.APPLIED]
    assert crm.client.requests - before == 1
    assert sorted(r["name"] for r in emu.store.tables["new_legacy"].rows.values()) == ["a", "b"]
    assert crm.upsert("account", [WriteRow({"accountnumber": "STILL-BULK"}, {"name": "x"})])[0].ok
    assert "account" not in crm.writer.no_bulk


def test_lookups_are_written_as_binds(emu, connect):
    crm = connect()
    crm.upsert("account", [WriteRow({"accountnumber": "P-1"}, {"name": "Parent"})])
    parent = next(r["accountid"] for r in emu.store.tables["account"].rows.values())
    other = str(uuid.uuid4())
    crm.upsert("contact", [WriteRow({"contactid": other}, {"lastname": "Boss"})])
    outcomes = crm.upsert("contact", [
        WriteRow({"contactid": str(uuid.uuid4())}, {"lastname": "ById", "parentcustomerid": parent}),
        WriteRow({"contactid": str(uuid.uuid4())}, {"lastname": "ByKey",
                                                    "parentcustomerid": {"accountnumber": "P-1"}}),
        WriteRow({"contactid": str(uuid.uuid4())}, {"lastname": "ToContact", "parentcustomerid": other,
                                                    "parentcustomeridtype": "contact"}),
    ])
    assert all(o.ok for o in outcomes), outcomes
    parents = {r["lastname"]: r.get("parentcustomerid") for r in emu.store.tables["contact"].rows.values()}
    assert parents["ById"] == parents["ByKey"] == {"id": parent, "logicalname": "account"}
    assert parents["ToContact"] == {"id": other, "logicalname": "contact"}
    _, records, _ = _read(crm, "contact", None)
    by_name = {r.values["lastname"]: r.values for r in records}
    assert by_name["ToContact"]["parentcustomerid"] == other
    assert by_name["ToContact"]["parentcustomeridtype"] == "contact"
    cleared = crm.upsert("contact", [WriteRow({"contactid": other}, {"parentcustomerid": None})])
    assert cleared[0].ok


@pytest.mark.parametrize("bulk_size", [0, 50], ids=["batch", "upsertmultiple"])
def test_429_storm_slows_every_writer_and_loses_nothing(cert_dir, connect, bulk_size):
    limits = Limits(requests=8, window=1.0, concurrent=None, execution=None)
    with DataverseEmulator(cert_dir=cert_dir, limits=limits) as emulator:
        writers = [connect(f"w{n}", emulator=emulator, batch_size=50, bulk_size=bulk_size,
                           retry_attempts=10) for n in range(2)]
        assert writers[0].client.throttle is writers[1].client.throttle  # one per organisation
        results: dict[int, list] = {}

        def write(n):
            rows = [WriteRow({"accountnumber": f"S{n}-{i}"}, {"name": f"storm {n}/{i}"})
                    for i in range(600)]
            results[n] = writers[n].upsert("account", rows)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        assert all(o.ok for n in results for o in results[n])
        assert len(emulator.store.tables["account"].rows) == 1200
        assert emulator.throttled > 0
        assert sum(w.client.throttled for w in writers) == emulator.throttled
        requests = sum(w.client.requests for w in writers)
        assert emulator.throttled <= requests // 2  # a shared pause, not every call hammering
        assert elapsed >= (requests - emulator.throttled - 8) / 8 * 0.9  # the limit held


@pytest.mark.parametrize(("bulk_size", "path"), [
    (0, "/api/data/v9.2/$batch"),
    (500, "/api/data/v9.2/accounts/Microsoft.Dynamics.CRM.UpsertMultiple")],
    ids=["batch", "upsertmultiple"])
def test_transient_faults_are_retried_then_reported_with_retry_after(emu, connect, bulk_size, path):
    crm = connect(retry_attempts=3, bulk_size=bulk_size)
    crm.whoami()
    emu.faults.fail_next(2, status=503, path_prefix=path)
    assert all(o.ok for o in crm.upsert("account", [WriteRow({"accountnumber": "F-1"}, {"name": "a"})]))
    emu.faults.drop_next(1, path_prefix=path)
    assert all(o.ok for o in crm.upsert("account", [WriteRow({"accountnumber": "F-2"}, {"name": "b"})]))
    emu.faults.fail_next(3, status=429, headers={"Retry-After": "1"},
                         body={"error": {"code": "0x80072322", "message": "Number of requests exceeded"}},
                         path_prefix=path)
    outcomes = crm.upsert("account", [WriteRow({"accountnumber": "F-3"}, {"name": "c"}),
                                      WriteRow({"accountnumber": "F-4"}, {"name": "d"})])
    assert [o.status for o in outcomes] == [OutcomeStatus.TRANSIENT] * 2
    assert outcomes[0].retry_after == 1.0 and "Number of requests exceeded" in outcomes[0].error
    assert crm.delete("account", [{"accountnumber": "F-1"}, {"accountnumber": "F-9"}])[1].ok


class _LateFirstWrite:
    """ASGI middleware under the emulator's fault injector: the first Web API write is
    read, then held until a later write has been answered, and only then applied.

    So the client has certainly timed out on it and retried, and the retry was applied
    first; :attr:`done` is set once the held write has been answered too (with
    :attr:`status`, which no client reads).
    """

    def __init__(self, app):
        self.app = app
        self.holding = False
        self.writes_answered = 0
        self.status: int | None = None
        self.done = threading.Event()

    async def __call__(self, scope, receive, send):
        write = (scope["type"] == "http" and scope["method"] in ("POST", "PATCH")
                 and scope["path"].startswith(API_PREFIX))
        if not write or self.holding:
            try:
                await self.app(scope, receive, send)
            finally:
                self.writes_answered += write
            return
        self.holding = True
        body, more = b"", True
        while more:  # read it now: the client will have gone when it is applied
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        while not self.writes_answered:
            await asyncio.sleep(0.01)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def record(message):
            if message["type"] == "http.response.start":
                self.status = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, record)
        finally:
            self.done.set()


def test_time_outs_are_retried_and_upserts_stay_idempotent(emu, connect):
    crm = connect(timeout=0.5)
    crm.whoami()
    late = emu.faults.app = _LateFirstWrite(emu.faults.app)
    outcomes = crm.upsert("account", [WriteRow({"accountnumber": "T-1"}, {"name": "slow"})])
    assert [o.status for o in outcomes] == [OutcomeStatus.APPLIED]
    assert late.done.wait(10), "the timed-out first attempt was never applied"
    assert late.status is not None and late.status < 300, late.status  # applied, late
    rows = [r for r in emu.store.tables["account"].rows.values() if r["accountnumber"] == "T-1"]
    assert len(rows) == 1 and rows[0]["name"] == "slow"


# -- authentication ---------------------------------------------------------------------------


def test_tokens_are_renewed_before_expiry_and_after_revocation(cert_dir, connect):
    with DataverseEmulator(cert_dir=cert_dir, limits=NO_LIMITS, token_ttl=3) as emulator:
        crm = connect(emulator=emulator)
        crm.whoami()
        issued = emulator.entra.tokens_issued
        crm.whoami()
        assert emulator.entra.tokens_issued == issued  # cached
        # The clock is what is tested: a token is renewed once less than a fifth of its
        # 3 s lifetime is left, so 2.4 s after it was issued, ahead of its expiry.
        time.sleep(2.6)
        crm.whoami()
        assert emulator.entra.tokens_issued == issued + 1
        emulator.entra.expire_all_tokens()
        crm.whoami()  # 401 → new token → success
        assert emulator.entra.tokens_issued == issued + 2
    cache = Path(crm.config.state_dir) / "crm.tokens.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600  # owner only


def test_bad_secret_is_permanent_and_never_shown(emu, connect):
    crm = connect(client_secret="wrong-secret-value")
    with pytest.raises(PermanentError) as info:
        crm.whoami()
    assert "invalid_client" in info.value.message and "wrong-secret-value" not in info.value.message
    assert "wrong-secret-value" not in repr(crm)


def test_certificate_credentials(emu, connect, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncbus test")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    pem = tmp_path / "app.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()) + cert_pem)
    emu.entra.register_certificate(DEFAULT_TENANT, "00000000-0000-0000-0000-0000000000c2", cert_pem)
    crm = connect(client_id="00000000-0000-0000-0000-0000000000c2", client_secret=None,
                  certificate_path=str(pem))
    assert crm.whoami()["OrganizationId"]


def test_device_code_login_then_the_connector_uses_the_operators_token(emu, connect, tmp_path):
    config = DataverseConnection.model_validate(emu.connection(
        client_secret=None, state_dir=str(tmp_path / "state")))
    lines: list[str] = []
    done: list[object] = []
    thread = threading.Thread(target=lambda: done.append(login("crm", config, lines.append)))
    thread.start()
    code = wait_for(lambda: emu.entra.pending_device_codes(), timeout=10,
                    message="a pending device code")[0]
    assert code in lines[0] and "/devicelogin" in lines[0]
    emu.entra.approve_device_code(code)
    thread.join(timeout=30)
    assert done and stat.S_IMODE(done[0].stat().st_mode) == 0o600
    crm = connect("crm", client_secret=None)
    app = connect("app")
    assert crm.whoami()["UserId"] != app.whoami()["UserId"]  # a user, not the application
    assert DEFAULT_CLIENT_ID in crm.config.client_id

"""The fake Entra ID against real MSAL, over HTTPS with the locally generated CA.

Nothing of ours is mocked: FakeEntra runs in an EmulatorServer (uvicorn, TLS) and the
clients are MSAL's ``ConfidentialClientApplication`` / ``PublicClientApplication``,
used directly or through ``TokenProvider`` and ``device_code_login``.
"""

from __future__ import annotations

import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import msal
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from connectors._http import TokenProvider, device_code_login
from connectors.base import ConfigError, ConnectorUnavailable, PermanentError
from connectors.emulation import EmulatorServer, TlsFiles, make_tls
from connectors.identity import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
    FakeEntra,
    Unauthorized,
)
from schemas.config import DataverseConnection
from tests.support import pick_free_port, wait_for

ORG = "https://org.crm.dynamics.com"
SCOPE = f"{ORG}/.default"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def entra() -> FakeEntra:
    return FakeEntra()


@pytest.fixture
def server(entra: FakeEntra, tls: TlsFiles) -> Iterator[EmulatorServer]:
    with EmulatorServer(Starlette(routes=entra.routes()), tls=tls) as running:
        yield running


def connection(server: EmulatorServer, tls: TlsFiles, **changes: object) -> DataverseConnection:
    """Connection settings pointing at the fake, with the default credentials."""
    values: dict[str, object] = {
        "tenant_id": DEFAULT_TENANT, "client_id": DEFAULT_CLIENT_ID,
        "client_secret": SecretStr(DEFAULT_CLIENT_SECRET), "authority_host": server.url,
        "ca_bundle": str(tls.ca_pem), "url": ORG, "timeout": 5.0,
    }
    values.update(changes)
    return DataverseConnection.model_validate(values)


def test_raw_msal_client_credentials_with_instance_discovery_off(
        server: EmulatorServer, tls: TlsFiles, entra: FakeEntra,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given plain MSAL configured as documented (the env CA bundle would override verify=)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    app = msal.ConfidentialClientApplication(
        DEFAULT_CLIENT_ID, client_credential=DEFAULT_CLIENT_SECRET,
        authority=f"{server.url}/{DEFAULT_TENANT}", verify=str(tls.ca_pem),
        instance_discovery=False)
    # When it asks for a token twice
    first = app.acquire_token_for_client(scopes=[SCOPE])
    second = app.acquire_token_for_client(scopes=[SCOPE])
    # Then the fake issued one, with the resource as audience, and MSAL cached it
    assert first["token_type"] == "Bearer" and first["expires_in"] > 3000
    assert second["access_token"] == first["access_token"]
    claims = entra.verify(f"Bearer {first['access_token']}", audience=ORG + "/")
    assert claims["aud"] == ORG and claims["tid"] == DEFAULT_TENANT
    assert claims["appid"] == claims["azp"] == DEFAULT_CLIENT_ID


def test_raw_msal_validates_authority_through_fake_instance_discovery(
        server: EmulatorServer, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    app = msal.ConfidentialClientApplication(
        DEFAULT_CLIENT_ID, client_credential=DEFAULT_CLIENT_SECRET,
        authority=f"{server.url}/{DEFAULT_TENANT}", verify=str(tls.ca_pem),
        instance_discovery=f"{server.url}/common/discovery/instance")
    assert "access_token" in app.acquire_token_for_client(scopes=[SCOPE])


def test_token_provider_with_secret_caches_and_persists_0600(
        server: EmulatorServer, tls: TlsFiles, entra: FakeEntra, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "tokens.json"
    provider = TokenProvider(connection(server, tls), SCOPE, cache_path=cache)
    token = provider.token()
    assert provider.token() == token and entra.tokens_issued == 1
    assert entra.verify(f"Bearer {token}", audience=ORG)["appidacr"] == "1"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    # A new process (provider) reuses the persisted token instead of asking again
    again = TokenProvider(connection(server, tls), SCOPE, cache_path=cache)
    assert again.token() == token and entra.tokens_issued == 1


def test_wrong_secret_is_a_clear_permanent_error_without_the_secret(
        server: EmulatorServer, tls: TlsFiles) -> None:
    secret = "wrong-but-sensitive-value"
    provider = TokenProvider(connection(server, tls, client_secret=SecretStr(secret)), SCOPE)
    with pytest.raises(PermanentError) as info:
        provider.token()
    assert info.value.status == "invalid_client"
    assert "AADSTS7000215" in str(info.value) and "Invalid client secret" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value.__cause__)


@pytest.mark.parametrize(("changes", "status"), [
    ({"client_id": "11111111-2222-3333-4444-555555555555"}, "unauthorized_client"),
    ({"tenant_id": "contoso.example"}, "invalid_authority"),
])
def test_unknown_client_or_tenant_is_permanent(
        server: EmulatorServer, tls: TlsFiles, changes: dict[str, object], status: str) -> None:
    with pytest.raises(PermanentError) as info:
        TokenProvider(connection(server, tls, **changes), SCOPE).token()
    assert info.value.status == status


def test_scope_without_default_is_invalid_scope(server: EmulatorServer, tls: TlsFiles) -> None:
    with pytest.raises(PermanentError, match="AADSTS1002012") as info:
        TokenProvider(connection(server, tls), f"{ORG}/user_impersonation").token()
    assert info.value.status == "invalid_scope"


def test_unreachable_authority_is_connector_unavailable(tls: TlsFiles) -> None:
    settings = DataverseConnection(
        tenant_id=DEFAULT_TENANT, client_id=DEFAULT_CLIENT_ID,
        client_secret=SecretStr(DEFAULT_CLIENT_SECRET), url=ORG, ca_bundle=str(tls.ca_pem),
        authority_host=f"https://127.0.0.1:{pick_free_port()}", timeout=2)
    with pytest.raises(ConnectorUnavailable, match="cannot reach Entra ID"):
        TokenProvider(settings, SCOPE).token()


def test_missing_ca_bundle_is_a_config_error(server: EmulatorServer, tls: TlsFiles,
                                             tmp_path: Path) -> None:
    provider = TokenProvider(connection(server, tls, ca_bundle=str(tmp_path / "no.pem")), SCOPE)
    with pytest.raises(ConfigError, match="ca_bundle"):
        provider.token()


def test_short_lived_tokens_are_renewed(tls: TlsFiles) -> None:
    entra = FakeEntra(token_ttl=2)
    with EmulatorServer(Starlette(routes=entra.routes()), tls=tls) as server:
        provider = TokenProvider(connection(server, tls), SCOPE)
        first = provider.token()
        assert provider.token() == first  # still fresh: served from memory
        second = wait_for(lambda: (t := provider.token()) != first and t, timeout=5)
    assert entra.tokens_issued == 2
    entra.verify(f"Bearer {second}")
    entra.advance(3)
    with pytest.raises(Unauthorized) as info:
        entra.verify(f"Bearer {second}")
    assert info.value.code == "expired_token"


def test_certificate_credential_with_full_pem(server: EmulatorServer, tls: TlsFiles,
                                              entra: FakeEntra, tmp_path: Path) -> None:
    key_pem, cert_pem = _self_signed()
    entra.register_certificate(DEFAULT_TENANT, "app-with-cert", cert_pem)
    pem = tmp_path / "app.pem"
    pem.write_bytes(key_pem + cert_pem)
    settings = connection(server, tls, client_id="app-with-cert", client_secret=None,
                          certificate_path=str(pem))
    claims = entra.verify(f"Bearer {TokenProvider(settings, SCOPE).token()}", audience=ORG)
    assert claims["appid"] == "app-with-cert" and claims["appidacr"] == "2"


def test_certificate_credential_by_thumbprint_and_unregistered_cert(
        server: EmulatorServer, tls: TlsFiles, entra: FakeEntra, tmp_path: Path) -> None:
    key_pem, cert_pem = _self_signed()
    thumbprint = entra.register_certificate(DEFAULT_TENANT, "app-with-cert", cert_pem)
    key_only = tmp_path / "key.pem"
    key_only.write_bytes(key_pem)
    settings = connection(server, tls, client_id="app-with-cert", client_secret=None,
                          certificate_path=str(key_only), certificate_thumbprint=thumbprint)
    assert TokenProvider(settings, SCOPE).token()
    # An unregistered key is refused with invalid_client
    other_key, other_cert = _self_signed()
    other = tmp_path / "other.pem"
    other.write_bytes(other_key + other_cert)
    with pytest.raises(PermanentError) as info:
        TokenProvider(settings.model_copy(update={"certificate_path": str(other),
                                                  "certificate_thumbprint": None}),
                      SCOPE).token()
    assert info.value.status == "invalid_client"


def test_device_code_flow_end_to_end(server: EmulatorServer, tls: TlsFiles, entra: FakeEntra,
                                     tmp_path: Path) -> None:
    # Given an operator login running (it blocks until approved)
    cache, shown = tmp_path / "operator.json", list[str]()
    settings = connection(server, tls, client_secret=None)
    login = threading.Thread(target=device_code_login, args=(settings, SCOPE, cache,
                                                             shown.append))
    login.start()
    user_code = wait_for(lambda: entra.pending_device_codes(), timeout=5)[0]
    # When the test approves the code
    entra.approve_device_code(user_code, user="alice@contoso.example")
    login.join(timeout=10)
    # Then the login stored tokens (0600) that a TokenProvider without secret uses
    assert not login.is_alive() and user_code in shown[0] and "/devicelogin" in shown[0]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    provider = TokenProvider(settings, SCOPE, cache_path=cache)
    assert provider.mode == "user"
    claims = entra.verify(f"Bearer {provider.token()}", audience=ORG)
    assert claims["upn"] == "alice@contoso.example" and claims["scp"] == "user_impersonation"
    # and renews it with the refresh token after a 401
    before = entra.tokens_issued
    provider.invalidate()
    assert entra.verify(f"Bearer {provider.token()}")["upn"] == "alice@contoso.example"
    assert entra.tokens_issued == before + 1


def test_device_code_declined_is_permanent(server: EmulatorServer, tls: TlsFiles,
                                           entra: FakeEntra, tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def login() -> None:
        try:
            device_code_login(connection(server, tls, client_secret=None), SCOPE,
                              tmp_path / "c.json", lambda _: None)
        except PermanentError as exc:
            errors.append(exc)

    thread = threading.Thread(target=login)
    thread.start()
    entra.decline_device_code(wait_for(entra.pending_device_codes, timeout=5)[0])
    thread.join(timeout=10)
    assert isinstance(errors[0], PermanentError) and errors[0].status == "authorization_declined"


def test_device_code_expires(server: EmulatorServer, tls: TlsFiles, entra: FakeEntra) -> None:
    # Polling the token endpoint by hand: pending, then expired once the code aged
    base = f"{server.url}/{DEFAULT_TENANT}/oauth2/v2.0"
    with httpx.Client(verify=_ctx(tls)) as http:
        flow = http.post(f"{base}/devicecode",
                         data={"client_id": DEFAULT_CLIENT_ID, "scope": SCOPE}).json()
        poll = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                "client_id": DEFAULT_CLIENT_ID, "device_code": flow["device_code"]}
        pending = http.post(f"{base}/token", data=poll)
        entra.advance(flow["expires_in"] + 1)
        expired = http.post(f"{base}/token", data=poll)
    assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending"
    assert pending.json()["error_codes"] == [70016]
    assert expired.json()["error"] == "expired_token"
    assert expired.json()["error_description"].startswith("AADSTS70019:")


def test_devicelogin_post_approves(server: EmulatorServer, tls: TlsFiles,
                                   entra: FakeEntra) -> None:
    base = f"{server.url}/{DEFAULT_TENANT}/oauth2/v2.0"
    with httpx.Client(verify=_ctx(tls)) as http:
        flow = http.post(f"{base}/devicecode",
                         data={"client_id": DEFAULT_CLIENT_ID, "scope": SCOPE}).json()
        answer = http.post(flow["verification_uri"], data={"user_code": flow["user_code"]})
        unknown = http.post(flow["verification_uri"], data={"user_code": "NOPE"})
        token = http.post(f"{base}/token", data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "client_id": DEFAULT_CLIENT_ID, "device_code": flow["device_code"]})
    assert answer.status_code == 200 and unknown.status_code == 404
    assert entra.verify(f"Bearer {token.json()['access_token']}")["idtyp"] == "user"


def test_token_endpoint_error_bodies_and_basic_auth(server: EmulatorServer,
                                                    tls: TlsFiles) -> None:
    url = f"{server.url}/{DEFAULT_TENANT}/oauth2/v2.0/token"
    with httpx.Client(verify=_ctx(tls)) as http:
        basic = http.post(url, data={"grant_type": "client_credentials", "scope": SCOPE},
                          auth=(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET))
        no_grant = http.post(url, data={"client_id": DEFAULT_CLIENT_ID})
        bad_grant = http.post(url, data={"client_id": DEFAULT_CLIENT_ID, "grant_type": "x"})
        no_secret = http.post(url, data={"client_id": DEFAULT_CLIENT_ID, "scope": SCOPE,
                                         "grant_type": "client_credentials"})
        two = http.post(url, data={"grant_type": "client_credentials",
                                   "scope": f"{SCOPE} https://other.example/.default"},
                        auth=(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET))
    assert basic.status_code == 200 and basic.json()["ext_expires_in"] == 3600
    assert basic.headers["cache-control"] == "no-store"
    body = no_grant.json()
    assert no_grant.status_code == 400 and body["error"] == "invalid_request"
    assert body["error_codes"] == [900144] and {"trace_id", "correlation_id",
                                               "timestamp"} <= set(body)
    assert bad_grant.json()["error"] == "unsupported_grant_type"
    assert no_secret.status_code == 401 and no_secret.json()["error"] == "invalid_client"
    assert two.json()["error"] == "invalid_scope"


def test_discovery_documents(server: EmulatorServer, tls: TlsFiles) -> None:
    with httpx.Client(verify=_ctx(tls), base_url=server.url) as http:
        config = http.get(f"/{DEFAULT_TENANT}/v2.0/.well-known/openid-configuration").json()
        keys = http.get(config["jwks_uri"]).json()
        unknown = http.get("/nobody/v2.0/.well-known/openid-configuration")
    assert config["token_endpoint"] == f"{server.url}/{DEFAULT_TENANT}/oauth2/v2.0/token"
    assert config["device_authorization_endpoint"].endswith("/oauth2/v2.0/devicecode")
    assert keys["keys"][0]["kty"] == "RSA" and keys["keys"][0]["kid"]
    assert unknown.status_code == 400 and unknown.json()["error_codes"] == [90002]


def test_verify_rejects_bad_tokens(entra: FakeEntra) -> None:
    good = entra.issue_token(audience=ORG)
    forged = FakeEntra().issue_token(audience=ORG)  # same claims, another signing key
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    cases = {
        None: "missing_token", "": "missing_token", "Basic abc": "malformed_token",
        "Bearer not.a.jwt": "malformed_token", f"Bearer {forged}": "invalid_signature",
        f"Bearer {tampered}": "invalid_signature",
    }
    for header, code in cases.items():
        with pytest.raises(Unauthorized) as info:
            entra.verify(header)
        assert info.value.code == code, header
    with pytest.raises(Unauthorized, match="another audience"):
        entra.verify(f"Bearer {good}", audience="https://other.crm.dynamics.com")
    assert entra.verify(f"bearer {good}", audience=ORG.upper() + "/")["aud"] == ORG


def test_expire_all_tokens_revokes_issued_ones_only(entra: FakeEntra) -> None:
    old = entra.issue_token(audience=ORG)
    entra.expire_all_tokens()
    new = entra.issue_token(audience=ORG)
    with pytest.raises(Unauthorized) as info:
        entra.verify(f"Bearer {old}")
    assert info.value.code == "revoked_token"
    assert entra.verify(f"Bearer {new}")
    short = entra.issue_token(audience=ORG, ttl=1)
    entra.advance(2)  # past its one-second lifetime on the fake's clock, without waiting
    with pytest.raises(Unauthorized, match="expired"):
        entra.verify(f"Bearer {short}")


def test_challenge_header(entra: FakeEntra) -> None:
    value = entra.challenge(base_url="https://127.0.0.1:8443/", resource=ORG)
    assert value == (f"Bearer authorization_uri=https://127.0.0.1:8443/{DEFAULT_TENANT}"
                     f"/oauth2/authorize, resource_id={ORG}/")


def _ctx(tls: TlsFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca_pem))


def _self_signed() -> tuple[bytes, bytes]:
    """A throw-away RSA key and self-signed certificate (PEM), like an app registration's."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "syncbus test app")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_close_and_reopen_and_loose_cache_permissions_are_tightened(
        server: EmulatorServer, tls: TlsFiles, entra: FakeEntra, tmp_path: Path) -> None:
    cache = tmp_path / "tokens.json"
    provider = TokenProvider(connection(server, tls), SCOPE, cache_path=cache)
    provider.token()
    provider.close()
    provider.invalidate()
    assert provider.token() and entra.tokens_issued == 2  # reconnects after close
    cache.chmod(0o644)
    TokenProvider(connection(server, tls), SCOPE, cache_path=cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600

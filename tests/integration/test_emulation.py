"""Emulator plumbing over real sockets: TLS files, the server, faults, limits, client edge.

A tiny protected API stands in for an emulator: it checks bearer tokens with
FakeEntra and is wrapped in a FaultInjector, exactly as the Dataverse and Business
Central emulators are. The client side is ``connectors._http`` (httpx + MSAL).
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from connectors._http import (
    HttpPermanentError,
    HttpTransientError,
    Throttle,
    TokenProvider,
    make_client,
    map_http_errors,
    raise_for_status,
    retrying,
)
from connectors.base import ConnectorUnavailable, TransientError
from connectors.emulation import (
    EmulatorServer,
    FaultInjector,
    LimitHit,
    RateLimiter,
    TlsFiles,
    make_tls,
)
from connectors.identity import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
    FakeEntra,
    Unauthorized,
)
from schemas.config import BusinessCentralConnection


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


class Emulator:
    """A minimal protected API with the shared identity routes, behind a FaultInjector."""

    def __init__(self, tls: TlsFiles) -> None:
        self.entra = FakeEntra()
        routes = [Route("/api/items", self.items), *self.entra.routes()]
        self.faults = FaultInjector(Starlette(routes=routes), exempt=("/oauth2/", "/v2.0/"))
        self.server = EmulatorServer(self.faults, tls=tls)
        self.tls = tls

    async def items(self, request: Request) -> Response:
        try:
            self.entra.verify(request.headers.get("authorization"), audience=self.server.url)
        except Unauthorized as exc:
            challenge = self.entra.challenge(base_url=str(request.base_url),
                                             resource=self.server.url)
            return JSONResponse({"error": {"code": "0x80072560", "message": exc.message}},
                                status_code=401, headers={"WWW-Authenticate": challenge})
        return JSONResponse({"value": [{"id": 1}]})

    def client(self, timeout: float = 5.0) -> httpx.Client:
        settings = BusinessCentralConnection(
            tenant_id=DEFAULT_TENANT, client_id=DEFAULT_CLIENT_ID,
            client_secret=SecretStr(DEFAULT_CLIENT_SECRET), authority_host=self.server.url,
            ca_bundle=str(self.tls.ca_pem), url=self.server.url, company="CRONUS")
        provider = TokenProvider(settings, f"{self.server.url}/.default")
        return make_client(base_url=self.server.url, ca_bundle=str(self.tls.ca_pem),
                           timeout=timeout, auth=provider)


@pytest.fixture
def emulator(tls: TlsFiles) -> Iterator[Emulator]:
    emulator = Emulator(tls)
    with emulator.server:
        yield emulator


def get_items(client: httpx.Client) -> httpx.Response:
    """GET /api/items through the error edge, as a connector does."""
    with map_http_errors(entity="items"):
        response = client.get("/api/items")
    raise_for_status(response, entity="items")
    return response


# -- TLS ---------------------------------------------------------------------------------


def test_make_tls_generates_a_ca_signed_cert_with_sans_and_private_keys(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "certs", hostnames=("localhost", "127.0.0.1", "emu.local"))
    cert = x509.load_pem_x509_certificate(files.cert_pem.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_pem.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "emu.local"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert stat.S_IMODE(files.key_pem.stat().st_mode) == 0o600
    assert stat.S_IMODE((files.ca_pem.parent / "ca-key.pem").stat().st_mode) == 0o600


def test_make_tls_reuses_valid_files_and_keeps_the_ca_for_new_hostnames(tmp_path: Path) -> None:
    first = make_tls(tmp_path)
    ca, cert = first.ca_pem.read_bytes(), first.cert_pem.read_bytes()
    assert make_tls(tmp_path) == first
    assert first.ca_pem.read_bytes() == ca and first.cert_pem.read_bytes() == cert
    make_tls(tmp_path, hostnames=("localhost", "127.0.0.1", "other.local"))
    assert first.ca_pem.read_bytes() == ca and first.cert_pem.read_bytes() != cert
    first.key_pem.write_text("garbage")  # a broken file is replaced, not trusted
    make_tls(tmp_path)
    x509.load_pem_x509_certificate(first.cert_pem.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca))


def test_https_is_trusted_through_the_ca_only(tls: TlsFiles) -> None:
    with EmulatorServer(Starlette(routes=[Route("/", lambda r: Response("ok"))]),
                        tls=tls) as server:
        assert server.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(tls.ca_pem))
        assert httpx.get(server.url, verify=ctx).text == "ok"
        with pytest.raises(ConnectorUnavailable), map_http_errors():
            httpx.get(server.url, verify=ssl.create_default_context())  # system CAs only


def test_server_picks_a_port_and_stops(tls: TlsFiles) -> None:
    server = EmulatorServer(Starlette(routes=[Route("/", lambda r: Response("ok"))]))
    server.start()
    url = server.url
    assert url.startswith("http://127.0.0.1:") and server.port > 0
    assert httpx.get(url).text == "ok"
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ConnectorUnavailable, match="cannot reach"), map_http_errors():
        httpx.get(url, timeout=2)


# -- auth --------------------------------------------------------------------------------


def test_bearer_auth_renews_once_after_401(emulator: Emulator) -> None:
    with emulator.client() as client:
        assert get_items(client).json()["value"] == [{"id": 1}]
        emulator.entra.expire_all_tokens()  # the service no longer accepts the cached token
        assert get_items(client).status_code == 200
    assert emulator.entra.tokens_issued == 2


def test_401_without_a_valid_token_is_permanent_with_the_service_text(
        emulator: Emulator) -> None:
    with httpx.Client(base_url=emulator.server.url,
                      verify=ssl.create_default_context(cafile=str(emulator.tls.ca_pem))) as c:
        with pytest.raises(HttpPermanentError) as info:
            get_items(c)
        challenge = c.get("/api/items").headers["www-authenticate"]
    assert info.value.status == 401 and info.value.code == "0x80072560"
    assert "no bearer token" in str(info.value)
    assert challenge.startswith(f"Bearer authorization_uri={emulator.server.url}/{DEFAULT_TENANT}")


# -- faults ------------------------------------------------------------------------------


def test_fail_next_n_then_recover(emulator: Emulator) -> None:
    emulator.faults.fail_next(2, status=503, body={"error": {"code": "", "message": "busy"}},
                              headers={"Retry-After": "7"}, path_prefix="/api/")
    with emulator.client() as client:
        for _ in range(2):
            with pytest.raises(HttpTransientError) as info:
                get_items(client)
            assert info.value.status == 503 and info.value.retry_after == 7.0
            assert "busy" in str(info.value)
        assert get_items(client).status_code == 200


def test_drop_connection_is_connector_unavailable(emulator: Emulator) -> None:
    emulator.faults.drop_next(path_prefix="/api/")
    with emulator.client() as client:
        with pytest.raises(ConnectorUnavailable):
            get_items(client)
        assert get_items(client).status_code == 200


def test_latency_and_client_timeout(emulator: Emulator) -> None:
    with emulator.client(timeout=0.3) as client:
        get_items(client)  # token fetched before latency applies to the API
        emulator.faults.latency = 0.15
        started = time.monotonic()
        get_items(client)
        assert time.monotonic() - started >= 0.15
        emulator.faults.latency = 1.0
        with pytest.raises(ConnectorUnavailable, match="timed out"):
            get_items(client)
        emulator.faults.reset()
        assert get_items(client).status_code == 200


def business_central_429(hit: LimitHit) -> ASGIApp:
    """Business Central's answer: 429 without Retry-After."""
    body = {"error": {"code": "Application_TooManyRequests", "message": "Too many requests"}}
    return Response(json.dumps(body), status_code=429, media_type="application/json")


def test_rate_limiter_with_an_emulator_supplied_429(emulator: Emulator) -> None:
    emulator.faults.limiter = RateLimiter(max_requests=3, window=60,
                                          respond=business_central_429)
    with emulator.client() as client:
        for _ in range(3):
            get_items(client)
        with pytest.raises(HttpTransientError) as info:
            get_items(client)
    assert info.value.status == 429 and info.value.retry_after is None
    assert info.value.code == "Application_TooManyRequests"
    assert emulator.faults.limiter.hits["requests"] == 1


def test_rate_limiter_default_429_carries_retry_after(emulator: Emulator) -> None:
    emulator.faults.limiter = RateLimiter(max_requests=1, window=30)
    with emulator.client() as client:
        get_items(client)
        with pytest.raises(HttpTransientError) as info:
            get_items(client)
    assert info.value.retry_after is not None and 1 <= info.value.retry_after <= 30


def test_concurrency_limit(emulator: Emulator) -> None:
    emulator.faults.limiter = RateLimiter(max_concurrent=2)
    statuses: list[int] = []
    with emulator.client() as client:
        get_items(client)  # token first, so the parallel calls only hit the API
        emulator.faults.latency = 0.5

        def call() -> None:
            statuses.append(client.get("/api/items").status_code)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(statuses) == [200, 200, 429, 429]
    assert emulator.faults.limiter.hits["concurrency"] == 2


def test_retrying_through_a_shared_throttle_honours_retry_after(emulator: Emulator) -> None:
    emulator.faults.fail_next(1, status=429, headers={"Retry-After": "1"}, path_prefix="/api/")
    throttle = Throttle()
    with emulator.client() as client:
        started = time.monotonic()
        response = retrying(lambda: get_items(client), attempts=3, throttle=throttle)
    assert response.status_code == 200 and time.monotonic() - started >= 1.0


def test_retrying_gives_up_after_attempts(emulator: Emulator) -> None:
    emulator.faults.fail_next(3, status=502, path_prefix="/api/")
    with emulator.client() as client, pytest.raises(TransientError) as info:
        retrying(lambda: get_items(client), attempts=2, sleep=lambda _: None)
    assert info.value.status == 502
    assert emulator.faults.requests == 2


def test_parallel_401s_renew_the_token_once(emulator: Emulator) -> None:
    with emulator.client() as client:
        get_items(client)
        emulator.entra.expire_all_tokens()
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(get_items(client).status_code))
                   for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert statuses == [200] * 5 and emulator.entra.tokens_issued == 2


SERVE_SCRIPT = """
import sys
from pathlib import Path
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from connectors.emulation import make_tls, serve_forever
app = Starlette(routes=[Route("/", lambda r: Response("up"))])
serve_forever(app, "127.0.0.1", 0, make_tls(Path(sys.argv[1])), lambda m: print(m, flush=True))
"""


def test_serve_forever_stops_gracefully_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        url = first.split()[2]
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        assert first.startswith("listening on https://127.0.0.1:")
        assert httpx.get(url, verify=ctx).text == "up"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and f"stopped {url}" in out

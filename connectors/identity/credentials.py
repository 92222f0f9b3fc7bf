"""Applications registered in the fake Entra ID and how they prove who they are.

A client authenticates with its secret (form field ``client_secret`` or HTTP Basic)
or with a ``client_assertion`` JWT signed by the key of a registered certificate
(named by its ``x5t`` SHA-1 or ``x5t#S256`` SHA-256 thumbprint, RS256 or PS256).
"""

from __future__ import annotations

import base64
import hmac
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from connectors.identity.tokens import OAuthError

__all__ = ["ASSERTION_LEEWAY", "ASSERTION_TYPE", "CertificateStore", "ClientRegistry"]

#: ``client_assertion_type`` of certificate credentials.
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Seconds of clock skew tolerated on client assertions.
ASSERTION_LEEWAY = 300.0


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class _Registered:
    tenant: str
    client_id: str
    certificate: x509.Certificate


class CertificateStore:
    """Certificates registered as client credentials, found by SHA-1 or SHA-256 thumbprint."""

    def __init__(self) -> None:
        self._by_thumbprint: dict[str, _Registered] = {}

    def register(self, tenant: str, client_id: str, cert_pem: str | bytes) -> str:
        """Accept assertions signed by the key of ``cert_pem`` for this client.

        Args:
            tenant: Tenant id the application lives in.
            client_id: The application (client) id.
            cert_pem: The public certificate (PEM); other PEM blocks are ignored.

        Returns:
            The certificate's SHA-1 thumbprint in upper-case hex, as the portal shows it.
        """
        data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
        cert = x509.load_pem_x509_certificate(data)
        entry = _Registered(tenant, client_id, cert)
        for algorithm in (hashes.SHA1(), hashes.SHA256()):  # noqa: S303 - x5t is SHA-1
            self._by_thumbprint[_b64url(cert.fingerprint(algorithm))] = entry
        return cert.fingerprint(hashes.SHA1()).hex().upper()

    def verify(self, tenant: str, client_id: str, assertion: str, *, now: float,
               status: int = 401) -> None:
        """Check a ``client_assertion`` (RFC 7523) for ``client_id``.

        The JWT must name a registered certificate by ``x5t`` or ``x5t#S256``, be
        signed by its key (RS256 or PS256), have ``iss`` and ``sub`` equal to the
        client id, an ``aud`` that is a token endpoint and be within its lifetime.

        Args:
            tenant: The tenant of the token request.
            client_id: The ``client_id`` form field.
            assertion: The ``client_assertion`` form field.
            now: The fake's clock (epoch seconds).
            status: HTTP status of the ``invalid_client`` answer.

        Raises:
            OAuthError: ``invalid_client`` when any check fails.
        """
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise OAuthError("invalid_client", 700025, "Client assertion is not a valid "
                             "JWT.", status=status) from exc
        thumbprint = str(header.get("x5t#S256") or header.get("x5t") or "")
        entry = self._by_thumbprint.get(thumbprint.rstrip("="))  # padding is optional
        if entry is None or (entry.tenant, entry.client_id) != (tenant, client_id):
            raise OAuthError("invalid_client", 700027, "The certificate with identifier used "
                             "to sign the client assertion is not registered on application.",
                             status=status)
        try:
            claims = jwt.decode(
                assertion, entry.certificate.public_key(),  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"], options={"verify_aud": False,
                                                         "verify_exp": False,
                                                         "verify_nbf": False})
        except jwt.PyJWTError as exc:
            raise OAuthError("invalid_client", 700027, "Client assertion failed signature "
                             "validation.", status=status) from exc
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise OAuthError("invalid_client", 700023, "Client assertion issuer and subject "
                             "must be the client id.", status=status)
        audience = str(claims.get("aud", ""))
        if not audience.rstrip("/").endswith("/oauth2/v2.0/token"):
            raise OAuthError("invalid_client", 700021, "Client assertion audience claim does "
                             "not match the token endpoint.", status=status)
        exp, nbf = float(claims.get("exp", 0)), float(claims.get("nbf", 0))
        if exp + ASSERTION_LEEWAY < now or nbf - ASSERTION_LEEWAY > now:
            raise OAuthError("invalid_client", 700024, "Client assertion is not within its "
                             "valid time range.", status=status)


class ClientRegistry:
    """Tenants, their applications and credentials. Thread-safe.

    Args:
        tenants: Tenant id → {client id: client secret}.
        invalid_client_status: HTTP status of ``invalid_client`` answers (401 or 400).
    """

    def __init__(self, tenants: Mapping[str, Mapping[str, str]], *,
                 invalid_client_status: int = 401) -> None:
        self._tenants = {t: dict(clients) for t, clients in tenants.items()}
        self._lock = threading.Lock()
        self.certificates = CertificateStore()
        self.invalid_client_status = invalid_client_status

    @property
    def tenants(self) -> list[str]:
        """Known tenant ids, in registration order."""
        return list(self._tenants)

    def add(self, tenant: str, client_id: str, secret: str | None) -> None:
        """Register an application (a None secret keeps an existing one).

        Args:
            tenant: Tenant id; created when new.
            client_id: Application (client) id.
            secret: Its client secret; empty: none (certificate or public client only).
        """
        with self._lock:
            clients = self._tenants.setdefault(tenant, {})
            clients[client_id] = secret if secret is not None else clients.get(client_id, "")

    def check_tenant(self, tenant: str) -> None:
        """Raises: OAuthError: ``invalid_tenant`` (AADSTS90002) for an unknown tenant."""
        if tenant not in self._tenants:
            raise OAuthError("invalid_tenant", 90002, f"Tenant '{tenant}' not found. Check to "
                             "make sure you have the correct tenant ID and are signing into "
                             "the correct cloud.")

    def check_client(self, tenant: str, client_id: str | None) -> str:
        """The ``client_id`` when it is registered in ``tenant``.

        Raises:
            OAuthError: ``invalid_request`` (missing) or ``unauthorized_client`` (unknown).
        """
        if not client_id:
            raise OAuthError("invalid_request", 900144, "The request body must contain the "
                             "following parameter: 'client_id'.")
        if client_id not in self._tenants.get(tenant, {}):
            raise OAuthError("unauthorized_client", 700016, f"Application with identifier "
                             f"'{client_id}' was not found in the directory '{tenant}'.")
        return client_id

    def authenticate(self, tenant: str, client_id: str, *, secret: str | None,
                     assertion: str | None, assertion_type: str | None, now: float) -> str:
        """Check a confidential client's credential.

        Args:
            tenant: Tenant of the request.
            client_id: A registered client id.
            secret: ``client_secret`` (form or HTTP Basic), if sent.
            assertion: ``client_assertion``, if sent.
            assertion_type: ``client_assertion_type``.
            now: The fake's clock.

        Returns:
            ``appidacr``: ``"1"`` for a secret, ``"2"`` for a certificate.

        Raises:
            OAuthError: ``invalid_request`` or ``invalid_client``.
        """
        if assertion:
            if assertion_type != ASSERTION_TYPE:
                raise OAuthError("invalid_request", 90014, "The request body must contain the "
                                 f"parameter 'client_assertion_type' = {ASSERTION_TYPE}.")
            self.certificates.verify(tenant, client_id, assertion, now=now,
                                     status=self.invalid_client_status)
            return "2"
        status = self.invalid_client_status
        if not secret:
            raise OAuthError("invalid_client", 7000218, "The request body must contain the "
                             "following parameter: 'client_assertion' or 'client_secret'.",
                             status=status)
        expected = self._tenants[tenant][client_id]
        if not expected or not hmac.compare_digest(secret.encode(), expected.encode()):
            raise OAuthError("invalid_client", 7000215, "Invalid client secret provided. Ensure "
                             "the secret being sent in the request is the client secret value, "
                             f"not the client secret ID, for a secret added to app "
                             f"'{client_id}'.", status=status)
        return "1"

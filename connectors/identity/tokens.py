"""Signing, verifying and client-assertion checks behind the fake Entra ID.

Nothing here speaks HTTP: :mod:`connectors.identity.fake` turns :class:`OAuthError`
into the token endpoint's JSON error body and :class:`Unauthorized` is what the
emulators turn into ``401`` with a ``WWW-Authenticate`` challenge.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import uuid
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "OAuthError",
    "RESERVED_SCOPES",
    "SigningKey",
    "TokenIssuer",
    "Unauthorized",
    "new_opaque",
    "norm_resource",
    "resource_of",
]

#: OpenID Connect scopes that name no resource; MSAL adds them to user flows.
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})


class Unauthorized(Exception):
    """A bearer token the fake Entra ID does not accept.

    Args:
        message: Why the token was refused (never contains the token).
        code: A short machine-readable reason: ``missing_token``, ``malformed_token``,
            ``invalid_signature``, ``expired_token``, ``revoked_token``,
            ``invalid_audience`` or ``unknown_tenant``.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class OAuthError(Exception):
    """An OAuth 2.0 error answer of the token or device-code endpoint.

    Args:
        error: The OAuth error (``invalid_client``, ``invalid_scope``…).
        aadsts: The AADSTS number quoted in ``error_description`` and ``error_codes``.
        description: Text after the ``AADSTS<n>:`` prefix.
        status: HTTP status of the answer (400 unless said otherwise).
    """

    def __init__(self, error: str, aadsts: int, description: str, *, status: int = 400) -> None:
        super().__init__(f"{error}: AADSTS{aadsts}: {description}")
        self.error = error
        self.aadsts = aadsts
        self.description = description
        self.status = status

    def body(self, now: float) -> dict[str, Any]:
        """The JSON body Entra ID sends with this error.

        Args:
            now: The fake's clock (epoch seconds), for ``timestamp``.

        Returns:
            ``error``, ``error_description``, ``error_codes``, ``timestamp``,
            ``trace_id``, ``correlation_id`` and ``error_uri``.
        """
        trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        text = (
            f"AADSTS{self.aadsts}: {self.description} Trace ID: {trace_id} "
            f"Correlation ID: {correlation_id} Timestamp: {stamp}"
        )
        return {
            "error": self.error,
            "error_description": text,
            "error_codes": [self.aadsts],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": "https://login.microsoftonline.com/error?code=" + str(self.aadsts),
        }


def resource_of(scope: str, *, require_default: bool) -> str:
    """The single resource a ``scope`` parameter names, as it becomes the token's ``aud``.

    ``https://org.crm.dynamics.com/.default`` → ``https://org.crm.dynamics.com``;
    ``https://org.crm.dynamics.com/user_impersonation`` → the same resource.

    Args:
        scope: The space-separated ``scope`` form field.
        require_default: True for client credentials, which accept only ``<resource>/.default``.

    Returns:
        The resource URI without a trailing slash.

    Raises:
        OAuthError: ``invalid_scope`` when no resource, several resources, or (client
            credentials) a scope other than ``/.default`` is asked for.
    """
    resources = set()
    for item in scope.split():
        if item.lower() in RESERVED_SCOPES:
            continue
        resource, sep, permission = item.rstrip("/").rpartition("/")
        if not sep or "://" not in item or not resource.rstrip("/").partition("://")[2]:
            raise OAuthError("invalid_scope", 70011, f"The provided value for the input "
                             f"parameter 'scope' is not valid. The scope {item} is not valid.")
        if require_default and permission != ".default":
            raise OAuthError("invalid_scope", 1002012, f"The provided value for scope {item} "
                             "is not valid. Client credential flows must have a scope value "
                             "with /.default suffixed to the resource identifier "
                             "(application ID URI).")
        resources.add(resource.rstrip("/"))
    if len(resources) != 1:
        raise OAuthError("invalid_scope", 70011, "The provided value for the input parameter "
                         "'scope' is not valid: it must name exactly one resource.")
    return resources.pop()


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class SigningKey:
    """An RSA key generated at start that signs every token (RS256) and its JWKS."""

    def __init__(self) -> None:
        self._private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self._private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        #: Key id, published in the JWKS and put in every token header.
        self.kid = _b64url(hashlib.sha256(der).digest()[:20])

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set served at ``jwks_uri``.

        Returns:
            ``{"keys": [<the public key as JWK with kid, use, alg>]}``.
        """
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self._private.public_key(), as_dict=True)
        return {"keys": [dict(jwk, kid=self.kid, use="sig", alg="RS256")]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Sign ``claims`` into a compact JWT.

        Args:
            claims: The token's payload.

        Returns:
            The RS256-signed token, with ``kid`` and ``typ`` headers.
        """
        return jwt.encode(dict(claims), self._private, algorithm="RS256",
                          headers={"kid": self.kid, "typ": "JWT"})

    def decode(self, token: str) -> dict[str, Any]:
        """Check the signature of ``token`` and return its claims (no time or audience check).

        Args:
            token: A compact JWT.

        Returns:
            The claims.

        Raises:
            Unauthorized: the token is not a JWT or was not signed by this key.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("the bearer token is malformed", "malformed_token") from exc
        if header.get("kid") != self.kid:
            raise Unauthorized("the bearer token was not issued by this identity provider",
                               "invalid_signature")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._private.public_key(), algorithms=["RS256"],
                options={"verify_exp": False, "verify_aud": False, "verify_iat": False,
                         "verify_nbf": False})
        except jwt.InvalidSignatureError as exc:
            raise Unauthorized("the bearer token signature is invalid",
                               "invalid_signature") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("the bearer token is malformed", "malformed_token") from exc
        return claims


def new_opaque(nbytes: int = 32) -> str:
    """A random URL-safe string (refresh tokens, device codes)."""
    return secrets.token_urlsafe(nbytes)


class TokenIssuer:
    """Mints access tokens, remembers which were revoked, and verifies bearer headers.

    Args:
        now: The fake's clock, epoch seconds.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self.key = SigningKey()
        self._now = now
        self._lock = threading.Lock()
        self._issued: set[str] = set()
        self._revoked: set[str] = set()
        #: Access tokens issued so far.
        self.count = 0

    def claims(self, tenant: str, client_id: str, resource: str, *, user: str | None,
               ttl: float, issuer: str, credential: str = "1") -> dict[str, Any]:
        """The claims of a new access token (recorded as issued).

        Args:
            tenant: ``tid``.
            client_id: ``appid`` / ``azp``.
            resource: ``aud``.
            user: User principal name for a delegated token, None for an app token.
            ttl: Lifetime, seconds (rounded, at least 1).
            issuer: ``iss``.
            credential: ``appidacr``: "0" public client, "1" secret, "2" certificate.

        Returns:
            The claims, ready for :meth:`SigningKey.sign`.
        """
        now, lifetime = int(self._now()), max(1, round(ttl))
        uti = uuid.uuid4().hex
        with self._lock:
            self._issued.add(uti)
            self.count += 1
        subject = f"{tenant}/user/{user}" if user else f"{tenant}/app/{client_id}"
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, subject))
        claims: dict[str, Any] = {
            "aud": resource, "iss": issuer, "iat": now, "nbf": now, "exp": now + lifetime,
            "tid": tenant, "appid": client_id, "azp": client_id, "appidacr": credential,
            "oid": oid, "sub": oid, "uti": uti, "ver": "1.0", "idtyp": "user" if user else "app",
        }
        if user:
            claims.update(scp="user_impersonation", upn=user, unique_name=user,
                          name=user.partition("@")[0])
        return claims

    def revoke_all(self) -> None:
        """Revoke every token issued so far."""
        with self._lock:
            self._revoked |= self._issued
            self._issued = set()

    def verify(self, authorization: str | None, *, audience: str | None,
               tenants: Collection[str]) -> dict[str, Any]:
        """Validate an ``Authorization`` header; see :meth:`FakeEntra.verify`.

        Raises:
            Unauthorized: missing, malformed, forged, revoked, expired, foreign tenant,
                other audience.
        """
        if not authorization:
            raise Unauthorized("the request has no bearer token", "missing_token")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header is not 'Bearer <token>'",
                               "malformed_token")
        claims = self.key.decode(token.strip())
        with self._lock:
            revoked = claims.get("uti") in self._revoked
        if revoked:
            raise Unauthorized("the bearer token was revoked", "revoked_token")
        if not isinstance(claims.get("exp"), int | float) or self._now() >= claims["exp"]:
            raise Unauthorized("the bearer token is expired", "expired_token")
        if claims.get("tid") not in tenants:
            raise Unauthorized("the bearer token comes from an unknown tenant", "unknown_tenant")
        if audience is not None and norm_resource(str(claims.get("aud", ""))) != norm_resource(
                audience):
            raise Unauthorized("the bearer token is for another audience", "invalid_audience")
        return claims


def norm_resource(resource: str) -> str:
    """A resource URI compared the way ``aud`` is: no trailing slash, lower case."""
    return resource.strip().rstrip("/").lower()

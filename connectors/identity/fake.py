"""A fake Microsoft Entra ID (v2.0 endpoints) that real MSAL clients talk to.

Features
    * OpenID discovery ``/{tenant}/v2.0/.well-known/openid-configuration`` with
      ``authorization_endpoint``, ``token_endpoint``, ``device_authorization_endpoint``
      and ``jwks_uri`` (``/{tenant}/discovery/v2.0/keys``);
    * ``POST /{tenant}/oauth2/v2.0/token``: ``client_credentials`` with a client secret
      (form field or HTTP Basic) or a certificate ``client_assertion``; the device-code
      grant; ``refresh_token``;
    * ``POST /{tenant}/oauth2/v2.0/devicecode`` and ``POST /devicelogin`` (form
      ``user_code``, optional ``user`` and ``action=deny``) to approve without HTML;
    * ``GET /common/discovery/instance`` for MSAL's instance discovery;
    * access tokens are RS256 JWTs with ``aud`` (the resource of the ``…/.default``
      scope), ``iss``, ``tid``, ``appid``/``azp``, ``oid``, ``iat``/``nbf``/``exp``.

Errors follow Entra ID: ``{"error", "error_description": "AADSTS…", "error_codes",
"timestamp", "trace_id", "correlation_id"}`` with status 400 (401 for a bad client
secret or assertion; see ``invalid_client_status``).

Limits
    No interactive (authorization code) sign-in; no conditional access, no roles.
    MSAL must be told the host is trusted: ``instance_discovery=False`` (or
    ``validate_authority=False``), because it sends instance discovery for unknown
    hosts to the real ``login.microsoftonline.com``.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from connectors.identity.credentials import ClientRegistry
from connectors.identity.devices import DeviceGrants, UserGrant
from connectors.identity.tokens import OAuthError, TokenIssuer, norm_resource, resource_of

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_TENANT",
    "DEFAULT_USER",
    "DEVICE_CODE_GRANT",
    "FakeEntra",
]

#: Tenant id the emulators accept when none is configured.
DEFAULT_TENANT = "00000000-0000-0000-0000-0000000000aa"
#: Application (client) id registered in :data:`DEFAULT_TENANT` by default.
DEFAULT_CLIENT_ID = "00000000-0000-0000-0000-0000000000c1"
#: Client secret of :data:`DEFAULT_CLIENT_ID` (an emulator default, not a real secret).
DEFAULT_CLIENT_SECRET = "syncbus-emulator-secret"
#: User principal name a device-code sign-in is approved as by default.
DEFAULT_USER = "operator@syncbus.example"
#: ``grant_type`` of device-code polling.
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class FakeEntra:
    """The fake identity provider: state, admin knobs for tests, and its Starlette routes.

    Args:
        tenants: Tenant id → {client id: client secret}; default
            ``{DEFAULT_TENANT: {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}}``.
        token_ttl: Lifetime of access tokens, seconds (``expires_in``).
        issuer_host: Base URL put in ``iss`` and endpoint URLs; empty: the request's own.
        clock: Epoch-seconds clock; :meth:`advance` moves the fake's time on top of it.
        device_code_ttl: Seconds a device code may be approved in.
        device_poll_interval: ``interval`` told to device-code clients (real: 5).
        invalid_client_status: HTTP status for a wrong secret or assertion (401 or 400).
        resources: Resources (``aud``) tokens may be asked for; None accepts any.
    """

    def __init__(
        self,
        *,
        tenants: Mapping[str, Mapping[str, str]] | None = None,
        token_ttl: float = 3600,
        issuer_host: str = "",
        clock: Callable[[], float] = time.time,
        device_code_ttl: float = 900,
        device_poll_interval: int = 1,
        invalid_client_status: int = 401,
        resources: set[str] | None = None,
    ) -> None:
        source = tenants if tenants is not None else {
            DEFAULT_TENANT: {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}}
        self.clients = ClientRegistry(source, invalid_client_status=invalid_client_status)
        self.token_ttl = token_ttl
        self.issuer_host = issuer_host.rstrip("/")
        self.device_code_ttl = device_code_ttl
        self.device_poll_interval = device_poll_interval
        self.resources = {norm_resource(r) for r in resources} if resources is not None else None
        self._clock = clock
        self._skew = 0.0
        self._issuer = TokenIssuer(self.now)
        self._grants = DeviceGrants()

    # -- admin knobs -------------------------------------------------------------------

    @property
    def default_tenant(self) -> str:
        """The first configured tenant (used in challenges)."""
        return next(iter(self.clients.tenants), DEFAULT_TENANT)

    @property
    def tokens_issued(self) -> int:
        """Access tokens issued so far (tests assert renewals with it)."""
        return self._issuer.count

    def now(self) -> float:
        """The fake's current time, epoch seconds (the clock plus :meth:`advance`)."""
        return self._clock() + self._skew

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward, so tokens expire without waiting.

        Args:
            seconds: How far to move.
        """
        self._skew += seconds

    def add_client(self, tenant: str, client_id: str, secret: str) -> None:
        """Register (or replace the secret of) an application in a tenant.

        Args:
            tenant: Tenant id; created when new.
            client_id: Application (client) id.
            secret: Its client secret.
        """
        self.clients.add(tenant, client_id, secret)

    def register_certificate(self, tenant: str, client_id: str, cert_pem: str | bytes) -> str:
        """Accept client assertions signed by this certificate's key for ``client_id``.

        Args:
            tenant: Tenant id (must exist).
            client_id: Application id; registered without a secret when new.
            cert_pem: The certificate, PEM.

        Returns:
            The SHA-1 thumbprint (upper-case hex) to configure on the client side.
        """
        self.clients.add(tenant, client_id, None)
        return self.clients.certificates.register(tenant, client_id, cert_pem)

    def pending_device_codes(self) -> list[str]:
        """User codes of device-code sign-ins waiting for approval."""
        return self._grants.pending()

    def approve_device_code(self, user_code: str, *, user: str = DEFAULT_USER) -> None:
        """Approve a pending device-code sign-in, as if ``user`` had signed in.

        Args:
            user_code: The code the client displayed.
            user: The signing-in user's principal name.

        Raises:
            KeyError: no pending sign-in has this code.
        """
        self._grants.decide(user_code, user=user)

    def decline_device_code(self, user_code: str) -> None:
        """Decline a pending device-code sign-in (the client gets ``authorization_declined``).

        Raises:
            KeyError: no pending sign-in has this code.
        """
        self._grants.decide(user_code, user=None, decline=True)

    def expire_all_tokens(self) -> None:
        """Revoke every access and refresh token issued so far; new ones stay valid."""
        self._issuer.revoke_all()
        self._grants.revoke_refresh_tokens()

    # -- tokens ------------------------------------------------------------------------

    def issue_token(
        self,
        *,
        audience: str,
        tenant: str | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        user: str | None = None,
        ttl: float | None = None,
        base_url: str = "https://login.microsoftonline.com",
    ) -> str:
        """Mint an access token directly (for emulator tests that skip the token endpoint).

        Args:
            audience: The resource, e.g. ``https://org.crm.dynamics.com``.
            tenant: Tenant id; default :attr:`default_tenant`.
            client_id: The application the token is for.
            user: A user principal name for a delegated token; None for an app token.
            ttl: Lifetime in seconds; default :attr:`token_ttl`.
            base_url: Issuer base when ``issuer_host`` is not set.

        Returns:
            The signed JWT.
        """
        tenant = tenant or self.default_tenant
        claims = self._claims(tenant, client_id, audience.strip().rstrip("/"), user=user,
                              ttl=ttl, base=self.issuer_host or base_url)
        return self._issuer.key.sign(claims)

    def verify(self, authorization: str | None, *, audience: str | None = None) -> dict[str, Any]:
        """Validate an ``Authorization`` header value and return the token's claims.

        Args:
            authorization: The header value, ``Bearer <jwt>``; None when absent.
            audience: The resource the caller serves; the token's ``aud`` must match it
                (trailing slash and case ignored). None skips the check.

        Returns:
            The token claims.

        Raises:
            Unauthorized: missing, malformed, forged, revoked or expired token, unknown
                tenant, or another audience.
        """
        return self._issuer.verify(authorization, audience=audience,
                                   tenants=self.clients.tenants)

    def challenge(self, *, base_url: str = "", resource: str | None = None,
                  tenant: str | None = None) -> str:
        """The ``WWW-Authenticate`` value a resource sends with its 401.

        Args:
            base_url: Base URL of this identity provider when ``issuer_host`` is not set
                (for an emulator serving both on one port: the request's base URL).
            resource: The resource's own URL, sent as ``resource_id``.
            tenant: Tenant in ``authorization_uri``; default :attr:`default_tenant`.

        Returns:
            ``Bearer authorization_uri=<base>/<tenant>/oauth2/authorize[, resource_id=…]``.
        """
        base = self.issuer_host or base_url.rstrip("/") or "https://login.microsoftonline.com"
        value = f"Bearer authorization_uri={base}/{tenant or self.default_tenant}/oauth2/authorize"
        return value + (f", resource_id={resource.rstrip('/')}/" if resource else "")

    def _claims(self, tenant: str, client_id: str, resource: str, *, user: str | None,
                ttl: float | None, base: str, credential: str = "1") -> dict[str, Any]:
        return self._issuer.claims(tenant, client_id, resource, user=user,
                                   ttl=self.token_ttl if ttl is None else ttl,
                                   issuer=f"{base}/{tenant}/v2.0", credential=credential)

    # -- HTTP --------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """Starlette routes of every endpoint; mount them in an emulator's app.

        Returns:
            Routes for discovery, keys, token, device code, device login, instance
            discovery and (refusing) authorize.
        """
        return [
            Route("/common/discovery/instance", self._instance_discovery, methods=["GET"]),
            Route("/devicelogin", self._devicelogin, methods=["GET", "POST"]),
            Route("/{tenant}/v2.0/.well-known/openid-configuration", self._openid,
                  methods=["GET"]),
            Route("/{tenant}/discovery/v2.0/keys", self._keys, methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/authorize", self._authorize, methods=["GET", "POST"]),
            Route("/{tenant}/oauth2/v2.0/token", self._token, methods=["POST"]),
            Route("/{tenant}/oauth2/v2.0/devicecode", self._devicecode, methods=["POST"]),
        ]

    def _base(self, request: Request) -> str:
        return self.issuer_host or str(request.base_url).rstrip("/")

    def _error(self, exc: OAuthError) -> JSONResponse:
        return JSONResponse(exc.body(self.now()), status_code=exc.status, headers=_NO_STORE)

    def _check_resource(self, scope: str, *, require_default: bool) -> str:
        resource = resource_of(scope, require_default=require_default)
        if self.resources is not None and norm_resource(resource) not in self.resources:
            raise OAuthError("invalid_resource", 500011, f"The resource principal named "
                             f"{resource} was not found in the tenant.")
        return resource

    async def _openid(self, request: Request) -> Response:
        tenant, base = request.path_params["tenant"], self._base(request)
        try:
            self.clients.check_tenant(tenant)
        except OAuthError as exc:
            return self._error(exc)
        prefix = f"{base}/{tenant}"
        return JSONResponse({
            "issuer": f"{prefix}/v2.0",
            "authorization_endpoint": f"{prefix}/oauth2/v2.0/authorize",
            "token_endpoint": f"{prefix}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{prefix}/oauth2/v2.0/devicecode",
            "jwks_uri": f"{prefix}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_post", "client_secret_basic", "private_key_jwt"],
            "grant_types_supported": ["client_credentials", DEVICE_CODE_GRANT, "refresh_token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": None,
            "cloud_instance_name": "syncbus-emulator",
        })

    async def _keys(self, request: Request) -> Response:
        return JSONResponse(self._issuer.key.jwks())

    async def _authorize(self, request: Request) -> Response:
        return self._error(OAuthError("unsupported_response_type", 70000, "Interactive sign-in "
                                      "is not supported by the emulator; use the device code "
                                      "flow or client credentials."))

    async def _instance_discovery(self, request: Request) -> Response:
        endpoint = urllib.parse.urlsplit(request.query_params.get("authorization_endpoint", ""))
        tenant = endpoint.path.strip("/").partition("/")[0] or "common"
        base, host = self._base(request), request.url.netloc
        return JSONResponse({
            "tenant_discovery_endpoint": f"{base}/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        })

    async def _devicelogin(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse({"message": "POST user_code=<code> (optionally user=<upn>, "
                                            "action=deny) to this URL to answer a sign-in."})
        form = await request.form()
        code, user = _field(form, "user_code") or "", _field(form, "user") or DEFAULT_USER
        try:
            self._grants.decide(code, user=user, decline=_field(form, "action") == "deny")
        except KeyError:
            return JSONResponse({"error": "invalid_user_code",
                                 "error_description": "No pending sign-in has this code."},
                                status_code=404)
        return JSONResponse({"user_code": code, "approved": _field(form, "action") != "deny"})

    async def _devicecode(self, request: Request) -> Response:
        tenant, form = request.path_params["tenant"], await request.form()
        try:
            self.clients.check_tenant(tenant)
            client_id = self.clients.check_client(tenant, _field(form, "client_id"))
            scope = _field(form, "scope") or ""
            self._check_resource(scope, require_default=False)
        except OAuthError as exc:
            return self._error(exc)
        grant = self._grants.start(tenant, client_id, scope, self.now() + self.device_code_ttl)
        uri = f"{self._base(request)}/devicelogin"
        return JSONResponse({
            "user_code": grant.user_code, "device_code": grant.device_code,
            "verification_uri": uri, "expires_in": int(self.device_code_ttl),
            "interval": self.device_poll_interval,
            "message": f"To sign in, use a web browser to open the page {uri} and enter the "
                       f"code {grant.user_code} to authenticate.",
        }, headers=_NO_STORE)

    async def _token(self, request: Request) -> Response:
        tenant, form = request.path_params["tenant"], await request.form()
        try:
            self.clients.check_tenant(tenant)
            body = self._grant(request, tenant, form)
        except OAuthError as exc:
            return self._error(exc)
        return JSONResponse(body, headers=_NO_STORE)

    def _grant(self, request: Request, tenant: str, form: FormData) -> dict[str, Any]:
        grant_type, base = _field(form, "grant_type"), self._base(request)
        basic_id, basic_secret = _basic_auth(request.headers.get("authorization"))
        client_id = self.clients.check_client(tenant, _field(form, "client_id") or basic_id)
        scope = _field(form, "scope") or ""
        if grant_type == "client_credentials":
            credential = self.clients.authenticate(
                tenant, client_id, secret=_field(form, "client_secret") or basic_secret,
                assertion=_field(form, "client_assertion"),
                assertion_type=_field(form, "client_assertion_type"), now=self.now())
            resource = self._check_resource(scope, require_default=True)
            claims = self._claims(tenant, client_id, resource, user=None, ttl=None, base=base,
                                  credential=credential)
            return self._token_body(claims)
        if grant_type == DEVICE_CODE_GRANT:
            code = _field(form, "device_code") or _field(form, "code") or ""
            user_grant = self._grants.redeem(tenant, client_id, code, self.now())
            return self._user_tokens(user_grant, user_grant.scope, base)
        if grant_type == "refresh_token":
            user_grant = self._grants.use_refresh_token(
                tenant, client_id, _field(form, "refresh_token") or "")
            return self._user_tokens(user_grant, scope or user_grant.scope, base)
        if not grant_type:
            raise OAuthError("invalid_request", 900144, "The request body must contain the "
                             "following parameter: 'grant_type'.")
        raise OAuthError("unsupported_grant_type", 70003, "The app requested an unsupported "
                         f"grant type '{grant_type}'.")

    def _token_body(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        expires_in = max(1, int(claims["exp"]) - int(claims["iat"]))
        return {"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in,
                "access_token": self._issuer.key.sign(claims)}

    def _user_tokens(self, grant: UserGrant, scope: str, base: str) -> dict[str, Any]:
        resource = self._check_resource(scope, require_default=False)
        claims = self._claims(grant.tenant, grant.client_id, resource, user=grant.user,
                              ttl=None, base=base, credential="0")
        body = self._token_body(claims)
        requested = {s.lower() for s in scope.split()}
        body["scope"] = " ".join(s for s in scope.split() if "://" in s)
        if "offline_access" in requested:
            body["refresh_token"] = self._grants.new_refresh_token(
                UserGrant(grant.tenant, grant.client_id, grant.user, scope))
        if "openid" in requested:
            body["id_token"] = self._issuer.key.sign(dict(
                claims, aud=grant.client_id, ver="2.0", preferred_username=grant.user))
            info = json.dumps({"uid": claims["oid"], "utid": grant.tenant}).encode()
            body["client_info"] = base64.urlsafe_b64encode(info).rstrip(b"=").decode()
        return body


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _basic_auth(header: str | None) -> tuple[str | None, str | None]:
    """client_id and secret from an HTTP Basic header (both URL-encoded per RFC 6749)."""
    scheme, _, payload = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, _, password = base64.b64decode(payload).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None, None
    return urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)

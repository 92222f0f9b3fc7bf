"""The HTTP face of the emulator: Starlette routes, bearer tokens, faults and 429s.

Features
    * ``/v2.0/{tenant}/{environment}/api/…`` for the API (see ``service``) and the fake
      Entra ID's endpoints (``/{tenant}/oauth2/v2.0/token`` …) on the same host.
    * Every API call needs a bearer token the fake Entra ID issued for
      ``https://api.businesscentral.dynamics.com`` in the URL's tenant: otherwise 401
      ``Authentication_InvalidCredentials`` with a ``WWW-Authenticate`` challenge.
    * Unknown environments answer 404; bodies that are not JSON answer 400.
    * A :class:`~connectors.emulation.FaultInjector` wraps the API (not the identity
      endpoints): scripted failures, dropped connections, latency, and a
      :class:`~connectors.emulation.RateLimiter` whose 429 carries Business Central's
      error body and **no** ``Retry-After``.

Configuration
    See :class:`~connectors.business_central.emulator.BusinessCentralEmulator`.

Limits
    * The "common" URL form without a tenant is not served.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from connectors.business_central.emulator import errors
from connectors.business_central.emulator.service import ApiReply, ApiRequest, Service, split_api
from connectors.emulation import FaultInjector, LimitHit, RateLimiter
from connectors.identity import FakeEntra, Unauthorized

__all__ = ["BC_RESOURCE", "build_app", "too_many_requests"]

#: The resource (token audience) of the Business Central API.
BC_RESOURCE = "https://api.businesscentral.dynamics.com"
_ODATA_JSON = "application/json; odata.metadata=minimal; odata.streaming=true"
#: Path parts of the identity endpoints (never faulted nor limited).
IDENTITY_PATHS = ("/oauth2/", "/.well-known/", "/discovery/", "/devicelogin")


def too_many_requests(hit: LimitHit) -> ASGIApp:
    """Business Central's 429: its JSON error and no ``Retry-After`` header.

    Args:
        hit: The limit that refused the request.

    Returns:
        The response.
    """
    exc = errors.too_many_requests(int(hit.limit))
    return JSONResponse(exc.body(), status_code=429)


class _Api:
    """The API endpoint: authentication, environment check, dispatch, rendering."""

    def __init__(self, service: Service, entra: FakeEntra, tenant: str, domains: set[str],
                 environments: set[str]) -> None:
        self.service, self.entra, self.tenant = service, entra, tenant
        self.domains, self.environments = domains, environments

    async def endpoint(self, request: Request) -> Response:
        """Answer one API request."""
        tenant, environment = request.path_params["tenant"], request.path_params["environment"]
        try:
            self._authenticate(request, tenant)
            if environment not in self.environments:
                raise errors.BCError(404, "BadRequest_NotFound",
                                     f"The environment '{environment}' does not exist.")
            api, path = split_api(request.path_params["rest"])
            root = f"{str(request.base_url).rstrip('/')}/v2.0/{tenant}/{environment}/api/"
            call = ApiRequest(request.method, api, path, dict(request.query_params),
                              {k.lower(): v for k, v in request.headers.items()},
                              await _json_body(request), root)
            reply = await run_in_threadpool(self.service.handle, call)
        except errors.BCError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        return _render(reply)

    def _authenticate(self, request: Request, tenant: str) -> None:
        challenge = self.entra.challenge(base_url=str(request.base_url), resource=BC_RESOURCE,
                                         tenant=self.tenant)
        try:
            claims = self.entra.verify(request.headers.get("authorization"), audience=BC_RESOURCE)
        except Unauthorized as exc:
            raise errors.unauthorized(exc.message, challenge) from None
        if tenant.lower() not in {self.tenant.lower(), *self.domains} or \
                str(claims.get("tid", "")).lower() != self.tenant.lower():
            raise errors.unauthorized("the token is not for this tenant", challenge)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise errors.bad_request("The request body is not valid JSON.") from None


def _render(reply: ApiReply) -> Response:
    headers = {k: v for k, v in reply.headers.items() if k != "content-type"}
    headers.setdefault("odata-version", "4.0")
    if reply.body is None:
        return Response(status_code=reply.status, headers=headers)
    if isinstance(reply.body, str):
        kind = reply.headers.get("content-type", "text/plain")
        return Response(reply.body, status_code=reply.status, media_type=kind, headers=headers)
    return Response(json.dumps(reply.body), status_code=reply.status, media_type=_ODATA_JSON,
                    headers=headers)


def build_app(service: Service, entra: FakeEntra, *, tenant: str, domains: set[str],
              environments: set[str], limiter: RateLimiter) -> FaultInjector:
    """The whole emulator as one ASGI app.

    Args:
        service: The API dispatcher.
        entra: The fake identity provider (its routes are mounted too).
        tenant: The tenant id the environment belongs to.
        domains: Other names accepted for the tenant in URLs (``contoso.onmicrosoft.com``).
        environments: Environment names served.
        limiter: The rate limiter (disabled while its limits are None).

    Returns:
        The fault injector wrapping the Starlette app (keep it to turn the knobs).
    """
    api = _Api(service, entra, tenant, {d.lower() for d in domains}, environments)
    routes = [Route("/v2.0/{tenant}/{environment}/api/{rest:path}", api.endpoint,
                    methods=["GET", "POST", "PATCH", "PUT", "DELETE"]), *entra.routes()]
    return FaultInjector(Starlette(routes=routes), limiter=limiter, exempt=IDENTITY_PATHS)

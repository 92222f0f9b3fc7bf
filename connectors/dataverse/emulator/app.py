"""The emulator's ASGI app: Web API routes behind bearer-token checks, plus Entra ID.

Features
    * ``/api/data/v9.2/…`` answered by :class:`Service` (in a worker thread);
      ``Authorization: Bearer`` checked with the fake Entra ID: a missing, forged,
      revoked or expired token, or one for another resource, gets 401 with a
      ``WWW-Authenticate`` challenge and a Dataverse error body.
    * The fake Entra ID's endpoints on the same host (``/<tenant>/oauth2/v2.0/token`` …).
    * Unknown paths, methods and emulator bugs also answer with Dataverse's error body.
    * Service-protection 429s with ``Retry-After`` and Dataverse's codes:
      ``0x80072322`` (requests), ``0x80072321`` (execution time), ``0x80072326``
      (concurrency).

Configuration
    Built by ``DataverseEmulator``; see there.

Limits
    * No ``x-ms-ratelimit-*`` debug headers.
"""

from __future__ import annotations

import math

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from connectors.dataverse.emulator.errors import (
    CODE_CONCURRENT_REQUESTS,
    CODE_EXECUTION_TIME,
    CODE_REQUEST_COUNT,
    error_body,
)
from connectors.dataverse.emulator.http import JSON_TYPE, ApiRequest
from connectors.dataverse.emulator.service import Service
from connectors.emulation import LimitHit
from connectors.identity import FakeEntra, Unauthorized

__all__ = ["API_PREFIX", "build_app", "throttled"]

log = structlog.get_logger(__name__)

#: Path of the Web API root.
API_PREFIX = "/api/data/v9.2"
_METHODS = ["GET", "POST", "PATCH", "PUT", "DELETE"]


def throttled(hit: LimitHit) -> ASGIApp:
    """Dataverse's 429 for a service-protection limit.

    Args:
        hit: The limit exceeded.

    Returns:
        The response: ``Retry-After`` (whole seconds) and the documented error code.
    """
    window = f"{hit.window:g}"
    if hit.kind == "concurrency":
        code, message = CODE_CONCURRENT_REQUESTS, (
            f"Number of concurrent requests exceeded the limit of {hit.limit:g}.")
    elif hit.kind == "execution_time":
        code, message = CODE_EXECUTION_TIME, (
            f"Combined execution time of incoming requests exceeded limit of "
            f"{hit.limit * 1000:,.0f} milliseconds over time window of {window} seconds. "
            "Decrease number of concurrent requests or reduce the duration of requests and "
            "try again later.")
    else:
        code, message = CODE_REQUEST_COUNT, (
            f"Number of requests exceeded the limit of {hit.limit:g} over time window of "
            f"{window} seconds.")
    return Response(error_body(code, message), status_code=429, media_type=JSON_TYPE,
                    headers={"Retry-After": str(max(1, math.ceil(hit.retry_after))),
                             "OData-Version": "4.0"})


def build_app(service: Service, entra: FakeEntra) -> Starlette:
    """The Starlette app of one emulated organisation.

    Args:
        service: The Web API.
        entra: The identity provider whose tokens are accepted.

    Returns:
        The app (wrap it in a ``FaultInjector`` for limits and faults).
    """

    async def api(request: Request) -> Response:
        base = str(request.base_url)
        try:
            claims = entra.verify(request.headers.get("authorization"), audience=base)
        except Unauthorized as exc:
            challenge = entra.challenge(base_url=base, resource=base)
            return Response(error_body("0x80040220", f"Authentication failed: {exc.message}."),
                            status_code=401, media_type=JSON_TYPE,
                            headers={"WWW-Authenticate": challenge})
        path = request.url.path[len(API_PREFIX):]
        target = path + (f"?{request.url.query}" if request.url.query else "")
        body = await request.body()
        req = ApiRequest.from_target(request.method, target, dict(request.headers), body,
                                     f"{base}{API_PREFIX.lstrip('/')}/",
                                     caller=str(claims.get("oid", "")))
        try:
            result = await run_in_threadpool(service.handle, req)
        except Exception:  # noqa: BLE001 - a bug in the emulator answers like Dataverse would
            log.exception("emulator_error", path=path)
            return _error(500, "0x80040216", "An unexpected error occurred.")
        return Response(result.body, status_code=result.status, headers=result.headers)

    async def home(request: Request) -> Response:
        return JSONResponse({"service": "syncbus Dataverse emulator",
                             "webapi": f"{request.base_url}{API_PREFIX.lstrip('/')}/"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, "0x80060888", f"Resource not found for the segment "
                      f"'{request.url.path.strip('/').split('/')[-1]}'.")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, "0x80060888", f"The requested resource does not support http "
                      f"method '{request.method}'.")

    routes = [
        *entra.routes(),
        Route("/", home, methods=["GET"]),
        Route(API_PREFIX, api, methods=_METHODS),
        Route(API_PREFIX + "/{rest:path}", api, methods=_METHODS),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


def _error(status: int, code: str, message: str) -> Response:
    return Response(error_body(code, message), status_code=status, media_type=JSON_TYPE,
                    headers={"OData-Version": "4.0"})

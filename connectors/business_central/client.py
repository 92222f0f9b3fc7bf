"""HTTP access to one Business Central environment: tokens, retries, paging, ``$batch``.

Features
    * MSAL client credentials for ``https://api.businesscentral.dynamics.com/.default``
      (through :class:`~connectors._http.TokenProvider`), renewed before expiry and
      once more after a 401; without a secret or certificate, the token of an operator
      who signed in with ``syncbus login`` (:mod:`connectors.business_central.auth`).
    * Addressing by tenant and environment
      (``<url>/v2.0/<tenant>/<environment>/api/<route>/…``) and by company, whose name
      or id is resolved once.
    * Every request waits for the host's shared :class:`~connectors._http.Throttle`;
      429 (Business Central sends no ``Retry-After``), 408 and 5xx are retried with a
      shared, jittered exponential backoff (``max_retries`` attempts in all, within
      ``MAX_RETRY_SECONDS`` of :mod:`connectors._http`; a longer wait is left to the bus).
    * Server-driven paging: ``Prefer: odata.maxpagesize`` and ``@odata.nextLink``.
    * JSON ``$batch`` of at most 100 operations, optionally ``Isolation: snapshot``.

Configuration
    The ``BusinessCentralConnection`` model: ``url``, ``tenant_id``, ``environment``,
    ``company``, credentials, ``ca_bundle``, ``timeout``, ``max_retries``, ``backoff``.

Limits
    * The 20,000-row page cap is the server's; ``pages`` follows next links until done.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from connectors._http import (
    Throttle,
    TokenProvider,
    make_client,
    map_http_errors,
    raise_for_status,
    retrying,
)
from connectors.base import ConfigError
from connectors.business_central.auth import BC_SCOPE, token_cache_path, uses_sign_in
from schemas.config import BusinessCentralConnection

__all__ = ["BCClient", "BC_SCOPE", "MAX_BATCH", "quote_key"]

#: Operations Business Central accepts in one ``$batch``.
MAX_BATCH = 100
_JSON = "application/json"


def quote_key(value: Any, *, guid: bool) -> str:
    """A key as it goes between parentheses: a bare GUID or a quoted string."""
    text = str(value)
    return text if guid else "'" + text.replace("'", "''") + "'"


class BCClient:
    """One environment of one tenant, with a resolved company.

    Args:
        name: The connection name (for messages).
        config: The connection settings.
    """

    def __init__(self, name: str, config: BusinessCentralConnection) -> None:
        self.name, self.config = name, config
        root = config.url.rstrip("/")
        self.base = f"{root}/v2.0/{config.tenant_id}/{config.environment}/api/"
        cache = token_cache_path(name, config.state_dir) if uses_sign_in(config) else None
        self.tokens = TokenProvider(config, BC_SCOPE, cache_path=cache, connection=name)
        self.http = make_client(base_url=self.base, ca_bundle=config.ca_bundle,
                                timeout=config.timeout, auth=self.tokens)
        self.throttle = Throttle.for_host(root)
        self.throttle.base_delay = config.backoff
        self.throttle.max_delay = max(config.backoff * 32, config.backoff)
        self._company_id: str | None = None

    def close(self) -> None:
        """Close the HTTP connections."""
        self.http.close()

    # -- plain requests ---------------------------------------------------------------

    def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                json: Any = None, headers: Mapping[str, str] | None = None,
                entity: str | None = None, allow: tuple[int, ...] = ()) -> httpx.Response:
        """Send one request, retrying what is transient.

        Args:
            method: HTTP method.
            path: Path below ``…/api/`` (or an absolute next link).
            params: Query options.
            json: JSON body.
            headers: Extra headers.
            entity: Entity concerned (for errors).
            allow: Error statuses returned instead of raised (e.g. 404).

        Returns:
            The response.

        Raises:
            ConnectorUnavailable: the host cannot be reached.
            TransientError: 408/429/5xx after every retry.
            PermanentError: 4xx, refused credentials.
        """
        def send() -> httpx.Response:
            with map_http_errors(entity=entity):
                response = self.http.request(method, path, params=params, json=json,
                                             headers=dict(headers or {}))
            if response.status_code not in allow:
                raise_for_status(response, entity=entity)
            return response
        return retrying(send, attempts=self.config.max_retries, throttle=self.throttle,
                        max_wait=self.throttle.max_delay)

    def get_json(self, path: str, *, params: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None,
                 entity: str | None = None) -> dict[str, Any]:
        """GET a JSON object (see :meth:`request` for errors)."""
        body: dict[str, Any] = self.request("GET", path, params=params, headers=headers,
                                            entity=entity).json()
        return body

    def pages(self, path: str, params: Mapping[str, str], page_size: int, *,
              entity: str | None = None) -> Iterator[tuple[list[dict[str, Any]], bool]]:
        """Yield the rows of a collection page by page, following next links.

        Args:
            path: The collection path.
            params: Query options of the first request.
            page_size: ``odata.maxpagesize`` asked for (the server may cap it).
            entity: Entity concerned (for errors).

        Returns:
            An iterator of (rows, whether another page follows).

        Raises:
            See :meth:`request`.
        """
        headers = {"Prefer": f"odata.maxpagesize={page_size}"}
        body = self.get_json(path, params=params, headers=headers, entity=entity)
        while True:
            link = body.get("@odata.nextLink")
            yield list(body.get("value", [])), bool(link)
            if not link:
                return
            body = self.get_json(str(link), headers=headers, entity=entity)

    def batch(self, operations: list[dict[str, Any]], *, api: str = "v2.0",
              atomic: bool = False, entity: str | None = None) -> list[dict[str, Any]]:
        """Send a JSON ``$batch`` (ids are assigned) and return the responses in order.

        Args:
            operations: ``{"method", "url", "body"?, "headers"?}`` each, at most 100;
                ``url`` is relative to the API route.
            api: The API route whose ``$batch`` endpoint is used.
            atomic: Add ``Isolation: snapshot`` (all or nothing).
            entity: Entity concerned (for errors).

        Returns:
            ``{"id", "status", "headers", "body"}`` per operation, in request order.

        Raises:
            ValueError: more than 100 operations.
            See :meth:`request` for the batch request itself.
        """
        if len(operations) > MAX_BATCH:
            raise ValueError(f"a $batch holds at most {MAX_BATCH} operations")
        requests = []
        for i, op in enumerate(operations, 1):
            headers = {"Content-Type": _JSON, **op.get("headers", {})}
            requests.append({"id": str(i), **op, "headers": headers})
        headers = {"Isolation": "snapshot"} if atomic else {}
        body = self.request("POST", f"{api}/$batch", json={"requests": requests},
                            headers=headers, entity=entity).json()
        by_id = {str(r.get("id")): r for r in body.get("responses", [])}
        return [by_id.get(str(i), {"status": 500, "body": None})
                for i in range(1, len(operations) + 1)]

    # -- addressing -------------------------------------------------------------------

    def company_id(self) -> str:
        """The configured company's id (looked up by name or id once).

        Raises:
            ConfigError: no company with that name or id.
        """
        if self._company_id is None:
            wanted = self.config.company
            companies = self.get_json("v2.0/companies").get("value", [])
            found = next((c for c in companies if wanted.lower() in (
                str(c.get("id", "")).lower(), str(c.get("name", "")).lower(),
                str(c.get("displayName", "")).lower())), None)
            if found is None:
                names = ", ".join(repr(c.get("name")) for c in companies) or "none"
                raise ConfigError(f"connection {self.name!r}: no company {wanted!r} in "
                                  f"environment {self.config.environment!r} (it has: {names})")
            self._company_id = str(found["id"])
        return self._company_id

    def collection(self, api: str, entity_set: str) -> str:
        """The path of an entity set of the company: ``<api>/companies(<id>)/<set>``."""
        return f"{api}/companies({self.company_id()})/{entity_set}"

    def resource(self, api: str, entity_set: str) -> str:
        """The webhook ``resource`` of an entity set: ``/api/<api>/companies(<id>)/<set>``."""
        return f"/api/{api}/companies({self.company_id()})/{entity_set}"

    def absolute(self, path: str) -> str:
        """The absolute URL of a path below ``…/api/``."""
        return urllib.parse.urljoin(self.base, path)

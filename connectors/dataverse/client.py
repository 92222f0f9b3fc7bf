"""HTTP access to one Dataverse organisation: tokens, throttle, retries, errors.

Every request goes through :meth:`DataverseClient.send`: it waits for the
organisation's shared :class:`~connectors._http.Throttle` (one per host in the
process, so all connectors writing to the same organisation slow down together),
sends with a bearer token from MSAL (renewed before expiry, once more after a 401),
maps the answer onto the bus error tree, and retries transient failures with
tenacity: a ``Retry-After`` pauses the shared throttle for everyone, a failure
without one (503, time-out, dropped connection) triggers its shared backoff. The
retries of one call fit in :data:`~connectors._http.MAX_RETRY_SECONDS`: a failure
whose next wait would not fit is raised with ``retry_after`` set to that wait, and
the bus's retry queues take over.

Features
    * The standard Web API headers (``OData-MaxVersion``/``OData-Version: 4.0``,
      ``Accept: application/json``, ``If-None-Match: null`` on queries).
    * ``get_json`` / ``pages`` for queries, ``batch`` for ``$batch`` requests
      (``Prefer: odata.continue-on-error``, so every operation gets its own answer).

Configuration
    ``retry_attempts`` (calls in all), ``max_retry_wait`` (a longer ``Retry-After`` is
    left to the bus), ``rate_limit`` (optional pacing), ``timeout``, ``ca_bundle``.

Limits
    * One organisation per client; requests are synchronous.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import structlog
import tenacity

from connectors._http import (
    TRANSIENT_STATUSES,
    OAuthSettings,
    Throttle,
    TokenProvider,
    defer,
    make_client,
    map_http_errors,
    raise_for_status,
    retry_budget,
    retry_time_left,
)
from connectors.base import PermanentError, TransientError
from connectors.dataverse.multipart import (
    BatchItem,
    OperationResult,
    decode_responses,
    encode_requests,
)

__all__ = ["API_PATH", "DataverseClient", "EXPIRED_VERSION", "is_expired_token"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Path of the Web API root on the organisation's host.
API_PATH = "/api/data/v9.2/"
#: Error code of an expired or unknown delta token (ExpiredVersionStamp).
EXPIRED_VERSION = "0x80044352"
_BASE_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}


def _content_error(status: int) -> bool:
    """A 4xx about what was sent (not authentication, not a "come back later")."""
    return 400 <= status < 500 and status not in (401, 403) and status not in TRANSIENT_STATUSES


def is_expired_token(exc: Exception) -> bool:
    """True when ``exc`` is Dataverse's "Version stamp … has expired" error."""
    return getattr(exc, "code", None) == EXPIRED_VERSION or EXPIRED_VERSION in str(exc)


class DataverseClient:
    """The Web API of one organisation.

    Args:
        name: Connection name (log field).
        url: Organisation URL, ``https://contoso.crm4.dynamics.com``.
        oauth: Tenant, client and credential settings.
        timeout: Seconds per request.
        ca_bundle: CA file to trust (the emulator's ``ca.pem``), or None.
        cache_path: MSAL token cache file (written owner-only).
        attempts: Calls per request in all (1 = no retry).
        max_wait: Longest ``Retry-After`` waited for inside the client.
        rate_limit: Requests per second for the shared throttle, or None.

    Raises:
        ConfigError: the CA bundle cannot be read.
    """

    def __init__(self, name: str, *, url: str, oauth: OAuthSettings, timeout: float,
                 ca_bundle: str | None, cache_path: Path | None, attempts: int = 4,
                 max_wait: float = 60.0, rate_limit: float | None = None) -> None:
        self.name = name
        self.org_url = url.rstrip("/")
        self.api_url = self.org_url + API_PATH
        self.tokens = TokenProvider(oauth, f"{self.org_url}/.default", cache_path=cache_path)
        self._ca_bundle, self._timeout = ca_bundle, timeout
        self._http: httpx.Client | None = None
        self._http_lock = threading.Lock()
        self.http  # noqa: B018 - a bad CA bundle fails now, not at the first request
        self.throttle = Throttle.for_host(self.org_url, rate=rate_limit)
        self.attempts, self.max_wait = attempts, max_wait
        #: Requests sent and 429 answers received (benchmarks read them).
        self.requests = 0
        self.throttled = 0

    @property
    def http(self) -> httpx.Client:
        """The HTTP client (created again after :meth:`close`)."""
        with self._http_lock:
            if self._http is None:
                self._http = make_client(base_url=self.api_url, ca_bundle=self._ca_bundle,
                                         timeout=self._timeout, auth=self.tokens)
            return self._http

    def close(self) -> None:
        """Close the HTTP connections (the client can still be used afterwards)."""
        with self._http_lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    # -- sending ------------------------------------------------------------------------

    def send(self, method: str, url: str, *, entity: str | None = None,
             headers: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
             content: bytes | None = None, json_body: Any = None,
             answer_errors: bool = False) -> httpx.Response:
        """Send one request, retrying transient failures (see the module docstring).

        Args:
            method: HTTP method.
            url: Relative to the Web API root, or absolute (next and delta links).
            entity: The table concerned, for errors.
            headers: Extra headers.
            params: Query options.
            content: Raw body.
            json_body: JSON body (instead of ``content``).
            answer_errors: Return a 4xx answer about the request's content (any 4xx
                but 401, 403 and the transient ones) instead of raising, so the caller
                can read Dataverse's own error.

        Returns:
            A 2xx/3xx response (or such a 4xx when ``answer_errors``).

        Raises:
            ConnectorUnavailable: the organisation cannot be reached (after retries).
            TransientError: 429/5xx after the retries (``retry_after`` set when known).
            PermanentError: 4xx (the message and ``code`` are Dataverse's own).
        """
        all_headers = {**_BASE_HEADERS, **(headers or {})}
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            all_headers.setdefault("Content-Type", "application/json")

        def attempt() -> httpx.Response:
            self.throttle.acquire()
            self.requests += 1
            try:
                with map_http_errors(entity=entity):
                    response = self.http.request(method, url, headers=all_headers,
                                                 params=params, content=content)
                if not (answer_errors and _content_error(response.status_code)):
                    raise_for_status(response, entity=entity)
            except TransientError as exc:
                self._slow_down(exc)
                raise
            self.throttle.success()
            return response

        return self.retrying(attempt)

    def retrying(self, func: Callable[[], T]) -> T:
        """Call ``func``, retrying :class:`TransientError` (tenacity) up to ``attempts``.

        A ``retry_after`` above ``max_wait`` is not waited for: the error is raised. Nor
        is a wait that would outlast the call's retry budget
        (:func:`~connectors._http.retry_budget`).

        Raises:
            TransientError: the last failure; ``retry_after`` is at least the time the
                organisation's throttle still holds requests back.
            PermanentError: at once.
        """
        retryer = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            retry=tenacity.retry_if_exception(self._retryable),
            wait=tenacity.wait_none(),  # the shared throttle does the waiting
            before_sleep=self._log_retry, reraise=True)
        with retry_budget(clock=self.throttle.clock):
            try:
                return retryer(func)
            except TransientError as exc:
                defer(exc, self.throttle.paused_for)
                raise

    def _retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, TransientError):
            return False
        if self.throttle.paused_for > retry_time_left():
            return False  # the bus waits instead (see MAX_RETRY_SECONDS)
        return exc.retry_after is None or exc.retry_after <= self.max_wait

    def _slow_down(self, exc: TransientError) -> None:
        """Tell the shared throttle: pause everyone for Retry-After, or back off."""
        if exc.status == 429:
            self.throttled += 1
        if exc.retry_after is not None:
            self.throttle.pause(exc.retry_after, reason=exc.message)
        else:
            self.throttle.backoff(reason=exc.message)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.info("dataverse_retry", connector=self.name, attempt=state.attempt_number,
                 error=getattr(exc, "message", str(exc)),
                 retry_after=getattr(exc, "retry_after", None),
                 pause=round(self.throttle.paused_for, 2))

    # -- helpers ------------------------------------------------------------------------

    def get_json(self, url: str, *, entity: str | None = None,
                 params: Mapping[str, str] | None = None,
                 prefer: str | None = None) -> dict[str, Any]:
        """GET a JSON document.

        Raises:
            PermanentError: the answer is not a JSON object (or see :meth:`send`).
        """
        headers = {"If-None-Match": "null", **({"Prefer": prefer} if prefer else {})}
        response = self.send("GET", url, entity=entity, headers=headers, params=params)
        try:
            data = response.json()
        except ValueError as exc:
            raise PermanentError(f"{self.name}: {url} did not answer JSON", entity=entity) from exc
        if not isinstance(data, dict):
            raise PermanentError(f"{self.name}: {url} did not answer a JSON object", entity=entity)
        return data

    def batch(self, items: list[BatchItem], *, entity: str | None = None) -> list[OperationResult]:
        """Send a ``$batch`` (continue on error) and return one result per operation.

        Raises:
            TransientError: the whole batch was refused (429, 5xx) after the retries.
            PermanentError: the batch itself was malformed (400) or refused (401/403).
        """
        body, content_type = encode_requests(items)
        response = self.send("POST", "$batch", entity=entity, content=body, headers={
            "Content-Type": content_type, "Prefer": "odata.continue-on-error"})
        try:
            return decode_responses(response.content, response.headers.get("content-type", ""))
        except ValueError as exc:
            raise PermanentError(f"{self.name}: unreadable $batch answer: {exc}",
                                 entity=entity) from exc

    def relative(self, link: str) -> str:
        """A next/delta link made relative to the Web API root (cursors stay portable)."""
        return link[len(self.api_url):] if link.startswith(self.api_url) else link

"""Transport-neutral requests and responses of the emulated Web API.

The Starlette app and the ``$batch`` processor both turn what they receive into an
:class:`ApiRequest` and send back the :class:`ApiResponse` the service produced, so
an operation behaves the same alone or inside a batch.

Features
    * ``Prefer`` header parsing (quoted values with commas, several headers).
    * JSON responses with Dataverse's headers (``OData-Version``,
      ``Content-Type: application/json; odata.metadata=minimal``).

Configuration
    None.

Limits
    None.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.dataverse.emulator.errors import ODataError

__all__ = [
    "ApiRequest",
    "ApiResponse",
    "JSON_TYPE",
    "error_response",
    "json_response",
    "parse_prefer",
]

#: Content type of every JSON answer.
JSON_TYPE = "application/json; odata.metadata=minimal"

_PREFER = re.compile(r'\s*([\w.\-]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,;]*))?\s*(?:;[^,]*)?(?:,|$)')


def parse_prefer(values: str | None) -> dict[str, str]:
    """``Prefer`` preferences by name; flag preferences map to ``""``.

    Args:
        values: The header value(s), comma-separated.

    Returns:
        e.g. ``{"odata.maxpagesize": "100", "odata.track-changes": ""}``.
    """
    out: dict[str, str] = {}
    for match in _PREFER.finditer(values or ""):
        if match.group(1):
            out[match.group(1).lower()] = (match.group(2) or "").strip()
    return out


@dataclass(slots=True)
class ApiRequest:
    """One Web API operation.

    Args:
        method: HTTP method.
        path: The path after ``/api/data/v9.2/``, URL-decoded segments joined by ``/``.
        query: Query options, decoded (``$filter`` → text).
        headers: Lower-case header names.
        body: The raw body.
        base_url: Web API root with trailing slash, for links (``…/api/data/v9.2/``).
        caller: The caller's object id (from the token).
        content_ids: ``$n`` references of the enclosing change set.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    base_url: str
    caller: str = ""
    content_ids: dict[str, str] | None = None
    _prefer: dict[str, str] | None = field(default=None, repr=False)

    @classmethod
    def from_target(cls, method: str, target: str, headers: Mapping[str, str], body: bytes,
                    base_url: str, **extra: Any) -> ApiRequest:
        """Build from a request target relative to the Web API root (``accounts?$top=1``).

        Args:
            method: HTTP method.
            target: Path and query after the root (URL-encoded).
            headers: Headers (any case).
            body: Raw body.
            base_url: Web API root with trailing slash.
            **extra: ``caller``, ``content_ids``.

        Returns:
            The request.
        """
        path, _, query = target.partition("?")
        return cls(method.upper(), urllib.parse.unquote(path.strip("/")),
                   dict(urllib.parse.parse_qsl(query, keep_blank_values=True)),
                   {k.lower(): v for k, v in headers.items()}, body, base_url, **extra)

    @property
    def prefer(self) -> dict[str, str]:
        """The parsed ``Prefer`` header."""
        if self._prefer is None:
            self._prefer = parse_prefer(self.headers.get("prefer"))
        return self._prefer

    def json(self) -> Any:
        """The body as JSON.

        Raises:
            ODataError: 400 when it is not JSON.
        """
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            raise ODataError(400, "0x80048d19", "The request body is not valid JSON.") from None


@dataclass(slots=True)
class ApiResponse:
    """The answer to one operation."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> ApiResponse:
    """A JSON answer with the OData headers.

    Args:
        status: HTTP status.
        payload: JSON-serialisable body.
        headers: Extra headers.

    Returns:
        The response.
    """
    body = json.dumps(payload, separators=(",", ":")).encode()
    return ApiResponse(status, {"Content-Type": JSON_TYPE, "OData-Version": "4.0",
                                **(headers or {})}, body)


def error_response(exc: ODataError) -> ApiResponse:
    """The answer for an :class:`ODataError`."""
    return ApiResponse(exc.status, {"Content-Type": JSON_TYPE, "OData-Version": "4.0",
                                    **exc.headers}, exc.body())

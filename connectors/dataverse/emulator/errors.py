"""Dataverse-shaped errors of the emulator: ``{"error": {"code", "message"}}``.

Features
    * :class:`ODataError` carries the HTTP status, the hexadecimal error code and the
      message; handlers raise it and the app renders it (also inside ``$batch``).
    * Constructors for the errors Dataverse documents, with its codes and wording.

Configuration
    None.

Limits
    * Codes marked *unverified* in ``docs/dataverse.md`` (key syntax, unsupported
      query options, change tracking not enabled) are plausible, not confirmed.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "CODE_BAD_REQUEST",
    "CODE_CONCURRENCY",
    "CODE_CONCURRENT_REQUESTS",
    "CODE_DUPLICATE",
    "CODE_EXECUTION_TIME",
    "CODE_EXPIRED_VERSION",
    "CODE_NOT_FOUND",
    "CODE_PAYLOAD",
    "CODE_REQUEST_COUNT",
    "CODE_VALIDATION",
    "ODataError",
    "bad_query",
    "error_body",
    "not_found",
    "unknown_property",
]

#: Malformed query, unknown property or key, unsupported option.
CODE_BAD_REQUEST = "0x80060888"
#: The row does not exist.
CODE_NOT_FOUND = "0x80040217"
#: ``If-Match`` with a stale ETag (ConcurrencyVersionMismatch).
CODE_CONCURRENCY = "0x80060882"
#: ``If-None-Match: *`` on an existing row, or a duplicate alternate key (DuplicateRecord).
CODE_DUPLICATE = "0x80040237"
#: A value breaks a column rule (length, range, option).
CODE_VALIDATION = "0x80044331"
#: The body cannot be read (a value of the wrong type, an undeclared property).
CODE_PAYLOAD = "0x80048d19"
#: The delta token is expired or unknown (ExpiredVersionStamp).
CODE_EXPIRED_VERSION = "0x80044352"
#: Service protection: number of requests.
CODE_REQUEST_COUNT = "0x80072322"
#: Service protection: combined execution time.
CODE_EXECUTION_TIME = "0x80072321"
#: Service protection: concurrent requests.
CODE_CONCURRENT_REQUESTS = "0x80072326"


class ODataError(Exception):
    """An error response of the emulated Web API.

    Args:
        status: HTTP status.
        code: Dataverse error code (``0x8004…``), possibly empty.
        message: The text Dataverse would send.
        headers: Extra response headers (``Retry-After``).
    """

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The JSON body."""
        return error_body(self.code, self.message)


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """``{"error": {"code": …, "message": …}}`` as bytes.

    Args:
        code: Dataverse error code.
        message: The message.
        **extra: More members of ``error`` (annotations).

    Returns:
        UTF-8 JSON.
    """
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()


def bad_query(message: str) -> ODataError:
    """A 400 for a malformed or unsupported query."""
    return ODataError(400, CODE_BAD_REQUEST, message)


def unknown_property(name: str, type_name: str) -> ODataError:
    """A 400 for a property the table does not have."""
    return bad_query(f"Could not find a property named '{name}' on type '{type_name}'.")


def not_found(logical_name: str, key: str) -> ODataError:
    """A 404 for a missing row, in Dataverse's words."""
    return ODataError(404, CODE_NOT_FOUND, f"{logical_name} With Id = {key} Does Not Exist")

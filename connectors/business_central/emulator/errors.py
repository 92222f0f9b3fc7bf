"""Business Central-shaped errors of the emulator.

Features
    * :class:`BCError` carries the HTTP status, the error code (``BadRequest_*``,
      ``Authentication_*``, ``Internal_*``, ``Application_*``, ``Request_*``) and the
      message; handlers raise it and the app renders it, also inside ``$batch``.
    * Every message ends with ``  CorrelationId: <guid>.`` as Business Central's do.
    * Constructors for the errors the reference documents, with their codes and wording.

Configuration
    None; the status of a stale ETag (409 or 412) is chosen by the caller.

Limits
    * Codes and texts come from public documentation and client code, not from a live
      service; ``delta_not_supported`` and ``read_only`` are plausible, not confirmed.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = [
    "BCError",
    "bad_request",
    "delta_not_supported",
    "duplicate_key",
    "entity_changed",
    "error_body",
    "missing_etag",
    "not_found",
    "read_only",
    "record_missing",
    "string_too_long",
    "too_many_requests",
    "unauthorized",
    "unknown_property",
]


class BCError(Exception):
    """An error answer of the emulated Business Central.

    Args:
        status: HTTP status code.
        code: Business Central error code, e.g. ``Request_EntityChanged``.
        message: The text, without the correlation id (it is added when rendered).
        headers: Extra response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(self, status: int, code: str, message: str, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"code", "message"}}`` with a fresh correlation id."""
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    """A Business Central error body.

    Args:
        code: The error code.
        message: The text; ``  CorrelationId: <guid>.`` is appended.

    Returns:
        ``{"error": {"code": code, "message": "…  CorrelationId: …."}}``.
    """
    return {"error": {"code": code, "message": f"{message}  CorrelationId:  {uuid.uuid4()}."}}


def bad_request(message: str, code: str = "BadRequest") -> BCError:
    """400 with ``code`` (default ``BadRequest``)."""
    return BCError(400, code, message)


def not_found(what: str) -> BCError:
    """404 ``BadRequest_NotFound``: the resource or record does not exist."""
    return BCError(404, "BadRequest_NotFound", f"The {what} does not exist. "
                   "Identification fields and values: ")


def record_missing(table: str, key: str) -> BCError:
    """404 ``Internal_RecordNotFound`` for a record addressed by its key."""
    return BCError(404, "Internal_RecordNotFound",
                   f"The {table} does not exist. Identification fields and values: {key}")


def missing_etag() -> BCError:
    """400 ``BadRequest_InvalidToken``: PATCH or DELETE without ``If-Match``."""
    return BCError(400, "BadRequest_InvalidToken",
                   "Could not validate the client concurrency token required by the service. "
                   "Please provide a valid token in the client request.")


def entity_changed(status: int = 409) -> BCError:
    """``Request_EntityChanged``: the ``If-Match`` ETag is stale (409, or 412 if chosen)."""
    return BCError(status, "Request_EntityChanged", "Another user has already changed the "
                   "record.")


def duplicate_key(table: str, fields: str) -> BCError:
    """400 ``Internal_EntityWithSameKeyExists``."""
    return BCError(400, "Internal_EntityWithSameKeyExists",
                   f"The record in table {table} already exists. Identification fields and "
                   f"values: {fields}")


def string_too_long(value: str, limit: int) -> BCError:
    """400 ``Application_StringExceededLength``."""
    return BCError(400, "Application_StringExceededLength",
                   f"The length of the string is {len(value)}, but it must be less than or "
                   f"equal to {limit} characters. Value: {value}")


def unknown_property(name: str, entity_type: str) -> BCError:
    """400 ``BadRequest_PropertyNotFound``: a body, ``$select`` or ``$filter`` names no property."""
    return BCError(400, "BadRequest_PropertyNotFound",
                   f"Could not find a property named '{name}' on type "
                   f"'Microsoft.NAV.{entity_type}'.")


def read_only(name: str) -> BCError:
    """400 ``BadRequest_ReadOnlyProperty``: a write sets a read-only property."""
    return BCError(400, "BadRequest_ReadOnlyProperty", f"The property '{name}' is read-only.")


def too_many_requests(limit: int) -> BCError:
    """429 ``Application_TooManyRequests`` (Business Central sends no ``Retry-After``)."""
    return BCError(429, "Application_TooManyRequests",
                   f"Too many requests reached.  Actual ({limit + 1}). Maximum ({limit}).")


def delta_not_supported() -> BCError:
    """500 for ``Prefer: odata.track-changes``: delta links are gone from current versions."""
    return BCError(500, "Internal_ServerError", "Entity does not support delta requests.")


def unauthorized(reason: str, challenge: str) -> BCError:
    """401 ``Authentication_InvalidCredentials`` with a ``WWW-Authenticate`` challenge."""
    return BCError(401, "Authentication_InvalidCredentials",
                   f"The server has rejected the client credentials. ({reason})",
                   headers={"WWW-Authenticate": challenge})

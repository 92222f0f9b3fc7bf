"""The ``$batch`` wire format (``multipart/mixed`` of ``application/http`` parts).

Used on both sides: the connector encodes requests and decodes responses, the
emulator decodes requests and encodes responses.

Features
    * Parts and change sets (a nested ``multipart/mixed`` with ``Content-ID`` per
      operation); CRLF on output, CRLF or LF accepted on input.
    * Response boundaries ``batchresponse_<guid>`` / ``changesetresponse_<guid>``.

Configuration
    None.

Limits
    * Bodies are treated as bytes between the blank line and the next boundary; a
      body containing a boundary line would be cut (boundaries are random GUIDs).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = [
    "BatchItem",
    "Operation",
    "OperationResult",
    "boundary_of",
    "decode_requests",
    "decode_responses",
    "encode_requests",
    "encode_responses",
]

_CRLF = b"\r\n"


@dataclass(slots=True)
class Operation:
    """One request inside a batch.

    Args:
        method: HTTP method.
        url: Absolute URL, a path from the host, or ``$n``.
        headers: Request headers.
        body: Raw body (JSON for writes).
        content_id: ``Content-ID`` inside a change set.
    """

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_id: str | None = None


@dataclass(slots=True)
class OperationResult:
    """One response inside a batch response."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_id: str | None = None


#: A top-level batch item: one operation, or a change set (a list of operations).
BatchItem = Operation | list[Operation]


def boundary_of(content_type: str | None) -> str | None:
    """The ``boundary`` parameter of a ``multipart/mixed`` content type, or None."""
    if not content_type or not content_type.lower().startswith("multipart/mixed"):
        return None
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    return match.group(1) if match else None


def encode_requests(items: Sequence[BatchItem], boundary: str | None = None) -> tuple[bytes, str]:
    """A batch request body.

    Args:
        items: Operations and change sets, in execution order.
        boundary: The batch boundary (default ``batch_<guid>``).

    Returns:
        ``(body, content_type)``.
    """
    boundary = boundary or f"batch_{uuid.uuid4()}"
    out: list[bytes] = []
    for item in items:
        out.append(f"--{boundary}".encode())
        if isinstance(item, list):
            inner = f"changeset_{uuid.uuid4()}"
            out.append(f"Content-Type: multipart/mixed; boundary={inner}".encode())
            out.append(b"")
            for op in item:
                out.append(f"--{inner}".encode())
                out.append(_request_part(op))
            out.append(f"--{inner}--".encode())
        else:
            out.append(_request_part(item))
    out.append(f"--{boundary}--".encode())
    out.append(b"")
    return _CRLF.join(out), f"multipart/mixed; boundary={boundary}"


def _request_part(op: Operation) -> bytes:
    head = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if op.content_id is not None:
        head.append(f"Content-ID: {op.content_id}")
    lines = [*head, "", f"{op.method} {op.url} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in op.headers.items()]
    return _CRLF.join(line.encode() for line in lines) + _CRLF + _CRLF + op.body


def encode_responses(items: Sequence[OperationResult | list[OperationResult]]) -> tuple[bytes, str]:
    """A batch response body (``batchresponse_`` / ``changesetresponse_`` boundaries).

    Returns:
        ``(body, content_type)``.
    """
    boundary = f"batchresponse_{uuid.uuid4()}"
    out: list[bytes] = []
    for item in items:
        out.append(f"--{boundary}".encode())
        if isinstance(item, list):
            inner = f"changesetresponse_{uuid.uuid4()}"
            out.append(f"Content-Type: multipart/mixed; boundary={inner}".encode())
            out.append(b"")
            for result in item:
                out.append(f"--{inner}".encode())
                out.append(_response_part(result))
            out.append(f"--{inner}--".encode())
        else:
            out.append(_response_part(item))
    out.append(f"--{boundary}--".encode())
    out.append(b"")
    return _CRLF.join(out), f"multipart/mixed; boundary={boundary}"


def _response_part(result: OperationResult) -> bytes:
    head = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if result.content_id is not None:
        head.append(f"Content-ID: {result.content_id}")
    try:
        phrase = HTTPStatus(result.status).phrase
    except ValueError:
        phrase = ""
    lines = [*head, "", f"HTTP/1.1 {result.status} {phrase}"]
    lines += [f"{k}: {v}" for k, v in result.headers.items()]
    return _CRLF.join(line.encode() for line in lines) + _CRLF + _CRLF + result.body


def _split(body: bytes, boundary: str) -> list[bytes]:
    """The parts between ``--boundary`` lines (the closing ``--boundary--`` ends it)."""
    delimiter, closing = f"--{boundary}".encode(), f"--{boundary}--".encode()
    parts: list[bytes] = []
    current: list[bytes] | None = None
    for line in body.splitlines(keepends=True):
        bare = line.rstrip(b"\r\n").rstrip()
        if bare in (delimiter, closing):
            if current is not None:
                parts.append(_drop_final_newline(b"".join(current)))
            current = None if bare == closing else []
            if bare == closing:
                break
            continue
        if current is not None:
            current.append(line)
    return parts


def _drop_final_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data


def _head_and_body(data: bytes) -> tuple[list[str], bytes]:
    match = re.search(rb"\r?\n\r?\n", data)
    if match is None:
        return data.decode("utf-8", "replace").splitlines(), b""
    return data[:match.start()].decode("utf-8", "replace").splitlines(), data[match.end():]


def _headers(lines: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def decode_requests(body: bytes, boundary: str) -> list[BatchItem]:
    """Parse a batch request body.

    Args:
        body: The request body.
        boundary: The batch boundary from the ``Content-Type``.

    Returns:
        Operations and change sets, in order.

    Raises:
        ValueError: a part is not an HTTP request or a change set.
    """
    items: list[BatchItem] = []
    for part in _split(body, boundary):
        head_lines, content = _head_and_body(part)
        head = _headers(head_lines)
        inner = boundary_of(head.get("content-type"))
        if inner is not None:
            items.append([_operation(p) for p in _split(content, inner)])
        else:
            items.append(_operation(part))
    return items


def _operation(part: bytes) -> Operation:
    head_lines, message = _head_and_body(part)
    head = _headers(head_lines)
    if "application/http" not in head.get("content-type", "application/http"):
        raise ValueError("a batch part must have Content-Type: application/http")
    request_lines, body = _head_and_body(message)
    if not request_lines:
        raise ValueError("a batch part holds no request line")
    line = request_lines[0].strip()
    method, _, rest = line.partition(" ")
    url, _, version = rest.rpartition(" ")
    if not version.upper().startswith("HTTP/"):
        url = rest  # no HTTP version: the rest of the line is the URL
    url = url.strip()
    if not method or not url:
        raise ValueError(f"malformed request line {request_lines[0]!r}")
    headers = {k: v for k, v in _headers(request_lines[1:]).items()}
    # The URL is everything between the first and the last space, so a URL with
    # unencoded spaces (``$filter=name eq 'x'``) is taken whole, as Dataverse does.
    return Operation(method.upper(), url, headers, body.rstrip(b"\r\n"),
                     head.get("content-id"))


def decode_responses(body: bytes, content_type: str) -> list[OperationResult]:
    """Parse a batch response; change-set responses are flattened in order.

    Args:
        body: The response body.
        content_type: Its ``Content-Type`` (carries the boundary).

    Returns:
        One result per operation answered, in order.

    Raises:
        ValueError: not a multipart batch response.
    """
    boundary = boundary_of(content_type)
    if boundary is None:
        raise ValueError(f"not a multipart batch response ({content_type})")
    results: list[OperationResult] = []
    for part in _split(body, boundary):
        head_lines, content = _head_and_body(part)
        inner = boundary_of(_headers(head_lines).get("content-type"))
        for piece in _split(content, inner) if inner else [part]:
            results.append(_result(piece))
    return results


def _result(part: bytes) -> OperationResult:
    head_lines, message = _head_and_body(part)
    head = _headers(head_lines)
    status_lines, body = _head_and_body(message)
    words = status_lines[0].split() if status_lines else []
    if len(words) < 2 or not words[1].isdigit():
        raise ValueError("a batch response part holds no status line")
    return OperationResult(int(words[1]), _headers(status_lines[1:]), body.rstrip(b"\r\n"),
                           head.get("content-id"))


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup."""
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)

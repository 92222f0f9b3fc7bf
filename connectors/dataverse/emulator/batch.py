"""``POST $batch`` in the emulator: operations, atomic change sets, Content-ID references.

Features
    * Operations run in order through :meth:`Service.handle`-equivalent dispatch, so
      each behaves exactly as when sent alone (same validation, same errors).
    * Change sets are atomic: one failure rolls the whole set back (a store savepoint)
      and answers with that failure; ``GET`` inside a change set is refused.
    * ``$n`` references to a record created earlier in the change set, in the URL or
      in ``@odata.bind`` values; an undeclared one is the documented 400.
    * Without ``Prefer: odata.continue-on-error`` processing stops at the first
      failure: the outer status is 400 and only the failing part is returned. With
      it, the outer status is 200 and every part carries its own status.
    * At most ``Settings.max_batch`` (1,000) operations; batches cannot nest.

Configuration
    ``Settings.max_batch``.

Limits
    * Only ``multipart/mixed`` batches (not the JSON batch format of OData 4.01).
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

from connectors.dataverse.emulator.errors import ODataError, bad_query
from connectors.dataverse.emulator.http import ApiRequest, ApiResponse, error_response
from connectors.dataverse.multipart import (
    Operation,
    OperationResult,
    boundary_of,
    decode_requests,
    encode_responses,
)

if TYPE_CHECKING:
    from connectors.dataverse.emulator.service import Service

__all__ = ["handle_batch"]


class _ChangeSetFailed(Exception):
    def __init__(self, result: OperationResult) -> None:
        super().__init__("change set failed")
        self.result = result


def handle_batch(service: Service, req: ApiRequest) -> ApiResponse:
    """Run a ``$batch`` request.

    Args:
        service: The service executing each operation.
        req: The batch request.

    Returns:
        The multipart response.

    Raises:
        ODataError: not a POST, no multipart body, too many operations.
    """
    if req.method != "POST":
        raise ODataError(405, "0x80060888", f"The requested resource does not support http "
                         f"method '{req.method}'.")
    boundary = boundary_of(req.headers.get("content-type"))
    if boundary is None:
        raise bad_query("The batch request must have a Content-Type of multipart/mixed with a "
                        "boundary.")
    try:
        items = decode_requests(req.body, boundary)
    except ValueError as exc:
        raise bad_query(f"The batch request body is malformed: {exc}") from None
    total = sum(len(i) if isinstance(i, list) else 1 for i in items)
    if total > service.settings.max_batch:
        raise bad_query(f"The number of requests in the batch ({total}) exceeds the maximum of "
                        f"{service.settings.max_batch}.")
    keep_going = "odata.continue-on-error" in req.prefer
    out: list[OperationResult | list[OperationResult]] = []
    for item in items:
        if isinstance(item, list):
            try:
                results: OperationResult | list[OperationResult] = _change_set(service, req, item)
            except _ChangeSetFailed as failed:
                results = failed.result
        else:
            results = _run(service, req, item, None)
        failure = results if isinstance(results, OperationResult) and results.status >= 400 else None
        if failure is not None and not keep_going:
            body, content_type = encode_responses([failure])
            return ApiResponse(400, {"Content-Type": content_type, "OData-Version": "4.0"}, body)
        out.append(results)
    body, content_type = encode_responses(out)
    headers = {"Content-Type": content_type, "OData-Version": "4.0"}
    if keep_going:
        headers["Preference-Applied"] = "odata.continue-on-error"
    return ApiResponse(200, headers, body)


def _change_set(service: Service, req: ApiRequest, ops: list[Operation]) -> list[OperationResult]:
    """Run a change set atomically; raise ``_ChangeSetFailed`` (rolled back) on a failure."""
    content_ids: dict[str, str] = {}
    results: list[OperationResult] = []
    with service.store.atomic():
        for op in ops:
            if op.method == "GET":
                raise _ChangeSetFailed(_error(bad_query(
                    "GET operations are not allowed in a change set."), op.content_id))
            result = _run(service, req, op, content_ids)
            if result.status >= 400:
                raise _ChangeSetFailed(result)
            entity_id = result.headers.get("OData-EntityId")
            if op.content_id is not None and entity_id:
                content_ids[f"${op.content_id}"] = entity_id
            results.append(result)
    return results


def _run(service: Service, req: ApiRequest, op: Operation,
         content_ids: dict[str, str] | None) -> OperationResult:
    try:
        target = _target(req.base_url, op.url, content_ids)
    except ODataError as exc:
        return _error(exc, op.content_id)
    if target == "$batch" or target.startswith("$batch?"):
        return _error(bad_query("Batches cannot be nested."), op.content_id)
    sub = ApiRequest.from_target(op.method, target, op.headers, op.body, req.base_url,
                                 caller=req.caller, content_ids=content_ids)
    try:
        response = service.route_nested(sub)
    except ODataError as exc:
        response = error_response(exc)
    headers = dict(response.headers)
    if "OData-EntityId" in headers and response.status in (201, 204):
        headers.setdefault("Location", headers["OData-EntityId"])
    return OperationResult(response.status, headers, response.body, op.content_id)


def _target(base_url: str, url: str, content_ids: dict[str, str] | None) -> str:
    """The operation's URL relative to the Web API root (``$n`` resolved)."""
    if url.startswith("$"):
        ref, _, rest = url.partition("/")
        ref_name = ref.split("?")[0]
        if content_ids is None or ref_name not in content_ids:
            raise bad_query(f"Content-ID Reference: '{ref_name}' does not exist in the batch "
                            "context.")
        url = content_ids[ref_name] + ref[len(ref_name):] + (f"/{rest}" if rest else "")
    base_path = urllib.parse.urlsplit(base_url).path
    if url.startswith(base_url):
        return url[len(base_url):]
    if url.startswith("http://") or url.startswith("https://"):
        parts = urllib.parse.urlsplit(url)
        url = parts.path + (f"?{parts.query}" if parts.query else "")
    if url.startswith(base_path):
        return url[len(base_path):]
    return url.lstrip("/")


def _error(exc: ODataError, content_id: str | None) -> OperationResult:
    response = error_response(exc)
    return OperationResult(response.status, response.headers, response.body, content_id)

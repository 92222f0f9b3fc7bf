"""JSON ``$batch`` (OData 4.01) of the emulated Business Central.

Features
    * ``POST …/api/v2.0/$batch`` with ``{"requests": [{"id", "method", "url",
      "headers", "body"}]}`` ⇒ 200 ``{"responses": [{"id", "status", "headers",
      "body"}]}``; ``url`` is relative to the API route (``companies(…)/items(…)``) or
      absolute. At most ``max_batch`` (100) operations, else 400.
    * Without isolation every operation stands alone: one failing does not undo the
      others. With ``Isolation: snapshot`` the batch is one transaction: the first
      failure undoes everything before it, later operations are not run, and every
      operation but the failing one answers ``424 Failed Dependency``.

Configuration
    None (the limit is the service's ``max_batch``).

Limits
    * No multipart batches, no ``dependsOn``/``atomicityGroup``, no ``$<id>`` references.
    * The 424 answers of a rolled-back batch are this emulator's choice: the
      reference does not show what Business Central reports for them (unverified).
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from connectors.business_central.emulator import errors
from connectors.business_central.emulator.service import ApiReply, ApiRequest, split_api

if TYPE_CHECKING:
    from connectors.business_central.emulator.service import Service

__all__ = ["run_batch"]

_JSON = {"content-type": "application/json; odata.metadata=minimal; odata.streaming=true",
         "odata-version": "4.0"}


class _RolledBack(Exception):
    def __init__(self, index: int, reply: ApiReply) -> None:
        super().__init__("rolled back")
        self.index, self.reply = index, reply


def run_batch(service: Service, req: ApiRequest) -> ApiReply:
    """Run a JSON batch.

    Args:
        service: The dispatcher each operation goes through.
        req: The ``$batch`` call.

    Returns:
        200 with one response per operation, in order.

    Raises:
        BCError: 400 for a malformed batch or more than ``max_batch`` operations.
    """
    if req.method != "POST":
        raise errors.BCError(405, "BadRequest_MethodNotAllowed", "Method not allowed.")
    ops = req.body.get("requests") if isinstance(req.body, dict) else None
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise errors.bad_request("The batch request body must be {\"requests\": [...]}.")
    if len(ops) > service.max_batch:
        raise errors.bad_request(f"The batch contains {len(ops)} operations; the maximum "
                                 f"is {service.max_batch}.", "BadRequest_BatchTooLarge")
    calls = [_call(req, op) for op in ops]
    ids = [str(op.get("id", i + 1)) for i, op in enumerate(ops)]
    if (req.header("isolation") or "").lower() != "snapshot":
        replies = [_run(service, call) for call in calls]
        return ApiReply(200, {"responses": [_shape(i, r) for i, r in zip(ids, replies, strict=True)]})
    replies = []
    try:
        with service.store.transaction():
            for index, call in enumerate(calls):
                reply = _run(service, call)
                if reply.status >= 400:
                    raise _RolledBack(index, reply)
                replies.append(reply)
    except _RolledBack as failed:
        dependency = errors.BCError(424, "BadRequest_BatchRolledBack",
                                    f"The batch was rolled back because request "
                                    f"'{ids[failed.index]}' failed.")
        rolled = ApiReply(424, dependency.body(), {})
        replies = [failed.reply if i == failed.index else rolled for i in range(len(calls))]
    return ApiReply(200, {"responses": [_shape(i, r) for i, r in zip(ids, replies, strict=True)]})


def _call(req: ApiRequest, op: dict[str, Any]) -> ApiRequest:
    url = str(op.get("url", ""))
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path)
    api, rest = req.api, path.lstrip("/")
    if "/api/" in path:
        api, rest = split_api(path.split("/api/", 1)[1])
    headers = {str(k).lower(): str(v) for k, v in (op.get("headers") or {}).items()}
    params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return ApiRequest(str(op.get("method", "GET")).upper(), api, rest, params, headers,
                      op.get("body"), req.root)


def _run(service: Service, call: ApiRequest) -> ApiReply:
    if call.path == "$batch":
        return _error(errors.bad_request("A batch cannot contain another batch."))
    try:
        return service.handle(call)
    except errors.BCError as exc:
        return _error(exc)


def _error(exc: errors.BCError) -> ApiReply:
    return ApiReply(exc.status, exc.body(), dict(exc.headers))


def _shape(op_id: str, reply: ApiReply) -> dict[str, Any]:
    out: dict[str, Any] = {"id": op_id, "status": reply.status,
                           "headers": {**(_JSON if reply.body is not None else {}),
                                       **reply.headers}}
    if reply.body is not None:
        out["body"] = reply.body
    return out

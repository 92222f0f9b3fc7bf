"""The bulk operation messages: ``CreateMultiple``, ``UpdateMultiple``, ``UpsertMultiple``.

Each is a bound action on an entity set, ``POST accounts/Microsoft.Dynamics.CRM.UpsertMultiple``
with ``{"Targets": [...]}``; every target carries ``@odata.type`` and names its row
by the primary id in the body or by ``@odata.id`` (``accounts(accountnumber='A-1')``).
Answers, as Microsoft documents them (Web API reference pages ``CreateMultiple``,
``UpdateMultiple``, ``UpsertMultiple``; "Use bulk operation messages"):

* ``CreateMultiple``: 200 with ``{"@odata.context": …CreateMultipleResponse, "Ids": [...]}``.
* ``UpdateMultiple`` and ``UpsertMultiple``: 204 No Content.
* On a standard table the message is all-or-nothing: one failing record rolls every
  record back, and the answer is that record's error (status, code, message as when
  it is written alone).

Features
    * Plug-in hooks run per record (``Create`` / ``Update``), as Dataverse merges the
      single-record pipelines into the bulk ones.
    * ``DeleteMultiple`` (documented for elastic tables only) answers 400 on the
      emulator's standard tables.

Configuration
    ``Settings.max_bulk``: most records per request (default 1,000; Microsoft documents
    no fixed number, so this is a knob). ``EntityDef.bulk_messages``: False makes a
    table answer the bulk actions like one that does not support them.

Limits
    * Unconfirmed details (marked in ``docs/dataverse.md``): the status and text of
      the answer for a table without the messages (404 "Resource not found for the
      segment"), for a missing ``@odata.type``, for too many records, and whether a
      real error names the failing record's position (the emulator's does not).
"""

from __future__ import annotations

import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

from connectors.dataverse.emulator.errors import CODE_BAD_REQUEST, CODE_PAYLOAD, ODataError
from connectors.dataverse.emulator.http import ApiRequest, ApiResponse, json_response
from connectors.dataverse.emulator.keys import parse_key_segment
from connectors.dataverse.emulator.model import NAMESPACE
from connectors.dataverse.emulator.store import Table
from connectors.dataverse.emulator.writes import create_row, upsert_row

if TYPE_CHECKING:
    from connectors.dataverse.emulator.service import Service

__all__ = ["ACTIONS", "handle", "unsupported"]

#: The bulk actions, by their unqualified names.
ACTIONS = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple", "DeleteMultiple")


def unsupported(segment: str) -> ODataError:
    """The answer for a bound action a table does not have (unconfirmed: 404, as Web API
    answers a segment it does not know)."""
    return ODataError(404, CODE_BAD_REQUEST, f"Resource not found for the segment '{segment}'.")


def handle(service: Service, table: Table, segment: str, req: ApiRequest) -> ApiResponse:
    """``POST <set>/Microsoft.Dynamics.CRM.<action>``.

    Args:
        service: The Web API.
        table: The table of the entity set the action is bound to.
        segment: The qualified action name.
        req: The request.

    Returns:
        200 with ``Ids`` (create), 204 (update, upsert).

    Raises:
        ODataError: 404 for an unknown or unavailable action, 405 for a method other
            than POST, 400 for a malformed body, or the first failing record's error
            (nothing is written then).
    """
    action = segment[len(NAMESPACE) + 1:]
    if action not in ACTIONS or not table.entity.bulk_messages:
        raise unsupported(segment)
    if req.method != "POST":
        raise ODataError(405, CODE_BAD_REQUEST, f"The requested resource does not support "
                         f"http method '{req.method}'.")
    entity = table.entity
    if action == "DeleteMultiple":
        raise ODataError(400, CODE_BAD_REQUEST, f"DeleteMultiple is available for elastic "
                         f"tables only; '{entity.logical_name}' is a standard table.")
    body = req.json()
    targets = body.get("Targets") if isinstance(body, dict) else None
    if not isinstance(targets, list) or not targets:
        raise ODataError(400, CODE_PAYLOAD, f"{action} needs a 'Targets' parameter: a "
                         "non-empty array of records.")
    if len(targets) > service.settings.max_bulk:
        raise ODataError(400, CODE_BAD_REQUEST, f"The number of records in Targets "
                         f"({len(targets)}) exceeds the maximum of "
                         f"{service.settings.max_bulk}.")
    ids: list[str] = []
    with service.store.atomic():
        for target in targets:
            record = _record(entity.type_name, target)
            key = _key(service, table, record, required=action != "CreateMultiple")
            if action == "CreateMultiple":
                ids.append(create_row(service, table, record)[entity.primary_id])
            else:
                assert key is not None
                upsert_row(service, table, key, record,
                           if_match="*" if action == "UpdateMultiple" else None)
    if action == "CreateMultiple":
        return json_response(200, {
            "@odata.context": f"{service.base_url}$metadata#{NAMESPACE}.CreateMultipleResponse",
            "Ids": ids})
    return ApiResponse(204, {"OData-Version": "4.0"})


def _record(type_name: str, target: Any) -> dict[str, Any]:
    """One target, its ``@odata.type`` checked."""
    if not isinstance(target, dict):
        raise ODataError(400, CODE_PAYLOAD, "Every item of Targets must be a JSON object.")
    declared = str(target.get("@odata.type") or "").lstrip("#")
    if not declared:
        raise ODataError(400, CODE_PAYLOAD, "Every item of Targets needs an '@odata.type' "
                         f"annotation ('{type_name}').")
    if declared != type_name:
        raise ODataError(400, CODE_PAYLOAD, f"The @odata.type '{declared}' of an item of "
                         f"Targets does not match the entity set's type '{type_name}'.")
    return target


def _key(service: Service, table: Table, record: dict[str, Any], *,
         required: bool) -> str | dict[str, Any] | None:
    """The key naming the record's row: ``@odata.id``, else the primary id in the body."""
    entity = table.entity
    ref = record.get("@odata.id")
    if ref:
        url = str(ref)
        if url.startswith(service.base_url):
            url = url[len(service.base_url):]
        elif url.startswith(("http://", "https://")):
            url = urllib.parse.urlsplit(url).path
        url = url.lstrip("/")
        prefix = urllib.parse.urlsplit(service.base_url).path.lstrip("/")
        if prefix and url.startswith(prefix):
            url = url[len(prefix):]
        name, key = parse_key_segment(urllib.parse.unquote(url))
        if name != entity.entity_set or key is None:
            raise ODataError(400, CODE_PAYLOAD, f"The @odata.id '{ref}' does not name a "
                             f"record of '{entity.entity_set}'.")
        return key
    value = record.get(entity.primary_id)
    if value is None:
        if required:
            raise ODataError(400, CODE_PAYLOAD, f"Every item of Targets needs its primary "
                             f"key '{entity.primary_id}' or an '@odata.id'.")
        return None
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ODataError(400, CODE_PAYLOAD, f"Cannot convert the literal '{value}' to the "
                         "expected type 'Edm.Guid'.") from None

"""Writes of the emulated Web API: create, update/upsert and delete.

Features
    * Create: 204 + ``OData-EntityId``, or 201 with ``Prefer: return=representation``.
    * Update / upsert by id or alternate key (``accounts(accountnumber='A-1')``):
      ``If-Match: *`` (update only, 404 when missing), ``If-None-Match: *`` (create
      only, 412 when present), ``If-Match: W/"n"`` (412 ``0x80060882`` when stale); key
      columns in the body are ignored on update and fill in on create; 204 with
      ``OData-EntityId``, or 201 (created) / 200 (updated) with a representation.
    * Delete: 204, 404 when missing, 412 for a stale ``If-Match``.
    * Plug-in hooks run inside the operation's savepoint.

Configuration
    ``Service.plugins``.

Limits
    * No deep insert, no ``PUT`` of single columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connectors.dataverse.emulator.errors import (
    CODE_CONCURRENCY,
    CODE_DUPLICATE,
    ODataError,
    not_found,
)
from connectors.dataverse.emulator.http import ApiRequest, ApiResponse, json_response
from connectors.dataverse.emulator.keys import new_guid
from connectors.dataverse.emulator.store import Table
from connectors.dataverse.emulator.values import (
    annotation_filter,
    etag,
    find_row,
    key_columns,
    read_body,
    render,
)

if TYPE_CHECKING:
    from connectors.dataverse.emulator.service import Service

__all__ = ["create", "create_row", "delete", "upsert", "upsert_row"]


def create(service: Service, table: Table, req: ApiRequest) -> ApiResponse:
    """``POST <set>``: 204 + ``OData-EntityId``, or 201 with ``return=representation``.

    Raises:
        ODataError: an invalid body, a taken id or key, a plug-in's refusal.
    """
    row = create_row(service, table, req.json(), req.content_ids)
    return _written(service, table, row, req, created=True, entity_id_header=True)


def create_row(service: Service, table: Table, body: Any,
               content_ids: dict[str, str] | None = None) -> dict[str, Any]:
    """Create one row from a JSON body (``POST`` and ``CreateMultiple``).

    Raises:
        ODataError: an invalid body, a taken id or key, a plug-in's refusal.
    """
    entity = table.entity
    values = read_body(service.store, entity, body, creating=True,
                       base_url=service.base_url, content_ids=content_ids)
    row_id = values.pop(entity.primary_id, None) or new_guid()
    if row_id in table.rows:
        raise ODataError(412, CODE_DUPLICATE, "A record with matching key values already exists.")
    with service.store.atomic():
        service.run_plugins("Create", entity, values, None)
        return service.store.insert(table, row_id, values)


def upsert(service: Service, table: Table, key: str | dict[str, Any], req: ApiRequest) -> ApiResponse:
    """``PATCH <set>(key)``: update, or create when missing (unless ``If-Match``).

    Raises:
        ODataError: 404/412 by the conditional headers, an invalid body, a plug-in's refusal.
    """
    row, created = upsert_row(service, table, key, req.json(), if_match=req.headers.get("if-match"),
                              if_none_match=req.headers.get("if-none-match"),
                              content_ids=req.content_ids)
    return _written(service, table, row, req, created=created)


def upsert_row(service: Service, table: Table, key: str | dict[str, Any], body: Any, *,
               if_match: str | None = None, if_none_match: str | None = None,
               content_ids: dict[str, str] | None = None) -> tuple[dict[str, Any], bool]:
    """Update the row ``key`` names, or create it (``PATCH`` and the bulk messages).

    Returns:
        (the row written, whether it was created).

    Raises:
        ODataError: 404/412 by the conditions, an invalid body, a plug-in's refusal.
    """
    entity = table.entity
    row_id = find_row(table, key)
    if if_match is not None and row_id is None:
        raise not_found(entity.logical_name, _shown(key))
    if (if_match is not None and if_match != "*" and row_id is not None
            and if_match != etag(table.rows[row_id])):
        raise ODataError(412, CODE_CONCURRENCY, "The version of the existing record "
                         "doesn't match the RowVersion property provided.")
    if if_none_match == "*" and row_id is not None:
        raise ODataError(412, CODE_DUPLICATE, "A record with matching key values already exists.")
    with service.store.atomic():
        if row_id is not None:
            values = read_body(service.store, entity, body, creating=False,
                               base_url=service.base_url, content_ids=content_ids)
            for column in key_columns(table, key):
                values.pop(column, None)  # the key that found the row cannot change
            service.run_plugins("Update", entity, values, table.rows[row_id])
            return service.store.update(table, row_id, values), False
        values = {**key_columns(table, key), **read_body(
            service.store, entity, body, creating=True, base_url=service.base_url,
            content_ids=content_ids)}
        new_id = values.pop(entity.primary_id, None) or new_guid()
        service.run_plugins("Create", entity, values, None)
        return service.store.insert(table, new_id, values), True


def delete(service: Service, table: Table, key: str | dict[str, Any], req: ApiRequest) -> ApiResponse:
    """``DELETE <set>(key)``.

    Raises:
        ODataError: 404 when missing, 412 for a stale ``If-Match``, a plug-in's refusal.
    """
    entity = table.entity
    row_id = find_row(table, key)
    if row_id is None:
        raise not_found(entity.logical_name, _shown(key))
    if_match = req.headers.get("if-match")
    if if_match not in (None, "*") and if_match != etag(table.rows[row_id]):
        raise ODataError(412, CODE_CONCURRENCY, "The version of the existing record "
                         "doesn't match the RowVersion property provided.")
    with service.store.atomic():
        service.run_plugins("Delete", entity, {}, table.rows[row_id])
        service.store.delete(table, row_id)
    return ApiResponse(204, {"OData-Version": "4.0"})


def _written(service: Service, table: Table, row: dict[str, Any], req: ApiRequest, *, created: bool,
             entity_id_header: bool = False) -> ApiResponse:
    entity = table.entity
    url = f"{service.base_url}{entity.entity_set}({row[entity.primary_id]})"
    if req.prefer.get("return") == "representation":
        select = service.select(entity, req.query.get("$select"))
        wanted = annotation_filter(req.prefer.get("odata.include-annotations"))
        payload = {"@odata.context": service.context(entity, select, "/$entity"),
                   **render(service.store, entity, row, select, wanted)}
        headers = {"ETag": etag(row), "Preference-Applied": "return=representation"}
        if not entity_id_header:
            headers["OData-EntityId"] = url
        return json_response(201 if created else 200, payload, headers)
    return ApiResponse(204, {"OData-Version": "4.0", "OData-EntityId": url})


def _shown(key: str | dict[str, Any]) -> str:
    return key if isinstance(key, str) else ",".join(f"{k}={v}" for k, v in key.items())

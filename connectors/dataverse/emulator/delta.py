"""Change tracking of the emulator: ``Prefer: odata.track-changes`` and delta links.

Features
    * The first request returns every row and an ``@odata.deltaLink`` whose
      ``$deltatoken`` is ``<version>!<MM/dd/yyyy HH:mm:ss>`` (the organisation's row
      version at that moment and the time, as Dataverse writes it).
    * Following the delta link returns the rows created or changed since (one entry
      per row, its current state, ordered by version), then ``$deletedEntity`` entries
      ``{"@odata.context": "…#accounts/$deletedEntity", "id": "<guid>", "reason":
      "deleted"}``; a row created and deleted in between is reported as deleted.
    * More than a page of changes: ``@odata.nextLink`` pages, the delta link only on
      the last one. ``GET accounts/$count?$deltatoken=…`` counts the changes.
    * A token older than ``delta_token_ttl`` (or issued before
      ``Store.expire_tokens()``), or not issued here, fails with ``0x80044352``
      "Version stamp associated with the client has expired. Please perform a full
      sync." (status ``Settings.expired_token_status``, default 400).
    * ``$filter``, ``$orderby``, ``$expand`` and ``$top`` are refused, as Dataverse does.

Configuration
    ``Settings.delta_token_ttl``, ``Settings.expired_token_status``.

Limits
    * Changes are kept as row versions and tombstones, not as a change log: a row
      changed twice between polls appears once (as in Dataverse).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from connectors.dataverse.emulator.errors import CODE_EXPIRED_VERSION, ODataError, bad_query
from connectors.dataverse.emulator.http import ApiRequest, ApiResponse, json_response
from connectors.dataverse.emulator.paging import PageCookie, make_skiptoken
from connectors.dataverse.emulator.store import Table
from connectors.dataverse.emulator.values import annotation_filter, render

if TYPE_CHECKING:
    from connectors.dataverse.emulator.service import Service

__all__ = ["count", "make_token", "query"]

_TOKEN = re.compile(r"^(\d+)!(\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2})$")
_TOKEN_TIME = "%m/%d/%Y %H:%M:%S"
_FORBIDDEN = ("$filter", "$orderby", "$expand", "$top")
_NOT_ENABLED_CODE = "0x80040203"


def make_token(version: int, when: datetime) -> str:
    """A delta token, ``<version>!<MM/dd/yyyy HH:mm:ss>`` (UTC)."""
    return f"{version}!{when.astimezone(UTC).strftime(_TOKEN_TIME)}"


def _expired(service: Service) -> ODataError:
    return ODataError(service.settings.expired_token_status, CODE_EXPIRED_VERSION,
                      "Version stamp associated with the client has expired. Please perform a "
                      "full sync.")


def _token_version(service: Service, token: str) -> int:
    """The version a token was issued at, checked to be valid and not expired."""
    match = _TOKEN.match(token.strip())
    if match is None:
        raise _expired(service)
    version = int(match.group(1))
    issued = datetime.strptime(match.group(2), _TOKEN_TIME).replace(tzinfo=UTC)
    store = service.store
    age = (store.clock() - issued).total_seconds()
    if version > store.version or version < store.min_token_version or age > service.settings.delta_token_ttl:
        raise _expired(service)
    return version


def _check(service: Service, table: Table, req: ApiRequest) -> None:
    for option in _FORBIDDEN:
        if option in req.query:
            raise bad_query(f'The "{option}" query parameter isn\'t supported when Change '
                            "Tracking is enabled.")
    if not table.entity.change_tracking:
        raise ODataError(400, _NOT_ENABLED_CODE, f"Change tracking is not enabled for the entity "
                         f"'{table.entity.logical_name}'.")


def query(service: Service, table: Table, req: ApiRequest,
          cookie: PageCookie | None) -> ApiResponse:
    """A change-tracking page: the initial load, a delta, or a following page.

    Args:
        service: The service (store, settings, links).
        table: The table tracked.
        req: The request.
        cookie: The decoded ``$skiptoken`` of a following page, if any.

    Returns:
        The page, with ``@odata.nextLink`` or ``@odata.deltaLink``.

    Raises:
        ODataError: forbidden query options, tracking not enabled, expired token.
    """
    _check(service, table, req)
    store, entity = service.store, table.entity
    select = service.select(entity, req.query.get("$select"))
    if cookie is not None and cookie.tracking:
        state = dict(cookie.state)
    else:
        token = req.query.get("$deltatoken")
        start = _token_version(service, token) if token is not None else 0
        state = {"from": start, "upto": store.version, "phase": "u", "after": start,
                 "deletes": token is not None}
    size, applied = service.page_size(req)
    items, state, more = _collect(table, state, size)
    wanted = annotation_filter(req.prefer.get("odata.include-annotations"))
    deleted_context = f"{service.base_url}$metadata#{entity.entity_set}/$deletedEntity"
    value: list[dict[str, Any]] = []
    for kind, item in items:
        if kind == "u":
            value.append(render(store, entity, item, select, wanted))
        else:
            value.append({"@odata.context": deleted_context, "id": item, "reason": "deleted"})
    suffix = "/$delta" if state["deletes"] else ""
    payload: dict[str, Any] = {"@odata.context": service.context(entity, select, suffix),
                               "value": value}
    keep = {"$select": req.query["$select"]} if "$select" in req.query else {}
    if more:
        page = (cookie.page if cookie is not None else 1) + 1
        ids = [i if k == "d" else i[entity.primary_id] for k, i in items]
        token = make_skiptoken(PageCookie(page, True, state), entity.primary_id, ids[0], ids[-1])
        payload["@odata.nextLink"] = service.link(entity.entity_set, keep, skiptoken=token)
    else:
        payload["@odata.deltaLink"] = service.link(
            entity.entity_set, keep, deltatoken=make_token(state["upto"], store.clock()))
    extra = ("odata.track-changes",) if "odata.track-changes" in req.prefer else ()
    return json_response(200, payload, service.applied(req, applied, size, *extra))


def _collect(table: Table, state: dict[str, Any],
             size: int) -> tuple[list[tuple[str, Any]], dict[str, Any], bool]:
    """Up to ``size`` changes after the state's position; the new state; whether more remain."""
    upto = state["upto"]
    items: list[tuple[str, Any]] = []
    if state["phase"] == "u":
        after = state["after"]
        rows = sorted((r for r in table.rows.values() if after < r["versionnumber"] <= upto),
                      key=lambda r: r["versionnumber"])
        for row in rows[:size]:
            items.append(("u", row))
        if len(rows) > size:
            return items, {**state, "after": rows[size - 1]["versionnumber"]}, True
        state = {**state, "phase": "d", "after": state["from"]}
    if state["deletes"]:
        after, room = state["after"], size - len(items)
        tombs = sorted((t.version, i) for i, t in table.tombstones.items()
                       if after < t.version <= upto)
        items.extend(("d", row_id) for _version, row_id in tombs[:room])
        if len(tombs) > room:
            last = tombs[room - 1][0] if room > 0 else after
            return items, {**state, "after": last}, True
    return items, state, False


def count(service: Service, table: Table, req: ApiRequest) -> ApiResponse:
    """``GET <set>/$count?$deltatoken=…``: how many changes the delta would return."""
    _check(service, table, req)
    start = _token_version(service, req.query["$deltatoken"])
    upserts = sum(1 for r in table.rows.values() if r["versionnumber"] > start)
    deletes = sum(1 for t in table.tombstones.values() if t.version > start)
    return ApiResponse(200, {"Content-Type": "text/plain", "OData-Version": "4.0"},
                       str(upserts + deletes).encode())

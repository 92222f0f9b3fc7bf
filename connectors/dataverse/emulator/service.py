"""The emulated Web API: routing, queries and single-row reads.

Every operation takes an :class:`ApiRequest` and returns an :class:`ApiResponse`;
the Starlette app (``app.py``) and ``$batch`` (``batch.py``) call
:meth:`Service.handle`. Writes are in ``writes.py``, change tracking in ``delta.py``,
metadata in ``metadata.py``.

Features
    * Query: ``$select`` (primary id always), ``$filter``, ``$orderby``, ``$top``,
      ``$count``, ``/$count``; ``Prefer: odata.maxpagesize`` (default and maximum
      5,000) with ``Preference-Applied`` and opaque ``$skiptoken`` next links; ``$top``
      ignored when a page size is preferred; ``$skip`` refused.
    * Retrieve by id or alternate key, with ``If-None-Match: W/"n"`` → 304; read or
      clear one column (``GET``/``DELETE accounts(id)/description``).
    * Plug-in hooks: ``Service.plugins`` run before each create/update/delete and may
      refuse it (a 400 with the plug-in's message, as a Dataverse plug-in throws).

Configuration
    ``Settings``: page size, delta token lifetime, status of the expired-token error.

Limits
    * No ``$expand``, ``$apply``, ``$search`` (400), saved and user queries, FetchXML
      or ``?sql=`` (501): refused with Dataverse's error body, never ignored.
"""

from __future__ import annotations

import bisect
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.dataverse.emulator.errors import (
    CODE_BAD_REQUEST,
    ODataError,
    bad_query,
    not_found,
    unknown_property,
)
from connectors.dataverse.emulator.http import (
    ApiRequest,
    ApiResponse,
    error_response,
    json_response,
)
from connectors.dataverse.emulator.keys import parse_key_segment
from connectors.dataverse.emulator.model import NAMESPACE, AttributeDef, EntityDef
from connectors.dataverse.emulator.odata import (
    Getter,
    compile_filter,
    compile_orderby,
    split_select,
)
from connectors.dataverse.emulator.paging import PageCookie, make_skiptoken, parse_skiptoken
from connectors.dataverse.emulator.store import Store, Table
from connectors.dataverse.emulator.values import (
    annotation_filter,
    etag,
    find_row,
    render,
)

__all__ = ["MAX_PAGE_SIZE", "Plugin", "Service", "Settings"]

#: Largest (and default) page, rows.
MAX_PAGE_SIZE = 5000
#: A plug-in: (message name, table, values written, current row or None) → refusal text or None.
Plugin = Callable[[str, EntityDef, Mapping[str, Any], Mapping[str, Any] | None], str | None]

_QUERY_OPTIONS = {"$select", "$filter", "$orderby", "$top", "$count", "$skiptoken",
                  "$deltatoken", "$expand"}
_PLUGIN_CODE = "0x80040265"
#: Query options of a single-row GET.
_ROW_OPTIONS = frozenset({"$select"})
#: Query parameters of queries Dataverse runs and the emulator does not (FetchXML, saved
#: and user queries, SQL): refused, never ignored.
_OTHER_QUERIES = {"fetchXml": "FetchXML queries (?fetchXml=)",
                  "savedQuery": "Saved queries (?savedQuery=)",
                  "userQuery": "User queries (?userQuery=)", "sql": "SQL queries (?sql=)"}


@dataclass(slots=True)
class Settings:
    """Behaviour knobs of the emulated organisation."""

    #: Largest page (Dataverse: 5,000).
    max_page_size: int = MAX_PAGE_SIZE
    #: Seconds a delta token stays valid (``expirechangetrackingindays``, default 7 days).
    delta_token_ttl: float = 7 * 86400.0
    #: HTTP status of the expired-token error (undocumented; 400 as client code assumes).
    expired_token_status: int = 400
    #: Largest ``$batch`` (operations).
    max_batch: int = 1000
    #: Most records in one CreateMultiple / UpdateMultiple / UpsertMultiple (Microsoft
    #: documents no fixed number; unconfirmed, hence a knob).
    max_bulk: int = 1000


@dataclass(slots=True)
class Service:
    """The Web API of one emulated organisation.

    Args:
        store: The data.
        settings: Behaviour knobs.
    """

    store: Store
    settings: Settings = field(default_factory=Settings)
    plugins: list[Plugin] = field(default_factory=list)

    def handle(self, req: ApiRequest) -> ApiResponse:
        """Answer one operation; errors become Dataverse error responses.

        Args:
            req: The operation.

        Returns:
            The response.
        """
        try:
            with self.store.request():
                self._base_url = req.base_url
                return self._route(req)
        except ODataError as exc:
            return error_response(exc)

    def route_nested(self, req: ApiRequest) -> ApiResponse:
        """Answer an operation of a ``$batch`` (the caller holds the store's lock).

        Raises:
            ODataError: the operation failed.
        """
        return self._route(req)

    def _route(self, req: ApiRequest) -> ApiResponse:
        from connectors.dataverse.emulator import batch, bulk, delta, metadata, writes

        path = req.path
        if path == "$batch":
            return batch.handle_batch(self, req)
        if metadata.handles(path):
            return metadata.handle(self, req)
        segments = path.split("/") if path else []
        if not segments:
            return metadata.service_document(self, req)
        name, key = parse_key_segment(segments[0])
        table = self.store.sets.get(name)
        if table is None:
            raise ODataError(404, "0x80060888", f"Resource not found for the segment '{name}'.")
        rest = segments[1:]
        if key is None:
            if len(rest) == 1 and rest[0].startswith(NAMESPACE + "."):
                return bulk.handle(self, table, rest[0], req)
            if rest == ["$count"]:
                return delta.count(self, table, req) if "$deltatoken" in req.query else self._count(table, req)
            if rest:
                raise ODataError(404, "0x80060888", f"Resource not found for the segment '{rest[0]}'.")
            if req.method == "GET":
                return self.query(table, req)
            if req.method == "POST":
                return writes.create(self, table, req)
            raise _method_not_allowed(req.method)
        if len(rest) > 1:
            raise ODataError(404, "0x80060888", f"Resource not found for the segment '{rest[1]}'.")
        if rest:
            return self._property(table, key, rest[0], req)
        if req.method == "GET":
            return self.retrieve(table, key, req)
        if req.method == "PATCH":
            return writes.upsert(self, table, key, req)
        if req.method == "DELETE":
            return writes.delete(self, table, key, req)
        raise _method_not_allowed(req.method)

    # -- reading ----------------------------------------------------------------------------

    def resolver(self, entity: EntityDef) -> Callable[[str], tuple[Getter, str | None]]:
        """Resolves ``$filter``/``$orderby`` properties of ``entity`` rows."""

        def resolve(prop: str) -> tuple[Getter, str | None]:
            attr = entity.by_property(prop)
            if attr is None:
                raise unknown_property(prop, entity.type_name)
            name = attr.logical_name
            if attr.is_lookup:
                return (lambda row: (row.get(name) or {}).get("id")), attr.edm_type
            return (lambda row: row.get(name)), attr.edm_type

        return resolve

    def select(self, entity: EntityDef, text: str | None) -> list[AttributeDef] | None:
        """The columns of ``$select`` (None: all).

        Raises:
            ODataError: 400 for an unknown property.
        """
        if text is None:
            return None
        columns = []
        for prop in split_select(text):
            attr = entity.by_property(prop)
            if attr is None:
                raise unknown_property(prop, entity.type_name)
            columns.append(attr)
        return columns

    def query(self, table: Table, req: ApiRequest) -> ApiResponse:
        """``GET <set>``: a page of rows (or change tracking when asked for)."""
        from connectors.dataverse.emulator import delta

        q = req.query
        for option in q:
            if option == "$skip":
                raise bad_query("The query parameter $skip is not supported")
        _check_options(q, _QUERY_OPTIONS)
        cookie = parse_skiptoken(q["$skiptoken"]) if "$skiptoken" in q else None
        if "odata.track-changes" in req.prefer or "$deltatoken" in q or (cookie and cookie.tracking):
            return delta.query(self, table, req, cookie)
        if "$expand" in q:
            raise bad_query("The query parameter $expand is not supported by the emulator.")
        entity = table.entity
        select = self.select(entity, q.get("$select"))
        page_size, applied = self.page_size(req)
        top = None if applied or "$top" not in q else _int_option(q, "$top")
        rows, more = self._page(table, q, cookie, min(page_size, top or page_size))
        if top is not None:
            more = False
        wanted = annotation_filter(req.prefer.get("odata.include-annotations"))
        payload: dict[str, Any] = {"@odata.context": self.context(entity, select)}
        if q.get("$count") == "true":
            total = self._total(table, q)
            payload["@odata.count"] = min(total, MAX_PAGE_SIZE)
            if wanted("Microsoft.Dynamics.CRM.totalrecordcount"):
                payload["@Microsoft.Dynamics.CRM.totalrecordcount"] = -1 if total > MAX_PAGE_SIZE else total
                payload["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] = total > MAX_PAGE_SIZE
        payload["value"] = [render(self.store, entity, r, select, wanted) for r in rows]
        if more:
            page = (cookie.page if cookie else 1) + 1
            state = {"last": self._position(table, q, rows[-1])}
            token = make_skiptoken(PageCookie(page, False, state), entity.primary_id,
                                   rows[0][entity.primary_id], rows[-1][entity.primary_id])
            payload["@odata.nextLink"] = self.link(entity.entity_set, q, skiptoken=token)
        return json_response(200, payload, self.applied(req, applied, page_size))

    def page_size(self, req: ApiRequest) -> tuple[int, bool]:
        """(rows per page, whether ``odata.maxpagesize`` was given)."""
        raw = req.prefer.get("odata.maxpagesize")
        if raw is None:
            return self.settings.max_page_size, False
        try:
            size = int(raw)
        except ValueError:
            raise bad_query(f"Invalid odata.maxpagesize value '{raw}'.") from None
        return max(1, min(size, self.settings.max_page_size)), True

    def applied(self, req: ApiRequest, size_applied: bool, size: int,
                *extra: str) -> dict[str, str]:
        """The ``Preference-Applied`` header for what was honoured."""
        parts = list(extra)
        if size_applied:
            parts.append(f"odata.maxpagesize={size}")
        annotations = req.prefer.get("odata.include-annotations")
        if annotations:
            parts.append(f"odata.include-annotations={annotations}")
        return {"Preference-Applied": ",".join(parts)} if parts else {}

    def context(self, entity: EntityDef, select: list[AttributeDef] | None,
                suffix: str = "") -> str:
        """The ``@odata.context`` URL of a collection (or entity with ``/$entity``)."""
        columns = "" if select is None else "(" + ",".join(a.property_name for a in select) + ")"
        return f"{self.base_url}$metadata#{entity.entity_set}{columns}{suffix}"

    def link(self, entity_set: str, query: Mapping[str, str], **extra: str) -> str:
        """An absolute link to ``entity_set`` with ``query`` (``$skiptoken`` replaced by extra)."""
        params = {k: v for k, v in query.items() if k not in ("$skiptoken", "$deltatoken")}
        params.update({f"${k}": v for k, v in extra.items()})
        text = "&".join(f"{k}={urllib.parse.quote(v, safe=chr(39) + '(),=$@:/')}"
                        for k, v in params.items())
        return f"{self.base_url}{entity_set}" + (f"?{text}" if text else "")

    @property
    def base_url(self) -> str:
        """The Web API root of the request being served."""
        return self._base_url

    _base_url: str = ""

    def _ordered(self, table: Table, q: Mapping[str, str]) -> tuple[list[dict[str, Any]], Any]:
        entity = table.entity
        pk = entity.primary_id
        pred = compile_filter(q["$filter"], self.resolver(entity)) if q.get("$filter") else None
        if "$orderby" not in q and pred is None:
            return [table.rows[i] for i in table.sorted_ids()], (lambda row: row[pk])
        rows = [r for r in table.rows.values() if pred is None or pred(r)]
        if "$orderby" in q:
            key = compile_orderby(q["$orderby"], self.resolver(entity), lambda row: row[pk])
        else:
            key = lambda row: row[pk]  # noqa: E731
        rows.sort(key=key)
        return rows, key

    def _page(self, table: Table, q: Mapping[str, str], cookie: PageCookie | None,
              size: int) -> tuple[list[dict[str, Any]], bool]:
        rows, key = self._ordered(table, q)
        start = 0
        if cookie is not None:
            start = bisect.bisect_right(rows, key(cookie.state["last"]), key=key)
        page = rows[start:start + size + 1]
        return page[:size], len(page) > size

    def _position(self, table: Table, q: Mapping[str, str], row: dict[str, Any]) -> dict[str, Any]:
        """The stored values a next page resumes after (sort columns and the id)."""
        entity = table.entity
        names = {entity.primary_id}
        for part in q.get("$orderby", "").split(","):
            prop = part.strip().split(" ")[0]
            attr = entity.by_property(prop) if prop else None
            if attr is not None:
                names.add(attr.logical_name)
        return {n: row.get(n) for n in names}

    def _total(self, table: Table, q: Mapping[str, str]) -> int:
        if not q.get("$filter"):
            return len(table.rows)
        pred = compile_filter(q["$filter"], self.resolver(table.entity))
        return sum(1 for r in table.rows.values() if pred(r))

    def _count(self, table: Table, req: ApiRequest) -> ApiResponse:
        total = min(self._total(table, req.query), MAX_PAGE_SIZE)
        return ApiResponse(200, {"Content-Type": "text/plain", "OData-Version": "4.0"},
                           str(total).encode())

    def retrieve(self, table: Table, key: str | dict[str, Any], req: ApiRequest) -> ApiResponse:
        """``GET <set>(key)``."""
        entity = table.entity
        _check_options(req.query, _ROW_OPTIONS)
        row_id = find_row(table, key)
        if row_id is None:
            raise not_found(entity.logical_name, _shown(key))
        row = table.rows[row_id]
        annotations = req.prefer.get("odata.include-annotations")
        if req.headers.get("if-none-match") == etag(row) and not annotations:
            return ApiResponse(304, {"ETag": etag(row), "OData-Version": "4.0"})
        select = self.select(entity, req.query.get("$select"))
        payload = {"@odata.context": self.context(entity, select, "/$entity"),
                   **render(self.store, entity, row, select, annotation_filter(annotations))}
        return json_response(200, payload, {"ETag": etag(row), **self.applied(req, False, 0)})

    def _property(self, table: Table, key: str | dict[str, Any], prop: str,
                  req: ApiRequest) -> ApiResponse:
        entity = table.entity
        _check_options(req.query, frozenset())
        attr = entity.by_property(prop)
        if attr is None:
            raise unknown_property(prop, entity.type_name)
        row_id = find_row(table, key)
        if row_id is None:
            raise not_found(entity.logical_name, _shown(key))
        if req.method == "GET":
            value = render(self.store, entity, table.rows[row_id], [attr], lambda _t: False)
            return json_response(200, {"@odata.context": f"{self.base_url}$metadata#"
                                       f"{entity.entity_set}({row_id})/{prop}",
                                       "value": value[attr.property_name]})
        if req.method == "DELETE" and not attr.is_lookup and attr.valid_for_update:
            with self.store.atomic():
                self.run_plugins("Update", entity, {attr.logical_name: None}, table.rows[row_id])
                self.store.update(table, row_id, {attr.logical_name: None})
            return ApiResponse(204, {"OData-Version": "4.0"})
        raise _method_not_allowed(req.method)

    def run_plugins(self, message: str, entity: EntityDef, values: Mapping[str, Any],
                    current: Mapping[str, Any] | None) -> None:
        """Run the plug-in hooks; the first refusal becomes a 400.

        Raises:
            ODataError: a plug-in refused the operation.
        """
        for plugin in self.plugins:
            refusal = plugin(message, entity, values, current)
            if refusal:
                raise ODataError(400, _PLUGIN_CODE, refusal)


def _check_options(q: Mapping[str, str], allowed: frozenset[str] | set[str]) -> None:
    """Refuse what would otherwise be silently ignored.

    Raises:
        ODataError: 501 for a query kind the emulator does not run (FetchXML, saved and
            user queries, SQL); 400 for ``$expand`` where it is not emulated and for an
            unknown or misplaced system query option.
    """
    for option in q:
        if option in _OTHER_QUERIES:
            raise ODataError(501, CODE_BAD_REQUEST, f"{_OTHER_QUERIES[option]} are not "
                             "supported by the emulator; use the OData query options.")
        if option == "$expand" and option not in allowed:
            raise bad_query("The query parameter $expand is not supported by the emulator.")
        if option.startswith("$") and option not in allowed:
            raise bad_query(f"The query parameter {option} is not supported")


def _int_option(q: Mapping[str, str], name: str) -> int:
    try:
        value = int(q[name])
    except ValueError:
        raise bad_query(f"Invalid value '{q[name]}' for {name}.") from None
    if value < 0:
        raise bad_query(f"Invalid value '{q[name]}' for {name}.")
    return value


def _shown(key: str | dict[str, Any]) -> str:
    return key if isinstance(key, str) else ",".join(f"{k}={v}" for k, v in key.items())


def _method_not_allowed(method: str) -> ODataError:
    return ODataError(405, "0x80060888", f"The requested resource does not support http "
                      f"method '{method}'.")

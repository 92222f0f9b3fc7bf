"""Request dispatch of the emulated Business Central API, independent of HTTP.

The app turns an HTTP request into an :class:`ApiRequest`; ``$batch`` turns each of
its operations into one too. :meth:`Service.handle` routes it, runs it against the
store and returns an :class:`ApiReply`, or raises :class:`~.errors.BCError`.

Features
    * ``companies``, ``companies(<id>)/<set>``, ``<set>(<key>)`` (GUID, or ``'No'`` on
      Resco pages), ``salesOrders(<id>)/salesOrderLines[(<id>)]``, ``$expand`` of lines.
    * GET with query options and server-driven paging (``Prefer: odata.maxpagesize``,
      never more than the cap, 20,000 by default); ``Prefer: odata.track-changes`` is
      refused with "Entity does not support delta requests" (delta links are gone).
    * POST ⇒ 201 + entity; PATCH (``If-Match`` required) ⇒ 200 + entity; DELETE
      (``If-Match`` required) ⇒ 204.
    * ``subscriptions`` (per API route), ``$metadata``, ``$batch``, and
      ``microsoft/runtime/beta/companies(<id>)/webhookSupportedResources``.

Configuration
    ``max_page_size`` (20,000), ``max_batch`` (100).

Limits
    * No bound actions (``Microsoft.NAV.shipAndInvoice``), no ``$apply``, no media.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connectors.business_central.emulator import errors, rules
from connectors.business_central.emulator.metadata import metadata_xml
from connectors.business_central.emulator.model import PageDef, find_page
from connectors.business_central.emulator.query import parse_query, run_query
from connectors.business_central.emulator.store import Company, Record, Store
from connectors.business_central.emulator.webhooks import Webhooks

__all__ = ["ApiReply", "ApiRequest", "Service", "split_api"]

_SEGMENT = re.compile(r"^(?P<name>[^()]+?)(?:\((?P<key>.*)\))?$")
_MAX_PAGE = 20_000
_EQUALS = re.compile(r"^\s*(?P<field>\w+) eq (?:'(?P<text>(?:[^']|'')*)'|(?P<guid>[0-9a-fA-F-]{36}))\s*$")
_RUNTIME_API = "microsoft/runtime/beta"


@dataclass(slots=True)
class ApiRequest:
    """One API call (a whole HTTP request or one ``$batch`` operation)."""

    method: str
    api: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    root: str = ""

    def header(self, name: str) -> str | None:
        """A request header by lower-case name."""
        return self.headers.get(name)


@dataclass(slots=True)
class ApiReply:
    """The answer: status, JSON body (or XML text), headers."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def split_api(rest: str) -> tuple[str, str]:
    """Split the path after ``/api/`` into the API route and the rest.

    Returns:
        ``("v2.0", "companies(…)/customers")`` or ``("Resco/RescoIntegrations/v2.0", …)``.
    """
    parts = rest.split("/")
    size = 1 if parts[0].lower() == "v2.0" else 3
    return "/".join(parts[:size]), "/".join(parts[size:])


class Service:
    """Routes API calls to the store, the query engine and the webhooks.

    Args:
        store: The data.
        webhooks: The subscriptions.
        max_page_size: Server-driven paging cap (Business Central online: 20,000).
        max_batch: Operations allowed in one ``$batch``.
    """

    def __init__(self, store: Store, webhooks: Webhooks, *, max_page_size: int = _MAX_PAGE,
                 max_batch: int = 100) -> None:
        self.store, self.webhooks = store, webhooks
        self.max_page_size, self.max_batch = max_page_size, max_batch
        #: Called with each PATCH/DELETE of a record before it runs: tests make
        #: "another user" change the record here to provoke a real stale ETag.
        self.before_write: Callable[[ApiRequest], None] | None = None

    def handle(self, req: ApiRequest) -> ApiReply:
        """Answer one call.

        Raises:
            BCError: every refusal, shaped like Business Central's.
        """
        if req.path == "$metadata":
            xml = metadata_xml(req.api)
            if xml is None:
                raise errors.not_found(f"API '{req.api}'")
            return ApiReply(200, xml, {"content-type": "application/xml"})
        if req.path == "$batch":
            from connectors.business_central.emulator.batch import run_batch

            return run_batch(self, req)
        segments = [s for s in req.path.split("/") if s]
        if not segments:
            raise errors.not_found("resource ''")
        first = _segment(segments[0])
        if first[0] == "subscriptions":
            return self._subscriptions(req, first[1], segments[1:])
        if first[0] != "companies":
            raise errors.not_found(f"resource '{first[0]}'")
        if first[1] is None:
            return self._companies(req)
        company = self.store.company(first[1].strip("'"))
        if req.api.lower() == _RUNTIME_API and segments[1:] == ["webhookSupportedResources"]:
            return ApiReply(200, {"value": self.webhooks.supported(company.id)})
        return self._entities(req, company, segments[1:])

    # -- companies and subscriptions ----------------------------------------------------

    def _companies(self, req: ApiRequest) -> ApiReply:
        if req.method != "GET":
            raise errors.BCError(405, "BadRequest_MethodNotAllowed",
                                 "'POST' requests for 'companies' are not allowed.")
        return ApiReply(200, {"@odata.context": f"{req.root}{req.api}/$metadata#companies",
                              "value": [c.summary() for c in self.store.companies.values()]})

    def _subscriptions(self, req: ApiRequest, key: str | None, rest: list[str]) -> ApiReply:
        hooks, ctx = self.webhooks, f"{req.root}{req.api}/$metadata#subscriptions"
        if rest:
            raise errors.not_found("resource")
        if key is None and req.method == "GET":
            return ApiReply(200, {"@odata.context": ctx,
                                  "value": [s.to_json() for s in hooks.all(req.api)]})
        if key is None and req.method == "POST":
            sub = hooks.create(req.api, _body(req))
            return ApiReply(201, {"@odata.context": f"{ctx}/$entity", **sub.to_json()})
        if key is None:
            raise errors.BCError(405, "BadRequest_MethodNotAllowed", "Method not allowed.")
        sub_id = key.strip("'")
        if req.method == "GET":
            return ApiReply(200, {"@odata.context": f"{ctx}/$entity", **hooks.get(sub_id).to_json()})
        if req.method == "PATCH":
            sub = hooks.renew(sub_id, _body(req), req.header("if-match"))
            return ApiReply(200, {"@odata.context": f"{ctx}/$entity", **sub.to_json()})
        if req.method == "DELETE":
            hooks.delete(sub_id, req.header("if-match"))
            return ApiReply(204)
        raise errors.BCError(405, "BadRequest_MethodNotAllowed", "Method not allowed.")

    # -- entities -------------------------------------------------------------------------

    def _entities(self, req: ApiRequest, company: Company, segments: list[str]) -> ApiReply:
        if not segments:
            raise errors.not_found("resource")
        name, key = _segment(segments[0])
        page = self._page(req.api, name)
        parent: Record | None = None
        if len(segments) >= 2:
            if key is None:
                raise errors.not_found(f"resource '{segments[1]}'")
            parent_page, parent = page, self._record(company, page, key)
            name, key = _segment(segments[1])
            page = self._page(req.api, name)
            if page.parent_set != parent_page.entity_set or len(segments) > 2:
                raise errors.not_found(f"resource '{segments[1]}'")
        ctx = f"{req.root}{req.api}/$metadata#companies({company.id})/{page.entity_set}"
        if key is None:
            if req.method == "GET":
                return self._list(req, company, page, parent, ctx)
            if req.method == "POST":
                with self.store.transaction():
                    record = rules.create(self.store, company, page, _body(req), parent=parent)
                    body = {"@odata.context": f"{ctx}/$entity", **rules.view(page, record)}
                location = f"{req.root}{req.api}/{req.path}({_key_text(page, body)})"
                return ApiReply(201, body, {"location": location, "etag": record.etag})
            raise errors.BCError(405, "BadRequest_MethodNotAllowed", "Method not allowed.")
        if req.method in ("PATCH", "PUT", "DELETE") and self.before_write is not None:
            self.before_write(req)
        with self.store.transaction():
            record = self._record(company, page, key, parent)
            if req.method == "GET":
                return self._single(req, company, page, record, ctx)
            if req.method in ("PATCH", "PUT"):
                if_match = req.header("if-match")
                if not if_match:
                    raise errors.missing_etag()
                record = rules.modify(self.store, company, page, record, _body(req), if_match)
                return ApiReply(200, {"@odata.context": f"{ctx}/$entity",
                                      **rules.view(page, record)}, {"etag": record.etag})
            if req.method == "DELETE":
                if_match = req.header("if-match")
                if not if_match:
                    raise errors.missing_etag()
                rules.remove(self.store, company, page, record, if_match)
                return ApiReply(204)
        raise errors.BCError(405, "BadRequest_MethodNotAllowed", "Method not allowed.")

    def _list(self, req: ApiRequest, company: Company, page: PageDef, parent: Record | None,
              ctx: str) -> ApiReply:
        prefer = _prefer(req.header("prefer"))
        if "odata.track-changes" in prefer:
            raise errors.delta_not_supported()
        asked = prefer.get("odata.maxpagesize")
        size = self.max_page_size
        if asked is not None and asked.isdigit() and int(asked) > 0:
            size = min(int(asked), self.max_page_size)
        query = parse_query(req.params, page)
        with self.store.lock:
            rows = [rules.view(page, r) for r in self._rows(company, page, parent,
                                                            req.params.get("$filter"))]
            chunk, token, total = run_query(query, page, rows, size)
            self._expand(req, company, page, chunk)
        body: dict[str, Any] = {"@odata.context": ctx}
        if query.count:
            body["@odata.count"] = total
        body["value"] = chunk
        if token is not None:
            params = {k: v for k, v in req.params.items() if k not in ("$skip", "$skiptoken")}
            params["$skiptoken"] = token
            body["@odata.nextLink"] = (f"{req.root}{req.api}/{req.path}?"
                                       + urllib.parse.urlencode(params, safe="$(),'"))
        headers = {"preference-applied": f"odata.maxpagesize={size}"} if asked else {}
        return ApiReply(200, body, headers)

    def _single(self, req: ApiRequest, company: Company, page: PageDef, record: Record,
                ctx: str) -> ApiReply:
        view = rules.view(page, record)
        if req.params.get("$select"):
            query = parse_query({"$select": req.params["$select"]}, page)
            view = {"@odata.etag": view["@odata.etag"],
                    **{s: view[s] for s in query.select or []}}
        self._expand(req, company, page, [view])
        return ApiReply(200, {"@odata.context": f"{ctx}/$entity", **view}, {"etag": record.etag})

    def _expand(self, req: ApiRequest, company: Company, page: PageDef,
                views: list[dict[str, Any]]) -> None:
        wanted = [e.strip() for e in req.params.get("$expand", "").split(",") if e.strip()]
        for name in wanted:
            child = self._page(req.api, name)
            if child.parent_set != page.entity_set:
                raise errors.unknown_property(name, page.entity_type)
            for view in views:
                parent = company.rows(page.table).get(str(view.get("id")))
                view[name] = [rules.view(child, r) for r in self._rows(company, child, parent)]

    # -- lookups --------------------------------------------------------------------------

    def _page(self, api: str, name: str) -> PageDef:
        page = find_page(api, name)
        if page is None:
            raise errors.not_found(f"resource '{name}'")
        return page

    def _rows(self, company: Company, page: PageDef, parent: Record | None,
              where: str | None = None) -> list[Record]:
        # A lookup by number or id is answered from the index (the filter still runs).
        match = _EQUALS.match(where or "")
        f = page.field(match["field"]) if match else None
        if match and f is not None and f.source in ("number", "@id"):
            value = (match["text"] or "").replace("''", "'") if match["text"] is not None \
                else match["guid"]
            found = company.by_number(page.table, value) if f.source == "number" else \
                company.rows(page.table).get(str(value).lower())
            rows = [found] if found is not None else []
        else:
            rows = list(company.rows(page.table).values())
        if parent is not None:
            rows = [r for r in rows if r.values.get("documentId") == parent.id]
        return rows

    def _record(self, company: Company, page: PageDef, key: str,
                parent: Record | None = None) -> Record:
        text = key.strip()
        found: Record | None
        if page.key_field.source == "@id":
            found = company.rows(page.table).get(text.strip("'").lower())
        else:
            value = text[1:-1].replace("''", "'") if text.startswith("'") else text
            found = rules.find_by_number(company, page.table, value)
        if found is None or (parent is not None and found.values.get("documentId") != parent.id):
            raise errors.record_missing(page.table, f"{page.key}='{text.strip(chr(39))}'")
        return found


def _segment(text: str) -> tuple[str, str | None]:
    match = _SEGMENT.match(text)
    if match is None:
        raise errors.not_found(f"resource '{text}'")
    return match["name"], match["key"]


def _key_text(page: PageDef, view: dict[str, Any]) -> str:
    value = view.get(page.key, "")
    return str(value) if page.key_field.source == "@id" else "'" + str(value) + "'"


def _body(req: ApiRequest) -> dict[str, Any]:
    if not isinstance(req.body, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    return req.body


def _prefer(header: str | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            out[name.strip().lower()] = value.strip() or None
    return out

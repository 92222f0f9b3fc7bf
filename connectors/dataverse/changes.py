"""Change detection through Dataverse change tracking.

The cursor is the delta link (made relative to the Web API root, in a small JSON
envelope). Reading from no cursor asks with ``Prefer: odata.track-changes`` for every
row and gets the first delta link; every later read follows the link, which returns
the rows created or changed since (as upserts, with ``versionnumber`` as version and
``modifiedon`` as modification time) and the ``$deletedEntity`` entries (as deletes).
Each Dataverse page is one :class:`~connectors.base.ChangePage`; its cursor is the
page's next link, or the new delta link on the last page.

When Dataverse answers ``0x80044352`` (the delta token expired, 7 days by default),
the reader logs the operator-visible warning ``dataverse_delta_token_expired`` and
starts a full resync: every row is read again (published as upserts; the
consumers' version guard skips what is unchanged), and the rows the key set
remembers but the resync did not see are published as deletes.

Features
    * ``has_changes`` asks ``<set>/$count?$deltatoken=…`` (one cheap request).
    * ``snapshot`` pages ``$select=<id>,versionnumber`` at the largest page size.
    * A delete's version is one above the last version seen of that row, so it wins
      over every earlier upsert and loses to a later re-creation.

Configuration
    ``page_size`` (``odata.maxpagesize``, default 5,000), the key-set file.

Limits
    * The bus's ``page_size`` does not split Dataverse pages (a page cannot be resumed
      half-way); pages follow the connection's ``page_size``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import structlog

from connectors.base import (
    ChangePage,
    ChangeRecord,
    Op,
    PermanentError,
    SchemaError,
    TransientError,
    Version,
)
from connectors.dataverse.client import DataverseClient, is_expired_token
from connectors.dataverse.convert import from_row, parse_datetime
from connectors.dataverse.keyset import KeySet
from connectors.dataverse.metadata import TableMeta

__all__ = ["ANNOTATIONS", "ChangeReader", "row_version", "upsert_record"]

log = structlog.get_logger(__name__)

#: The ``Prefer`` part that brings the target table of every lookup value.
ANNOTATIONS = 'odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"'
_FULL = ("initial", "resync")


class ChangeReader:
    """Reads changes of the tables of one organisation.

    Args:
        name: The connection name (log field).
        client: The organisation's client.
        keys: The key set (deletes after an expired token).
        page_size: ``odata.maxpagesize``.
    """

    def __init__(self, name: str, client: DataverseClient, keys: KeySet, page_size: int) -> None:
        self.name, self.client, self.keys, self.page_size = name, client, keys, page_size
        #: Full resyncs started because a delta token had expired (tests read it).
        self.resyncs = 0

    # -- cursors ------------------------------------------------------------------------

    def decode(self, entity: str, cursor: str | None) -> dict[str, Any] | None:
        """The state in a cursor (None: no cursor).

        Raises:
            SchemaError: the cursor was not written by this connector.
        """
        if cursor is None:
            return None
        try:
            state = json.loads(cursor)
        except ValueError:
            state = None
        if not isinstance(state, dict) or state.get("v") != 1 or "link" not in state:
            raise SchemaError(f"{self.name}: cursor of {entity!r} was not written by the "
                              "Dataverse connector", entity=entity)
        return state

    @staticmethod
    def encode(state: dict[str, Any]) -> str:
        """The cursor text of a state."""
        return json.dumps({"v": 1, **state}, separators=(",", ":"), sort_keys=True)

    # -- the feed -------------------------------------------------------------------------

    def has_changes(self, table: TableMeta, cursor: str | None) -> bool:
        """True unless the delta link is known to hold no change (one ``$count`` request).

        Raises:
            ConnectorUnavailable: the organisation cannot be reached.
            TransientError: it answered 429/5xx after the retries.
        """
        state = self.decode(table.logical_name, cursor)
        if state is None or state["mode"] != "delta" or "$deltatoken=" not in state["link"]:
            return True
        prefix = f"{table.entity_set}?"
        if not state["link"].startswith(prefix):
            return True
        count_link = f"{table.entity_set}/$count?{state['link'][len(prefix):]}"
        try:
            response = self.client.send("GET", count_link, entity=table.logical_name)
            return int(response.text.strip() or "1") > 0
        except TransientError:
            raise
        except (PermanentError, ValueError):
            return True  # expired token (read_changes resyncs) or no count support

    def pages(self, table: TableMeta, cursor: str | None) -> Iterator[ChangePage]:
        """Yield the pages after ``cursor`` (see the module docstring).

        Raises:
            SchemaError: a foreign cursor.
            ConnectorUnavailable, TransientError: the organisation is unavailable.
            PermanentError: Dataverse refused the query.
        """
        state = self.decode(table.logical_name, cursor)
        if state is None:
            state = self._start(table, "initial", hv=0)
        if state.get("purge"):
            self.keys.purge(table.logical_name, int(state["purge"]))
            state = {k: v for k, v in state.items() if k != "purge"}
        while True:
            try:
                data = self.client.get_json(state["link"], entity=table.logical_name,
                                            prefer=self._prefer())
            except PermanentError as exc:
                if state["mode"] != "delta" or not is_expired_token(exc):
                    raise
                self.resyncs += 1
                log.warning("dataverse_delta_token_expired", connector=self.name,
                            entity=table.logical_name, known_rows=self.keys.count(table.logical_name),
                            action="full resync; rows deleted meanwhile are found by comparing "
                                   "the key set", error=exc.message)
                state = self._start(table, "resync", hv=int(state.get("hv", 0)))
                continue
            page, state = self._page(table, state, data)
            yield page
            if not page.more:
                return

    def _prefer(self) -> str:
        return f"odata.track-changes,odata.maxpagesize={self.page_size},{ANNOTATIONS}"

    def _start(self, table: TableMeta, mode: str, *, hv: int) -> dict[str, Any]:
        gen = self.keys.new_generation(table.logical_name)
        return {"mode": mode, "gen": gen, "hv": hv,
                "link": f"{table.entity_set}?$select={table.select()}"}

    def _page(self, table: TableMeta, state: dict[str, Any],
              data: dict[str, Any]) -> tuple[ChangePage, dict[str, Any]]:
        entity, pk = table.logical_name, table.primary_id
        hv = int(state.get("hv", 0))
        records: list[ChangeRecord] = []
        seen: list[tuple[str, int | None]] = []
        deleted: list[str] = []
        for item in data.get("value") or ():
            if str(item.get("@odata.context", "")).endswith("$deletedEntity") or (
                    "reason" in item and "id" in item and pk not in item):
                deleted.append(str(item["id"]))
                continue
            record = upsert_record(table, item)
            hv = max(hv, int(record.version))
            seen.append((str(item[pk]), int(record.version)))
            records.append(record)
        full = state["mode"] in _FULL
        self.keys.seen(entity, seen, state["gen"] if full else self.keys.generation(entity))
        records += self._deletes(entity, pk, deleted, hv)
        self.keys.deleted(entity, deleted)
        next_link, delta_link = data.get("@odata.nextLink"), data.get("@odata.deltaLink")
        if next_link:
            after = {**state, "hv": hv, "link": self.client.relative(str(next_link))}
            return ChangePage(records, self.encode(after), more=True), after
        if not delta_link:
            raise PermanentError(f"{self.name}: {entity} change page has neither a next nor a "
                                 "delta link", entity=entity)
        if state["mode"] == "resync":
            already = set(deleted)
            gone = [i for i, _ in self.keys.missing(entity, state["gen"]) if i not in already]
            records += self._deletes(entity, pk, gone, hv)
            if gone:
                log.warning("dataverse_resync_deletes", connector=self.name, entity=entity,
                            deletes=len(gone))
        after = {"mode": "delta", "hv": hv, "link": self.client.relative(str(delta_link))}
        if full:
            after["purge"] = state["gen"]
        return ChangePage(records, self.encode(after), more=False), after

    def _deletes(self, entity: str, pk: str, ids: list[str], hv: int) -> list[ChangeRecord]:
        if not ids:
            return []
        known = self.keys.versions(entity, ids)
        return [ChangeRecord(key={pk: i}, op=Op.DELETE, version=known.get(i, hv) + 1)
                for i in ids]

    # -- snapshot ---------------------------------------------------------------------------

    def snapshot(self, table: TableMeta) -> Iterator[tuple[dict[str, Any], Version]]:
        """Every row's (key, versionnumber), at the largest page size.

        Raises:
            ConnectorUnavailable, TransientError: the organisation is unavailable.
        """
        pk = table.primary_id
        link: str | None = f"{table.entity_set}?$select={pk},versionnumber"
        while link:
            data = self.client.get_json(link, entity=table.logical_name,
                                        prefer=f"odata.maxpagesize={self.page_size}")
            for item in data.get("value") or ():
                yield {pk: item[pk]}, row_version(item)
            next_link = data.get("@odata.nextLink")
            link = self.client.relative(str(next_link)) if next_link else None


def upsert_record(table: TableMeta, item: dict[str, Any]) -> ChangeRecord:
    """A Web API row (read with ``$select=table.select()`` and ``ANNOTATIONS``) as an
    ``Op.UPSERT`` record: the one form of a row in change records and fetched records."""
    return ChangeRecord(
        key={table.primary_id: item[table.primary_id]}, op=Op.UPSERT, version=row_version(item),
        modified_at=parse_datetime(item.get("modifiedon")), values=from_row(table, item))


def row_version(item: dict[str, Any]) -> int:
    """``versionnumber``, or the number in the weak ETag ``W/"n"``."""
    value = item.get("versionnumber")
    if value is None:
        value = str(item.get("@odata.etag", "")).strip('W/"') or 0
    return int(value)


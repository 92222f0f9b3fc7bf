"""Change detection for one entity set: row versions or modification times, and deletions.

Features
    * **Row version** (pages with ``RowVersionNumber`` / ``systemRowVersion``): rows
      with a version above the cursor, in version order; the highest version read is
      the cursor. The counter is database-wide, so versions are unique.
    * **Modification time** (every other page): rows with ``lastModifiedDateTime`` at
      or after *high-water mark − overlap*, ordered by time and key. Rows already
      published are recognised by (key, ETag) digests kept in the cursor for the
      overlap window, so equal timestamps across a page boundary and late commits
      (a row committed with a time before the high-water mark) are published exactly
      once. The version of these changes is the ETag.
    * **Deletions** (entities with ``sync_deletion`` or ``webhook``): the key index
      remembers seen keys; reconciliation (every ``reconcile_interval``) turns missing
      keys into tombstones, published after the upserts; a renumbered record also
      deletes its old key. A webhook ``deleted`` notification only makes its record a
      *suspect*: the next read asks Business Central for the record, and only a 404
      makes a tombstone (a record that still exists is logged as
      ``webhook_delete_refuted`` and nothing is published). The cursor holds the last
      published tombstone sequence, so none is lost in a crash.

Configuration
    :class:`FeedSettings`, built by the connector from the connection's ``entities``.

Limits
    * A row committed more than ``overlap`` after its ``lastModifiedDateTime`` is missed
      (keep the overlap above your longest transaction).
    * Row versions are read as the extension stores them: writes that skip its table
      triggers (``Modify(false)``) do not move ``RowVersionNumber`` (§2.10 of the
      reference); such changes are only seen with another change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog

from connectors.base import ChangePage, ChangeRecord, Op, SchemaError, TransientError, Version
from connectors.business_central.client import MAX_BATCH, BCClient, quote_key
from connectors.business_central.index import IndexRow, KeyIndex
from connectors.business_central.metadata import PageInfo

__all__ = ["ChangeFeed", "FeedSettings", "format_time", "parse_time"]

log = structlog.get_logger(__name__)

Mode = Literal["row_version", "modified"]
#: Rows per request when listing keys for reconciliation and snapshots.
KEY_PAGE = 20_000


def parse_time(text: str) -> datetime:
    """A Business Central date-time (``…Z``) as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def format_time(value: datetime) -> str:
    """An aware datetime as a ``$filter`` literal, milliseconds, UTC."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """How one entity is detected."""

    mode: Mode
    overlap: float
    sync_deletion: bool
    reconcile_interval: float
    track_keys: bool
    extra_keys: tuple[str, ...] = ()


@dataclass(slots=True)
class _State:
    mode: Mode
    rv: int = 0
    hw: str | None = None
    seen: dict[str, set[str]] = field(default_factory=dict)
    tomb: int = 0
    reconciled: float | None = None

    def dump(self) -> str:
        data: dict[str, Any] = {"m": self.mode, "t": self.tomb, "r": self.reconciled}
        if self.mode == "row_version":
            data["rv"] = self.rv
        else:
            data.update(hw=self.hw, seen={t: "".join(sorted(d)) for t, d in self.seen.items()})
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def load(cls, cursor: str | None, mode: Mode, where: str) -> _State | None:
        if cursor is None:
            return None
        try:
            data = json.loads(cursor)
            seen = {str(t): {d[i:i + 11] for i in range(0, len(d), 11)}
                    for t, d in (data.get("seen") or {}).items()}
            state = cls(data["m"], int(data.get("rv", 0)), data.get("hw"), seen,
                        int(data["t"]), data.get("r"))
        except (ValueError, KeyError, TypeError):
            raise SchemaError(f"{where}: {cursor[:80]!r} is not a Business Central cursor") \
                from None
        if state.mode != mode:
            raise SchemaError(f"{where}: the cursor was made by {state.mode} detection, the "
                              f"entity now uses {mode}; reset the detector's cursor")
        return state


def _url_key(page: PageInfo, page_key: str) -> str:
    """A page key between parentheses of a URL: quoted as OData wants, percent-encoded."""
    return urllib.parse.quote(quote_key(page_key, guid=page.key_is_guid), safe="'(),=")


def _digest(page_key: str, etag: str) -> str:
    raw = hashlib.blake2b(f"{page_key}\x00{etag}".encode(), digest_size=8).digest()
    return base64.urlsafe_b64encode(raw).decode()[:11]


class ChangeFeed:
    """Reads the changes of one entity set.

    Args:
        client: The environment.
        page: The entity set's metadata.
        settings: Detection settings.
        index: The key index (needed when ``settings.track_keys``).
        clock: Epoch seconds (reconciliation schedule).
    """

    def __init__(self, client: BCClient, page: PageInfo, settings: FeedSettings,
                 index: KeyIndex | None, clock: Callable[[], float] = time.time) -> None:
        self.client, self.page, self.settings = client, page, settings
        self.index = index if settings.track_keys else None
        self.clock = clock
        self.entity = page.entity_set
        self.where = f"{client.name}.{self.entity}"
        self.key_fields = tuple(dict.fromkeys(
            [page.key, *([page.number_field] if page.number_field else []),
             *settings.extra_keys]))

    # -- public -----------------------------------------------------------------------

    def has_changes(self, cursor: str | None) -> bool:
        """Whether :meth:`read` would find something (cheap for row versions)."""
        state = _State.load(cursor, self.settings.mode, self.where)
        if state is None or self._deletions_due(state):
            return True
        if self.settings.mode == "modified":
            return True  # late commits can only be seen by reading the overlap window
        vf = self.page.version_field
        rows = self.client.get_json(self._path(), params={
            "$filter": f"{vf} gt {state.rv}", "$top": "1", "$select": str(vf)},
            entity=self.entity).get("value", [])
        return bool(rows)

    def read(self, cursor: str | None, page_size: int) -> Iterator[ChangePage]:
        """Yield the pages of changes after ``cursor`` (see the module docstring).

        Raises:
            SchemaError: a foreign cursor or one of another detection mode.
            ConnectorUnavailable, TransientError, PermanentError: from the client.
        """
        state = _State.load(cursor, self.settings.mode, self.where)
        initial = state is None
        state = state or _State(self.settings.mode)
        if self.index is not None:
            self.index.purge(self.entity, state.tomb)
        yielded = False
        for page in self._upserts(state, page_size):
            yielded = True
            yield page
        if initial:
            state.reconciled = self.clock()
        for page in self._deletions(state, page_size):
            yielded = True
            yield page
        if not yielded or initial:
            yield ChangePage([], state.dump(), more=False)

    def snapshot(self) -> Iterator[tuple[dict[str, Any], Version]]:
        """Every current record's change key and version (row version or ETag)."""
        select = [*self.key_fields, *([self.page.version_field]
                                      if self.settings.mode == "row_version" else [])]
        params = {"$select": ",".join(dict.fromkeys(f for f in select if f))}
        for rows, _ in self.client.pages(self._path(), params, KEY_PAGE, entity=self.entity):
            for row in rows:
                yield self._key(row), self._version(row)

    # -- upserts ----------------------------------------------------------------------

    def _upserts(self, state: _State, page_size: int) -> Iterator[ChangePage]:
        params = self._query(state)
        for rows, more in self.client.pages(self._path(), params, page_size, entity=self.entity):
            if self.settings.mode == "row_version":
                fresh = rows
                if rows:
                    state.rv = max(state.rv, max(int(r[str(self.page.version_field)])
                                                 for r in rows))
            else:
                fresh = self._unseen(state, rows)
            records = self._moved(fresh) + [self.record(r) for r in fresh]
            yield ChangePage(records, state.dump(), more=more)

    def _query(self, state: _State) -> dict[str, str]:
        page = self.page
        if self.settings.mode == "row_version":
            vf = str(page.version_field)
            params = {"$orderby": vf}
            if state.rv:
                params["$filter"] = f"{vf} gt {state.rv}"
            return params
        mf = str(page.modified_field)
        params = {"$orderby": f"{mf},{page.key}"}
        if state.hw is not None:
            since = parse_time(state.hw) - timedelta(seconds=self.settings.overlap)
            params["$filter"] = f"{mf} ge {format_time(since)}"
        return params

    def _unseen(self, state: _State, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        mf = str(self.page.modified_field)
        fresh = []
        for row in rows:
            stamp = format_time(parse_time(str(row[mf])))
            digest = _digest(str(row[self.page.key]), str(row.get("@odata.etag", "")))
            bucket = state.seen.setdefault(stamp, set())
            if digest in bucket:
                continue
            bucket.add(digest)
            fresh.append(row)
            if state.hw is None or parse_time(stamp) > parse_time(state.hw):
                state.hw = stamp
        if state.hw is not None:
            cutoff = parse_time(state.hw) - timedelta(seconds=self.settings.overlap)
            state.seen = {t: d for t, d in state.seen.items() if parse_time(t) >= cutoff}
        return fresh

    def _moved(self, rows: list[dict[str, Any]]) -> list[ChangeRecord]:
        """Index the rows; a row whose change key changed deletes its old key first."""
        if self.index is None or not rows:
            return []
        pk = self.page.key
        before = {t.page_key: t for t in self.index.rows(self.entity,
                                                         [str(r[pk]) for r in rows])}
        self.index.record(self.entity, [IndexRow(str(r[pk]), self._key(r),
                                                 str(self._version(r))) for r in rows])
        out = []
        for row in rows:
            old = before.get(str(row[pk]))
            if old is not None and old.change_key != self._key(row):
                out.append(ChangeRecord(old.change_key, Op.DELETE,
                                        self._delete_version(old.version)))
        return out

    # -- deletions --------------------------------------------------------------------

    def _deletions_due(self, state: _State) -> bool:
        if self.index is None:
            return False
        if self._reconcile_due(state) or self.index.suspects(self.entity):
            return True
        return bool(self.index.pending(self.entity, state.tomb))

    def _reconcile_due(self, state: _State) -> bool:
        if not self.settings.sync_deletion:
            return False
        return state.reconciled is None or \
            self.clock() - state.reconciled >= self.settings.reconcile_interval

    def _deletions(self, state: _State, page_size: int) -> Iterator[ChangePage]:
        if self.index is None:
            return
        self._confirm_suspects()
        if self._reconcile_due(state):
            self._reconcile()
            state.reconciled = self.clock()
        tombs = self.index.pending(self.entity, state.tomb)
        if not tombs:
            return
        live = {self._business(k) for k in map(json.loads, self.index.live_keys(self.entity))}
        for start in range(0, len(tombs), page_size):
            chunk = tombs[start:start + page_size]
            state.tomb = chunk[-1].seq
            records = [ChangeRecord(t.change_key, Op.DELETE, self._delete_version(t.version))
                       for t in chunk
                       if self._business(t.change_key) not in live]
            yield ChangePage(records, state.dump(), more=start + page_size < len(tombs))

    def _confirm_suspects(self) -> None:
        """Ask Business Central for each record a ``deleted`` notification named (GETs in
        ``$batch`` requests of 100): only a 404 makes a tombstone, a record that exists is
        logged and forgotten.

        Raises:
            TransientError: Business Central could not answer for a record (it stays a
                suspect for the next read); see also :meth:`BCClient.request`.
        """
        assert self.index is not None
        suspects = self.index.suspects(self.entity)
        for start in range(0, len(suspects), MAX_BATCH):
            chunk = suspects[start:start + MAX_BATCH]
            path = f"companies({self.client.company_id()})/{self.entity}"
            replies = self.client.batch(
                [{"method": "GET", "url": f"{path}({_url_key(self.page, k)})?$select="
                  f"{self.page.key}"} for k in chunk], api=self.page.api, entity=self.entity)
            status = {k: int(r.get("status") or 500) for k, r in zip(chunk, replies, strict=True)}
            gone = [k for k in chunk if status[k] == 404]
            there = [k for k in chunk if 200 <= status[k] < 300]
            for key in there:
                log.warning("webhook_delete_refuted", connector=self.client.name,
                            entity=self.entity, key=key)
            if gone:
                buried = self.index.tombstone(self.entity, gone)
                log.info("webhook_delete_confirmed", connector=self.client.name,
                         entity=self.entity, count=buried)
            self.index.clear_suspects(self.entity, gone + there)
            unsure = sorted({s for k, s in status.items() if k not in gone and k not in there})
            if unsure:
                raise TransientError(f"{self.where}: Business Central answered {unsure} when "
                                     "asked whether notified deletions happened; asking again "
                                     "next poll", entity=self.entity, status=unsure[0])

    def _reconcile(self) -> None:
        assert self.index is not None
        fields = [*self.key_fields]
        if self.settings.mode == "row_version":  # deletes of back-filled rows need it
            fields.append(str(self.page.version_field))
        params = {"$select": ",".join(dict.fromkeys(fields))}
        live: dict[str, IndexRow] = {}
        for rows, _ in self.client.pages(self._path(), params, KEY_PAGE, entity=self.entity):
            for row in rows:
                pk = str(row[self.page.key])
                live[pk] = IndexRow(pk, self._key(row), str(self._version(row)))
        self.index.reconcile(self.entity, live)

    # -- helpers ----------------------------------------------------------------------

    def _path(self) -> str:
        return self.client.collection(self.page.api, self.entity)

    def _key(self, row: dict[str, Any]) -> dict[str, Any]:
        return {f: row.get(f) for f in self.key_fields}

    def _business(self, key: dict[str, Any]) -> str:
        """The key without a GUID page key: what identifies the record to a target."""
        shown = {k: v for k, v in key.items() if k != self.page.key or not self.page.key_is_guid}
        return json.dumps(shown or key, sort_keys=True)

    def _version(self, row: dict[str, Any]) -> Version:
        if self.settings.mode == "row_version":
            return int(row.get(str(self.page.version_field)) or 0)
        return str(row.get("@odata.etag", ""))

    def _delete_version(self, last: str) -> Version:
        """Row versions: one above the last one seen (never above a later record's);
        ETags: a distinct text."""
        if self.settings.mode == "row_version":
            return int(last or 0) + 1
        return f"{last}|deleted"

    def record(self, row: dict[str, Any]) -> ChangeRecord:
        """A row as an ``Op.UPSERT`` record: the one form of change and fetched records."""
        values = {k: v for k, v in row.items() if not k.startswith("@odata.")}
        mf = self.page.modified_field
        modified = parse_time(str(row[mf])) if mf and row.get(mf) else None
        return ChangeRecord(self._key(row), Op.UPSERT, self._version(row), modified, values)

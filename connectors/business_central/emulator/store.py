"""The emulator's data: companies, table rows, the row-version counter, number series.

Rows live in memory; with a ``path`` every committed transaction is written through to
SQLite (``persist``), so ``--store FILE`` keeps the environment across restarts.

Features
    * One database-wide row-version counter (SQL ``timestamp``): every insert or modify
      takes the next value(s). Tables with Resco's extension take two, because the
      extension copies the row version into ``RowVersionNumber`` and then modifies the
      record again: the stored number lags the real one, yet stays monotonic.
    * ``lastModifiedDateTime`` (``SystemModifiedAt``) from an injectable clock, in
      milliseconds, on every write; ``SystemCreatedAt`` on insert.
    * Opaque ETags ``W/"JzQ0O…"`` derived from the SystemId and the row version.
    * Transactions with savepoints: ``with store.transaction():`` nests; a failing inner
      block is undone alone, a failing outer one undoes everything (``$batch`` with
      ``Isolation: snapshot``). Listeners (webhooks) hear only committed changes.

Configuration
    ``path``: SQLite file or None (memory only). ``clock``: returns an aware UTC
    ``datetime``. ``stale_status``: 409 (default) or 412 for ``Request_EntityChanged``.

Limits
    * One lock serialises every read and write (the emulator is one small server).
    * Business rules live in ``rules``; this module only keeps and versions rows.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.business_central.emulator import errors
from connectors.business_central.emulator.model import TABLES, TableDef
from connectors.business_central.emulator.persist import StoreFile
from connectors.business_central.emulator.records import (
    Change,
    ChangeKind,
    Company,
    Record,
    format_datetime,
    make_etag,
    truncate_ms,
)

__all__ = ["Change", "Company", "Record", "Store", "format_datetime", "make_etag"]

Clock = Callable[[], datetime]


def _discard(rows: dict[str, Record], rid: str) -> None:
    rows.pop(rid, None)


class Store:
    """The environment's database.

    Args:
        path: SQLite file to load from and write through to; None keeps memory only.
        clock: Returns the current UTC time (tests freeze or move it).
        stale_status: HTTP status of ``Request_EntityChanged`` (409; 412 if wanted).
    """

    def __init__(self, *, path: Path | None = None, clock: Clock | None = None,
                 stale_status: int = 409) -> None:
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.stale_status = stale_status
        self.lock = threading.RLock()
        self.counter = 0
        self.companies: dict[str, Company] = {}
        self.listeners: list[Callable[[list[Change]], None]] = []
        self.meta: dict[str, Any] = {}
        self._undo: list[Callable[[], None]] | None = None
        self._changes: list[Change] = []
        self._touched: set[tuple[str, str, str]] = set()
        self._file: StoreFile | None = None
        if path is not None:
            self._file = StoreFile(path)
            self.counter, self.meta, self.companies = self._file.load()

    # -- companies --------------------------------------------------------------------

    def add_company(self, name: str, display_name: str | None = None,
                    company_id: str | None = None) -> Company:
        """Create a company (empty tables, fresh number series).

        Args:
            name: The company name, e.g. ``CRONUS USA, Inc.``.
            display_name: Shown name; default ``name``.
            company_id: Its id; default a new GUID.

        Returns:
            The company.
        """
        with self.transaction():
            company = Company(company_id or str(uuid.uuid4()), name, display_name or name)
            self.companies[company.id] = company
            self._log(lambda: self._forget(company.id))
            self._touched.add((company.id, "", ""))
            return company

    def _forget(self, company_id: str) -> None:
        self.companies.pop(company_id, None)

    def company(self, ref: str) -> Company:
        """The company with id or name ``ref``.

        Raises:
            BCError: 404 when there is no such company.
        """
        found = self.companies.get(ref.lower()) or next(
            (c for c in self.companies.values() if c.name == ref), None)
        if found is None:
            raise errors.not_found(f"company '{ref}'")
        return found

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run a block atomically; nested blocks are savepoints.

        Raises:
            Exception: whatever the block raised, after its changes were undone.
        """
        with self.lock:
            outer = self._undo is None
            if outer:
                self._undo, self._changes, self._touched = [], [], set()
            assert self._undo is not None
            mark, changes_mark = len(self._undo), len(self._changes)
            try:
                yield
            except BaseException:
                while len(self._undo) > mark:
                    self._undo.pop()()
                del self._changes[changes_mark:]
                if outer:
                    self._undo = None
                raise
            if outer:
                changes, self._undo = self._changes, None
                self._persist()
                self._changes = []
                for listener in list(self.listeners):
                    listener(changes)

    def _log(self, undo: Callable[[], None]) -> None:
        assert self._undo is not None, "writes need store.transaction()"
        self._undo.append(undo)

    def next_rv(self, count: int = 1) -> int:
        """Take ``count`` values of the database-wide row-version counter; return the last."""
        old = self.counter
        self._log(lambda: setattr(self, "counter", old))
        self.counter += count
        return self.counter

    def next_number(self, company: Company, table: TableDef) -> str:
        """The next number of ``table``'s series in ``company``."""
        old = company.series.get(table.name, 0)
        n = max(old + table.number_step, table.number_start)
        self._log(lambda: company.series.__setitem__(table.name, old))
        company.series[table.name] = n
        return table.number(n)

    # -- rows -------------------------------------------------------------------------

    def insert(self, company: Company, table: str, values: dict[str, Any], *,
               record_id: str | None = None) -> Record:
        """Store a new row (values already validated), versioned and time-stamped.

        Raises:
            BCError: 400 ``Internal_EntityWithSameKeyExists`` when ``record_id`` exists.
        """
        rows = company.rows(table)
        rid = (record_id or str(uuid.uuid4())).lower()
        if rid in rows:
            raise errors.duplicate_key(table, f"SystemId='{rid}'")
        now = truncate_ms(self.clock())
        rv, resco = self._versions(table)
        record = Record(rid, values, rv, resco, now, now)
        self._put(company, table, record, None)
        self._note(company, table, record, "created", now)
        return record

    def update(self, company: Company, table: str, record: Record, values: dict[str, Any],
               *, if_match: str | None) -> Record:
        """Apply ``values`` to ``record`` after checking ``If-Match``.

        Args:
            if_match: The ETag the client sent, ``*``, or None for a server-side write.

        Raises:
            BCError: 409 (or 412) ``Request_EntityChanged`` when the ETag is stale.
        """
        self.check_etag(record, if_match)
        now = truncate_ms(self.clock())
        rv, resco = self._versions(table)
        new = Record(record.id, {**record.values, **values}, rv, resco, record.created, now)
        self._put(company, table, new, record)
        self._note(company, table, new, "updated", now)
        return new

    def delete(self, company: Company, table: str, record: Record, *,
               if_match: str | None) -> None:
        """Remove ``record`` after checking ``If-Match``.

        Raises:
            BCError: 409 (or 412) ``Request_EntityChanged`` when the ETag is stale.
        """
        self.check_etag(record, if_match)
        rows = company.rows(table)
        del rows[record.id]
        self._log(lambda: rows.__setitem__(record.id, record))
        self._index(company, table, record, add=False)
        self._touched.add((company.id, table, record.id))
        self._note(company, table, record, "deleted", truncate_ms(self.clock()))

    def check_etag(self, record: Record, if_match: str | None) -> None:
        """Compare an ``If-Match`` value with the record's ETag (``*`` and None pass).

        Raises:
            BCError: ``Request_EntityChanged`` when it does not match.
        """
        if if_match is None or if_match.strip() == "*":
            return
        sent = {t.strip() for t in if_match.split(",")}
        current = record.etag
        if current not in sent and current.removeprefix("W/") not in sent:
            raise errors.entity_changed(self.stale_status)

    def _versions(self, table: str) -> tuple[int, int]:
        if TABLES[table].resco_row_version:
            rv = self.next_rv(2)
            return rv, rv - 1
        return self.next_rv(), 0

    def _put(self, company: Company, table: str, record: Record, old: Record | None) -> None:
        rows = company.rows(table)
        rows[record.id] = record
        if old is None:
            self._log(lambda: _discard(rows, record.id))
        else:
            self._index(company, table, old, add=False)
            self._log(lambda: rows.__setitem__(record.id, old))
        self._index(company, table, record, add=True)
        self._touched.add((company.id, table, record.id))

    def _index(self, company: Company, table: str, record: Record, *, add: bool) -> None:
        number = record.values.get("number")
        if not number:
            return
        index, key = company.numbers.setdefault(table, {}), str(number).casefold()
        before = index.get(key)
        if add:
            index[key] = record.id
        elif before == record.id:
            del index[key]
        else:
            return

        def undo() -> None:
            if before is None:
                index.pop(key, None)
            else:
                index[key] = before
        self._log(undo)

    def _note(self, company: Company, table: str, record: Record, kind: ChangeKind,
              at: datetime) -> None:
        number = str(record.values.get("number", ""))
        self._changes.append(Change(company.id, table, record.id, kind, at, number))

    def set_meta(self, key: str, value: Any) -> None:
        """Keep a JSON value (webhook subscriptions…) in the store, persisted on commit."""
        old = self.meta.get(key)
        self._log(lambda: self.meta.__setitem__(key, old))
        self.meta[key] = value
        self._touched.add(("", "meta", key))

    # -- persistence ------------------------------------------------------------------

    def _persist(self) -> None:
        touched, self._touched = self._touched, set()
        if self._file is not None and touched:
            self._file.save(self.counter, self.meta, self.companies, touched)

    def close(self) -> None:
        """Close the SQLite file (memory stays usable)."""
        if self._file is not None:
            self._file.close()
            self._file = None

"""The ``--store`` file: a SQLite copy of the environment, written through on commit.

Features
    * Tables ``meta`` (the row-version counter, subscriptions…), ``companies`` (name,
      number series) and ``rows`` (one JSON document per record).
    * :meth:`StoreFile.save` writes only what a transaction touched, in one SQLite
      transaction.

Configuration
    The file path.

Limits
    * One process per file (no locking between emulators).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from connectors.business_central.emulator.records import Company, Record

__all__ = ["StoreFile"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS companies (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (company TEXT NOT NULL, tbl TEXT NOT NULL, id TEXT NOT NULL,
                                 data TEXT NOT NULL, PRIMARY KEY (company, tbl, id));
"""


class StoreFile:
    """The SQLite file behind a store.

    Args:
        path: The file (created with its folder if missing).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)

    def load(self) -> tuple[int, dict[str, Any], dict[str, Company]]:
        """Read everything.

        Returns:
            The row-version counter, the meta values and the companies with their rows.
        """
        counter, meta, companies = 0, {}, {}
        for k, v in self._db.execute("SELECT k, v FROM meta"):
            if k == "counter":
                counter = int(v)
            else:
                meta[k] = json.loads(v)
        for cid, data in self._db.execute("SELECT id, data FROM companies"):
            info = json.loads(data)
            companies[cid] = Company(cid, info["name"], info["display_name"],
                                     info.get("business_profile_id", ""),
                                     series=info.get("series", {}))
        for cid, tbl, rid, data in self._db.execute("SELECT company, tbl, id, data FROM rows"):
            record = Record.from_json(json.loads(data))
            company = companies[cid]
            company.rows(tbl)[rid] = record
            if record.values.get("number"):
                company.numbers.setdefault(tbl, {})[str(record.values["number"]).casefold()] = rid
        return counter, meta, companies

    def save(self, counter: int, meta: dict[str, Any], companies: dict[str, Company],
             touched: set[tuple[str, str, str]]) -> None:
        """Write what a transaction touched: ``(company, table, id)`` rows, companies,
        and ``("", "meta", key)`` meta values."""
        db = self._db
        db.execute("BEGIN")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('counter', ?)", (str(counter),))
        for cid in {cid for cid, tbl, _ in touched if tbl != "meta"}:
            company = companies.get(cid)
            if company is not None:
                db.execute("INSERT OR REPLACE INTO companies VALUES (?, ?)", (cid, json.dumps({
                    "name": company.name, "display_name": company.display_name,
                    "business_profile_id": company.business_profile_id,
                    "series": company.series})))
        for cid, tbl, rid in touched:
            if tbl == "meta":
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           (rid, json.dumps(meta.get(rid))))
                continue
            company = companies.get(cid)
            if company is None or not tbl:
                continue
            record = company.rows(tbl).get(rid)
            if record is None:
                db.execute("DELETE FROM rows WHERE company = ? AND tbl = ? AND id = ?",
                           (cid, tbl, rid))
            else:
                db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?)",
                           (cid, tbl, rid, json.dumps(record.to_json())))
        db.execute("COMMIT")

    def close(self) -> None:
        """Close the file."""
        self._db.close()

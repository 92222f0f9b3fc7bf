"""Microsoft Dataverse (Dynamics 365) as a syncbus source and target, over the Web API.

Features
    * Auth through MSAL: client credentials with a secret or a certificate, or an
      operator's device-code sign-in (``connectors.dataverse.auth.login``); tokens are
      renewed before they expire and the cache file is owner-only. No secret appears
      in logs, errors or ``repr``.
    * Detection by change tracking (``changes.py``): the delta link is the cursor,
      ``$deletedEntity`` entries become deletes, an expired token triggers a full
      resync that finds the deletes of the gap by key-set comparison (and warns).
    * Reads at the largest page size (5,000); ``describe`` from ``EntityDefinitions``:
      types, primary id, alternate keys (``unique_keys``), lookups (``references``),
      required levels, ``ChangeTrackingEnabled``.
    * ``fetch`` reads rows by primary id or alternate key, 50 keys per ``$filter`` query
      (``fetch.py``), in exactly the form of the change feed.
    * Writes (``writer.py``): upserts by primary id or alternate key (``WriteRow.key``
      tells which) as ``UpsertMultiple`` bulk messages (a refused one is bisected so
      only the bad record fails), or through ``$batch`` where a table lacks them;
      deletes through ``$batch``; lookups as ``@odata.bind`` (``convert.py``);
      per-row outcomes; 429/503/time-outs retried with tenacity through a throttle
      shared by every writer to the same organisation.

Configuration
    ``DataverseConnection`` in ``schemas/config.py``: ``url``, ``tenant_id``,
    ``client_id``, ``client_secret`` or ``certificate_path`` (+ ``certificate_thumbprint``),
    ``authority_host``, ``ca_bundle``, ``timeout``, ``batch_size``, ``bulk_size``, ``page_size``,
    ``entities``, ``state_dir``, ``retry_attempts``, ``max_retry_wait``, ``rate_limit``.
    Entities are table logical names (``account``); entity set names are accepted too.

Limits
    * Tables must have change tracking enabled to be sources (Dataverse setting).
    * A Dataverse-sourced link should use the primary id as its key: deletes carry
      only the id.
    * See ``changes.py``, ``writer.py`` and ``keyset.py`` for their own limits.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from connectors._http import HttpPermanentError, HttpRecordRejected
from connectors._scratch import copy_file
from connectors.base import (
    Capabilities,
    ChangePage,
    ConfigError,
    EntityInfo,
    FetchedRecord,
    Outcome,
    SchemaError,
    Version,
    WriteRow,
)
from connectors.dataverse.auth import token_cache_path
from connectors.dataverse.changes import ChangeReader
from connectors.dataverse.client import DataverseClient
from connectors.dataverse.fetch import Fetcher
from connectors.dataverse.keyset import KeySet
from connectors.dataverse.metadata import ENTITY_QUERY, TableMeta, parse_table
from connectors.dataverse.writer import Writer
from connectors.features import ScratchCopy
from schemas.config import DataverseConnection

__all__ = ["DataverseConnector"]


class DataverseConnector:
    """A Dataverse organisation (Web API v9.2).

    Args:
        name: The connection's name (messages, token cache and key-set file names).
        **settings: The fields of ``DataverseConnection`` (``url``, ``tenant_id``,
            ``client_id``, ``client_secret``…), as the registry passes them.

    Raises:
        ConfigError: a setting is missing or invalid, or the CA bundle is unreadable.
    """

    def __init__(self, name: str, **settings: Any) -> None:
        self.name = name
        try:
            self.config = DataverseConnection.model_validate({"type": "dataverse", **settings})
        except ValidationError as exc:
            problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise ConfigError(f"connection {name!r}: invalid Dataverse settings", problems) from None
        cfg = self.config
        self.client = DataverseClient(
            name, url=cfg.url, oauth=cfg, timeout=cfg.timeout, ca_bundle=cfg.ca_bundle,
            cache_path=token_cache_path(name, cfg.state_dir), attempts=cfg.retry_attempts,
            max_wait=cfg.max_retry_wait, rate_limit=cfg.rate_limit)
        self._keys: KeySet | None = None
        self._reader: ChangeReader | None = None
        self.writer = Writer(name, self.client, cfg.batch_size, self._entity_sets,
                             bulk_size=cfg.bulk_size)
        self.fetcher = Fetcher(name, self.client, cfg.page_size)
        self._tables: dict[str, TableMeta] = {}
        self._sets: dict[str, str] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<DataverseConnector {self.name!r} {self.config.url}>"

    @property
    def capabilities(self) -> Capabilities:
        """Change tracking with deletes, alternate keys, ``batch_size`` per ``$batch``; its
        key set and token cache can be read through a scratch copy."""
        return Capabilities(change_tracking=True, deletes_tracked=True, alternate_keys=True,
                            max_batch=self.config.batch_size, rate_limit=self.config.rate_limit,
                            scratch_copy=True)

    @property
    def reader(self) -> ChangeReader:
        """The change reader (opens the key-set file on first use)."""
        with self._lock:
            if self._reader is None:
                self._keys = KeySet(self._state_path("keys.db"))
                self._reader = ChangeReader(self.name, self.client, self._keys,
                                            self.config.page_size)
            return self._reader

    # -- metadata ------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """``WhoAmI``: the caller's user, business unit and organisation ids.

        Raises:
            ConnectorUnavailable: the organisation cannot be reached.
            PermanentError: the credentials are refused.
        """
        return self.client.get_json("WhoAmI")

    def describe(self, entities: Sequence[str] | None = None) -> list[EntityInfo]:
        """Metadata of ``entities`` (default: the ``entities`` setting, else every table).

        Args:
            entities: Table logical names (entity set names are accepted).

        Returns:
            One ``EntityInfo`` per table, fetched afresh.

        Raises:
            SchemaError: a named table does not exist.
            ConnectorUnavailable: the organisation cannot be reached.
        """
        names = list(entities) if entities is not None else self.config.entities
        if names is None:
            data = self.client.get_json("EntityDefinitions", params=ENTITY_QUERY)
            tables = [parse_table(item) for item in data.get("value") or ()]
            with self._lock:
                self._tables.update({t.logical_name: t for t in tables})
                self._sets = {t.logical_name: t.entity_set for t in tables}
            return [t.info() for t in tables]
        return [self._load(name).info() for name in names]

    def table(self, entity: str) -> TableMeta:
        """The cached metadata of ``entity`` (loaded on first use).

        Raises:
            SchemaError: no such table.
        """
        table = self._tables.get(entity)
        return table if table is not None else self._load(entity)

    def _load(self, entity: str) -> TableMeta:
        sets = self._entity_sets()
        logical = entity if entity in sets else next(
            (name for name, set_name in sets.items() if set_name == entity), None)
        if logical is None:
            hint = difflib.get_close_matches(entity, list(sets), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SchemaError(f"{self.name}: no table {entity!r} in {self.config.url}"
                              f"{did_you_mean}", entity=entity)
        try:
            data = self.client.get_json(f"EntityDefinitions(LogicalName='{logical}')",
                                        params=ENTITY_QUERY, entity=logical)
        except (HttpRecordRejected, HttpPermanentError) as exc:
            raise SchemaError(f"{self.name}: cannot read the metadata of {logical!r}: "
                              f"{exc.message}", entity=logical) from exc
        table = parse_table(data)
        with self._lock:
            self._tables[logical] = table
            if entity != logical:
                self._tables[entity] = table
        return table

    def _entity_sets(self) -> dict[str, str]:
        """Logical name → entity set of every table (one request, cached)."""
        if self._sets is None:
            data = self.client.get_json("EntityDefinitions",
                                        params={"$select": "LogicalName,EntitySetName"})
            self._sets = {str(i["LogicalName"]): str(i["EntitySetName"])
                          for i in data.get("value") or () if i.get("EntitySetName")}
        return self._sets

    def _tracked(self, entity: str) -> TableMeta:
        table = self.table(entity)
        if not table.change_tracking:
            raise SchemaError(f"{self.name}: table {table.logical_name!r} does not have change "
                              "tracking enabled (Dataverse: table properties → Advanced "
                              "options → Track changes)", entity=entity)
        return table

    # -- change feed -------------------------------------------------------------------------

    def has_changes(self, entity: str, cursor: str | None) -> bool:
        """One ``$count`` on the delta link: False only when surely nothing changed.

        Raises:
            SchemaError: unknown table, tracking disabled, or a foreign cursor.
            ConnectorUnavailable: the organisation cannot be reached.
        """
        return self.reader.has_changes(self._tracked(entity), cursor)

    def read_changes(self, entity: str, cursor: str | None, page_size: int) -> Iterator[ChangePage]:
        """Pages of changes after ``cursor`` (see ``connectors.dataverse.changes``).

        Args:
            entity: Table logical name.
            cursor: A ``next_cursor`` of an earlier page, or None (initial load).
            page_size: Ignored: Dataverse pages follow the ``page_size`` setting.

        Raises:
            SchemaError: unknown table, tracking disabled, or a foreign cursor.
            ConnectorUnavailable: the organisation cannot be reached.
            TransientError: 429/5xx after the retries.
        """
        table = self._tracked(entity)
        self.reader.decode(entity, cursor)  # a foreign cursor fails now, not at first page
        return self.reader.pages(table, cursor)

    def snapshot(self, entity: str) -> Iterator[tuple[dict[str, Any], Version]]:
        """(key, versionnumber) of every row.

        Raises:
            SchemaError: unknown table.
            ConnectorUnavailable: the organisation cannot be reached.
        """
        return self.reader.snapshot(self.table(entity))

    def fetch(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[FetchedRecord | None]:
        """Read the current rows with ``keys`` (primary id or alternate key), 50 per query.

        Values, version (``versionnumber``) and ``modified_at`` (``modifiedon``) are as
        ``read_changes`` gives them; ``key`` is the primary id. The table need not have
        change tracking.

        Returns:
            One entry per key, in order (duplicates allowed): the row, or None where
            none exists (also for a primary id that is not a GUID).

        Raises:
            SchemaError: unknown table, or a key that is neither the primary id nor an
                alternate key (an unknown column included).
            ConnectorUnavailable: the organisation cannot be reached.
            TransientError: 429/5xx after the retries.
        """
        return self.fetcher.fetch(self.table(entity), keys) if keys else []

    # -- writing ----------------------------------------------------------------------------

    def upsert(self, entity: str, rows: Sequence[WriteRow]) -> list[Outcome]:
        """Upsert ``rows`` by primary id or alternate key; one outcome per row, in order.

        Raises:
            SchemaError: unknown table.
            ConnectorUnavailable: nothing could be sent.
        """
        return self.writer.upsert(self.table(entity), rows)

    def delete(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[Outcome]:
        """Delete rows by primary id or alternate key (a missing row counts as applied).

        Raises:
            SchemaError: unknown table.
            ConnectorUnavailable: nothing could be sent.
        """
        return self.writer.delete(self.table(entity), keys)

    def close(self) -> None:
        """Close the HTTP connections and the key-set file (both reopen on next use)."""
        self.client.close()
        with self._lock:
            if self._keys is not None:
                self._keys.close()
            self._keys = self._reader = None

    def scratch_copy(self, scratch_dir: Path) -> ScratchCopy:
        """Settings that use a copy of the key set and token cache, in ``scratch_dir``.

        Reading changes after an expired delta token moves the key set on (it finds
        the deletes of the gap), so ``syncbus preview`` reads through a copy.
        """
        copy = scratch_dir / f"dataverse-{self.name}"
        copy.mkdir()
        for suffix in ("keys.db", "tokens.json"):
            original = self._state_path(suffix)
            if original.exists():
                copy_file(original, copy / original.name)
        return ScratchCopy(self.config.model_copy(update={"state_dir": str(copy)}))

    def _state_path(self, suffix: str) -> Path:
        return Path(self.config.state_dir) / f"{self.name}.{suffix}"

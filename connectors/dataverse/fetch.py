"""Reading current rows by key: ``DataverseConnector.fetch``.

Keys (the primary id or an alternate key, the forms ``upsert`` takes) are grouped by
their columns and read ``FETCH_CHUNK`` at a time, one query per chunk::

    GET accounts?$select=<every column>&$filter=accountid eq … or accountid eq …

following ``@odata.nextLink`` when the page size is smaller than the chunk. Rows
become records through the change feed's own code (``changes.upsert_record``), so a
fetched record and a change record of the same row hold the same values, version
and modification time.

Features
    * Text key values match case-insensitively, as Dataverse's collation does:
      ``{"accountnumber": "a-1"}`` finds the row whose number is ``A-1``.
    * A key value that cannot be a value of its column (a primary id that is not a
      GUID) names no row: its entry is None, like a key that matches nothing.

Configuration
    ``page_size`` (``odata.maxpagesize``) of the connection.

Limits
    * A chunk's ``$filter`` is kept under ``MAX_FILTER`` characters, so long
      alternate-key values make smaller chunks (more requests).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from connectors.base import FetchedRecord, SchemaError, group_keys
from connectors.dataverse.changes import ANNOTATIONS, upsert_record
from connectors.dataverse.client import DataverseClient
from connectors.dataverse.convert import ConversionError, filter_literal, key_value
from connectors.dataverse.metadata import AttributeMeta, TableMeta

__all__ = ["FETCH_CHUNK", "Fetcher", "MAX_FILTER"]

#: Keys per query.
FETCH_CHUNK = 50
#: Longest ``$filter`` of one query, URL-encoded (Dataverse takes URLs up to 32 KB).
MAX_FILTER = 8000
#: Characters of a filter left as they are in the URL.
_SAFE = "'(),:-."

#: A key's values in their JSON form, in the group's column order.
_Wanted = tuple[Any, ...]


class Fetcher:
    """Reads rows by key from one organisation.

    Args:
        name: The connection name, for messages.
        client: The organisation's client.
        page_size: ``odata.maxpagesize``.
    """

    def __init__(self, name: str, client: DataverseClient, page_size: int) -> None:
        self.name, self.client, self.page_size = name, client, page_size

    def fetch(self, table: TableMeta, keys: Sequence[dict[str, Any]]) -> list[FetchedRecord | None]:
        """One entry per key, in order: the current row, or None.

        Raises:
            SchemaError: a key is neither the primary id nor an alternate key.
            ConnectorUnavailable: the organisation cannot be reached.
            TransientError: 429/5xx after the retries.
            PermanentError: Dataverse refused the query.
        """
        groups = group_keys(keys, lambda cols: self._check(table, cols),
                            lambda cols, key: _wanted(table, cols, key))
        result: list[FetchedRecord | None] = [None] * len(keys)
        for cols, by_index in groups.items():
            found = self._read(table, [table.attributes[c] for c in cols], set(by_index.values()))
            for i, wanted in by_index.items():
                result[i] = found.get(_fold(wanted))
        return result

    def _check(self, table: TableMeta, cols: tuple[str, ...]) -> None:
        if set(cols) == {table.primary_id} or (
                cols and table.is_key(cols) is not None and set(cols) <= table.attributes.keys()):
            return
        unknown = [c for c in cols if c not in table.attributes]
        if unknown:
            raise SchemaError(f"{self.name}: table {table.logical_name!r} has no column(s) "
                              f"{', '.join(unknown)}", entity=table.logical_name)
        keys = ", ".join("(" + ", ".join(k) + ")" for k in table.keys) or "none"
        raise SchemaError(
            f"{self.name}: cannot fetch by ({', '.join(cols)}): neither the primary id "
            f"({table.primary_id}) nor an alternate key of {table.logical_name} "
            f"(alternate keys: {keys})", entity=table.logical_name)

    def _read(self, table: TableMeta, attrs: list[AttributeMeta],
              wanted: set[_Wanted]) -> dict[_Wanted, FetchedRecord]:
        """The rows whose ``attrs`` are among ``wanted``, by their folded key values."""
        found: dict[_Wanted, FetchedRecord] = {}
        prefer = f"odata.maxpagesize={self.page_size},{ANNOTATIONS}"
        for where in _filters(attrs, sorted(wanted, key=repr)):
            link: str | None = f"{table.entity_set}?$select={table.select()}&$filter={where}"
            while link:
                data = self.client.get_json(link, entity=table.logical_name, prefer=prefer)
                for item in data.get("value") or ():
                    try:
                        match = _fold(tuple(key_value(a, item.get(a.property_name)) for a in attrs))
                    except ConversionError:
                        continue  # a row whose key is null cannot be the one asked for
                    record = upsert_record(table, item)
                    found[match] = FetchedRecord(key=record.key, values=record.values or {},
                                                 version=record.version,
                                                 modified_at=record.modified_at)
                next_link = data.get("@odata.nextLink")
                link = self.client.relative(str(next_link)) if next_link else None
        return found


def _wanted(table: TableMeta, cols: tuple[str, ...], key: dict[str, Any]) -> _Wanted | None:
    """The key's values in their JSON form; None when one does not fit its column."""
    try:
        return tuple(key_value(table.attributes[c], key[c]) for c in cols)
    except ConversionError:
        return None


def _fold(values: _Wanted) -> _Wanted:
    """Key values as Dataverse compares them: text case-insensitively."""
    return tuple(v.casefold() if isinstance(v, str) else v for v in values)


def _filters(attrs: list[AttributeMeta], wanted: list[_Wanted]) -> Iterator[str]:
    """URL-encoded ``$filter`` texts, each of at most ``FETCH_CHUNK`` keys and
    ``MAX_FILTER`` characters (a single longer key still gets its own)."""
    terms: list[str] = []
    size = 0
    for values in wanted:
        parts = [f"{a.property_name} eq {filter_literal(a, v)}"
                 for a, v in zip(attrs, values, strict=True)]
        term = parts[0] if len(parts) == 1 else "(" + " and ".join(parts) + ")"
        encoded = urllib.parse.quote(term, safe=_SAFE)
        if terms and (len(terms) == FETCH_CHUNK or size + len(encoded) + 8 > MAX_FILTER):
            yield "%20or%20".join(terms)
            terms, size = [], 0
        terms.append(encoded)
        size += len(encoded) + 8
    if terms:
        yield "%20or%20".join(terms)

"""Reading current records by key: ``BusinessCentralConnector.fetch``.

Keys are grouped by their fields (the page key ``id``/``No``, ``number``, the
configured ``key``, or any fields an upsert could look records up by) and read
``FETCH_CHUNK`` at a time, one query per chunk, following ``@odata.nextLink``::

    GET …/customers?$filter=number eq 'C001' or number eq 'C002'

Business Central refuses ``or`` between different fields, so a key of several fields
is asked for field by field, ``(a eq 1 or a eq 3) and (b eq 2 or b eq 4)``, and the
rows are matched to the keys here. Rows become records through the change feed's own
``ChangeFeed.record``: same change key, values, version (row version or ETag, as the
entity is detected) and modification time.

Features
    * Key values are converted as upserts convert them (``"7"`` finds number 7) and
      text matches case-insensitively, as Business Central's collation does.
    * A key value that cannot be a value of its field, or a key that matches more
      than one record (a field that is not unique), gives None (the latter is logged
      as ``bc_fetch_ambiguous_key``).

Configuration
    None (``page_size`` of the :class:`Fetcher`: rows asked for per response).

Limits
    * A chunk's ``$filter`` is kept under ``MAX_FILTER`` characters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import structlog

from connectors.base import FetchedRecord, SchemaError, group_keys
from connectors.business_central.client import BCClient
from connectors.business_central.detection import ChangeFeed
from connectors.business_central.metadata import PageInfo
from connectors.business_central.writer import key_literal, key_value

__all__ = ["FETCH_CHUNK", "FETCH_PAGE", "Fetcher", "MAX_FILTER"]

log = structlog.get_logger(__name__)

#: Keys per query.
FETCH_CHUNK = 50
#: Rows per response asked for (``odata.maxpagesize``).
FETCH_PAGE = 1000
#: Longest ``$filter`` of one query (characters before URL encoding).
MAX_FILTER = 6000

#: A key as (its ``$filter`` literals, its comparable values), in field order.
_Key = tuple[tuple[str, ...], tuple[Any, ...]]


class Fetcher:
    """Reads records by key from one company.

    Args:
        client: The environment.
        page_size: Rows per response asked for.
    """

    def __init__(self, client: BCClient, page_size: int = FETCH_PAGE) -> None:
        self.client, self.page_size = client, page_size

    def fetch(self, feed: ChangeFeed, keys: Sequence[dict[str, Any]]) -> list[FetchedRecord | None]:
        """One entry per key, in order: the current record, or None.

        Raises:
            SchemaError: a key names a field the entity does not have (or no field).
            ConnectorUnavailable, TransientError, PermanentError: from the client.
        """
        page = feed.page
        groups = group_keys(keys, lambda fields: _check(self.client.name, page, fields),
                            lambda fields, key: _wanted(page, fields, key))
        result: list[FetchedRecord | None] = [None] * len(keys)
        for fields, by_index in groups.items():
            distinct = {match: lits for lits, match in by_index.values()}
            found = self._read(feed, fields, distinct)
            for i, (_, match) in by_index.items():
                result[i] = found.get(match)
        return result

    def _read(self, feed: ChangeFeed, fields: tuple[str, ...],
              wanted: dict[tuple[Any, ...], tuple[str, ...]]) -> dict[tuple[Any, ...], FetchedRecord]:
        """The records whose ``fields`` match ``wanted`` (comparable values → literals)."""
        page = feed.page
        path = self.client.collection(page.api, page.entity_set)
        found: dict[tuple[Any, ...], FetchedRecord] = {}
        owner: dict[tuple[Any, ...], Any] = {}  # the page key of the record found per key
        ambiguous: set[tuple[Any, ...]] = set()
        for where in _filters(fields, list(wanted.items())):
            for rows, _ in self.client.pages(path, {"$filter": where}, self.page_size,
                                             entity=page.entity_set):
                for row in rows:
                    try:
                        match = tuple(key_value(page, f, row.get(f)) for f in fields)
                    except ValueError:
                        continue
                    if match not in wanted:
                        continue  # a combination of one key's field with another's
                    if owner.setdefault(match, row.get(page.key)) != row.get(page.key):
                        ambiguous.add(match)
                    change = feed.record(row)
                    found[match] = FetchedRecord(key=change.key, values=change.values or {},
                                                 version=change.version,
                                                 modified_at=change.modified_at)
        for match in ambiguous:
            log.warning("bc_fetch_ambiguous_key", connector=self.client.name,
                        entity=page.entity_set, fields=list(fields))
            del found[match]
        return found


def _check(connector: str, page: PageInfo, fields: tuple[str, ...]) -> None:
    unknown = [f for f in fields if f not in page.fields]
    if unknown or not fields:
        raise SchemaError(
            f"{connector}: {page.entity_set} has no field(s) {', '.join(unknown) or '(none given)'} "
            f"to fetch records by (key {page.key!r}"
            f"{f', number {page.number_field!r}' if page.number_field else ''})",
            entity=page.entity_set)


def _wanted(page: PageInfo, fields: tuple[str, ...], key: dict[str, Any]) -> _Key | None:
    try:
        return (tuple(key_literal(page, f, key[f]) for f in fields),
                tuple(key_value(page, f, key[f]) for f in fields))
    except ValueError:
        return None


def _filters(fields: tuple[str, ...],
             wanted: list[tuple[tuple[Any, ...], tuple[str, ...]]]) -> Iterator[str]:
    """``$filter`` texts of at most ``FETCH_CHUNK`` keys and about ``MAX_FILTER``
    characters each: one ``or`` list per field, joined by ``and``."""
    start = 0
    while start < len(wanted):
        end, size = start, 0
        while end < len(wanted) and end - start < FETCH_CHUNK and (
                end == start or size < MAX_FILTER):
            size += sum(len(f) + len(lit) + 8 for f, lit in zip(fields, wanted[end][1], strict=True))
            end += 1
        chunk = [lits for _, lits in wanted[start:end]]
        parts = []
        for position, name in enumerate(fields):
            literals = dict.fromkeys(lits[position] for lits in chunk)
            parts.append(" or ".join(f"{name} eq {lit}" for lit in literals))
        yield parts[0] if len(parts) == 1 else " and ".join(f"({p})" for p in parts)
        start = end

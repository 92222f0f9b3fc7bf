"""The key index: which records of an entity the connector has seen, for deletions.

Business Central reports a deletion only as an id (webhook ``deleted``) or not at all
(reconciliation must notice a missing key), so the connector remembers, per entity
with deletion detection, each record's page key (``id`` / ``No``), its change key
(``{"id", "number", …}``) and its last version. Deletions become *tombstones* with a
sequence number; the change cursor says up to which sequence the deletions were
published, so a crash between reading and publishing re-publishes them — never loses
them. A webhook ``deleted`` notification is only a *suspect* until the detector has
seen Business Central answer 404 for the record; suspects are kept here too, so a
crash between the notification and the check loses none.

Features
    * ``record`` (seen rows), ``tombstone`` (confirmed deletions), ``reconcile`` (diff
      with the live key set; back-fills rows the index did not know), ``pending`` and
      ``purge`` (tombstones after / up to a cursor's sequence), ``suspect`` /
      ``suspects`` / ``clear_suspects`` (deletions a notification claims, to confirm).
    * SQLAlchemy Core: a SQLite file by default, PostgreSQL when workers share it.

Configuration
    ``index_url`` of the connection (default ``sqlite:///.syncbus/bc-<name>.db``).

Limits
    * Records deleted before they were ever indexed cannot be reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from connectors._scratch import copy_file
from connectors.base import ConfigError, ConnectorUnavailable

__all__ = ["IndexRow", "KeyIndex", "Tombstone", "copy_index", "default_index_url",
           "shown_url"]

_META = sa.MetaData()
_KEYS = sa.Table(
    "bc_key_index", _META,
    sa.Column("connection", sa.String(64), primary_key=True),
    sa.Column("entity", sa.String(128), primary_key=True),
    sa.Column("page_key", sa.String(200), primary_key=True),
    sa.Column("change_key", sa.Text, nullable=False),
    sa.Column("version", sa.String(200), nullable=False),
    sa.Column("deleted_seq", sa.BigInteger, nullable=True),
)
_SUSPECTS = sa.Table(
    "bc_delete_suspects", _META,
    sa.Column("connection", sa.String(64), primary_key=True),
    sa.Column("entity", sa.String(128), primary_key=True),
    sa.Column("page_key", sa.String(200), primary_key=True),
)
_SEQ = sa.Table(
    "bc_key_index_seq", _META,
    sa.Column("connection", sa.String(64), primary_key=True),
    sa.Column("entity", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True, slots=True)
class IndexRow:
    """A seen record: page key, change key and last version."""

    page_key: str
    change_key: dict[str, Any]
    version: str


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A deletion waiting to be published."""

    seq: int
    page_key: str
    change_key: dict[str, Any]
    version: str


class KeyIndex:
    """The key index of one connection.

    Args:
        connection: The connection name (rows are kept per connection).
        url: SQLAlchemy URL.

    Raises:
        ConfigError: the URL cannot be used.
    """

    def __init__(self, connection: str, url: str) -> None:
        self.connection = connection
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigError(f"connection {connection!r}: index_url is not a SQLAlchemy "
                              "URL") from exc
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        sqlite = parsed.get_backend_name() == "sqlite"
        self._engine = sa.create_engine(parsed, connect_args={"timeout": 30} if sqlite else {})
        self._ready = False

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        try:
            if not self._ready:
                _META.create_all(self._engine)
                self._ready = True
            with self._engine.begin() as conn:
                yield conn
        except sa.exc.OperationalError as exc:
            raise ConnectorUnavailable(f"{self.connection}: key index unavailable: "
                                       f"{exc.orig}") from exc

    def _where(self, entity: str) -> Any:
        return sa.and_(_KEYS.c.connection == self.connection, _KEYS.c.entity == entity)

    def record(self, entity: str, rows: Sequence[IndexRow]) -> None:
        """Remember seen records (a re-seen tombstoned key is alive again)."""
        if not rows:
            return
        with self._begin() as conn:
            known = self._known(conn, entity, [r.page_key for r in rows])
            new = [r for r in rows if r.page_key not in known]
            if new:
                conn.execute(_KEYS.insert(), [self._values(entity, r) for r in new])
            for r in rows:
                if r.page_key in known:
                    conn.execute(_KEYS.update().where(
                        self._where(entity), _KEYS.c.page_key == r.page_key).values(
                        change_key=json.dumps(r.change_key, sort_keys=True),
                        version=r.version, deleted_seq=None))

    def tombstone(self, entity: str, page_keys: Iterable[str]) -> int:
        """Mark known, live records as deleted (webhook ``deleted``).

        Returns:
            How many records became tombstones (unknown keys are ignored).
        """
        keys = list(dict.fromkeys(page_keys))
        with self._begin() as conn:
            live = self._known(conn, entity, keys, live_only=True)
            return self._bury(conn, entity, [k for k in keys if k in live])

    def suspect(self, entity: str, page_keys: Iterable[str]) -> int:
        """Note deletions a webhook claims, to be confirmed by the detector.

        Returns:
            How many known, live records became suspects (unknown keys are ignored).
        """
        keys = list(dict.fromkeys(page_keys))
        with self._begin() as conn:
            live = self._known(conn, entity, keys, live_only=True)
            noted = self._suspected(conn, entity, list(live))
            fresh = [k for k in keys if k in live and k not in noted]
            if fresh:
                conn.execute(_SUSPECTS.insert(), [
                    {"connection": self.connection, "entity": entity, "page_key": k}
                    for k in fresh])
            return len(fresh)

    def suspects(self, entity: str) -> list[str]:
        """Page keys whose deletion a webhook claimed and nobody confirmed yet."""
        with self._begin() as conn:
            return list(conn.execute(sa.select(_SUSPECTS.c.page_key).where(
                _SUSPECTS.c.connection == self.connection, _SUSPECTS.c.entity == entity)
                .order_by(_SUSPECTS.c.page_key)).scalars().all())

    def clear_suspects(self, entity: str, page_keys: Sequence[str]) -> None:
        """Forget suspects once they were confirmed or refuted."""
        with self._begin() as conn:
            for start in range(0, len(page_keys), 500):
                conn.execute(_SUSPECTS.delete().where(
                    _SUSPECTS.c.connection == self.connection, _SUSPECTS.c.entity == entity,
                    _SUSPECTS.c.page_key.in_(page_keys[start:start + 500])))

    def reconcile(self, entity: str, live: dict[str, IndexRow]) -> int:
        """Diff the index with the live key set: missing keys become tombstones, keys the
        index never saw are added.

        Returns:
            How many tombstones were made.
        """
        with self._begin() as conn:
            rows = conn.execute(sa.select(_KEYS.c.page_key).where(
                self._where(entity), _KEYS.c.deleted_seq.is_(None))).scalars().all()
            indexed = set(rows)
            gone = [k for k in indexed if k not in live]
            new = [r for k, r in live.items() if k not in indexed]
            if new:
                revived = self._known(conn, entity, [r.page_key for r in new])
                conn.execute(_KEYS.delete().where(self._where(entity),
                                                  _KEYS.c.page_key.in_(revived)))
                conn.execute(_KEYS.insert(), [self._values(entity, r) for r in new])
            return self._bury(conn, entity, gone)

    def rows(self, entity: str, page_keys: Sequence[str]) -> list[IndexRow]:
        """The live index rows of ``page_keys`` (unknown keys are left out)."""
        out: list[IndexRow] = []
        with self._begin() as conn:
            for start in range(0, len(page_keys), 500):
                found = conn.execute(sa.select(_KEYS.c.page_key, _KEYS.c.change_key,
                                               _KEYS.c.version).where(
                    self._where(entity), _KEYS.c.deleted_seq.is_(None),
                    _KEYS.c.page_key.in_(page_keys[start:start + 500]))).all()
                out += [IndexRow(k, json.loads(c), v) for k, c, v in found]
        return out

    def pending(self, entity: str, after: int) -> list[Tombstone]:
        """Tombstones with a sequence above ``after``, in sequence order."""
        with self._begin() as conn:
            rows = conn.execute(sa.select(_KEYS.c.deleted_seq, _KEYS.c.page_key,
                                          _KEYS.c.change_key, _KEYS.c.version).where(
                self._where(entity), _KEYS.c.deleted_seq > after).order_by(
                _KEYS.c.deleted_seq)).all()
        return [Tombstone(int(s), k, json.loads(c), v) for s, k, c, v in rows]

    def live_keys(self, entity: str) -> set[str]:
        """Change keys (canonical JSON) of the live records."""
        with self._begin() as conn:
            return set(conn.execute(sa.select(_KEYS.c.change_key).where(
                self._where(entity), _KEYS.c.deleted_seq.is_(None))).scalars().all())

    def purge(self, entity: str, upto: int) -> None:
        """Forget tombstones published up to sequence ``upto``."""
        with self._begin() as conn:
            conn.execute(_KEYS.delete().where(self._where(entity), _KEYS.c.deleted_seq <= upto))

    def close(self) -> None:
        """Close the index's connections."""
        self._engine.dispose()

    def _known(self, conn: sa.Connection, entity: str, keys: list[str], *,
               live_only: bool = False) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            query = sa.select(_KEYS.c.page_key).where(
                self._where(entity), _KEYS.c.page_key.in_(keys[start:start + 500]))
            if live_only:
                query = query.where(_KEYS.c.deleted_seq.is_(None))
            found.update(conn.execute(query).scalars().all())
        return found

    def _suspected(self, conn: sa.Connection, entity: str, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            found.update(conn.execute(sa.select(_SUSPECTS.c.page_key).where(
                _SUSPECTS.c.connection == self.connection, _SUSPECTS.c.entity == entity,
                _SUSPECTS.c.page_key.in_(keys[start:start + 500]))).scalars().all())
        return found

    def _bury(self, conn: sa.Connection, entity: str, keys: list[str]) -> int:
        if not keys:
            return 0
        where = sa.and_(_SEQ.c.connection == self.connection, _SEQ.c.entity == entity)
        seq = conn.execute(sa.select(_SEQ.c.seq).where(where)).scalar()
        if seq is None:
            conn.execute(_SEQ.insert().values(connection=self.connection, entity=entity, seq=0))
            seq = 0
        for key in keys:
            seq += 1
            conn.execute(_KEYS.update().where(self._where(entity), _KEYS.c.page_key == key)
                         .values(deleted_seq=seq))
        conn.execute(_SEQ.update().where(where).values(seq=seq))
        return len(keys)

    def _values(self, entity: str, row: IndexRow) -> dict[str, Any]:
        return {"connection": self.connection, "entity": entity, "page_key": row.page_key,
                "change_key": json.dumps(row.change_key, sort_keys=True),
                "version": row.version, "deleted_seq": None}


def default_index_url(connection: str) -> str:
    """Where the key index of ``connection`` lives when ``index_url`` is not set."""
    return f"sqlite:///.syncbus/bc-{connection}.db"


def copy_index(url: str, copy: Path) -> bool:
    """Copy the key index at ``url`` into the SQLite file ``copy``; the original is only read.

    Returns:
        False when the index is not a SQLite file (a shared database is not copied);
        True otherwise, also when the file does not exist yet (there is nothing to copy).
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return False
    if Path(parsed.database).exists():
        copy_file(Path(parsed.database), copy)
    return True


def shown_url(url: str) -> str:
    """``url`` as it may be shown: its password hidden."""
    return sa.make_url(url).render_as_string(hide_password=True)

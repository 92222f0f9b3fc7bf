"""The state store: detector cursors and applied versions (SQLAlchemy Core).

SQLite file by default; PostgreSQL (by URL) when several workers share the state.

Tables:
  ``syncbus_checkpoints`` — one cursor per detector (connection + entity), committed
  only after the broker confirmed the page (the cursor rule).
  ``syncbus_applied`` — per link and target record, the source version last applied
  (the ordering rule).
  ``syncbus_processed`` — the Processed transactions (history, kept for a retention
  period), so an operator can confirm that and when a record was delivered.
  ``syncbus_leases`` — which worker polls which source entity, so that several workers
  sharing a PostgreSQL state store never poll the same entity at once.

The operational tables (detector polls, link pause flags and counters, activity, sync
run history) are described in :mod:`producers.state_ops`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bus.redact import redact_text, redact_url
from connectors.base import ConnectorUnavailable
from producers.state_ops import OpsStateMixin, aware, ops_metadata

__all__ = ["AppliedGuard", "StateStore"]

metadata = sa.MetaData()

checkpoints = sa.Table(
    "syncbus_checkpoints",
    metadata,
    sa.Column("detector", sa.String(200), primary_key=True),
    sa.Column("cursor", sa.Text, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_change_at", sa.DateTime(timezone=True), nullable=True),
)

processed = sa.Table(
    "syncbus_processed",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("link", sa.String(200), nullable=False),
    sa.Column("entity", sa.String(200), nullable=False),
    sa.Column("record_key", sa.Text, nullable=False),
    sa.Column("op", sa.String(16), nullable=False),
    sa.Column("version", sa.String(100), nullable=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Index("ix_syncbus_processed_link_key", "link", "record_key"),
)

leases = sa.Table(
    "syncbus_leases",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

applied = sa.Table(
    "syncbus_applied",
    metadata,
    sa.Column("link", sa.String(200), primary_key=True),
    sa.Column("record_key", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


def _now() -> datetime:
    return datetime.now(UTC)


class StateStore(OpsStateMixin):
    """Access to the state tables; thread-safe (one pooled engine).

    Args:
        url: SQLAlchemy URL of the state store.
        connect_timeout: Seconds to wait for a PostgreSQL connection (default: the
            driver's); status checks set it so a hung server cannot hang them.
    """

    def __init__(self, url: str, *, connect_timeout: float | None = None) -> None:
        self.url = url
        self.safe_url = redact_url(url)
        parsed = sa.make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        args = _engine_args(self.dialect)
        if connect_timeout is not None and self.dialect == "postgresql":
            args["connect_args"] = {"connect_timeout": max(1, round(connect_timeout))}
        self.engine: Engine = sa.create_engine(url, pool_pre_ping=True, **args)
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            metadata.create_all(self.engine)
            ops_metadata.create_all(self.engine)
        except sa.exc.OperationalError as exc:
            raise ConnectorUnavailable(f"state store {self.safe_url} unreachable: {exc.orig}") from exc

    # -- checkpoints ------------------------------------------------------------------

    @contextmanager
    def _available(self) -> Iterator[None]:
        """Turn a lost or refused state-store connection into a transient error."""
        try:
            yield
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise ConnectorUnavailable(
                f"state store {self.safe_url} unavailable: {redact_text(str(exc.orig))}"
            ) from exc

    def load_cursor(self, detector: str) -> str | None:
        """The committed cursor of ``detector``, or None before its first page.

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        with self._available(), self.engine.connect() as conn:
            return conn.scalar(
                sa.select(checkpoints.c.cursor).where(checkpoints.c.detector == detector)
            )

    def save_cursor(self, detector: str, cursor: str, *, changes: int = 0) -> None:
        """Commit ``cursor`` for ``detector`` (call only after the page was confirmed).

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        now = _now()
        values = {"cursor": cursor, "updated_at": now}
        if changes:
            values["last_change_at"] = now
        with self._available(), self.engine.begin() as conn:
            done = conn.execute(
                checkpoints.update().where(checkpoints.c.detector == detector).values(**values)
            ).rowcount
            if not done:
                conn.execute(checkpoints.insert().values(detector=detector, **values))

    def checkpoint_rows(self) -> dict[str, dict[str, Any]]:
        """Every detector's committed cursor, last commit and last change, by detector.

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        with self._available(), self.engine.connect() as conn:
            return {row.detector: {"cursor": row.cursor, "updated_at": aware(row.updated_at),
                                   "last_change_at": aware(row.last_change_at)}
                    for row in conn.execute(sa.select(checkpoints))}

    # -- leases -------------------------------------------------------------------------

    def lease_owners(self) -> dict[str, str]:
        """Who holds which lease now (expired leases left out).

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        with self._available(), self.engine.connect() as conn:
            return {row.name: row.owner for row in conn.execute(
                sa.select(leases.c.name, leases.c.owner).where(leases.c.expires_at >= _now()))}

    def acquire_lease(self, name: str, owner: str, ttl: float, *,
                      dead_owner: str | None = None) -> bool:
        """Take or renew the lease ``name`` for ``ttl`` seconds; False if another owner holds it.

        Args:
            dead_owner: An owner known to be dead (its process is gone): its lease is
                taken over at once instead of waiting for it to expire.

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        now = _now()
        until = now + timedelta(seconds=ttl)
        with self._available(), self.engine.begin() as conn:
            taken = conn.execute(
                leases.update()
                .where(leases.c.name == name)
                .where(sa.or_(leases.c.owner == owner, leases.c.expires_at < now,
                              leases.c.owner == (dead_owner or owner)))
                .values(owner=owner, expires_at=until)
            ).rowcount
            if taken:
                return True
            exists = conn.scalar(sa.select(leases.c.owner).where(leases.c.name == name))
            if exists is not None:
                return False
            try:
                with conn.begin_nested():
                    conn.execute(leases.insert().values(name=name, owner=owner, expires_at=until))
            except sa.exc.IntegrityError:
                return False
            return True

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up (at shutdown) so another worker takes over at once."""
        with self._available(), self.engine.begin() as conn:
            conn.execute(leases.delete().where(leases.c.name == name, leases.c.owner == owner))

    def lease_owner(self, name: str) -> str | None:
        """Who holds the lease ``name`` now (expired leases count as free)."""
        with self._available(), self.engine.connect() as conn:
            return conn.scalar(sa.select(leases.c.owner).where(
                leases.c.name == name, leases.c.expires_at >= _now()))

    # -- applied versions ---------------------------------------------------------------

    @contextmanager
    def guard(self, link: str, keys: Sequence[str]) -> Iterator[AppliedGuard]:
        """Lock ``keys`` of ``link`` for one batch and expose their applied versions.

        While the block runs no other worker applies the same records, so "compare
        versions, write the target, record the versions" is atomic across competing
        consumers. Versions recorded with :meth:`AppliedGuard.record` are committed
        when the block exits without error.
        """
        with self.engine.connect() as conn, conn.begin():
            self._lock(conn, link, keys)
            rows = conn.execute(
                sa.select(applied.c.record_key, applied.c.version).where(
                    applied.c.link == link, applied.c.record_key.in_(list(keys))
                )
            ).all() if keys else []
            guard = AppliedGuard({k: v for k, v in rows})
            yield guard
            self._save(conn, link, guard)

    def processed_events(self, *, link: str | None = None, entity: str | None = None,
                         key_contains: str | None = None, since: datetime | None = None,
                         event_id: str | None = None,
                         limit: int | None = None) -> list[dict[str, Any]]:
        """Processed transactions, newest first, filtered.

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        query = sa.select(processed).order_by(processed.c.applied_at.desc(), processed.c.id.desc())
        if link:
            query = query.where(processed.c.link == link)
        if entity:
            query = query.where(processed.c.entity == entity)
        if key_contains:
            query = query.where(processed.c.record_key.contains(key_contains, autoescape=True))
        if since:
            query = query.where(processed.c.applied_at >= since)
        if event_id:
            query = query.where(processed.c.event_id == event_id)
        if limit:
            query = query.limit(limit)
        with self._available(), self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def processed_counts(self) -> dict[str, int]:
        """Processed transactions in the history, per link."""
        query = sa.select(processed.c.link, sa.func.count()).group_by(processed.c.link)
        with self._available(), self.engine.connect() as conn:
            return {link: int(n) for link, n in conn.execute(query)}

    def purge_processed(self, older_than: float) -> int:
        """Drop Processed history older than ``older_than`` seconds; returns rows removed."""
        cutoff = _now() - timedelta(seconds=older_than)
        with self._available(), self.engine.begin() as conn:
            return int(conn.execute(processed.delete().where(processed.c.applied_at < cutoff))
                       .rowcount)

    def applied_version(self, link: str, key: str) -> int | None:
        """The version last applied for one record (for tooling and tests)."""
        with self.engine.connect() as conn:
            return conn.scalar(
                sa.select(applied.c.version).where(
                    applied.c.link == link, applied.c.record_key == key
                )
            )

    def _lock(self, conn: Connection, link: str, keys: Sequence[str]) -> None:
        if self.dialect == "sqlite":
            # Take the write lock now: SQLite then serializes competing batches.
            conn.exec_driver_sql("UPDATE syncbus_checkpoints SET cursor = cursor WHERE 0")
            return
        if self.dialect == "postgresql" and keys:
            ids = sorted({zlib.crc32(f"{link}\x1f{k}".encode()) for k in keys})
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(1937, v) FROM unnest(CAST(:ids AS int[])) AS v"),
                {"ids": [i - 2**31 for i in ids]},
            )

    def _save(self, conn: Connection, link: str, guard: AppliedGuard) -> None:
        now = _now()
        if guard.processed:
            conn.execute(processed.insert(),
                         [{**row, "link": link, "applied_at": now} for row in guard.processed])
        if not guard.updates:
            return
        existing = guard.updates.keys() & guard.known.keys()
        fresh = [
            {"link": link, "record_key": k, "version": v, "applied_at": now}
            for k, v in guard.updates.items() if k not in existing
        ]
        if existing:
            conn.execute(
                applied.update()
                .where(applied.c.link == sa.bindparam("b_link"))
                .where(applied.c.record_key == sa.bindparam("b_key"))
                .values(version=sa.bindparam("b_version"), applied_at=now),
                [{"b_link": link, "b_key": k, "b_version": guard.updates[k]} for k in existing],
            )
        if fresh:
            conn.execute(applied.insert(), fresh)

    def close(self) -> None:
        self.engine.dispose()


class AppliedGuard:
    """Applied versions of one locked batch; see :meth:`StateStore.guard`."""

    def __init__(self, known: Mapping[str, int]) -> None:
        self.known = dict(known)
        self.updates: dict[str, int] = {}
        self.processed: list[dict[str, object]] = []

    def is_stale(self, key: str, version: int) -> bool:
        """True when a version newer than or equal to ``version`` was already applied."""
        seen = self.known.get(key)
        return seen is not None and version <= seen

    def record(self, key: str, version: int) -> None:
        """Remember ``version`` as applied for ``key`` (committed with the batch)."""
        if version > self.updates.get(key, -1):
            self.updates[key] = version

    def processed_event(self, *, event_id: str, entity: str, key: str, op: str,
                        version: object) -> None:
        """Add an applied event to the Processed history (committed with the batch)."""
        self.processed.append({"event_id": event_id, "entity": entity, "record_key": key,
                               "op": op, "version": None if version is None else str(version)})


def _engine_args(dialect: str) -> dict[str, object]:
    if dialect == "sqlite":
        return {"connect_args": {"timeout": 60, "check_same_thread": False}}
    return {"pool_size": 10, "max_overflow": 10}


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()

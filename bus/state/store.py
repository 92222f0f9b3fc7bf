"""The state store: detector cursors and applied versions (SQLAlchemy Core).

SQLite file by default; PostgreSQL (by URL) when several workers share the state.

Tables:
  ``syncbus_checkpoints`` — one cursor per detector (connection + entity), committed
  only after the broker confirmed the page (the cursor rule).
  ``syncbus_applied`` — per link and target record, the source version last applied
  (the ordering rule).
  ``syncbus_processed`` — the Processed transactions (history, kept for a retention
  period), so an operator can confirm that and when a record was delivered.
  ``syncbus_filtered`` — records a lookup parent's filter left out (their children are
  settled at once instead of waiting for a parent that will not come).
  ``syncbus_leases`` — which worker polls which source entity, so that several workers
  sharing a PostgreSQL state store never poll the same entity at once.
  ``syncbus_secrets`` — secrets the bus generated itself and must keep (e.g. the
  ``clientState`` of a Business Central webhook subscription), by scope and name;
  written once, never replaced.

The operational tables (detector polls, link pause flags and counters, activity, sync
run history) are described in :mod:`bus.state.rows`; the offline-transaction
index in :mod:`bus.state.txindex`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bus.core.redact import redact_text, redact_url
from bus.state.rows import OpsStateMixin, aware, ops_metadata
from bus.state.txindex import TxIndexMixin, tx_metadata
from connectors.base import ConnectorUnavailable

__all__ = ["AppliedGuard", "PAIR_COLUMNS", "StateStore"]

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

kept_secrets = sa.Table(
    "syncbus_secrets",
    metadata,
    sa.Column("scope", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(400), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

applied = sa.Table(
    "syncbus_applied",
    metadata,
    sa.Column("link", sa.String(200), primary_key=True),
    sa.Column("record_key", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

pairs = sa.Table(
    "syncbus_pairs",
    metadata,
    sa.Column("link", sa.String(200), primary_key=True),
    sa.Column("pair_key", sa.Text, primary_key=True),
    # The connector key of each side (for lookups through the id map), when known.
    sa.Column("a_id", sa.Text, nullable=True),
    sa.Column("b_id", sa.Text, nullable=True),
    # Content hash and version of each side when last synced (echo and conflict rules).
    sa.Column("a_hash", sa.String(64), nullable=True),
    sa.Column("b_hash", sa.String(64), nullable=True),
    sa.Column("a_version", sa.String(100), nullable=True),
    sa.Column("b_version", sa.String(100), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_syncbus_pairs_a_id", "link", "a_id"),
    sa.Index("ix_syncbus_pairs_b_id", "link", "b_id"),
)

conflicts = sa.Table(
    "syncbus_conflicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("link", sa.String(200), nullable=False),
    sa.Column("pair_key", sa.Text, nullable=False),
    sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("policy", sa.String(32), nullable=False),
    # a or b; None while a manual conflict waits for an operator.
    sa.Column("winner", sa.String(1), nullable=True),
    sa.Column("a_values", sa.JSON, nullable=True),
    sa.Column("b_values", sa.JSON, nullable=True),
    sa.Column("a_modified", sa.String(40), nullable=True),
    sa.Column("b_modified", sa.String(40), nullable=True),
    # The event that met the conflict, and its direction (to replay it when resolved).
    sa.Column("event_id", sa.String(64), nullable=True),
    sa.Column("direction", sa.String(3), nullable=False),
    sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("resolved_by", sa.String(200), nullable=True),
)

filtered = sa.Table(
    "syncbus_filtered",
    metadata,
    # A record a tracked link's filter left out, by its connector key on the side read.
    sa.Column("link", sa.String(200), primary_key=True),
    sa.Column("side", sa.String(1), primary_key=True),
    sa.Column("source_id", sa.Text, primary_key=True),
    sa.Column("filtered_at", sa.DateTime(timezone=True), nullable=False),
)

PAIR_COLUMNS = ("a_id", "b_id", "a_hash", "b_hash", "a_version", "b_version")


def _now() -> datetime:
    return datetime.now(UTC)


class StateStore(OpsStateMixin, TxIndexMixin):
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
            tx_metadata.create_all(self.engine)
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

    def clear_cursor(self, detector: str) -> None:
        """Forget the cursor of ``detector`` (its next read starts from the beginning).

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        with self._available(), self.engine.begin() as conn:
            conn.execute(checkpoints.delete().where(checkpoints.c.detector == detector))

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

    # -- kept secrets -------------------------------------------------------------------

    def get_secret(self, scope: str, name: str) -> str | None:
        """A secret kept by :meth:`keep_secret`, or None (never log what it returns).

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        with self._available(), self.engine.connect() as conn:
            return conn.scalar(sa.select(kept_secrets.c.value).where(
                kept_secrets.c.scope == scope, kept_secrets.c.name == name))

    def keep_secret(self, scope: str, name: str, make: Callable[[], str]) -> str:
        """The secret ``scope``/``name``, made with ``make()`` and stored if there is none.

        The first writer wins: workers racing to create it all get the same value.

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        found = self.get_secret(scope, name)
        if found is not None:
            return found
        value = make()
        with self._available(), self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(kept_secrets.insert().values(
                        scope=scope, name=name, value=value, created_at=_now()))
            except sa.exc.IntegrityError:
                return str(conn.scalar(sa.select(kept_secrets.c.value).where(
                    kept_secrets.c.scope == scope, kept_secrets.c.name == name)))
        return value

    # -- applied versions ---------------------------------------------------------------

    @contextmanager
    def guard(self, link: str, keys: Sequence[str], *, applied_as: str | None = None,
              with_pairs: bool = False) -> Iterator[AppliedGuard]:
        """Lock ``keys`` of ``link`` for one batch and expose their applied versions.

        While the block runs no other worker applies the same records, so "compare
        versions, write the target, record the versions" is atomic across competing
        consumers. Versions recorded with :meth:`AppliedGuard.record` are committed
        when the block exits without error.

        Args:
            applied_as: Namespace of the applied versions (default ``link``); the two
                directions of a two-way link lock the same pair keys but keep their
                versions apart.
            with_pairs: Also load the pair rows of ``keys`` (two-way links, id map).
        """
        versions_ns = applied_as or link
        with self.engine.connect() as conn, conn.begin():
            self._lock(conn, link, keys)
            rows = conn.execute(
                sa.select(applied.c.record_key, applied.c.version).where(
                    applied.c.link == versions_ns, applied.c.record_key.in_(list(keys))
                )
            ).all() if keys else []
            guard = AppliedGuard({k: v for k, v in rows})
            if with_pairs and keys:
                guard.pairs = {
                    row.pair_key: {c: getattr(row, c) for c in PAIR_COLUMNS}
                    for row in conn.execute(sa.select(pairs).where(
                        pairs.c.link == link, pairs.c.pair_key.in_(list(keys))))}
                guard.pairs_known = set(guard.pairs)
            yield guard
            self._save(conn, versions_ns, guard)
            self._save_pairs(conn, link, guard)

    def _save_pairs(self, conn: Connection, link: str, guard: AppliedGuard) -> None:
        now = _now()
        if guard.pair_updates:
            known = guard.pairs_known
            new = [{"link": link, "pair_key": k, "updated_at": now, **guard.pairs[k]}
                   for k in guard.pair_updates if k not in known]
            old = [{"b_link": link, "b_key": k, **{f"v_{c}": guard.pairs[k][c]
                                                    for c in PAIR_COLUMNS}}
                   for k in guard.pair_updates if k in known]
            if new:
                conn.execute(pairs.insert(), new)
            if old:
                conn.execute(
                    pairs.update().where(pairs.c.link == sa.bindparam("b_link"),
                                         pairs.c.pair_key == sa.bindparam("b_key"))
                    .values(updated_at=now, **{c: sa.bindparam(f"v_{c}") for c in PAIR_COLUMNS}),
                    old)
        if guard.pair_deletes:
            conn.execute(pairs.delete().where(pairs.c.link == link,
                                              pairs.c.pair_key.in_(sorted(guard.pair_deletes))))
        if guard.conflicts:
            conn.execute(conflicts.insert(),
                         [{**row, "link": link, "detected_at": now} for row in guard.conflicts])

    def lookup_ids(self, link: str, side: str, ids: Sequence[str]) -> dict[str, str]:
        """Translate connector keys of one side of ``link`` into the other side's.

        Args:
            side: ``a`` or ``b``: the side ``ids`` belong to.
            ids: Keys as text (the single value of the connector key).

        Returns:
            Each id found → the other side's id (ids without a partner left out).

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        if not ids:
            return {}
        mine, other = (pairs.c.a_id, pairs.c.b_id) if side == "a" else (pairs.c.b_id, pairs.c.a_id)
        with self._available(), self.engine.connect() as conn:
            return {row[0]: row[1] for row in conn.execute(
                sa.select(mine, other).where(pairs.c.link == link, mine.in_(list(set(ids))),
                                             other.is_not(None)))}

    def mark_filtered(self, link: str, side: str, ids: Sequence[str]) -> None:
        """Remember that ``link``'s filter left out the records ``ids`` of ``side`` (so a
        child looking them up as its parent is settled at once, not retried).

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return
        now = _now()
        with self._available(), self.engine.begin() as conn:
            known = set(conn.scalars(sa.select(filtered.c.source_id).where(
                filtered.c.link == link, filtered.c.side == side,
                filtered.c.source_id.in_(wanted))))
            fresh = [{"link": link, "side": side, "source_id": i, "filtered_at": now}
                     for i in wanted if i not in known]
            if fresh:
                conn.execute(filtered.insert(), fresh)

    def filtered_ids(self, link: str, side: str, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` (connector keys on ``side``) ``link``'s filter left out."""
        if not ids:
            return set()
        with self._available(), self.engine.connect() as conn:
            return set(conn.scalars(sa.select(filtered.c.source_id).where(
                filtered.c.link == link, filtered.c.side == side,
                filtered.c.source_id.in_(sorted(set(ids))))))

    def pair_keys_by_id(self, link: str, side: str, ids: Sequence[str]) -> dict[str, str]:
        """The pair keys of records known by their connector key on ``side`` (deletes)."""
        if not ids:
            return {}
        mine = pairs.c.a_id if side == "a" else pairs.c.b_id
        with self._available(), self.engine.connect() as conn:
            return {row[0]: row[1] for row in conn.execute(
                sa.select(mine, pairs.c.pair_key).where(pairs.c.link == link,
                                                        mine.in_(list(set(ids)))))}

    def pair_hashes(self, link: str, keys: Sequence[str]) -> dict[str, tuple[str | None, str | None]]:
        """``(a_hash, b_hash)`` per pair key (echo check of the detectors; no lock)."""
        if not keys:
            return {}
        with self._available(), self.engine.connect() as conn:
            return {row.pair_key: (row.a_hash, row.b_hash) for row in conn.execute(
                sa.select(pairs.c.pair_key, pairs.c.a_hash, pairs.c.b_hash).where(
                    pairs.c.link == link, pairs.c.pair_key.in_(list(set(keys)))))}

    def conflict_rows(self, *, link: str | None = None, pending: bool = False,
                      conflict_id: int | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
        """The conflict log, newest first.

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        query = sa.select(conflicts).order_by(conflicts.c.id.desc())
        if link:
            query = query.where(conflicts.c.link == link)
        if pending:
            query = query.where(conflicts.c.winner.is_(None))
        if conflict_id is not None:
            query = query.where(conflicts.c.id == conflict_id)
        if limit:
            query = query.limit(limit)
        with self._available(), self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def resolve_conflicts(self, link: str, pair_key: str, winner: str, by: str) -> int:
        """Mark every open conflict of one record resolved in favour of ``winner``."""
        with self._available(), self.engine.begin() as conn:
            return int(conn.execute(
                conflicts.update().where(conflicts.c.link == link,
                                         conflicts.c.pair_key == pair_key,
                                         conflicts.c.winner.is_(None))
                .values(winner=winner, resolved_at=_now(), resolved_by=by)).rowcount)

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
        #: Pair rows by pair key (``with_pairs``): a_id, b_id, a/b_hash, a/b_version.
        self.pairs: dict[str, dict[str, Any]] = {}
        self.pairs_known: set[str] = set()
        self.pair_updates: set[str] = set()
        self.pair_deletes: set[str] = set()
        self.conflicts: list[dict[str, Any]] = []

    def pair(self, key: str) -> dict[str, Any] | None:
        """The pair row of ``key`` as last saved or set in this batch (None if none)."""
        return self.pairs.get(key)

    def set_pair(self, key: str, **values: Any) -> None:
        """Update columns of a pair row (created if missing); committed with the batch."""
        row = self.pairs.setdefault(key, dict.fromkeys(PAIR_COLUMNS))
        row.update({k: None if v is None else str(v) for k, v in values.items()})
        self.pair_updates.add(key)
        self.pair_deletes.discard(key)

    def drop_pair(self, key: str) -> None:
        """Forget a pair (both records deleted); committed with the batch."""
        self.pairs.pop(key, None)
        self.pair_updates.discard(key)
        if key in self.pairs_known:
            self.pair_deletes.add(key)

    def conflict(self, **row: Any) -> None:
        """Add a row to the conflict log (committed with the batch)."""
        self.conflicts.append(row)

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

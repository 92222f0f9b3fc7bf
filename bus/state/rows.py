"""The operational tables of the state store: what an operator asks about a running bus.

Tables (created with the others by :class:`bus.state.store.StateStore`):
  ``syncbus_detectors`` — per detector: last successful poll, its duration and
  changes, last error, which worker polled.
  ``syncbus_links`` — per link direction: paused (by whom, why, since when), the
  number of its transactions believed to be in the dead-letter queue, last applied,
  last failure. Every worker reads the pause flags every second.
  ``syncbus_activity`` — per link, counts of applied / skipped / retried / dead-lettered
  changes in short slices (a row per worker per second of activity at most); the rate
  over the last minute and the alert windows are sums over it.
  ``syncbus_runs`` — the sync history: every ``run --until-idle`` (one row for the
  run, one per link, one per detector) and every detector cycle that found changes.

Writes happen per batch or per second, never per message.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = ["LinkDelta", "OpsStateMixin", "RunRecord", "aware", "ops_metadata"]

#: Metadata of the operational tables (created next to the core tables).
ops_metadata = sa.MetaData()

#: Characters of an error text kept in the operational tables.
MAX_TEXT = 2000

_TS = sa.DateTime(timezone=True)

detectors = sa.Table(
    "syncbus_detectors",
    ops_metadata,
    sa.Column("detector", sa.String(200), primary_key=True),
    sa.Column("last_ok_at", _TS, nullable=True),  # start of the last successful poll
    sa.Column("last_ok_seconds", sa.Float, nullable=True),
    sa.Column("last_changes", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("last_error_at", _TS, nullable=True),
    sa.Column("worker", sa.String(200), nullable=True),
)

links = sa.Table(
    "syncbus_links",
    ops_metadata,
    sa.Column("link", sa.String(200), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("paused_at", _TS, nullable=True),
    sa.Column("paused_by", sa.String(200), nullable=True),
    sa.Column("paused_reason", sa.Text, nullable=True),
    sa.Column("resumed_at", _TS, nullable=True),
    sa.Column("dead_count", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_applied_at", _TS, nullable=True),
    sa.Column("last_failure_at", _TS, nullable=True),
    sa.Column("last_failure", sa.Text, nullable=True),
)

activity = sa.Table(
    "syncbus_activity",
    ops_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("link", sa.String(200), nullable=False),
    sa.Column("at", _TS, nullable=False, index=True),
    sa.Column("applied", sa.Integer, nullable=False, default=0),
    sa.Column("skipped", sa.Integer, nullable=False, default=0),
    sa.Column("retried", sa.Integer, nullable=False, default=0),
    sa.Column("dead", sa.Integer, nullable=False, default=0),
    sa.Index("ix_syncbus_activity_link_at", "link", "at"),
)

runs = sa.Table(
    "syncbus_runs",
    ops_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(32), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),  # run | link | poll
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("started_at", _TS, nullable=False, index=True),
    sa.Column("ended_at", _TS, nullable=False),
    sa.Column("upserts", sa.Integer, nullable=False, default=0),
    sa.Column("deletes", sa.Integer, nullable=False, default=0),
    sa.Column("skipped", sa.Integer, nullable=False, default=0),
    sa.Column("retried", sa.Integer, nullable=False, default=0),
    sa.Column("dead", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("worker", sa.String(200), nullable=True),
)


def aware(value: datetime | None) -> datetime | None:
    """``value`` with UTC attached when the database returned it naive (SQLite)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(slots=True)
class LinkDelta:
    """What one link direction did since the last flush of this worker."""

    link: str
    applied: int = 0
    skipped: int = 0
    retried: int = 0
    dead: int = 0
    last_applied_at: datetime | None = None
    failure: str | None = None
    failure_at: datetime | None = None

    @property
    def empty(self) -> bool:
        return not (self.applied or self.skipped or self.retried or self.dead or self.failure)


@dataclass(slots=True)
class RunRecord:
    """One row of the sync history (see ``syncbus_runs`` in the module docstring)."""

    run_id: str
    kind: str
    name: str
    started_at: datetime
    ended_at: datetime
    status: str = "ok"
    upserts: int = 0
    deletes: int = 0
    skipped: int = 0
    retried: int = 0
    dead: int = 0
    errors: int = 0
    error: str | None = None
    worker: str | None = None


class OpsStateMixin:
    """Operational queries of :class:`bus.state.store.StateStore`."""

    engine: Engine

    def _available(self) -> AbstractContextManager[None]:  # pragma: no cover - see StateStore
        raise NotImplementedError

    # -- health -----------------------------------------------------------------------

    def ping(self) -> None:
        """Check that the state store answers.

        Raises:
            ConnectorUnavailable: it does not.
        """
        with self._available(), self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- detectors ----------------------------------------------------------------------

    def record_poll(self, detector: str, *, started: datetime, seconds: float, changes: int,
                    error: str | None = None, worker: str | None = None) -> None:
        """Remember how the last poll of ``detector`` went (success when ``error`` is None).

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        if error is None:
            values: dict[str, Any] = {"last_ok_at": started, "last_ok_seconds": seconds,
                                      "last_changes": changes, "worker": worker}
        else:
            values = {"last_error": error[:MAX_TEXT], "last_error_at": _now(), "worker": worker}
        with self._available(), self.engine.begin() as conn:
            _upsert(conn, detectors, detectors.c.detector, detector, values)

    def detector_rows(self) -> dict[str, dict[str, Any]]:
        """Every detector's poll record, by detector name."""
        with self._available(), self.engine.connect() as conn:
            return {row.detector: _row(row) for row in conn.execute(sa.select(detectors))}

    # -- links --------------------------------------------------------------------------

    def link_rows(self) -> dict[str, dict[str, Any]]:
        """Every link direction's control and counters, by link name."""
        with self._available(), self.engine.connect() as conn:
            return {row.link: _row(row) for row in conn.execute(sa.select(links))}

    def set_link_paused(self, link: str, paused: bool, *, reason: str | None = None,
                        by: str | None = None) -> bool:
        """Pause or resume ``link``; False when it already was in that state.

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        now = _now()
        values: dict[str, Any] = (
            {"paused": True, "paused_at": now, "paused_by": by, "paused_reason": reason}
            if paused else {"paused": False, "resumed_at": now, "paused_by": by})
        with self._available(), self.engine.begin() as conn:
            was = conn.scalar(sa.select(links.c.paused).where(links.c.link == link))
            if bool(was) == paused:
                return False
            _upsert(conn, links, links.c.link, link, values)
            return True

    def add_link_activity(self, deltas: Sequence[LinkDelta]) -> None:
        """Add the activity of ``deltas`` (one transaction: activity rows and link counters).

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        deltas = [d for d in deltas if not d.empty]
        if not deltas:
            return
        now = _now()
        rows = [{"link": d.link, "at": now, "applied": d.applied, "skipped": d.skipped,
                 "retried": d.retried, "dead": d.dead}
                for d in deltas if d.applied or d.skipped or d.retried or d.dead]
        with self._available(), self.engine.begin() as conn:
            if rows:
                conn.execute(activity.insert(), rows)
            for d in deltas:
                values: dict[str, Any] = {}
                if d.dead:
                    values["dead_count"] = links.c.dead_count + d.dead
                if d.last_applied_at is not None:
                    values["last_applied_at"] = d.last_applied_at
                if d.failure is not None:
                    values.update(last_failure=d.failure[:MAX_TEXT], last_failure_at=d.failure_at)
                if values:
                    _upsert(conn, links, links.c.link, d.link, values,
                            insert_values={"dead_count": d.dead, "paused": False})

    def activity_since(self, since: datetime) -> dict[str, dict[str, int]]:
        """Applied, skipped, retried and dead counts per link since ``since``."""
        cols = [activity.c.applied, activity.c.skipped, activity.c.retried, activity.c.dead]
        query = (sa.select(activity.c.link, *(sa.func.sum(c) for c in cols))
                 .where(activity.c.at >= since).group_by(activity.c.link))
        with self._available(), self.engine.connect() as conn:
            return {row[0]: {c.name: int(v or 0) for c, v in zip(cols, row[1:], strict=True)}
                    for row in conn.execute(query)}

    def link_errors_since(self, link: str, since: datetime) -> int:
        """Changes of ``link`` dead-lettered since ``since`` (by every worker)."""
        query = sa.select(sa.func.sum(activity.c.dead)).where(
            activity.c.link == link, activity.c.at >= since)
        with self._available(), self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)

    def set_dead_counts(self, counts: Mapping[str, int]) -> None:
        """Replace every link's dead-letter count with ``counts`` (after counting the queue)."""
        with self._available(), self.engine.begin() as conn:
            conn.execute(links.update().where(links.c.link.not_in(list(counts)))
                         .values(dead_count=0))
            for link, n in counts.items():
                _upsert(conn, links, links.c.link, link, {"dead_count": n},
                        insert_values={"paused": False})

    # -- run history --------------------------------------------------------------------

    def add_runs(self, records: Sequence[RunRecord]) -> None:
        """Append records to the sync history.

        Raises:
            ConnectorUnavailable: the state store cannot be reached.
        """
        if not records:
            return
        rows = [{**asdict(r), "error": r.error[:MAX_TEXT] if r.error else None} for r in records]
        with self._available(), self.engine.begin() as conn:
            conn.execute(runs.insert(), rows)

    def runs(self, *, names: Sequence[str] | None = None, since: datetime | None = None,
             kinds: Sequence[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Sync history records, newest first, filtered.

        Args:
            names: Only records of these links / detectors (and the runs that include
                one of their records).
            since: Only records started at or after this time.
            kinds: Only these kinds (``run``, ``link``, ``poll``).
            limit: At most this many records.
        """
        query = sa.select(runs).order_by(runs.c.started_at.desc(), runs.c.id.desc())
        if names is not None:
            related = sa.select(runs.c.run_id).where(runs.c.name.in_(list(names)))
            query = query.where(sa.or_(
                runs.c.name.in_(list(names)),
                sa.and_(runs.c.kind == "run", runs.c.run_id.in_(related))))
        if since is not None:
            query = query.where(runs.c.started_at >= since)
        if kinds:
            query = query.where(runs.c.kind.in_(list(kinds)))
        if limit:
            query = query.limit(limit)
        with self._available(), self.engine.connect() as conn:
            return [_row(row) for row in conn.execute(query)]

    # -- housekeeping -------------------------------------------------------------------

    def purge_runs(self, older_than: float) -> int:
        """Drop history records older than ``older_than`` seconds; returns rows removed."""
        cutoff = _now() - timedelta(seconds=older_than)
        with self._available(), self.engine.begin() as conn:
            return int(conn.execute(runs.delete().where(runs.c.started_at < cutoff)).rowcount)

    def purge_activity(self, older_than: float) -> int:
        """Drop activity slices older than ``older_than`` seconds; returns rows removed."""
        cutoff = _now() - timedelta(seconds=older_than)
        with self._available(), self.engine.begin() as conn:
            return int(conn.execute(activity.delete().where(activity.c.at < cutoff)).rowcount)


def _now() -> datetime:
    return datetime.now(UTC)


def _row(row: sa.Row[Any]) -> dict[str, Any]:
    return {k: aware(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()}


def _upsert(conn: Connection, table: sa.Table, key_col: sa.Column[Any], key: str,
            values: Mapping[str, Any], *, insert_values: Mapping[str, Any] | None = None) -> None:
    """UPDATE the row of ``key``, or INSERT it (portable; a racing insert falls back)."""
    for _ in _twice():
        if conn.execute(table.update().where(key_col == key).values(**values)).rowcount:
            return
        plain = {k: v for k, v in values.items() if not isinstance(v, sa.ColumnElement)}
        try:
            with conn.begin_nested():
                conn.execute(table.insert().values(
                    **{key_col.name: key, **(insert_values or {}), **plain}))
            return
        except sa.exc.IntegrityError:
            continue  # another worker inserted it meanwhile: update it


def _twice() -> Iterator[int]:
    yield from range(2)

"""The sync history (``syncbus history``): what each run and detector cycle did.

Records live in the state store's ``syncbus_runs`` table (see
:mod:`bus.state.rows`) and are kept for ``state.run_retention`` (default 30
days; the worker's housekeeping trims them). Kinds of record:

- ``run`` — one ``run --until-idle`` ("Sync All"): start, end, totals, errors, status
  (``ok``, ``failed``, ``timed_out``);
- ``link`` — what that run did on one link direction: upserted, deleted, skipped,
  retried, dead-lettered (status ``paused`` when the link was paused);
- ``poll`` — one detector cycle: upserts and deletes published, or the error. A
  continuous worker records the cycles that found changes and each new failure; a
  run records every poll it made.

Records of one run share a ``run_id``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bus.config.load import load_or_report
from bus.ops.txlog import parse_since
from bus.state.store import StateStore
from connectors.base import BusError
from schemas.config import SyncConfig

__all__ = ["KINDS", "history_records", "show_history"]

#: Kinds of history record.
KINDS = ("run", "link", "poll")


def history_records(config: SyncConfig, *, link: str | None = None,
                    since: datetime | None = None, kinds: Sequence[str] | None = None,
                    limit: int | None = 50) -> list[dict[str, Any]]:
    """Sync history records, newest first.

    Args:
        config: The configuration (its state store; a link's source detector).
        link: Only this link: its own records, its source detector's polls, and the
            runs that include them.
        since: Only records started at or after this time.
        kinds: Only these kinds (see :data:`KINDS`).
        limit: At most this many records (None: all).

    Raises:
        ConnectorUnavailable: the state store cannot be reached.
    """
    names: list[str] | None = None
    if link is not None:
        names = [link]
        cfg = config.links.get(link)
        if cfg is not None:
            names.append(f"{cfg.source.connection}.{cfg.source.entity}")
    state = StateStore(config.state.url)
    try:
        return state.runs(names=names, since=since, kinds=kinds, limit=limit)
    finally:
        state.close()


def show_history(path: Path, *, link: str | None = None, since: str | None = None,
                 kinds: Sequence[str] | None = None, limit: int | None = 50,
                 as_json: bool = False, console: Console | None = None) -> int:
    """What ``syncbus history`` does: list records, return the exit code.

    Returns:
        0 listed (possibly nothing), 1 state store unreachable, 2 invalid arguments
        or configuration.
    """
    console = console or Console()
    loaded = load_or_report(path, lambda line: console.print(line, markup=False))
    if loaded is None:
        return 2
    config = loaded.config
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        console.print(f"--kind {', '.join(unknown)}: use {', '.join(KINDS)}")
        return 2
    try:
        when = parse_since(since) if since else None
    except ValueError:
        console.print(f"--since {since!r}: use 2h, 30m, 7d or an ISO time like 2026-11-24T10:00")
        return 2
    try:
        records = history_records(config, link=link, since=when, kinds=kinds, limit=limit)
    except BusError as exc:
        console.print(f"syncbus: {exc.message}", markup=False)
        return 1
    if as_json:
        console.print_json(json.dumps(records, default=_iso))
        return 0
    if not records:
        console.print("no sync history" + (f" for link {link}" if link else "")
                      + (f" since {since}" if since else ""))
        return 0
    table = Table("started", "seconds", "kind", "name", "upserts", "deletes", "skipped",
                  "retried", "dead", "status", "error", box=None, pad_edge=False)
    for r in records:
        seconds = (r["ended_at"] - r["started_at"]).total_seconds()
        table.add_row(r["started_at"].astimezone().strftime("%Y-%m-%d %H:%M:%S"),
                      f"{seconds:.1f}", r["kind"], r["name"], str(r["upserts"]),
                      str(r["deletes"]), str(r["skipped"]), str(r["retried"]), str(r["dead"]),
                      r["status"], _first_line(r["error"]))
    console.print(table)
    return 0


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _first_line(text: str | None, width: int = 80) -> str:
    if not text:
        return ""
    line = text.splitlines()[0]
    return line if len(line) <= width else line[: width - 1] + "…"

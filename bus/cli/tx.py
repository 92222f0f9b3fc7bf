"""``syncbus tx …``: the offline-transaction log (Resco CRM Sync's Offline Transactions tab).

Statuses: pending (waiting for a retry, replayed, or being applied), processed
(delivered; kept for the history's retention), error (dead-lettered; the default
view), archived (set aside); ``--status all`` lists every one. Listing and counting
read the state store's index only (:mod:`bus.ops.txlog`).

Heavy modules (the broker and state-store clients, the config) are imported inside the
commands, so that ``syncbus --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bus.cli.common import EXIT_CONFIG, ConfigOpt, Group, load_or_exit

if TYPE_CHECKING:
    from bus.config.load import LoadedConfig
    from bus.ops.txlog import MoveResult, Transaction, TxFilter, TxLog

#: Statuses a listing shows (bus.ops.txlog.STATUSES, and all).
STATUSES = ("pending", "processed", "error", "archived")
#: Seconds between two progress lines of a long command.
PROGRESS_EVERY = 2.0

__all__ = ["tx"]

tx = typer.Typer(
    help=(
        "Browse and act on the offline-transaction log.\n\n"
        "  syncbus tx list -c sync.yaml                      # Error transactions (the default)\n\n"
        "  syncbus tx list -c sync.yaml --status pending --link customers\n\n"
        "  syncbus tx list -c sync.yaml --status all --json --limit 100\n\n"
        "  syncbus tx show -c sync.yaml 3f2a…                # one transaction, whole history\n\n"
        "  syncbus tx replay -c sync.yaml --all              # Set all to Pending\n\n"
        "  syncbus tx archive -c sync.yaml --error-contains 'violates not-null'\n\n"
        "  syncbus tx purge -c sync.yaml --archived --older-than 30d\n\n"
        "  syncbus tx stats -c sync.yaml\n\n"
        "  syncbus tx reconcile -c sync.yaml                 # index vs dead-letter log"
    ),
    no_args_is_help=True,
    cls=Group,
)

LinkOpt = Annotated[str | None, typer.Option(help="Only this link.")]
EntityOpt = Annotated[str | None, typer.Option(help="Only this source entity.")]
KeyOpt = Annotated[str | None, typer.Option(
    help="Only this record: a key value (17, A-1) or the key as JSON ('{\"id\":17}').")]
SinceOpt = Annotated[str | None, typer.Option(
    help="Only since then: 2h, 30m, 7d ago, or an ISO time (last failure / archive / delivery).")]
ErrorOpt = Annotated[str | None, typer.Option(help="Only errors containing this text.")]

_err = Console(stderr=True, soft_wrap=True)  # messages stay whole lines (grep, logs)


def _load(config: Path) -> LoadedConfig:
    """The config, or its problems on stderr and exit code 2."""
    return load_or_exit(config, echo=lambda line: _err.print(line, markup=False))


def _open(config: Path) -> TxLog:
    from bus.ops.txlog import TxLog

    return TxLog(_load(config).config)


def _filter(ids: list[str] | None, link: str | None, entity: str | None, key: str | None,
            since: str | None, error_contains: str | None) -> TxFilter:
    from bus.ops.txlog import TxFilter, parse_since

    try:
        when = parse_since(since) if since else None
    except ValueError:
        _err.print(f"--since {since!r}: use 2h, 30m, 7d or an ISO time like 2026-11-24T10:00")
        raise typer.Exit(EXIT_CONFIG) from None
    return TxFilter(ids=set(ids or ()), link=link, entity=entity, key=key, since=when,
                    error_contains=error_contains)


def _run(log: TxLog, action: object) -> None:
    from bus.amqp.errors import BrokerUnavailable, broker_errors
    from connectors.base import BusError

    try:
        with broker_errors(log.url):
            action()  # type: ignore[operator]
    except BrokerUnavailable:
        raise  # one line and exit code 4 (bus.cli.main)
    except BusError as exc:
        _err.print(f"syncbus: {exc.message}", markup=False)
        raise typer.Exit(1) from None
    finally:
        for warning in log.warnings:
            _err.print(f"warning: {warning}", markup=False, highlight=False)
        log.close()


@tx.command("list")
def list_(
    config: ConfigOpt,
    status: Annotated[str, typer.Option(
        help="pending, processed, error, archived, or all.")] = "error",
    link: LinkOpt = None, entity: EntityOpt = None, key: KeyOpt = None, since: SinceOpt = None,
    error_contains: ErrorOpt = None,
    limit: Annotated[int | None, typer.Option(help="At most this many.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="A JSON array (the index's fields; tx show adds the event).")] = False,
) -> None:
    """List transactions of one status (Error by default), the latest failure first.

    Reads the state store's index only: complete and fast however long the log is.

    Example: syncbus tx list -c sync.yaml --entity customers --since 2h
    """
    if status not in (*STATUSES, "all"):
        _err.print(f"--status {status!r}: one of {', '.join(STATUSES)} or all")
        raise typer.Exit(EXIT_CONFIG)
    log = _open(config)
    flt = _filter(None, link, entity, key, since, error_contains)

    def show() -> None:
        if as_json:
            _dump_json(t.to_json() for t in log.iter_select(status, flt, limit))
            return
        _table(log.select(status, flt, limit), status)

    _run(log, show)


def _progress(text: str, every: float = PROGRESS_EVERY) -> Callable[[int], None]:
    """A progress callback printing ``text`` (``{}``: the count) to stderr at most once
    per ``every`` seconds: long work shows it is moving without flooding the screen."""
    last = [time.monotonic()]

    def show(done: int) -> None:
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            _err.print(text.format(f"{done:,}"), highlight=False)

    return show


def _dump_json(rows: Iterable[dict[str, object]]) -> None:
    """A JSON array, one transaction per line (fast to write, easy to grep), written
    as the rows come."""
    out = sys.stdout
    out.write("[\n")
    sep = ""
    for row in rows:
        out.write(sep)
        out.write(json.dumps(row, default=str))
        sep = ",\n"
    out.write("\n]\n" if sep else "]\n")


def _table(found: list[Transaction], status: str) -> None:
    """One row per transaction; unreadable bodies are listed again below with size and
    why. Every cell is plain text (no markup), control characters escaped."""
    from bus.amqp.peek import printable

    out = Console(highlight=False)
    if not found:
        out.print(f"no {status} transactions match")
        return
    when = "delivered" if status == "processed" else "when"
    columns = ["id", "link", "entity", "key", "op", "attempts", when, "error"]
    if status == "all":
        columns.insert(1, "status")
    table = Table(*columns, box=None)
    for t in found:
        attempts = "?" if t.attempts is None else str(t.attempts)
        key = "(unreadable)" if t.unreadable else t.key or "?"
        error = t.error or (t.unreadable.reason if t.unreadable else "")
        cells = [(t.id, 40), (_link_label(t), 30), (t.entity or "?", 30), (key, 40),
                 (t.op or "?", 10), (attempts, 10), ((t.last_failure or t.at or "")[:19], 19),
                 (error, 70)]
        if status == "all":
            cells.insert(1, (t.status, 10))
        table.add_row(*(Text(printable(cell, width)) for cell, width in cells))
    out.print(table)
    out.print(f"{len(found)} {status} transaction(s)")
    unreadable = [(t.id, t.unreadable) for t in found if t.unreadable]
    if unreadable:
        out.print(f"{len(unreadable)} with a body that cannot be read (archive them, or fix "
                  "the publisher and replay): id, size, why, first bytes")
        for tx_id, body in unreadable:
            out.print(Text(printable(f"  {tx_id or '(no id)'}  {body.describe()}", 300)))


def _link_label(t: Transaction) -> str:
    link = t.link or "?"
    return f"{link} (b→a)" if t.direction == "b2a" else link


@tx.command()
def show(config: ConfigOpt, tx_id: Annotated[str, typer.Argument(help="Transaction (event) id.")],
         ) -> None:
    """Show one transaction on every link direction it has: its status and path (moves),
    failure history and the event as the dead-letter log holds it.

    Prints JSON; the id is the first column of syncbus tx list.

    Example: syncbus tx show -c sync.yaml 06d1d8e8-4e06-5381-a49a-bba362aaab46
    """
    log = _open(config)

    def display() -> None:
        found = log.find(tx_id)
        if not found:
            _err.print(f"no transaction {tx_id} in the links of {config}")
            raise typer.Exit(1)
        _dump_json([t.to_json() for t in found])

    _run(log, display)


@tx.command()
def replay(
    config: ConfigOpt,
    ids: Annotated[list[str] | None, typer.Argument(help="Transaction ids to replay.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every Error transaction.")] = False,
    link: LinkOpt = None, entity: EntityOpt = None, key: KeyOpt = None, since: SinceOpt = None,
    error_contains: ErrorOpt = None,
    status: Annotated[str, typer.Option(
        help="Replay transactions of this status: error (the default) or archived.")
    ] = "error",
) -> None:
    """Set Error (or Archived) transactions to Pending: back to their link for a new delivery.

    Crash-safe: each copy is confirmed by RabbitMQ before its transaction is moved.
    Reports per id; an id that matched nothing makes the exit code 1.

    Examples: syncbus tx replay -c sync.yaml 3f2a… 9b1c… · syncbus tx replay -c sync.yaml --all
    · syncbus tx replay -c sync.yaml --link customers --error-contains timeout
    · syncbus tx replay -c sync.yaml --status archived 3f2a…
    """
    if status not in ("error", "archived"):
        _err.print(f"--status {status!r}: error or archived")
        raise typer.Exit(EXIT_CONFIG)
    _move(config, "replay", ids, all_, link, entity, key, since, error_contains, status)


@tx.command()
def archive(
    config: ConfigOpt,
    ids: Annotated[list[str] | None, typer.Argument(help="Transaction ids to archive.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every Error transaction.")] = False,
    link: LinkOpt = None, entity: EntityOpt = None, key: KeyOpt = None, since: SinceOpt = None,
    error_contains: ErrorOpt = None,
) -> None:
    """Set Error transactions to Archived: kept for reference, never delivered.

    Example: syncbus tx archive -c sync.yaml --entity customers --error-contains duplicate
    """
    _move(config, "archive", ids, all_, link, entity, key, since, error_contains)


def _move(config: Path, action: str, ids: list[str] | None, all_: bool, link: str | None,
          entity: str | None, key: str | None, since: str | None,
          error_contains: str | None, status: str = "error") -> None:
    flt = _filter(ids, link, entity, key, since, error_contains)
    if flt.empty and not all_:
        _err.print(f"say which transactions to {action}: ids, a filter (--link, --entity, --key, "
                   "--since, --error-contains) or --all")
        raise typer.Exit(EXIT_CONFIG)
    log = _open(config)

    progress = _progress(f"{action}: {{}} done")

    def act() -> None:
        if action == "replay":
            result: MoveResult = log.replay(flt, progress, status=status)
        else:
            result = log.archive(flt, progress)
        _report(action, result)

    _run(log, act)


def _report(action: str, result: MoveResult) -> None:
    """What moved, per id when ids were given; exit code 1 when an id matched nothing
    or was left in place, 130 when interrupted."""
    from bus.amqp.peek import printable

    verb = {"replay": "replayed (Pending)", "archive": "archived"}.get(action, action)
    typer.echo(f"{result.moved} transaction(s) {verb}")
    for reason, n in result.skipped.items():
        typer.echo(f"{n} left in place: {reason}")
    for tx_id, outcome in result.outcomes.items():
        typer.echo(f"  {printable(tx_id, 80)}: {outcome}")
    if result.interrupted:
        typer.echo("interrupted: the rest stay where they were; run the command again")
        raise typer.Exit(130)
    if result.unmatched or (result.per_id and result.skipped):
        raise typer.Exit(1)


@tx.command()
def purge(
    config: ConfigOpt,
    archived: Annotated[bool, typer.Option("--archived", help="Delete Archived transactions.")
                        ] = False,
    processed: Annotated[bool, typer.Option("--processed", help="Trim the Processed history.")
                         ] = False,
    older_than: Annotated[str, typer.Option(help="Age: 30d, 12h …")] = "30d",
) -> None:
    """Delete Archived transactions (and/or Processed history) older than an age.

    Example: syncbus tx purge -c sync.yaml --archived --older-than 30d
    """
    from schemas.config import parse_duration

    if not (archived or processed):
        _err.print("say what to purge: --archived and/or --processed")
        raise typer.Exit(EXIT_CONFIG)
    try:
        age = float(parse_duration(older_than))
    except ValueError:
        _err.print(f"--older-than {older_than!r}: use a duration like 30d or 12h")
        raise typer.Exit(EXIT_CONFIG) from None
    log = _open(config)

    def act() -> None:
        if archived:
            result = log.purge_archived(age)
            typer.echo(f"{result.moved} archived transaction(s) deleted")
        if processed:
            typer.echo(f"{log.purge_processed(age)} processed record(s) deleted from the history")

    _run(log, act)


@tx.command()
def stats(config: ConfigOpt,
          as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False) -> None:
    """Counts per link and status: pending, processed, error, archived (from the index).

    Examples: syncbus tx stats -c sync.yaml · syncbus tx stats -c sync.yaml --json
    """
    log = _open(config)

    def act() -> None:
        counts = log.stats()
        if as_json:
            typer.echo(json.dumps(counts, indent=2))
            return
        table = Table("link", *STATUSES, box=None)
        for link, row in sorted(counts.items()):
            table.add_row(link, *(str(row[s]) for s in STATUSES))
        Console().print(table)

    _run(log, act)


@tx.command()
def reconcile(config: ConfigOpt,
              as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False) -> None:
    """Bring the index up to date with the dead-letter log, and say what differs.

    Reads every letter the log gained since the last sweep (to a marker of its own, so
    the whole log is seen): letters RabbitMQ dead-lettered itself, and letters whose
    index row a crash prevented, get their row. Lists rows whose letter is not in the
    log. Moves what the quorum queues of syncbus before the index (syncbus.dead,
    syncbus.archive) still hold into the log. A running worker does this every 30 s.

    Example: syncbus tx reconcile -c sync.yaml
    """
    log = _open(config)

    def act() -> None:
        from bus.amqp.peek import printable
        from bus.amqp.txsweep import migrate_legacy

        migrated = migrate_legacy(log.url)
        report = log.sweep(_progress("reconcile: {} letters read"), check=True)
        if as_json:
            typer.echo(json.dumps({
                "read": report.read, "indexed": report.indexed, "located": report.located,
                "stale": report.stale, "migrated": migrated, "end_offset": report.end_offset,
                "unlocated": [r["id"] for r in report.unlocated]}, indent=2))
            return
        for queue, n in migrated.items():
            typer.echo(f"{n} message(s) moved from {queue} into the dead-letter log")
        typer.echo(f"{report.read} new letter(s) read from the dead-letter log: "
                   f"{report.indexed} indexed, {report.located} located, "
                   f"{report.stale} older than their transaction's last move")
        if report.unlocated:
            typer.echo(f"{len(report.unlocated)} transaction(s) whose body is not in the log "
                       "(archive or purge them): "
                       + ", ".join(printable(r["id"], 60) for r in report.unlocated[:20]))
        else:
            typer.echo("the index and the log agree")

    _run(log, act)


@tx.command()
def conflicts(
    config: ConfigOpt,
    link: LinkOpt = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Resolved conflicts too (by default only those waiting for an operator).")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="At most this many.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array, both versions included.")
                       ] = False,
) -> None:
    """The conflict log of two-way links: records both sides changed since the last sync.

    Each row keeps both versions and who won: the link's policy (source_wins, target_wins,
    newest_wins), an operator, or nobody yet (manual policy: pending). Resolve a pending one
    with `syncbus tx resolve`.

    Examples:

      syncbus tx conflicts -c sync.yaml

      syncbus tx conflicts -c sync.yaml --all --link accounts --json
    """
    from bus.state.store import StateStore
    from connectors.base import BusError

    loaded = _load(config).config
    state = StateStore(loaded.state.url)
    try:
        rows = state.conflict_rows(link=link, pending=not all_, limit=limit)
    except BusError as exc:
        _err.print(f"syncbus: {exc.message}", markup=False)
        raise typer.Exit(1) from None
    finally:
        state.close()
    if as_json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    out = Console()
    if not rows:
        out.print("no pending conflicts" if not all_ else "no conflicts")
        return
    from bus.ops.conflicts import render_conflicts

    out.print(render_conflicts(rows, loaded, config_path=str(config)))
    out.print()
    out.print(f"{len(rows)} conflict(s); resolve one: syncbus tx resolve -c {config} "
              f"{rows[0]['id']} --keep a|b", markup=False, soft_wrap=True)  # stays pasteable


@tx.command()
def resolve(
    config: ConfigOpt,
    conflict: Annotated[str, typer.Argument(
        help="The conflict: its # in `tx conflicts`, or the event id in the error text.")],
    keep: Annotated[str, typer.Option(
        help="The side whose version wins: a (the link's source) or b (its target).")],
) -> None:
    """Settle a conflict by keeping one side's version; the other side is overwritten.

    The kept side's current record is sent through the bus to the other side, and the
    record's changes waiting in the dead-letter queue are replayed with the decision.
    The conflict log keeps both versions and who decided.

    Examples:

      syncbus tx resolve -c sync.yaml 12 --keep a

      syncbus tx resolve -c sync.yaml 06d1d8e8-4e06-5381-a49a-bba362aaab46 --keep b
    """
    import getpass

    from bus.ops.conflicts import resolve as resolve_conflict
    from connectors.base import BusError, ConfigError

    loaded = _load(config).config
    try:
        result = resolve_conflict(loaded, conflict, keep, by=getpass.getuser())
    except ConfigError as exc:
        _err.print(exc.message, markup=False)
        raise typer.Exit(EXIT_CONFIG) from None
    except BusError as exc:
        _err.print(f"syncbus: {exc.message}", markup=False)
        raise typer.Exit(1) from None
    typer.echo(f"link {result.link}, record {result.pair_key}: side {result.keep} kept "
               f"({result.conflicts} open conflict(s) closed)")
    if result.sent:
        typer.echo(f"side {result.keep}'s current version queued for the other side")
    typer.echo(f"{result.replayed} waiting transaction(s) replayed with the decision")
    for note in result.notes:
        typer.echo(f"note: {note}")

"""``syncbus preview``: what a sync of one link would do now, writing nothing.

Thin: loads the config, calls :func:`bus.ops.preview.preview` and prints the report (a
rich table per sampled record, or JSON). ``bus.cli.main`` adds it with :func:`register`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bus.cli.common import EXIT_CONFIG, ConfigOpt, configure_logging, load_or_exit

if TYPE_CHECKING:
    from bus.ops.preview import PreviewRecord, PreviewReport

__all__ = ["register"]

EXIT_OK = 0
EXIT_FAILED = 1

#: Longest value shown in a table cell.
MAX_CELL = 60
#: Records shown by default (``bus.ops.preview.DEFAULT_LIMIT``; not imported, so that
#: building the command stays cheap).
DEFAULT_LIMIT = 10

_COUNTS = (("creates", "creates"), ("updates", "updates"), ("deletes", "deletes"),
           ("soft_deletes", "soft deletes"), ("unchanged", "unchanged"),
           ("filtered", "skipped by filters"), ("ignored", "deletions ignored"),
           ("conflicts", "conflicts kept on the target"), ("waiting", "waiting for parent"),
           ("errors", "errors (would be dead-lettered)"))


def register(cli: typer.Typer) -> None:
    """Add ``preview`` to the ``syncbus`` command."""
    cli.command("preview")(preview_command)


def preview_command(
    config: ConfigOpt,
    link: Annotated[str, typer.Option(help="The link to preview.")],
    direction: Annotated[str | None, typer.Option(
        help="a2b or b2a (two-way links); default: the link's first direction.")] = None,
    limit: Annotated[int, typer.Option(
        min=0, help="Records shown side by side with the target.")] = DEFAULT_LIMIT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error (to stderr).")
                         ] = "warning",
) -> None:
    """Show what a sync of a link would do now, and write nothing anywhere.

    Reads the changes the link's detector would read next (after its committed
    cursor; everything before the first sync), maps them like the consumer does and
    compares them with the target's current records: counts of creates, updates,
    deletes, unchanged records and records skipped by filters, and a sample of mapped
    records side by side with the target. No target write, no broker message, no
    state-store change: the cursor stays where it is.

    Examples:

      syncbus preview -c sync.yaml --link customers

      syncbus preview -c sync.yaml --link accounts --direction b2a --limit 3

      syncbus preview -c sync.yaml --link customers --json > preview.json
    """
    from bus.ops.preview import preview
    from connectors.base import BusError, ConfigError

    configure_logging(log_level, "auto")
    loaded = load_or_exit(config, check_urls=True)
    try:
        report = preview(loaded.config, link, direction, limit)
    except ConfigError as exc:
        typer.echo(f"syncbus: {loaded.scrub(exc.message)}")
        raise typer.Exit(EXIT_CONFIG) from None
    except BusError as exc:
        typer.echo(f"syncbus: {loaded.scrub(exc.message)}")
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        _print(report, Console(highlight=False, soft_wrap=False))
    raise typer.Exit(EXIT_OK)


def _print(report: PreviewReport, out: Console) -> None:
    out.print(f"Preview of link {report.link}, {report.direction}: "
              f"{report.source} → {report.target}", markup=False)
    where = ("after the committed cursor" if report.cursor is not None
             else "from the beginning (no cursor yet: the first sync reads everything)")
    out.print(f"{report.changes} change(s) read {where}; {report.records} record(s) "
              "after coalescing", markup=False)
    counts = Table.grid(padding=(0, 2))
    counts.add_column(justify="right")
    counts.add_column()
    for name, label in _COUNTS:
        value = getattr(report.counts, name)
        if value or name in ("creates", "updates", "deletes", "unchanged", "filtered"):
            counts.add_row(str(value), label)
    out.print(counts)
    for note in report.notes:
        out.print(f"note: {note}", markup=False)
    out.print("Nothing was written: not to the target, the broker or the state store.")
    if report.sample:
        out.print(f"\nSample ({len(report.sample)} record(s)):")
    for record in report.sample:
        out.print()
        out.print(_table(record))


def _table(record: PreviewRecord) -> Table | Text:
    key = ", ".join(f"{k}={_cell(v)}" for k, v in (record.key or record.source_key).items())
    title = f"{record.action}  {key}" + (f"  ({record.note})" if record.note else "")
    if not record.fields:
        return Text(title)
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("field")
    table.add_column("target now")
    table.add_column("after sync")
    for diff in record.fields:
        now = "—" if record.action == "create" else _cell(diff.now)
        after = "(deleted)" if record.action == "delete" else _cell(diff.after)
        marker = "* " if diff.changed else "  "  # readable without colours too
        table.add_row(marker + diff.field, now, after, style="bold" if diff.changed else "dim")
    return table


def _cell(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"

"""``syncbus sync-all``: the initial sync of one link (Resco's "Sync All")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from bus.cli.common import EXIT_CONFIG, ConfigOpt, load_or_exit, setup_logging

if TYPE_CHECKING:
    from rich.progress import TaskID

    from bus.ops.syncall import Progress as SyncProgress

__all__ = ["register"]

_err = Console(stderr=True, soft_wrap=True)  # messages stay whole lines (grep, logs)


def register(cli: typer.Typer) -> None:
    """Add ``sync-all`` to the ``syncbus`` command."""
    cli.command("sync-all")(sync_all_command)


def sync_all_command(
    config: ConfigOpt,
    link: Annotated[str, typer.Option(help="The link to copy.")],
    master: Annotated[str | None, typer.Option(
        help="a (the link's source) or b (its target): the side whose version wins every "
        "difference; records only on the other side are copied to it. Default: the link's "
        "conflict policy decides.")] = None,
    restart: Annotated[bool, typer.Option(
        help="Start over instead of continuing an interrupted run.")] = False,
    apply: Annotated[bool, typer.Option(
        help="Deliver the events here and wait until they are applied; --no-apply leaves "
        "that to the running workers.")] = True,
    max_wait: Annotated[float, typer.Option(help="Seconds to wait for the delivery.")] = 3600.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """Copy every record of a link, matching records by key (initial sync, "Sync All").

    Every record is sent through the bus like a live change, so filters, lookups, the
    conflict log and the dead-letter queue apply. Resumable: after a crash or Ctrl-C
    run the same command again and it continues where it stopped.

    Examples:

      syncbus sync-all -c sync.yaml --link accounts --master a

      syncbus sync-all -c sync.yaml --link contacts --no-apply    # workers apply
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from bus.amqp.errors import raise_if_broker
    from bus.cli import app
    from bus.ops.syncall import sync_all
    from connectors.base import BusError, ConfigError

    setup_logging(log_level, "auto")
    loaded = load_or_exit(config, echo=lambda line: _err.print(line, markup=False)).config
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                  console=_err, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(p: SyncProgress) -> None:
            if p.direction not in tasks:
                label = f"{p.direction} ({'resumed' if p.resumed else 'reading'})"
                tasks[p.direction] = bar.add_task(label, total=p.total, rate="")
            bar.update(tasks[p.direction], completed=p.published, total=p.total,
                       rate=f"{p.rate:,.0f} rec/s")

        try:
            result = sync_all(loaded, link, master=master, restart=restart, apply=apply,
                              max_wait=max_wait, on_progress=progress, on_line=bar.console.print)
        except ConfigError as exc:
            _err.print(f"syncbus: {exc.message}", markup=False)
            raise typer.Exit(EXIT_CONFIG) from None
        except BusError as exc:
            raise_if_broker(exc, loaded.broker.url)  # one line and exit code 4 (bus.cli.main)
            _err.print(f"syncbus: {exc.message} (run the command again to continue)",
                       markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _err.print("interrupted: run the command again to continue where it stopped")
            raise typer.Exit(130) from None
    for direction, n in result.published.items():
        typer.echo(f"{direction}: {n} record(s) sent")
    if result.delivery is not None:
        raise typer.Exit(app.summarize(result.delivery, typer.echo))

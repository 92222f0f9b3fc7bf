"""``syncbus status``, ``syncbus history`` and ``syncbus link pause|resume``.

Thin: each command parses its options and calls :mod:`bus.ops.status`,
:mod:`bus.ops.runs` or :mod:`bus.ops.links`. ``bus.cli.main`` adds them with :func:`register`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bus.cli.common import ConfigOpt, Group

__all__ = ["link", "register"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

link = typer.Typer(
    help=(
        "Pause or resume a link direction (every worker obeys within a few seconds).\n\n"
        "  syncbus link pause customers -c sync.yaml --reason 'ERP maintenance'\n\n"
        "  syncbus link resume customers -c sync.yaml"
    ),
    no_args_is_help=True,
    cls=Group,
)


def status_command(
    config: ConfigOpt,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")
                        ] = 2.0,
    probe: Annotated[bool, typer.Option(
        "--probe/--no-probe", help="Check that every connection answers.")] = True,
    max_lag: Annotated[float | None, typer.Option(
        help="Seconds of detector lag tolerated (default: 3 poll intervals, at least 30).")
    ] = None,
    timeout: Annotated[float, typer.Option(
        help="Seconds each check (broker, state store, a connection) may take.")] = 10.0,
) -> None:
    """Is every link syncing? Detectors, links, broker, state store, connections.

    Exit code 0 when healthy, 1 when not (state store down, a connection not answering,
    a link paused or with transactions in error, a detector lagging), 2 for an invalid
    config, 4 when RabbitMQ cannot be used (unreachable, login refused, vhost missing):
    usable as a cron check or a container health probe.

    Examples: syncbus status -c sync.yaml · syncbus status -c sync.yaml --watch
    · syncbus status -c sync.yaml --json --max-lag 3600
    """
    from bus.ops import status

    raise typer.Exit(status.show_status(config, as_json=as_json, watch=watch, interval=interval,
                                        probe=probe, max_lag=max_lag, timeout=timeout))


def history_command(
    config: ConfigOpt,
    link_name: Annotated[str | None, typer.Option(
        "--link", help="Only this link (and its source detector).")] = None,
    since: Annotated[str | None, typer.Option(
        help="Only since then: 2h, 30m, 7d ago, or an ISO time.")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        help="Only this kind: run, link or poll (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many records (0: all).")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """The sync history: each run --until-idle, per link, and detector cycles with changes.

    Examples: syncbus history -c sync.yaml --link customers --since 1d
    · syncbus history -c sync.yaml --kind run --json
    """
    from bus.ops import runs

    raise typer.Exit(runs.show_history(config, link=link_name, since=since, kinds=kind,
                                       limit=limit or None, as_json=as_json))


@link.command()
def pause(
    name: Annotated[str, typer.Argument(help="The link to pause.")],
    config: ConfigOpt,
    reason: Annotated[str | None, typer.Option(help="Why (shown by syncbus status).")] = None,
) -> None:
    """Stop consuming a link: its changes wait in its queue, nothing is lost.

    Detection goes on; syncbus status shows the link as paused, with the reason.

    Example: syncbus link pause customers -c sync.yaml --reason 'ERP maintenance'
    """
    from bus.ops import links

    raise typer.Exit(links.set_link_paused(config, name, True, reason=reason))


@link.command()
def resume(
    name: Annotated[str, typer.Argument(help="The link to resume.")],
    config: ConfigOpt,
) -> None:
    """Consume a paused link again (what waited in its queue is delivered).

    Example: syncbus link resume customers -c sync.yaml
    """
    from bus.ops import links

    raise typer.Exit(links.set_link_paused(config, name, False))


def register(cli: typer.Typer) -> None:
    """Add ``status``, ``history`` and the ``link`` group to the ``syncbus`` command."""
    cli.command("status")(status_command)
    cli.command("history")(history_command)
    cli.add_typer(link, name="link")

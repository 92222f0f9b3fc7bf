"""``syncbus tail``: the change-event commands of the CLI (thin: see :mod:`bus.ops.tail`).

Registered on the main CLI by :func:`register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bus.cli.common import AMQP_URL_ENV, EXIT_CONFIG, echo_err, load_or_exit

__all__ = ["register", "tail_command"]

EXIT_OK = 0
EXIT_FAILED = 1


def register(cli: typer.Typer) -> None:
    """Add the ``tail`` command to ``cli``."""
    cli.command(name="tail")(tail_command)


def tail_command(
    pattern: Annotated[str, typer.Argument(
        help="Routing-key pattern <connection>.<entity>.<op>: * is one word, # any number.",
        metavar="PATTERN", show_default=True)] = "#",
    from_: Annotated[str | None, typer.Option(
        "--from", metavar="WHERE",
        help="Replay the history stream from: first, last, next, an offset (1234), a time "
             "ago (90s, 15m, 2h, 7d) or an ISO 8601 time (2026-03-01T08:00:00Z; local time "
             "without an offset). Without --from: only events published from now on.")
    ] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print each event's raw CloudEvents JSON, one per line.")] = False,
    limit: Annotated[int | None, typer.Option(
        "--limit", "-n", min=1, help="Exit after this many events.")] = None,
    idle: Annotated[float | None, typer.Option(
        "--idle", min=0.1, metavar="SECONDS",
        help="Exit when no matching event arrived for this long (scripts: replay what is "
             "there, then stop).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", envvar="SYNCBUS_CONFIG",
        help="Take the broker URL from this config file.")] = None,
    amqp_url: Annotated[str | None, typer.Option(
        "--amqp-url", envvar=AMQP_URL_ENV,
        help="The broker (default: the config's, else amqp://guest:guest@127.0.0.1:5672/).")
    ] = None,
) -> None:
    """Watch change events: one line per event, or raw JSON; Ctrl-C stops.

    Each line: time, routing key, key, version, changed fields (* when the source does
    not say which); replayed events start with their stream offset (#1234).

    Examples:

      syncbus tail                                  # every event from now on

      syncbus tail 'crm.customers.*' -c sync.yaml   # one entity of one connection

      syncbus tail '*.*.delete'                     # deletions anywhere

      syncbus tail 'crm.#' --from 1h                # the last hour of crm, then live

      syncbus tail --from first --limit 10          # the 10 oldest events kept

      syncbus tail 'crm.#' --from 1h --idle 5       # the last hour, then exit when quiet

      syncbus tail --from 2026-03-01T08:00 --json | jq .data.key

    Quote patterns containing * or # so the shell leaves them alone.
    """
    from bus.amqp.errors import raise_if_broker
    from bus.amqp.events import amqp_url as url_or_default
    from bus.amqp.history import HistoryUnavailable, Start, parse_start
    from bus.core.log import configure_logging
    from bus.core.redact import redact_url
    from bus.ops.tail import tail
    from connectors.base import BusError, ConfigError

    configure_logging("warning", "auto")
    start: Start | None = None
    if from_ is not None:
        try:
            start = parse_start(from_)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--from") from None
    url = amqp_url or _config_url(config)
    try:
        url_or_default(url)
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    where = "live events" if start is None else f"the history from {from_}"
    ready = f"watching {where} matching {pattern!r} at {redact_url(url_or_default(url))}; Ctrl-C stops"
    try:
        tail(url=url, pattern=pattern, start=start, limit=limit, as_json=as_json,
             idle_timeout=idle, on_ready=lambda: typer.echo(ready, err=True))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None
    except HistoryUnavailable as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except BusError as exc:
        raise_if_broker(exc, url_or_default(url))  # one line and exit code 4 (bus.cli.main)
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


def _config_url(path: Path | None) -> str | None:
    """The broker URL of the config file at ``path`` (None without a file)."""
    if path is None:
        return None
    return load_or_exit(path, echo=echo_err).config.broker.url

"""The ``syncbus`` command line. Thin: it parses arguments and calls ``bus.cli.app``.

Exit codes: 0 success · 1 something failed (dead-lettered records, unreachable
system) · 2 invalid configuration · 3 ``--until-idle`` gave up waiting · 4 RabbitMQ
cannot be used (unreachable, login refused, vhost missing, a permission missing) ·
130 Ctrl-C.

Every command runs inside :class:`_Commands`, which turns RabbitMQ being unusable
(:mod:`bus.amqp.errors`) into one line on stderr and exit code 4; the traceback
only with ``--log-level debug``.

Importing this module builds the whole command tree but imports no implementation: each
command imports what it runs (:mod:`bus.cli.app`, :mod:`bus.ops`, the broker, the state
store) when it is called, so ``syncbus --help`` starts at once
(``tests/unit/test_cli_imports.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bus.cli.common import (
    AMQP_URL_ENV,
    DEFAULT_AMQP_URL,
    ConfigOpt,
    Group,
    debug_logging,
    redacted_traceback,
    setup_logging,
)
from bus.cli.emulate import emulate
from bus.cli.events import register as register_event_commands
from bus.cli.meta import register as register_meta_commands
from bus.cli.ops import register as register_ops_commands
from bus.cli.preview import register as register_preview_command
from bus.cli.sync import register as register_sync_commands
from bus.cli.tx import tx

__all__ = ["main"]


class _Commands(Group):
    """The command group: reports RabbitMQ being unusable in one line (exit code 4)."""

    def invoke(self, ctx: Any) -> Any:  # typer's own (vendored) click.Context
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise  # the command has reported and chosen its exit code
        except Exception as exc:
            from bus.amqp.errors import EXIT_BROKER, BrokerUnavailable, explain

            problem = exc if isinstance(exc, BrokerUnavailable) else explain(exc)
            if problem is None:
                raise
            if debug_logging():
                typer.echo(redacted_traceback(exc), err=True, nl=False)
            typer.echo(f"syncbus: {problem.message}", err=True)
            raise typer.Exit(EXIT_BROKER) from None


cli = typer.Typer(
    name="syncbus",
    help=(
        "Keep business systems in sync through RabbitMQ.\n\n"
        "Typical session:\n\n"
        "  syncbus validate --config sync.yaml     # check the config against the live systems\n\n"
        "  syncbus setup --config sync.yaml        # prepare sources for change tracking\n\n"
        "  syncbus run --config sync.yaml          # sync continuously until Ctrl-C\n\n"
        "  syncbus run --config sync.yaml --until-idle   # one 'Sync All' pass (cron)\n\n"
        "  syncbus tx list --config sync.yaml      # the offline-transaction log\n\n"
        "  syncbus tail 'crm.customers.*'          # watch change events live\n\n"
        "  syncbus demo                            # Dynamics ↔ SQL ↔ Business Central on emulators"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
)

LogLevel = Annotated[str, typer.Option(help="debug, info, warning or error.")]
LogFormat = Annotated[str, typer.Option(help="auto (console on a terminal, else json), json, console.")]


@cli.command()
def validate(config: ConfigOpt, log_level: LogLevel = "warning") -> None:
    """Check a config file: shape, URLs, and every connection, entity and field it names.

    Every problem is reported with file, line and field; exit code 2 when there is one.

    Example: syncbus validate --config sync.yaml
    """
    from bus.cli import app

    setup_logging(log_level, "auto")
    raise typer.Exit(app.validate(config, echo=typer.echo))


@cli.command()
def setup(config: ConfigOpt, log_level: LogLevel = "warning") -> None:
    """Prepare every source entity of the config for change tracking (idempotent).

    For SQL sources: a row-version column kept by database triggers (so changes made by
    any program are seen) and a tombstone table filled by a delete trigger. Existing
    rows get versions too, so the first run loads them.

    Example: syncbus setup --config sync.yaml
    """
    from bus.cli import app

    setup_logging(log_level, "auto")
    raise typer.Exit(app.setup(config, echo=typer.echo))


@cli.command()
def run(
    config: ConfigOpt,
    until_idle: Annotated[bool, typer.Option(
        "--until-idle", help="Poll every source once, deliver everything pending, exit.")] = False,
    max_wait: Annotated[float, typer.Option(
        help="With --until-idle: seconds to wait for pending deliveries (retries included).")
    ] = 600.0,
    log_level: LogLevel = "info",
    log_format: LogFormat = "auto",
) -> None:
    """Run detectors and mapping consumers; validates the config first.

    Without --until-idle it keeps the targets in sync until Ctrl-C (or SIGTERM); the
    batches in flight finish before it exits. With --until-idle it is the cron-friendly
    'Sync All': exit 0 when everything was delivered, 1 when something went to the
    dead-letter queue (summary printed), 3 when pending retries outlived --max-wait.

    Examples:

      syncbus run --config sync.yaml

      syncbus run --config sync.yaml --until-idle --log-level warning
    """
    from bus.cli import app

    setup_logging(log_level, log_format)
    raise typer.Exit(app.run(config, until_idle=until_idle, max_wait=max_wait, echo=typer.echo))


@cli.command()
def login(
    config: ConfigOpt,
    connection: Annotated[str, typer.Argument(
        help="The Dataverse or Business Central connection to sign in to.")],
    log_level: LogLevel = "warning",
) -> None:
    """Sign an operator in to a Dataverse or Business Central connection (device code).

    Prints a URL and a code to enter in a browser; the tokens are then kept in a
    cache readable by this user only and renewed automatically. A connection with
    neither client_secret nor certificate_path uses them.

    Example: syncbus login --config sync.yaml crm
    """
    from bus.cli import app

    setup_logging(log_level, "auto")
    raise typer.Exit(app.login(config, connection, echo=typer.echo))


@cli.command()
def demo(
    directory: Annotated[Path, typer.Option(
        "--dir", help="Where the hub, the state store, certificates and sync.yaml are written.")
    ] = Path(".syncbus/demo"),
    accounts: Annotated[int, typer.Option(
        min=10, max=5000, help="Dynamics accounts to seed (each with 1-3 contacts).")] = 100,
    customers: Annotated[int, typer.Option(
        min=10, max=5000, help="Business Central customers to seed.")] = 100,
    keep_running: Annotated[bool, typer.Option(
        "--keep-running", help="After the script, keep everything up and syncing until Ctrl-C.")
    ] = False,
    amqp_url: Annotated[str, typer.Option(
        envvar=AMQP_URL_ENV, help="RabbitMQ to use.")] = DEFAULT_AMQP_URL,
    log_level: LogLevel = "error",
) -> None:
    """Dynamics 365 ↔ SQL hub ↔ Business Central, two-way, on emulators, step by step.

    Starts the Dataverse and Business Central emulators and a SQLite hub on this
    machine, seeds them, writes DIR/sync.yaml and runs the bus with a live view of
    every link. Then: edits on each side, a conflicting edit, a record the hub refuses
    (shown in the offline-transaction log, fixed, replayed); one line per step, each
    checked on all three systems (exit code 1 names the step that failed). Needs a
    RabbitMQ; without one it says how to start one.

    Examples:

      syncbus demo

      syncbus demo --keep-running        # then explore: syncbus status -c .syncbus/demo/sync.yaml

      syncbus demo --accounts 500 --dir /tmp/demo
    """
    from bus.cli import app

    setup_logging(log_level, "auto")
    raise typer.Exit(app.demo(directory, amqp_url=amqp_url, accounts=accounts,
                              customers=customers, keep_running=keep_running, echo=typer.echo))


cli.add_typer(emulate, name="emulate")
register_event_commands(cli)
cli.add_typer(tx, name="tx")
register_ops_commands(cli)
register_sync_commands(cli)
register_meta_commands(cli)
register_preview_command(cli)


def main() -> None:
    """Console-script entry point."""
    cli()

"""What the command modules of the CLI share: the ``--config`` option and loading the
config, logging set-up, and the command-group class.

Cheap to import (typer only), like the command modules themselves: every command imports
its implementation inside the command function, so that ``syncbus --help`` starts at
once (``tests/unit/test_cli_imports.py``).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    from bus.config.load import LoadedConfig

__all__ = [
    "AMQP_URL_ENV",
    "ConfigOpt",
    "DEFAULT_AMQP_URL",
    "EXIT_CONFIG",
    "Echo",
    "Group",
    "configure_logging",
    "debug_logging",
    "echo_err",
    "load_or_exit",
    "redacted_traceback",
    "setup_logging",
]

#: Exit code of an invalid configuration or invalid arguments.
EXIT_CONFIG = 2
#: The environment variable naming the broker (``bus.amqp.events.AMQP_URL_ENV``; the
#: broker floor is not imported to build the options).
AMQP_URL_ENV = "SYNCBUS_AMQP_URL"
#: The broker used without a URL (``bus.amqp.events.DEFAULT_AMQP_URL``).
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

Echo = Callable[[str], None]

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="The YAML config file.", envvar="SYNCBUS_CONFIG")
]


class Group(TyperGroup):
    """A command group whose ``--help`` flag is False, not None, when not given.

    typer converts an option's value with a pydantic ``TypeAdapter`` built on first use
    (importing pydantic takes about 0.1 s), except a bool flag that already is a bool. A
    group's ``--help`` is processed whenever one of its commands is called, so without
    this ``syncbus status --help`` imported pydantic to convert the group's unset flag.
    """

    def get_help_option(self, ctx: Any) -> Any:  # typer's own (vendored) click types
        option = super().get_help_option(ctx)
        if option is not None and option.default is None:
            option.default = False
        return option


class _Logging:
    debug = False  # set by setup_logging: tracebacks of translated errors are shown


def configure_logging(level: str, fmt: str) -> None:
    """:func:`bus.core.log.configure_logging`, imported when a command runs (structlog)."""
    from bus.core.log import configure_logging as configure

    configure(level, fmt)


def setup_logging(level: str, fmt: str) -> None:
    """Configure logging for a command (``--log-level``, ``--log-format``)."""
    _Logging.debug = level.lower() == "debug"
    configure_logging(level, fmt)


def debug_logging() -> bool:
    """True when the command runs with ``--log-level debug`` (tracebacks are shown)."""
    return _Logging.debug


def redacted_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as text, passwords in URLs masked."""
    from bus.core.redact import redact_text

    return redact_text("".join(traceback.format_exception(exc)))


def echo_err(line: str) -> None:
    """Print one line on stderr."""
    typer.echo(line, err=True)


def load_or_exit(path: Path, *, echo: Echo = typer.echo, check_urls: bool = False
                 ) -> LoadedConfig:
    """The config at ``path``; or print each of its problems and exit with code 2.

    Args:
        path: The YAML config file.
        echo: Prints one line (default: stdout).
        check_urls: Also check every URL without connecting, as the commands that go
            on to connect do.

    Returns:
        The loaded config.

    Raises:
        typer.Exit: with :data:`EXIT_CONFIG`, after the problems were printed.
    """
    from bus.config.load import load_or_report

    loaded = load_or_report(path, echo, check_urls=check_urls)
    if loaded is None:
        raise typer.Exit(EXIT_CONFIG)
    return loaded

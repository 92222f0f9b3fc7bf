"""What the CLI commands do, as plain functions that tests call directly.

Each function takes an ``echo`` callable for its human-readable lines and returns
the process exit code (see ``bus.cli.main``). When RabbitMQ cannot be used they raise
:class:`~bus.amqp.errors.BrokerUnavailable` (one line; the CLI prints it and exits
with :data:`EXIT_BROKER`); ``validate`` reports it as a check instead.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from bus.amqp.errors import EXIT_BROKER, BrokerUnavailable, broker_errors
from bus.config.io import inline_secrets
from bus.config.load import LoadedConfig, load_or_report, report_problems
from bus.config.validate import check_broker, link_notes, validate_config
from bus.worker.worker import RunSummary, Worker
from connectors.base import BusError, ConfigError

__all__ = [
    "EXIT_BROKER",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "demo",
    "login",
    "run",
    "setup",
    "summarize",
    "validate",
]

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_TIMEOUT = 3

Echo = Callable[[str], None]


def _check_live(loaded: LoadedConfig, worker: Worker, echo: Echo, *,
                tracking: bool = False) -> bool:
    """Validate against the live systems; with ``tracking`` (run), tolerate outages."""
    unreachable: list[str] | None = [] if tracking else None
    refused: dict[str, list[str]] | None = {} if tracking else None
    problems = validate_config(loaded, worker.describe, unreachable=unreachable, by_link=refused)
    for conn in unreachable or ():
        echo(f"warning: connection {conn!r} is unreachable; its links start anyway, "
             "their changes wait in retry until it is back")
    for name, lines in (refused or {}).items():
        echo(f"warning: link {name!r} does not match the live schema and will not run "
             "(the other links do); fix the config or the systems, see `syncbus schema diff`:")
        for line in lines:
            echo(f"  {line}")
    if tracking and not problems:
        problems = _untracked_sources(loaded, worker)
    if problems:
        headline = f"{loaded.path}: invalid configuration ({_plural(len(problems), 'problem')})"
        report_problems(ConfigError(headline, problems), echo)
        return False
    return True


def _untracked_sources(loaded: LoadedConfig, worker: Worker) -> list[str]:
    """Sources that ``syncbus setup`` has not prepared yet, located."""
    problems = []
    for flow in worker.flows():
        try:
            info = worker.describe(flow.source.connection).get(flow.source.entity)
        except BusError:
            continue  # unreachable: the detector retries until it is back
        if info is not None and not info.change_tracking:
            side = "source" if flow.direction == "a2b" else "target"
            problems.append(loaded.problem(
                ("links", flow.link, side, "entity"),
                f"{flow.source.connection}.{flow.source.entity} is not prepared for change "
                f"tracking: run `syncbus setup --config {loaded.path}` first"))
    return problems


def _with_worker(path: Path, echo: Echo, body: Callable[[LoadedConfig, Worker], int], *,
                 tracking: bool = False) -> int:
    """Load and check the config against the live systems, then run ``body``.

    Raises:
        BrokerUnavailable: RabbitMQ cannot be used (unreachable, login refused, vhost
            missing, a permission missing).
    """
    loaded = load_or_report(path, echo, check_urls=True)
    if loaded is None:
        return EXIT_CONFIG
    return _with_loaded(loaded, echo, body, tracking=tracking)


def _with_loaded(loaded: LoadedConfig, echo: Echo, body: Callable[[LoadedConfig, Worker], int],
                 *, tracking: bool = False) -> int:
    worker = Worker(loaded.config)
    try:
        with broker_errors(loaded.config.broker.url):
            worker.open_connectors()
            if not _check_live(loaded, worker, echo, tracking=tracking):
                return EXIT_CONFIG
            return body(loaded, worker)
    except BrokerUnavailable:
        raise
    except BusError as exc:
        echo(f"syncbus: {exc.message}")
        return EXIT_FAILED
    finally:
        worker.close()


def validate(path: Path, *, echo: Echo = print) -> int:
    """Check ``path``: its schema, RabbitMQ (login, vhost, permissions) and the live systems.

    Inline secrets are warnings. Exit code 2 for problems in the config, else 4 when
    RabbitMQ cannot be used as configured, else 0.
    """
    loaded = load_or_report(path, echo, check_urls=True)
    if loaded is None:
        return EXIT_CONFIG
    for secret in inline_secrets(loaded):
        echo("warning: " + loaded.problem(
            secret.loc, f"{secret.what}: write ${{{secret.variable}}} instead and set that "
            "environment variable where syncbus runs (or use ${file:/run/secrets/...})"))
    checks = check_broker(loaded.config.broker.url)
    for check in checks:
        echo(f"broker  {check.line()}")
    broker_ok = all(check.ok for check in checks)

    def report(loaded: LoadedConfig, worker: Worker) -> int:
        cfg = loaded.config
        counts = f"{_plural(len(cfg.connections), 'connection')}, {_plural(len(cfg.links), 'link')}"
        if broker_ok:
            echo(f"{path}: OK — {counts}")
        else:
            echo(f"{path}: the configuration is valid ({counts}), but RabbitMQ cannot be used "
                 "as configured (see the broker lines above)")
        for note in [*link_notes(loaded), *_untracked_sources(loaded, worker)]:
            echo(f"  note: {note}")
        return EXIT_OK if broker_ok else EXIT_BROKER

    return _with_loaded(loaded, echo, report)


def setup(path: Path, *, echo: Echo = print) -> int:
    """Prepare the source entities of every enabled link for change tracking.

    Raises:
        BrokerUnavailable: RabbitMQ cannot be used (see ``_with_worker``).
    """

    def prepare(_loaded: LoadedConfig, worker: Worker) -> int:
        for line in worker.prepare_sources():
            echo(line)
        return EXIT_OK

    return _with_worker(path, echo, prepare)


def run(path: Path, *, until_idle: bool = False, max_wait: float = 600.0,
        echo: Echo = print, stop: threading.Event | None = None) -> int:
    """Validate, then sync continuously (until ``stop`` / Ctrl-C) or until idle.

    Raises:
        BrokerUnavailable: RabbitMQ cannot be used: unreachable, login refused, vhost
            missing, a permission missing (one line; exit code 4 in the CLI).
    """

    def sync(_loaded: LoadedConfig, worker: Worker) -> int:
        worker.open()
        if until_idle:
            summary = worker.run_until_idle(max_wait=max_wait, on_progress=echo)
            return summarize(summary, echo)
        worker.run(stop or _signal_stop())
        return EXIT_OK

    return _with_worker(path, echo, sync, tracking=True)


def login(path: Path, connection: str, *, echo: Echo = print) -> int:
    """Interactive operator sign-in (device code) for a Dataverse or Business Central
    connection."""
    loaded = load_or_report(path, echo, check_urls=True)
    if loaded is None:
        return EXIT_CONFIG
    config = loaded.config.connections.get(connection)
    if config is None or config.type == "sql":
        names = [n for n, c in loaded.config.connections.items() if c.type != "sql"]
        echo(f"{connection!r} is not a Dataverse or Business Central connection of {path} "
             f"(those are: {', '.join(names) or 'none'})")
        return EXIT_CONFIG
    from connectors.business_central.auth import login as business_central_login
    from connectors.dataverse import login as dataverse_login

    try:
        if config.type == "dataverse":
            cache = dataverse_login(connection, config, echo)
        else:
            cache = business_central_login(connection, config, echo)
    except BusError as exc:
        echo(f"sign-in failed: {exc.message}")
        return EXIT_FAILED
    echo(f"signed in; tokens kept in {cache} (readable by this user only)")
    if config.client_secret is not None or config.certificate_path:
        echo(f"note: {connection} has client_secret or certificate_path set, so syncbus uses "
             "the application's credential, not this sign-in; remove them to use it")
    return EXIT_OK


def demo(directory: Path, *, amqp_url: str, accounts: int = 100, customers: int = 100,
         keep_running: bool = False, live: bool | None = None, echo: Echo = print) -> int:
    """Dynamics ↔ SQL hub ↔ Business Central on emulators, scripted (see ``bus.demo.run``)."""
    from bus.demo.run import run_demo

    return run_demo(directory, amqp_url=amqp_url, accounts=accounts, customers=customers,
                    keep_running=keep_running, live=live, echo=echo)


def _signal_stop() -> threading.Event:
    """An event set by the first SIGINT or SIGTERM; a second Ctrl-C interrupts hard."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def summarize(summary: RunSummary, echo: Echo) -> int:
    """Print a run's summary; returns the exit code (0 ok, 1 dead letters, 3 timed out)."""
    for link in summary.links:
        echo(f"link {link.link}: {link.upserted} upserted, {link.deleted} deleted, "
             f"{link.skipped} skipped, {link.retried} retried, {link.dead} dead-lettered"
             + (f", {link.pending} still pending" if link.pending else ""))
    for error in summary.errors:
        echo(f"error: {error}")
    echo(f"done in {summary.seconds:.1f}s")
    if summary.dead:
        echo(f"{summary.dead} change(s) went to the dead-letter queue in this run "
             f"({summary.dead_total} waiting there in all); see the x-syncbus-error headers")
        return EXIT_FAILED
    if summary.errors:
        return EXIT_FAILED
    if summary.timed_out:
        echo("gave up waiting: changes are still pending (in retry); they stay queued")
        return EXIT_TIMEOUT
    return EXIT_OK


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"

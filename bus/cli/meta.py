"""``syncbus config export|import`` and ``syncbus schema pull|diff``: metadata commands.

Thin: each command loads the config, calls :mod:`bus.config.io`,
:mod:`bus.ops.schema_pull` or :mod:`bus.config.drift`, prints one line per finding and
returns an exit code (0 done / clean, 1 failed / drifted, 2 invalid configuration
or arguments). ``bus.cli.main`` adds them with :func:`register`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bus.cli.common import (
    EXIT_CONFIG,
    ConfigOpt,
    Group,
    configure_logging,
    echo_err,
    load_or_exit,
)

if TYPE_CHECKING:
    from bus.config.load import LoadedConfig

__all__ = ["config_app", "register", "schema_app"]

EXIT_OK = 0
EXIT_FAILED = 1

LogLevel = Annotated[str, typer.Option(help="debug, info, warning or error (to stderr).")]

config_app = typer.Typer(
    help=(
        "Export or import the whole configuration as one canonical YAML file.\n\n"
        "Secrets are never written: ${VAR} and ${file:...} references are kept as written,\n"
        "an inline password or client secret becomes a ${NAME} reference (with a warning\n"
        "naming the variable to set).\n\n"
        "  syncbus config export -c sync.yaml --out exported.yaml\n\n"
        "  syncbus config import exported.yaml -c sync.yaml --dry-run    # show the diff\n\n"
        "  syncbus config import exported.yaml -c sync.yaml --replace"
    ),
    no_args_is_help=True,
    cls=Group,
)

schema_app = typer.Typer(
    help=(
        "Bring metadata over from a source, and check links against live metadata.\n\n"
        "  syncbus schema pull -c sync.yaml --from crm --into warehouse --entities account,contact\n\n"
        "  syncbus schema pull -c sync.yaml --from crm --into warehouse --emit-config links.yaml\n\n"
        "  syncbus schema diff -c sync.yaml            # exit 1 when a link drifted"
    ),
    no_args_is_help=True,
    cls=Group,
)


def register(cli: typer.Typer) -> None:
    """Add the ``config`` and ``schema`` groups to the ``syncbus`` command."""
    cli.add_typer(config_app, name="config")
    cli.add_typer(schema_app, name="schema")


# -- config export / import ------------------------------------------------------------


@config_app.command("export")
def export_command(
    config: ConfigOpt,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write here instead of printing (stdout).")] = None,
) -> None:
    """Print (or write) the configuration in canonical form, without any secret.

    Defaults are left out, references (${VAR}, ${file:...}) are kept as written, and
    exporting the export gives the same bytes. The variables the file references must
    be set (it is validated like `syncbus validate` does, without connecting).

    Examples:

      syncbus config export -c sync.yaml > sync.canonical.yaml

      syncbus config export -c sync.yaml --out /backup/sync-$(date +%F).yaml
    """
    from bus.config.io import export_config
    from bus.config.load import report_problems
    from connectors.base import ConfigError

    try:
        exported = export_config(config)
    except ConfigError as exc:
        report_problems(exc, echo_err)
        raise typer.Exit(EXIT_CONFIG) from None
    for warning in exported.warnings:
        echo_err(f"warning: {warning}")
    if out is None:
        typer.echo(exported.text, nl=False)
    else:
        out.write_text(exported.text, encoding="utf-8")
        echo_err(f"wrote {out}")
    raise typer.Exit(EXIT_OK)


@config_app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(help="The file to import (e.g. an export).")],
    config: ConfigOpt,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Overwrite an existing config (the old one is kept as <config>.bak).")
    ] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate and print the diff; write nothing.")] = False,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Skip the checks against the live systems.")] = False,
    log_level: LogLevel = "warning",
) -> None:
    """Validate FILE fully, then write it (in canonical form) as the config.

    Checked like `syncbus validate`: shape, references, URLs and, unless --offline,
    every connection, entity and field against the live systems. Nothing is written
    when a check fails.

    Examples:

      syncbus config import exported.yaml -c sync.yaml

      syncbus config import exported.yaml -c sync.yaml --dry-run

      syncbus config import exported.yaml -c sync.yaml --replace --offline
    """
    from bus.config.io import import_config
    from bus.config.load import report_problems
    from connectors.base import BusError, ConfigError

    configure_logging(log_level, "auto")
    try:
        done = import_config(file, config, replace=replace, dry_run=dry_run,
                             live=None if offline else _live_check)
    except ConfigError as exc:
        report_problems(exc, typer.echo)
        raise typer.Exit(EXIT_CONFIG) from None
    except BusError as exc:
        typer.echo(f"syncbus: {exc.message}")
        raise typer.Exit(EXIT_FAILED) from None
    for warning in done.warnings:
        typer.echo(f"warning: {warning}")
    if dry_run:
        typer.echo(done.diff.rstrip("\n") if done.changed else f"{config}: no change")
    elif not done.changed:
        typer.echo(f"{config}: already up to date, nothing written")
    else:
        kept = f" (previous version kept as {done.backup})" if done.backup else ""
        typer.echo(f"wrote {config}{kept}")
    raise typer.Exit(EXIT_OK)


# -- schema pull / diff ---------------------------------------------------------------


@schema_app.command("pull")
def pull_command(
    config: ConfigOpt,
    from_: Annotated[str, typer.Option(
        "--from", help="The connection whose metadata is read (any type).")],
    into: Annotated[str, typer.Option(
        "--into", help="The SQL connection that gets the tables and columns.")],
    entities: Annotated[str | None, typer.Option(
        help="Comma-separated entities (default: every entity the source describes).")] = None,
    emit_config: Annotated[Path | None, typer.Option(
        "--emit-config", help="Write a starting config: one link per entity, source → table.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; change nothing.")
                       ] = False,
    log_level: LogLevel = "warning",
) -> None:
    """Create tables and columns in a SQL connection from a source's metadata.

    One table per entity, one column per field (type mapping: docs/metadata.md), the
    entity's key as primary key, alternate keys as unique indexes, lookup columns
    indexed. Run it again after the source changed: new entities and fields are
    added; nothing is dropped or altered, and no row is touched. What disappeared or
    changed type in the source is reported. One line per action.

    Examples:

      syncbus schema pull -c sync.yaml --from crm --into warehouse --entities account,contact

      syncbus schema pull -c sync.yaml --from erp --into warehouse --dry-run

      syncbus schema pull -c sync.yaml --from crm --into warehouse --emit-config links.yaml
    """
    from bus.config.io import canonical_yaml
    from bus.ops.schema_pull import link_config, pull_schema
    from bus.worker.worker import Worker
    from connectors.base import BusError

    configure_logging(log_level, "auto")
    loaded = load_or_exit(config, check_urls=True)
    conns = loaded.config.connections
    for option, name in (("--from", from_), ("--into", into)):
        if name not in conns:
            typer.echo(f"{option} {name}: no such connection in {config} "
                       f"(known: {', '.join(conns)})")
            raise typer.Exit(EXIT_CONFIG)
    wanted = [e.strip() for e in entities.split(",") if e.strip()] if entities else None
    worker = Worker(loaded.config)
    try:
        worker.open_connectors()
        target = worker.connectors[into]
        if not target.capabilities.table_creation:
            typer.echo(f"--into {into}: is a {conns[into].type} connection, which cannot create "
                       "tables; schema pull creates tables in a sql connection")
            raise typer.Exit(EXIT_CONFIG)
        result = pull_schema(worker.connectors[from_], from_, target, entities=wanted,
                             dry_run=dry_run)
    except BusError as exc:
        typer.echo(f"syncbus: {loaded.scrub(exc.message)}")
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        worker.close()
    for line in result.lines():
        typer.echo(line)
    if emit_config is not None and not dry_run:
        links, skipped = link_config(from_, into, result.entities)
        for entity, reason in skipped.items():
            typer.echo(f"{entity}: no link emitted, {reason}")
        emitted = loaded.config.model_copy(update={"links": links})
        raw = _raw_without_links(loaded)
        text = canonical_yaml(emitted, raw)
        for warning in text.warnings:
            typer.echo(f"warning: {warning}")
        emit_config.write_text(text.text, encoding="utf-8")
        typer.echo(f"wrote {emit_config}: {len(links)} link(s); check it with "
                   f"`syncbus validate --config {emit_config}`")
    raise typer.Exit(EXIT_FAILED if result.failed else EXIT_OK)


@schema_app.command("diff")
def diff_command(
    config: ConfigOpt,
    link: Annotated[list[str] | None, typer.Option(
        "--link", help="Only this link (repeatable).")] = None,
    accept: Annotated[bool, typer.Option(
        "--accept", help="Record the current field types as the baseline (after a type "
        "change was dealt with).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: link → lines.")] = False,
    log_level: LogLevel = "warning",
) -> None:
    """Compare every link with the live metadata: what no longer exists or changed type.

    Per link: its entities, key fields and mapped fields (both sides) that are gone,
    and fields whose type differs from when the link first saw them. Exit 0 when
    every link is clean, 1 when one drifted. A worker refuses a drifted link (and
    runs the others) until it is fixed, or its new types accepted with --accept.

    Examples:

      syncbus schema diff -c sync.yaml

      syncbus schema diff -c sync.yaml --link customers --json

      syncbus schema diff -c sync.yaml --accept
    """
    configure_logging(log_level, "auto")
    loaded = load_or_exit(config, check_urls=True)
    unknown = [n for n in link or () if n not in loaded.config.links]
    if unknown:
        typer.echo(f"--link {unknown[0]}: no such link in {config} "
                   f"(known: {', '.join(loaded.config.links) or 'none'})")
        raise typer.Exit(EXIT_CONFIG)
    report = _diff(loaded, link or list(loaded.config.links), accept)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        for name, lines in report.items():
            typer.echo(f"link {name}: " + ("OK" if not lines else f"{len(lines)} problem(s)"))
            for line in lines:
                typer.echo(f"  {loaded.scrub(line)}")
    raise typer.Exit(EXIT_FAILED if any(report.values()) else EXIT_OK)


# -- helpers --------------------------------------------------------------------------------


def _diff(loaded: LoadedConfig, names: list[str], accept: bool) -> dict[str, list[str]]:
    """The drift report; with ``accept``, record the current types first."""
    from bus.config.drift import SchemaBaseline, link_drift, link_field_types
    from bus.state.store import StateStore
    from bus.worker.worker import Worker
    from connectors.base import BusError

    cfg = loaded.config
    worker = Worker(cfg)
    state = None
    try:
        worker.open_connectors()
        state = StateStore(cfg.state.url)
        baseline = SchemaBaseline(state.engine)
        if accept:
            for name in names:
                baseline.record(name, link_field_types(cfg.links[name], worker.describe),
                                replace=True)
        report = link_drift(cfg, worker.describe, links=names, baseline=baseline)
        for name, lines in report.items():
            if not lines:  # first sight of new fields
                baseline.record(name, link_field_types(cfg.links[name], worker.describe))
        return report
    except BusError as exc:
        typer.echo(f"syncbus: {loaded.scrub(exc.message)}")
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        worker.close()
        if state is not None:
            state.close()


def _live_check(loaded: LoadedConfig) -> list[str]:
    """``syncbus validate``'s checks against the live systems."""
    from bus.config.validate import validate_config
    from bus.worker.worker import Worker

    worker = Worker(loaded.config)
    try:
        worker.open_connectors()
        return validate_config(loaded, worker.describe)
    finally:
        worker.close()


def _raw_without_links(loaded: LoadedConfig) -> dict[str, object]:
    """The config file's document without interpolation, ``links`` left out."""
    from bus.config.io import raw_document

    raw = raw_document(loaded.path)
    return {k: v for k, v in raw.items() if k != "links"} if isinstance(raw, dict) else {}

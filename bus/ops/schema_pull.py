"""``syncbus schema pull``: create tables and columns from a source's metadata.

Resco's "Update Server" as a command: the source connector describes its entities
(Dataverse ``EntityDefinitions``, Business Central ``$metadata``, SQL reflection) and
the target connector creates one table per entity, with one column per field, its key
and unique keys, and indexed lookups. Only a connector that declares
``Capabilities.table_creation`` can be the target (a SQL connection:
``connectors/sql/ddl.py`` says how tables are made, ``docs/metadata.md`` which types
fields get).

Re-running it is safe and is how metadata changes are brought over: new entities
become tables, new fields become columns. Nothing is ever dropped or altered: what
disappeared from the source or changed there is reported and left as it is, and no
row is touched. The target remembers what was pulled from which source, so an entity
that disappeared from the source is reported too.

:func:`pull_schema` plans and applies; :func:`link_config` turns what was pulled
into a starting link config (one link per entity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from connectors.base import ConfigError, Connector, EntityInfo, SchemaError
from connectors.features import TableChange, TableCreator
from schemas.config import Endpoint, LinkConfig
from schemas.event import valid_name

__all__ = ["PullResult", "link_config", "pull_schema", "table_creator"]


@dataclass
class PullResult:
    """What a pull did (or, dry, would do)."""

    actions: list[TableChange]
    #: The source's entities that exist (and now have tables).
    entities: list[EntityInfo]
    #: Entities asked for or pulled before that the source no longer has.
    missing: list[str]
    dry_run: bool = False
    #: Tables whose changes failed (and were rolled back), one action each.
    failed: list[TableChange] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per action: ``account.telephone1: add column TEXT (string)``."""
        return [_line(a, dry_run=self.dry_run) for a in self.actions]


def pull_schema(source: Connector, source_name: str, target: Connector, *,
                entities: Sequence[str] | None = None, dry_run: bool = False) -> PullResult:
    """Create or extend tables in ``target`` from the metadata of ``source``.

    Args:
        source: The connector to describe.
        source_name: Its connection name (recorded with what was pulled).
        target: The connector to create tables in (it declares ``table_creation``).
        entities: Entities to pull (default: everything the source describes).
        dry_run: Plan and report only; change nothing.

    Returns:
        The actions, the entities pulled and those missing from the source.

    Raises:
        ConfigError: ``target`` cannot create tables.
        SchemaError: an entity named in ``entities`` does not exist and was never
            pulled from this source before.
        ConnectorUnavailable: the source or the target cannot be reached.
    """
    creator = table_creator(target)
    infos, missing = _describe(source, entities, creator.pulled_entities(source_name))
    changes = creator.create_tables(source_name, infos, dry_run=dry_run)
    failed = [c for c in changes if c.failed]
    actions = [c for c in changes if not c.failed]
    actions += [TableChange(name, "no longer in the source; the table is kept", applied=False)
                for name in missing]
    return PullResult(actions + failed, infos, missing, dry_run, failed)


def table_creator(connector: Connector) -> TableCreator:
    """``connector`` as a :class:`~connectors.features.TableCreator`.

    Raises:
        ConfigError: it does not declare ``table_creation``: it cannot create tables.
    """
    if not connector.capabilities.table_creation:
        raise ConfigError(f"connection {connector.name!r} cannot create tables (its connector "
                          "does not declare table_creation); pull into one that can, such as a "
                          "sql connection")
    return cast(TableCreator, connector)


def link_config(source: str, target: str,
                entities: Sequence[EntityInfo]) -> tuple[dict[str, LinkConfig], dict[str, str]]:
    """One link per pulled entity: ``source`` entity → the table of the same name.

    Every field is mapped (target column ← same-named source field), keyed by the
    entity's key.

    Args:
        source: The source connection name.
        target: The connection the tables were pulled into.
        entities: What was pulled.

    Returns:
        Link name (the entity's) → link, and entity → why it got no link: it has no
        key (nothing to match records by), or its name is not a valid config name.
    """
    links: dict[str, LinkConfig] = {}
    skipped: dict[str, str] = {}
    for info in entities:
        if not info.key:
            skipped[info.name] = "it has no key to match records by"
        elif not valid_name(info.name):
            skipped[info.name] = ("its name is not a valid config name (a letter, then "
                                  "letters, digits, '_' and '-')")
        else:
            links[info.name] = LinkConfig(
                source=Endpoint(connection=source, entity=info.name),
                target=Endpoint(connection=target, entity=info.name),
                key=list(info.key), fields={f.name: f.name for f in info.fields})
    return links, skipped


def _describe(source: Connector, entities: Sequence[str] | None,
              pulled: Sequence[str]) -> tuple[list[EntityInfo], list[str]]:
    """The entities that exist, and those wanted (or pulled before) that do not."""
    if entities is None:
        infos = source.describe(None)
        names = {i.name for i in infos}
        return infos, [name for name in pulled if name not in names]
    infos, missing = [], []
    for name in dict.fromkeys(entities):
        try:
            infos += source.describe([name])
        except SchemaError:
            if name not in pulled:
                raise
            missing.append(name)
    return infos, missing


def _line(change: TableChange, *, dry_run: bool) -> str:
    where = f"{change.table}.{change.column}" if change.column else change.table
    verb = f"would {change.text}" if dry_run and change.applied else change.text
    return f"{where}: {verb}"

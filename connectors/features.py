"""Optional connector features: the methods each ``Capabilities`` flag promises.

A connector declares a feature in its :class:`~connectors.base.Capabilities` and then
implements the protocol of the same name here; the bus reads the declaration and never
probes for methods::

    if connector.capabilities.webhooks:
        cast(WebhookSource, connector).start_webhooks()

=================  ====================  =============================================
flag               protocol              for
=================  ====================  =============================================
tracking_setup     TrackingSetup         ``syncbus setup``: prepare entities
change_listener    ChangeNotifier        polls woken by the system's notifications
webhooks           WebhookSource         the worker starts and wires the webhooks
table_creation     TableCreator          ``syncbus schema pull`` into this connection
scratch_copy       ScratchCopyable       ``syncbus preview`` reads a copy of its books
=================  ====================  =============================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from connectors.base import Connector, EntityInfo

__all__ = ["ChangeNotifier", "ScratchCopy", "ScratchCopyable", "SecretStore", "TableChange",
           "TableCreator", "TrackingSetup", "WebhookSource"]


@dataclass(frozen=True, slots=True)
class TableChange:
    """One step of :meth:`TableCreator.create_tables`: done, or only reported."""

    #: The table concerned.
    table: str
    #: What it is, in words (``create table (…)``, ``add column TEXT (string)``…).
    text: str
    #: The column concerned, if any.
    column: str | None = None
    #: True when it changes the target; False for what is only reported.
    applied: bool = True
    #: The target refused this table's changes (``text`` says why); none of them is kept.
    failed: bool = False


@dataclass(frozen=True, slots=True)
class ScratchCopy:
    """Connection settings that read and move a throw-away copy of a connector's
    bookkeeping (:meth:`ScratchCopyable.scratch_copy`)."""

    #: The connection's settings model, pointed at the copy.
    settings: Any
    #: What the copy leaves out, for the operator (no secrets).
    notes: tuple[str, ...] = ()


class TrackingSetup(Connector, Protocol):
    """A connector whose entities need a setup step (``Capabilities.tracking_setup``)."""

    def prepare_tracking(self, entities: Sequence[str]) -> list[str]:
        """Prepare ``entities`` for change tracking; safe to run again.

        Returns:
            What was done, one line per step.

        Raises:
            SchemaError: an entity does not exist or cannot be tracked.
            ConnectorUnavailable: the system cannot be reached.
        """
        ...


class ChangeNotifier(Connector, Protocol):
    """A connector told of changes by its system (``Capabilities.change_listener``)."""

    def add_change_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(entity)`` when the system reports that ``entity`` changed."""
        ...


class SecretStore(Protocol):
    """Where secrets a connector generates are kept (the worker's state store)."""

    def get_secret(self, scope: str, name: str) -> str | None:
        """The secret ``scope``/``name``, or None."""
        ...

    def keep_secret(self, scope: str, name: str, make: Callable[[], str]) -> str:
        """The secret ``scope``/``name``, made with ``make()`` and stored if there is none."""
        ...


class WebhookSource(ChangeNotifier, Protocol):
    """A connector with webhooks configured (``Capabilities.webhooks``)."""

    def add_rejection_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` for each notification refused (for metrics)."""
        ...

    def use_secret_store(self, store: SecretStore) -> None:
        """Keep the secrets notifications are checked with in ``store``."""
        ...

    def start_webhooks(self) -> None:
        """Start the receiver and the subscriptions.

        Raises:
            OSError: the receiver's port cannot be bound.
            BusError: the subscriptions cannot be made.
        """
        ...


class TableCreator(Connector, Protocol):
    """A connector that creates tables from metadata (``Capabilities.table_creation``)."""

    def pulled_entities(self, source: str) -> list[str]:
        """Entities earlier :meth:`create_tables` calls took from ``source``, by name.

        Raises:
            ConnectorUnavailable: the system cannot be reached.
        """
        ...

    def create_tables(self, source: str, entities: Sequence[EntityInfo], *,
                      dry_run: bool = False) -> list[TableChange]:
        """Create or extend one table per entity of ``source``; nothing is dropped or
        altered, and what cannot be applied is reported.

        Args:
            source: The connection the entities come from (recorded with them).
            entities: Their metadata.
            dry_run: Plan and report only; change nothing.

        Returns:
            The steps in order, then one failed step per table whose changes the
            system refused (each table's changes are kept or refused as a whole).

        Raises:
            ConnectorUnavailable: the system cannot be reached.
        """
        ...


class ScratchCopyable(Connector, Protocol):
    """A connector with bookkeeping of its own (``Capabilities.scratch_copy``)."""

    def scratch_copy(self, scratch_dir: Path) -> ScratchCopy:
        """Copy the bookkeeping into ``scratch_dir`` and return settings that use the copy.

        Args:
            scratch_dir: An existing folder of throw-away copies, shared by the
                connectors of one preview (entries are named after the connection).

        Returns:
            The settings, and what the copy cannot cover. The original is only read.
        """
        ...

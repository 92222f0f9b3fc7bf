"""The connector contract every external system implements, and the error tree.

Errors (retry decisions are made from the type alone)::

    BusError
    ├── TransientError            a retry may cure it: time-out, 429, 5xx, lock, connection lost
    │   ├── ConnectorUnavailable  the external system cannot be reached
    │   └── BrokerConnectionError RabbitMQ is down or the connection dropped
    ├── PermanentError            a retry never will: validation, missing field, bad mapping
    │   ├── RecordRejected        the target refused one record (carries the target's text)
    │   ├── SchemaError           an event or record does not have the expected shape
    │   ├── Unverified            an event the bus did not sign (or signed with another key)
    │   └── MappingError          a field map could not be applied to a record
    └── ConfigError               the configuration is wrong (reported before anything runs)

Errors carry structured fields (``entity``, ``key``, ``status``, ``retry_after``) as
attributes, not only text, so the dead-letter queue can show them.

A connector retries a transient failure in-process for at most
:data:`MAX_RETRY_SECONDS` per call; a longer wait is the bus's job: the connector
raises (or returns a transient outcome) with ``retry_after`` and the consumer sends
the messages to its delayed retry queues.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "BrokerConnectionError",
    "BusError",
    "Capabilities",
    "ChangePage",
    "ChangeRecord",
    "ConfigError",
    "Connector",
    "ConnectorUnavailable",
    "EntityInfo",
    "FetchedRecord",
    "FieldInfo",
    "MAX_RETRY_SECONDS",
    "MappingError",
    "Op",
    "Outcome",
    "OutcomeStatus",
    "PermanentError",
    "RecordRejected",
    "SchemaError",
    "TransientError",
    "Unverified",
    "Version",
    "WriteRow",
    "group_keys",
]

#: Seconds one connector call may spend retrying in-process (its attempts and the waits
#: between them) before the failure is left to the bus's delayed retry queues. Well under
#: the consumer's RabbitMQ heartbeat (30 s; the broker drops a connection that misses
#: two) and RabbitMQ's ``consumer_timeout``: one batch never holds its messages for minutes.
MAX_RETRY_SECONDS = 20.0

#: A record version as the source reports it: a row version / version number (int)
#: or an opaque token (ETag) where the system has nothing better.
Version = int | str


class BusError(Exception):
    """Root of every error syncbus raises on purpose.

    Args:
        message: What went wrong, in words an operator can act on.
        entity: The entity (table, entity set) concerned, if any.
        key: The record key concerned, if any.
        status: The external system's status code (HTTP status, SQLSTATE), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        entity: str | None = None,
        key: Mapping[str, Any] | None = None,
        status: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.entity = entity
        self.key = dict(key) if key is not None else None
        self.status = status


class TransientError(BusError):
    """A failure a later retry may cure.

    Args:
        retry_after: Seconds the external system asked us to wait (Retry-After), if it did.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class PermanentError(BusError):
    """A failure no retry will cure; the message goes to the dead-letter queue."""


class ConfigError(BusError):
    """The configuration is invalid. ``problems`` lists every finding, located."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class ConnectorUnavailable(TransientError):
    """The external system cannot be reached (down, network, time-out)."""


class BrokerConnectionError(TransientError):
    """RabbitMQ cannot be reached or the connection was lost."""


class RecordRejected(PermanentError):
    """The target refused one record; ``message`` holds the target's own error text."""


class SchemaError(PermanentError):
    """An event or record does not have the shape the contract requires."""


class Unverified(PermanentError):
    """An event without a valid signature of this bus: never applied, never trusted."""


class MappingError(PermanentError):
    """A field map could not be applied to a record (missing key, bad transform input)."""


class Op(enum.StrEnum):
    """What happened to a record."""

    UPSERT = "upsert"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One field of an entity as the connector's metadata describes it."""

    name: str
    type: str
    nullable: bool = True
    key: bool = False
    #: Entity this field refers to (a lookup / foreign key), if any.
    references: str | None = None
    #: The system fills the field itself when a write leaves it out (a column default).
    has_default: bool = False


@dataclass(frozen=True, slots=True)
class EntityInfo:
    """An entity (table, entity set) with its fields and key."""

    name: str
    fields: tuple[FieldInfo, ...]
    key: tuple[str, ...]
    #: Extra unique field sets usable as upsert keys (alternate keys, unique constraints).
    unique_keys: tuple[tuple[str, ...], ...] = ()
    #: Whether the system tracks changes for it (row version column / change tracking on).
    change_tracking: bool = False

    def field(self, name: str) -> FieldInfo | None:
        """Return the field called ``name``, or None."""
        return next((f for f in self.fields if f.name == name), None)

    def is_unique(self, columns: Sequence[str]) -> bool:
        """True when ``columns`` (in any order) are the key or one of the unique keys."""
        wanted = set(columns)
        return any(set(k) == wanted for k in (self.key, *self.unique_keys))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a connector can do; the bus reads these instead of checking types."""

    change_tracking: bool = False
    deletes_tracked: bool = False
    alternate_keys: bool = False
    max_batch: int = 500
    #: Requests per second the system tolerates, if it publishes a limit.
    rate_limit: float | None = None
    #: Types of the versions its change records carry (row versions are ints; a
    #: system that falls back to ETags also has str). Consumers reject an event whose
    #: version is of another type.
    version_types: tuple[type, ...] = (int,)
    # Optional features: each flag promises the protocol of that name in
    # connectors/features.py, which the bus then calls without probing.
    #: Entities need a setup step before changes can be read (``syncbus setup``):
    #: ``TrackingSetup``. False: the system tracks changes natively.
    tracking_setup: bool = False
    #: It calls listeners when its system reports a change, so that the entity can be
    #: polled at once: ``ChangeNotifier``.
    change_listener: bool = False
    #: Webhooks are configured: a receiver and subscriptions to start, secrets to keep,
    #: refused notifications to count: ``WebhookSource``.
    webhooks: bool = False
    #: It creates tables and columns from another system's metadata (``syncbus schema
    #: pull``): ``TableCreator``.
    table_creation: bool = False
    #: It keeps bookkeeping of its own that reading changes moves on (key sets, key
    #: indexes), and can point a connector at a throw-away copy of it: ``ScratchCopyable``.
    scratch_copy: bool = False


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One change read from a source: the row after the change, or a deletion."""

    key: dict[str, Any]
    op: Op
    version: Version
    modified_at: datetime | None = None
    #: All field values after the change (None for deletes).
    values: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ChangePage:
    """A bounded page of changes and the cursor that follows it.

    The detector publishes every record of the page, waits for the broker's confirms,
    and only then stores ``next_cursor`` (the cursor rule).
    """

    records: list[ChangeRecord]
    next_cursor: str
    #: True when the source holds more changes after this page.
    more: bool = False


@dataclass(frozen=True, slots=True)
class FetchedRecord:
    """A record read by key (``Connector.fetch``): its current state in the system."""

    #: The connector's own key, as in its change records (``ChangeRecord.key``).
    key: dict[str, Any]
    #: Every field value, in the same form as ``ChangeRecord.values``.
    values: dict[str, Any]
    version: Version | None = None
    modified_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class WriteRow:
    """A record to upsert into a target, already mapped to the target's field names."""

    key: dict[str, Any]
    values: dict[str, Any]
    #: Only change the record if it exists (a soft delete marks a row the target has);
    #: a missing record is left alone and counts as applied. Connectors whose upsert
    #: is an update for an existing record (HTTP PATCH) may treat it as an upsert.
    update_only: bool = False


class OutcomeStatus(enum.StrEnum):
    APPLIED = "applied"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of writing one record: applied, or failed with a reason."""

    status: OutcomeStatus
    error: str | None = None
    #: The target's status code (SQLSTATE, HTTP status), if any.
    code: str | None = None
    retry_after: float | None = None

    @classmethod
    def applied(cls) -> Outcome:
        return _APPLIED

    @property
    def ok(self) -> bool:
        return self.status is OutcomeStatus.APPLIED


_APPLIED = Outcome(OutcomeStatus.APPLIED)


W = TypeVar("W")


def group_keys(keys: Sequence[dict[str, Any]], check: Callable[[tuple[str, ...]], None],
               encode: Callable[[tuple[str, ...], dict[str, Any]], W | None],
               ) -> dict[tuple[str, ...], dict[int, W]]:
    """Group the keys of a ``fetch`` by the columns they name (one query per group).

    Args:
        keys: The keys asked for, in order.
        check: Called once per column set; raises (``SchemaError``) when it is no key.
        encode: A key's lookup value in the system, or None when no record can have it
            (text for an integer id): that key's answer is None.

    Returns:
        Column set (sorted names) → key position → encoded key.
    """
    groups: dict[tuple[str, ...], dict[int, W]] = {}
    for i, key in enumerate(keys):
        cols = tuple(sorted(key))
        if cols not in groups:
            check(cols)
            groups[cols] = {}
        wanted = encode(cols, key)
        if wanted is not None:
            groups[cols][i] = wanted
    return groups


@runtime_checkable
class Connector(Protocol):
    """The one protocol every external system implements.

    Retry, batching, metrics and echo suppression stay in the bus; a connector only
    reads and writes its system and raises errors from the tree above.
    """

    name: str

    @property
    def capabilities(self) -> Capabilities: ...

    def describe(self, entities: Sequence[str] | None = None) -> list[EntityInfo]:
        """Return metadata for ``entities`` (all when None).

        Raises:
            ConnectorUnavailable: the system cannot be reached.
            SchemaError: a named entity does not exist.
        """
        ...

    def has_changes(self, entity: str, cursor: str | None) -> bool:
        """Cheap check (GetMaxRowVersion) whether anything changed after ``cursor``.

        Raises:
            ConnectorUnavailable: the system cannot be reached.
        """
        ...

    def read_changes(self, entity: str, cursor: str | None, page_size: int) -> Iterator[ChangePage]:
        """Yield pages of changes after ``cursor`` (None: from the beginning), oldest first.

        Each page's ``next_cursor`` resumes right after that page. Deletions are
        reported as ``Op.DELETE`` records in version order with the upserts.

        Raises:
            ConnectorUnavailable: the system cannot be reached.
            SchemaError: the entity is not prepared for change tracking.
        """
        ...

    def snapshot(self, entity: str) -> Iterator[tuple[dict[str, Any], Version]]:
        """Yield (key, version) of every current record, for full resync and delete detection."""
        ...

    def fetch(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[FetchedRecord | None]:
        """Read the current records with ``keys`` (the same key forms ``upsert`` takes).

        Used by two-way links (conflict detection) and ``syncbus preview``. Values come
        in exactly the form ``read_changes`` gives them, so hashes of both compare.

        Returns:
            One entry per key, in order: the record, or None where none exists (also
            for a key value that cannot exist, e.g. text for an integer id, and in
            Business Central for a key that matches several records): the upsert of
            that record then reports its own error.

        Raises:
            ConnectorUnavailable: the system cannot be reached.
            SchemaError: the entity or a key column does not exist.
        """
        ...

    def upsert(self, entity: str, rows: Sequence[WriteRow]) -> list[Outcome]:
        """Insert or update ``rows`` by key, idempotently; one outcome per row, in order.

        One bad row does not fail the others.

        Raises:
            ConnectorUnavailable: the whole batch could not be attempted.
        """
        ...

    def delete(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[Outcome]:
        """Delete records by key (a missing record counts as applied); one outcome per key.

        Raises:
            ConnectorUnavailable: the whole batch could not be attempted.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...

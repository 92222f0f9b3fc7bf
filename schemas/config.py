"""The configuration file: connections, broker, state store and links.

Example::

    broker:
      url: amqp://guest:guest@127.0.0.1:5672/
    state:
      url: sqlite:///.syncbus/state.db
    connections:
      crm: {type: sql, url: "sqlite:///crm.db"}
      erp: {type: sql, url: "postgresql+psycopg://sync:${ERP_PASSWORD}@db/erp"}
    links:
      customers:
        source: {connection: crm, entity: customers}
        target: {connection: erp, entity: clients}
        key: [id]
        fields:
          client_id: id                              # rename
          name: {from: name, transform: [strip, upper]}
          country: {from: country, default: SK}      # default when null / absent
          origin: {const: crm}                       # constant
          status: {from: status, map: {A: active, I: inactive}}
          credit: {from: credit_limit, transform: [{round: 2}]}

These models only check shape; checks that need the live systems (unknown table or
column, missing unique key on the target) are made by ``bus.validate``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.event import NAME_PATTERN

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_RETRY_DELAYS",
    "BrokerConfig",
    "ConnectionConfig",
    "Endpoint",
    "FieldSpec",
    "LinkConfig",
    "RetryPolicy",
    "SqlConnection",
    "StateConfig",
    "SyncConfig",
    "Transform",
]

#: Seconds between two polls of one source entity.
DEFAULT_POLL_INTERVAL = 5.0
#: Changes read from a source per page (one publish-confirm-checkpoint cycle).
DEFAULT_PAGE_SIZE = 2000
#: Messages a consumer maps and writes to its target in one batch.
DEFAULT_BATCH_SIZE = 500
#: Delays (seconds) of the retry tiers; the last one repeats until attempts run out.
DEFAULT_RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 600.0)

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class BrokerConfig(_Model):
    """The RabbitMQ broker."""

    url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        description="AMQP URL, e.g. amqp://user:${RABBIT_PASSWORD}@host:5672/vhost.",
    )
    prefetch: int = Field(default=2000, ge=1, le=65535, description="Unacked messages per consumer.")
    delivery_limit: int = Field(
        default=20,
        ge=1,
        description="Deliveries after which a message that keeps crashing the consumer "
        "is dead-lettered by RabbitMQ itself (x-delivery-limit).",
    )

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, v: str) -> str:
        if not v.startswith(("amqp://", "amqps://")):
            raise ValueError("must be an AMQP URL starting with amqp:// or amqps://")
        return v


class StateConfig(_Model):
    """The state store: cursors, applied versions, id map. SQLite or PostgreSQL."""

    url: str = Field(
        default="sqlite:///.syncbus/state.db",
        description="SQLAlchemy URL; PostgreSQL when several workers share the state.",
    )


class SqlConnection(_Model):
    """A SQL database (SQLite or PostgreSQL) reached through SQLAlchemy."""

    type: Literal["sql"] = "sql"
    url: str = Field(description="SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://…")
    schema_: str | None = Field(
        default=None, alias="schema", description="Database schema (PostgreSQL), default public."
    )


ConnectionConfig = Annotated[SqlConnection, Field(discriminator="type")]


class Endpoint(_Model):
    """One side of a link: an entity in a connection."""

    connection: Name
    entity: Name


class Transform(_Model):
    """A transform with a parameter; bare transforms are written as plain strings."""

    round: int | None = Field(default=None, ge=0, le=12, description="Round to N decimals.")


TransformSpec = Literal["upper", "lower", "strip"] | Transform

class FieldSpec(_Model):
    """How one target field gets its value."""

    from_: str | None = Field(default=None, alias="from", description="Source field to read.")
    const: Any = Field(default=None, description="A constant value (instead of `from`).")
    default: Any = Field(default=None, description="Used when the source value is null or absent.")
    transform: list[TransformSpec] = Field(
        default_factory=list, description="Applied in order: upper, lower, strip, {round: N}."
    )
    map: dict[str, Any] | None = Field(
        default=None, description="Value map applied after the transforms, e.g. {A: active}."
    )
    unmapped: Literal["error", "keep", "null"] = Field(
        default="error",
        description="What a value missing from `map` becomes: an error (the record goes to the "
        "dead-letter queue), the value unchanged, or null.",
    )

    @property
    def has_const(self) -> bool:
        """True when a constant was given (even ``const: null``)."""
        return "const" in self.model_fields_set

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        if self.has_const and self.from_ is not None:
            raise ValueError("give either `from` or `const`, not both")
        if not self.has_const and self.from_ is None:
            raise ValueError("needs `from` (a source field) or `const` (a constant)")
        return self


class RetryPolicy(_Model):
    """How transient failures (target down, time-out, 429, 5xx, lock) are retried."""

    delays: list[float] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_DELAYS),
        min_length=1,
        description="Seconds to wait before retry N; the last delay repeats.",
    )
    max_attempts: int = Field(
        default=10, ge=1, description="Failed attempts after which the message is dead-lettered."
    )

    @field_validator("delays")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(d <= 0 for d in v):
            raise ValueError("every delay must be positive")
        return v


class LinkConfig(_Model):
    """A one-way flow: changes of ``source`` are mapped and upserted into ``target``."""

    source: Endpoint
    target: Endpoint
    key: list[str] = Field(min_length=1, description="Source field(s) identifying a record.")
    fields: dict[str, str | FieldSpec] | None = Field(
        default=None,
        description="Target field → source field name or spec. Omitted: every source field "
        "is copied to the target field of the same name.",
    )
    deletes: Literal["propagate", "ignore"] = Field(
        default="propagate", description="What a deletion in the source does to the target."
    )
    poll_interval: float = Field(default=DEFAULT_POLL_INTERVAL, gt=0)
    page_size: int = Field(default=DEFAULT_PAGE_SIZE, ge=1, le=100_000)
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=10_000)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    enabled: bool = True

    def field_specs(self) -> dict[str, FieldSpec] | None:
        """The field map with every shorthand (``target: source``) expanded."""
        if self.fields is None:
            return None
        return {
            t: FieldSpec.model_validate({"from": s}) if isinstance(s, str) else s
            for t, s in self.fields.items()
        }


class SyncConfig(_Model):
    """The whole configuration file."""

    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    connections: dict[Name, ConnectionConfig] = Field(min_length=1)
    links: dict[Name, LinkConfig] = Field(default_factory=dict)

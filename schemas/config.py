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

These models only check shape; ``bus.config.load`` loads the file (interpolating
``${VAR}`` and ``${file:/run/secrets/x}``) and turns validation errors into located
messages, and checks that need the live systems (unknown table or column, missing
unique key on the target) are made by ``bus.config.validate``. The file format is
documented in ``docs/configuration.md``.

Relative paths in a config file (``ca_bundle``, ``certificate_path``, ``state_dir``,
SQLite URLs such as ``sqlite:///hub.db``, the default state store and key index) mean
"next to the config file": ``bus.config.load`` applies :meth:`SyncConfig.resolve_paths`
with the file's directory, so a command behaves the same from any working directory.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)

from schemas.event import NAME_PATTERN

__all__ = [
    "AlertRule",
    "BrokerConfig",
    "BusinessCentralConnection",
    "CONNECTION_TYPES",
    "ConnectionConfig",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BC_INDEX_URL",
    "DEFAULT_OFFLINE_WINDOW",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_RETRY_DELAYS",
    "DIRECTIONS",
    "DataverseConnection",
    "Duration",
    "Endpoint",
    "FieldSpec",
    "LinkConfig",
    "MetricsConfig",
    "Overrides",
    "RetryPolicy",
    "SoftDelete",
    "SqlConnection",
    "StateConfig",
    "SyncConfig",
    "TRANSFORMS",
    "Transform",
    "map_key",
    "parse_duration",
    "resolve_path",
    "resolve_sqlite_url",
]

#: Seconds between two polls of one source entity.
DEFAULT_POLL_INTERVAL = 5.0
#: Changes read from a source per page (one publish-confirm-checkpoint cycle).
DEFAULT_PAGE_SIZE = 2000
#: Messages a consumer maps and writes to its target in one batch.
DEFAULT_BATCH_SIZE = 500
#: Seconds a target may stay unreachable before its waiting changes count as errors.
DEFAULT_OFFLINE_WINDOW = 24 * 3600.0
#: Delays (seconds) of the retry tiers; the last one repeats until attempts run out.
DEFAULT_RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 600.0)
#: Connection ``type`` values this version understands (``type`` defaults to ``sql``).
CONNECTION_TYPES = ("sql", "dataverse", "business_central")
#: Transforms written as a bare word; ``{round: N}`` is the one with a parameter.
TRANSFORMS = ("upper", "lower", "strip")

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]


def map_key(value: Any) -> str:
    """The text a value-map key and a record value are compared by.

    Strings compare as written, ``true``/``false`` in lower case, numbers by their
    shortest form (``1`` and ``1.0`` both match the key ``1``).

    Args:
        value: A key of a ``map`` in the config, or a record value.

    Returns:
        The comparison text.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


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
    history_max_age: Duration = Field(
        default=7 * 86400.0, ge=1,
        description="How long change events stay in the history stream syncbus.history "
        "(x-max-age), e.g. 7d. Applies when the stream is created.",
    )
    history_max_bytes: int = Field(
        default=10_000_000_000, ge=1_000_000,
        description="Largest size of the history stream in bytes (x-max-length-bytes).",
    )
    history_segment_bytes: int = Field(
        default=100_000_000, ge=100_000,
        description="Segment file size of the history stream (x-stream-max-segment-size-bytes); "
        "retention removes whole segments, so keep it well below history_max_bytes.",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="Secret the bus signs every change event with (HMAC-SHA256 in the "
        "x-syncbus-signature header; at least 32 characters): link consumers dead-letter "
        "events without a valid signature as Unverified, so a foreign publisher cannot "
        "forge changes. Write it as ${ENV} or ${file:...}. Omitted: a key generated once "
        "and kept in the state store, shared by every worker of that store.",
    )
    max_event_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024,
        description="Largest change event a link consumer accepts, in bytes; a larger one "
        "is dead-lettered with the reason (raise it, then replay, for very large records).",
    )

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, v: str) -> str:
        if not v.startswith(("amqp://", "amqps://")):
            scheme = v.partition("://")[0] if "://" in v else ""
            got = f" (got {scheme}://)" if scheme.isalnum() else ""
            raise ValueError(f"must be an AMQP URL starting with amqp:// or amqps://{got}")
        return v

    @field_validator("signing_key")
    @classmethod
    def _long_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (e.g. `openssl rand -base64 32`)")
        return v


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> Any:
    """``90``, ``"90s"``, ``"30m"``, ``"24h"``, ``"7d"`` → seconds (float)."""
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError("must be a duration like 30, 30s, 15m, 24h or 7d")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    return value


#: Seconds, written as a number or with a unit: 500ms, 30s, 15m, 24h, 7d.
Duration = Annotated[float, BeforeValidator(parse_duration)]


class StateConfig(_Model):
    """The state store: cursors, applied versions, id map. SQLite or PostgreSQL."""

    url: str = Field(
        default="sqlite:///.syncbus/state.db",
        description="SQLAlchemy URL; PostgreSQL when several workers share the state.",
    )
    history_retention: Duration = Field(
        default=7 * 86400.0, gt=0,
        description="How long Processed transactions stay in the history (e.g. 7d).",
    )
    run_retention: Duration = Field(
        default=30 * 86400.0, gt=0,
        description="How long sync run records (`syncbus history`) are kept (e.g. 30d).",
    )


class SqlConnection(_Model):
    """A SQL database (SQLite or PostgreSQL) reached through SQLAlchemy."""

    type: Literal["sql"] = "sql"
    url: str = Field(description="SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://…")
    schema_: str | None = Field(
        default=None, alias="schema", description="Database schema (PostgreSQL), default public."
    )


class _OAuthConnection(_Model):
    """Shared settings of systems reached over HTTPS with Entra ID (client credentials).

    Secrets are written as references, never inline: ``${DATAVERSE_SECRET}`` (an
    environment variable) or ``${file:/run/secrets/dataverse}`` (a file).
    """

    tenant_id: str = Field(description="Entra ID tenant (GUID or domain).")
    client_id: str = Field(description="Application (client) id of the app registration.")
    client_secret: SecretStr | None = Field(
        default=None, description="Client secret; use ${ENV} or ${file:…}, never inline.")
    certificate_path: str | None = Field(
        default=None, description="PEM with private key and certificate, instead of a secret.")
    certificate_thumbprint: str | None = Field(
        default=None, description="SHA-1 thumbprint of that certificate.")
    authority_host: str = Field(
        default="https://login.microsoftonline.com",
        description="Entra ID host; the emulator's URL in tests and the demo.")
    ca_bundle: str | None = Field(
        default=None, description="CA bundle to trust (e.g. the emulator's ca.pem).")
    timeout: float = Field(default=30.0, gt=0, description="Seconds per HTTP request.")


class DataverseConnection(_OAuthConnection):
    """A Dynamics 365 / Dataverse organisation (Web API v9.2)."""

    type: Literal["dataverse"] = "dataverse"
    url: str = Field(description="Organisation URL, e.g. https://contoso.crm4.dynamics.com")
    batch_size: int = Field(default=1000, ge=1, le=1000, description="Operations per $batch.")
    bulk_size: int = Field(
        default=500, ge=0, le=1000, description="Records per UpsertMultiple request (bulk "
        "operation message); tables without the message, and deletes, go through $batch. "
        "0 writes everything through $batch.")
    page_size: int = Field(default=5000, ge=1, le=5000, description="odata.maxpagesize.")
    entities: list[str] | None = Field(
        default=None, description="Tables (logical names) to describe; default all. Listing "
        "them keeps metadata discovery small on a real organisation.")
    state_dir: str = Field(
        default=".syncbus/dataverse", description="Directory of the token cache "
        "(<connection>.tokens.json, owner-only) and of the key set that finds deletes after "
        "an expired delta token (<connection>.keys.db).")
    retry_attempts: int = Field(
        default=4, ge=1, le=20, description="Attempts per request on 429, 5xx and time-outs "
        "(Retry-After honoured) before the failure is left to the bus's retry queues.")
    max_retry_wait: Duration = Field(
        default=60.0, gt=0, description="A Retry-After longer than this is not waited for "
        "inside the connector; the bus defers the changes instead.")
    rate_limit: float | None = Field(
        default=None, gt=0, description="Requests per second to the organisation, shared by "
        "every writer in the process (default: none, pause only when Dataverse answers 429).")


class BusinessCentralConnection(_OAuthConnection):
    """A Business Central environment and company (API v2.0).

    Entities are entity sets of the API routes in ``apis`` (``customers``,
    ``salesOrders``, Resco's ``RescoCustomer``…); ``entities`` tunes them one by one.
    """

    class Entity(_Model):
        """How one entity set is read, written and checked for deletions."""

        detection: Literal["auto", "row_version", "modified"] = Field(
            default="auto",
            description="Change detection: by row version (RowVersionNumber / "
            "systemRowVersion, where the page has one), by lastModifiedDateTime with an "
            "overlap window, or auto (row version when present).")
        overlap: Duration | None = Field(
            default=None, ge=0,
            description="Seconds re-read before the last seen lastModifiedDateTime, so equal "
            "timestamps and late commits are not missed; default: the connection's overlap.")
        sync_deletion: bool = Field(
            default=False,
            description="Detect deletions by periodic key-set reconciliation (Resco's \"Sync "
            "Deletion\"): slower, off by default.")
        reconcile_interval: Duration = Field(
            default=3600.0, ge=0, description="Seconds between two reconciliations.")
        webhook: bool = Field(
            default=False,
            description="Subscribe to webhook notifications (needs `webhooks`): changes "
            "trigger an immediate poll, deleted notifications become deletions.")
        key: list[str] = Field(
            default_factory=list,
            description="Extra upsert key (e.g. [email]) besides `number`; sent in change "
            "keys so deletions can be matched by it.")

    class Webhooks(_Model):
        """Where Business Central sends notifications, and the receiver that takes them."""

        notification_url: str = Field(
            description="Public URL Business Central posts notifications to (https online).")
        listen: str | None = Field(
            default=None,
            description="Address the built-in receiver binds: host:port, or :port / port for "
            "127.0.0.1 (e.g. 0.0.0.0:8790 to listen on every interface); None when another "
            "process receives and calls the connector's notify().")
        client_state: SecretStr | None = Field(
            default=None,
            description="Secret every notification must carry (clientState); default: one "
            "generated per subscription and kept in the state store. Notifications without "
            "it are refused with 401.")
        renew_before: Duration = Field(
            default=86400.0, gt=0,
            description="Renew a subscription this long before its 3-day expiry.")

        @field_validator("listen")
        @classmethod
        def _listen_is_an_address(cls, value: str | None) -> str | None:
            if value is not None:
                cls.split_listen(value)
            return value

        @staticmethod
        def split_listen(listen: str) -> tuple[str, int]:
            """``host:port``, ``[v6]:port``, ``:port`` or ``port`` as (host, port); no host
            means 127.0.0.1.

            Raises:
                ValueError: not such an address, or a port outside 0–65535.
            """
            text = listen.strip()
            host, sep, port = text.rpartition(":")
            if not sep:
                host, port = "", text
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            elif ":" in host:
                raise ValueError(f"listen {listen!r}: write an IPv6 address in brackets, "
                                 "[::1]:8790")
            if not port.isdigit() or int(port) > 65535:
                raise ValueError(f"listen {listen!r} is not host:port, :port or port "
                                 "(e.g. 127.0.0.1:8790)")
            return host or "127.0.0.1", int(port)

    type: Literal["business_central"] = "business_central"
    url: str = Field(
        default="https://api.businesscentral.dynamics.com",
        description="API host; the emulator's URL in tests and the demo.")
    environment: str = Field(default="production", description="Environment name.")
    company: str = Field(description="Company name or id.")
    batch_size: int = Field(default=100, ge=1, le=100, description="Operations per $batch.")
    apis: list[str] = Field(
        default_factory=lambda: ["v2.0", "Resco/RescoIntegrations/v2.0"],
        description="API routes whose entity sets are entities, first match wins "
        "(publisher/group/version for custom APIs).")
    entities: dict[str, Entity] = Field(
        default_factory=dict, description="Per-entity settings, by entity set name.")
    webhooks: Webhooks | None = Field(default=None, description="Webhook receiver settings.")
    overlap: Duration = Field(
        default=300.0, ge=0,
        description="Default overlap window (seconds) of lastModifiedDateTime detection.")
    index_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the key index used for deletions (id → key); "
        "default sqlite:///.syncbus/bc-<connection>.db; PostgreSQL when workers move.")
    max_retries: int = Field(
        default=4, ge=1, description="Attempts per request on 429, 5xx and time-outs.")
    backoff: float = Field(
        default=1.0, gt=0,
        description="First backoff delay after a 429 (no Retry-After); doubles, with jitter.")
    conflict: Literal["retry_once", "fail"] = Field(
        default="retry_once",
        description="On a stale ETag (409/412): re-read and retry once, or fail at once.")
    state_dir: str = Field(
        default=".syncbus/business-central", description="Directory of the token cache of "
        "an operator's sign-in (`syncbus login`): <connection>.tokens.json, owner-only; used "
        "when neither client_secret nor certificate_path is set.")


def _connection_type(value: Any) -> str | None:
    """Discriminator: the ``type`` of a connection (``sql`` when omitted), None if unknown."""
    kind = value.get("type", "sql") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in CONNECTION_TYPES else None


ConnectionConfig = Annotated[
    Union[  # noqa: UP007 - Annotated members need the long form
        Annotated[SqlConnection, Tag("sql")],
        Annotated[DataverseConnection, Tag("dataverse")],
        Annotated[BusinessCentralConnection, Tag("business_central")],
    ],
    Discriminator(
        _connection_type,
        custom_error_type="connection_type",
        custom_error_message="needs a known `type` (" + ", ".join(CONNECTION_TYPES) + ")",
    ),
]


class Endpoint(_Model):
    """One side of a link: an entity in a connection."""

    connection: Name
    entity: Name


class Transform(_Model):
    """A transform with a parameter; bare transforms are written as plain strings."""

    round: int | None = Field(default=None, ge=0, le=12, description="Round to N decimals.")

    @model_validator(mode="after")
    def _one_parameter(self) -> Transform:
        if self.round is None:
            raise ValueError("a transform with a parameter needs it, e.g. {round: 2}")
        return self


def _known_transform(value: Any) -> Any:
    if isinstance(value, str) and value not in TRANSFORMS:
        hint = difflib.get_close_matches(value.lower(), TRANSFORMS, n=1)
        did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
        raise ValueError(
            f"unknown transform {value!r} ({did_you_mean}allowed: upper, lower, strip, {{round: N}})"
        )
    return value


def _transform_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "name"
    return "param" if isinstance(value, dict | Transform) else None


TransformSpec = Annotated[
    Union[  # noqa: UP007 - tagged members
        Annotated[Literal["upper", "lower", "strip"], BeforeValidator(_known_transform), Tag("name")],
        Annotated[Transform, Tag("param")],
    ],
    Discriminator(
        _transform_tag,
        custom_error_type="transform",
        custom_error_message="a transform is upper, lower, strip or {round: N}",
    ),
]


class FieldSpec(_Model):
    """How one target field gets its value.

    The value is read from ``from`` (or is ``const``), replaced by ``default`` when
    null or absent, passed through ``transform`` in order, then through ``map``.
    """

    from_: str | None = Field(
        default=None, alias="from", min_length=1, description="Source field to read."
    )
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
    lookup: str | None = Field(
        default=None, pattern=NAME_PATTERN,
        description="A foreign key: the value (the parent's key in the source) becomes the "
        "parent's key in the target, through the id map of the named link (e.g. `accounts`). "
        "A child whose parent is not there yet waits in retry.",
    )

    @property
    def has_const(self) -> bool:
        """True when a constant was given (even ``const: null``)."""
        return "const" in self.model_fields_set

    def inverse_problem(self) -> str | None:
        """Why this field cannot be mapped back (target → source), or None when it can.

        Plain copies, defaults and lookups invert; a value map inverts when no two keys
        map to the same value; constants and transforms lose information.
        """
        if self.has_const:
            return "a constant has no source field to write back"
        if self.transform:
            names = ", ".join(t if isinstance(t, str) else f"round {t.round}" for t in self.transform)
            return f"transform [{names}] has no inverse"
        if self.map is not None:
            seen: dict[str, str] = {}
            for key, value in self.map.items():
                text = map_key(value)
                if text in seen:
                    return (f"map sends both {seen[text]!r} and {key!r} to {value!r}, so it "
                            "cannot be inverted")
                seen[text] = key
        return None

    def inverted(self, target: str) -> FieldSpec:
        """The spec that maps this field back: source field ← ``target`` field.

        Call only when :meth:`inverse_problem` is None.
        """
        spec: dict[str, Any] = {"from": target}
        if self.map is not None:
            spec["map"] = {map_key(v): k for k, v in self.map.items()}
            if self.unmapped != "error":
                spec["unmapped"] = self.unmapped
        if self.lookup is not None:
            spec["lookup"] = self.lookup
        return FieldSpec.model_validate(spec)

    @field_validator("map", mode="before")
    @classmethod
    def _text_keys(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        if any(k is None for k in v):
            raise ValueError("null cannot be a map key; use `default` for null values")
        return {map_key(k): value for k, value in v.items()}

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        given = self.model_fields_set
        if self.has_const and self.from_ is not None:
            raise ValueError("give either `from` or `const`, not both")
        if not self.has_const and self.from_ is None:
            raise ValueError("needs `from` (a source field) or `const` (a constant)")
        if self.has_const and given & {"default", "transform", "map", "unmapped", "lookup"}:
            raise ValueError("a `const` takes no default, transform, map, unmapped or lookup")
        if self.lookup is not None and (self.transform or self.map is not None):
            raise ValueError("a `lookup` takes no transform or map (the id map translates it)")
        if "unmapped" in given and self.map is None:
            raise ValueError("`unmapped` needs a `map`")
        return self


def _spec_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "name"
    return "spec" if isinstance(value, dict | FieldSpec) else None


FieldSource = Annotated[
    Union[  # noqa: UP007 - tagged members
        Annotated[str, Field(min_length=1), Tag("name")],
        Annotated[FieldSpec, Tag("spec")],
    ],
    Discriminator(
        _spec_tag,
        custom_error_type="field_spec",
        custom_error_message="must be a source field name or a mapping like {from: name}",
    ),
]


class RetryPolicy(_Model):
    """How transient failures (target down, time-out, 429, 5xx, lock) are retried."""

    delays: list[Duration] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_DELAYS),
        min_length=1,
        description="Wait before retry N (e.g. [1s, 5s, 30s, 2m, 10m]); the last delay repeats.",
    )
    offline_window: Duration = Field(
        default=DEFAULT_OFFLINE_WINDOW, gt=0,
        description="How long a target may stay unreachable (time-outs, 429, 5xx, locks) while "
        "its changes wait in retry, before they count as errors (offline mode).",
    )
    max_attempts: int = Field(
        default=10, ge=1,
        description="Attempts after which a message that crashes the consumer is dead-lettered.",
    )

    @field_validator("delays")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(d <= 0 for d in v):
            raise ValueError("every delay must be positive")
        return v


class AlertRule(_Model):
    """An alert rule of a link: more than ``errors`` errors within ``minutes`` → ``action``.

    Errors are changes dead-lettered by the link (permanent failures, retries given up),
    counted across every worker. ``pause`` stops the link's consumers: its changes stay
    queued, nothing is lost, until ``syncbus link resume``.
    """

    errors: int = Field(ge=0, description="Errors tolerated in the window; one more fires the rule.")
    minutes: float = Field(default=15.0, gt=0, le=7 * 24 * 60,
                           description="Length of the window, in minutes.")
    action: Literal["pause", "log"] = Field(
        default="pause", description="pause the link (and log), or only log the event.")


class MetricsConfig(_Model):
    """The worker's HTTP port: Prometheus metrics, /healthz and /readyz."""

    port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Port to listen on (0: any free port); omitted: no HTTP server.")
    host: str = Field(
        default="127.0.0.1",
        description="Address to bind: local only by default; 0.0.0.0 (or the host's address) "
        "when Prometheus scrapes from another machine or container.")
    sample_interval: Duration = Field(
        default=15.0, gt=0, description="Seconds between two samples of the queue depths.")


class SoftDelete(_Model):
    """How a soft delete marks the target record: set ``field`` to ``value``."""

    field: str = Field(min_length=1, description="Target field that marks a record deleted.")
    value: Any = Field(default=True, description="Value written into it (default true).")


FilterAction = Literal["ignore", "delete"]
DeletePolicy = Literal["propagate", "ignore", "soft"]
DIRECTIONS = ("a2b", "b2a")


def _check_filter(value: str | None) -> str | None:
    if value is None:
        return None
    from schemas.filter_expr import compile_filter  # noqa: PLC0415 - optional until loaded

    compile_filter(value)  # FilterSyntaxError is a ValueError: pydantic reports it in place
    return value


class Overrides(_Model):
    """Settings of the b → a direction of a two-way link that differ from a → b."""

    fields: dict[str, FieldSource] | None = Field(
        default=None,
        description="Source (a) field → target (b) field name or spec, for b → a: replaces "
        "or adds to the inverted field map (a field listed here is no longer inverted).",
    )
    filter: str | None = Field(
        default=None, description="Upload filter: which records of b go to a (expression).")
    filter_action: FilterAction | None = Field(
        default=None,
        description="What a record of b that leaves the upload filter does to a: ignore "
        "(the default: an upload filter only decides what is uploaded) or delete (deletes "
        "the record on side a, the master: an explicit choice that needs b2a.filter).")
    deletes: DeletePolicy | None = Field(
        default=None, description="What a deletion in b does to a (default: the link's).")
    soft_delete: SoftDelete | None = Field(
        default=None, description="Field of a set by a soft delete.")

    _filter_ok = field_validator("filter")(_check_filter)

    @model_validator(mode="after")
    def _delete_needs_filter(self) -> Overrides:
        if self.filter_action == "delete" and not self.filter:
            raise ValueError("b2a.filter_action: delete needs b2a.filter (the upload filter "
                             "whose leavers are deleted on side a)")
        return self


class LinkConfig(_Model):
    """A flow between two entities: ``source`` (side a) and ``target`` (side b).

    ``direction: a2b`` (the default) maps changes of a into b; ``b2a`` the reverse;
    ``both`` keeps the two in sync, with echo suppression and a conflict policy.
    """

    source: Endpoint
    target: Endpoint
    key: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="Source field(s) identifying a record; one name or a list."
    )
    fields: dict[str, FieldSource] | None = Field(
        default=None,
        description="Target field → source field name or spec. Omitted: every source field "
        "is copied to the target field of the same name.",
    )
    direction: Literal["a2b", "b2a", "both"] = Field(
        default="a2b",
        description="a2b (source → target), b2a (target → source) or both (two-way sync).")
    conflict: Literal["source_wins", "target_wins", "newest_wins", "manual"] = Field(
        default="newest_wins",
        description="Two-way links: who wins when both sides changed a record since it was "
        "last synced. newest_wins compares modification times (a tie goes to the source); "
        "manual keeps both versions in the conflict log until an operator picks one.")
    filter: str | None = Field(
        default=None,
        description="Sync filter: which records of the source take part (an expression such "
        "as `statecode == 0 and country in [\"SK\", \"CZ\"]`).")
    filter_action: FilterAction = Field(
        default="ignore",
        description="What a record that leaves the filter does to the target: ignore it "
        "(the target keeps its copy) or delete it there.")
    deletes: DeletePolicy = Field(
        default="propagate",
        description="What a deletion in the source does to the target: propagate, ignore, "
        "or soft (set `soft_delete.field`).")
    soft_delete: SoftDelete | None = Field(
        default=None, description="With deletes: soft, the target field set on deletion.")
    b2a: Overrides | None = Field(
        default=None, description="Settings of the b → a direction (two-way links).")
    filtered_parents: Literal["skip", "dead"] = Field(
        default="skip",
        description="What a record does whose lookup parent was left out by the parent "
        "link's filter: skip (not synced, counted as filtered) or dead (dead-lettered as "
        "'parent filtered out'). Settled at once, never retried.")
    poll_interval: Duration = Field(default=DEFAULT_POLL_INTERVAL, gt=0)
    page_size: int = Field(default=DEFAULT_PAGE_SIZE, ge=1, le=100_000)
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=10_000)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    alert: AlertRule | None = Field(
        default=None, description="Pause (or log) the link when it fails too often.")
    enabled: bool = True

    @field_validator("key", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("key")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        twice = sorted({k for k in v if v.count(k) > 1})
        if twice:
            raise ValueError(f"key field(s) listed twice: {', '.join(twice)}")
        return v

    _filter_ok = field_validator("filter")(_check_filter)

    @model_validator(mode="after")
    def _directions(self) -> LinkConfig:
        if self.deletes == "soft" and self.soft_delete is None:
            raise ValueError("deletes: soft needs soft_delete: {field: …, value: …}")
        if self.b2a is not None and self.direction == "a2b":
            raise ValueError("b2a settings need direction: both or b2a")
        if "b2a" in self.directions:
            deletes = self.reverse_deletes
            if deletes == "soft" and (self.b2a is None or self.b2a.soft_delete is None):
                raise ValueError("b2a deletes: soft needs b2a.soft_delete: {field: …}")
        return self

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions that flow: ``("a2b",)``, ``("b2a",)`` or both."""
        return DIRECTIONS if self.direction == "both" else (self.direction,)

    @property
    def reverse_deletes(self) -> DeletePolicy:
        """The delete policy of b → a."""
        if self.b2a is not None and self.b2a.deletes is not None:
            return self.b2a.deletes
        return self.deletes

    @field_validator("fields")
    @classmethod
    def _not_empty(cls, v: dict[str, str | FieldSpec] | None) -> dict[str, str | FieldSpec] | None:
        if v is not None and not v:
            raise ValueError("maps no field; omit `fields` to copy same-named fields")
        return v

    def field_specs(self) -> dict[str, FieldSpec] | None:
        """The field map with every shorthand (``target: source``) expanded.

        Returns:
            Target field → spec, in file order; None when ``fields`` is omitted.
        """
        if self.fields is None:
            return None
        return {
            t: FieldSpec.model_validate({"from": s}) if isinstance(s, str) else s
            for t, s in self.fields.items()
        }


#: Default key index of a Business Central connection (``{name}``: the connection).
DEFAULT_BC_INDEX_URL = "sqlite:///.syncbus/bc-{name}.db"
_SQLITE_URL = re.compile(r"^(sqlite(?:\+\w+)?:///)([^?]*)(\?.*)?$", re.S)


def resolve_path(value: str, base: Path) -> str:
    """A file or directory path of the config: relative ones are taken from ``base``.

    Args:
        value: The path as written (``~`` is the user's home).
        base: The config file's directory (absolute).

    Returns:
        The path to use: ``value`` itself when absolute, else ``base / value``.
    """
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def resolve_sqlite_url(url: str, base: Path) -> str:
    """A SQLite URL whose relative database file is taken from ``base``; other URLs as given.

    ``sqlite:///hub.db`` → ``sqlite:////<base>/hub.db``; ``sqlite:////abs/hub.db``,
    in-memory databases (``sqlite://``, ``sqlite:///:memory:``), ``file:`` URIs and
    every other database URL are left as they are.

    Args:
        url: A SQLAlchemy URL.
        base: The config file's directory (absolute).

    Returns:
        The URL to use.
    """
    match = _SQLITE_URL.match(url)
    if match is None:
        return url
    prefix, database, query = match.group(1), match.group(2), match.group(3) or ""
    if not database or database == ":memory:" or database.startswith(("/", "file:")):
        return url
    return f"{prefix}{resolve_path(database, base)}{query}"


class SyncConfig(_Model):
    """The whole configuration file."""

    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    connections: dict[Name, ConnectionConfig] = Field(min_length=1)
    links: dict[Name, LinkConfig] = Field(default_factory=dict)
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig,
        description="The worker's HTTP port for metrics and health (docs/operations.md).")

    def resolve_paths(self, base: Path) -> SyncConfig:
        """This config with every relative path taken from ``base`` (the file's directory).

        Resolved: ``state.url`` (also the default ``sqlite:///.syncbus/state.db``), SQL
        connections' SQLite ``url``, and of Dataverse and Business Central connections
        ``ca_bundle``, ``certificate_path``, ``state_dir`` (also the default) and
        Business Central's ``index_url`` (also the default, which is then written out).
        URLs of servers (PostgreSQL, https, amqp) are not paths and stay as they are.

        Args:
            base: The directory relative paths start from.

        Returns:
            A copy; this config is not changed.
        """
        base = base.expanduser().resolve()
        connections: dict[str, Any] = {}
        for name, conn in self.connections.items():
            update: dict[str, Any] = {}
            if isinstance(conn, SqlConnection):
                update["url"] = resolve_sqlite_url(conn.url, base)
            else:
                for key in ("ca_bundle", "certificate_path"):
                    if (value := getattr(conn, key)) is not None:
                        update[key] = resolve_path(value, base)
                update["state_dir"] = resolve_path(conn.state_dir, base)
                if isinstance(conn, BusinessCentralConnection):
                    index = conn.index_url or DEFAULT_BC_INDEX_URL.format(name=name)
                    update["index_url"] = resolve_sqlite_url(index, base)
            connections[name] = conn.model_copy(update=update)
        state = self.state.model_copy(update={"url": resolve_sqlite_url(self.state.url, base)})
        return self.model_copy(update={"connections": connections, "state": state})

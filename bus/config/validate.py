"""Semantic checks of a loaded config: URLs, and everything the live systems must confirm.

``check_urls`` needs nothing but the config (run it before connecting anywhere);
``validate_config`` also asks each connection to describe its entities and checks
every link against that metadata: connections and entities exist, key and mapped
fields exist on both sides, the key reaches a unique key of the target (so upserts
are possible) and every required target field gets a value.

Problems are located lines, ``FILE:LINE: links.customers.key: message``; an empty
list means valid. URLs in messages are redacted.

``check_broker`` asks RabbitMQ what the configured user may do, and leaves nothing
behind: it connects (login, vhost), declares an exclusive, auto-deleted queue
``syncbus.validate.<random>`` (configure permission; the queue goes with the
connection), reads from it (read permission) and publishes an empty message to
``syncbus.changes`` inside an AMQP transaction that it rolls back (write permission:
RabbitMQ checks it when the message arrives; the rollback discards the message, so
no subscriber ever sees it).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from bus.amqp.queues import PermissionCheck, check_permissions
from bus.config.load import LoadedConfig, Loc
from bus.core.redact import redact_text, redact_url
from connectors.base import BusError, ConfigError, EntityInfo, FieldInfo, TransientError
from consumers.flow import Flow, flows
from schemas.config import Endpoint, LinkConfig, SqlConnection, SyncConfig

__all__ = [
    "BrokerCheck",
    "Describe",
    "LinkChecker",
    "SQL_DIALECTS",
    "check_broker",
    "check_urls",
    "link_notes",
    "validate_config",
]

#: Databases the SQL connector and the state store support.
SQL_DIALECTS = ("postgresql", "sqlite")

#: ``describe(connection_name)`` → that connection's entities by name.
Describe = Callable[[str], Mapping[str, EntityInfo]]

_ENCODE_HINT = ("; percent-encode special characters in the user name and password: "
                "@ → %40, / → %2F, # → %23, ? → %3F, : → %3A")
_SQL_EXAMPLE = "e.g. sqlite:///file.db or postgresql+psycopg://sync@db:5432/erp"


def check_urls(loaded: LoadedConfig) -> list[str]:
    """Check every URL of the config without connecting anywhere.

    Args:
        loaded: The loaded config.

    Returns:
        Located problems: a broker URL that does not parse, a SQL URL that SQLAlchemy
        cannot parse, an unsupported database or a driver that is not installed.
    """
    return [loaded.problem(loc, msg) for loc, msg in _url_problems(loaded.config)]


def validate_config(loaded: LoadedConfig, describe: Describe, *,
                    unreachable: list[str] | None = None,
                    by_link: dict[str, list[str]] | None = None) -> list[str]:
    """Check the config against the live systems.

    Each connection is described at most once. A connection that cannot be described
    (unreachable, bad credentials) is one problem, and the checks that need its
    metadata are skipped. Disabled links are only checked for known connections.

    Args:
        loaded: The loaded config.
        describe: Returns a connection's entities by name; may raise ``BusError``
            (e.g. ``ConnectorUnavailable``) or any driver error.
        unreachable: When given, connections that are only temporarily unavailable
            (``TransientError``) are appended here instead of being reported as
            problems; their live checks are skipped. ``syncbus run`` uses this so that
            a worker starts while a system is down and catches up when it is back.

    Returns:
        Located problems, in file order; empty when the config is valid.

    With ``by_link`` given, problems of one link (its entities, fields, keys) go there,
    by link name, instead of into the result: a worker refuses those links and runs
    the others (schema drift).
    """
    found = _url_problems(loaded.config)
    bad_urls = {str(loc[1]) for loc, _ in found if loc[0] == "connections"}
    checker = LinkChecker(loaded.config, describe, bad_urls, unreachable)
    for name, link in loaded.config.links.items():
        checker.check(name, link)
    found += checker.found
    found.sort(key=lambda item: loaded.line_of(item[0]) or 0)
    if by_link is not None:
        for loc, msg in [f for f in found if f[0][0] == "links" and len(f[0]) > 1]:
            by_link.setdefault(str(loc[1]), []).append(loaded.problem(loc, msg))
        found = [f for f in found if not (f[0][0] == "links" and len(f[0]) > 1)]
    return [loaded.problem(loc, msg) for loc, msg in found]


def link_notes(loaded: LoadedConfig) -> list[str]:
    """Things worth knowing that are not errors: fields that flow one way only, and an
    upload filter that deletes on side a."""
    notes = []
    for name, link in loaded.config.links.items():
        try:
            link_flows = flows(name, link)
        except ConfigError:
            continue  # reported by validate_config
        for flow in link_flows:
            for target, why in flow.one_way.items():
                notes.append(loaded.problem(
                    ("links", name, "fields", target),
                    f"field {target!r} flows a → b only: {why} (set it in `b2a.fields` to map "
                    "it back)"))
            if flow.direction == "b2a" and flow.filter_action == "delete":
                notes.append(loaded.problem(
                    ("links", name, "b2a", "filter_action"),
                    f"a record of {flow.source.connection}.{flow.source.entity} that leaves "
                    f"the upload filter is DELETED in {flow.target.connection}."
                    f"{flow.target.entity} (side a); remove b2a.filter_action to only stop "
                    "uploading it"))
    return notes


# -- the broker --------------------------------------------------------------------------


#: One thing ``syncbus validate`` asked RabbitMQ (what, problem, skipped).
BrokerCheck = PermissionCheck


def check_broker(url: str, *, timeout: float = 10.0) -> list[BrokerCheck]:
    """Connect to RabbitMQ and check the permissions a worker needs (see module docstring).

    Args:
        url: The broker URL.
        timeout: Seconds to wait for the connection.

    Returns:
        The checks in order: connect, declare, consume, publish. After a failed
        connection the others are skipped.
    """
    return check_permissions(url, timeout)


# -- URLs ------------------------------------------------------------------------------


def _url_problems(cfg: SyncConfig) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str | None]] = [
        (("broker", "url"), _amqp_problem(cfg.broker.url)),
        (("state", "url"), _sql_problem(cfg.state.url)),
    ]
    for name, conn in cfg.connections.items():
        if isinstance(conn, SqlConnection):
            found.append((("connections", name, "url"), _sql_problem(conn.url)))
    return [(loc, msg) for loc, msg in found if msg]


def _amqp_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        return "must be an AMQP URL starting with amqp:// or amqps://"
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return f"cannot parse the AMQP URL: the port is not a number{_ENCODE_HINT}"
    if parts.fragment or (parts.query and "@" in parts.query):
        return f"cannot parse the AMQP URL: stray '#' or '?'{_ENCODE_HINT}"
    if not parts.hostname:
        return "cannot parse the AMQP URL: it names no host (amqp://user:password@host:5672/vhost)"
    if parts.path.count("/") > 1:
        return "the virtual host must be one path segment (write / inside it as %2F)"
    return None


def _sql_problem(url: str) -> str | None:
    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"is not a SQLAlchemy URL ({_SQL_EXAMPLE})"
    except ValueError:
        return f"cannot parse the SQL URL: the port is not a number{_ENCODE_HINT}"
    backend = parsed.get_backend_name()
    if backend not in SQL_DIALECTS:
        return (f"unsupported database {backend!r} (supported: {', '.join(SQL_DIALECTS)}; "
                f"{_SQL_EXAMPLE})")
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        return f"unknown driver {parsed.drivername!r} (use postgresql+psycopg or sqlite)"
    except ImportError as exc:
        return f"the driver of {parsed.drivername!r} is not installed ({exc})"
    return None


# -- links against the live metadata -----------------------------------------------------


class LinkChecker:
    """The live checks of links (``syncbus validate``, schema drift): describes each
    connection once and collects (loc, message) pairs in :attr:`found`."""

    def __init__(self, config: SyncConfig, describe: Describe, skip: set[str],
                 unreachable: list[str] | None = None) -> None:
        self.config = config
        self.describe = describe
        self.skip = skip
        self.unreachable = unreachable
        self.found: list[tuple[Loc, str]] = []
        self._entities: dict[str, Mapping[str, EntityInfo] | None] = {}

    def check(self, name: str, link: LinkConfig) -> None:
        base: Loc = ("links", name)
        src = self._endpoint((*base, "source"), link.source.connection, link.source.entity,
                             link.enabled)
        tgt = self._endpoint((*base, "target"), link.target.connection, link.target.entity,
                             link.enabled)
        unknown_keys: list[str] = []
        if src is not None:
            unknown_keys = [k for k in link.key if src.field(k) is None]
            for key in unknown_keys:
                self._add((*base, "key", link.key.index(key)), f"key field {key!r} is not a "
                          f"field of {_where(link.source)}{_hint(key, _names(src))}")
        targets = self._field_map(base, link, src, tgt)
        if targets is not None and not unknown_keys:
            self._key_mapping(base, link, targets, tgt)
        if tgt is not None and targets is not None and "a2b" in link.directions:
            self._required(base, link, targets, tgt)
        self._two_way(name, link, src, tgt)

    def _two_way(self, name: str, link: LinkConfig, src: EntityInfo | None,
                 tgt: EntityInfo | None) -> None:
        """Directions, filters, soft deletes and lookups."""
        base: Loc = ("links", name)
        try:
            link_flows = flows(name, link)
        except ConfigError as exc:
            self._add((*base, "key"), exc.message)
            return
        for flow in link_flows:
            reads, writes = (src, tgt) if flow.direction == "a2b" else (tgt, src)
            over: Loc = base if flow.direction == "a2b" else (*base, "b2a")
            if flow.filter is not None and reads is not None:
                for fld in sorted(flow.filter.fields):
                    if reads.field(fld) is None:
                        self._add((*over, "filter"), f"filter field {fld!r} is not a field of "
                                  f"{_where(flow.source)}{_hint(fld, _names(reads))}")
            if flow.soft_delete is not None and writes is not None \
                    and writes.field(flow.soft_delete.field) is None:
                self._add((*over, "soft_delete", "field"), f"soft delete field "
                          f"{flow.soft_delete.field!r} is not a field of {_where(flow.target)}")
            for column, parent in flow.lookups().items():
                self._lookup(base, flow.direction, column, parent, flow)
        if "b2a" in link.directions and src is not None and tgt is not None:
            reverse = link_flows[-1]
            if all(src.field(k) is not None for k in link.key) and not src.is_unique(link.key):
                self._add((*base, "key"), f"b → a upserts into {_where(link.source)} by "
                          f"({', '.join(link.key)}), which is not unique there; add a unique "
                          "constraint or use its primary key")
            written = set(reverse.specs or {}) if reverse.specs is not None else {
                f.name for f in tgt.fields}
            for required in src.fields:
                if not required.nullable and required.name not in written \
                        and not _generated(required, src):
                    self._add((*base, "b2a"), f"field {required.name!r} of {_where(link.source)} "
                              "is required (NOT NULL) but nothing maps to it from b → a")

    def _lookup(self, base: Loc, direction: str, column: str, parent: str, flow: Flow) -> None:
        where: Loc = (*base, "fields", column) if direction == "a2b" else (*base, "b2a")
        other = self.config.links.get(parent)
        if other is None:
            self._add(where, f"lookup through unknown link {parent!r} "
                      f"({_did_you_mean(parent, self.config.links)}links: "
                      f"{_listing(self.config.links)})")
            return
        pair = {other.source.connection, other.target.connection}
        if {flow.source.connection, flow.target.connection} != pair:
            self._add(where, f"lookup link {parent!r} connects {' and '.join(sorted(pair))}, "
                      f"not {flow.source.connection} and {flow.target.connection}")

    def _endpoint(self, loc: Loc, conn: str, entity: str, live: bool) -> EntityInfo | None:
        known = list(self.config.connections)
        if conn not in known:
            self._add((*loc, "connection"), f"unknown connection {conn!r} "
                      f"({_did_you_mean(conn, known)}known: {_listing(known)})")
            return None
        entities = self._describe(conn) if live else None
        if entities is None:
            return None
        info = entities.get(entity)
        if info is None:
            hint = _hint(entity, entities)
            listing = f" (it has: {_listing(entities)})" if not hint and entities else ""
            self._add((*loc, "entity"), f"entity {entity!r} not found in connection "
                      f"{conn!r}{hint}{listing}")
        return info

    def _describe(self, conn: str) -> Mapping[str, EntityInfo] | None:
        if conn in self._entities:
            return self._entities[conn]
        result: Mapping[str, EntityInfo] | None = None
        if conn not in self.skip:
            try:
                result = self.describe(conn)
            except Exception as exc:  # noqa: BLE001 - any failure is a problem to report
                if isinstance(exc, TransientError) and self.unreachable is not None:
                    self.unreachable.append(conn)
                    self._entities[conn] = None
                    return None
                reason = exc.message if isinstance(exc, BusError) else f"{type(exc).__name__}: {exc}"
                url = getattr(self.config.connections[conn], "url", "")
                self._add(("connections", conn, "url"), f"cannot read the metadata of "
                          f"{redact_url(url)}: {redact_text(reason)}")
        self._entities[conn] = result
        return result

    def _field_map(self, base: Loc, link: LinkConfig, src: EntityInfo | None,
                   tgt: EntityInfo | None) -> dict[str, str | None] | None:
        """Check the field map; return target field → source field (None: constant)."""
        specs = link.field_specs()
        if specs is None:
            if src is None or tgt is None:
                return None
            common = {f.name: f.name for f in src.fields if tgt.field(f.name) is not None}
            if not common:
                self._add(base, f"`fields` is omitted, so same-named fields are copied, but "
                          f"{_where(link.source)} and {_where(link.target)} have no field name "
                          "in common; add a `fields` map")
            return dict(common)
        targets: dict[str, str | None] = {}
        for target, spec in specs.items():
            loc = (*base, "fields", target)
            if tgt is not None and tgt.field(target) is None:
                self._add(loc, f"target field {target!r} is not a field of "
                          f"{_where(link.target)}{_hint(target, _names(tgt))}")
            if spec.from_ is not None and src is not None and src.field(spec.from_) is None:
                from_loc = loc if isinstance((link.fields or {}).get(target), str) else (*loc, "from")
                self._add(from_loc, f"source field {spec.from_!r} is not a field of "
                          f"{_where(link.source)}{_hint(spec.from_, _names(src))}")
            targets[target] = spec.from_
        return targets

    def _key_mapping(self, base: Loc, link: LinkConfig, targets: Mapping[str, str | None],
                     tgt: EntityInfo | None) -> None:
        columns: list[str] = []
        for i, key in enumerate(link.key):
            column = next((t for t, s in targets.items() if s == key), None)
            if column is None:
                how = ("has no same-named field in " + _where(link.target) if link.fields is None
                       else "is not mapped to any target field")
                self._add((*base, "key", i), f"key field {key!r} {how}: records could not be "
                          f"matched; map it, e.g. `fields: {{<target key column>: {key}}}`")
                return
            columns.append(column)
        if tgt is None or any(tgt.field(c) is None for c in columns):
            return
        if not tgt.is_unique(columns):
            cols = ", ".join(columns)
            uniques = ", ".join(f"({', '.join(u)})" for u in tgt.unique_keys) or "none"
            self._add((*base, "key"), f"the key maps to ({cols}) in {_where(link.target)}, "
                      f"which is not unique there: upserts need the primary key "
                      f"({', '.join(tgt.key) or 'none'}) or a unique key [{uniques}]; map the key "
                      f"to one of them or add a unique constraint on ({cols})")

    def _required(self, base: Loc, link: LinkConfig, targets: Mapping[str, str | None],
                  tgt: EntityInfo) -> None:
        loc = (*base, "fields") if link.fields is not None else base
        for fld in tgt.fields:
            if not fld.nullable and fld.name not in targets and not _generated(fld, tgt):
                self._add(loc, f"target field {fld.name!r} of {_where(link.target)} is "
                          "required (NOT NULL) but nothing maps to it")

    def _add(self, loc: Loc, message: str) -> None:
        self.found.append((loc, message))


def _generated(fld: FieldInfo, entity: EntityInfo) -> bool:
    """True when the target fills ``fld`` itself (default, or a serial primary key)."""
    if fld.has_default:
        return True
    return entity.key == (fld.name,) and "int" in fld.type.lower()


def _where(endpoint: Endpoint) -> str:
    return f"{endpoint.connection}.{endpoint.entity}"


def _names(entity: EntityInfo) -> list[str]:
    return [f.name for f in entity.fields]


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """``did you mean 'x'? `` for the closest known name (case first), or nothing."""
    known = list(known)
    folded = [k for k in known if k.lower() == name.lower()]
    match = folded or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}? " if match else ""


def _hint(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    hint = _did_you_mean(name, known).strip()
    return f" ({hint})" if hint else ""


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "") or "none"

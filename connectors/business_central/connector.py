"""Dynamics 365 Business Central (API v2.0) as a syncbus source and target.

Features
    * Client credentials through MSAL (scope ``https://api.businesscentral.dynamics.com/.default``);
      one tenant, environment and company per connection (company name or id,
      resolved once).
    * Entities are the entity sets of the configured API routes: the standard API
      (``customers``, ``vendors``, ``contacts``, ``items``, ``salesOrders``…), Resco's
      ``RescoIntegrations`` pages (``RescoCustomer``…) and custom API pages.
      ``describe`` reads them from ``$metadata``.
    * Change detection by row version where the page has one (``RowVersionNumber``,
      ``systemRowVersion``), otherwise by ``lastModifiedDateTime`` with an overlap
      window and (key, ETag) de-duplication (see ``detection``).
    * Deletions by webhook ``deleted`` notifications (``webhook: true``), each confirmed
      by a GET that answers 404 before it is published, and by periodic key-set
      reconciliation (``sync_deletion: true``, Resco's "Sync Deletion": slower, off by
      default). Webhooks also wake the poll early:
      :meth:`~BusinessCentralConnector.add_change_listener`. Notifications must carry
      the subscription's ``clientState`` secret (configured, or generated per
      subscription and kept in the state store given by
      :meth:`~BusinessCentralConnector.use_secret_store`); others are refused with 401.
    * ``fetch`` reads records by key, 50 keys per ``$filter`` query (see ``fetch``), in
      exactly the form of the change feed.
    * Upserts by ``number`` (or the key a link maps) with ETags, conflicts re-read and
      retried once (a hook for other policies), ``$batch`` of ≤ 100, 429 backed off with
      jitter, every outcome classified (see ``writer``).

Configuration
    ``BusinessCentralConnection`` (``schemas/config.py``): ``url``, ``tenant_id``,
    ``environment``, ``company``, ``client_id``, ``client_secret`` (``${ENV}``) or a
    certificate, ``authority_host``, ``ca_bundle``, ``timeout``, ``batch_size``,
    ``apis``, ``entities`` (per entity: ``detection``, ``overlap``, ``sync_deletion``,
    ``reconcile_interval``, ``webhook``, ``key``), ``webhooks``, ``overlap``,
    ``index_url``, ``max_retries``, ``backoff``, ``conflict``.

Limits
    * Pages with composite keys (Resco's service lines) are not offered as entities.
    * Deletions need the key index (a local SQLite file unless ``index_url`` points
      at a shared database): records deleted before they were ever read are not
      reported.
    * Sales order lines are an entity of their own (``salesOrderLines``), not part of
      the order's record.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from connectors.base import (
    Capabilities,
    ChangePage,
    ConfigError,
    EntityInfo,
    FetchedRecord,
    Outcome,
    SchemaError,
    Version,
    WriteRow,
)
from connectors.business_central.client import BCClient
from connectors.business_central.detection import ChangeFeed, FeedSettings
from connectors.business_central.fetch import Fetcher
from connectors.business_central.index import (
    KeyIndex,
    copy_index,
    default_index_url,
    shown_url,
)
from connectors.business_central.metadata import PageInfo, entity_info, parse_metadata
from connectors.business_central.webhooks import (
    SECRET_SCOPE,
    MemorySecrets,
    Subscriptions,
    WebhookReceiver,
    WebhookRejected,
    check_client_state,
    parse_notifications,
)
from connectors.business_central.writer import (
    ConflictHook,
    Writer,
    fail_on_conflict,
    retry_once,
)
from connectors.features import ScratchCopy, SecretStore
from schemas.config import BusinessCentralConnection

__all__ = ["BusinessCentralConnector"]

log = structlog.get_logger(__name__)

#: Business Central online: 6,000 requests per 5 minutes per user.
RATE_LIMIT = 6000 / 300


class BusinessCentralConnector:
    """A Business Central company as a syncbus connector.

    Args:
        name: The connection's name.
        on_conflict: Conflict hook for stale ETags (default from ``conflict``).
        **settings: The fields of ``BusinessCentralConnection`` (``url``,
            ``tenant_id``, ``environment``, ``company``, ``client_id``,
            ``client_secret``, …), as the registry passes them.

    Raises:
        ConfigError: the settings are invalid.
    """

    def __init__(self, name: str, *, on_conflict: ConflictHook | None = None,
                 **settings: Any) -> None:
        self.name = name
        try:
            self.config = BusinessCentralConnection.model_validate(
                {k: v for k, v in settings.items() if k != "type"})
        except ValidationError as exc:
            problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
            raise ConfigError(f"connection {name!r}: invalid settings", problems) from exc
        cfg = self.config
        webhook_entities = [e for e, s in cfg.entities.items() if s.webhook]
        if webhook_entities and cfg.webhooks is None:
            raise ConfigError(f"connection {name!r}: entities {webhook_entities} want webhooks "
                              "but `webhooks` (notification_url, listen) is not configured")
        self.client = BCClient(name, cfg)
        hook = on_conflict or (retry_once if cfg.conflict == "retry_once" else fail_on_conflict)
        self.writer = Writer(self.client, cfg.batch_size, hook)
        self.fetcher = Fetcher(self.client)
        self._pages: dict[str, PageInfo] | None = None
        self._feeds: dict[str, ChangeFeed] = {}
        self._index: KeyIndex | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._rejection_listeners: list[Callable[[str], None]] = []
        self._receiver: WebhookReceiver | None = None
        self._subscriptions: Subscriptions | None = None
        self._secrets: SecretStore = MemorySecrets()
        self._client_states: dict[str, str] = {}

    def __repr__(self) -> str:
        return (f"<BusinessCentralConnector {self.name!r} {self.config.url} "
                f"{self.config.environment}/{self.config.company}>")

    @property
    def capabilities(self) -> Capabilities:
        """Change tracking, alternate keys, batches of ``batch_size`` (≤ 100), 20 req/s;
        a setup step (checks, subscriptions), change listeners, webhooks when configured,
        a key index that can be read through a scratch copy."""
        deletes = any(s.sync_deletion or s.webhook for s in self.config.entities.values())
        return Capabilities(change_tracking=True, deletes_tracked=deletes, alternate_keys=True,
                            max_batch=self.config.batch_size, rate_limit=RATE_LIMIT,
                            version_types=(int, str),  # row versions, or ETags
                            tracking_setup=True, change_listener=True,
                            webhooks=self.config.webhooks is not None, scratch_copy=True)

    # -- metadata -----------------------------------------------------------------------

    def describe(self, entities: Sequence[str] | None = None) -> list[EntityInfo]:
        """Entity sets of the configured API routes, from ``$metadata``.

        Raises:
            SchemaError: a named entity does not exist.
            ConnectorUnavailable: Business Central cannot be reached.
        """
        names = list(entities) if entities is not None else list(self.pages())
        return [entity_info(self.page(n), self._settings(n).key) for n in names]

    def pages(self) -> dict[str, PageInfo]:
        """Every addressable entity set by name (the first API route wins on a clash).

        Raises:
            ConfigError: the company does not exist.
            ConnectorUnavailable, TransientError, PermanentError: from the client.
        """
        if self._pages is None:
            self.client.company_id()  # an unknown company is a configuration error, say so now
            pages: dict[str, PageInfo] = {}
            for api in self.config.apis:
                response = self.client.request("GET", f"{api}/$metadata", allow=(404,))
                if response.status_code == 404:
                    log.info("api_not_installed", connector=self.name, api=api)
                    continue
                for name, page in parse_metadata(response.text, api).items():
                    pages.setdefault(name, page)
            self._pages = pages
        return self._pages

    def page(self, entity: str) -> PageInfo:
        """The metadata of one entity set.

        Raises:
            SchemaError: no such entity set in the configured API routes.
        """
        found = self.pages().get(entity)
        if found is None:
            known = ", ".join(sorted(self.pages())) or "none"
            raise SchemaError(f"{self.name}: no entity set {entity!r} in APIs "
                              f"{self.config.apis} (known: {known})", entity=entity)
        return found

    def prepare_tracking(self, entities: Sequence[str]) -> list[str]:
        """Check that ``entities`` can be tracked and say how (``syncbus setup``).

        Returns:
            One line per entity, e.g. ``RescoCustomer: row version (RowVersionNumber)``.

        Raises:
            SchemaError: an entity is unknown or has neither a row version nor a time.
        """
        lines = []
        for entity in entities:
            feed = self._feed(entity)
            how = (f"row version ({feed.page.version_field})" if feed.settings.mode ==
                   "row_version" else f"{feed.page.modified_field} with a "
                   f"{feed.settings.overlap:g}s overlap")
            deletes = [w for w, on in (("webhook", self._settings(entity).webhook),
                                       ("reconciliation", feed.settings.sync_deletion)) if on]
            lines.append(f"{entity}: changes by {how}; deletions by "
                         f"{' and '.join(deletes) or 'nothing (sync_deletion is off)'}")
            if self._settings(entity).webhook:
                self.start_webhooks()
                assert self._subscriptions is not None
                self._subscriptions.ensure(feed.page, force=True)
        return lines

    # -- change feed -------------------------------------------------------------------

    def has_changes(self, entity: str, cursor: str | None) -> bool:
        """Whether a poll would find changes (row versions: one ``$top=1`` request).

        Raises:
            SchemaError: unknown entity or a foreign cursor.
            ConnectorUnavailable: Business Central cannot be reached.
        """
        feed = self._feed(entity)
        self._keep_subscribed(entity, feed.page)
        return feed.has_changes(cursor)

    def read_changes(self, entity: str, cursor: str | None, page_size: int) -> Iterator[ChangePage]:
        """Yield pages of changes after ``cursor``, upserts then deletions.

        Raises:
            ValueError: ``page_size`` < 1.
            SchemaError: unknown entity, no way to detect changes, or a foreign cursor.
            ConnectorUnavailable, TransientError: Business Central is unavailable.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        feed = self._feed(entity)
        self._keep_subscribed(entity, feed.page)
        return feed.read(cursor, page_size)

    def snapshot(self, entity: str) -> Iterator[tuple[dict[str, Any], Version]]:
        """Yield (change key, version) of every record.

        Raises:
            SchemaError: unknown entity.
            ConnectorUnavailable: Business Central cannot be reached.
        """
        return self._feed(entity).snapshot()

    def fetch(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[FetchedRecord | None]:
        """Read the current records with ``keys``, 50 keys per ``$filter`` query.

        A key is the page key (``id``/``No``), ``number``, the configured ``key``, or
        other fields an upsert could look records up by. ``key``, ``values``,
        ``version`` and ``modified_at`` are as ``read_changes`` gives them (an entity
        without change detection gets its ETag as version).

        Returns:
            One entry per key, in order (duplicates allowed): the record, or None where
            none exists, the value does not fit its field, or several records match.

        Raises:
            SchemaError: unknown entity, or a key naming a field the entity lacks.
            ConnectorUnavailable, TransientError: Business Central is unavailable.
        """
        return self.fetcher.fetch(self._record_feed(entity), keys) if keys else []

    # -- writing -----------------------------------------------------------------------

    def upsert(self, entity: str, rows: Sequence[WriteRow]) -> list[Outcome]:
        """Insert or update ``rows`` by key (``number`` or another unique key).

        Raises:
            SchemaError: unknown entity.
            ConnectorUnavailable: Business Central cannot be reached.
            PermanentError: the credentials are refused.
        """
        return self.writer.upsert(self.page(entity), rows)

    def delete(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[Outcome]:
        """Delete records by key (missing ones count as applied).

        Raises:
            SchemaError: unknown entity.
            ConnectorUnavailable: Business Central cannot be reached.
            PermanentError: the credentials are refused.
        """
        return self.writer.delete(self.page(entity), keys)

    def scratch_copy(self, scratch_dir: Path) -> ScratchCopy:
        """Settings that use a copy of the key index, in ``scratch_dir``, and no webhooks.

        Reading changes moves the key index on (records seen, tombstones) and makes or
        renews webhook subscriptions, so ``syncbus preview`` reads through a copy and
        subscribes to nothing.
        """
        index, copy = self._index_url(), scratch_dir / f"bc-{self.name}.db"
        notes = []
        if not copy_index(index, copy):
            notes.append(f"{self.name}: the key index is at {shown_url(index)}, not copied: "
                         "deletions it holds are not previewed")
        entities = {e: s.model_copy(update={"webhook": False})
                    for e, s in self.config.entities.items()}
        hooked = sorted(e for e, s in self.config.entities.items() if s.webhook and not s.sync_deletion)
        if hooked:
            notes.append(f"{self.name}: deletions reported by webhooks ({', '.join(hooked)}) are "
                         "not previewed (a preview subscribes to nothing)")
        settings = self.config.model_copy(update={"index_url": f"sqlite:///{copy}",
                                                  "webhooks": None, "entities": entities})
        return ScratchCopy(settings, tuple(notes))

    # -- webhooks ----------------------------------------------------------------------

    def add_change_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(entity)`` when a notification says ``entity`` changed.

        The worker can poll that entity at once instead of waiting for its interval.
        """
        self._listeners.append(callback)

    def add_rejection_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` for each refused notification POST (for metrics;
        ``reason`` is one of :data:`~connectors.business_central.webhooks.REASONS`)."""
        self._rejection_listeners.append(callback)

    def use_secret_store(self, store: SecretStore) -> None:
        """Keep the generated ``clientState`` secrets in ``store`` (the worker's state
        store), so that every worker and every restart checks notifications against the
        secret the subscription was made with. Without it they live in memory."""
        self._secrets = store
        self._client_states.clear()

    def start_webhooks(self) -> None:
        """Start the receiver (when ``webhooks.listen`` is set) and the subscriptions.

        Raises:
            ConfigError: ``webhooks`` is not configured.
            OSError: the receiver's port cannot be bound.
        """
        hooks = self.config.webhooks
        if hooks is None:
            raise ConfigError(f"connection {self.name!r}: `webhooks` is not configured")
        if self._receiver is None and hooks.listen:
            self._receiver = WebhookReceiver(hooks.listen, self._received,
                                             self._rejected).start()
        if self._subscriptions is None:
            self._subscriptions = Subscriptions(self.client, hooks.notification_url,
                                                self._client_state, hooks.renew_before)

    @property
    def webhook_address(self) -> tuple[str, int] | None:
        """(host, port) the webhook receiver is bound to, None when it does not run."""
        return None if self._receiver is None else (self._receiver.host, self._receiver.port)

    def notify(self, body: object, *, peer: str | None = None) -> list[str]:
        """Take a notification POST body (``{"value": [...]}``) and act on it.

        Every item must carry the ``clientState`` of its subscription, else nothing of
        the body is acted on. ``deleted`` notifications name records for the detector
        to check (it deletes only what Business Central answers 404 for); every
        notification wakes the listeners of its entity.

        Args:
            body: The parsed JSON body.
            peer: The sender's address (for the log).

        Returns:
            The entities notified about.

        Raises:
            WebhookRejected: the body is refused (logged and counted here; answer with
                its ``http_status``: 401 for a missing or wrong ``clientState``).
        """
        try:
            notes = parse_notifications(body)
            for note in notes:
                check_client_state(note, self._expected_state(note.api, note.entity_set))
            company = self.client.company_id().lower() if notes else ""
            if any(note.company.lower() != company for note in notes):
                raise WebhookRejected("a notification names another company",
                                      reason="unknown_resource")
        except WebhookRejected as exc:
            self._rejected(exc, peer)
            raise
        touched: dict[str, list[str]] = {}
        for note in notes:
            deleted = touched.setdefault(note.entity_set, [])
            if note.change_type == "deleted" and note.key is not None:
                deleted.append(note.key)
        for entity, keys in touched.items():
            feed = self._feed(entity)
            if keys and feed.index is not None:
                noted = feed.index.suspect(entity, keys)
                log.info("webhook_deletes_to_confirm", connector=self.name, entity=entity,
                         notified=len(keys), known=noted)
            for listener in list(self._listeners):
                listener(entity)
        return list(touched)

    def _received(self, body: dict[str, Any], peer: str) -> None:
        self.notify(body, peer=peer)

    def _rejected(self, exc: WebhookRejected, peer: str | None) -> None:
        """Log and count a refused notification POST (never with a secret)."""
        log.warning("webhook_rejected", connector=self.name, reason=exc.reason,
                    status=exc.http_status, peer=peer, error=exc.message)
        for listener in list(self._rejection_listeners):
            listener(exc.reason)

    def _client_state(self, page: PageInfo) -> str:
        """The secret of ``page``'s subscription: configured, or made and kept."""
        hooks = self.config.webhooks
        if hooks is not None and hooks.client_state is not None:
            return hooks.client_state.get_secret_value()
        name = self._secret_name(page.api, page.entity_set)
        found = self._client_states.get(name)
        if found is None:
            found = self._secrets.keep_secret(SECRET_SCOPE, name,
                                              lambda: secrets.token_urlsafe(32))
            self._client_states[name] = found
        return found

    def _expected_state(self, api: str, entity_set: str) -> str | None:
        """The secret a notification about ``entity_set`` must carry; None when this
        connection has no subscription for it (never made here)."""
        hooks = self.config.webhooks
        settings = self.config.entities.get(entity_set)
        if hooks is None or settings is None or not settings.webhook:
            return None
        if hooks.client_state is not None:
            return hooks.client_state.get_secret_value()
        name = self._secret_name(api, entity_set)
        found = self._client_states.get(name) or self._secrets.get_secret(SECRET_SCOPE, name)
        if found is not None:
            self._client_states[name] = found
        return found

    def _secret_name(self, api: str, entity_set: str) -> str:
        return f"{self.name}/{api.lower()}/{entity_set}"

    def close(self) -> None:
        """Stop the receiver and close connections."""
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None
        self.client.close()
        if self._index is not None:
            self._index.close()

    # -- internals ---------------------------------------------------------------------

    def _settings(self, entity: str) -> BusinessCentralConnection.Entity:
        return self.config.entities.get(entity) or BusinessCentralConnection.Entity()

    def _feed(self, entity: str) -> ChangeFeed:
        feed = self._feeds.get(entity)
        if feed is None:
            page, settings = self.page(entity), self._settings(entity)
            mode = settings.detection
            if mode == "auto":
                mode = "row_version" if page.version_field else "modified"
            missing = page.version_field if mode == "row_version" else page.modified_field
            if missing is None:
                raise SchemaError(f"{self.name}: {entity} has no "
                                  f"{'row version' if mode == 'row_version' else 'modification time'}"
                                  " field to detect changes by", entity=entity)
            track = settings.sync_deletion or settings.webhook
            overlap = settings.overlap if settings.overlap is not None else self.config.overlap
            feed = ChangeFeed(self.client, page, FeedSettings(
                mode, overlap, settings.sync_deletion, settings.reconcile_interval, track,
                tuple(settings.key)), self._key_index() if track else None)
            self._feeds[entity] = feed
        return feed

    def _record_feed(self, entity: str) -> ChangeFeed:
        """The entity's change feed; for a page without change detection, a feed that
        only turns rows into records (version: the ETag)."""
        page = self.page(entity)
        if page.version_field is None and page.modified_field is None:
            return ChangeFeed(self.client, page, FeedSettings(
                "modified", 0.0, False, 0.0, False, tuple(self._settings(entity).key)), None)
        return self._feed(entity)

    def _key_index(self) -> KeyIndex:
        if self._index is None:
            self._index = KeyIndex(self.name, self._index_url())
        return self._index

    def _index_url(self) -> str:
        return self.config.index_url or default_index_url(self.name)

    def _keep_subscribed(self, entity: str, page: PageInfo) -> None:
        if not self._settings(entity).webhook:
            return
        self.start_webhooks()
        assert self._subscriptions is not None
        try:
            self._subscriptions.ensure(page)
        except Exception as exc:  # noqa: BLE001 - polling stays the source of truth
            log.warning("webhook_subscription_failed", connector=self.name, entity=entity,
                        error=str(exc))

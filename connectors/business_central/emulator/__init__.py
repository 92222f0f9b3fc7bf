"""A local Business Central (API v2.0) with its Entra ID, for tests, demos and sandboxes.

Features
    * ``/v2.0/{tenant}/{environment}/api/v2.0/companies`` and per company
      ``customers``, ``vendors``, ``contacts``, ``items``, ``salesOrders`` (+
      ``salesOrderLines``); Resco's ``RescoIntegrations`` pages
      (``api/Resco/RescoIntegrations/v2.0/…/RescoCustomer`` …, ``RowVersionNumber``)
      and a custom page with ``systemRowVersion``
      (``api/syncbus/tracking/v1.0/…/trackedVendors``), all on one database-wide
      row-version counter.
    * ETags with ``If-Match`` rules, ``$filter/$select/$orderby/$top/$skip/$count``,
      server-driven paging (20,000 cap), delta links refused, JSON ``$batch`` (≤ 100,
      atomic under ``Isolation: snapshot``), webhooks with handshake, 3-day expiry,
      debounce, ``collection`` notifications, retries and subscription deletion.
    * Bearer tokens from the fake Entra ID on the same host (``/{tenant}/oauth2/v2.0/token``),
      HTTP or HTTPS, 429 without ``Retry-After``, fault injection, ``--seed``, ``--store``.

Configuration
    :class:`BusinessCentralEmulator` arguments (tenant, environment, company, client
    credentials, page cap, batch limit, stale-ETag status, webhook timings) and runtime
    knobs: :attr:`~BusinessCentralEmulator.faults`, :meth:`~BusinessCentralEmulator.throttle`,
    :attr:`~BusinessCentralEmulator.clock`, :attr:`~BusinessCentralEmulator.entra`.

Limits
    * See ``docs/business-central.md`` ("What is and is not emulated").
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from connectors.business_central.emulator import rules
from connectors.business_central.emulator.app import build_app, too_many_requests
from connectors.business_central.emulator.model import API_V2, PageDef, find_page
from connectors.business_central.emulator.seed import seed as seed_company
from connectors.business_central.emulator.service import Service
from connectors.business_central.emulator.store import Company, Record, Store
from connectors.business_central.emulator.webhooks import Webhooks
from connectors.emulation import EmulatorServer, RateLimiter, TlsFiles, make_tls, serve_forever
from connectors.identity import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, FakeEntra

__all__ = ["BusinessCentralEmulator", "DEFAULT_COMPANY", "DEFAULT_ENVIRONMENT",
           "EmulatorClock", "serve"]

#: Company created in a new environment.
DEFAULT_COMPANY = "CRONUS USA, Inc."
#: Environment name served by default.
DEFAULT_ENVIRONMENT = "production"


class EmulatorClock:
    """The emulator's "now": real time, optionally frozen and/or moved forward."""

    def __init__(self) -> None:
        self._frozen: datetime | None = None
        self._offset = timedelta()

    def __call__(self) -> datetime:
        return (self._frozen or datetime.now(UTC)) + self._offset

    def freeze(self, at: datetime | None = None) -> None:
        """Stop time at ``at`` (default: now), so writes share one ``lastModifiedDateTime``."""
        self._frozen, self._offset = (at or self()), timedelta()

    def unfreeze(self) -> None:
        """Let time run again (keeping any offset)."""
        self._frozen = None

    def advance(self, seconds: float) -> None:
        """Move time forward (subscriptions expire without waiting three days)."""
        self._offset += timedelta(seconds=seconds)


class BusinessCentralEmulator:
    """A Business Central environment served over HTTP(S), with direct data access for tests.

    Args:
        host: Interface to listen on.
        port: TCP port, 0 for a free one.
        https: Serve HTTPS with a local CA (MSAL needs an https authority).
        cert_dir: Where the CA and certificate go (default: a ``certs`` dir in the store's
            folder, else ``.syncbus/certs``).
        seed: Records per master table to create in a new environment (0: none).
        store: SQLite file keeping the environment across restarts; None: memory.
        tenant: The Entra tenant id; ``domains`` are other names accepted in URLs.
        environment: Environment name (``environments`` adds more).
        company: Name of the company created in a new environment.
        client_id: Registered application (client credentials).
        client_secret: Its secret.
        token_ttl: Lifetime of access tokens, seconds.
        max_page_size: Server-driven paging cap.
        max_batch: Operations per ``$batch``.
        stale_status: Status of ``Request_EntityChanged`` (409 or 412).
        webhook_debounce: Seconds of collecting changes before notifying (real: 30).
        webhook_collection_threshold: Changes above which one ``collection`` is sent.
        webhook_retry_delays: Seconds between failed delivery attempts.
        webhook_verify: TLS verification of notification URLs.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, https: bool = True,
                 cert_dir: Path | None = None, seed: int = 0, store: Path | None = None,
                 tenant: str = DEFAULT_TENANT, domains: tuple[str, ...] = (),
                 environment: str = DEFAULT_ENVIRONMENT, environments: tuple[str, ...] = (),
                 company: str = DEFAULT_COMPANY, client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET, token_ttl: float = 3600,
                 max_page_size: int = 20_000, max_batch: int = 100, stale_status: int = 409,
                 webhook_debounce: float = 30.0, webhook_collection_threshold: int = 1000,
                 webhook_retry_delays: tuple[float, ...] = (60.0, 300.0, 1800.0, 3600.0),
                 webhook_verify: bool | str = True) -> None:
        self.host, self.tenant, self.environment = host, tenant, environment
        self.client_id, self.client_secret = client_id, client_secret
        self.clock = EmulatorClock()
        self.store = Store(path=store, clock=self.clock, stale_status=stale_status)
        if not self.store.companies:
            seed_company(self.store, self.store.add_company(company), seed)
        self.entra = FakeEntra(tenants={tenant: {client_id: client_secret}}, token_ttl=token_ttl)
        self.webhooks = Webhooks(self.store, debounce=webhook_debounce,
                                 collection_threshold=webhook_collection_threshold,
                                 retry_delays=webhook_retry_delays, verify=webhook_verify)
        self.service = Service(self.store, self.webhooks, max_page_size=max_page_size,
                               max_batch=max_batch)
        self.limiter = RateLimiter(respond=too_many_requests)
        self.faults = build_app(self.service, self.entra, tenant=tenant, domains=set(domains),
                                environments={environment, *environments}, limiter=self.limiter)
        self.tls: TlsFiles | None = None
        if https:
            where = cert_dir or (store.parent / "certs" if store else Path(".syncbus/certs"))
            self.tls = make_tls(where, _hostnames(host))
        self._server = EmulatorServer(self.faults, host=host, port=port, tls=self.tls)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> BusinessCentralEmulator:
        """Serve in a background thread (and start the webhook notifier)."""
        self._server.start()
        self.webhooks.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the store file. Idempotent."""
        self.webhooks.stop()
        self._server.stop()
        self.store.close()

    def __enter__(self) -> BusinessCentralEmulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL (API host and Entra ID authority host)."""
        return self._server.url

    @property
    def ca_bundle(self) -> str | None:
        """The CA file clients must trust (None over HTTP)."""
        return str(self.tls.ca_pem) if self.tls else None

    def api_url(self, api: str = API_V2) -> str:
        """``<url>/v2.0/<tenant>/<environment>/api/<api>``."""
        return f"{self.url}/v2.0/{self.tenant}/{self.environment}/api/{api}"

    def company_url(self, api: str = API_V2) -> str:
        """The default company's URL in API route ``api``."""
        return f"{self.api_url(api)}/companies({self.company.id})"

    def connection(self, **overrides: Any) -> dict[str, Any]:
        """Settings of a ``business_central`` connection to this emulator.

        Args:
            overrides: Fields to add or replace (``entities``, ``webhooks``…).

        Returns:
            A dict for ``BusinessCentralConnection`` / the connector's keyword arguments.
        """
        return {"url": self.url, "tenant_id": self.tenant, "environment": self.environment,
                "company": self.company.name, "client_id": self.client_id,
                "client_secret": self.client_secret, "authority_host": self.url,
                "ca_bundle": self.ca_bundle, **overrides}

    # -- knobs ----------------------------------------------------------------------------

    def throttle(self, max_requests: int | None, window: float = 300.0, *,
                 max_concurrent: int | None = None) -> None:
        """Answer 429 (no ``Retry-After``) beyond ``max_requests`` per ``window`` seconds.

        Args:
            max_requests: Requests per window per caller; None lifts the limit.
            window: Seconds of the sliding window (Business Central: 6,000 per 300 s).
            max_concurrent: Requests in flight per caller.
        """
        self.limiter.max_requests, self.limiter.window = max_requests, window
        self.limiter.max_concurrent = max_concurrent
        self.limiter.reset()

    def issue_token(self) -> str:
        """A valid access token for the API (for raw HTTP tests that skip MSAL)."""
        return self.entra.issue_token(audience="https://api.businesscentral.dynamics.com",
                                      tenant=self.tenant, client_id=self.client_id)

    # -- data ("server-side" edits) -------------------------------------------------------

    @property
    def company(self) -> Company:
        """The first company."""
        return next(iter(self.store.companies.values()))

    def insert(self, entity_set: str, values: dict[str, Any], *, api: str = API_V2,
               parent: str | None = None) -> dict[str, Any]:
        """Create a record as a Business Central user would; return the page view."""
        page, company = self._page(api, entity_set), self.company
        with self.store.transaction():
            owner = company.rows("Sales Header").get(parent) if parent else None
            record = rules.create(self.store, company, page, values, parent=owner)
        return rules.view(page, record)

    def update(self, entity_set: str, key: str, values: dict[str, Any], *,
               api: str = API_V2) -> dict[str, Any]:
        """Modify a record (no ETag needed); return the page view."""
        page, company = self._page(api, entity_set), self.company
        with self.store.transaction():
            record = rules.modify(self.store, company, page, self._record(page, key), values,
                                  None)
        return rules.view(page, record)

    def delete(self, entity_set: str, key: str, *, api: str = API_V2) -> None:
        """Delete a record (no ETag needed)."""
        page, company = self._page(api, entity_set), self.company
        with self.store.transaction():
            rules.remove(self.store, company, page, self._record(page, key), None)

    def get(self, entity_set: str, key: str, *, api: str = API_V2) -> dict[str, Any] | None:
        """A record's page view by key (SystemId, or ``No`` on Resco pages), or None."""
        page = self._page(api, entity_set)
        try:
            return rules.view(page, self._record(page, key))
        except KeyError:
            return None

    def rows(self, entity_set: str, *, api: str = API_V2) -> list[dict[str, Any]]:
        """Every record of a page, as the page shows it."""
        page = self._page(api, entity_set)
        with self.store.lock:
            return [rules.view(page, r) for r in self.company.rows(page.table).values()]

    def _page(self, api: str, entity_set: str) -> PageDef:
        page = find_page(api, entity_set)
        if page is None:
            raise KeyError(f"no page {entity_set!r} in API {api!r}")
        return page

    def _record(self, page: PageDef, key: str) -> Record:
        rows = self.company.rows(page.table)
        found = rows.get(key.lower()) if page.key_field.source == "@id" else \
            self.company.by_number(page.table, key)
        if found is None:
            raise KeyError(f"{page.entity_set}({key}) does not exist")
        return found


def _hostnames(host: str) -> tuple[str, ...]:
    names = ["localhost", "127.0.0.1"]
    if host not in names and host not in ("0.0.0.0", "::", ""):
        names.append(host)
    return tuple(names)


def serve(*, host: str, port: int, https: bool, cert_dir: Path, seed: int, store: Path | None,
          echo: Callable[[str], None]) -> None:
    """Run the emulator in the foreground until Ctrl-C (``syncbus emulate bc``).

    Args:
        host: Interface to listen on.
        port: TCP port.
        https: Serve HTTPS (needed by MSAL clients).
        cert_dir: Where the local CA and certificate are kept.
        seed: Records per master table for a new environment.
        store: SQLite file keeping the data; None: memory only.
        echo: Prints lines for the operator.

    Raises:
        OSError: the port cannot be bound.
    """
    emulator = BusinessCentralEmulator(host=host, port=port, https=https, cert_dir=cert_dir,
                                       seed=seed, store=store, webhook_verify=False)
    echo(f"Business Central emulator: tenant {emulator.tenant}, environment "
         f"{emulator.environment}, company {emulator.company.name!r} ({emulator.company.id})")
    echo(f"  API path:   /v2.0/{emulator.tenant}/{emulator.environment}/api/v2.0/ "
         "(below the URL it listens on)")
    echo(f"  Entra ID:   authority_host = that URL, client_id {emulator.client_id}, "
         f"client_secret {emulator.client_secret}")
    if emulator.tls is not None:
        echo(f"  CA bundle:  {emulator.tls.ca_pem}")
    else:
        echo("  plain HTTP: MSAL clients need --https")
    emulator.webhooks.start()
    try:
        serve_forever(emulator.faults, host, port, emulator.tls, echo)
    finally:
        emulator.webhooks.stop()
        emulator.store.close()

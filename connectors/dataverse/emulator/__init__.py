"""A local Dataverse (Dynamics 365) organisation: the Web API v9.2 and its Entra ID.

Start one in a test with ``DataverseEmulator(...)`` (``.url``, ``.connection()``),
or from the command line with ``syncbus emulate dataverse``. See ``docs/dataverse.md``
for what is emulated.

Features
    * Web API: entity sets, alternate keys, queries and paging, create / upsert /
      delete with ETags, lookups, ``$batch``, change tracking, metadata and CSDL,
      ``WhoAmI`` (modules ``service``, ``delta``, ``batch``, ``metadata``).
    * A fake Entra ID on the same host: MSAL fetches real tokens from it.
    * Service protection limits (429 + ``Retry-After``), fault injection (503, latency,
      dropped connections), plug-in style validation hooks.
    * ``seed`` data and a SQLite ``store`` kept across restarts.

Configuration
    Defaults: tenant ``DEFAULT_TENANT``, client ``DEFAULT_CLIENT_ID`` with secret
    ``DEFAULT_CLIENT_SECRET`` (from ``connectors.identity``); limits as Dataverse's
    (6,000 requests and 1,200 s of execution per 5 minutes, 52 concurrent requests).

Limits
    See the modules; notably no ``$expand``, FetchXML, deep insert or option-set labels.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from connectors.dataverse.emulator.app import API_PREFIX, build_app, throttled
from connectors.dataverse.emulator.model import DEFAULT_ENTITIES, EntityDef
from connectors.dataverse.emulator.seed import seed as seed_rows
from connectors.dataverse.emulator.service import Plugin, Service, Settings
from connectors.dataverse.emulator.store import Store
from connectors.emulation import EmulatorServer, FaultInjector, RateLimiter, make_tls, serve_forever
from connectors.identity import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
    FakeEntra,
)

__all__ = ["DataverseEmulator", "Limits", "serve"]

#: Paths of the identity endpoints, never faulted nor limited.
_IDENTITY_PATHS = ("/oauth2/", "/.well-known/", "/discovery/", "/devicelogin")


class Limits:
    """Service protection limits per user (Dataverse's defaults unless told otherwise).

    Args:
        requests: Requests per ``window`` (6,000); None: unlimited.
        window: Seconds of the sliding window (300).
        concurrent: Requests in flight per user (52); None: unlimited.
        execution: Seconds of combined execution time per window (1,200); None: unlimited.
    """

    def __init__(self, requests: int | None = 6000, window: float = 300.0,
                 concurrent: int | None = 52, execution: float | None = 1200.0) -> None:
        self.requests, self.window = requests, window
        self.concurrent, self.execution = concurrent, execution

    def limiter(self) -> RateLimiter:
        """A rate limiter enforcing these limits with Dataverse's 429 answers."""
        return RateLimiter(max_requests=self.requests, window=self.window,
                           max_concurrent=self.concurrent, max_execution=self.execution,
                           respond=throttled)


class DataverseEmulator:
    """One emulated organisation served over HTTP(S) in a background thread.

    Args:
        host: Interface to listen on.
        port: TCP port; 0 picks a free one.
        https: Serve HTTPS with a local CA (MSAL needs https for the authority).
        cert_dir: Where ``ca.pem`` and the server certificate go (default: a temp dir).
        seed: Accounts (with contacts) to load when the store is empty.
        store: SQLite file keeping the data across restarts; None: memory only.
        entities: Extra tables besides ``account`` and ``contact``.
        limits: Service protection limits; None: Dataverse's defaults.
        settings: Page size, delta token lifetime, expired-token status, batch size.
        token_ttl: Lifetime of access tokens, seconds.
        clock: "Now" of the data (delta token ages, createdon/modifiedon).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, https: bool = True,
                 cert_dir: str | Path | None = None, seed: int = 0,
                 store: str | Path | None = None, entities: Sequence[EntityDef] = (),
                 limits: Limits | None = None, settings: Settings | None = None,
                 token_ttl: float = 3600.0, clock: Callable[[], datetime] | None = None) -> None:
        self.store = Store((*DEFAULT_ENTITIES, *entities), path=store, clock=clock)
        for entity in entities:
            self.store.define(entity)
        if seed and not any(t.rows for t in self.store.tables.values()):
            seed_rows(self.store, seed)
        self.entra = FakeEntra(token_ttl=token_ttl)
        self.service = Service(self.store, settings or Settings())
        self.limiter = (limits or Limits()).limiter()
        self.faults = FaultInjector(build_app(self.service, self.entra), limiter=self.limiter,
                                    exempt=_IDENTITY_PATHS)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        tls = None
        if https:
            if cert_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="dataverse-emulator-")
                cert_dir = self._tmp.name
            tls = make_tls(Path(cert_dir))
        self.server = EmulatorServer(self.faults, host=host, port=port, tls=tls)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> DataverseEmulator:
        """Start serving; returns once connections are accepted."""
        self.server.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the store (idempotent)."""
        self.server.stop()
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DataverseEmulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- addresses and credentials ------------------------------------------------------------

    @property
    def url(self) -> str:
        """The organisation URL (``https://127.0.0.1:<port>``), also the token audience."""
        return self.server.url

    @property
    def api_url(self) -> str:
        """The Web API root, with a trailing slash."""
        return f"{self.url}{API_PREFIX}/"

    @property
    def ca_bundle(self) -> str | None:
        """The CA file clients must trust (None over plain HTTP)."""
        return str(self.server.tls.ca_pem) if self.server.tls else None

    def connection(self, **overrides: Any) -> dict[str, Any]:
        """Settings of a ``dataverse`` connection to this emulator (config-file shape).

        Args:
            **overrides: Fields to change (``batch_size``, ``client_secret``…).

        Returns:
            ``{"type": "dataverse", "url": …, "tenant_id": …, …}``.
        """
        return {"type": "dataverse", "url": self.url, "tenant_id": DEFAULT_TENANT,
                "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET,
                "authority_host": self.url, "ca_bundle": self.ca_bundle, **overrides}

    # -- knobs ------------------------------------------------------------------------------

    def define_entity(self, entity: EntityDef) -> None:
        """Add (or redefine) a table at runtime; it is served at once."""
        self.store.define(entity)

    def add_plugin(self, plugin: Plugin) -> None:
        """Run ``plugin`` before every create, update and delete (it may refuse them)."""
        self.service.plugins.append(plugin)

    def fail_next(self, count: int = 1, *, status: int = 503,
                  retry_after: float | None = None) -> None:
        """Answer the next ``count`` Web API requests with ``status`` and a Dataverse error.

        Args:
            count: How many requests fail.
            status: HTTP status (503 Service Unavailable, 500, 502, 504, 429…).
            retry_after: ``Retry-After`` seconds to send, if any.
        """
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        body = {"error": {"code": "0x80040216" if status != 429 else "0x80072322",
                          "message": f"Injected fault: HTTP {status}."}}
        self.faults.fail_next(count, status=status, body=body, headers=headers,
                              path_prefix=API_PREFIX)

    def expire_delta_tokens(self) -> None:
        """Expire every delta token issued so far (as after the retention period)."""
        self.store.expire_tokens()

    @property
    def throttled(self) -> int:
        """429 answers sent so far."""
        return sum(self.limiter.hits.values())


def serve(*, host: str, port: int, https: bool, cert_dir: Path, seed: int, store: Path | None,
          echo: Callable[[str], None]) -> None:
    """Serve an emulated organisation in the foreground until Ctrl-C (``syncbus emulate``).

    Args:
        host: Interface to listen on.
        port: TCP port.
        https: Serve HTTPS with a local CA in ``cert_dir``.
        cert_dir: Where ``ca.pem`` goes.
        seed: Accounts (with contacts) to load into an empty store.
        store: SQLite file keeping the data; None: memory only.
        echo: Prints the connection details.

    Raises:
        OSError: the port cannot be bound.
    """
    emulator = DataverseEmulator(host=host, port=port, https=False, seed=seed, store=store)
    tls = make_tls(cert_dir, ("localhost", "127.0.0.1", host)) if https else None
    scheme = "https" if https else "http"
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"{scheme}://{shown}:{port}"
    rows = {name: len(t.rows) for name, t in emulator.store.tables.items()}
    echo(f"Dataverse emulator: organisation {url}, Web API {url}{API_PREFIX}/")
    echo(f"  Entra ID authority {url}/{DEFAULT_TENANT} (tenant {DEFAULT_TENANT})")
    echo(f"  client id {DEFAULT_CLIENT_ID}, client secret {DEFAULT_CLIENT_SECRET}")
    if tls is not None:
        echo(f"  trust {tls.ca_pem} (ca_bundle)")
    else:
        echo("  plain HTTP: MSAL needs https for the authority; use --https for the connector")
    echo("  rows: " + ", ".join(f"{n} {c}" for n, c in sorted(rows.items())))
    echo("  store: " + (str(store) if store else "memory (lost on exit)"))
    try:
        serve_forever(emulator.faults, host, port, tls, echo)
    finally:
        emulator.store.close()

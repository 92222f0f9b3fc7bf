"""Running the emulators: local TLS, a background uvicorn server, and fault injection.

Features
    * :func:`make_tls` — a local CA and a server certificate it signs (SANs for every
      host name and IP given), reused while valid; private keys are written 0600.
      Clients trust ``TlsFiles.ca_pem`` (``ca_bundle`` in the connection config).
    * :class:`EmulatorServer` — uvicorn in a background thread on a free port, for
      tests; :func:`serve_forever` — the same in the foreground, for the CLI.
    * :class:`FaultInjector` — ASGI middleware with runtime knobs: fail the next N
      requests with a status and body, drop the connection without an answer, add
      latency, and apply a :class:`RateLimiter` whose 429 answer each emulator shapes
      (Dataverse: ``Retry-After`` and its JSON error; Business Central: no ``Retry-After``).

Limits
    Dropping a connection aborts the socket through uvicorn's transport (found on the
    ``send`` callable); under another server it raises :class:`ConnectionDropped`.

Modules: :mod:`~connectors.emulation.tls`, :mod:`~connectors.emulation.server`,
:mod:`~connectors.emulation.faults`; everything public is re-exported here.
"""

from __future__ import annotations

from connectors.emulation.faults import (
    ConnectionDropped,
    FaultInjector,
    LimitHit,
    RateLimiter,
    caller_of,
    too_many_requests,
)
from connectors.emulation.server import EmulatorServer, serve_forever
from connectors.emulation.tls import TlsFiles, make_tls

__all__ = [
    "ConnectionDropped",
    "EmulatorServer",
    "FaultInjector",
    "LimitHit",
    "RateLimiter",
    "TlsFiles",
    "caller_of",
    "make_tls",
    "serve_forever",
    "too_many_requests",
]

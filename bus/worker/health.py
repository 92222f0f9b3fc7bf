"""The worker's HTTP port: ``/metrics``, ``/healthz`` and ``/readyz``.

Opened when the config has ``metrics: {port: 9464}`` (``host`` defaults to
``127.0.0.1``, local only: the endpoints have no authentication, so set ``host``
explicitly to expose them; ``port: 0`` picks a free port, see :attr:`HealthServer.port`).

- ``GET /metrics`` — the worker's Prometheus registry (text format 0.0.4).
- ``GET /healthz`` — liveness: 200 while the worker's threads run, else 503.
- ``GET /readyz`` — readiness: 200 when the broker is connected, the state store
  answers and no link's consumer is refused, else 503.

Both health endpoints answer JSON (``{"status": "ok", "checks": {...}}``) computed
from state the worker keeps up to date; a request never waits on a broker or a
database, so a hung dependency cannot hang the probe.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bus.worker.metrics import Metrics

__all__ = ["Check", "HealthServer"]

log = structlog.get_logger(__name__)

#: A health check: (healthy, JSON-ready details).
Check = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """Serves metrics and health endpoints from a daemon thread.

    Args:
        metrics: The worker's metrics.
        liveness: Answers ``/healthz``.
        readiness: Answers ``/readyz``.
        host: Address to bind (default: local only).
        port: Port to bind (0: any free port).

    Raises:
        OSError: the port cannot be bound.
    """

    def __init__(self, metrics: Metrics, *, liveness: Check, readiness: Check,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, metrics.render()),
            "/healthz": lambda: _json(liveness),
            "/readyz": lambda: _json(readiness),
        }
        server = _Server6 if ":" in host else ThreadingHTTPServer
        self._server = server((host, port), _handler(routes))
        self._server.daemon_threads = True
        #: The address actually bound.
        self.host: str = str(self._server.server_address[0])
        #: The port actually bound.
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http",
                                        daemon=True)
        self._thread.start()
        log.info("metrics_listening", host=self.host, port=self.port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _json(check: Check) -> tuple[int, str, bytes]:
    try:
        ok, details = check()
    except Exception as exc:  # noqa: BLE001 - a probe must answer, not crash
        ok, details = False, {"error": f"{type(exc).__name__}: {exc}"}
    body = {"status": "ok" if ok else "unavailable", **details}
    return (200 if ok else 503), "application/json", json.dumps(body, default=str).encode()


def _handler(routes: dict[str, Callable[[], tuple[int, str, bytes]]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            route = routes.get(self.path.partition("?")[0])
            if route is None:
                status, ctype, body = 404, "application/json", b'{"status": "not found"}'
            else:
                status, ctype, body = route()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Silence the per-request access log (scrapes every few seconds)."""

    return Handler

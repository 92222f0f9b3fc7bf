"""Serving an emulator: uvicorn in a background thread (tests) or in the foreground (CLI)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

from connectors.emulation.tls import TlsFiles

__all__ = ["EmulatorServer", "START_TIMEOUT", "serve_forever"]

#: Seconds :meth:`EmulatorServer.start` waits for the server to accept connections.
START_TIMEOUT = 15.0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: accepted sockets inherit it, and asyncio sets TCP_NODELAY only
    # on sockets that say they are TCP; without it every response with a body waits
    # ~40 ms (Nagle's algorithm against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, aborting idle keep-alive connections at shutdown.

    A graceful TLS close waits for the client's close_notify, which an idle pooled
    client connection never sends, so stopping would hang until the time-out.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            transport = getattr(connection, "transport", None)
            if transport is not None and (cycle is None or cycle.response_complete):
                transport.abort()
        await super().shutdown(sockets)


def _config(app: ASGIApp, host: str, port: int, tls: TlsFiles | None) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=3, lifespan="auto",
        ssl_certfile=str(tls.cert_pem) if tls else None,
        ssl_keyfile=str(tls.key_pem) if tls else None,
    )


def _url(host: str, port: int, tls: TlsFiles | None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


class EmulatorServer:
    """An ASGI app served by uvicorn in a background thread (tests, the demo).

    Args:
        app: The emulator's ASGI app.
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
        tls: Certificate and key to serve HTTPS with; None serves plain HTTP.
    """

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0,
                 tls: TlsFiles | None = None) -> None:
        self.app, self.host, self.port, self.tls = app, host, port, tls
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        """Base URL, ``http(s)://127.0.0.1:<port>`` (valid once started)."""
        return _url(self.host, self.port, self.tls)

    def start(self) -> EmulatorServer:
        """Start serving; return once the server accepts connections.

        Returns:
            ``self``, for chaining.

        Raises:
            RuntimeError: already started, or the server did not come up in time.
            OSError: the port cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("the emulator server is already running")
        self._sock = _bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self._server = _Server(_config(self.app, self.host, self.port, self.tls))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"emulator-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the emulator server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (graceful, then forced after a few seconds). Idempotent."""
        server, thread, sock = self._server, self._thread, self._sock
        self._server = self._thread = self._sock = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=5)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout=5)
        if sock is not None:
            sock.close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve_forever(app: ASGIApp, host: str, port: int, tls: TlsFiles | None,
                  echo: Callable[[str], None]) -> None:
    """Serve ``app`` in the foreground until Ctrl-C / SIGTERM, then shut down gracefully.

    Args:
        app: The emulator's ASGI app.
        host: Interface to listen on.
        port: TCP port (0: a free one, shown through ``echo``).
        tls: Certificate and key for HTTPS, or None for HTTP.
        echo: Prints the URL to the operator.

    Raises:
        OSError: the port cannot be bound.
    """
    sock = _bind(host, port)
    url = _url(host, sock.getsockname()[1], tls)
    echo(f"listening on {url} (Ctrl-C to stop)")
    try:
        _Server(_config(app, host, sock.getsockname()[1], tls)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown
        pass
    finally:
        sock.close()
    echo(f"stopped {url}")

"""A tiny TCP proxy a test can cut and restore (toxiproxy's one trick, in-process).

``cut()`` closes every open connection and refuses new ones, as a database or broker
that went away would; ``restore()`` accepts connections again on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support import pick_free_port

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``upstream`` until cut."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        #: While set, bytes are swallowed and new connections get no upstream: a peer that
        #: hangs instead of refusing (calls wait for their timeouts).
        self.stalled = threading.Event()
        # Below the ephemeral range: while cut, no outgoing connection can take the port,
        # so restore() binds it again.
        self.port = pick_free_port()
        self.restore()

    def stall(self) -> None:
        """Keep connections open but pass nothing: every call hangs until it times out."""
        self.stalled.set()

    def restore(self) -> None:
        """Accept connections again (and pass bytes again after :meth:`stall`)."""
        self.stalled.clear()
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Drop every connection and stop listening."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self.stalled.is_set():
                with self._lock:
                    self._conns.append(client)  # held, never answered
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.stalled.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

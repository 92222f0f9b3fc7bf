"""Webhooks as an accelerator: subscriptions, a small receiver, and what notifications do.

Polling stays the source of truth; a notification only makes the next poll happen
sooner (listeners are called with the entity name) and turns ``deleted``
notifications into tombstones in the key index.

Features
    * :class:`Subscriptions` creates the subscription of an entity set at the API route
      it lives on (``…/api/v2.0/subscriptions``, or the custom route for custom pages),
      and renews it (``PATCH`` with ``If-Match``, which repeats the handshake) when it
      expires within ``renew_before`` of its 3-day lifetime.
    * :class:`WebhookReceiver` — a threaded HTTP server (standard library) answering the
      validation handshake (``?validationToken=`` ⇒ 200 with the token as plain text)
      and accepting notification POSTs (202); what a notification means is decided by
      the connector's ``notify``.
    * :func:`parse_notification` maps a notification's ``resource`` to (API route,
      entity set, key) and checks ``clientState``.

Configuration
    ``webhooks`` of the connection: ``notification_url`` (public), ``listen``
    (host:port of the receiver, or None when another process receives),
    ``client_state``, ``renew_before``; per entity ``webhook: true``.

Limits
    * The receiver speaks plain HTTP; put a TLS-terminating proxy in front of it when
      Business Central online must reach it (it only calls https URLs).
    * Contacts and pages with composite keys cannot be subscribed (Business Central).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from connectors.business_central.client import BCClient
from connectors.business_central.metadata import PageInfo

__all__ = ["Notification", "Subscriptions", "WebhookReceiver", "parse_notification"]

log = structlog.get_logger(__name__)

#: Seconds between two subscription checks of one entity.
CHECK_INTERVAL = 60.0
_RESOURCE = re.compile(r"^/?api/(?P<api>.+?)/companies\((?P<company>[^)]*)\)/"
                       r"(?P<set>[A-Za-z][A-Za-z0-9_]*)(?:\((?P<key>[^)]*)\))?(?:\?.*)?$")


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification: where, what happened, and the record's key if one is named."""

    api: str
    entity_set: str
    change_type: str
    key: str | None


def parse_notification(item: dict[str, Any], client_state: str | None) -> Notification | None:
    """Read one element of a notification's ``value``.

    Args:
        item: ``{"subscriptionId", "clientState", "resource", "changeType", …}``.
        client_state: The secret our subscriptions carry; None accepts any.

    Returns:
        The notification, or None when it is not ours or cannot be read.
    """
    if client_state is not None and item.get("clientState") != client_state:
        return None
    match = _RESOURCE.match(str(item.get("resource", "")))
    if match is None:
        return None
    key = match["key"]
    if key is not None:
        key = key[1:-1].replace("''", "'") if key.startswith("'") else key
    return Notification(match["api"], match["set"], str(item.get("changeType", "")), key)


class Subscriptions:
    """Keeps one subscription per webhook-enabled entity alive.

    Args:
        client: The environment.
        notification_url: Where Business Central posts.
        client_state: Secret sent along (None: none).
        renew_before: Renew when the expiry is closer than this (seconds).
        clock: Epoch seconds.
    """

    def __init__(self, client: BCClient, notification_url: str, client_state: str | None,
                 renew_before: float, clock: Callable[[], float] = time.time) -> None:
        self.client, self.url, self.client_state = client, notification_url, client_state
        self.renew_before, self.clock = renew_before, clock
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def ensure(self, page: PageInfo, *, force: bool = False) -> dict[str, Any]:
        """Create or renew the subscription of ``page`` if needed (at most every minute).

        Args:
            page: The entity set.
            force: Check now even if checked recently.

        Returns:
            The subscription as Business Central returned it (empty when not checked).

        Raises:
            TransientError, PermanentError: Business Central refused (e.g. the handshake
                failed: the receiver is not reachable from Business Central).
        """
        with self._lock:
            now = self.clock()
            if not force and now - self._checked.get(page.entity_set, -1e18) < CHECK_INTERVAL:
                return {}
            resource = self.client.resource(page.api, page.entity_set)
            ours = [s for s in self.client.get_json(f"{page.api}/subscriptions").get("value", [])
                    if s.get("notificationUrl") == self.url and s.get("resource") == resource]
            body = {"notificationUrl": self.url, "resource": resource,
                    "clientState": self.client_state or ""}
            if not ours:
                sub: dict[str, Any] = self.client.request(
                    "POST", f"{page.api}/subscriptions", json=body,
                    entity=page.entity_set).json()
                log.info("webhook_subscribed", entity=page.entity_set, subscription=sub.get(
                    "subscriptionId"))
            elif self._expiring(ours[0]):
                sub = self.client.request(
                    "PATCH", f"{page.api}/subscriptions('{ours[0]['subscriptionId']}')",
                    json=body, headers={"If-Match": ours[0].get("@odata.etag", "*")},
                    entity=page.entity_set).json()
                log.info("webhook_renewed", entity=page.entity_set,
                         expires=sub.get("expirationDateTime"))
            else:
                sub = ours[0]
            self._checked[page.entity_set] = now
            return sub

    def _expiring(self, sub: dict[str, Any]) -> bool:
        raw = str(sub.get("expirationDateTime", ""))
        try:
            expires = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            return True
        now = datetime.fromtimestamp(self.clock(), UTC)
        return expires - now < timedelta(seconds=self.renew_before)


class WebhookReceiver:
    """A threaded HTTP server for the handshake and the notifications.

    Args:
        listen: ``host:port`` to bind (port 0: a free one; see :attr:`port`).
        on_notification: Called with each notification body (``{"value": [...]}``).
    """

    def __init__(self, listen: str, on_notification: Callable[[dict[str, Any]], object]) -> None:
        host, _, port = listen.rpartition(":")
        self._server = ThreadingHTTPServer((host or "0.0.0.0", int(port or 0)), _Handler)
        self._server.daemon_threads = True
        self._server.on_notification = on_notification  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    def start(self) -> WebhookReceiver:
        """Serve in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            name="bc-webhook-receiver", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_version = "syncbus-webhooks"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._handshake():
            self._answer(405, b"")

    def do_POST(self) -> None:  # noqa: N802
        if self._handshake():
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._answer(400, b"not JSON")
            return
        try:
            self.server.on_notification(body)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a 5xx makes Business Central retry later
            log.exception("webhook_notification_failed")
            self._answer(503, b"")
            return
        self._answer(202, b"")

    def _handshake(self) -> bool:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        token = query.get("validationToken")
        if not token:
            return False
        self._answer(200, token[0].encode(), "text/plain; charset=utf-8")
        return True

    def _answer(self, status: int, body: bytes, kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature
        return

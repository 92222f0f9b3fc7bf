"""Webhooks as an accelerator: subscriptions, a small receiver, and what notifications do.

Polling stays the source of truth; a notification only makes the next poll happen
sooner (listeners are called with the entity name), and a ``deleted`` notification
only names a record for the detector to check: it is deleted when Business Central
answers 404 for it, never on the notification's word.

Features
    * Every subscription carries a ``clientState`` secret: the configured
      ``client_state``, or one generated per subscription (``secrets.token_urlsafe``)
      and kept in a :class:`~connectors.features.SecretStore` (the worker's state store). Notifications
      whose ``clientState`` is missing or wrong are refused with 401
      (:class:`WebhookRejected`, compared with :func:`hmac.compare_digest`).
    * :class:`Subscriptions` creates the subscription of an entity set at the API route
      it lives on (``…/api/v2.0/subscriptions``, or the custom route for custom pages),
      and renews it (``PATCH`` with ``If-Match``, which repeats the handshake) when it
      expires within ``renew_before`` of its 3-day lifetime or carries another
      ``clientState`` than ours.
    * :class:`WebhookReceiver` — a threaded HTTP server (standard library) answering the
      validation handshake (``?validationToken=`` ⇒ 200 with the token as plain text)
      and accepting notification POSTs (202; 401 refused, 400 not a notification, 413
      too large); what a notification means is decided by the connector's ``notify``.
      It binds 127.0.0.1 unless ``listen`` names another address.
    * :func:`parse_notifications` reads a POST body into :class:`Notification` s
      (resource → API route, company, entity set, key); :func:`check_client_state`
      checks one against the secret of its subscription.

Configuration
    ``webhooks`` of the connection: ``notification_url`` (public), ``listen``
    (``host:port``, ``:port`` or ``port`` of the receiver, or None when another process
    receives), ``client_state``, ``renew_before``; per entity ``webhook: true``.

Limits
    * The receiver speaks plain HTTP; put a TLS-terminating proxy in front of it when
      Business Central online must reach it (it only calls https URLs).
    * Contacts and pages with composite keys cannot be subscribed (Business Central).
    * A refused notification makes Business Central delete the subscription (it retries
      only 408, 429 and 5xx); the next check (within a minute) subscribes again.
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from connectors.base import PermanentError
from connectors.business_central.client import BCClient
from connectors.business_central.metadata import PageInfo
from schemas.config import BusinessCentralConnection

__all__ = ["MAX_BODY", "MemorySecrets", "Notification", "REASONS", "SECRET_SCOPE",
           "Subscriptions", "WebhookReceiver", "WebhookRejected", "check_client_state",
           "parse_notifications"]

log = structlog.get_logger(__name__)

#: Seconds between two subscription checks of one entity.
CHECK_INTERVAL = 60.0
#: Largest notification body read, in bytes (Business Central sends at most ~1,000
#: items of a few hundred bytes before it switches to one ``collection`` item).
MAX_BODY = 4 * 1024 * 1024
#: Why a notification POST was refused: the ``reason`` label of
#: ``syncbus_webhook_rejected_total``.
REASONS = ("missing_client_state", "wrong_client_state", "unknown_resource", "malformed",
           "too_large")
#: Scope of the generated ``clientState`` secrets in the state store.
SECRET_SCOPE = "bc_webhook_client_state"
_RESOURCE = re.compile(r"^/?api/(?P<api>.+?)/companies\((?P<company>[^)]*)\)/"
                       r"(?P<set>[A-Za-z][A-Za-z0-9_]*)(?:\((?P<key>[^)]*)\))?(?:\?.*)?$")


class WebhookRejected(PermanentError):
    """A notification POST that is refused (nothing of it is acted on).

    Args:
        message: Why, for the log (never the secret).
        reason: One of :data:`REASONS`.
        status: The HTTP status to answer: 401, 400 or 413.
    """

    def __init__(self, message: str, *, reason: str, status: int = 401) -> None:
        super().__init__(message, status=status)
        self.reason = reason
        self.http_status = status


class MemorySecrets:
    """A :class:`SecretStore` in memory: for a connector used outside a worker (a new
    process generates new secrets, and its subscriptions are renewed with them)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def get_secret(self, scope: str, name: str) -> str | None:
        """The secret ``scope``/``name``, or None."""
        return self._values.get((scope, name))

    def keep_secret(self, scope: str, name: str, make: Callable[[], str]) -> str:
        """The secret ``scope``/``name``, made with ``make()`` if there is none."""
        with self._lock:
            found = self._values.get((scope, name))
            if found is None:
                found = self._values[scope, name] = make()
            return found


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification: where, what happened, and the record's key if one is named."""

    api: str
    entity_set: str
    change_type: str
    key: str | None
    company: str = ""
    #: What the sender put in ``clientState`` (None: nothing); never logged.
    client_state: str | None = field(default=None, repr=False)


def parse_notifications(body: object) -> list[Notification]:
    """Read a notification POST body, ``{"value": [{…}, …]}``.

    Raises:
        WebhookRejected: ``malformed`` (400) when it is not such a body;
            ``unknown_resource`` (401) when an item names no entity set of a company.
    """
    items = body.get("value") if isinstance(body, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise WebhookRejected('not a notification body ({"value": [...]})', reason="malformed",
                              status=400)
    out = []
    for n, item in enumerate(items, 1):
        match = _RESOURCE.match(str(item.get("resource", "")))
        if match is None:
            raise WebhookRejected(f"notification {n} of {len(items)} names no entity set",
                                  reason="unknown_resource")
        key = match["key"]
        if key is not None:
            key = key[1:-1].replace("''", "'") if key.startswith("'") else key
        state = item.get("clientState")
        out.append(Notification(match["api"], match["set"], str(item.get("changeType", "")),
                                key, match["company"],
                                state if isinstance(state, str) and state else None))
    return out


def check_client_state(note: Notification, expected: str | None) -> None:
    """Check that ``note`` carries the secret of its subscription.

    Args:
        note: A parsed notification.
        expected: The secret of the subscription of ``note``'s entity set (None: we
            have none, so it cannot be ours).

    Raises:
        WebhookRejected: ``missing_client_state``, ``unknown_resource`` or
            ``wrong_client_state`` (401); the message never holds either secret.
    """
    if note.client_state is None:
        raise WebhookRejected(f"a notification for {note.entity_set} has no clientState",
                              reason="missing_client_state")
    if expected is None:
        raise WebhookRejected(f"a notification for {note.entity_set} ({note.api[:100]!r}) "
                              "matches no subscription of this connection",
                              reason="unknown_resource")
    if not hmac.compare_digest(note.client_state.encode(), expected.encode()):
        raise WebhookRejected(f"a notification for {note.entity_set} has a wrong clientState",
                              reason="wrong_client_state")


class Subscriptions:
    """Keeps one subscription per webhook-enabled entity alive.

    Args:
        client: The environment.
        notification_url: Where Business Central posts.
        client_state: The secret of an entity set's subscription (made if needed).
        renew_before: Renew when the expiry is closer than this (seconds).
        clock: Epoch seconds.
    """

    def __init__(self, client: BCClient, notification_url: str,
                 client_state: Callable[[PageInfo], str], renew_before: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.client, self.url, self.client_state = client, notification_url, client_state
        self.renew_before, self.clock = renew_before, clock
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def ensure(self, page: PageInfo, *, force: bool = False) -> dict[str, Any]:
        """Create or renew the subscription of ``page`` if needed (at most every minute).

        A subscription that carries another ``clientState`` than ours (made before the
        secret was kept, or with another one) is renewed with ours.

        Args:
            page: The entity set.
            force: Check now even if checked recently.

        Returns:
            The subscription as Business Central returned it (empty when not checked).

        Raises:
            TransientError, PermanentError: Business Central refused (e.g. the handshake
                failed: the receiver is not reachable from Business Central).
            ConnectorUnavailable: the secret's store cannot be reached.
        """
        with self._lock:
            now = self.clock()
            if not force and now - self._checked.get(page.entity_set, -1e18) < CHECK_INTERVAL:
                return {}
            secret = self.client_state(page)
            resource = self.client.resource(page.api, page.entity_set)
            ours = [s for s in self.client.get_json(f"{page.api}/subscriptions").get("value", [])
                    if s.get("notificationUrl") == self.url and s.get("resource") == resource]
            body = {"notificationUrl": self.url, "resource": resource, "clientState": secret}
            if not ours:
                sub: dict[str, Any] = self.client.request(
                    "POST", f"{page.api}/subscriptions", json=body,
                    entity=page.entity_set).json()
                log.info("webhook_subscribed", entity=page.entity_set, subscription=sub.get(
                    "subscriptionId"))
            elif self._expiring(ours[0]) or not hmac.compare_digest(
                    str(ours[0].get("clientState") or "").encode(), secret.encode()):
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    on_notification: Callable[[dict[str, Any], str], object]
    on_rejected: Callable[[WebhookRejected, str], object]


class _Server6(_Server):
    address_family = socket.AF_INET6


class WebhookReceiver:
    """A threaded HTTP server for the handshake and the notifications.

    Args:
        listen: ``host:port``, ``:port`` or ``port`` to bind (no host: 127.0.0.1; port 0:
            a free one, see :attr:`port`).
        on_notification: Called with each notification body (``{"value": [...]}``) and
            the sender's address; raises :class:`WebhookRejected` to refuse it.
        on_rejected: Called with a body refused before ``on_notification`` (not JSON,
            too large) and the sender's address.

    Raises:
        ValueError: ``listen`` is not an address.
        OSError: the address cannot be bound.
    """

    def __init__(self, listen: str, on_notification: Callable[[dict[str, Any], str], object],
                 on_rejected: Callable[[WebhookRejected, str], object] = lambda _e, _p: None
                 ) -> None:
        host, port = BusinessCentralConnection.Webhooks.split_listen(listen)
        self._server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        self._server.on_notification = on_notification
        self._server.on_rejected = on_rejected
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self._server.server_address[0])

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
            log.info("webhook_receiver_listening", host=self.host, port=self.port)
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
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._handshake():
            self._answer(405, b"")

    def do_POST(self) -> None:  # noqa: N802
        if self._handshake():
            return
        peer = str(self.client_address[0])
        try:
            body = self._body()
        except WebhookRejected as exc:
            self.server.on_rejected(exc, peer)
            self._answer(exc.http_status, exc.reason.encode(), close=True)
            return
        try:
            self.server.on_notification(body, peer)
        except WebhookRejected as exc:  # logged and counted by on_notification
            self._answer(exc.http_status, b"unauthorized" if exc.http_status == 401
                         else exc.reason.encode())
            return
        except Exception:  # noqa: BLE001 - a 5xx makes Business Central retry later
            log.exception("webhook_notification_failed")
            self._answer(503, b"")
            return
        self._answer(202, b"")

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise WebhookRejected("Content-Length is not a number", reason="malformed",
                                  status=400) from None
        if length > MAX_BODY:
            raise WebhookRejected(f"a body of {length} bytes (at most {MAX_BODY})",
                                  reason="too_large", status=413)
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            return json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            raise WebhookRejected("the body is not JSON", reason="malformed",
                                  status=400) from None

    def _handshake(self) -> bool:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        token = query.get("validationToken")
        if not token:
            return False
        self._answer(200, token[0].encode(), "text/plain; charset=utf-8")
        return True

    def _answer(self, status: int, body: bytes, kind: str = "text/plain", *,
                close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if close:  # the request body was not read: the connection cannot be reused
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature
        return

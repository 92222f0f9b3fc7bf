"""Webhook subscriptions of the emulated Business Central, and their notifications.

Features
    * ``POST …/subscriptions`` calls ``notificationUrl?validationToken=<t>`` (POST) and
      creates the subscription only if the answer is 200 with the token as the body;
      ``expirationDateTime`` is now + 3 days; ``PATCH subscriptions('<id>')`` (with
      ``If-Match``) renews it and repeats the handshake; ``DELETE`` removes it.
    * Committed changes of a subscribed page are collected per subscription for
      ``debounce`` seconds after the first one, then sent as
      ``{"value": [{subscriptionId, clientState, expirationDateTime, resource,
      changeType, lastModifiedDateTime}]}``; more than ``collection_threshold``
      changes become one ``collection`` notification whose ``resource`` is a filtered
      collection URL (individual deletes are lost then, as in Business Central).
      Notifications for one ``notificationUrl`` share one POST.
    * Delivery is retried on 408, 429, 5xx and connection failures (``retry_delays``,
      for at most ``retry_window``); any other error status deletes the subscription.
    * Expired subscriptions receive nothing and are removed.

Configuration
    ``debounce`` (Business Central: 30 s), ``collection_threshold`` (1,000),
    ``retry_delays``, ``retry_window`` (36 h), ``verify`` (TLS of the receiver).

Limits
    * Notifications carry no data, only the resource; the subscriber must GET it.
    * The "changes by users who cannot schedule job queues" caveat is not emulated.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog

from connectors.business_central.emulator import errors
from connectors.business_central.emulator.model import PAGES, PageDef, find_page
from connectors.business_central.emulator.store import Change, Store, format_datetime

__all__ = ["Delivery", "SUBSCRIPTION_LIFETIME", "Subscription", "Webhooks"]

log = structlog.get_logger(__name__)

#: How long a subscription lives before it must be renewed.
SUBSCRIPTION_LIFETIME = timedelta(days=3)
_RESOURCE = re.compile(r"^/?api/(?P<api>.+?)/companies\((?P<company>[0-9a-fA-F-]{36})\)/"
                       r"(?P<set>[A-Za-z][A-Za-z0-9_]*)$")
_META_KEY = "subscriptions"


@dataclass(slots=True)
class Subscription:
    """One webhook subscription."""

    id: str
    notification_url: str
    resource: str
    client_state: str
    expiration: str
    created: str
    modified: str
    api: str
    company: str
    entity_set: str
    version: int = 1

    def to_json(self) -> dict[str, Any]:
        """The ``subscriptions`` entity as the API returns it."""
        return {"@odata.etag": f'W/"JzE{self.version};"', "subscriptionId": self.id,
                "notificationUrl": self.notification_url, "resource": self.resource,
                "userId": "00000000-0000-0000-0000-000000000001",
                "lastModifiedDateTime": self.modified, "clientState": self.client_state,
                "expirationDateTime": self.expiration, "timestamp": self.version,
                "systemCreatedAt": self.created, "systemModifiedAt": self.modified}


@dataclass(slots=True)
class Delivery:
    """A notification POST the emulator made (kept for tests in ``Webhooks.deliveries``)."""

    url: str
    body: dict[str, Any]
    status: int | None
    at: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Pending:
    first: float
    items: list[Change] = field(default_factory=list)
    attempts: int = 0
    due: float = 0.0
    failing_since: float | None = None


class Webhooks:
    """The subscriptions and the background notifier.

    Args:
        store: The environment's store (subscriptions persist in it).
        debounce: Seconds to collect changes after the first one.
        collection_threshold: More changes than this in one window ⇒ ``collection``.
        retry_delays: Seconds between delivery attempts (the last repeats).
        retry_window: Seconds after which a failing delivery is given up.
        verify: TLS verification of notification URLs (bool or CA bundle path).
    """

    def __init__(self, store: Store, *, debounce: float = 30.0, collection_threshold: int = 1000,
                 retry_delays: tuple[float, ...] = (60.0, 300.0, 1800.0, 3600.0),
                 retry_window: float = 36 * 3600.0, verify: bool | str = True) -> None:
        self.store = store
        self.debounce, self.collection_threshold = debounce, collection_threshold
        self.retry_delays, self.retry_window = retry_delays, retry_window
        self.verify: bool | ssl.SSLContext = (
            ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify)
        self.deliveries: list[Delivery] = []
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.listeners.append(self._on_changes)

    # -- API ------------------------------------------------------------------------

    def all(self, api: str | None = None) -> list[Subscription]:
        """The live subscriptions (of API route ``api`` when given)."""
        self._expire()
        subs = [Subscription(**s) for s in self.store.meta.get(_META_KEY, {}).values()]
        return [s for s in subs if api is None or s.api.lower() == api.lower()]

    def get(self, sub_id: str) -> Subscription:
        """The subscription ``sub_id``.

        Raises:
            BCError: 404 when there is none.
        """
        found = next((s for s in self.all() if s.id == sub_id), None)
        if found is None:
            raise errors.not_found(f"subscription '{sub_id}'")
        return found

    def create(self, api: str, body: dict[str, Any]) -> Subscription:
        """Validate, shake hands with the notification URL, and store a subscription.

        Raises:
            BCError: 400 for a bad body or unsupported resource, or a failed handshake.
        """
        url, resource = str(body.get("notificationUrl") or ""), str(body.get("resource") or "")
        client_state = str(body.get("clientState") or "")
        if not url.startswith(("http://", "https://")):
            raise errors.bad_request("The notificationUrl must be an absolute http(s) URL.")
        if len(client_state) > 250:
            raise errors.string_too_long(client_state, 250)
        page, company = self._resource(api, resource)
        self._handshake(url)
        now = format_datetime(self.store.clock())
        sub = Subscription(uuid.uuid4().hex, url, resource, client_state,
                           self._expiry(), now, now, page.api, company, page.entity_set)
        self._save(sub)
        return sub

    def renew(self, sub_id: str, body: dict[str, Any], if_match: str | None) -> Subscription:
        """PATCH: check ``If-Match``, repeat the handshake, extend the expiry by 3 days.

        Raises:
            BCError: 400 without ``If-Match``, 409 stale, 404 unknown, handshake failure.
        """
        if not if_match:
            raise errors.missing_etag()
        sub = self.get(sub_id)
        if if_match.strip() != "*" and if_match.strip() != sub.to_json()["@odata.etag"]:
            raise errors.entity_changed(self.store.stale_status)
        url = str(body.get("notificationUrl") or sub.notification_url)
        self._handshake(url)
        sub.notification_url = url
        sub.client_state = str(body.get("clientState", sub.client_state))
        sub.expiration, sub.version = self._expiry(), sub.version + 1
        sub.modified = format_datetime(self.store.clock())
        self._save(sub)
        return sub

    def delete(self, sub_id: str, if_match: str | None) -> None:
        """DELETE a subscription (``If-Match`` required).

        Raises:
            BCError: 400 without ``If-Match``, 404 unknown.
        """
        if not if_match:
            raise errors.missing_etag()
        self.get(sub_id)
        self._drop(sub_id)

    def supported(self, company: str) -> list[dict[str, Any]]:
        """``webhookSupportedResources`` of a company."""
        return [{"resource": f"api/{p.api}/companies({company})/{p.entity_set}"}
                for p in PAGES if p.webhooks]

    # -- notifier ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the background notifier (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="bc-webhooks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the notifier; pending notifications stay pending."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout=10)

    def flush(self) -> None:
        """Deliver everything pending now, ignoring the debounce and retry delays (tests)."""
        self._deliver_due(force=True)

    def _on_changes(self, changes: list[Change]) -> None:
        subs = self.all()
        if not subs:
            return
        now = time.monotonic()
        with self._lock:
            for change in changes:
                for sub in subs:
                    page = find_page(sub.api, sub.entity_set)
                    if page and sub.company == change.company and page.table == change.table:
                        self._pending.setdefault(sub.id, _Pending(now)).items.append(change)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(max(self.debounce / 4, 0.01), 0.5))
            self._wake.clear()
            try:
                self._deliver_due()
            except Exception:  # noqa: BLE001 - the notifier must survive anything
                log.exception("webhook_notifier_failed")

    def _deliver_due(self, *, force: bool = False) -> None:
        now = time.monotonic()
        subs = {s.id: s for s in self.all()}
        taken: dict[str, list[tuple[str, _Pending, list[dict[str, Any]]]]] = {}
        with self._lock:  # what is taken here is delivered by this thread alone
            for sub_id, pending in list(self._pending.items()):
                sub = subs.get(sub_id)
                if sub is not None and not force and (
                        now - pending.first < self.debounce or now < pending.due):
                    continue
                del self._pending[sub_id]
                if sub is not None:
                    taken.setdefault(sub.notification_url, []).append(
                        (sub_id, pending, self._notifications(sub, pending.items)))
        for url, parts in taken.items():
            self._post(url, parts, now)

    def _post(self, url: str, parts: list[tuple[str, _Pending, list[dict[str, Any]]]],
              now: float) -> None:
        body = {"value": [n for _, _, items in parts for n in items]}
        status: int | None = None
        with contextlib.suppress(httpx.HTTPError), \
                httpx.Client(verify=self.verify, timeout=10) as client:
            status = client.post(url, json=body).status_code
        self.deliveries.append(Delivery(url, body, status))
        if status is not None and 200 <= status < 300:
            return
        if status is None or status in (408, 429) or status >= 500:
            with self._lock:
                for sub_id, pending, _ in parts:
                    self._retry_later(sub_id, pending, now)
            return
        log.info("webhook_subscription_deleted", url=url, status=status)
        for sub_id, _, _ in parts:
            self._drop(sub_id)

    def _retry_later(self, sub_id: str, pending: _Pending, now: float) -> None:
        pending.attempts += 1
        pending.failing_since = pending.failing_since or now
        delay = self.retry_delays[min(pending.attempts, len(self.retry_delays)) - 1]
        if now + delay - pending.failing_since > self.retry_window:
            log.info("webhook_delivery_given_up", subscription=sub_id)
            return
        pending.due = now + delay
        newer = self._pending.get(sub_id)
        if newer is not None:
            pending.items += newer.items
        self._pending[sub_id] = pending

    def _notifications(self, sub: Subscription, changes: list[Change]) -> list[dict[str, Any]]:
        base = {"subscriptionId": sub.id, "clientState": sub.client_state,
                "expirationDateTime": sub.expiration}
        page = find_page(sub.api, sub.entity_set)
        assert page is not None
        prefix = f"api/{sub.api}/companies({sub.company})/{sub.entity_set}"
        if len(changes) > self.collection_threshold:
            first = min(c.at for c in changes) - timedelta(milliseconds=1)
            modified = page.modified_field.name if page.modified_field else "lastModifiedDateTime"
            return [{**base, "resource": f"{prefix}?$filter={modified} gt {format_datetime(first)}",
                     "changeType": "collection",
                     "lastModifiedDateTime": format_datetime(max(c.at for c in changes))}]
        out = []
        for change in changes:
            key = change.id if page.key_field.source == "@id" else f"'{change.number}'"
            out.append({**base, "resource": f"{prefix}({key})", "changeType": change.kind,
                        "lastModifiedDateTime": format_datetime(change.at)})
        return out

    # -- internals --------------------------------------------------------------------

    def _resource(self, api: str, resource: str) -> tuple[PageDef, str]:
        match = _RESOURCE.match(resource)
        # The publisher is matched case-sensitively for subscriptions (unlike plain calls).
        if match is None or match["api"] != next(
                (p.api for p in PAGES if p.api.lower() == api.lower()), api):
            raise errors.bad_request(f"The resource '{resource}' is not valid for this "
                                     "subscriptions endpoint.")
        page = find_page(match["api"], match["set"])
        if page is None or not page.webhooks:
            raise errors.bad_request(f"The resource '{resource}' does not support webhooks.")
        company = self.store.company(match["company"]).id
        return page, company

    def _handshake(self, url: str) -> None:
        token = secrets.token_urlsafe(24)
        target = f"{url}{'&' if '?' in url else '?'}validationToken={token}"
        try:
            with httpx.Client(verify=self.verify, timeout=10) as client:
                answer = client.post(target)
        except httpx.HTTPError as exc:
            raise errors.bad_request(f"The subscription was not validated: {exc}.") from exc
        text = answer.text.strip().strip('"')
        if answer.status_code != 200 or text != token:
            raise errors.bad_request("The subscription was not validated: the notification "
                                     f"URL answered {answer.status_code} without the "
                                     "validation token.")

    def _expiry(self) -> str:
        return format_datetime(self.store.clock() + SUBSCRIPTION_LIFETIME)

    def _save(self, sub: Subscription) -> None:
        with self.store.transaction():
            subs = dict(self.store.meta.get(_META_KEY, {}))
            subs[sub.id] = asdict(sub)
            self.store.set_meta(_META_KEY, subs)

    def _drop(self, sub_id: str) -> None:
        with self.store.transaction():
            subs = dict(self.store.meta.get(_META_KEY, {}))
            if subs.pop(sub_id, None) is not None:
                self.store.set_meta(_META_KEY, subs)
        with self._lock:
            self._pending.pop(sub_id, None)

    def _expire(self) -> None:
        now = self.store.clock()
        for sub_id, data in list(self.store.meta.get(_META_KEY, {}).items()):
            if datetime.fromisoformat(data["expiration"].replace("Z", "+00:00")) <= now:
                log.info("webhook_subscription_expired", subscription=sub_id)
                self._drop(sub_id)


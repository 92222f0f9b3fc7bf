"""The HTTP edge shared by the Dataverse and Business Central connectors.

* :func:`make_client` — an ``httpx.Client`` with the CA bundle, time-out and bearer
  auth (:class:`BearerAuth` renews the token once when the service answers 401);
* :func:`map_http_errors` / :func:`raise_for_status` — the one place where httpx
  exceptions and HTTP statuses become the bus error tree::

      time-out, connect error, dropped connection  → ConnectorUnavailable
      408, 429, 500, 502, 503, 504 (other 5xx)      → HttpTransientError (retry_after)
      401, 403, 501, other 4xx without a key       → HttpPermanentError
      other 4xx with a record key                  → HttpRecordRejected

  The errors carry ``status`` (HTTP), ``code`` (the service's own code, e.g.
  ``0x80060882`` or ``Request_EntityChanged``) and ``request_id``; the message is
  the service's own text;
* :class:`Throttle` — one limiter per service host shared by every caller in the
  process (token bucket, shared pause on ``Retry-After``, backoff without it);
* :func:`retrying` — retries :class:`~connectors.base.TransientError` through a throttle;
* :func:`retry_budget` — bounds a connector call's in-process retries (attempts and
  waits) to :data:`MAX_RETRY_SECONDS`. A failure that would need a longer wait is
  raised at once with ``retry_after`` set to that wait, so the consumer hands the
  messages to the delayed retry queues instead of holding them unacked (RabbitMQ drops
  a consumer whose connection misses its 30 s heartbeats while a batch is applied).

Token acquisition (:class:`TokenProvider`, :func:`device_code_login`) lives in
:mod:`connectors.identity.provider` and is re-exported here.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import random
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx

from connectors.base import (
    MAX_RETRY_SECONDS,
    ConfigError,
    ConnectorUnavailable,
    PermanentError,
    RecordRejected,
    TransientError,
)
from connectors.identity.provider import OAuthSettings, TokenProvider, device_code_login

__all__ = [
    "BearerAuth",
    "HttpPermanentError",
    "HttpRecordRejected",
    "HttpTransientError",
    "MAX_RETRY_SECONDS",
    "OAuthSettings",
    "Throttle",
    "ThrottleListener",
    "TokenProvider",
    "add_throttle_listener",
    "defer",
    "device_code_login",
    "make_client",
    "map_http_errors",
    "parse_retry_after",
    "raise_for_status",
    "remove_throttle_listener",
    "retry_budget",
    "retry_time_left",
    "retrying",
    "service_error",
]

T = TypeVar("T")

#: Seconds to open a TCP/TLS connection (a host that does not accept in this time is down).
CONNECT_TIMEOUT = 10.0

#: Statuses a later retry may cure.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: 5xx statuses that no retry cures.
PERMANENT_5XX = frozenset({501, 505})
#: Longest service error text kept in an exception (characters).
MAX_ERROR_TEXT = 500
_REQUEST_ID_HEADERS = ("x-ms-service-request-id", "request-id", "x-ms-request-id",
                       "ms-correlation-x", "client-request-id")
Key = Mapping[str, Any] | None


#: Called with (host[:port], Retry-After seconds or None) on every 429 answer.
ThrottleListener = Callable[[str, float | None], None]
_throttle_listeners: list[ThrottleListener] = []


def add_throttle_listener(listener: ThrottleListener) -> None:
    """Be told of every 429 answer (the worker counts them per connection in its metrics)."""
    _throttle_listeners.append(listener)


def remove_throttle_listener(listener: ThrottleListener) -> None:
    """Stop telling ``listener``."""
    with contextlib.suppress(ValueError):
        _throttle_listeners.remove(listener)


def _throttled(host: str, retry_after: float | None) -> None:
    for listener in list(_throttle_listeners):
        with contextlib.suppress(Exception):  # bookkeeping never breaks a request
            listener(host.lower(), retry_after)


class _HttpDetails:
    """What an HTTP error adds to a bus error: the service's error code and request id."""

    code: str | None = None
    request_id: str | None = None


class HttpTransientError(_HttpDetails, TransientError):
    """408/429/5xx: the service asked us to come back later (``retry_after`` if it said when)."""


class HttpPermanentError(_HttpDetails, PermanentError):
    """401/403/501 or a 4xx not tied to one record."""


class HttpRecordRejected(_HttpDetails, RecordRejected):
    """A 4xx answer about one record (``key``): validation, conflict, not found."""


# -- client ----------------------------------------------------------------------------


class BearerAuth(httpx.Auth):
    """Adds ``Authorization: Bearer …`` and retries once with a new token after a 401.

    Args:
        provider: Where tokens come from.
    """

    def __init__(self, provider: TokenProvider) -> None:
        self.provider = provider

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send ``request`` with a token; on 401 renew the token and send it once more.

        Raises:
            TransientError: the token could not be obtained (see :meth:`TokenProvider.token`).
            PermanentError: the credentials are refused.
        """
        token = self.provider.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            self.provider.invalidate(token)
            request.headers["Authorization"] = f"Bearer {self.provider.token()}"
            yield request


def make_client(*, base_url: str, ca_bundle: str | None, timeout: float,
                auth: TokenProvider | None) -> httpx.Client:
    """An ``httpx.Client`` for one service.

    Args:
        base_url: The service root, e.g. ``https://org.crm.dynamics.com/api/data/v9.2/``.
        ca_bundle: PEM file of CAs to trust (the emulator's ``ca.pem``); None: system CAs.
        timeout: Seconds for read, write and pool waits (and connect, at most
            :data:`CONNECT_TIMEOUT`).
        auth: Token provider for bearer auth; None sends no Authorization header.

    Returns:
        The client (close it with the connector).

    Raises:
        ConfigError: ``ca_bundle`` cannot be read.
    """
    verify: ssl.SSLContext | bool = True
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise ConfigError(f"ca_bundle {ca_bundle} is not a readable file")
        verify = ssl.create_default_context(cafile=ca_bundle)
    limits = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))
    return httpx.Client(base_url=base_url, verify=verify, timeout=limits,
                        auth=BearerAuth(auth) if auth is not None else None,
                        headers={"User-Agent": "syncbus"})


# -- errors ----------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP-date).

    Args:
        value: The header value, None when absent.
        now: The current time for HTTP-dates (default: now, UTC).

    Returns:
        Seconds (never negative), or None when absent or unreadable.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def service_error(response: httpx.Response) -> tuple[str | None, str]:
    """The service's own error code and message from an error response.

    Understands OData errors (Dataverse, Business Central)
    ``{"error": {"code", "message"}}``, OAuth errors ``{"error", "error_description"}``
    and plain text (first line).

    Args:
        response: The error response (its body is read).

    Returns:
        ``(code or None, message)``; the message falls back to the reason phrase.
    """
    try:
        body: Any = json.loads(response.read() or b"null")
    except (ValueError, httpx.HTTPError):
        body = None
    code: Any = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
        elif isinstance(error, str):
            code, message = error, body.get("error_description") or body.get("message")
        else:
            code, message = body.get("code"), body.get("message")
    elif body is None and response.content:
        text = response.content.decode(response.encoding or "utf-8", errors="replace")
        message = text.strip().splitlines()[0] if text.strip() else None
    text = str(message).strip() if message else response.reason_phrase or "no error text"
    return (str(code) if code not in (None, "") else None), text[:MAX_ERROR_TEXT]


def raise_for_status(response: httpx.Response, *, entity: str | None = None,
                     key: Key = None) -> None:
    """Raise the bus error an HTTP status means; do nothing for 1xx–3xx.

    Args:
        response: The service's answer.
        entity: The entity concerned, for the error.
        key: The record key concerned; a 4xx with a key is a :class:`RecordRejected`.

    Raises:
        HttpTransientError: 408, 429, 5xx except 501/505 (with ``retry_after`` from
            ``Retry-After``, None when absent).
        HttpPermanentError: 401, 403, 501, 505, and other 4xx without a key.
        HttpRecordRejected: other 4xx with a key.
    """
    status = response.status_code
    if status < 400:
        return
    code, message = service_error(response)
    request = response.request
    where = f"{request.url.host} answered {status} to {request.method} {request.url.path}"
    text = f"{where}: {message}" + (f" [{code}]" if code else "")
    error: HttpTransientError | HttpPermanentError | HttpRecordRejected
    if status in TRANSIENT_STATUSES or (status >= 500 and status not in PERMANENT_5XX):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 429:
            _throttled(request.url.netloc.decode("ascii", "replace"), retry_after)
        error = HttpTransientError(text, retry_after=retry_after, entity=entity, key=key,
                                   status=status)
    elif key is not None and status not in (401, 403) and status < 500:
        error = HttpRecordRejected(text, entity=entity, key=key, status=status)
    else:
        error = HttpPermanentError(text, entity=entity, key=key, status=status)
    error.code = code
    error.request_id = next((response.headers[h] for h in _REQUEST_ID_HEADERS
                             if h in response.headers), None)
    raise error


@contextlib.contextmanager
def map_http_errors(*, entity: str | None = None, key: Key = None) -> Iterator[None]:
    """Translate httpx exceptions raised inside the block into bus errors.

    Args:
        entity: The entity concerned, for the error.
        key: The record key concerned.

    Raises:
        ConnectorUnavailable: time-out, connection refused/reset/dropped, TLS failure.
        PermanentError: an invalid URL or request the client itself refused.
        HttpTransientError, HttpPermanentError, HttpRecordRejected: an
            ``httpx.HTTPStatusError`` (from ``response.raise_for_status()``), mapped by
            :func:`raise_for_status`.
    """
    try:
        yield
    except httpx.HTTPStatusError as exc:
        try:
            raise_for_status(exc.response, entity=entity, key=key)
        except (TransientError, PermanentError) as mapped:
            raise mapped from exc
    except httpx.TimeoutException as exc:
        raise ConnectorUnavailable(f"{_target(exc)} timed out ({type(exc).__name__})",
                                   entity=entity, key=key) from exc
    except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
        raise PermanentError(f"invalid request to {_target(exc)}: {exc}", entity=entity,
                             key=key) from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ConnectorUnavailable(f"cannot reach {_target(exc)}: {reason}", entity=entity,
                                   key=key) from exc
    except httpx.HTTPError as exc:  # decoding errors, too many redirects
        raise PermanentError(f"bad answer from {_target(exc)}: {exc}", entity=entity,
                             key=key) from exc


def _target(exc: Exception) -> str:
    try:
        request = exc.request  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return "the service"
    return f"{request.url.scheme}://{request.url.netloc.decode()}"


# -- throttling and retries ------------------------------------------------------------


class _Budget:
    """The deadline of the outermost :func:`retry_budget` open in this thread."""

    __slots__ = ("clock", "deadline", "seconds")

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds, self.clock = seconds, clock
        self.deadline = clock() + seconds


_budgets = threading.local()


@contextlib.contextmanager
def retry_budget(seconds: float = MAX_RETRY_SECONDS, *,
                 clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Bound the in-process retries of one connector call to ``seconds`` in all.

    Inside the block, :func:`retrying` and :meth:`Throttle.acquire` do not start a wait
    that would end after the deadline: they raise the failure at once, its
    ``retry_after`` set to the wait, and the bus's retry queues take over. A nested
    block keeps the outermost deadline (a writer's resends and each request's retries
    share one budget).

    Args:
        seconds: The budget (default :data:`MAX_RETRY_SECONDS`).
        clock: Monotonic seconds (tests pass a fake clock).
    """
    if getattr(_budgets, "current", None) is not None:
        yield
        return
    _budgets.current = _Budget(seconds, clock)
    try:
        yield
    finally:
        _budgets.current = None


def retry_time_left() -> float:
    """Seconds left in this thread's :func:`retry_budget` (infinite outside one)."""
    budget: _Budget | None = getattr(_budgets, "current", None)
    return math.inf if budget is None else budget.deadline - budget.clock()


def defer(exc: TransientError, wait: float) -> TransientError:
    """``exc`` with ``retry_after`` at least ``wait`` (what the bus should wait before retrying)."""
    if wait > 0 and (exc.retry_after is None or exc.retry_after < wait):
        exc.retry_after = wait
    return exc


class Throttle:
    """A limiter shared by every caller of one service host in this process.

    A token bucket spaces requests at ``rate`` per second (bursts up to ``burst``);
    :meth:`pause` holds every caller back until a moment (a ``Retry-After``), and
    :meth:`backoff` does the same with an exponential, jittered delay when the service
    gives no hint (Business Central's 429). Thread-safe.

    Args:
        rate: Requests per second; None: unlimited (pauses still apply).
        burst: Bucket size; default ``max(1, rate)``.
        base_delay: First backoff delay, seconds.
        max_delay: Backoff cap, seconds.
        clock: Monotonic seconds.
        sleep: Sleep function (tests may speed it up).
    """

    _registry: ClassVar[dict[str, Throttle]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, *, rate: float | None = None, burst: float | None = None,
                 base_delay: float = 1.0, max_delay: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep
        self.base_delay, self.max_delay = base_delay, max_delay
        self._rate: float | None = None
        self._burst = self._tokens = 1.0
        self.set_rate(rate, burst=burst)
        self._tokens = self._burst  # start with a full bucket
        self._stamp = clock()
        self._paused_until = 0.0
        self._failures = 0
        #: The host, for messages.
        self.name = "the service"
        #: Why the throttle last paused (the failure's message), for messages.
        self.reason: str | None = None

    @classmethod
    def for_host(cls, host: str, *, rate: float | None = None) -> Throttle:
        """The process-wide throttle of ``host`` (created on first use).

        Args:
            host: Host (``org.crm.dynamics.com``, ``127.0.0.1:8443``) or a URL.
            rate: When given, (re)sets the requests-per-second rate.

        Returns:
            The shared instance.
        """
        name = (urllib.parse.urlsplit(host).netloc if "://" in host else host).lower()
        with cls._registry_lock:
            throttle = cls._registry.get(name)
            if throttle is None:
                throttle = cls._registry[name] = cls(rate=rate)
                throttle.name = name
        if rate is not None:
            throttle.set_rate(rate)
        return throttle

    def set_rate(self, rate: float | None, *, burst: float | None = None) -> None:
        """Change the rate (None: unlimited) and bucket size.

        Args:
            rate: Requests per second.
            burst: Bucket size; default ``max(1, rate)``.
        """
        with self._lock:
            self._rate = rate if rate and rate > 0 else None
            self._burst = burst if burst is not None else max(1.0, rate or 1.0)
            self._tokens = min(self._tokens, self._burst)

    @property
    def clock(self) -> Callable[[], float]:
        """The throttle's monotonic clock (a retry budget around it reads the same one)."""
        return self._clock

    @property
    def paused_for(self) -> float:
        """Seconds the current pause still lasts (0 when none)."""
        return max(0.0, self._paused_until - self._clock())

    def acquire(self) -> float:
        """Wait until a request may go out: no pause in force and a token in the bucket.

        Returns:
            Seconds waited.

        Raises:
            TransientError: the wait would outlast the thread's :func:`retry_budget`
                (``retry_after`` is the wait); nothing was sent.
        """
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                delay = self._paused_until - now
                if delay <= 0:
                    delay = self._take_token(now)
                if delay <= 0:
                    return waited
            if delay > retry_time_left():
                raise TransientError(
                    f"{self.name}: {self.reason or 'requests held back'}; waiting "
                    f"{delay:.0f}s more is left to the retry queues (in-process retries are "
                    f"limited to {MAX_RETRY_SECONDS:g}s)", retry_after=delay)
            self._sleep(delay)
            waited += delay

    def _take_token(self, now: float) -> float:
        if self._rate is None:
            return 0.0
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._rate

    def pause(self, seconds: float, *, reason: str | None = None) -> None:
        """Hold every caller back for ``seconds`` (extends, never shortens, a pause).

        Args:
            seconds: The service's ``Retry-After``.
            reason: The failure that asked for it (repeated to callers that give up).
        """
        with self._lock:
            self.reason = reason or self.reason
            self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def backoff(self, *, reason: str | None = None) -> float:
        """Pause everyone for an exponential, jittered delay (no ``Retry-After`` given).

        Callers that fail while a pause is already in force do not grow it further.

        Args:
            reason: The failure (repeated to callers that give up waiting).

        Returns:
            Seconds until the pause ends.
        """
        with self._lock:
            self.reason = reason or self.reason
            now = self._clock()
            if self._paused_until <= now:
                ceiling = min(self.max_delay, self.base_delay * 2 ** self._failures)
                self._failures += 1
                self._paused_until = now + random.uniform(ceiling / 2, ceiling)
            return self._paused_until - now

    def success(self) -> None:
        """A request went through: the next backoff starts small again."""
        with self._lock:
            self._failures = 0


def retrying(func: Callable[[], T], *, attempts: int = 4, throttle: Throttle | None = None,
             max_wait: float = 60.0, sleep: Callable[[float], None] = time.sleep,
             budget: float = MAX_RETRY_SECONDS) -> T:
    """Call ``func`` until it succeeds, retrying :class:`TransientError` up to ``attempts``.

    With a throttle, every call waits for it first; a ``retry_after`` pauses the
    throttle for all callers, and a transient error without one triggers its shared
    backoff. Without a throttle the waits are local. All attempts and waits fit in
    ``budget`` seconds (or the enclosing :func:`retry_budget`): a failure whose next
    wait would not fit is raised at once, ``retry_after`` set to that wait.

    Args:
        func: The operation (no arguments; use a lambda or ``functools.partial``).
        attempts: Calls in total, at least 1.
        throttle: The service host's :class:`Throttle`.
        max_wait: A ``retry_after`` longer than this is not waited for: the error is
            raised at once so the bus defers the message instead.
        sleep: Sleep function when there is no throttle.
        budget: Seconds of in-process retrying, when no :func:`retry_budget` is open.

    Returns:
        What ``func`` returned.

    Raises:
        TransientError: the last attempt's error, or one whose wait is too long
            (``retry_after``: how long the bus should wait).
        PermanentError: at once, never retried.
    """
    clock = throttle.clock if throttle is not None else time.monotonic
    with retry_budget(budget, clock=clock):
        failures = 0
        while True:
            if throttle is not None:
                throttle.acquire()
            try:
                result = func()
            except TransientError as exc:
                failures += 1
                wait = _after_failure(exc, failures, throttle, max_wait)
                if (failures >= attempts or wait > retry_time_left()
                        or (exc.retry_after is not None and exc.retry_after > max_wait)):
                    defer(exc, wait)
                    raise
                if throttle is None:
                    sleep(wait)
                continue
            if throttle is not None:
                throttle.success()
            return result


def _after_failure(exc: TransientError, failures: int, throttle: Throttle | None,
                   max_wait: float) -> float:
    """Slow the throttle down after ``exc``; returns the wait before the next attempt."""
    wait = exc.retry_after
    if throttle is not None:
        if wait is not None:
            throttle.pause(wait, reason=exc.message)
        else:
            throttle.backoff(reason=exc.message)
        return throttle.paused_for
    return wait if wait is not None else random.uniform(0, min(max_wait, 2.0 ** failures))

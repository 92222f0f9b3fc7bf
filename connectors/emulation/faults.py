"""Fault injection and service-protection limits, as ASGI middleware for the emulators.

:class:`FaultInjector` wraps an emulator's app; tests turn its knobs at runtime (fail
the next N requests, drop connections, add latency) and give it a :class:`RateLimiter`
whose 429 answer the emulator builds itself (``respond=``): Dataverse sends
``Retry-After`` and its JSON error, Business Central a 429 without ``Retry-After``.

Dropping a connection aborts the socket through uvicorn's transport (found on the
``send`` callable); under another server it raises :class:`ConnectionDropped`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import jwt
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "ConnectionDropped",
    "FaultInjector",
    "LimitHit",
    "RateLimiter",
    "caller_of",
    "too_many_requests",
]


class ConnectionDropped(Exception):
    """Raised to the server when a drop is injected and no socket can be closed."""


@dataclass(frozen=True, slots=True)
class LimitHit:
    """A request a :class:`RateLimiter` refused."""

    #: ``requests`` (count per window), ``concurrency`` or ``execution_time``.
    kind: str
    caller: str
    #: The threshold exceeded (requests, concurrent requests, seconds of execution).
    limit: float
    #: Seconds of the sliding window.
    window: float
    #: Seconds until the caller would be let through again.
    retry_after: float


def too_many_requests(hit: LimitHit) -> ASGIApp:
    """The default 429: ``Retry-After`` in whole seconds and an OData-style JSON error.

    Args:
        hit: What was exceeded.

    Returns:
        The response to send.
    """
    message = f"Rate limit exceeded ({hit.kind}: {hit.limit:g} per {hit.window:g} s)."
    return Response(json.dumps({"error": {"code": "TooManyRequests", "message": message}}),
                    status_code=429, media_type="application/json",
                    headers={"Retry-After": str(max(1, math.ceil(hit.retry_after)))})


def caller_of(scope: Scope) -> str:
    """Who a request counts against: the token's ``oid``/``appid``, else the client address.

    Args:
        scope: The ASGI HTTP scope.

    Returns:
        A stable caller key.
    """
    headers = dict(scope.get("headers") or [])
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    if authorization:
        token = authorization.partition(" ")[2].strip()
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
            return str(claims.get("oid") or claims.get("appid") or claims.get("sub"))
        except jwt.PyJWTError:
            return hashlib.sha256(authorization.encode()).hexdigest()[:16]
    client = scope.get("client") or ("unknown", 0)
    return str(client[0])


class RateLimiter:
    """Service-protection limits per caller, over a sliding window. Thread-safe.

    Args:
        max_requests: Requests per ``window`` (Dataverse: 6000 / 300 s); None: no limit.
        window: Seconds of the sliding window.
        max_concurrent: Requests in flight per caller (Dataverse 52); None: no limit.
        max_execution: Seconds of summed execution time per window; None: no limit.
        concurrency_retry_after: ``retry_after`` reported for a concurrency refusal.
        respond: Builds the 429 answer from a :class:`LimitHit` (each emulator its own).
        caller: Maps a request scope to the key limits are counted by.
        clock: Monotonic seconds.
    """

    def __init__(self, *, max_requests: int | None = None, window: float = 300.0,
                 max_concurrent: int | None = None, max_execution: float | None = None,
                 concurrency_retry_after: float = 1.0,
                 respond: Callable[[LimitHit], ASGIApp] = too_many_requests,
                 caller: Callable[[Scope], str] = caller_of,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_requests, self.window = max_requests, window
        self.max_concurrent, self.max_execution = max_concurrent, max_execution
        self.concurrency_retry_after = concurrency_retry_after
        self.respond, self.caller, self.clock = respond, caller, clock
        self._lock = threading.Lock()
        self._starts: dict[str, deque[float]] = defaultdict(deque)
        self._runs: dict[str, deque[tuple[float, float]]] = defaultdict(deque)
        self._active: dict[str, int] = defaultdict(int)
        #: Refusals so far, by kind.
        self.hits: dict[str, int] = defaultdict(int)

    def enter(self, caller: str) -> LimitHit | None:
        """Admit one request of ``caller`` or say which limit refuses it.

        Args:
            caller: The caller key.

        Returns:
            None when admitted (call :meth:`leave` when done), else the refusal.
        """
        with self._lock:
            now = self.clock()
            hit = self._check(caller, now)
            if hit is None:
                self._starts[caller].append(now)
                self._active[caller] += 1
            else:
                self.hits[hit.kind] += 1
            return hit

    def leave(self, caller: str, started: float) -> None:
        """Record the end of an admitted request.

        Args:
            caller: The caller key given to :meth:`enter`.
            started: The clock value when it was admitted.
        """
        with self._lock:
            now = self.clock()
            self._active[caller] -= 1
            self._runs[caller].append((now, now - started))

    def reset(self) -> None:
        """Forget all counted requests (not those in flight)."""
        with self._lock:
            self._starts.clear()
            self._runs.clear()
            self.hits.clear()

    def _check(self, caller: str, now: float) -> LimitHit | None:
        starts, runs = self._starts[caller], self._runs[caller]
        while starts and starts[0] <= now - self.window:
            starts.popleft()
        while runs and runs[0][0] <= now - self.window:
            runs.popleft()
        if self.max_concurrent is not None and self._active[caller] >= self.max_concurrent:
            return LimitHit("concurrency", caller, self.max_concurrent, self.window,
                            self.concurrency_retry_after)
        if self.max_requests is not None and len(starts) >= self.max_requests:
            return LimitHit("requests", caller, self.max_requests, self.window,
                            starts[0] + self.window - now)
        if self.max_execution is not None and sum(d for _, d in runs) >= self.max_execution:
            return LimitHit("execution_time", caller, self.max_execution, self.window,
                            runs[0][0] + self.window - now)
        return None


@dataclass(frozen=True, slots=True)
class _Fault:
    status: int
    body: bytes
    headers: Mapping[str, str]
    drop: bool
    path_prefix: str


class FaultInjector:
    """ASGI middleware injecting failures, latency and rate limits, changeable at runtime.

    Wrap the emulator's app and keep the instance to turn the knobs from tests:
    ``app = FaultInjector(starlette_app, limiter=RateLimiter(...), exempt=("/oauth2",))``.

    Args:
        app: The wrapped ASGI app.
        limiter: Rate limiter applied after scripted faults; settable later.
        latency: Seconds added to every (non-exempt) request; settable later.
        exempt: Path substrings never faulted nor limited (e.g. the identity endpoints).
    """

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter | None = None,
                 latency: float = 0.0, exempt: Sequence[str] = ()) -> None:
        self.app, self.limiter, self.latency, self.exempt = app, limiter, latency, tuple(exempt)
        self._faults: deque[_Fault] = deque()
        self._lock = threading.Lock()
        #: Non-exempt HTTP requests seen so far.
        self.requests = 0

    def fail_next(self, count: int = 1, *, status: int = 503,
                  body: bytes | str | Mapping[str, Any] = b"",
                  headers: Mapping[str, str] | None = None, path_prefix: str = "") -> None:
        """Answer the next ``count`` matching requests with ``status`` and ``body``.

        Args:
            count: How many requests to fail.
            status: The HTTP status.
            body: Bytes, text, or a mapping sent as JSON; empty: the status phrase.
            headers: Extra headers (e.g. ``Retry-After``).
            path_prefix: Only requests whose path starts with it.
        """
        if isinstance(body, Mapping):
            raw, kind = json.dumps(body).encode(), "application/json"
        else:
            raw = body.encode() if isinstance(body, str) else body
            raw, kind = raw or HTTPStatus(status).phrase.encode(), "text/plain; charset=utf-8"
        fault = _Fault(status, raw, {"content-type": kind, **(headers or {})}, False, path_prefix)
        with self._lock:
            self._faults.extend([fault] * count)

    def drop_next(self, count: int = 1, *, path_prefix: str = "") -> None:
        """Close the connection of the next ``count`` matching requests without answering.

        Args:
            count: How many requests to drop.
            path_prefix: Only requests whose path starts with it.
        """
        with self._lock:
            self._faults.extend([_Fault(0, b"", {}, True, path_prefix)] * count)

    def reset(self) -> None:
        """Cancel pending faults and latency (the limiter stays)."""
        with self._lock:
            self._faults.clear()
            self.latency = 0.0

    def _take(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if path.startswith(fault.path_prefix):
                    self._faults.remove(fault)
                    return fault
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or any(part in path for part in self.exempt):
            await self.app(scope, receive, send)
            return
        self.requests += 1
        fault = self._take(path)
        if fault is not None:
            if fault.drop:
                await _drop_connection(send)
            else:
                await Response(fault.body, fault.status, dict(fault.headers))(scope, receive, send)
            return
        limiter = self.limiter
        caller = limiter.caller(scope) if limiter else ""
        hit = limiter.enter(caller) if limiter else None
        if limiter is not None and hit is not None:
            await limiter.respond(hit)(scope, receive, send)
            return
        started = limiter.clock() if limiter else 0.0
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            await self.app(scope, receive, send)
        finally:
            if limiter is not None:
                limiter.leave(caller, started)


async def _drop_connection(send: Send) -> None:
    """Abort the socket under uvicorn's request cycle (bound to ``send``), then return."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise ConnectionDropped("fault injection: connection dropped")
    transport.abort()
    for _ in range(100):  # until uvicorn noticed, so it does not try to answer 500
        if getattr(cycle, "disconnected", False):
            return
        await asyncio.sleep(0.01)

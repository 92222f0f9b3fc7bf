"""Small, dependency-free helpers shared by the test suite and its fixtures.

Import them in tests as ``from tests.support import wait_for`` (``tests`` is a
package and pytest puts the repository root on ``sys.path``).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterable
from typing import NoReturn, TypeVar

T = TypeVar("T")

__all__ = [
    "WaitTimeout",
    "in_ci",
    "pick_free_port",
    "port_is_open",
    "skip_or_fail_in_ci",
    "wait_for",
    "wait_for_port",
]

#: Values of ``$CI`` that do not mean "running in CI".
_NOT_CI = frozenset({"", "0", "false", "no", "off"})


class WaitTimeout(AssertionError):
    """Raised by :func:`wait_for` when the predicate never became truthy.

    It is an ``AssertionError`` so pytest reports it as a plain test failure.
    """


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.1,
    message: str | Callable[[], str] = "condition",
    *,
    ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Args:
        predicate: called repeatedly, without arguments.
        timeout: seconds to keep trying before giving up.
        interval: seconds to sleep between two calls.
        message: what is being waited for (or a callable producing it lazily,
            e.g. to include current state); it is part of the failure message.
        ignore: exception type(s) raised by ``predicate`` that count as "not yet"
            instead of aborting the wait (e.g. ``ConnectionError`` while a
            server boots). The last one is chained to the final error.

    Raises:
        WaitTimeout: ``predicate`` was still falsy (or raising an ignored
            exception) after ``timeout`` seconds. The predicate is always
            called at least once, and once more right at the deadline.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:  # type: ignore[misc]
            last_exc = exc
        else:
            if value:
                return value
            last_value = value
            last_exc = None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            text = message() if callable(message) else message
            detail = f"last error: {last_exc!r}" if last_exc else f"last value: {last_value!r}"
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {text} ({detail})") from last_exc
        time.sleep(min(interval, remaining))


def in_ci() -> bool:
    """True when running in CI (``$CI`` set, as CI runners do, e.g. ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in _NOT_CI


def skip_or_fail_in_ci(reason: str) -> NoReturn:
    """Skip the calling test with ``reason`` on a developer machine; fail it in CI.

    ``tests/run`` installs what the tests need on CI's machine, so there a missing tool
    or service is a broken set-up that must show, not a test quietly left out. Say in
    ``reason`` what is missing and how to get it.

    Raises:
        pytest.skip.Exception: not in CI.
        pytest.fail.Exception: in CI (see :func:`in_ci`).
    """
    import pytest  # noqa: PLC0415 - the helpers above stay usable without pytest

    __tracebackhide__ = True  # report the calling test's line, not this one
    if in_ci():
        pytest.fail(f"{reason} (a skip in CI is a failure: CI=true)", pytrace=False)
    pytest.skip(reason)


def port_is_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Return True if a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 30.0, *, closed: bool = False) -> None:
    """Wait until ``host:port`` accepts TCP connections (or refuses them, if ``closed``)."""
    state = "closed" if closed else "open"
    wait_for(
        lambda: port_is_open(host, port, timeout=0.5) is not closed,
        timeout=timeout,
        interval=0.05,
        message=f"TCP port {host}:{port} to be {state}",
    )


def _port_is_bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return not port_is_open(host, port, timeout=0.2)


def pick_free_port(
    host: str = "127.0.0.1",
    *,
    low: int = 20000,
    high: int = 32000,
    avoid: Iterable[int] = (),
    attempts: int = 200,
) -> int:
    """Return a TCP port in ``[low, high)`` that is currently free on ``host``.

    The default range lies below Linux's ephemeral range (32768-60999), so the
    port cannot be grabbed by some unrelated outgoing connection between this
    check and the moment a server binds it (or binds it again after a restart).
    """
    avoided = set(avoid)
    rng = random.SystemRandom()
    for _ in range(attempts):
        port = rng.randrange(low, high)
        if port not in avoided and _port_is_bindable(host, port):
            return port
    raise RuntimeError(f"no free TCP port found in [{low}, {high}) on {host}")


def dead_letters(amqp_url: str, *, after: int | None = None) -> list[tuple[object, bytes]]:
    """Every letter in the dead-letter log ``syncbus.dead.log`` (after offset ``after``):
    (pika properties with capped headers, body); [] when the log does not exist yet.

    Reads to a marker of its own, so the result is the whole log at the time of the
    call (see :mod:`bus.amqp.deadlog`); reading never removes anything.
    """
    from bus.amqp.deadlog import DeadLog, NoDeadLog  # noqa: PLC0415 - test helpers stay light

    try:
        with DeadLog(amqp_url) as log:
            start = None if after is None else after + 1
            return [(letter.props, letter.body) for letter in log.read_to_end(start)]
    except NoDeadLog:
        return []


def dead_letter_count(amqp_url: str) -> int:
    """Letters in the dead-letter log (markers left out)."""
    return len(dead_letters(amqp_url))

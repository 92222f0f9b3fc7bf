"""RabbitMQ's refusals in one line an operator can act on, whatever client raised them.

kombu, py-amqp and pika each report an unreachable broker, a refused login or a
missing vhost differently (``OperationalError: [Errno 111]``, ``AccessRefused(403)``,
``ProbableAccessDeniedError`` wrapping a string, a bare ``socket.gaierror`` raised
inside pika …). :func:`explain` looks through an exception — its causes, its
context and what pika wraps in its arguments — and returns a
:class:`BrokerUnavailable` with one of these messages, or None when the exception
is not RabbitMQ being unusable:

=============  ===============================================================================
reason         message
=============  ===============================================================================
unreachable    ``cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:5999/ (connection
               refused); is it running?``
login          ``RabbitMQ refused the login of user 'bob' on vhost '/' (ACCESS_REFUSED):
               check the user name and password in broker.url``
vhost          ``vhost 'x' does not exist on the broker: create it with rabbitmqctl add_vhost x``
no-access      ``user 'bob' has no permissions on vhost 'x' (NOT_ALLOWED): …set_permissions…``
permission     ``RabbitMQ refused user 'bob' access to exchange 'syncbus.changes' in vhost
               'x' (ACCESS_REFUSED on Basic.publish: write permission) …``
=============  ===============================================================================

The command line reports a :class:`BrokerUnavailable` as that one line on stderr
with exit code :data:`EXIT_BROKER` (see ``bus.cli.main``). URLs are redacted.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

from bus.core.redact import redact_text, redact_url
from connectors.base import BrokerConnectionError

__all__ = [
    "BrokerUnavailable",
    "EXIT_BROKER",
    "PERMISSIONS_DOC",
    "broker_errors",
    "explain",
    "raise_if_broker",
]

#: Exit code of every command when RabbitMQ cannot be used (unreachable, login
#: refused, vhost missing, a permission missing).
EXIT_BROKER = 4

#: Where the least-privilege permissions are explained.
PERMISSIONS_DOC = "docs/operations.md, 'RabbitMQ users with least privilege'"

_CLIENTS = ("amqp", "kombu", "pika")
_LOGIN = re.compile(r"ACCESS_REFUSED - Login was refused")
_NO_VHOST = re.compile(r"NOT_ALLOWED - vhost (.+?) not found")
_NO_ACCESS = re.compile(r"NOT_ALLOWED - access to vhost '(.*?)' refused for user '(.*?)'")
_DENIED = re.compile(r"ACCESS_REFUSED - access to (queue|exchange|topic) '(.*?)' in vhost '(.*?)'"
                     r" refused for user '(.*?)'")
_METHOD = re.compile(r"\b([A-Z][a-z]+\.[a-z][a-z-]*)\b")
# What each AMQP method needs (RabbitMQ's access-control table).
_NEEDS = {"Queue.declare": "configure", "Exchange.declare": "configure",
          "Queue.delete": "configure", "Exchange.delete": "configure",
          "Basic.publish": "write", "Queue.bind": "write on the queue, read on the exchange",
          "Queue.unbind": "write on the queue, read on the exchange",
          "Basic.get": "read", "Basic.consume": "read", "Queue.purge": "read"}
# Network failures, most specific first (ConnectionRefusedError is an OSError).
_NETWORK: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "host name not found"),
    (TimeoutError, "no answer: timed out"),
    (ssl.SSLError, "TLS handshake failed"),
    (ConnectionResetError, "connection reset during the handshake"),
)
_NETWORK_TEXT = (
    ("Connection refused", "connection refused"),
    ("Name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("Temporary failure in name resolution", "host name not found"),
    ("timed out", "no answer: timed out"),
    ("time-out", "no answer: timed out"),
    ("unexpectedly closed", "the connection was closed during the handshake"),
    ("Transport indicated EOF", "the connection was closed during the handshake"),
    ("StreamLostError", "the connection was closed during the handshake"),
)

_HINTS = {
    "host name not found": "check the host in broker.url",
    "the connection was closed during the handshake": (
        "is that RabbitMQ's AMQP port, and does it want TLS (amqps://)?"),
    "TLS handshake failed": "check amqps:// and the broker's certificate",
}


class BrokerUnavailable(BrokerConnectionError):
    """RabbitMQ cannot be used: unreachable, login refused, vhost missing, or a
    permission missing.

    Args:
        message: The one line to show (URL redacted).
        reason: ``unreachable``, ``login``, ``vhost``, ``no-access`` or ``permission``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def explain(exc: BaseException, url: str | None = None, *,
            name_url: bool = True) -> BrokerUnavailable | None:
    """``exc`` as a :class:`BrokerUnavailable`, or None when it is something else.

    Args:
        exc: Any exception.
        url: The broker URL, for the user and vhost (and, redacted, the message).
        name_url: Put the (redacted) URL into the message of an unreachable broker;
            off where the caller shows it already.

    Returns:
        The translated error (not raised), or None: ``exc`` did not come from a
        RabbitMQ client, or says something other than the cases above.
    """
    # Only what a RabbitMQ client raised (and what it wraps) counts: a database's
    # "connection refused" inside a message handler is not the broker's.
    found = list(dict.fromkeys(x for e in _graph(exc) if _from_client(e) for x in _graph(e)))
    if not found:
        return None
    text = " | ".join(_text(e) for e in found)
    user, vhost = _user_and_vhost(url)
    where = f" at {redact_url(url)}" if url and name_url else ""
    if match := _DENIED.search(text):
        kind, name, vhost, user = match.groups()
        method = next((m for m in _METHOD.findall(text) if m in _NEEDS), None)
        needs = f" on {method}: {_NEEDS[method]} permission" if method else ""
        return BrokerUnavailable(
            f"RabbitMQ refused user '{user}' access to {kind} '{name}' in vhost '{vhost}' "
            f"(ACCESS_REFUSED{needs}); grant it with rabbitmqctl set_permissions, see "
            f"{PERMISSIONS_DOC}", reason="permission")
    if match := _NO_ACCESS.search(text):
        vhost, user = match.groups()
        return BrokerUnavailable(
            f"user '{user}' has no permissions on vhost '{vhost}' (NOT_ALLOWED): grant them "
            f"with rabbitmqctl set_permissions -p {_shell(vhost)} {_shell(user)} … (see "
            f"{PERMISSIONS_DOC})", reason="no-access")
    if match := _NO_VHOST.search(text):
        missing = match.group(1).strip("'\"")
        return BrokerUnavailable(
            f"vhost '{missing}' does not exist on the broker{where}: create it with "
            f"rabbitmqctl add_vhost {_shell(missing)}", reason="vhost")
    if _LOGIN.search(text) or _is_login_error(found):
        return BrokerUnavailable(
            f"RabbitMQ{where} refused the login of user '{user}' on vhost '{vhost}' "
            "(ACCESS_REFUSED): check the user name and password in broker.url",
            reason="login")
    network = _network_reason(found, text)
    if network is not None or any(isinstance(e, BrokerConnectionError) for e in found):
        why = network or redact_text(_first_message(found))
        hint = _HINTS.get(why, "is it running?")
        return BrokerUnavailable(f"cannot reach RabbitMQ{where} ({why}); {hint}",
                                 reason="unreachable")
    return None


@contextmanager
def broker_errors(url: str | None, *, name_url: bool = True) -> Iterator[None]:
    """Translate what RabbitMQ clients raise inside the block (see :func:`explain`).

    Args:
        url: The broker URL the block talks to.
        name_url: See :func:`explain`.

    Raises:
        BrokerUnavailable: the block raised an error that means RabbitMQ cannot be
            used; anything else propagates unchanged.
    """
    try:
        yield
    except Exception as exc:
        problem = explain(exc, url, name_url=name_url)
        if problem is None:
            raise
        raise problem from exc


def raise_if_broker(exc: BaseException, url: str | None = None) -> None:
    """Raise :class:`BrokerUnavailable` (from ``exc``) when ``exc`` is RabbitMQ being
    unusable; return otherwise. For handlers that catch ``BusError`` broadly.

    Raises:
        BrokerUnavailable: see :func:`explain`.
    """
    problem = explain(exc, url)
    if problem is not None:
        raise problem from exc


# -- looking through exceptions ------------------------------------------------------------


def _graph(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and exceptions held in their arguments."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 50:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        context = None if e.__suppress_context__ else e.__context__  # `raise … from None`
        todo += [x for x in (e.__cause__, context) if x is not None]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        inner = getattr(e, "exception", None)  # pika's AMQPConnectorException
        if isinstance(inner, BaseException):
            todo.append(inner)


def _from_client(exc: BaseException) -> bool:
    """A RabbitMQ client's error, our broker error, or a socket error raised inside a
    client (pika lets ``socket.gaierror`` through)."""
    if isinstance(exc, BrokerConnectionError):
        return True
    if type(exc).__module__.split(".")[0] in _CLIENTS:
        return True
    if not isinstance(exc, OSError):
        return False
    tb = exc.__traceback__
    while tb is not None:  # e.g. socket.gaierror raised inside pika
        if str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] in _CLIENTS:
            return True
        tb = tb.tb_next
    return False


def _text(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the original error
        return type(exc).__name__


def _is_login_error(found: list[BaseException]) -> bool:
    names = {type(e).__name__ for e in found}
    return bool(names & {"ProbableAuthenticationError", "AuthenticationError"})


def _network_reason(found: list[BaseException], text: str) -> str | None:
    for exc in found:
        for kind, why in _NETWORK:
            if isinstance(exc, kind):
                return why
    for needle, why in _NETWORK_TEXT:
        if needle in text:
            return why
    oserror = next((e for e in found if isinstance(e, OSError) and e.strerror), None)
    return str(oserror.strerror).lower() if oserror is not None else None


def _first_message(found: list[BaseException]) -> str:
    for exc in found:
        message = getattr(exc, "message", None) or str(exc)
        if message:
            return str(message)
    return type(found[0]).__name__


def _user_and_vhost(url: str | None) -> tuple[str, str]:
    """User and vhost as RabbitMQ sees them (kombu's defaults: guest, /)."""
    try:
        parts = urlsplit(url or "")
        user = unquote(parts.username) if parts.username else "guest"
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    except ValueError:
        return "?", "?"
    return user, vhost


def _shell(word: str) -> str:
    """``word`` quoted for a shell command line when it needs it."""
    if re.fullmatch(r"[A-Za-z0-9_./:@%+=-]+", word):
        return word
    return "'" + word.replace("'", "'\\''") + "'"

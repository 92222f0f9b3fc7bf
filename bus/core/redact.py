"""Masking secrets in URLs and in free text before they are shown or logged.

``redact_url`` replaces the password of one URL (``amqp://``, ``postgresql+psycopg://``,
``https://`` — any scheme) with ``***``, and the value of secret-looking query or
connection-string parameters (``password=``, ``token=``, ``api_key=`` …) likewise.
``redact_text`` does the same for every URL and ``password=…`` pair inside free
text, such as a database driver's error message.

Both are total: they never raise, whatever the input. When a password holds
characters that should have been percent-encoded (``/``, ``?``, ``#``, ``@``), they
mask too much rather than too little: outside ``http(s)`` URLs the user information
ends at the *last* ``@`` (an ``@`` in a vhost, a database name or a query is rare,
and masking a little of it is harmless), so ``amqp://u:p@ss#S3cr3t/x@host/`` shows
as ``amqp://u:***@host/``.

``userinfo_problem`` tells whether a URL's user name or password needs
percent-encoding — that is, whether parsers could disagree about where they end
(``bus.config.load`` refuses such URLs before anything connects).
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact_text", "redact_url", "userinfo_problem"]

#: What a secret is replaced with.
MASK = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# A URL inside text runs until whitespace, a quote or an angle bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_SECRET_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9])"
    r"(password|passwd|pwd|secret|client_secret|token|access_token|refresh_token|api_?key)"
    r"(\s*=\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s&;,'\")]+)"
)


def redact_url(url: str) -> str:
    """Return ``url`` with its password (and secret query parameters) masked.

    Args:
        url: Any string; URLs without a password come back unchanged.

    Returns:
        The URL with ``user:***@host``; ``***`` alone when ``url`` cannot even be
        turned into text.
    """
    try:
        text = url if isinstance(url, str) else str(url)
        return _SECRET_PARAM.sub(_mask_param, _mask_userinfo(text))
    except Exception:  # noqa: BLE001 - redaction must never be the thing that fails
        return MASK


def redact_text(text: str) -> str:
    """Mask the password of every URL and every ``password=…`` pair in ``text``.

    Args:
        text: Free text, e.g. an exception message that may quote a connection URL.

    Returns:
        The text with secrets replaced by ``***``.
    """
    try:
        text = text if isinstance(text, str) else str(text)
        masked = _URL_IN_TEXT.sub(lambda m: _mask_userinfo(m.group(0)), text)
        return _SECRET_PARAM.sub(_mask_param, masked)
    except Exception:  # noqa: BLE001 - redaction must never be the thing that fails
        return MASK


def _mask_param(match: re.Match[str]) -> str:
    return f"{match.group(1)}{match.group(2)}{MASK}"


def _mask_userinfo(url: str) -> str:
    """Mask the password in ``scheme://user:password@host…`` (one URL, no free text)."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return url
    head, rest = url[: scheme.end()], url[scheme.end() :]
    at = _userinfo_end(head, rest)
    if at < 0:
        if _bad_port(rest[: _authority_end(rest)]):  # ``u:pa#ss`` and no host at all
            return f"{head}{rest.partition(':')[0]}:{MASK}"
        return url
    user, colon, password = rest[:at].partition(":")
    if not colon or not password:
        return url
    return f"{head}{user}:{MASK}{rest[at:]}"


def userinfo_problem(url: str) -> str | None:
    """What in ``url``'s user information needs percent-encoding; None when nothing does.

    The answer never quotes the URL: it names the part (``the password``, ``the user
    name``) and what to do.

    Args:
        url: A URL (anything without ``scheme://`` has no user information).

    Returns:
        A message such as ``"the password must be percent-encoded: @ → %40, …"``, or
        None. A port that is no number counts too: it is what a password cut at a
        ``/``, ``?`` or ``#`` looks like.
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    head, rest = url[: scheme.end()], url[scheme.end() :]
    end = _authority_end(rest)
    authority, tail = rest[:end], rest[end:]
    if "@" in tail and authority and (
            "@" in authority or not _is_http(head) or _bad_port(authority)):
        return f"the user name or password {_HOW} (an '@' in a path or query as well)"
    if "@" not in authority:
        return f"the port is not a number (a password {_HOW})" if _bad_port(authority) else None
    userinfo = authority.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    for part, name in ((user, "the user name"), (password, "the password")):
        if "@" in part or _NEEDS_ENCODING.search(part):
            return f"{name} {_HOW}"
    return None


_HOW = "must be percent-encoded: @ → %40, / → %2F, # → %23, ? → %3F, % → %25, space → %20"
# Characters RFC 3986 does not allow in user information (letters beyond ASCII are
# left alone); a '%' must start a %XX escape.
_NEEDS_ENCODING = re.compile(r"[\x00-\x20\x7f\"<>\[\]\\^`{|}/?#]|%(?![0-9A-Fa-f]{2})")


def _is_http(head: str) -> bool:
    return head.lower() in ("http://", "https://")


def _userinfo_end(head: str, rest: str) -> int:
    """Index in ``rest`` of the ``@`` that ends the user information, or -1.

    ``http(s)`` URLs often carry ``@`` in paths and queries, so there the authority
    decides unless it is visibly broken; any other URL ends its user information at
    the last ``@``.
    """
    end = _authority_end(rest)
    authority = rest[:end]
    if _is_http(head) and not _bad_port(authority):
        return rest.rfind("@", 0, end)
    return rest.rfind("@")


def _authority_end(rest: str) -> int:
    """Index where the authority (``user:pass@host:port``) of ``rest`` ends."""
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    return min(ends, default=len(rest))


def _bad_port(authority: str) -> bool:
    """True when ``authority`` (without user information) has a port that is no number.

    ``amqp://u:pa/ss@host/`` looks like authority ``u:pa``, port ``pa``: the password
    was cut at its ``/``.
    """
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("[") or ":" not in hostport:
        return False
    port = hostport.rpartition(":")[2]
    return bool(port) and not port.isdigit()

"""Masking secrets in URLs and in free text before they are shown or logged.

``redact_url`` replaces the password of one URL (``amqp://``, ``postgresql+psycopg://``,
``https://`` — any scheme) with ``***``, and the value of secret-looking query or
connection-string parameters (``password=``, ``token=``, ``api_key=`` …) likewise.
``redact_text`` does the same for every URL and ``password=…`` pair inside free
text, such as a database driver's error message.

Both are total: they never raise, whatever the input. When a password holds
characters that should have been percent-encoded (``/``, ``?``, ``#``, ``@``), they
mask too much rather than too little.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact_text", "redact_url"]

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
    end = _authority_end(rest)
    at = rest.rfind("@", 0, end)
    if at < 0:
        at = _misencoded_at(rest, end)
        if at < 0:
            return url
    user, colon, password = rest[:at].partition(":")
    if not colon or not password:
        return url
    return f"{head}{user}:{MASK}{rest[at:]}"


def _authority_end(rest: str) -> int:
    """Index where the authority (``user:pass@host:port``) of ``rest`` ends."""
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    return min(ends, default=len(rest))


def _misencoded_at(rest: str, end: int) -> int:
    """The ``@`` ending a password that contains an unencoded ``/``, ``?`` or ``#``.

    ``amqp://u:pa/ss@host/`` looks like authority ``u:pa`` with port ``pa``; a port
    that is not a number, followed later by an ``@``, means the password was cut.
    """
    authority = rest[:end]
    if authority.startswith("[") or ":" not in authority:
        return -1
    port = authority.rpartition(":")[2]
    if port.isdigit() or not port:
        return -1
    return rest.rfind("@", end)

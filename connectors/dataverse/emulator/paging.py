"""Opaque ``$skiptoken`` paging cookies, shaped like Dataverse's.

A next link carries ``$skiptoken=<cookie pagenumber="2" pagingcookie="…"
istracking="False" />`` where the (URL-encoded) paging cookie names the last
row of the page. Clients must treat it as opaque; the emulator reads its state back.

Features
    * Query pages resume after the last row's sort values and id, so rows inserted
      or deleted between two pages neither shift nor repeat the following pages.
    * Change-tracking pages (``istracking="True"``) carry the delta range and the
      position inside it.

Configuration
    None.

Limits
    None.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from connectors.dataverse.emulator.errors import bad_query

__all__ = ["PageCookie", "make_skiptoken", "parse_skiptoken"]

_TOKEN = re.compile(r'^<cookie pagenumber="(\d+)" pagingcookie="([^"]*)" istracking="(True|False)" />$')
_STATE = re.compile(r'<sbstate value="([A-Za-z0-9_\-=]*)" />')


@dataclass(frozen=True, slots=True)
class PageCookie:
    """What a skiptoken remembers.

    Args:
        page: Number of the page it leads to.
        tracking: A change-tracking page.
        state: Position: ``{"last": {...}}`` for queries; ``{"from", "upto", "phase",
            "after"}`` for change tracking.
    """

    page: int
    tracking: bool
    state: dict[str, Any]


def make_skiptoken(cookie: PageCookie, primary_id: str, first: str | None,
                   last: str | None) -> str:
    """Encode a cookie as the ``$skiptoken`` value (not yet URL-encoded).

    Args:
        cookie: What to remember.
        primary_id: The table's primary id column (element name, as Dataverse writes).
        first: Id of the first row of the page that ends here.
        last: Id of its last row.

    Returns:
        ``<cookie pagenumber="…" pagingcookie="…" istracking="…" />``.
    """
    state = base64.urlsafe_b64encode(json.dumps(cookie.state, separators=(",", ":"))
                                      .encode()).decode()
    inner = (f'<cookie page="{cookie.page - 1}"><{primary_id} last="{{{(last or "").upper()}}}" '
             f'first="{{{(first or "").upper()}}}" /><sbstate value="{state}" /></cookie>')
    encoded = urllib.parse.quote(inner, safe="")
    return (f'<cookie pagenumber="{cookie.page}" pagingcookie="{encoded}" '
            f'istracking="{"True" if cookie.tracking else "False"}" />')


def parse_skiptoken(token: str) -> PageCookie:
    """Decode a ``$skiptoken`` value made by :func:`make_skiptoken`.

    Raises:
        ODataError: 400 when the token was not made here (or was altered).
    """
    match = _TOKEN.match(token.strip())
    inner = urllib.parse.unquote(match.group(2)) if match else ""
    state = _STATE.search(inner)
    if match is None or state is None:
        raise bad_query("The $skiptoken is not valid; follow @odata.nextLink without changing it.")
    try:
        data = json.loads(base64.urlsafe_b64decode(state.group(1)))
    except ValueError:
        raise bad_query("The $skiptoken is not valid; follow @odata.nextLink without "
                        "changing it.") from None
    return PageCookie(int(match.group(1)), match.group(3) == "True", data)

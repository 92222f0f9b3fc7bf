"""OData query options of the emulator: ``$filter``, ``$select``, ``$orderby``, ``$top``,
``$skip``, ``$count`` and server-driven paging with ``$skiptoken`` next links.

Features
    * ``$filter``: ``eq ne gt ge lt le``, ``and or not``, parentheses, ``contains``,
      ``startswith``, ``endswith``; literals ``'text'`` (``''`` escapes a quote), numbers,
      ``true``/``false``/``null``, bare GUIDs, dates and date-times
      (``lastModifiedDateTime gt 2024-01-01T00:00:00Z``). Text compares
      case-insensitively, as Business Central's SQL collation does.
    * Like Business Central, ``or`` between *different* fields is refused ("The 'OR'
      operator is not supported on distinct fields on an OData filter.").
    * Paging is key-set based: the skip token holds the last row's sort values, so
      rows inserted or changed between two pages never shift a page boundary.

Configuration
    None; the page size is decided by the app (``Prefer: odata.maxpagesize``, cap).

Limits
    * No arithmetic, lambda operators, ``in``, ``$search``, ``$apply``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from connectors.business_central.emulator import errors
from connectors.business_central.emulator.model import PageDef

__all__ = ["Query", "default_order", "parse_query", "run_query"]

Row = dict[str, Any]
Getter = Callable[[Row], Any]

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>'(?:[^']|'')*')
  | (?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b)
  | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)
  | (?P<date>\d{4}-\d{2}-\d{2}\b)
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[mMdDlLfF]?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[(),])
""", re.VERBOSE)
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}
_FUNCTIONS = {"contains", "startswith", "endswith"}


@dataclass(frozen=True, slots=True)
class _Lit:
    kind: str
    value: Any


@dataclass(slots=True)
class Query:
    """Parsed query options of one GET."""

    where: Callable[[Row], bool] | None = None
    select: list[str] | None = None
    order: list[tuple[str, bool]] = field(default_factory=list)
    top: int | None = None
    skip: int = 0
    after: Row | None = None
    count: bool = False


def parse_query(params: Mapping[str, str], page: PageDef) -> Query:
    """Parse the ``$`` options of a request for ``page``.

    Raises:
        BCError: 400 for a syntax error, an unknown property or a bad number.
    """
    q = Query(order=default_order(page))
    if params.get("$filter"):
        q.where = _Parser(params["$filter"], page).parse()
    if params.get("$select"):
        q.select = [s.strip() for s in params["$select"].split(",") if s.strip()]
        for name in q.select:
            _field_type(page, name)
    if params.get("$orderby"):
        q.order = _order(params["$orderby"], page)
    q.top, q.skip = _int(params, "$top"), _int(params, "$skip") or 0
    q.count = params.get("$count", "").lower() == "true"
    if params.get("$skiptoken"):
        state = _decode_token(params["$skiptoken"])
        q.after, q.top = state["after"], state.get("top")
    return q


def default_order(page: PageDef) -> list[tuple[str, bool]]:
    """Business Central returns rows in primary-key order: the number, else the key."""
    number = page.field_for("number")
    order = [(number.name, False)] if number is not None else []
    if page.field("sequence") is not None:
        order = [("documentId", False), ("sequence", False)]
    return order


def run_query(q: Query, page: PageDef, rows: list[Row], page_size: int
              ) -> tuple[list[Row], str | None, int]:
    """Filter, sort and page ``rows`` (page views).

    Returns:
        The rows of this page, the skip token of the next page (None: last page), and
        the count of all matching rows.
    """
    matching = [r for r in rows if q.where is None or q.where(r)]
    order = [*q.order, (page.key, False)]
    key = functools.partial(_sort_key, order, page)
    keyed = sorted(((key(r), r) for r in matching), key=lambda kr: kr[0])
    total = len(keyed)
    if q.after is not None:
        bound = key(q.after)
        matching = [r for k, r in keyed if k > bound]
    else:
        matching = [r for _, r in keyed[q.skip:]]
    if q.top is not None:
        matching = matching[:q.top]
    chunk = matching[:page_size]
    token = None
    if len(matching) > len(chunk):
        last = {name: chunk[-1][name] for name, _ in order}
        remaining = None if q.top is None else q.top - len(chunk)
        token = _encode_token({"after": last, "top": remaining})
    if q.select is not None:
        chunk = [{"@odata.etag": r["@odata.etag"], **{s: r[s] for s in q.select}} for r in chunk]
    return chunk, token, total


# -- paging -------------------------------------------------------------------------------


def _encode_token(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()


def _decode_token(token: str) -> dict[str, Any]:
    try:
        state = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("after"), dict):
        raise errors.bad_request("The skip token is not valid.", "BadRequest_InvalidToken")
    return state


@functools.total_ordering
class _Desc:
    """Wraps a sort value so that it sorts in descending order."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.value == other.value

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.value < self.value)

    def __hash__(self) -> int:
        return hash(self.value)


def _sort_key(order: list[tuple[str, bool]], page: PageDef, row: Row) -> tuple[Any, ...]:
    parts: list[Any] = []
    for name, desc in order:
        value = _norm(row.get(name), _field_type(page, name))
        part = (0, "") if value is None else (1, value)
        parts.append(_Desc(part) if desc else part)
    return tuple(parts)


def _order(text: str, page: PageDef) -> list[tuple[str, bool]]:
    out = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] not in ("asc", "desc")):
            raise errors.bad_request(f"Syntax error in $orderby '{text}'.")
        _field_type(page, words[0])
        out.append((words[0], len(words) == 2 and words[1] == "desc"))
    return out


def _int(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    if not raw.isdigit():
        raise errors.bad_request(f"Invalid value '{raw}' for {name} query option found. "
                                 f"The {name} query option requires a non-negative integer value.")
    return int(raw)


# -- values -------------------------------------------------------------------------------


def _field_type(page: PageDef, name: str) -> str:
    f = page.field(name)
    if f is None:
        raise errors.unknown_property(name, page.entity_type)
    return f.type


def _norm(value: Any, kind: str) -> Any:
    """A comparable form of a JSON value of EDM type ``kind``."""
    if value is None:
        return None
    if kind == "Edm.DateTimeOffset":
        return value if isinstance(value, datetime) else _parse_dt(str(value))
    if kind == "Edm.Date":
        if isinstance(value, datetime):
            return value.date()
        return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
    if kind in ("Edm.String", "Edm.Guid"):
        return str(value).casefold()
    if kind == "Edm.Boolean":
        return bool(value)
    return float(value)


def _parse_dt(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(text)
    return parsed


def _either(a: Callable[[Row], bool], b: Callable[[Row], bool], row: Row) -> bool:
    return a(row) or b(row)


def _both(a: Callable[[Row], bool], b: Callable[[Row], bool], row: Row) -> bool:
    return a(row) and b(row)


class _Parser:
    """Recursive descent over the ``$filter`` tokens, compiling to closures."""

    def __init__(self, text: str, page: PageDef) -> None:
        self.text, self.page = text, page
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise self._syntax(pos)
            if m.lastgroup != "ws":
                self.tokens.append((str(m.lastgroup), m.group()))
            pos = m.end()
        self.i = 0

    def parse(self) -> Callable[[Row], bool]:
        pred, _ = self._or()
        if self.i != len(self.tokens):
            raise self._syntax()
        return pred

    def _syntax(self, pos: int | None = None) -> errors.BCError:
        at = pos if pos is not None else self.i
        return errors.bad_request(f"Syntax error at position {at} in '{self.text}'.")

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _word(self, *words: str) -> bool:
        tok = self._peek()
        if tok and tok[0] == "name" and tok[1] in words:
            self.i += 1
            return True
        return False

    def _or(self) -> tuple[Callable[[Row], bool], set[str]]:
        left, names = self._and()
        while self._word("or"):
            right, more = self._and()
            if names != more:
                raise errors.bad_request("An error occurred while processing this request. "
                                         "The 'OR' operator is not supported on distinct "
                                         "fields on an OData filter.")
            left = functools.partial(_either, left, right)
        return left, names

    def _and(self) -> tuple[Callable[[Row], bool], set[str]]:
        left, names = self._unary()
        while self._word("and"):
            right, more = self._unary()
            left, names = functools.partial(_both, left, right), names | more
        return left, names

    def _unary(self) -> tuple[Callable[[Row], bool], set[str]]:
        if self._word("not"):
            inner, names = self._unary()
            return (lambda r: not inner(r)), names
        tok = self._peek()
        if tok == ("punct", "("):
            self.i += 1
            pred, names = self._or()
            if self._peek() != ("punct", ")"):
                raise self._syntax()
            self.i += 1
            return pred, names
        left, lkind, lnames = self._operand()
        if lkind == "bool-fn":
            return (lambda r: bool(left(r))), lnames
        op = self._peek()
        if not op or op[0] != "name" or op[1] not in _COMPARE:
            raise self._syntax()
        self.i += 1
        right, rkind, rnames = self._operand()
        return self._comparison(op[1], left, lkind, right, rkind), lnames | rnames

    def _comparison(self, op: str, left: Getter, lkind: str, right: Getter, rkind: str
                    ) -> Callable[[Row], bool]:
        kind = lkind if lkind.startswith("Edm.") else rkind
        if not kind.startswith("Edm."):
            kind = "Edm.String"

        def test(row: Row) -> bool:
            a, b = _norm(left(row), kind), _norm(right(row), kind)
            if op in ("eq", "ne"):
                return bool(a == b) == (op == "eq")
            if a is None or b is None:
                return False
            return bool({"gt": a > b, "ge": a >= b, "lt": a < b, "le": a <= b}[op])
        return test

    def _operand(self) -> tuple[Getter, str, set[str]]:
        tok = self._peek()
        if tok is None:
            raise self._syntax()
        self.i += 1
        kind, text = tok
        if kind == "str":
            value = text[1:-1].replace("''", "'")
            return (lambda r: value), "lit", set()
        if kind in ("guid", "dt", "date"):
            return (lambda r: text), "lit", set()
        if kind == "num":
            number = float(text.rstrip("mMdDlLfF"))
            return (lambda r: number), "lit", set()
        if kind != "name":
            raise self._syntax()
        if text in ("true", "false"):
            flag = text == "true"
            return (lambda r: flag), "lit", set()
        if text == "null":
            return (lambda r: None), "lit", set()
        if text in _FUNCTIONS and self._peek() == ("punct", "("):
            return self._function(text)
        ftype = _field_type(self.page, text)
        return (lambda r: r.get(text)), ftype, {text}

    def _function(self, name: str) -> tuple[Getter, str, set[str]]:
        self.i += 1
        field_get, _, names = self._operand()
        if self._peek() != ("punct", ","):
            raise self._syntax()
        self.i += 1
        arg_get, _, _ = self._operand()
        if self._peek() != ("punct", ")"):
            raise self._syntax()
        self.i += 1
        method = {"contains": "__contains__", "startswith": "startswith",
                  "endswith": "endswith"}[name]

        def call(row: Row) -> bool:
            hay, needle = str(field_get(row) or "").casefold(), str(arg_get(row)).casefold()
            return bool(getattr(hay, method)(needle))
        return call, "bool-fn", names

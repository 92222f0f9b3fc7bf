"""OData query syntax for the emulator: ``$filter``, ``$orderby``, ``$select`` and keys.

Features
    * ``$filter``: ``eq ne gt ge lt le``, ``and``/``or``/``not``, parentheses,
      ``contains``/``startswith``/``endswith``, literals (strings with ``''``, numbers,
      ``true``/``false``/``null``, GUIDs, dates, date-times, enum literals such as
      ``Microsoft.Dynamics.CRM.AttributeTypeCode'Picklist'``) and property paths
      (``RequiredLevel/Value``). Compiled once into a predicate over a row.
    * Text compares case-insensitively, as Dataverse's SQL collation does; a string
      compared with a number (or any other mismatch) is the 400 Dataverse returns.
    * ``$orderby`` into a sort key (nulls first when ascending, like SQL Server).

Configuration
    None.

Limits
    * No lambda operators (``any``/``all``), arithmetic, ``in`` or the
      ``Microsoft.Dynamics.CRM.*`` query functions: they are a 400 here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from connectors.dataverse.emulator.errors import ODataError, bad_query

__all__ = [
    "GUID",
    "Getter",
    "LiteralValue",
    "Predicate",
    "Resolver",
    "compile_filter",
    "compile_orderby",
    "format_datetime",
    "literal",
    "parse_datetime",
    "parse_literal",
    "split_select",
    "tokenize",
]

#: Reads a value from a row.
Getter = Callable[[Mapping[str, Any]], Any]
#: True when a row matches.
Predicate = Callable[[Mapping[str, Any]], bool]
#: Property path → (getter, Edm type or None when untyped); raises ODataError if unknown.
Resolver = Callable[[str], tuple[Getter, str | None]]

GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<str>'(?:[^']|'')*')"
    rf"|(?P<enum>[A-Za-z_][\w.]*'(?:[^']|'')*')"
    r"|(?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)"
    rf"|(?P<guid>{GUID})"
    r"|(?P<date>\d{4}-\d{2}-\d{2})"
    r"|(?P<num>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[mMdDfFlL]?)"
    r"|(?P<name>[A-Za-z_$@][\w.@$]*(?:/[A-Za-z_][\w.]*)*)"
    r"|(?P<punct>[(),=])"
    r")"
)
_COMPARISONS = {"eq", "ne", "gt", "ge", "lt", "le"}
_FUNCTIONS = {"contains", "startswith", "endswith"}
_NUMERIC = {"Edm.Int32", "Edm.Int64", "Edm.Decimal", "Edm.Double"}
_TEMPORAL = {"Edm.DateTimeOffset", "Edm.Date"}
_OP_NAMES = {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
             "lt": "LessThan", "le": "LessThanOrEqual"}


@dataclass(frozen=True, slots=True)
class LiteralValue:
    value: Any
    edm: str | None  # None: null


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    text: str


def parse_datetime(text: str) -> datetime:
    """An ISO date-time (``Z`` or offset; naive means UTC) as an aware UTC datetime.

    Raises:
        ValueError: not a date-time.
    """
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_datetime(value: datetime) -> str:
    """UTC, whole seconds, ``Z``: how Dataverse returns date-times."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_literal(text: str) -> LiteralValue:
    """One OData literal (as in a key segment or a filter).

    Raises:
        ODataError: not a literal.
    """
    tokens = tokenize(text)
    if len(tokens) != 1:
        raise bad_query(f"Syntax error: '{text}' is not a literal.")
    return literal(tokens[0])


def tokenize(text: str) -> list[_Tok]:
    """Split OData expression text into tokens.

    Raises:
        ODataError: a character sequence is not a token.
    """
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise bad_query(f"Syntax error at position {pos} in '{text}'.")
        kind = match.lastgroup or ""
        tokens.append(_Tok(kind, match.group(kind)))
        pos = match.end()
    return tokens


def literal(tok: _Tok) -> LiteralValue:
    """The value and Edm type of one literal token.

    Raises:
        ODataError: the token is not a literal.
    """
    kind, text = tok.kind, tok.text
    if kind == "str":
        return LiteralValue(text[1:-1].replace("''", "'"), "Edm.String")
    if kind == "enum":
        return LiteralValue(text[text.index("'") + 1:-1].replace("''", "'"), "Edm.String")
    if kind == "guid":
        return LiteralValue(text.lower(), "Edm.Guid")
    if kind == "dt":
        return LiteralValue(parse_datetime(text), "Edm.DateTimeOffset")
    if kind == "date":
        return LiteralValue(date.fromisoformat(text), "Edm.Date")
    if kind == "num":
        body = text.rstrip("mMdDfFlL")
        if any(c in body for c in ".eE"):
            return LiteralValue(Decimal(body), "Edm.Decimal")
        return LiteralValue(int(body), "Edm.Int64")
    if kind == "name" and text in ("true", "false"):
        return LiteralValue(text == "true", "Edm.Boolean")
    if kind == "name" and text == "null":
        return LiteralValue(None, None)
    raise bad_query(f"Syntax error: '{text}' is not a literal.")


# -- $filter ---------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the tokens, producing predicates."""

    def __init__(self, text: str, resolve: Resolver) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.resolve = resolve

    def peek(self) -> _Tok | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, text: str | None = None) -> _Tok:
        tok = self.peek()
        if tok is None or (text is not None and tok.text != text):
            want = f"'{text}'" if text else "more input"
            raise bad_query(f"Syntax error: expected {want} in $filter '{self.text}'.")
        self.pos += 1
        return tok

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "name" and tok.text == word:
            self.pos += 1
            return True
        return False

    def parse(self) -> Predicate:
        pred = self.or_()
        if self.peek() is not None:
            raise bad_query(f"Syntax error at '{self.peek().text}' in $filter '{self.text}'.")  # type: ignore[union-attr]
        return pred

    def or_(self) -> Predicate:
        parts = [self.and_()]
        while self.keyword("or"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else (lambda row: any(p(row) for p in parts))

    def and_(self) -> Predicate:
        parts = [self.not_()]
        while self.keyword("and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else (lambda row: all(p(row) for p in parts))

    def not_(self) -> Predicate:
        if self.keyword("not"):
            inner = self.not_()
            return lambda row: not inner(row)
        return self.primary()

    def primary(self) -> Predicate:
        tok = self.peek()
        if tok is not None and tok.text == "(":
            self.take("(")
            pred = self.or_()
            self.take(")")
            return pred
        if tok is not None and tok.kind == "name" and tok.text in _FUNCTIONS:
            return self.function()
        if tok is not None and tok.kind == "name" and tok.text.startswith("Microsoft.Dynamics.CRM."):
            raise ODataError(400, "0x80060888", f"The query function '{tok.text}' is not "
                             "supported by the emulator.")
        left = self.operand()
        op = self.take()
        if op.text not in _COMPARISONS:
            raise bad_query(f"Syntax error: '{op.text}' is not a comparison operator in "
                            f"$filter '{self.text}'.")
        right = self.operand()
        return _comparison(op.text, left, right)

    def function(self) -> Predicate:
        name = self.take().text
        self.take("(")
        getter, edm = self.property()
        self.take(",")
        lit = literal(self.take())
        self.take(")")
        if edm not in (None, "Edm.String") or lit.edm != "Edm.String":
            raise bad_query(f"No function signature for the function with name '{name}' "
                            "matches the specified arguments.")
        needle = str(lit.value).casefold()
        test: Callable[[str], bool] = {
            "contains": lambda s: needle in s,
            "startswith": lambda s: s.startswith(needle),
            "endswith": lambda s: s.endswith(needle),
        }[name]

        def pred(row: Mapping[str, Any]) -> bool:
            value = getter(row)
            return isinstance(value, str) and test(value.casefold())

        return pred

    def property(self) -> tuple[Getter, str | None]:
        tok = self.take()
        if tok.kind != "name" or tok.text in ("true", "false", "null"):
            raise bad_query(f"Syntax error: expected a property, found '{tok.text}'.")
        return self.resolve(tok.text)

    def operand(self) -> tuple[Getter, str | None] | LiteralValue:
        tok = self.peek()
        if tok is not None and tok.kind == "name" and tok.text not in ("true", "false", "null"):
            return self.property()
        return literal(self.take())


def compile_filter(text: str, resolve: Resolver) -> Predicate:
    """Compile a ``$filter`` expression.

    Args:
        text: The expression.
        resolve: Resolves property paths (raises ODataError for unknown ones).

    Returns:
        A predicate over rows.

    Raises:
        ODataError: syntax error, unknown property or incompatible operand types.
    """
    return _Parser(text, resolve).parse()


def _comparison(op: str, left: tuple[Getter, str | None] | LiteralValue,
                right: tuple[Getter, str | None] | LiteralValue) -> Predicate:
    ledm = left.edm if isinstance(left, LiteralValue) else left[1]
    redm = right.edm if isinstance(right, LiteralValue) else right[1]
    _check_types(op, ledm, redm, left, right)
    kind = ledm or redm
    get_l = _operand_getter(left, kind)
    get_r = _operand_getter(right, kind)
    compare = _COMPARE[op]

    def pred(row: Mapping[str, Any]) -> bool:
        a, b = get_l(row), get_r(row)
        if a is None or b is None:
            return (a is None and b is None) if op == "eq" else (
                (a is None) != (b is None) if op == "ne" else False)
        try:
            return bool(compare(a, b))
        except TypeError:
            return False

    return pred


def _check_types(op: str, ledm: str | None, redm: str | None, left: object,
                 right: object) -> None:
    if ledm is None or redm is None or ledm == redm:
        return
    if {ledm, redm} <= _NUMERIC or {ledm, redm} <= _TEMPORAL:
        return
    # Untyped paths (metadata) compare with anything of a matching Python type.
    if (not isinstance(left, LiteralValue) and left[1] is None) or (  # type: ignore[index]
            not isinstance(right, LiteralValue) and right[1] is None):  # type: ignore[index]
        return
    raise bad_query(f"A binary operator with incompatible types was detected. Found operand "
                    f"types '{ledm}' and '{redm}' for operator kind '{_OP_NAMES[op]}'.")


def _operand_getter(operand: tuple[Getter, str | None] | LiteralValue,
                    kind: str | None) -> Getter:
    if isinstance(operand, LiteralValue):
        value = _normalize(operand.value, kind)
        return lambda _row: value
    getter = operand[0]
    return lambda row: _normalize(getter(row), kind)


def _normalize(value: Any, kind: str | None) -> Any:
    """Bring a stored value or a literal to a comparable Python value."""
    if value is None:
        return None
    if isinstance(value, str):
        if kind in _TEMPORAL:
            try:
                return parse_datetime(value) if "T" in value else _midnight(date.fromisoformat(value))
            except ValueError:
                return value
        return value.casefold()
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return _midnight(value)
    return value


def _midnight(value: date) -> datetime:
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
}


# -- $orderby and $select -----------------------------------------------------------------------


def compile_orderby(text: str, resolve: Resolver,
                    tiebreak: Getter) -> Callable[[Mapping[str, Any]], Any]:
    """Compile ``$orderby`` into a sort key (ties broken by ``tiebreak`` ascending).

    Args:
        text: ``name asc, createdon desc``.
        resolve: Resolves property names.
        tiebreak: Reads the primary key.

    Returns:
        A key function for ``sorted``.

    Raises:
        ODataError: unknown property or direction.
    """
    terms: list[tuple[Getter, str | None, bool]] = []
    for part in (p.strip() for p in text.split(",")):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] not in ("asc", "desc")):
            raise bad_query(f"Syntax error in $orderby '{text}'.")
        getter, edm = resolve(words[0])
        terms.append((getter, edm, len(words) == 2 and words[1] == "desc"))

    def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
        for getter, edm, desc in terms:
            x, y = _normalize(getter(a), edm), _normalize(getter(b), edm)
            if x == y:
                continue
            if x is None or y is None:
                result = -1 if x is None else 1
            else:
                try:
                    result = -1 if x < y else 1
                except TypeError:
                    result = -1 if str(x) < str(y) else 1
            return -result if desc else result
        ta, tb = tiebreak(a), tiebreak(b)
        return 0 if ta == tb else (-1 if ta < tb else 1)

    return functools.cmp_to_key(compare)


def split_select(text: str) -> list[str]:
    """The property names of ``$select`` (empty when blank)."""
    return [p.strip() for p in text.split(",") if p.strip()]

"""Filter expressions: which records of a source take part in a link direction.

A link's ``filter`` (the *Sync Filter*) and ``b2a.filter`` (the *Upload Filter*)
are small boolean expressions over one record, for example::

    statecode == 0 and country in ["SK", "CZ"]
    _parentcustomerid_value is not null and not startswith(lower(name), "test")
    creditlimit >= 1000.50 or modifiedon > "2024-01-01T00:00:00Z"

The text is tokenized and parsed by hand (recursive descent) into a small tree,
which is compiled once into closures; nothing of the user's text is ever given to
``eval``, ``exec`` or ``compile``. :func:`compile_filter` returns a :class:`Filter`
whose :meth:`Filter.matches` is total: it never raises, whatever the record holds.

Grammar (keywords and function names are case-insensitive)::

    filter     := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | comparison
    comparison := value [ ("==" | "!=" | "<" | "<=" | ">" | ">=") value
                        | ["not"] "in" list
                        | "is" ["not"] "null" ]
    value      := field | number | string | "true" | "false" | "null"
                | "-" number | function "(" value ("," value)* ")" | "(" or ")"
    list       := "[" [literal ("," literal)* [","]] "]"

* A **field** is a bare name: letters, digits and ``_``, not starting with a digit
  (``_parentcustomerid_value``). A field absent from the record is null.
* **Literals**: integers and decimals (``12``, ``-3.5``, ``1e3``), strings in single
  or double quotes with backslash escapes (``\\\\ \\' \\" \\n \\r \\t \\0 \\uXXXX``),
  ``true``, ``false``, ``null``; lists only after ``in``.
* **Functions**: ``startswith(s, prefix)``, ``endswith(s, suffix)``,
  ``contains(s, part)`` (text only, otherwise false; ``contains`` also finds an
  element of a list value), ``lower(s)``, ``upper(s)`` (other values pass
  unchanged), ``len(x)`` (of text or a list, otherwise null) and ``number(x)``
  (a number, or decimal text as a number, otherwise null).

Semantics (SQL-like: evaluation never raises, a comparison that makes no sense is
false):

* ``== null`` is ``is null``; ``!=`` is exactly ``not ==``, so ``status != 2`` is
  true for a record whose status is null.
* Ordering (``< <= > >=``) with null, a boolean, or values of different kinds is
  false. Booleans equal only booleans.
* Numbers compare as numbers, exactly (``12.50 == 12.5``). Decimal text such as
  ``"12.50"`` (how change events carry NUMERIC values) compares as a number when
  the other side is a number; two texts compare as text (``number(x)`` converts).
* Two texts that both look like ISO 8601 dates or datetimes (``2024-05-01``,
  ``2024-05-01T08:30:00Z``) compare as points in time (a time without an offset
  is UTC); ``date``/``datetime`` values do the same. Other texts compare exactly,
  case-sensitively, by code point (use ``lower()`` to ignore case).
* A value used as a condition (``active and ...``) is true only when it is the
  boolean ``true``.
* ``x in [a, b]`` is ``x == a or x == b``.

Limits: :data:`MAX_LENGTH` characters and :data:`MAX_DEPTH` levels of nesting, so
that hostile text cannot exhaust memory or the stack. Errors are
:class:`FilterSyntaxError` (a ``ValueError``) naming the problem and its column,
with a caret under the spot and a hint for the usual mistakes (``=``, ``&&``,
``||``, ``<>``).
"""

from __future__ import annotations

import difflib
import operator
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeAlias

__all__ = [
    "FUNCTIONS",
    "Filter",
    "FilterSyntaxError",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "compile_filter",
]

#: Longest filter text accepted, in characters.
MAX_LENGTH = 2000
#: Deepest nesting of parentheses, ``not`` and function calls accepted.
MAX_DEPTH = 32
#: Widest part of the filter shown above the caret of an error.
_SNIPPET_WIDTH = 72

Record = Mapping[str, Any]
Eval = Callable[[Record], Any]

# --------------------------------------------------------------------- errors


class FilterSyntaxError(ValueError):
    """A filter text that does not parse.

    Attributes:
        problem: What is wrong, with the position (``unexpected ')' at column 14``).
        text: The filter text.
        position: 0-based index of the offending character, or None (whole text).
        line, column: 1-based position (0 when ``position`` is None).
    """

    def __init__(self, problem: str, *, text: str, position: int | None = None,
                 hint: str | None = None) -> None:
        self.text = text
        self.position = position
        self.line, self.column, source_line = _locate(text, position)
        if position is not None:
            where = f"line {self.line}, column {self.column}" if "\n" in text else \
                f"column {self.column}"
            problem = f"{problem} at {where}"
        if hint:
            problem = f"{problem} ({hint})"
        self.problem = problem
        message = problem
        if position is not None:
            message += "\n" + _caret(source_line, self.column)
        super().__init__(message)


def _locate(text: str, position: int | None) -> tuple[int, int, str]:
    if position is None:
        return 0, 0, ""
    line_start = text.rfind("\n", 0, position) + 1
    line_end = text.find("\n", position)
    line = text[line_start:] if line_end < 0 else text[line_start:line_end]
    return text.count("\n", 0, position) + 1, position - line_start + 1, line


def _caret(line: str, column: int) -> str:
    """Two lines: the (windowed) source line and a ``^`` under ``column``."""
    line = line.replace("\t", " ")
    start = 0
    if len(line) > _SNIPPET_WIDTH:
        start = max(0, min(column - 1 - _SNIPPET_WIDTH // 2, len(line) - _SNIPPET_WIDTH))
    shown = line[start:start + _SNIPPET_WIDTH]
    prefix = "…" if start else ""
    suffix = "…" if start + _SNIPPET_WIDTH < len(line) else ""
    pad = len(prefix) + column - 1 - start
    return f"  {prefix}{shown}{suffix}\n  {' ' * pad}^"


# ------------------------------------------------------------------ tokenizer

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"\d+(\.\d+)?([eE][+-]?\d+)?", re.ASCII)
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "(", ")", "[", "]", ",", "-")
#: Operators from other languages, and what to write instead.
_MISTAKES = {
    "<>": "did you mean '!='?", "=": "did you mean '=='?", "!": "did you mean 'not'?",
    "&&": "did you mean 'and'?", "||": "did you mean 'or'?",
    "&": "did you mean 'and'?", "|": "did you mean 'or'?",
    ".": "attribute access is not supported; a field is a plain name such as "
         "_parentcustomerid_value",
}
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t", "0": "\0"}
_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "null", "true", "false"})


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "name", "keyword", "number", "string", "op" or "end"
    text: str
    position: int
    value: Any = None

    def describe(self) -> str:
        return "end of the filter" if self.kind == "end" else f"'{self.text}'"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "'\"":
            value, end = _read_string(text, i)
            tokens.append(_Token("string", text[i:end], i, value))
            i = end
        elif match := _NUMBER.match(text, i):
            tokens.append(_Token("number", match.group(), i, _number_literal(text, match)))
            i = match.end()
        elif match := _NAME.match(text, i):
            word = match.group()
            kind = "keyword" if word.lower() in _KEYWORDS else "name"
            tokens.append(_Token(kind, word, i, word.lower() if kind == "keyword" else word))
            i = match.end()
        else:
            op = _operator_at(text, i)
            tokens.append(_Token("op", op, i))
            i += len(op)
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _operator_at(text: str, i: int) -> str:
    if text.startswith("<>", i):  # before '<', which would read it as '<' then '>'
        raise FilterSyntaxError("unexpected '<>'", text=text, position=i, hint=_MISTAKES["<>"])
    for op in _OPERATORS:
        if text.startswith(op, i):
            return op
    if text[i] == "." and _looks_decimal(text, i):
        raise FilterSyntaxError("unexpected '.'", text=text, position=i,
                                hint="write a decimal with digits on both sides, e.g. 0.5")
    for mistake in _MISTAKES:
        if text.startswith(mistake, i):
            raise FilterSyntaxError(f"unexpected '{mistake}'", text=text, position=i,
                                    hint=_MISTAKES[mistake])
    hint = "arithmetic is not supported" if text[i] in "+*/%" else None
    raise FilterSyntaxError(f"unexpected character {text[i]!r}", text=text, position=i,
                            hint=hint)


def _looks_decimal(text: str, dot: int) -> bool:
    """Whether the '.' at ``dot`` belongs to a malformed number (``1.``, ``.5``), not a name."""
    start = dot
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    before = text[start:dot]
    return before.isdigit() or (not before and text[dot + 1:dot + 2].isdigit())


def _number_literal(text: str, match: re.Match[str]) -> int | Decimal:
    if not (match.group(1) or match.group(2)):
        return int(match.group())
    number = _parse_number(match.group())
    if number is None:
        raise FilterSyntaxError(f"number {match.group()} is out of range", text=text,
                                position=match.start())
    return number


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The value of the string literal opening at ``start``, and the index after it."""
    quote, i = text[start], start + 1
    out: list[str] = []
    while i < len(text):
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\" and i + 1 < len(text):
            out.append(_read_escape(text, i))
            i += 6 if text.startswith("\\u", i) else 2
        else:
            out.append(ch)
            i += 1
    raise FilterSyntaxError("unterminated string", text=text, position=start,
                            hint=f"close it with {quote}")


def _read_escape(text: str, i: int) -> str:
    code = text[i + 1:i + 2]
    if code in _ESCAPES:
        return _ESCAPES[code]
    if code == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", text[i + 2:i + 6]):
        return chr(int(text[i + 2:i + 6], 16))
    if code == "u":
        raise FilterSyntaxError("bad escape '\\u'", text=text, position=i,
                                hint="write \\u and 4 hex digits, e.g. \\u00e9")
    raise FilterSyntaxError(f"unknown escape '\\{code}'", text=text, position=i,
                            hint="known escapes: \\\\ \\' \\\" \\n \\r \\t \\0 \\uXXXX")


# ---------------------------------------------------------------- syntax tree


@dataclass(frozen=True, slots=True)
class _Field:
    name: str


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Any


@dataclass(frozen=True, slots=True)
class _Call:
    name: str
    args: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Compare:
    op: str
    left: _Node
    right: _Node


@dataclass(frozen=True, slots=True)
class _In:
    operand: _Node
    values: tuple[Any, ...]
    negate: bool


@dataclass(frozen=True, slots=True)
class _IsNull:
    operand: _Node
    negate: bool


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node


@dataclass(frozen=True, slots=True)
class _BoolOp:
    op: str  # "and" or "or"
    operands: tuple[_Node, ...]


_Node: TypeAlias = _Field | _Literal | _Call | _Compare | _In | _IsNull | _Not | _BoolOp

_COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")


class _Parser:
    """Recursive descent over the tokens; one method per grammar rule."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0
        self.fields: set[str] = set()

    # -- helpers
    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def at(self, kind: str, *values: str) -> bool:
        token = self.token
        return token.kind == kind and (not values or
                                       (token.value if kind == "keyword" else token.text) in values)

    def error(self, problem: str, token: _Token, hint: str | None = None) -> FilterSyntaxError:
        return FilterSyntaxError(problem, text=self.text, position=token.position, hint=hint)

    def unexpected(self, hint: str | None = None) -> FilterSyntaxError:
        return self.error(f"unexpected {self.token.describe()}", self.token, hint)

    def expect(self, op: str, opener: _Token | None = None) -> None:
        if self.at("op", op):
            self.advance()
            return
        hint = f"expected '{op}'"
        if opener is not None:
            hint += f" to close the '{opener.text}' at column {opener.position + 1}"
        raise self.unexpected(hint)

    def nest(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep", token,
                             "simplify the filter")

    # -- rules
    def parse(self) -> _Node:
        if self.token.kind == "end":
            raise FilterSyntaxError("the filter is empty", text=self.text,
                                    hint="write a condition such as statecode == 0")
        node = self.parse_or()
        if self.token.kind != "end":
            hint = None
            if self.token.kind in ("name", "string", "number") or self.at("op", "("):
                hint = "missing 'and' or 'or'?"
            elif self.at("op", "["):
                hint = "subscripts are not supported; a field is a plain name"
            elif self.at("op", "-"):
                hint = "arithmetic is not supported"
            raise self.unexpected(hint)
        return node

    def parse_or(self) -> _Node:
        return self.parse_bool("or", self.parse_and)

    def parse_and(self) -> _Node:
        return self.parse_bool("and", self.parse_not)

    def parse_bool(self, op: str, operand: Callable[[], _Node]) -> _Node:
        operands = [operand()]
        while self.at("keyword", op):
            self.advance()
            operands.append(operand())
        return operands[0] if len(operands) == 1 else _BoolOp(op, tuple(operands))

    def parse_not(self) -> _Node:
        if not self.at("keyword", "not"):
            return self.parse_comparison()
        self.nest(self.advance())
        node = _Not(self.parse_not())
        self.depth -= 1
        return node

    def parse_comparison(self) -> _Node:
        left = self.parse_value()
        if self.at("op", *_COMPARISONS):
            op = self.advance().text
            node: _Node = _Compare(op, left, self.parse_value())
        elif self.at("keyword", "in", "not"):
            negate = self.advance().value == "not"
            if negate and not self.at("keyword", "in"):
                raise self.unexpected("expected 'in' after 'not'")
            if negate:
                self.advance()
            node = _In(left, self.parse_list(), negate)
        elif self.at("keyword", "is"):
            node = self.parse_is(left)
        else:
            return left
        if self.at("op", *_COMPARISONS) or self.at("keyword", "in", "is"):
            raise self.unexpected("comparisons cannot be chained; write a < b and b < c")
        return node

    def parse_is(self, left: _Node) -> _Node:
        self.advance()
        negate = self.at("keyword", "not")
        if negate:
            self.advance()
        if not self.at("keyword", "null"):
            raise self.unexpected("'is' takes only null: write 'is null' or 'is not null'")
        self.advance()
        return _IsNull(left, negate)

    def parse_value(self) -> _Node:
        token = self.token
        if token.kind in ("number", "string"):
            self.advance()
            return _Literal(token.value)
        if token.kind == "keyword" and token.value in ("true", "false", "null"):
            self.advance()
            return _Literal({"true": True, "false": False, "null": None}[token.value])
        if token.kind == "name":
            return self.parse_name()
        if self.at("op", "-"):
            return self.parse_negative()
        if self.at("op", "("):
            return self.parse_group()
        if self.at("op", "["):
            raise self.unexpected("a list can only follow 'in' or 'not in'")
        raise self.unexpected("expected a value: a field, a literal or a function call")

    def parse_negative(self) -> _Node:
        self.advance()
        if self.token.kind != "number":
            raise self.unexpected("'-' is only allowed before a number")
        return _Literal(-self.advance().value)

    def parse_group(self) -> _Node:
        opener = self.advance()
        self.nest(opener)
        node = self.parse_or()
        self.expect(")", opener)
        self.depth -= 1
        return node

    def parse_name(self) -> _Node:
        token = self.advance()
        if not self.at("op", "("):
            if token.text == "None":
                raise self.error("unexpected 'None'", token, "did you mean 'null'?")
            self.fields.add(token.text)
            return _Field(token.text)
        return self.parse_call(token)

    def parse_call(self, name: _Token) -> _Node:
        function = name.text.lower()
        if function not in FUNCTIONS:
            close = difflib.get_close_matches(function, FUNCTIONS, n=1)
            hint = (f"did you mean '{close[0]}'? " if close else "") + \
                "known: " + ", ".join(sorted(FUNCTIONS))
            raise self.error(f"unknown function '{name.text}'", name, hint)
        opener = self.advance()
        self.nest(opener)
        args = [self.parse_value()]
        while self.at("op", ","):
            self.advance()
            args.append(self.parse_value())
        self.expect(")", opener)
        self.depth -= 1
        arity = FUNCTIONS[function][0]
        if len(args) != arity:
            plural = "argument" if arity == 1 else "arguments"
            raise self.error(f"{function}() takes {arity} {plural}, got {len(args)}", name)
        return _Call(function, tuple(args))

    def parse_list(self) -> tuple[Any, ...]:
        if not self.at("op", "["):
            raise self.unexpected("expected a list after 'in', e.g. in [1, 2]")
        opener = self.advance()
        values: list[Any] = []
        while not self.at("op", "]"):
            node = self.parse_value()
            if not isinstance(node, _Literal):
                raise self.error("a list holds only literals", self.tokens[self.index - 1])
            values.append(node.value)
            if not self.at("op", ","):
                break
            self.advance()
        self.expect("]", opener)
        return tuple(values)


# ------------------------------------------------------------------ semantics

_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_ISO_TEXT = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}(?::\d{2}(?::\d{2}(?:[.,]\d+)?)?)?"
    r"(?:Z|[+-]\d{2}(?::?\d{2})?)?)?", re.ASCII)
#: Longer texts are never numbers or datetimes (and stay out of the parse caches).
_MAX_PARSED = 100
_ORDER: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _text_number(text: str) -> Decimal | None:
    return _parse_number(text) if len(text) <= _MAX_PARSED else None


def _text_time(text: str) -> datetime | None:
    return _parse_time(text) if len(text) <= _MAX_PARSED else None


@lru_cache(maxsize=4096)
def _parse_number(text: str) -> Decimal | None:
    if not _DECIMAL_TEXT.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except ArithmeticError:  # an exponent beyond what decimal supports
        return None


@lru_cache(maxsize=4096)
def _parse_time(text: str) -> datetime | None:
    if not _ISO_TEXT.fullmatch(text):
        return None
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError:  # the shape is right but not the values (month 13)
        return None


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _as_time(value: Any) -> datetime | None:
    if isinstance(value, str):
        return _text_time(value)
    if isinstance(value, datetime):
        return _aware(value)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return None


def _comparable(a: Any, b: Any) -> tuple[Any, Any] | None:
    """``a`` and ``b`` in forms that compare meaningfully, or None when they don't."""
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return None
    a = str(a) if isinstance(a, uuid.UUID) else a
    b = str(b) if isinstance(b, uuid.UUID) else b
    if _is_number(a):
        other = b if _is_number(b) else _text_number(b) if isinstance(b, str) else None
        return None if other is None else (a, other)
    if _is_number(b):
        other = _text_number(a) if isinstance(a, str) else None
        return None if other is None else (other, b)
    time_a, time_b = _as_time(a), _as_time(b)
    if time_a is not None and time_b is not None:
        return time_a, time_b
    if isinstance(a, str) and isinstance(b, str):
        return a, b
    return None


def _known(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, Decimal, str, date, uuid.UUID))


def _equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    pair = _comparable(a, b)
    try:
        if pair is not None:
            return bool(pair[0] == pair[1])
        # Values of kinds the language knows only equal their own kind; anything
        # else (a list or object field) falls back to Python equality.
        return not (_known(a) or _known(b)) and bool(a == b)
    except Exception:  # noqa: BLE001 - a record value's __eq__ must not break a filter
        return False


def _order(op: str, a: Any, b: Any) -> bool:
    pair = _comparable(a, b)
    if pair is None:
        return False
    try:
        return bool(_ORDER[op](*pair))
    except (TypeError, ArithmeticError):  # Decimal NaN, etc.
        return False


def _startswith(s: Any, part: Any) -> bool:
    return isinstance(s, str) and isinstance(part, str) and s.startswith(part)


def _endswith(s: Any, part: Any) -> bool:
    return isinstance(s, str) and isinstance(part, str) and s.endswith(part)


def _contains(s: Any, part: Any) -> bool:
    if isinstance(s, str):
        return isinstance(part, str) and part in s
    if isinstance(s, (list, tuple)):
        return any(_equal(item, part) for item in s)
    return False


def _lower(s: Any) -> Any:
    return s.lower() if isinstance(s, str) else s


def _upper(s: Any) -> Any:
    return s.upper() if isinstance(s, str) else s


def _len(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _number(value: Any) -> Any:
    if _is_number(value):
        return value
    return _text_number(value) if isinstance(value, str) else None


#: Function name → (number of arguments, implementation).
FUNCTIONS: Mapping[str, tuple[int, Callable[..., Any]]] = {
    "contains": (2, _contains),
    "endswith": (2, _endswith),
    "len": (1, _len),
    "lower": (1, _lower),
    "number": (1, _number),
    "startswith": (2, _startswith),
    "upper": (1, _upper),
}


# ------------------------------------------------------------------- compiler


def _get(name: str) -> Eval:
    def get(record: Record) -> Any:
        try:
            return record.get(name)
        except Exception:  # noqa: BLE001 - a broken mapping reads as an absent field
            return None
    return get


def _compile(node: _Node) -> Eval:
    """Closures for ``node``; every one is total (returns, never raises)."""
    match node:
        case _Field(name):
            return _get(name)
        case _Literal(value):
            return lambda record: value
        case _Call(name, args):
            return _compile_call(FUNCTIONS[name][1], [_compile(arg) for arg in args])
        case _Compare(op, left, right):
            return _compile_compare(op, _compile(left), _compile(right))
        case _In(operand, values, negate):
            return _compile_in(_compile(operand), values, negate)
        case _IsNull(operand, negate):
            value_of = _compile(operand)
            return lambda r: (value_of(r) is None) is not negate
        case _Not(operand):
            inner = _compile(operand)
            return lambda r: inner(r) is not True
        case _BoolOp(op, operands):
            return _compile_bool(op, tuple(_compile(o) for o in operands))
    raise AssertionError(f"unknown node {node!r}")  # pragma: no cover


def _compile_call(function: Callable[..., Any], args: Sequence[Eval]) -> Eval:
    if len(args) == 1:
        (arg,) = args
        return lambda r: function(arg(r))
    first, second = args
    return lambda r: function(first(r), second(r))


def _compile_in(value_of: Eval, values: tuple[Any, ...], negate: bool) -> Eval:
    def member(record: Record) -> bool:
        value = value_of(record)
        return any(_equal(value, v) for v in values) != negate
    return member


def _compile_compare(op: str, left: Eval, right: Eval) -> Eval:
    if op == "==":
        return lambda r: _equal(left(r), right(r))
    if op == "!=":
        return lambda r: not _equal(left(r), right(r))
    return lambda r: _order(op, left(r), right(r))


def _compile_bool(op: str, operands: tuple[Eval, ...]) -> Eval:
    if op == "and":
        def all_true(record: Record) -> bool:
            return all(operand(record) is True for operand in operands)
        return all_true

    def any_true(record: Record) -> bool:
        return any(operand(record) is True for operand in operands)
    return any_true


# ----------------------------------------------------------------------- API


@dataclass(frozen=True, slots=True)
class Filter:
    """A compiled filter expression.

    Attributes:
        text: The expression as written.
        fields: The field names it reads (to check against the entity's metadata).
    """

    text: str
    fields: frozenset[str]
    _evaluate: Eval = field(repr=False, compare=False)

    def matches(self, record: Record) -> bool:
        """Whether ``record`` passes the filter.

        Args:
            record: Field name → value (absent fields are null).

        Returns:
            True when the expression evaluates to ``true``. Never raises.
        """
        return self._evaluate(record) is True


def compile_filter(text: str) -> Filter:
    """Parse and compile a filter expression (grammar and semantics: module docstring).

    Args:
        text: The expression, at most :data:`MAX_LENGTH` characters.

    Returns:
        The compiled :class:`Filter`.

    Raises:
        FilterSyntaxError: The text is empty, too long, too deeply nested, or does
            not parse; the message names the problem and its column.
    """
    if len(text) > MAX_LENGTH:
        raise FilterSyntaxError(
            f"the filter is {len(text)} characters long, more than the limit of {MAX_LENGTH}",
            text=text)
    parser = _Parser(text)
    tree = parser.parse()
    return Filter(text, frozenset(parser.fields), _compile(tree))

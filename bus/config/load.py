"""Loading the YAML config file: interpolation, validation, located error messages.

``load_config`` reads the file, interpolates ``${VAR}``, ``${VAR:-default}`` and
``${file:/run/secrets/name}`` in string values, validates the result against
``schemas.config.SyncConfig`` and returns a :class:`LoadedConfig` that remembers the
line of every key, so any later check can point at the file. Every problem is one
line, ``FILE:LINE: links.customers.key: message``; a secret's value never appears
in one.

A URL (any ``url`` or ``…_url`` key) whose user name or password needs
percent-encoding is refused here, before anything could connect with a half-parsed
URL (whose "host" would be a piece of the password): an unencoded ``@ / ? #`` makes
parsers disagree about where the password ends. That holds for a URL built from
``${VAR}`` / ``${file:…}`` too; the message names the references, never the value.

Line numbers come from PyYAML's composed node tree (each node's start mark); the
file is never parsed by hand.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bus.core.redact import MASK, redact_text, userinfo_problem
from connectors.base import ConfigError
from schemas.config import CONNECTION_TYPES, SyncConfig
from schemas.event import NAME_PATTERN

__all__ = ["LoadedConfig", "Loc", "format_loc", "load_config", "load_or_report", "report_problems"]

#: A path into the config: mapping keys and list indices, e.g. ("links", "crm", "key", 0).
Loc = tuple[str | int, ...]

#: Top-level keys starting with this are ignored (a place for YAML anchors).
_EXTENSION = "x-"
# Secrets shorter than this are not searched for in messages (too many false hits);
# messages never show interpolated inputs in the first place.
_MIN_SCRUB = 4
# Tags of the tagged unions in schemas.config; pydantic puts them into error paths.
_UNION_TAGS = frozenset({"name", "spec", "param", "sql"})
_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.S)
# Pydantic error types whose own wording is too technical.
_PLAIN = {
    **dict.fromkeys(("model_type", "model_attributes_type", "dict_type"), "must be a mapping"),
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "must be a whole number"),
    **dict.fromkeys(("float_type", "float_parsing"), "must be a number"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "must be true or false"),
    "list_type": "must be a list",
    "string_type": "must be text",
}
_STR_TAG = "tag:yaml.org,2002:str"
_REFS = re.compile(r"\$\{[^}]*\}")
_MERGE_TAG = "tag:yaml.org,2002:merge"


def format_loc(loc: Sequence[str | int]) -> str:
    """``("links", "crm", "key", 0)`` → ``links.crm.key[0]``.

    Args:
        loc: A config path.

    Returns:
        The path as shown in messages.
    """
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and where each of its keys is in the file.

    Args:
        config: The validated configuration.
        path: The file it was read from.
        lines: Config path (every part as text) → 1-based line of its key.
        secrets: Interpolated values, masked in every message made by :meth:`problem`.
    """

    config: SyncConfig
    path: Path
    lines: Mapping[tuple[str, ...], int] = field(default_factory=dict, repr=False)
    secrets: frozenset[str] = field(default=frozenset(), repr=False)

    def line_of(self, loc: Sequence[str | int]) -> int | None:
        """Line of ``loc`` in the file, or of its nearest parent that is written there.

        Args:
            loc: A config path such as ``("links", "customers", "fields", "name")``.

        Returns:
            The 1-based line, or None when not even the document has one.
        """
        parts = _text(loc)
        for end in range(len(parts), -1, -1):
            line = self.lines.get(parts[:end])
            if line is not None:
                return line
        return None

    def problem(self, loc: Sequence[str | int], message: str) -> str:
        """One located problem line: ``FILE:LINE: path: message``, secrets masked.

        Args:
            loc: Where the problem is.
            message: What is wrong, in words an integration engineer can act on.

        Returns:
            The formatted line.
        """
        line = self.line_of(loc)
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        text = f"{where}: {format_loc(loc)}: {message}" if loc else f"{where}: {message}"
        return self.scrub(text)

    def scrub(self, text: str) -> str:
        """Mask URL passwords and every interpolated secret value in ``text``."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= _MIN_SCRUB:
                text = text.replace(secret, MASK)
        return redact_text(text)


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None,
                resolve_paths: bool = True) -> LoadedConfig:
    """Read, interpolate and validate a config file.

    Args:
        path: The YAML file.
        environ: Variables for ``${VAR}`` (default: ``os.environ``).
        resolve_paths: Take relative paths (CA bundles, certificates, state
            directories, SQLite files) from the file's directory, not the working
            directory (:meth:`~schemas.config.SyncConfig.resolve_paths`); off only to
            show the file as written (``config export``).

    Returns:
        The validated config with its line index.

    Raises:
        ConfigError: the file cannot be read, is not valid YAML, references a missing
            variable or secret file, or does not match the schema; ``problems`` holds
            one ``FILE:LINE: path: message`` line per finding.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise _invalid(path, [f"{path}: cannot read the config file: {reason}"]) from exc
    walker = _Walker(path, os.environ if environ is None else environ)
    data = walker.load(text)
    draft = LoadedConfig(SyncConfig.model_construct(), path, walker.lines, frozenset(walker.secrets))
    if walker.problems:
        raise _invalid(path, [draft.problem(loc, msg) for loc, msg in walker.problems])
    if not isinstance(data, dict):
        raise _invalid(path, [draft.problem((), "the file must be a mapping with `connections` "
                                                "and `links` at the top level")])
    data = {k: v for k, v in data.items() if not str(k).startswith(_EXTENSION)}
    try:
        config = SyncConfig.model_validate(data)
    except ValidationError as exc:
        found = [_humanize(err, data, walker.interpolated) for err in exc.errors()]
        found.sort(key=lambda item: draft.line_of(item[0]) or 0)
        raise _invalid(path, [draft.problem(loc, msg) for loc, msg in found]) from None
    if resolve_paths:
        config = config.resolve_paths(path.parent)
    return LoadedConfig(config, path, walker.lines, frozenset(walker.secrets))


def load_or_report(path: str | Path, echo: Callable[[str], None], *,
                   check_urls: bool = False) -> LoadedConfig | None:
    """Load the config at ``path``, or report why it cannot be used, as every command does.

    Args:
        path: The YAML file.
        echo: Prints one line (each command chooses stdout or stderr, plain or rich).
        check_urls: Also check every URL without connecting
            (:func:`bus.config.validate.check_urls`), as the commands that go on to
            connect do.

    Returns:
        The loaded config, or None after its problems were printed (exit code 2).
    """
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        report_problems(exc, echo)
        return None
    if check_urls:
        # Imported here: the URL checks need SQLAlchemy and kombu, loading does not.
        from bus.config.validate import check_urls as url_problems  # noqa: PLC0415

        problems = url_problems(loaded)
        if problems:
            report_problems(ConfigError(f"{path}: invalid configuration", problems), echo)
            return None
    return loaded


def report_problems(error: ConfigError, echo: Callable[[str], None]) -> None:
    """Print ``error``'s message, then each of its problems indented by two spaces."""
    echo(error.message)
    for problem in error.problems:
        echo(f"  {problem}")


def _text(loc: Sequence[str | int]) -> tuple[str, ...]:
    return tuple(str(p) for p in loc)


def _invalid(path: Path, problems: list[str]) -> ConfigError:
    count = len(problems)
    return ConfigError(f"{path}: invalid configuration ({count} problem{'s' * (count != 1)})",
                       problems)


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = ": ".join(p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return f"{where}: YAML syntax error: {what or exc}"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true and false.

    YAML 1.1 also reads ``yes``/``no``/``on``/``off`` as booleans, so a key field named
    ``No`` (Business Central's number field) became ``false``. Boolean settings still
    accept those words: the config models parse them.
    """


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


class _Walker:
    """Composes the YAML, indexes lines, interpolates string values, then constructs."""

    loader: yaml.SafeLoader

    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = path.parent
        self.environ = environ
        self.lines: dict[tuple[str, ...], int] = {}
        self.problems: list[tuple[Loc, str]] = []
        self.secrets: set[str] = set()
        self.interpolated: set[tuple[str, ...]] = set()
        self._done: dict[int, bool] = {}  # scalar node id → whether it was interpolated
        self._raw: dict[int, str] = {}  # scalar node id → its text before interpolation
        self._stack: set[int] = set()

    def load(self, text: str) -> Any:
        """The document's data ({} when empty; None when ``problems`` were found).

        Raises:
            ConfigError: the text is not valid YAML.
        """
        self.loader = loader = _ConfigLoader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return {}
            self.walk(root, ())
            return None if self.problems else loader.construct_document(root)
        except yaml.YAMLError as exc:
            raise _invalid(self.path, [_yaml_problem(self.path, exc)]) from None
        finally:
            loader.dispose()

    def walk(self, node: yaml.Node, loc: Loc) -> None:
        self.lines.setdefault(_text(loc), node.start_mark.line + 1)
        if id(node) in self._stack:  # a recursive alias
            return
        self._stack.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                self._mapping(node, loc)
            elif isinstance(node, yaml.SequenceNode):
                for index, item in enumerate(node.value):
                    self.walk(item, (*loc, index))
            elif isinstance(node, yaml.ScalarNode) and loc:
                self._scalar(node, loc)
        finally:
            self._stack.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, loc: Loc, merged: bool = False) -> None:
        seen: dict[str, int] = {}
        for key_node, value in node.value:
            if key_node.tag == _MERGE_TAG:
                for source in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                    if isinstance(source, yaml.MappingNode):
                        self._mapping(source, loc, merged=True)
                continue
            key = self._key(key_node)
            line = key_node.start_mark.line + 1
            if key in seen and not merged:
                self.problems.append(((*loc, key), f"duplicate key {key!r} (first at line "
                                                   f"{seen[key]}); remove one of them"))
            seen.setdefault(key, line)
            if not (merged and _text((*loc, key)) in self.lines):  # explicit keys win
                self.lines[_text((*loc, key))] = line
            self.walk(value, (*loc, key))

    def _key(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.ScalarNode):
            return str(self.loader.construct_object(node))
        return f"<{type(node).__name__} key>"

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> None:
        if node.tag != _STR_TAG:
            return
        if "${" in node.value and id(node) not in self._done:
            self._raw[id(node)] = node.value
            node.value, changed = self._interpolate(node.value, loc)
            self._done[id(node)] = changed
        if self._done.get(id(node)):
            self.interpolated.add(_text(loc))
        last = loc[-1]
        if isinstance(last, str) and (last == "url" or last.endswith("_url")):
            self._check_url(node, loc)

    def _check_url(self, node: yaml.ScalarNode, loc: Loc) -> None:
        """Refuse a URL whose credentials need percent-encoding (see module docstring)."""
        problem = userinfo_problem(node.value)
        if problem is None or any(where == loc for where, _ in self.problems):
            return  # a reference that did not resolve is the problem already reported
        refs = _REFS.findall(self._raw.get(id(node), "")) if self._done.get(id(node)) else []
        if refs:
            problem += (f"; the URL is built from {', '.join(dict.fromkeys(refs))}: write it "
                        "percent-encoded there")
        else:
            problem += "; better, keep it out of the file: ${VAR} or ${file:…}, percent-encoded"
        self.problems.append((loc, problem))

    def _interpolate(self, raw: str, loc: Loc) -> tuple[str, bool]:
        changed = False

        def replace(match: re.Match[str]) -> str:
            nonlocal changed
            if match.group(0) == "$${":
                return "${"
            expr = match.group(1)
            value = None if expr is None else self._resolve(expr, loc)
            if expr is None:
                self.problems.append((loc, "unterminated `${` (write `$${` for a literal `${`)"))
            if value is None:
                return match.group(0)
            changed = True
            if value:
                self.secrets.add(value)
            return value

        return _REF.sub(replace, raw), changed

    def _resolve(self, expr: str, loc: Loc) -> str | None:
        if expr.startswith("file:"):
            return self._read_secret(expr[5:].strip(), loc)
        match = _VAR.fullmatch(expr)
        if match is None:
            self.problems.append((loc, f"cannot interpolate ${{{expr}}}: write ${{VAR}}, "
                                       f"${{VAR:-default}} or ${{file:/path}}"))
            return None
        name, default = match.group(1), match.group(2)
        value = self.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is not None:
                return default
            self.problems.append((loc, f"environment variable {name} is not set (write "
                                       f"${{{name}:-default}} to give a default)"))
            return None
        return value

    def _read_secret(self, name: str, loc: Loc) -> str | None:
        path = Path(name) if Path(name).is_absolute() else self.base / name
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            self.problems.append((loc, f"cannot read secret file {path}: {reason}"))
            return None


# -- pydantic errors → readable messages --------------------------------------------------


def _humanize(error: Any, data: Any, interpolated: set[tuple[str, ...]]) -> tuple[Loc, str]:
    """A pydantic error as (config path, message); inputs of secrets are never shown."""
    loc, key_error = _clean_loc(error["loc"], data)
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    secret = _text(loc) in interpolated or (loc and loc[-1] == "url")
    got = "" if secret else _got(value)
    msg = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if key_error:
        return loc, f"invalid name {loc[-1]!r}: " + _name_rule(ctx)
    if kind == "extra_forbidden":
        return loc, _unknown_field(str(loc[-1]), loc[:-1])
    if kind == "missing":
        return loc, "required field is missing"
    if kind == "connection_type":
        if isinstance(value, dict) and "type" in value:
            known = ", ".join(CONNECTION_TYPES)
            return (*loc, "type"), f"unknown connection type {value['type']!r} (known: {known})"
        return loc, f"must be a mapping with `type` and `url`{got}"
    if kind in ("value_error", "assertion_error", "field_spec", "transform"):
        return loc, msg + ("" if kind.endswith("error") else got)
    if kind == "literal_error":
        return loc, f"must be {ctx.get('expected', '')}{got}"
    if kind == "string_pattern_mismatch":
        return loc, _name_rule(ctx) + got
    if kind == "too_short" and ctx.get("min_length") == 1:
        return loc, "must not be empty"
    if kind in _PLAIN:
        return loc, _PLAIN[kind] + got
    return loc, msg.replace("Input should be", "must be") + got


def _clean_loc(raw: Sequence[str | int], data: Any) -> tuple[Loc, bool]:
    """Drop union tags and ``[key]`` markers from a pydantic path (walking the input)."""
    out: list[str | int] = []
    node, key_error = data, False
    for part in raw:
        if part == "[key]":
            key_error = True
        elif _has(node, part):
            out.append(part)
            node = node[part]
        elif part not in _UNION_TAGS:
            out.append(part)
            node = None
    return tuple(out), key_error


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _got(value: Any) -> str:
    if isinstance(value, dict | list):
        return f" (got a {'mapping' if isinstance(value, dict) else 'list'})"
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return f" (got {text})" if len(text) <= 60 else ""


def _name_rule(ctx: Mapping[str, Any]) -> str:
    if ctx.get("pattern") == NAME_PATTERN:
        return "must start with a letter and hold only letters, digits, '_' and '-'"
    return f"must match {ctx.get('pattern')!r}"


def _unknown_field(name: str, parent: Loc) -> str:
    model = _model_at(parent)
    if model is None:
        return f"unknown field {name!r}"
    allowed = [f.alias or n for n, f in model.model_fields.items()]
    hint = difflib.get_close_matches(name, allowed, n=1)
    did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
    return f"unknown field {name!r} ({did_you_mean}allowed: {', '.join(allowed)})"


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The config model that a path points into, by walking the type annotations."""
    tp: Any = SyncConfig
    for part in loc:
        options = _members(tp)
        model = next((m for m in options if _is_model(m)), None)
        if model is not None and isinstance(part, str):
            field_ = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
            if field_ is not None:
                tp = field_.annotation
                continue
        container = next((m for m in options if typing.get_origin(m) in (dict, list)), None)
        if container is None:
            return None
        tp = typing.get_args(container)[-1]
    return next((m for m in _members(tp) if _is_model(m)), None)


def _members(tp: Any) -> list[Any]:
    """Flatten ``Annotated`` and unions into the plain types they admit."""
    if typing.get_origin(tp) is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)

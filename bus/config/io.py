"""The whole configuration as one canonical YAML file: ``syncbus config export|import``.

:func:`export_config` reads a config file the way every command does (interpolated
and validated) and writes it back in canonical form:

* **Secrets stay references.** A value written with ``${VAR}``, ``${VAR:-default}``
  or ``${file:…}`` is written exactly as it was, never its interpolated value. An
  inline secret — a password inside a URL, a literal ``client_secret`` or webhook
  ``client_state`` — is replaced by a ``${NAME}`` reference (``ERP_PASSWORD``,
  ``CRM_CLIENT_SECRET``…) and reported in :attr:`Exported.warnings`, which names
  the variable to set. The secret itself is never written nor shown.
* **Defaults are left out**, so files stay short; ``type`` is always written.
* **One form for everything**: a field spec with only ``from`` as its shorthand,
  durations with their largest exact unit (``7d``, ``15m``, ``500ms``), keys as
  lists, maps in the order of the file, models' keys in the order of the schema.
  Comments, anchors and ``x-`` keys are not kept.

The output is deterministic and a fixed point: exporting an export gives the same
bytes, so export → import → export is byte-identical.

:func:`import_config` validates a file fully (shape, references, URLs and, when
given a checker, the live systems) and only then writes its canonical form over
the target config, atomically, keeping the previous file as ``<target>.bak``.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, BeforeValidator, SecretStr

from bus.config.load import LoadedConfig, Loc, format_loc, load_config
from bus.config.validate import check_urls
from bus.core.redact import redact_url
from connectors.base import ConfigError
from schemas.config import FieldSpec, SyncConfig, parse_duration

__all__ = [
    "EXPORT_HEADER",
    "Exported",
    "Imported",
    "InlineSecret",
    "LiveCheck",
    "canonical_yaml",
    "export_config",
    "import_config",
    "inline_secrets",
    "raw_document",
]

#: First line of every exported file.
EXPORT_HEADER = ("# syncbus configuration, canonical form (syncbus config export): "
                 "comments and anchors are not kept\n")
#: ``check(loaded) -> problems``: validation against the live systems.
LiveCheck = Callable[[LoadedConfig], list[str]]

_REF = "${"
# A value that is a URL (a filter expression that merely quotes one is not).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# Secret query parameters of a URL (the names bus.core.redact masks).
_QUERY_SECRET = re.compile(
    r"(?i)(?<![A-Za-z0-9_])(password|passwd|pwd|secret|client_secret|token|access_token|"
    r"refresh_token|api_?key)=([^&;#]*)")
#: Longest field spec written on one line (``{from: name, transform: [strip]}``).
_FLOW_WIDTH = 100
_UNITS = ((86400.0, "d"), (3600.0, "h"), (60.0, "m"), (1.0, "s"), (0.001, "ms"))


@dataclass(frozen=True)
class Exported:
    """A config in canonical form.

    Args:
        text: The YAML text, ending in a newline.
        warnings: One line per inline secret replaced by a reference (what to set).
        config: The validated configuration it describes.
    """

    text: str
    warnings: list[str] = field(default_factory=list)
    config: SyncConfig | None = field(default=None, repr=False)


@dataclass(frozen=True)
class InlineSecret:
    """A secret written into the config file instead of a reference.

    Args:
        loc: Where, e.g. ``("connections", "erp", "url")``.
        what: What is inline, e.g. ``a password was written inline in the URL``.
        variable: The environment variable an export would reference instead.
    """

    loc: Loc
    what: str
    variable: str


def inline_secrets(loaded: LoadedConfig) -> list[InlineSecret]:
    """The secrets of ``loaded`` written inline rather than as ``${VAR}`` / ``${file:…}``.

    The same detection as :func:`export_config` (a password in a URL, ``?password=``,
    a literal ``client_secret`` or ``client_state``); nothing is written.

    Args:
        loaded: A loaded config (its file is read again without interpolation).

    Returns:
        One entry per inline secret, in the order of the schema.
    """
    raw = raw_document(loaded.path)
    writer = _Canonical()
    writer.model(loaded.config, raw if isinstance(raw, dict) else None, ())
    return writer.inline


@dataclass(frozen=True)
class Imported:
    """What :func:`import_config` did.

    Args:
        target: The config file written (or that would be written).
        changed: False when the target already held exactly this text.
        written: True when the file was written.
        backup: Where the previous version was kept, if there was one.
        warnings: Inline secrets replaced by references.
        diff: Unified diff of the target before → after.
    """

    target: Path
    changed: bool
    written: bool
    backup: Path | None = None
    warnings: list[str] = field(default_factory=list)
    diff: str = ""


def export_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Exported:
    """Read, validate and render ``path`` in canonical form.

    Args:
        path: The config file.
        environ: Variables for ``${VAR}`` (default: ``os.environ``); they must be set
            for validation, but only their names are written.

    Returns:
        The canonical text and the inline-secret warnings.

    Raises:
        ConfigError: the file is invalid (located problems) or a URL hides a secret
            in a form that cannot be turned into a reference.
    """
    loaded = load_config(path, environ=environ, resolve_paths=False)  # paths as written
    problems = check_urls(loaded)
    if problems:
        raise ConfigError(f"{loaded.path}: invalid configuration", problems)
    return canonical_yaml(loaded.config, raw_document(loaded.path))


def import_config(source: str | Path, target: str | Path, *, replace: bool = False,
                  dry_run: bool = False, live: LiveCheck | None = None,
                  environ: Mapping[str, str] | None = None) -> Imported:
    """Validate ``source`` fully, then write its canonical form to ``target``.

    Args:
        source: The file to import (e.g. an earlier export).
        target: The config file to write.
        replace: Overwrite a ``target`` that exists with other content.
        dry_run: Validate and compute the diff, write nothing.
        live: Checks against the live systems; None skips them.
        environ: Variables for ``${VAR}`` (default: ``os.environ``).

    Returns:
        What was (or would be) written.

    Raises:
        ConfigError: ``source`` is invalid, fails the live checks, or ``target``
            exists with other content and ``replace`` is not set.
    """
    exported = export_config(source, environ=environ)
    target = Path(target)
    if live is not None:
        loaded = load_config(source, environ=environ)
        problems = live(loaded)
        if problems:
            raise ConfigError(f"{source}: invalid configuration", problems)
    before = target.read_text(encoding="utf-8") if target.exists() else None
    diff = "".join(difflib.unified_diff(
        (before or "").splitlines(keepends=True), exported.text.splitlines(keepends=True),
        fromfile=f"{target} (now)", tofile=f"{target} (imported)"))
    if before == exported.text or dry_run:
        return Imported(target, before != exported.text, False, None, exported.warnings, diff)
    if before is not None and not replace:
        raise ConfigError(f"{target} exists and differs from {source}: pass --replace to "
                          f"overwrite it (the current file is kept as {target}.bak) or "
                          "--dry-run to see the difference")
    backup = None
    if before is not None:
        backup = target.with_name(target.name + ".bak")
        backup.write_text(before, encoding="utf-8")
    _write_atomically(target, exported.text)
    return Imported(target, True, True, backup, exported.warnings, diff)


def canonical_yaml(config: SyncConfig, raw: Any) -> Exported:
    """Render ``config`` canonically, keeping the references written in ``raw``.

    Args:
        config: The validated (interpolated) configuration.
        raw: The same document parsed without interpolation (None: nothing kept).

    Returns:
        The text and the inline-secret warnings.

    Raises:
        ConfigError: a URL hides a secret that cannot be replaced by a reference.
    """
    writer = _Canonical()
    data = writer.model(config, raw if isinstance(raw, dict) else None, ())
    if writer.problems:
        raise ConfigError("the configuration holds secrets that cannot be exported",
                          writer.problems)
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=1_000_000)
    return Exported(EXPORT_HEADER + text, writer.warnings, config)


# -- the canonical form --------------------------------------------------------------------


class _Flow(list[Any]):
    """A list written in flow style: ``[id]``."""


class _FlowMap(dict[str, Any]):
    """A mapping written in flow style: ``{connection: crm, entity: customers}``."""


class _Dumper(yaml.SafeDumper):
    """Safe YAML with short lists and endpoints on one line."""


_Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(_FlowMap, lambda d, v: d.represent_mapping(
    "tag:yaml.org,2002:map", v.items(), flow_style=True))


class _Canonical:
    """Walks a validated config beside its raw document; collects warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.problems: list[str] = []
        self.inline: list[InlineSecret] = []
        self._names: dict[str, str] = {}  # generated variable → the secret it stands for

    def model(self, model: BaseModel, raw: Mapping[str, Any] | None, loc: Loc) -> Any:
        cls = type(model)
        durations = _duration_fields(cls)
        out: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            key = info.alias or name
            value = getattr(model, name)
            sub = None if raw is None else raw.get(key, raw.get(name))
            if not self._keep(model, name, value, sub):
                continue
            out[key] = self.value(value, sub, (*loc, key), duration=name in durations)
        if "type" in out:  # the discriminator first, whatever the class hierarchy
            out = {"type": out.pop("type"), **out}
        if isinstance(model, FieldSpec):
            if list(out) == ["from"] and isinstance(out["from"], str):
                return out["from"]  # the shorthand `target: source`
            return _short(_FlowMap(out), out)
        if set(out) == {"connection", "entity"}:
            return _FlowMap(out)
        return out

    def value(self, value: Any, raw: Any, loc: Loc, *, duration: bool = False) -> Any:
        if isinstance(raw, str) and _REF in raw:  # a reference: written as it was
            return self._url(raw, loc) if _URL.match(raw) else raw
        if isinstance(value, BaseModel):
            return self.model(value, raw if isinstance(raw, dict) else None, loc)
        if isinstance(value, SecretStr):
            return self._secret_reference(loc, value.get_secret_value())
        if isinstance(value, dict):
            lookup = _by_text(raw)
            return {k: self.value(v, lookup.get(str(k)), (*loc, k), duration=duration)
                    for k, v in value.items()}
        if isinstance(value, list):
            items = [self.value(v, raw[i] if isinstance(raw, list) and i < len(raw) else None,
                                (*loc, i), duration=duration) for i, v in enumerate(value)]
            scalar = all(not isinstance(i, dict | list) for i in items)
            return _Flow(items) if scalar else items
        if duration and isinstance(value, float):
            return _duration_text(value)
        if isinstance(value, str) and _URL.match(value):
            return self._url(value, loc)
        return value

    @staticmethod
    def _keep(model: BaseModel, name: str, value: Any, raw: Any) -> bool:
        info = type(model).model_fields[name]
        if name == "type" or info.is_required() or _has_ref(raw):
            return True
        if isinstance(model, FieldSpec) and name == "const":
            return model.has_const  # `const: null` is a value
        return bool(value != info.get_default(call_default_factory=True))

    def _url(self, url: str, loc: Loc) -> str:
        """``url`` with an inline password (userinfo or query) turned into a reference."""
        try:
            parts = urlsplit(url)
            password = parts.password
        except ValueError:
            password = None
            parts = None
        if parts is not None and password and _REF not in password:
            var = self._variable(_url_variable(loc), password)
            url = urlunsplit(_with_password(parts, "${" + var + "}"))
            self._warn(loc, "a password was written inline in the URL", var)
        for match in reversed(list(_QUERY_SECRET.finditer(url))):
            if match.group(2) and _REF not in match.group(2):
                var = self._variable(_url_variable(loc, match.group(1)), match.group(2))
                url = url[:match.start(2)] + "${" + var + "}" + url[match.end(2):]
                self._warn(loc, f"`{match.group(1)}=` was written inline in the URL", var)
        if redact_url(_without_refs(url)) != _without_refs(url):
            self.problems.append(f"{format_loc(loc)}: the URL holds a secret that cannot be "
                                 "turned into a reference: write it as ${VAR} in the file")
        return url

    def _secret_reference(self, loc: Loc, secret: str) -> str:
        var = self._variable(_variable(loc), secret)
        self._warn(loc, "a secret was written inline", var)
        return "${" + var + "}"

    def _variable(self, wanted: str, secret: str) -> str:
        """A variable name for ``secret``; the same secret at two places shares one."""
        name, count = wanted, 1
        while name in self._names and self._names[name] != secret:
            count += 1
            name = f"{wanted}_{count}"
        self._names[name] = secret
        return name

    def _warn(self, loc: Loc, what: str, var: str) -> None:
        self.inline.append(InlineSecret(loc, what, var))
        self.warnings.append(
            f"{format_loc(loc)}: {what}; written as ${{{var}}} instead: set the environment "
            f"variable {var} to it wherever syncbus runs (or write ${{file:/run/secrets/...}})")


# -- helpers --------------------------------------------------------------------------------


def _short(flow: _FlowMap, block: dict[str, Any]) -> dict[str, Any]:
    """``flow`` when it fits on one line of about 100 characters, else ``block``."""
    text = yaml.dump(flow, Dumper=_Dumper, width=1_000_000, allow_unicode=True)
    return flow if len(text) <= _FLOW_WIDTH and "\n" not in text.rstrip("\n") else block


def raw_document(path: str | Path) -> Any:
    """The config document parsed without interpolation (``x-`` keys dropped).

    Returns:
        The data, references left as written; None when the file cannot be read.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not str(k).startswith("x-")}
    return data


def _has_ref(raw: Any) -> bool:
    if isinstance(raw, str):
        return _REF in raw
    if isinstance(raw, dict):
        return any(_has_ref(v) for v in raw.values())
    if isinstance(raw, list):
        return any(_has_ref(v) for v in raw)
    return False


def _by_text(raw: Any) -> dict[str, Any]:
    """Raw mapping keys as the models hold them (YAML ``1:`` → ``"1"``)."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for key, value in raw.items():
        text = ("true" if key else "false") if isinstance(key, bool) else str(key)
        if isinstance(key, float) and key.is_integer():
            text = str(int(key))
        out[text] = value
    return out


@cache
def _duration_fields(cls: type[BaseModel]) -> frozenset[str]:
    """Fields of ``cls`` typed ``Duration`` (also inside a list or an optional)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return frozenset(n for n in cls.model_fields if n in hints and _is_duration(hints[n]))


def _is_duration(tp: Any) -> bool:
    if typing.get_origin(tp) is typing.Annotated:
        extras = tp.__metadata__
        if any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in extras):
            return True
    return any(_is_duration(arg) for arg in typing.get_args(tp))


def _duration_text(seconds: float) -> str | float:
    """Seconds with the largest unit that writes them exactly (``7d``, ``90s``, ``250ms``)."""
    for size, unit in _UNITS:
        count = seconds / size
        if count >= 1 and float(round(count)) == count:
            text = f"{round(count)}{unit}"
            if parse_duration(text) == seconds:
                return text
    return seconds


def _variable(loc: Loc) -> str:
    """``("connections", "crm", "client_secret")`` → ``CRM_CLIENT_SECRET``."""
    parts = [str(p) for p in loc if p != "connections"]
    return re.sub(r"[^A-Za-z0-9]+", "_", "_".join(parts)).strip("_").upper()


def _url_variable(loc: Loc, param: str = "password") -> str:
    """``connections.erp.url`` → ``ERP_PASSWORD``; ``…index_url`` → ``ERP_INDEX_PASSWORD``."""
    last = str(loc[-1]) if loc else ""
    base = loc[:-1] if last == "url" else (*loc[:-1], last.removesuffix("_url"))
    return _variable((*base, "token" if param.lower() == "token" else
                      "password" if param.lower() in ("password", "passwd", "pwd") else param))


def _with_password(parts: SplitResult, password: str) -> SplitResult:
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:{password}@{host}")


def _without_refs(url: str) -> str:
    """``url`` with every reference removed: what is left is written literally."""
    return re.sub(r"\$\{[^}]*\}", "", url)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

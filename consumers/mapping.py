"""Field maps: a link's ``fields`` compiled once into small closures, applied per record.

For each target field the value is read from the source field (or is a constant),
replaced by ``default`` when null or absent, passed through the transforms in order,
then through the value ``map``::

    from ─▶ default (if null) ─▶ transform … ─▶ map ─▶ target field

Without ``fields`` (identity mapping) every source field is copied to the target
field of the same name, restricted to the target's fields when they are known.

This is the consumer's hot path: ``FieldMapper`` does every lookup of the config in
``__init__``; ``map_record`` runs one dict comprehension over plain renames and one
closure per computed field, with no pydantic and no per-record spec lookups.

Rounding (``{round: N}``) is half-up (away from zero), as in SQL and spreadsheets,
applied to the decimal text of the value (so 2.675 rounds to 2.68). Integers come
back unchanged, floats as floats, ``Decimal`` as ``Decimal``, decimal strings (how
change events carry NUMERIC values) as decimal strings.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, Protocol

from connectors.base import ConfigError, MappingError
from schemas.config import Endpoint, FieldSpec, Transform, map_key

__all__ = ["FieldMapper", "MappingSpec"]


class MappingSpec(Protocol):
    """What a mapper reads: a link (a → b) or one flow of it (``consumers.flow.Flow``)."""

    @property
    def key(self) -> list[str]: ...

    @property
    def target(self) -> Endpoint: ...

    def field_specs(self) -> dict[str, FieldSpec] | None: ...

Getter = Callable[[Mapping[str, Any]], Any]
Step = Callable[[Any], Any]

# Enough digits for any NUMERIC a database holds; beyond it rounding is an error.
_DECIMALS = Context(prec=80)


class FieldMapper:
    """Maps source records of one link to target records.

    Args:
        link: The link's configuration.
        target_fields: Fields of the target entity, when known; identity mapping then
            copies only those.

    Raises:
        ConfigError: a key field of the link reaches no target field (``bus.config.validate``
            reports this earlier, with its line in the file).
    """

    def __init__(self, link: MappingSpec, *, target_fields: Collection[str] | None = None) -> None:
        self.link = link
        self.entity = link.target.entity
        specs = link.field_specs()
        self._identity = specs is None
        self._allowed = frozenset(target_fields) if target_fields is not None else None
        self._renames: list[tuple[str, str]] = []
        self._computed: list[tuple[str, Getter]] = []
        getters: dict[str, Getter | None] = {}
        for target, spec in (specs or {}).items():
            getter = _compile(target, spec, self.entity)
            getters[target] = getter
            if getter is None:
                self._renames.append((target, spec.from_ or target))
            else:
                self._computed.append((target, getter))
        self._key_steps = [self._key_step(key, specs, getters) for key in link.key]

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Target columns the link's key fields map to, in key order."""
        return tuple(column for _, column, _ in self._key_steps)

    def map_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Map one source record to the target's fields.

        Args:
            record: Source field → value (``data.record`` of a change event).

        Returns:
            Target field → value.

        Raises:
            MappingError: a transform or value map rejected a value; the message names
                the target field, the source field and the value.
        """
        if self._identity:
            allowed = self._allowed
            if allowed is None:
                return dict(record)
            return {k: v for k, v in record.items() if k in allowed}
        get = record.get
        out = {target: get(source) for target, source in self._renames}
        for target, getter in self._computed:
            out[target] = getter(record)
        return out

    def target_key(self, record_or_key: Mapping[str, Any]) -> dict[str, Any]:
        """The target key columns of a record, mapped like the record itself.

        Args:
            record_or_key: A whole source record, or just its key (deletes).

        Returns:
            Target key column → value.

        Raises:
            MappingError: a key field is missing or null, or maps to null.
        """
        out: dict[str, Any] = {}
        for source, column, getter in self._key_steps:
            value = record_or_key.get(source)
            if value is None:
                raise self._key_error(record_or_key, f"key field {source!r} is missing or null")
            if getter is not None:
                value = getter(record_or_key)
                if value is None:
                    raise self._key_error(
                        record_or_key, f"key field {source!r} maps to null in target field {column!r}")
            out[column] = value
        return out

    # -- compilation ----------------------------------------------------------------------

    def _key_step(self, key: str, specs: Mapping[str, FieldSpec] | None,
                  getters: Mapping[str, Getter | None]) -> tuple[str, str, Getter | None]:
        if specs is None:
            if self._allowed is not None and key not in self._allowed:
                raise ConfigError(f"link key field {key!r} has no same-named field in the "
                                  f"target {self.entity!r}")
            return key, key, None
        column = next((t for t, spec in specs.items() if spec.from_ == key), None)
        if column is None:
            raise ConfigError(f"link key field {key!r} is not mapped to any target field")
        return key, column, getters[column]

    def _key_error(self, record: Mapping[str, Any], message: str) -> MappingError:
        key = {k: record.get(k) for k in self.link.key}
        return MappingError(message, entity=self.entity, key=key)


def _compile(target: str, spec: FieldSpec, entity: str) -> Getter | None:
    """One target field's getter; None for a plain rename (read by the caller directly)."""
    if spec.has_const:
        return _constant(spec.const)
    source = spec.from_ or target
    steps = [_transform(t, target, source, entity) for t in spec.transform]
    if spec.map is not None:
        steps.append(_value_map(spec, target, source, entity))
    default = spec.default
    if not steps:
        if default is None:
            return None
        return lambda r: default if (v := r.get(source)) is None else v
    pipeline = tuple(steps)
    if len(pipeline) == 1 and default is None:
        only = pipeline[0]
        return lambda r: only(r.get(source))

    def getter(record: Mapping[str, Any]) -> Any:
        value = record.get(source)
        if value is None:
            value = default
        for step in pipeline:
            value = step(value)
        return value

    return getter


def _constant(value: Any) -> Getter:
    if isinstance(value, dict | list):
        return lambda _r: copy.deepcopy(value)
    return lambda _r: value


def _transform(spec: str | Transform, target: str, source: str, entity: str) -> Step:
    if spec == "upper":
        return lambda v: v.upper() if isinstance(v, str) else v
    if spec == "lower":
        return lambda v: v.lower() if isinstance(v, str) else v
    if spec == "strip":
        return lambda v: v.strip() if isinstance(v, str) else v
    if isinstance(spec, Transform) and spec.round is not None:
        return _rounder(spec.round, target, source, entity)
    raise ConfigError(f"field {target!r}: unknown transform {spec!r}")  # the schema prevents it


def _rounder(places: int, target: str, source: str, entity: str) -> Step:
    quantum = Decimal(1).scaleb(-places)

    def fail(value: Any, why: str) -> MappingError:
        return _error(target, source, entity, f"{{round: {places}}} {why}", value)

    def rounded(d: Decimal, value: Any) -> Decimal:
        if not d.is_finite():
            raise fail(value, "needs a finite number")
        try:
            r = d.quantize(quantum, rounding=ROUND_HALF_UP, context=_DECIMALS)
        except InvalidOperation:
            raise fail(value, "got a number with too many digits") from None
        return r.copy_abs() if r.is_zero() else r  # no "-0.00"

    def step(value: Any) -> Any:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise fail(value, "needs a finite number")
            return float(rounded(Decimal(repr(value)), value))
        if isinstance(value, Decimal):
            return rounded(value, value)
        if isinstance(value, str):
            try:
                parsed = Decimal(value.strip())
            except InvalidOperation:
                raise fail(value, "needs a number") from None
            return str(rounded(parsed, value))
        raise fail(value, "needs a number")

    return step


def _value_map(spec: FieldSpec, target: str, source: str, entity: str) -> Step:
    lookup = dict(spec.map or {})
    policy = spec.unmapped
    known = ", ".join(repr(k) for k in list(lookup)[:10]) + (", …" if len(lookup) > 10 else "")

    def step(value: Any) -> Any:
        if value is None:
            return None
        text = value if type(value) is str else map_key(value)
        try:
            return lookup[text]
        except KeyError:
            if policy == "keep":
                return value
            if policy == "null":
                return None
            raise _error(target, source, entity, f"value not in the map (known: {known})",
                         value) from None

    return step


def _error(target: str, source: str, entity: str, problem: str, value: Any) -> MappingError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return MappingError(f"target field {target!r} (from source field {source!r}): {problem}; "
                        f"got {shown}", entity=entity)

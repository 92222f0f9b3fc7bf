"""A link resolved into its flows: one per direction, each a one-way source → target.

A link names two sides, ``source`` (a) and ``target`` (b), and a field map written
once, b ← a. ``direction: both`` makes two flows:

* ``a2b`` uses the field map as written;
* ``b2a`` uses it inverted: every field that is a plain copy, a default, a lookup or
  an invertible value map is mapped back (a ← b); constants and transforms lose
  information, so their fields stay one-way (:attr:`Flow.one_way` says why, and
  ``syncbus validate`` prints it). ``b2a.fields`` replaces or adds fields of the
  inverted map; ``b2a.filter`` / ``deletes`` / ``soft_delete`` set its own policies.

Both flows of a two-way link identify a record by the same *pair key*: the values of
the link's ``key`` fields on side a, as canonical JSON. The state store keeps, per pair
key, what each side held when it was last synced (:mod:`consumers.twoway`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from connectors.base import ConfigError
from schemas.config import DeletePolicy, Endpoint, FieldSpec, FilterAction, LinkConfig, SoftDelete
from schemas.filter_expr import Filter, compile_filter

__all__ = ["Flow", "filter_fields", "flows", "side_fields"]


@dataclass(frozen=True)
class Flow:
    """One direction of a link, with everything the consumer of that direction needs."""

    link: str
    config: LinkConfig
    direction: str
    source: Endpoint
    target: Endpoint
    #: Source fields identifying a record.
    key: list[str]
    #: Target field → spec; None for an identity map (same-named fields).
    specs: dict[str, FieldSpec] | None
    filter: Filter | None
    filter_action: FilterAction
    deletes: DeletePolicy
    soft_delete: SoftDelete | None
    #: Fields of the other direction that are not mapped back here, with the reason.
    one_way: dict[str, str] = field(default_factory=dict)
    #: The other direction's soft delete: a source record carrying it is a deletion.
    soft_marker: SoftDelete | None = None

    @property
    def name(self) -> str:
        """``<link>.<direction>``: the queue suffix and the log name."""
        return f"{self.link}.{self.direction}"

    @property
    def two_way(self) -> bool:
        return self.config.direction == "both"

    @property
    def source_side(self) -> str:
        """``a`` or ``b``: the side this flow reads."""
        return "a" if self.direction == "a2b" else "b"

    @property
    def target_side(self) -> str:
        return "b" if self.direction == "a2b" else "a"

    def field_specs(self) -> dict[str, FieldSpec] | None:
        """Target field → spec (the interface :class:`~consumers.mapping.FieldMapper` reads)."""
        return self.specs

    def lookups(self) -> dict[str, str]:
        """Target field → the link whose id map translates it."""
        return {t: s.lookup for t, s in (self.specs or {}).items() if s.lookup}


def flows(name: str, link: LinkConfig) -> list[Flow]:
    """The flows of ``link``, a2b first.

    Raises:
        ConfigError: b → a cannot identify records (a key field is not a plain copy).
    """
    out = []
    if "a2b" in link.directions:
        out.append(Flow(
            link=name, config=link, direction="a2b", source=link.source, target=link.target,
            key=list(link.key), specs=link.field_specs(),
            filter=compile_filter(link.filter) if link.filter else None,
            filter_action=link.filter_action, deletes=link.deletes,
            soft_delete=link.soft_delete))
    if "b2a" in link.directions:
        out.append(_reverse(name, link))
    if len(out) == 2:
        a2b, b2a = out
        out = [replace(a2b, soft_marker=b2a.soft_delete if b2a.deletes == "soft" else None),
               replace(b2a, soft_marker=a2b.soft_delete if a2b.deletes == "soft" else None)]
    return out


def _reverse(name: str, link: LinkConfig) -> Flow:
    forward = link.field_specs()
    over = link.b2a
    specs: dict[str, FieldSpec] | None = None
    one_way: dict[str, str] = {}
    key = list(link.key)
    if forward is not None:
        specs = {}
        for target, spec in forward.items():
            problem = spec.inverse_problem()
            if problem is not None:
                one_way[target] = problem
            elif spec.from_ is not None:
                specs[spec.from_] = spec.inverted(target)
        key = []
        for k in link.key:
            back = specs.get(k)
            if back is None or back.from_ is None:
                raise ConfigError(
                    f"link {name!r}: key field {k!r} is not a plain copy, so b → a cannot find "
                    f"records by it ({one_way.get(_column(forward, k) or '', 'not mapped')})")
            key.append(back.from_)
    if over is not None and over.fields is not None:
        extra = LinkConfig.model_validate({
            "source": link.target, "target": link.source, "key": key, "fields": over.fields,
        }).field_specs() or {}
        specs = {**(specs or {}), **extra}
        for a_field, spec in extra.items():
            one_way.pop(_column(forward or {}, spec.from_ or a_field) or "", None)
    text = over.filter if over is not None else None
    return Flow(
        link=name, config=link, direction="b2a", source=link.target, target=link.source,
        key=key, specs=specs, filter=compile_filter(text) if text else None,
        # An upload filter only decides what goes up; deleting on side a is explicit.
        filter_action=(over.filter_action if over is not None and over.filter_action
                       else "ignore"),
        deletes=link.reverse_deletes,
        soft_delete=over.soft_delete if over is not None else None, one_way=one_way)


def _column(specs: Mapping[str, FieldSpec], source: str) -> str | None:
    return next((t for t, s in specs.items() if s.from_ == source), None)


def side_fields(link_flows: list[Flow]) -> dict[str, frozenset[str]] | None:
    """The fields of each side (``a``, ``b``) a two-way link keeps in sync.

    A side's content hash covers exactly these: what the link reads there in one
    direction and writes there in the other, and what its filters read there. None for
    identity maps (the consumer then takes the fields both sides have, plus the filters').
    """
    sides = filter_fields(link_flows)
    for flow in link_flows:
        if flow.specs is None:
            return None
        src, dst = sides[flow.source_side], sides[flow.target_side]
        for target, spec in flow.specs.items():
            if spec.from_ is not None:
                src.add(spec.from_)
                dst.add(target)
    return {side: frozenset(names) for side, names in sides.items()}


def filter_fields(link_flows: list[Flow]) -> dict[str, set[str]]:
    """The fields each side's filters read: a change of one of them can move a record
    into or out of the link, so the echo rule must compare them too."""
    sides: dict[str, set[str]] = {"a": set(), "b": set()}
    for flow in link_flows:
        if flow.filter is not None:
            sides[flow.source_side].update(flow.filter.fields)
    return sides


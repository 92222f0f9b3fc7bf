"""Dataverse table metadata as the connector needs it, and as syncbus describes it.

``EntityDefinitions`` (with ``Attributes``, ``Keys`` and ``ManyToOneRelationships``
expanded) becomes a :class:`TableMeta`: entity set, primary id, alternate keys,
column types, lookup targets and the navigation property each ``@odata.bind`` uses.
:meth:`TableMeta.info` turns it into the bus's :class:`~connectors.base.EntityInfo`.

Features
    * Portable field types (``string``, ``integer``, ``decimal``, ``float``,
      ``boolean``, ``datetime``, ``date``, ``uuid``) from ``AttributeType``.
    * A lookup column is one field named as the column (``parentcustomerid``), holding
      the referenced row's GUID; a lookup with several targets (Customer) also has
      ``<column>type`` naming the target table (``account``/``contact``).
    * Alternate keys become ``unique_keys``; ``ChangeTrackingEnabled`` becomes
      ``change_tracking``; a column is required (not nullable) when its required level
      is ApplicationRequired or SystemRequired and Dataverse does not fill it itself.

Configuration
    None.

Limits
    * Virtual, calendar, party-list and image columns, and the helper columns that
      belong to another (``AttributeOf``), are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.base import EntityInfo, FieldInfo, SchemaError

__all__ = [
    "AttributeMeta",
    "ENTITY_QUERY",
    "LOOKUP_TYPES",
    "TableMeta",
    "parse_table",
]

#: Lookup attribute types.
LOOKUP_TYPES = frozenset({"Lookup", "Customer", "Owner"})

#: ``$select``/``$expand`` of an EntityDefinitions request (base-type properties only).
ENTITY_QUERY = {
    "$select": "LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute,"
               "ChangeTrackingEnabled",
    "$expand": "Attributes($select=LogicalName,AttributeType,RequiredLevel,IsValidForCreate,"
               "IsValidForUpdate,IsValidForRead,AttributeOf,IsPrimaryId),"
               "Keys($select=LogicalName,KeyAttributes),"
               "ManyToOneRelationships($select=ReferencingAttribute,ReferencedEntity,"
               "ReferencingEntityNavigationPropertyName)",
}

_PORTABLE = {
    "String": "string", "Memo": "string", "EntityName": "string",
    "Integer": "integer", "BigInt": "integer", "Picklist": "integer", "State": "integer",
    "Status": "integer", "Decimal": "decimal", "Money": "decimal", "Double": "float",
    "Boolean": "boolean", "DateTime": "datetime", "Uniqueidentifier": "uuid",
    "Lookup": "uuid", "Customer": "uuid", "Owner": "uuid",
}
_REQUIRED = frozenset({"ApplicationRequired", "SystemRequired"})


@dataclass(frozen=True, slots=True)
class AttributeMeta:
    """One column: its type, writability and (lookups) targets."""

    name: str
    type: str
    required: bool
    valid_for_create: bool
    valid_for_update: bool
    primary_id: bool = False
    #: Lookup targets → navigation property for ``@odata.bind`` (first = default target).
    navigation: dict[str, str] = field(default_factory=dict)

    @property
    def is_lookup(self) -> bool:
        """True for Lookup, Customer and Owner columns."""
        return self.type in LOOKUP_TYPES

    @property
    def writable(self) -> bool:
        """Valid for create or update."""
        return self.valid_for_create or self.valid_for_update

    @property
    def property_name(self) -> str:
        """The Web API property (``_x_value`` for lookups)."""
        return f"_{self.name}_value" if self.is_lookup else self.name


@dataclass(frozen=True, slots=True)
class TableMeta:
    """A table as the connector uses it."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str | None
    change_tracking: bool
    attributes: dict[str, AttributeMeta]
    keys: tuple[tuple[str, ...], ...]

    def readable(self) -> list[AttributeMeta]:
        """Columns read into change records, in metadata order."""
        return list(self.attributes.values())

    def select(self) -> str:
        """The ``$select`` list of every readable column."""
        return ",".join(a.property_name for a in self.readable())

    def is_key(self, columns: Sequence[str]) -> tuple[str, ...] | None:
        """The alternate key made of exactly ``columns`` (any order), else None."""
        wanted = set(columns)
        return next((k for k in self.keys if set(k) == wanted), None)

    def polymorphic(self) -> list[AttributeMeta]:
        """Lookups with several targets (they get a ``<name>type`` field)."""
        return [a for a in self.attributes.values() if a.is_lookup and len(a.navigation) > 1]

    def info(self) -> EntityInfo:
        """The table as syncbus metadata (see the module docstring)."""
        fields: list[FieldInfo] = []
        for attr in self.readable():
            computed = not attr.valid_for_create or attr.primary_id
            target = next(iter(attr.navigation), None) if attr.is_lookup else None
            fields.append(FieldInfo(
                name=attr.name, type=_PORTABLE.get(attr.type, "other"),
                nullable=computed or not attr.required, key=attr.primary_id, references=target))
            if attr.is_lookup and len(attr.navigation) > 1:
                fields.append(FieldInfo(name=f"{attr.name}type", type="string"))
        return EntityInfo(name=self.logical_name, fields=tuple(fields), key=(self.primary_id,),
                          unique_keys=self.keys, change_tracking=self.change_tracking)


def parse_table(item: Mapping[str, Any]) -> TableMeta:
    """Build a :class:`TableMeta` from an ``EntityDefinitions`` entry (with expansions).

    Args:
        item: The JSON object of one table, with ``Attributes``, ``Keys`` and
            ``ManyToOneRelationships`` expanded (see :data:`ENTITY_QUERY`).

    Returns:
        The table.

    Raises:
        SchemaError: the entry lacks what a table needs (entity set, primary id).
    """
    name = str(item.get("LogicalName") or "")
    if not item.get("EntitySetName") or not item.get("PrimaryIdAttribute"):
        raise SchemaError(f"table {name!r} has no entity set or primary id in its metadata",
                          entity=name)
    navigation: dict[str, dict[str, str]] = {}
    for rel in item.get("ManyToOneRelationships") or ():
        attr = str(rel.get("ReferencingAttribute") or "")
        nav = rel.get("ReferencingEntityNavigationPropertyName")
        if attr and nav:
            navigation.setdefault(attr, {})[str(rel["ReferencedEntity"])] = str(nav)
    attributes: dict[str, AttributeMeta] = {}
    primary = str(item["PrimaryIdAttribute"])
    for raw in item.get("Attributes") or ():
        kind = str(raw.get("AttributeType") or "")
        logical = str(raw.get("LogicalName") or "")
        if kind not in _PORTABLE or raw.get("AttributeOf") or kind == "EntityName":
            continue
        if raw.get("IsValidForRead") is False:
            continue
        level = (raw.get("RequiredLevel") or {}).get("Value")
        attributes[logical] = AttributeMeta(
            name=logical, type=kind, required=level in _REQUIRED,
            valid_for_create=bool(raw.get("IsValidForCreate")),
            valid_for_update=bool(raw.get("IsValidForUpdate")),
            primary_id=logical == primary, navigation=_ordered(navigation.get(logical, {})))
    keys = tuple(tuple(k.get("KeyAttributes") or ()) for k in item.get("Keys") or ())
    return TableMeta(
        logical_name=name, entity_set=str(item["EntitySetName"]), primary_id=primary,
        primary_name=item.get("PrimaryNameAttribute"),
        change_tracking=bool(item.get("ChangeTrackingEnabled")), attributes=attributes,
        keys=tuple(k for k in keys if k))


def _ordered(navigation: dict[str, str]) -> dict[str, str]:
    """Targets with ``account`` first (the usual customer), then alphabetical."""
    return dict(sorted(navigation.items(), key=lambda kv: (kv[0] != "account", kv[0])))

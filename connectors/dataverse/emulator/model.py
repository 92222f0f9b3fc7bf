"""Table definitions of the Dataverse emulator: entities, attributes, alternate keys.

Everything the emulator serves is driven by these definitions: the entity sets and
their routes, value validation on writes, ``$select``/``$filter`` property checks,
``EntityDefinitions`` and the ``$metadata`` CSDL. ``account`` and ``contact`` are
defined here (a realistic subset of their columns); tests and sandboxes declare
more with :func:`entity` and ``DataverseEmulator.define_entity``.

Features
    * ``entity()`` adds the system columns every Dataverse table has: the primary id
      (``<name>id``, Uniqueidentifier), ``createdon``, ``modifiedon`` and
      ``versionnumber``.
    * Lookups name their target tables; a lookup with several targets (``Customer``)
      gets one navigation property per target (``parentcustomerid_account``) and a
      companion ``EntityName`` column (``parentcustomeridtype``), as in Dataverse.

Configuration
    Nothing: definitions are plain frozen dataclasses.

Limits
    * Attribute types: String, Memo, Integer, BigInt, Decimal, Money, Double, Boolean,
      DateTime (``DateAndTime`` or ``DateOnly``), Uniqueidentifier, Picklist, State,
      Status, Lookup, Customer, EntityName. No option-set labels, no calculated or
      rollup columns (``fullname`` of contact is composed by the store).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "ACCOUNT",
    "AttributeDef",
    "CONTACT",
    "DEFAULT_ENTITIES",
    "EDM_TYPES",
    "EntityDef",
    "KeyDef",
    "LOOKUP_TYPES",
    "NAMESPACE",
    "attribute",
    "entity",
    "entity_from_json",
    "entity_to_json",
    "metadata_id",
]

#: CSDL namespace of every Dataverse type.
NAMESPACE = "Microsoft.Dynamics.CRM"

#: Attribute types whose value is a reference to another row.
LOOKUP_TYPES = frozenset({"Lookup", "Customer", "Owner"})

#: AttributeType → the Edm type of its Web API property.
EDM_TYPES: dict[str, str] = {
    "String": "Edm.String",
    "Memo": "Edm.String",
    "EntityName": "Edm.String",
    "Integer": "Edm.Int32",
    "Picklist": "Edm.Int32",
    "State": "Edm.Int32",
    "Status": "Edm.Int32",
    "BigInt": "Edm.Int64",
    "Decimal": "Edm.Decimal",
    "Money": "Edm.Decimal",
    "Double": "Edm.Double",
    "Boolean": "Edm.Boolean",
    "DateTime": "Edm.DateTimeOffset",
    "Uniqueidentifier": "Edm.Guid",
    "Lookup": "Edm.Guid",
    "Customer": "Edm.Guid",
    "Owner": "Edm.Guid",
}

_METADATA_NS = uuid.UUID("5f0c2a55-2f5e-4f39-9a53-7d5ad2b7a001")


def metadata_id(*parts: str) -> str:
    """A stable MetadataId for a table, attribute or key (same on every start)."""
    return str(uuid.uuid5(_METADATA_NS, "/".join(parts)))


@dataclass(frozen=True, slots=True)
class AttributeDef:
    """One column of a table.

    Args:
        logical_name: Lower-case column name (``accountnumber``).
        type: Dataverse ``AttributeType`` (``String``, ``Lookup``, …).
        required: ``RequiredLevel`` value: None, Recommended, ApplicationRequired,
            SystemRequired. Only SystemRequired is enforced on create, as in Dataverse.
        max_length: Longest text accepted (String, Memo).
        precision: Decimal places kept (Decimal, Money, Double).
        min_value: Smallest number accepted, if any.
        max_value: Largest number accepted, if any.
        targets: Tables a lookup may refer to (first one is the default).
        date_only: DateTime stored as a date (``DateOnly`` format).
        options: Allowed values of a Picklist / State / Status column.
        valid_for_create: Writable on create.
        valid_for_update: Writable on update.
        attribute_of: Column this one belongs to (the ``…type`` column of a lookup).
        display_name: Label shown in the metadata.
        option_labels: Labels of ``options``, in order (default: "Active"/"Inactive"
            for State columns, "Option <n>" otherwise).
    """

    logical_name: str
    type: str
    required: str = "None"
    max_length: int | None = None
    precision: int | None = None
    min_value: float | None = None
    max_value: float | None = None
    targets: tuple[str, ...] = ()
    date_only: bool = False
    options: tuple[int, ...] = ()
    valid_for_create: bool = True
    valid_for_update: bool = True
    attribute_of: str | None = None
    display_name: str | None = None
    option_labels: tuple[str, ...] = ()

    def option_label(self, value: int) -> str:
        """The label of one option value."""
        if value in self.options and len(self.option_labels) == len(self.options):
            return self.option_labels[self.options.index(value)]
        if self.type == "State":
            return {0: "Active", 1: "Inactive"}.get(value, f"State {value}")
        return f"Option {value}"

    @property
    def is_lookup(self) -> bool:
        """True for Lookup, Customer and Owner columns."""
        return self.type in LOOKUP_TYPES

    @property
    def property_name(self) -> str:
        """The Web API property: ``_<name>_value`` for lookups, else the logical name."""
        return f"_{self.logical_name}_value" if self.is_lookup else self.logical_name

    @property
    def edm_type(self) -> str:
        """The Edm type of the Web API property."""
        if self.type == "DateTime" and self.date_only:
            return "Edm.Date"
        return EDM_TYPES[self.type]

    @property
    def read_only(self) -> bool:
        """Neither valid for create nor for update."""
        return not (self.valid_for_create or self.valid_for_update)

    def navigation_properties(self) -> dict[str, str]:
        """Navigation property → target table, for ``@odata.bind``.

        Returns:
            ``{"primarycontactid": "contact"}`` for a single-target lookup;
            ``{"parentcustomerid_account": "account", …}`` for several targets.
        """
        if not self.is_lookup:
            return {}
        if len(self.targets) == 1:
            return {self.logical_name: self.targets[0]}
        return {f"{self.logical_name}_{t}": t for t in self.targets}


@dataclass(frozen=True, slots=True)
class KeyDef:
    """An alternate key: a named set of columns unique across the table."""

    name: str
    attributes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EntityDef:
    """A table: its names, columns and keys.

    Build it with :func:`entity`, which adds the system columns.
    """

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str | None
    attributes: tuple[AttributeDef, ...]
    keys: tuple[KeyDef, ...] = ()
    change_tracking: bool = True
    display_name: str | None = None
    object_type_code: int = 10000
    #: Whether the bound bulk actions (CreateMultiple, UpdateMultiple, UpsertMultiple)
    #: are available for the table (Dataverse: most tables, not all).
    bulk_messages: bool = True
    _by_name: dict[str, AttributeDef] = field(
        default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        self._by_name.update({a.logical_name: a for a in self.attributes})

    @property
    def metadata_id(self) -> str:
        """The table's MetadataId."""
        return metadata_id(self.logical_name)

    @property
    def type_name(self) -> str:
        """The CSDL entity type, ``Microsoft.Dynamics.CRM.account``."""
        return f"{NAMESPACE}.{self.logical_name}"

    def attribute(self, name: str) -> AttributeDef | None:
        """The column called ``name`` (logical name), or None."""
        return self._by_name.get(name)

    def by_property(self, prop: str) -> AttributeDef | None:
        """The column behind a Web API property (``_x_value`` for lookups), or None."""
        if prop.startswith("_") and prop.endswith("_value"):
            attr = self._by_name.get(prop[1:-6])
            return attr if attr is not None and attr.is_lookup else None
        attr = self._by_name.get(prop)
        return attr if attr is not None and not attr.is_lookup else None

    def properties(self) -> list[AttributeDef]:
        """Columns exposed as Web API properties (``EntityName`` companions are not)."""
        return [a for a in self.attributes if a.type != "EntityName"]

    def navigation(self) -> dict[str, tuple[AttributeDef, str]]:
        """Navigation property → (lookup column, target table)."""
        out: dict[str, tuple[AttributeDef, str]] = {}
        for attr in self.attributes:
            for nav, target in attr.navigation_properties().items():
                out[nav] = (attr, target)
        return out

    def key_for(self, columns: set[str]) -> KeyDef | None:
        """The alternate key made of exactly ``columns``, or None."""
        return next((k for k in self.keys if set(k.attributes) == columns), None)

    def with_changes(self, **changes: Any) -> EntityDef:
        """A copy with some fields replaced."""
        return replace(self, _by_name={}, **changes)


def attribute(logical_name: str, type_: str = "String", **options: Any) -> AttributeDef:
    """Declare a column, with the defaults Dataverse gives that type.

    Args:
        logical_name: Lower-case column name.
        type_: ``AttributeType``; String defaults to 100 characters, Memo to 2,000,
            Money to 2 decimal places, Decimal to 2, Double to 5.
        **options: Any other ``AttributeDef`` field.

    Returns:
        The column.
    """
    defaults: dict[str, Any] = {
        "String": {"max_length": 100}, "Memo": {"max_length": 2000},
        "Money": {"precision": 2, "min_value": -922337203685477, "max_value": 922337203685477},
        "Decimal": {"precision": 2, "min_value": -100000000000, "max_value": 100000000000},
        "Double": {"precision": 5, "min_value": -100000000000, "max_value": 100000000000},
        "Integer": {"min_value": -2147483648, "max_value": 2147483647},
    }.get(type_, {})
    return AttributeDef(logical_name, type_, **{**defaults, **options})


def entity(logical_name: str, *, entity_set: str | None = None, primary_name: str | None = "name",
           attributes: tuple[AttributeDef, ...] | list[AttributeDef] = (),
           keys: dict[str, tuple[str, ...]] | None = None, change_tracking: bool = True,
           display_name: str | None = None, object_type_code: int = 10000,
           bulk_messages: bool = True) -> EntityDef:
    """Declare a table with Dataverse's system columns added.

    Args:
        logical_name: Lower-case table name (``new_project``).
        entity_set: Entity set name; default: the logical name plus ``s``.
        primary_name: The primary name column (must be among ``attributes``) or None.
        attributes: The table's own columns.
        keys: Alternate keys, name → columns.
        change_tracking: Whether ``Prefer: odata.track-changes`` is allowed.
        display_name: Label in the metadata (default: the logical name).
        object_type_code: ObjectTypeCode in the metadata.
        bulk_messages: Whether CreateMultiple / UpdateMultiple / UpsertMultiple are
            available for the table.

    Returns:
        The table definition.

    Raises:
        ValueError: a key or the primary name names an unknown column, or a lookup has
            no target.
    """
    primary_id = f"{logical_name}id"
    system = [
        attribute(primary_id, "Uniqueidentifier", valid_for_update=False),
        attribute("createdon", "DateTime", valid_for_create=False, valid_for_update=False),
        attribute("modifiedon", "DateTime", valid_for_create=False, valid_for_update=False),
        attribute("versionnumber", "BigInt", valid_for_create=False, valid_for_update=False),
    ]
    own = list(attributes)
    for attr in list(own):
        if attr.is_lookup and not attr.targets:
            raise ValueError(f"lookup {logical_name}.{attr.logical_name} needs targets")
        if attr.is_lookup and len(attr.targets) > 1:
            own.append(attribute(f"{attr.logical_name}type", "EntityName", max_length=None,
                                 attribute_of=attr.logical_name))
    names = {a.logical_name for a in [*system, *own]}
    key_defs = tuple(KeyDef(name, tuple(cols)) for name, cols in (keys or {}).items())
    for key in key_defs:
        unknown = set(key.attributes) - names
        if unknown:
            raise ValueError(f"key {key.name} of {logical_name}: unknown columns {sorted(unknown)}")
    if primary_name is not None and primary_name not in names:
        raise ValueError(f"primary name {primary_name!r} is not a column of {logical_name}")
    return EntityDef(
        logical_name=logical_name, entity_set=entity_set or f"{logical_name}s",
        primary_id=primary_id, primary_name=primary_name,
        attributes=(system[0], *own, *system[1:]), keys=key_defs,
        change_tracking=change_tracking, display_name=display_name or logical_name.title(),
        object_type_code=object_type_code, bulk_messages=bulk_messages,
    )


ACCOUNT = entity(
    "account", display_name="Account", object_type_code=1,
    attributes=[
        attribute("name", max_length=160, required="ApplicationRequired"),
        attribute("accountnumber", max_length=20),
        attribute("telephone1", max_length=50),
        attribute("emailaddress1", max_length=100),
        attribute("websiteurl", max_length=200),
        attribute("address1_line1", max_length=250),
        attribute("address1_city", max_length=80),
        attribute("address1_postalcode", max_length=20),
        attribute("address1_country", max_length=80),
        attribute("industrycode", "Picklist", options=tuple(range(1, 34))),
        attribute("numberofemployees", "Integer", min_value=0, max_value=1000000000),
        attribute("revenue", "Money"),
        attribute("creditlimit", "Money", min_value=0),
        attribute("creditonhold", "Boolean"),
        attribute("description", "Memo"),
        attribute("primarycontactid", "Lookup", targets=("contact",)),
        attribute("statecode", "State", options=(0, 1)),
    ],
    keys={"accountnumber_key": ("accountnumber",)},
)

CONTACT = entity(
    "contact", display_name="Contact", object_type_code=2, primary_name="fullname",
    attributes=[
        attribute("firstname", max_length=50),
        attribute("lastname", max_length=50, required="ApplicationRequired"),
        attribute("fullname", max_length=160, valid_for_create=False, valid_for_update=False),
        attribute("emailaddress1", max_length=100),
        attribute("telephone1", max_length=50),
        attribute("jobtitle", max_length=100),
        attribute("birthdate", "DateTime", date_only=True),
        attribute("parentcustomerid", "Customer", targets=("account", "contact")),
        attribute("statecode", "State", options=(0, 1)),
    ],
)

#: Schema names of the seeded tables' relationships, as in a real organisation;
#: (referencing table, lookup column, referenced table) → name. Others are generated.
RELATIONSHIP_NAMES = {
    ("contact", "parentcustomerid", "account"): "contact_customer_accounts",
    ("contact", "parentcustomerid", "contact"): "contact_customer_contacts",
    ("account", "primarycontactid", "contact"): "account_primary_contact",
}


def relationship_name(entity: str, column: str, target: str) -> str:
    """The SchemaName of the one-to-many relationship behind a lookup (``account_primary_contact``)."""
    return RELATIONSHIP_NAMES.get((entity, column, target), f"{entity}_{column}_{target}")


#: The tables every emulator starts with.
DEFAULT_ENTITIES: tuple[EntityDef, ...] = (ACCOUNT, CONTACT)


def entity_to_json(entity: EntityDef) -> dict[str, Any]:
    """A table definition as JSON-ready data (kept in ``--store`` files)."""
    data = {f.name: getattr(entity, f.name) for f in fields(entity)
            if f.name != "_by_name"}
    data["attributes"] = [asdict(a) for a in entity.attributes]
    data["keys"] = [asdict(k) for k in entity.keys]
    return data


def entity_from_json(data: dict[str, Any]) -> EntityDef:
    """The table definition :func:`entity_to_json` wrote."""
    attrs = tuple(AttributeDef(**{**a, "targets": tuple(a["targets"]),
                                  "options": tuple(a["options"]),
                                  "option_labels": tuple(a.get("option_labels") or ())})
                  for a in data["attributes"])
    keys = tuple(KeyDef(k["name"], tuple(k["attributes"])) for k in data["keys"])
    return EntityDef(**{**data, "attributes": attrs, "keys": keys})

"""Metadata endpoints of the emulator, generated from the table definitions.

Features
    * ``EntityDefinitions`` (all, ``(LogicalName='account')`` or ``(<MetadataId>)``)
      with ``$select``, ``$filter`` (paths such as ``RequiredLevel/Value``, enum literals)
      and ``$expand=Attributes(…),Keys,ManyToOneRelationships,OneToManyRelationships``
      with nested ``$select``/``$filter``; the same collections as sub-paths, and
      type casts ``Attributes/Microsoft.Dynamics.CRM.LookupAttributeMetadata``.
    * Attribute metadata: ``AttributeType``, ``AttributeTypeName``, ``RequiredLevel``,
      ``IsValidForCreate/Update/Read``, ``IsPrimaryId/Name``, ``MaxLength``,
      ``Precision``, ``MinValue``/``MaxValue``, ``Targets``, ``Format``, ``AttributeOf``.
    * ``$metadata`` CSDL (namespace ``Microsoft.Dynamics.CRM``, ``_x_value`` lookup
      properties, navigation properties, alternate keys); ``?annotations=true`` adds
      ``Org.OData.Core.V1.Computed`` and the ``ChangeTracking`` capability.
    * ``WhoAmI``, ``RetrieveTotalRecordCount(EntityNames=[…])``, the service document.
    * Option-set metadata: casts to ``PicklistAttributeMetadata`` /
      ``StateAttributeMetadata`` / … with ``$expand=OptionSet($select=Options)``
      (``GlobalOptionSet`` is null: no global option sets).
    * A ``$filter`` on a property the metadata type does not have is a 400.

Configuration
    None.

Limits
    * No global option sets, no ``RetrieveMetadataChanges``, no metadata writes.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from connectors.dataverse.emulator.errors import ODataError, bad_query, unknown_property
from connectors.dataverse.emulator.http import ApiRequest, ApiResponse, json_response
from connectors.dataverse.emulator.keys import parse_key_segment
from connectors.dataverse.emulator.model import (
    NAMESPACE,
    AttributeDef,
    EntityDef,
    metadata_id,
    relationship_name,
)
from connectors.dataverse.emulator.odata import (
    Getter,
    compile_filter,
    split_select,
)

if TYPE_CHECKING:
    from connectors.dataverse.emulator.service import Service

__all__ = ["csdl", "handle", "handles", "service_document"]

Item = dict[str, Any]
_COLLECTIONS = ("Attributes", "Keys", "ManyToOneRelationships", "OneToManyRelationships")
_COUNT = re.compile(r"^RetrieveTotalRecordCount\(EntityNames=\[(.*)\]\)$")


def handles(path: str) -> bool:
    """True for paths this module answers."""
    head = path.split("/", 1)[0]
    return (head in ("$metadata", "WhoAmI", "WhoAmI()") or head.startswith("EntityDefinitions")
            or head.startswith("RetrieveTotalRecordCount"))


def handle(service: Service, req: ApiRequest) -> ApiResponse:
    """Answer a metadata request.

    Raises:
        ODataError: unknown table or property, unsupported method.
    """
    if req.method != "GET":
        raise ODataError(405, "0x80060888", f"The requested resource does not support http "
                         f"method '{req.method}'.")
    path, base = req.path, service.base_url
    if path == "$metadata":
        xml = csdl(service, annotations=req.query.get("annotations") == "true")
        return ApiResponse(200, {"Content-Type": "application/xml", "OData-Version": "4.0"}, xml)
    if path.startswith("WhoAmI"):
        org = service.store.organization_id
        return json_response(200, {
            "@odata.context": f"{base}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            "BusinessUnitId": str(uuid.uuid5(uuid.UUID(org), "business-unit")),
            "UserId": req.caller or str(uuid.uuid5(uuid.UUID(org), "anonymous")),
            "OrganizationId": org})
    match = _COUNT.match(path)
    if match:
        return _record_counts(service, match.group(1))
    return _definitions(service, req)


def service_document(service: Service, req: ApiRequest) -> ApiResponse:
    """``GET /api/data/v9.2/``: every entity set."""
    sets = sorted(service.store.sets)
    return json_response(200, {"@odata.context": f"{service.base_url}$metadata", "value": [
        {"name": s, "kind": "EntitySet", "url": s} for s in sets]})


def _record_counts(service: Service, names: str) -> ApiResponse:
    wanted = [n.strip().strip("'") for n in names.split(",") if n.strip()]
    values = []
    for name in wanted:
        table = service.store.tables.get(name)
        if table is None:
            raise bad_query(f"Could not find entity with name '{name}'.")
        values.append(len(table.rows))
    return json_response(200, {
        "@odata.context": f"{service.base_url}$metadata#Microsoft.Dynamics.CRM."
                          "RetrieveTotalRecordCountResponse",
        "EntityRecordCountCollection": {"Count": len(wanted), "IsReadOnly": False,
                                        "Keys": wanted, "Values": values}})


# -- EntityDefinitions --------------------------------------------------------------------------


def _definitions(service: Service, req: ApiRequest) -> ApiResponse:
    segments = req.path.split("/")
    _, key = parse_key_segment(segments[0])
    entities = [t.entity for t in service.store.tables.values()]
    base = f"{service.base_url}$metadata#EntityDefinitions"
    if key is None:
        if len(segments) > 1:
            raise bad_query("Select a single EntityDefinitions entry before navigating.")
        items = [_entity_json(service, e) for e in entities]
        return json_response(200, {"@odata.context": base, "value": _apply(
            items, req.query, "EntityMetadata", lambda i: _expansions(service, i))})
    entity = _find_entity(entities, key)
    if len(segments) == 1:
        item = _apply([_entity_json(service, entity)], req.query, "EntityMetadata",
                      lambda i: _expansions(service, i))[0]
        return json_response(200, {"@odata.context": f"{base}/$entity", **item})
    collection, rest = segments[1], segments[2:]
    name, sub_key = parse_key_segment(collection)
    if name not in _COLLECTIONS:
        raise ODataError(404, "0x80060888", f"Resource not found for the segment '{collection}'.")
    items = _collection(service, entity, name)
    expansions: Expansions | None = None
    if rest:  # a cast: Attributes/Microsoft.Dynamics.CRM.LookupAttributeMetadata
        items = [i for i in items if i.get("@odata.type") == f"#{rest[0]}"]
        if name == "Attributes" and rest[0] in _ENUM_CASTS:
            expansions = lambda i: _option_sets(entity, i)  # noqa: E731
    if sub_key is not None:
        wanted = sub_key.get("LogicalName") if isinstance(sub_key, dict) else None
        found = [i for i in items if i.get("LogicalName") == wanted or i["MetadataId"] == sub_key]
        if not found:
            raise ODataError(404, "0x80040217", f"Could not find {name[:-1]} {sub_key}.")
        return json_response(200, {"@odata.context": f"{base}/{name}/$entity",
                                   **_apply(found, req.query, name, expansions)[0]})
    context = f"{base}/{name}" + (f"/{rest[0]}" if rest else "")
    return json_response(200, {"@odata.context": context,
                               "value": _apply(items, req.query, name, expansions)})


def _option_sets(entity: EntityDef, item: Item) -> dict[str, Any]:
    """``OptionSet`` (local) and ``GlobalOptionSet`` (None: the emulator has no global ones)."""
    attr = entity.attribute(item["LogicalName"])
    assert attr is not None
    kind = attr.type
    options = []
    for value in attr.options:
        option: Item = {"Value": value, "Color": None, "IsManaged": True, "ExternalValue": "",
                        "ParentValues": [], "Tag": None, "IsHidden": False,
                        "MetadataId": None, "HasChanged": None,
                        "Label": _label(attr.option_label(value)), "Description": _label("")}
        if kind == "State":
            option.update(DefaultStatus=value + 1, InvariantName=attr.option_label(value))
        options.append(option)
    name = f"{entity.logical_name}_{attr.logical_name}"
    option_set: Item = {
        "MetadataId": metadata_id(entity.logical_name, attr.logical_name, "optionset"),
        "HasChanged": None, "IsCustomOptionSet": False, "IsGlobal": False, "IsManaged": True,
        "Name": name, "ExternalTypeName": None, "OptionSetType": kind,
        "Description": _label(""), "DisplayName": _label(attr.display_name or attr.logical_name),
        "IsCustomizable": _managed(True, "iscustomizable"), "Options": options}
    return {"OptionSet": option_set, "GlobalOptionSet": None}


def _find_entity(entities: list[EntityDef], key: str | dict[str, Any]) -> EntityDef:
    for entity in entities:
        if (isinstance(key, dict) and key.get("LogicalName") == entity.logical_name) or (
                key == entity.metadata_id):
            return entity
    shown = key.get("LogicalName") if isinstance(key, dict) else key
    raise ODataError(404, "0x80040217", f"Could not find entity with name '{shown}'.")


#: The metadata type of the items of each collection (for error messages).
_TYPES = {"EntityMetadata": "EntityMetadata", "Attributes": "AttributeMetadata",
          "Keys": "EntityKeyMetadata", "ManyToOneRelationships": "OneToManyRelationshipMetadata",
          "OneToManyRelationships": "OneToManyRelationshipMetadata",
          "OptionSet": "OptionSetMetadata", "GlobalOptionSet": "OptionSetMetadata"}
#: Attribute types whose metadata has OptionSet / GlobalOptionSet (EnumAttributeMetadata).
_ENUM_CASTS = {f"{NAMESPACE}.{kind}AttributeMetadata"
               for kind in ("Picklist", "State", "Status", "MultiSelectPicklist", "Boolean")}

Expansions = Callable[[Item], dict[str, Any]]


def _apply(items: list[Item], query: Mapping[str, str], type_name: str,
           expansions: Expansions | None = None) -> list[Item]:
    """$filter, $expand and $select over metadata items.

    Raises:
        ODataError: 400 for a property (in ``$filter``, ``$select``, ``$expand``) the
            items' type does not have.
    """
    full_type = f"{NAMESPACE}.{_TYPES.get(type_name, type_name)}"
    if query.get("$filter"):
        known = set().union(*(i.keys() for i in items)) if items else set()
        if type_name == "Attributes":
            known |= _DERIVED
        pred = compile_filter(query["$filter"], _path_resolver(known, full_type))
        items = [i for i in items if pred(i)]
    expand = _parse_expand(query.get("$expand", ""))
    out = []
    for item in items:
        result = dict(item)
        available = expansions(item) if expansions is not None else {}
        for name, options in expand.items():
            if name not in available:
                raise unknown_property(name, full_type)
            value = available[name]
            if isinstance(value, list):
                result[name] = _apply(value, options, name)
            else:
                result[name] = None if value is None else _apply([value], options, name)[0]
        out.append(_select(result, query.get("$select"), type_name, set(expand)))
    return out


def _select(item: Item, text: str | None, type_name: str, keep: set[str]) -> Item:
    if not text:
        return item
    names = split_select(text)
    for name in names:
        if name not in item and not _known(name, type_name):
            raise unknown_property(name, f"{NAMESPACE}.{type_name}")
    chosen = {"MetadataId", *names, *keep}
    return {k: v for k, v in item.items() if k in chosen or k == "@odata.type"}


#: Properties of derived attribute types, selectable on the base collection.
_DERIVED = {"MaxLength", "Precision", "MinValue", "MaxValue", "Targets", "Format",
            "DateTimeBehavior", "DefaultFormValue"}


def _known(name: str, type_name: str) -> bool:
    """Properties of derived attribute types may be selected on the base collection."""
    return type_name == "Attributes" and name in _DERIVED


def _parse_expand(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    depth, start, parts = 0, 0, []
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in (p.strip() for p in parts if p.strip()):
        name, _, inner = part.partition("(")
        options: dict[str, str] = {}
        for option in inner.rstrip(")").split(";") if inner else []:
            opt, _, value = option.partition("=")
            options[opt.strip()] = value.strip()
        out[name.strip()] = options
    return out


def _path_resolver(known: set[str], type_name: str) -> Callable[[str], tuple[Getter, str | None]]:
    """Resolves ``$filter`` paths (``RequiredLevel/Value``); an unknown first part is a 400
    (when the items are known at all)."""

    def resolve(path: str) -> tuple[Getter, str | None]:
        parts = path.split("/")
        if known and parts[0] not in known:
            raise unknown_property(parts[0], type_name)

        def get(item: Mapping[str, Any]) -> Any:
            value: Any = item
            for part in parts:
                value = value.get(part) if isinstance(value, Mapping) else None
            return value

        return get, None

    return resolve


def _label(text: str) -> Item:
    label = {"Label": text, "LanguageCode": 1033, "IsManaged": True,
             "MetadataId": metadata_id("label", text), "HasChanged": None}
    return {"LocalizedLabels": [label], "UserLocalizedLabel": label}


def _managed(value: Any, name: str) -> Item:
    return {"Value": value, "CanBeChanged": True, "ManagedPropertyLogicalName": name}


def _entity_json(service: Service, entity: EntityDef) -> Item:
    return {
        "MetadataId": entity.metadata_id, "LogicalName": entity.logical_name,
        "SchemaName": entity.logical_name.title(), "EntitySetName": entity.entity_set,
        "LogicalCollectionName": entity.entity_set, "CollectionSchemaName": entity.entity_set.title(),
        "PrimaryIdAttribute": entity.primary_id, "PrimaryNameAttribute": entity.primary_name,
        "ObjectTypeCode": entity.object_type_code, "ChangeTrackingEnabled": entity.change_tracking,
        "CanChangeTrackingBeEnabled": _managed(True, "canchangetrackingbeenabled"),
        "IsCustomEntity": entity.object_type_code >= 10000, "IsValidForAdvancedFind": True,
        "IsActivity": False, "IsIntersect": False, "OwnershipType": "UserOwned",
        "DisplayName": _label(entity.display_name or entity.logical_name),
        "DisplayCollectionName": _label(entity.entity_set.title()),
    }


def _expansions(service: Service, item: Item) -> dict[str, list[Item]]:
    entity = service.store.tables[item["LogicalName"]].entity
    return {name: _collection(service, entity, name) for name in _COLLECTIONS}


def _collection(service: Service, entity: EntityDef, name: str) -> list[Item]:
    if name == "Attributes":
        return [attribute_json(entity, a) for a in entity.attributes]
    if name == "Keys":
        return [{"MetadataId": metadata_id(entity.logical_name, "key", k.name),
                 "LogicalName": k.name, "SchemaName": k.name, "EntityLogicalName": entity.logical_name,
                 "KeyAttributes": list(k.attributes), "EntityKeyIndexStatus": "Active",
                 "DisplayName": _label(k.name)} for k in entity.keys]
    everything = [_relationship(e, a, t, nav) for e in (t.entity for t in service.store.tables.values())
                  for a in e.attributes for nav, t in a.navigation_properties().items()]
    if name == "ManyToOneRelationships":
        return [r for r in everything if r["ReferencingEntity"] == entity.logical_name]
    return [r for r in everything if r["ReferencedEntity"] == entity.logical_name]


def _relationship(entity: EntityDef, attr: AttributeDef, target: str, nav: str) -> Item:
    schema = relationship_name(entity.logical_name, attr.logical_name, target)
    return {"MetadataId": metadata_id(schema), "SchemaName": schema,
            "RelationshipType": "OneToManyRelationship", "ReferencedEntity": target,
            "ReferencedAttribute": f"{target}id", "ReferencingEntity": entity.logical_name,
            "ReferencingAttribute": attr.logical_name,
            "ReferencedEntityNavigationPropertyName": schema,
            "ReferencingEntityNavigationPropertyName": nav}


_TYPE_NAMES = {"Uniqueidentifier": "UniqueIdentifier"}


def attribute_json(entity: EntityDef, attr: AttributeDef) -> Item:
    """One attribute's metadata, as ``…/Attributes`` returns it."""
    kind = attr.type
    cls = "Lookup" if attr.is_lookup else _TYPE_NAMES.get(kind, kind)
    item: Item = {
        "@odata.type": f"#{NAMESPACE}.{cls}AttributeMetadata",
        "MetadataId": metadata_id(entity.logical_name, attr.logical_name),
        "LogicalName": attr.logical_name, "SchemaName": attr.logical_name.title(),
        "EntityLogicalName": entity.logical_name, "AttributeType": kind,
        "AttributeTypeName": {"Value": f"{kind}Type"}, "AttributeOf": attr.attribute_of,
        "IsPrimaryId": attr.logical_name == entity.primary_id,
        "IsPrimaryName": attr.logical_name == entity.primary_name,
        "IsValidForCreate": attr.valid_for_create, "IsValidForUpdate": attr.valid_for_update,
        "IsValidForRead": True, "IsCustomAttribute": False, "IsLogical": False,
        "RequiredLevel": _managed("SystemRequired" if attr.logical_name == entity.primary_id
                                  else attr.required, "canmodifyrequirementlevelsettings"),
        "DisplayName": _label(attr.display_name or attr.logical_name),
    }
    if kind in ("String", "Memo"):
        item.update(MaxLength=attr.max_length, Format="TextArea" if kind == "Memo" else "Text")
    if kind in ("Integer", "BigInt", "Decimal", "Money", "Double"):
        item.update(MinValue=attr.min_value, MaxValue=attr.max_value)
    if kind in ("Decimal", "Money", "Double"):
        item["Precision"] = attr.precision
    if attr.is_lookup:
        item["Targets"] = list(attr.targets)
    if kind == "DateTime":
        item.update(Format="DateOnly" if attr.date_only else "DateAndTime",
                    DateTimeBehavior={"Value": "DateOnly" if attr.date_only else "UserLocal"})
    return item


# -- CSDL ------------------------------------------------------------------------------------------


def csdl(service: Service, *, annotations: bool = False) -> bytes:
    """The ``$metadata`` document.

    Args:
        service: The service (its tables).
        annotations: Add Core/Capabilities annotations (``?annotations=true``).

    Returns:
        UTF-8 XML.
    """
    edmx = ET.Element("edmx:Edmx", {"Version": "4.0",
                                    "xmlns:edmx": "http://docs.oasis-open.org/odata/ns/edmx"})
    schema = ET.SubElement(ET.SubElement(edmx, "edmx:DataServices"), "Schema", {
        "Namespace": NAMESPACE, "Alias": "mscrm", "xmlns": "http://docs.oasis-open.org/odata/ns/edm"})
    ET.SubElement(schema, "EntityType", {"Name": "crmbaseentity", "Abstract": "true"})
    tables = [t.entity for t in service.store.tables.values()]
    for entity in tables:
        _entity_type(schema, entity, annotations)
    container = ET.SubElement(schema, "EntityContainer", {"Name": "System"})
    for entity in tables:
        entity_set = ET.SubElement(container, "EntitySet", {
            "Name": entity.entity_set, "EntityType": entity.type_name})
        for nav, (_attr, target) in entity.navigation().items():
            target_set = service.store.tables[target].entity.entity_set if target in service.store.tables else target
            ET.SubElement(entity_set, "NavigationPropertyBinding", {"Path": nav, "Target": target_set})
        if annotations:
            ann = ET.SubElement(entity_set, "Annotation", {"Term": "Org.OData.Capabilities.V1.ChangeTracking"})
            ET.SubElement(ET.SubElement(ann, "Record"), "PropertyValue", {
                "Property": "Supported", "Bool": "true" if entity.change_tracking else "false"})
    ET.SubElement(container, "FunctionImport", {"Name": "WhoAmI", "Function": "mscrm.WhoAmI"})
    xml: bytes = ET.tostring(edmx, encoding="utf-8", xml_declaration=True)
    return xml


def _entity_type(schema: ET.Element, entity: EntityDef, annotations: bool) -> None:
    node = ET.SubElement(schema, "EntityType", {"Name": entity.logical_name,
                                                "BaseType": "mscrm.crmbaseentity"})
    ET.SubElement(ET.SubElement(node, "Key"), "PropertyRef", {"Name": entity.primary_id})
    for attr in entity.properties():
        props = {"Name": attr.property_name, "Type": attr.edm_type}
        if attr.edm_type == "Edm.String":
            props["Unicode"] = "false"
        prop = ET.SubElement(node, "Property", props)
        if annotations and (attr.read_only or attr.is_lookup):
            ET.SubElement(prop, "Annotation", {"Term": "Org.OData.Core.V1.Computed", "Bool": "true"})
    for nav, (attr, target) in entity.navigation().items():
        nav_node = ET.SubElement(node, "NavigationProperty", {
            "Name": nav, "Type": f"mscrm.{target}",
            "Partner": relationship_name(entity.logical_name, attr.logical_name, target)})
        ET.SubElement(nav_node, "ReferentialConstraint", {
            "Property": attr.property_name, "ReferencedProperty": f"{target}id"})
    if entity.keys:
        ann = ET.SubElement(node, "Annotation", {"Term": "OData.Community.Keys.V1.AlternateKeys"})
        collection = ET.SubElement(ann, "Collection")
        for key in entity.keys:
            record = ET.SubElement(collection, "Record", {"Type": "OData.Community.Keys.V1.AlternateKey"})
            value = ET.SubElement(ET.SubElement(record, "PropertyValue", {"Property": "Key"}),
                                  "Collection")
            for column in key.attributes:
                column_def = entity.attribute(column)
                ref = ET.SubElement(value, "Record", {"Type": "OData.Community.Keys.V1.PropertyRef"})
                ET.SubElement(ref, "PropertyValue", {"Property": "Alias", "String": column})
                ET.SubElement(ref, "PropertyValue", {
                    "Property": "Name",
                    "PropertyPath": column_def.property_name if column_def else column})

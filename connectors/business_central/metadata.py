"""What the connector learns from ``$metadata``: entity sets, keys, fields, versions.

Features
    * Parses the CSDL of each configured API route into :class:`PageInfo`: the key
      property (``id``, or ``No`` on Resco's pages), properties with their EDM types,
      length limits and read-only flag (``Org.OData.Core.V1.Permissions`` = ``Read``).
    * Finds the change-detection properties by name: the row version
      (``systemRowVersion``, else ``RowVersionNumber``, any casing) and the modification
      time (``lastModifiedDateTime``, else ``SystemModifiedAt``).
    * Turns a page into the bus's :class:`~connectors.base.EntityInfo` (portable types,
      ``number`` or ``No`` as a unique key for upserts).

Configuration
    None.

Limits
    * Navigation properties and enum types are not described (enums are strings).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from connectors.base import EntityInfo, FieldInfo, SchemaError

__all__ = ["FieldMeta", "PageInfo", "entity_info", "parse_metadata"]

_EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
_READ = "Org.OData.Core.V1.Permission/Read"
_PORTABLE = {"Edm.String": "string", "Edm.Guid": "uuid", "Edm.Decimal": "decimal",
             "Edm.Double": "float", "Edm.Int32": "integer", "Edm.Int64": "integer",
             "Edm.Int16": "integer", "Edm.Byte": "integer", "Edm.Boolean": "boolean",
             "Edm.Date": "date", "Edm.DateTimeOffset": "datetime", "Edm.TimeOfDay": "time",
             "Edm.Binary": "binary", "Edm.Stream": "binary"}
_VERSION_NAMES = ("systemrowversion", "rowversionnumber")
_MODIFIED_NAMES = ("lastmodifieddatetime", "systemmodifiedat")
_NUMBER_NAMES = ("number", "no")
_SKIP_SETS = {"companies", "subscriptions"}


@dataclass(frozen=True, slots=True)
class FieldMeta:
    """One property of a page."""

    name: str
    type: str
    max_length: int | None = None
    read_only: bool = False
    nullable: bool = True


@dataclass(frozen=True, slots=True)
class PageInfo:
    """An entity set of one API route, as ``$metadata`` describes it."""

    api: str
    entity_set: str
    entity_type: str
    key: str
    fields: dict[str, FieldMeta] = field(default_factory=dict)
    children: tuple[str, ...] = ()

    @property
    def key_is_guid(self) -> bool:
        """True when records are addressed by a GUID (``customers(<id>)``)."""
        return self.fields[self.key].type == "Edm.Guid"

    @property
    def version_field(self) -> str | None:
        """``systemRowVersion`` / ``RowVersionNumber`` if the page has one."""
        return self._named(_VERSION_NAMES)

    @property
    def modified_field(self) -> str | None:
        """``lastModifiedDateTime`` / ``SystemModifiedAt`` if the page has one."""
        return self._named(_MODIFIED_NAMES)

    @property
    def number_field(self) -> str | None:
        """``number`` (or ``No``) if the page has one."""
        return self._named(_NUMBER_NAMES)

    def _named(self, names: tuple[str, ...]) -> str | None:
        folded = {n.lower(): n for n in self.fields}
        return next((folded[n] for n in names if n in folded), None)


def parse_metadata(xml: str, api: str) -> dict[str, PageInfo]:
    """Read the entity sets of one API route from its CSDL.

    Args:
        xml: The ``$metadata`` document.
        api: The route it came from (``v2.0``, ``Resco/RescoIntegrations/v2.0``…).

    Returns:
        Entity set name → page (``companies`` and ``subscriptions`` left out).

    Raises:
        SchemaError: the document is not CSDL.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise SchemaError(f"$metadata of API {api!r} is not XML: {exc}") from exc
    types: dict[str, ET.Element] = {}
    namespaces: dict[str, str] = {}
    for schema in root.iter(f"{_EDM}Schema"):
        for etype in schema.findall(f"{_EDM}EntityType"):
            types[etype.get("Name", "")] = etype
            namespaces[etype.get("Name", "")] = schema.get("Namespace", "")
    pages: dict[str, PageInfo] = {}
    for eset in root.iter(f"{_EDM}EntitySet"):
        name = eset.get("Name", "")
        type_name = eset.get("EntityType", "").rsplit(".", 1)[-1]
        found = types.get(type_name)
        if name in _SKIP_SETS or found is None:
            continue
        page = _page(api, name, type_name, found)
        if page is not None:
            pages[name] = page
    return pages


def _page(api: str, name: str, type_name: str, etype: ET.Element) -> PageInfo | None:
    refs = etype.findall(f"{_EDM}Key/{_EDM}PropertyRef")
    if len(refs) != 1:
        return None  # composite keys cannot be addressed (nor subscribed) here
    fields = {}
    for prop in etype.findall(f"{_EDM}Property"):
        pname = prop.get("Name", "")
        read_only = any(m.text == _READ for m in prop.iter(f"{_EDM}EnumMember"))
        length = prop.get("MaxLength")
        fields[pname] = FieldMeta(pname, prop.get("Type", "Edm.String"),
                                  int(length) if length and length.isdigit() else None,
                                  read_only, prop.get("Nullable", "true") != "false")
    children = tuple(n.get("Name", "") for n in etype.findall(f"{_EDM}NavigationProperty")
                     if n.get("ContainsTarget") == "true")
    key = refs[0].get("Name", "")
    if key not in fields:
        return None
    return PageInfo(api, name, type_name, key, fields, children)


def entity_info(page: PageInfo, extra_keys: list[str] | None = None) -> EntityInfo:
    """The bus's description of a page.

    All fields are nullable: Business Central stores empty values, never NULL, and
    assigns ``id`` and ``number`` itself, so no field is required of a writer.

    Args:
        page: The page.
        extra_keys: Configured alternate upsert key fields.

    Returns:
        The entity with ``key = (<page key>,)`` and ``number``/``No`` (and the extra
        key, if any) as unique keys.
    """
    uniques: list[tuple[str, ...]] = []
    if page.number_field and page.number_field != page.key:
        uniques.append((page.number_field,))
    if extra_keys:
        uniques.append(tuple(extra_keys))
    fields = tuple(FieldInfo(f.name, _PORTABLE.get(f.type, "other"), True, f.name == page.key)
                   for f in page.fields.values())
    tracked = page.version_field is not None or page.modified_field is not None
    return EntityInfo(page.entity_set, fields, (page.key,), tuple(uniques), tracked)


def describe_pages(pages: dict[str, PageInfo], extra: dict[str, Any]) -> list[EntityInfo]:
    """:func:`entity_info` of every page (``extra``: entity → its settings with ``key``)."""
    return [entity_info(p, list(getattr(extra.get(n), "key", []) or [])) for n, p in pages.items()]

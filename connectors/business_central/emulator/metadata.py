"""``$metadata`` of the emulated APIs: an OData CSDL (XML) document per API route.

Features
    * One ``EntityType`` per page with its ``Key``, properties (EDM type, ``Nullable``,
      ``MaxLength``) and the ``Org.OData.Core.V1.Permissions`` = ``Read`` annotation on
      read-only properties; ``salesOrder`` has the contained ``salesOrderLines``.
    * ``EntitySet`` entries in the ``NAV`` container, ``companies`` included, and
      ``subscriptions`` on every route (webhooks are per API route).

Configuration
    None.

Limits
    * Option fields are ``Edm.String`` here (Business Central declares enum types).
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

from connectors.business_central.emulator.model import PAGES, PageDef, PageField

__all__ = ["metadata_xml"]

_READ_ONLY = ('<Annotation Term="Org.OData.Core.V1.Permissions"><EnumMember>'
              'Org.OData.Core.V1.Permission/Read</EnumMember></Annotation>')
_COMPANY = """<EntityType Name="company"><Key><PropertyRef Name="id"/></Key>
<Property Name="id" Type="Edm.Guid" Nullable="false"/>
<Property Name="systemVersion" Type="Edm.String"/><Property Name="timestamp" Type="Edm.Int64"/>
<Property Name="name" Type="Edm.String" MaxLength="30"/>
<Property Name="displayName" Type="Edm.String" MaxLength="250"/>
<Property Name="businessProfileId" Type="Edm.String" MaxLength="250"/></EntityType>"""
_SUBSCRIPTION = """<EntityType Name="subscriptions"><Key><PropertyRef Name="subscriptionId"/></Key>
<Property Name="subscriptionId" Type="Edm.String" Nullable="false" MaxLength="150"/>
<Property Name="notificationUrl" Type="Edm.String"/><Property Name="resource" Type="Edm.String"/>
<Property Name="timestamp" Type="Edm.Int32"/><Property Name="userId" Type="Edm.Guid"/>
<Property Name="lastModifiedDateTime" Type="Edm.DateTimeOffset"/>
<Property Name="clientState" Type="Edm.String" MaxLength="250"/>
<Property Name="expirationDateTime" Type="Edm.DateTimeOffset"/></EntityType>"""


def metadata_xml(api: str) -> str | None:
    """The CSDL document of API route ``api``.

    Args:
        api: The route after ``/api/`` (publisher and group case-insensitive).

    Returns:
        The XML text, or None when no page lives on that route.
    """
    pages = [p for p in PAGES if p.api.lower() == api.lower()]
    if not pages:
        return None
    types = "\n".join(_entity_type(p, pages) for p in pages)
    sets = "\n".join(f'<EntitySet Name="{p.entity_set}" EntityType="Microsoft.NAV.'
                     f'{p.entity_type}"/>' for p in pages)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">
<edmx:DataServices><Schema Namespace="Microsoft.NAV" xmlns="http://docs.oasis-open.org/odata/ns/edm">
{_COMPANY}
{_SUBSCRIPTION}
{types}
<EntityContainer Name="NAV">
<EntitySet Name="companies" EntityType="Microsoft.NAV.company"/>
<EntitySet Name="subscriptions" EntityType="Microsoft.NAV.subscriptions"/>
{sets}
</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>
"""


def _entity_type(page: PageDef, pages: list[PageDef]) -> str:
    props = "\n".join(_property(f, f.name == page.key) for f in page.fields)
    children = "".join(
        f'<NavigationProperty Name="{c.entity_set}" Type="Collection(Microsoft.NAV.'
        f'{c.entity_type})" ContainsTarget="true"/>'
        for c in pages if c.parent_set == page.entity_set)
    return (f'<EntityType Name="{page.entity_type}"><Key><PropertyRef Name="{page.key}"/></Key>'
            f"\n{props}{children}</EntityType>")


def _property(f: PageField, key: bool) -> str:
    attrs = f'Name={quoteattr(f.name)} Type="{f.type}"'
    if key:
        attrs += ' Nullable="false"'
    if f.max_length is not None:
        attrs += f' MaxLength="{f.max_length}"'
    if f.read_only and not key:
        return f"<Property {attrs}>{_READ_ONLY}</Property>"
    return f"<Property {attrs}/>"

"""What the emulated Business Central holds: tables, their fields, and the API pages.

Tables are Business Central's own (``Customer``, ``Vendor``, ``Contact``, ``Item``,
``Sales Header``, ``Sales Line``) with fields named like the API v2.0 properties. API
pages are views of a table: the standard API v2.0 pages, the pages of Resco's
``RescoIntegrations`` extension (different names and casing, string keys, the
``RowVersionNumber`` the extension maintains) and a custom API page exposing
``systemRowVersion`` as Business Central 21 and later can.

Features
    * Every table gets a ``SystemId`` (the API ``id``), ``SystemCreatedAt``,
      ``SystemModifiedAt`` (``lastModifiedDateTime``) and the row version (SQL
      ``timestamp``) from one database-wide counter.
    * Number series per table (``C00010``, ``V00010``, ``CT000010``, ``1000``…).
    * Page fields point at table fields or at the system fields (``@id``,
      ``@modified``, ``@created``, ``@rv``, ``@rescoRv``).

Configuration
    None: the model is fixed. Tests can still add rows of any table.

Limits
    * Field lists follow the v2.0 reference; rarely used fields are left out.
    * Lookups (currency, payment terms, posting groups…) are free text, not validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "API_V2",
    "CUSTOM_API",
    "FieldDef",
    "PAGES",
    "PageDef",
    "PageField",
    "RESCO_API",
    "TABLES",
    "TableDef",
    "default_value",
    "find_page",
]

#: Route of the standard API (after ``/api/``).
API_V2 = "v2.0"
#: Route of Resco's extension pages (``APIPublisher/APIGroup/APIVersion``).
RESCO_API = "Resco/RescoIntegrations/v2.0"
#: Route of the emulator's sample custom API page with ``systemRowVersion``.
CUSTOM_API = "syncbus/tracking/v1.0"

_EMPTY_GUID = "00000000-0000-0000-0000-000000000000"
_DEFAULTS: dict[str, Any] = {
    "Edm.String": "", "Edm.Guid": _EMPTY_GUID, "Edm.Decimal": 0, "Edm.Int32": 0,
    "Edm.Int64": 0, "Edm.Boolean": False, "Edm.Date": "0001-01-01",
    "Edm.DateTimeOffset": "0001-01-01T00:00:00Z",
}


def default_value(edm_type: str) -> Any:
    """The value Business Central shows for an empty field of ``edm_type`` (never null)."""
    return _DEFAULTS[edm_type]


@dataclass(frozen=True, slots=True)
class FieldDef:
    """A table field.

    Attributes:
        name: The API v2.0 property name (camelCase).
        type: Its EDM type.
        max_length: Longest text accepted (``Application_StringExceededLength`` beyond).
        read_only: Computed by the server (totals, balances, FlowFields).
        enum: Allowed values of an option field.
    """

    name: str
    type: str = "Edm.String"
    max_length: int | None = None
    read_only: bool = False
    enum: tuple[str, ...] | None = None


def _s(name: str, length: int = 100, **kw: Any) -> FieldDef:
    return FieldDef(name, "Edm.String", length, **kw)


def _d(name: str, **kw: Any) -> FieldDef:
    return FieldDef(name, "Edm.Decimal", **kw)


def _g(name: str, **kw: Any) -> FieldDef:
    return FieldDef(name, "Edm.Guid", **kw)


def _b(name: str, **kw: Any) -> FieldDef:
    return FieldDef(name, "Edm.Boolean", **kw)


def _e(name: str, *values: str) -> FieldDef:
    return FieldDef(name, "Edm.String", 30, enum=values)


_ADDRESS = (_s("addressLine1"), _s("addressLine2", 50), _s("city", 30), _s("state", 30),
            _s("country", 10), _s("postalCode", 20))


@dataclass(frozen=True, slots=True)
class TableDef:
    """A Business Central table.

    Attributes:
        name: The AL table name (``Customer``), used in error messages.
        fields: Its fields (the system fields are implicit).
        number_prefix, number_start, number_step, number_width: the number series.
        resco_row_version: Resco's table extension keeps ``RowVersionNumber`` on it.
        parent: Table whose record owns this one (lines: ``documentId``).
    """

    name: str
    fields: tuple[FieldDef, ...]
    number_prefix: str = ""
    number_start: int = 10
    number_step: int = 10
    number_width: int = 5
    resco_row_version: bool = False
    parent: str | None = None

    def field(self, name: str) -> FieldDef | None:
        """The field called ``name`` or None."""
        return next((f for f in self.fields if f.name == name), None)

    def number(self, n: int) -> str:
        """The ``n``-th number of this table's series."""
        return f"{self.number_prefix}{n:0{self.number_width}d}"


TABLES: dict[str, TableDef] = {t.name: t for t in (
    TableDef("Customer", (
        _s("number", 20), _s("displayName"), _e("type", "Company", "Person"), *_ADDRESS,
        _s("phoneNumber", 30), _s("email", 80), _s("website", 80), _s("salespersonCode", 20),
        _d("balanceDue", read_only=True), _d("creditLimit"), _b("taxLiable"), _g("taxAreaId"),
        _s("taxAreaDisplayName", read_only=True), _s("taxRegistrationNumber", 20),
        _g("currencyId"), _s("currencyCode", 10), _g("paymentTermsId"), _g("shipmentMethodId"),
        _g("paymentMethodId"), _e("blocked", " ", "Ship", "Invoice", "All"),
        _s("primaryContactNo", 20),
    ), "C", 10, 10, 5, resco_row_version=True),
    TableDef("Vendor", (
        _s("number", 20), _s("displayName"), *_ADDRESS, _s("phoneNumber", 30),
        _s("email", 80), _s("website", 80), _s("taxRegistrationNumber", 20), _g("currencyId"),
        _s("currencyCode", 10), _s("irs1099Code", 10), _g("paymentTermsId"),
        _g("paymentMethodId"), _b("taxLiable"), _e("blocked", " ", "Payment", "All"),
        _d("balance", read_only=True),
    ), "V", 10, 10, 5),
    TableDef("Contact", (
        _s("number", 20), _e("type", "Company", "Person"), _s("displayName"),
        _s("companyNumber", 20), _s("companyName", read_only=True),
        _e("contactBusinessRelation", "None", "Customer", "Vendor", "Bank Account",
           "Employee", "Multiple", "Other"),
        *_ADDRESS, _s("phoneNumber", 30), _s("mobilePhoneNumber", 30), _s("email", 80),
        _s("website", 80), _s("searchName", read_only=True), _b("privacyBlocked"),
        _s("taxRegistrationNumber", 20), FieldDef("lastInteractionDate", "Edm.Date",
                                                   read_only=True),
        _s("customerNumber", 20, read_only=True),
    ), "CT", 10, 10, 6, resco_row_version=True),
    TableDef("Item", (
        _s("number", 20), _s("displayName"), _s("displayName2", 50),
        _e("type", "Inventory", "Service", "Non-Inventory"), _g("itemCategoryId"),
        _s("itemCategoryCode", 20), _b("blocked"), _s("gtin", 14),
        _d("inventory", read_only=True), _d("unitPrice"), _b("priceIncludesTax"),
        _d("unitCost"), _g("taxGroupId"), _s("taxGroupCode", 20), _g("baseUnitOfMeasureId"),
        _s("baseUnitOfMeasureCode", 10), _g("generalProductPostingGroupId"),
        _s("generalProductPostingGroupCode", 20), _g("inventoryPostingGroupId"),
        _s("inventoryPostingGroupCode", 20),
    ), "", 1000, 10, 4, resco_row_version=True),
    TableDef("Sales Header", (
        _s("number", 20), _s("externalDocumentNumber", 35),
        FieldDef("orderDate", "Edm.Date"), FieldDef("postingDate", "Edm.Date"),
        _g("customerId"), _s("customerNumber", 20), _s("customerName", read_only=True),
        _s("billToName", read_only=True), _g("billToCustomerId"), _s("billToCustomerNumber", 20),
        _s("shipToName"), _s("shipToContact"),
        *(_s(f"{p}{f}", n) for p in ("sellTo", "billTo", "shipTo")
          for f, n in (("AddressLine1", 100), ("AddressLine2", 50), ("City", 30),
                       ("Country", 10), ("State", 30), ("PostCode", 20))),
        _g("currencyId"), _s("currencyCode", 10), _b("pricesIncludeTax"), _g("paymentTermsId"),
        _g("shipmentMethodId"), _s("salesperson", 20), _b("partialShipping"),
        FieldDef("requestedDeliveryDate", "Edm.Date"), _d("discountAmount"),
        _b("discountAppliedBeforeTax", read_only=True),
        _d("totalAmountExcludingTax", read_only=True), _d("totalTaxAmount", read_only=True),
        _d("totalAmountIncludingTax", read_only=True), _b("fullyShipped", read_only=True),
        FieldDef("status", "Edm.String", 20, read_only=True,
                 enum=("Draft", "In Review", "Open")),
        _s("phoneNumber", 30), _s("email", 80),
    ), "S-ORD", 101001, 1, 6),
    TableDef("Sales Line", (
        _g("documentId"), FieldDef("sequence", "Edm.Int32"), _g("itemId"), _g("accountId"),
        _e("lineType", "Comment", "Account", "Item", "Resource", "Fixed Asset", "Charge"),
        _s("lineObjectNumber", 20), _s("description"), _s("description2", 50),
        _g("unitOfMeasureId"), _s("unitOfMeasureCode", 10), _d("quantity"), _d("unitPrice"),
        _d("discountAmount"), _d("discountPercent"),
        _d("amountExcludingTax", read_only=True), _s("taxCode", 20),
        _d("taxPercent", read_only=True), _d("totalTaxAmount", read_only=True),
        _d("amountIncludingTax", read_only=True), _d("netAmount", read_only=True),
        FieldDef("shipmentDate", "Edm.Date"), _d("shippedQuantity", read_only=True),
        _d("invoicedQuantity", read_only=True),
    ), parent="Sales Header"),
)}


@dataclass(frozen=True, slots=True)
class PageField:
    """A property of an API page: a table field or a system field (``@id``, ``@rv``…)."""

    name: str
    source: str
    type: str = "Edm.String"
    max_length: int | None = None
    read_only: bool = False
    enum: tuple[str, ...] | None = None


#: System sources and their EDM types.
_SYSTEM = {"@id": "Edm.Guid", "@modified": "Edm.DateTimeOffset",
           "@created": "Edm.DateTimeOffset", "@rv": "Edm.Int64", "@rescoRv": "Edm.Int64"}


@dataclass(frozen=True, slots=True)
class PageDef:
    """An API page: an entity set over a table.

    Attributes:
        api: The route after ``/api/`` (``v2.0``, ``Resco/RescoIntegrations/v2.0``…).
        entity_set, entity_type: OData names.
        table: The source table.
        key: The property single records are addressed by (``id``, or ``No`` on Resco pages).
        fields: The properties, in order.
        webhooks: Whether subscriptions are accepted (single-field key, supported list).
        parent_set: Entity set it is nested under (``salesOrderLines`` → ``salesOrders``).
        insert_defaults: Table values forced on insert (Resco contacts are persons).
    """

    api: str
    entity_set: str
    entity_type: str
    table: str
    key: str
    fields: tuple[PageField, ...]
    webhooks: bool = True
    parent_set: str | None = None
    insert_defaults: dict[str, Any] = field(default_factory=dict)

    def field(self, name: str) -> PageField | None:
        """The property called ``name`` or None."""
        return next((f for f in self.fields if f.name == name), None)

    def field_for(self, source: str) -> PageField | None:
        """The property showing table field (or system field) ``source``, or None."""
        return next((f for f in self.fields if f.source == source), None)

    @property
    def key_field(self) -> PageField:
        """The key property."""
        found = self.field(self.key)
        assert found is not None
        return found

    @property
    def modified_field(self) -> PageField | None:
        """The property showing ``SystemModifiedAt``, if any."""
        return self.field_for("@modified")

    @property
    def version_field(self) -> PageField | None:
        """The row-version property (``RowVersionNumber`` / ``systemRowVersion``), if any."""
        return self.field_for("@rescoRv") or self.field_for("@rv")


def _pf(table: TableDef, name: str, source: str | None = None, *,
        read_only: bool | None = None) -> PageField:
    source = source or name
    if source in _SYSTEM:
        return PageField(name, source, _SYSTEM[source], read_only=True)
    fd = table.field(source)
    assert fd is not None, f"{table.name}.{source}"
    return PageField(name, source, fd.type, fd.max_length,
                     fd.read_only if read_only is None else read_only, fd.enum)


def _standard(set_name: str, type_name: str, table: str, *, webhooks: bool = True,
              modified: bool = True, hidden: tuple[str, ...] = (),
              parent: str | None = None) -> PageDef:
    tdef = TABLES[table]
    fields = [_pf(tdef, "id", "@id")]
    fields += [_pf(tdef, f.name) for f in tdef.fields if f.name not in hidden]
    if modified:
        fields.append(_pf(tdef, "lastModifiedDateTime", "@modified"))
    return PageDef(API_V2, set_name, type_name, table, "id", tuple(fields), webhooks,
                   parent_set=parent)


def _mapped(api: str, set_name: str, table: str, key: str,
            spec: tuple[tuple[str, str], ...], *, webhooks: bool = True,
            read_only: tuple[str, ...] = (), **kw: Any) -> PageDef:
    tdef = TABLES[table]
    fields = tuple(_pf(tdef, name, src, read_only=True if name in read_only else None)
                   for name, src in spec)
    return PageDef(api, set_name, set_name, table, key, fields, webhooks, **kw)


_RESCO_ADDRESS = (("Name", "displayName"), ("Email", "email"), ("Address", "addressLine1"),
                  ("Address2", "addressLine2"), ("CountryRegionCode", "country"),
                  ("City", "city"), ("State", "state"), ("PostCode", "postalCode"),
                  ("PhoneNo", "phoneNumber"), ("HomePage", "website"))

PAGES: tuple[PageDef, ...] = (
    _standard("customers", "customer", "Customer", hidden=("primaryContactNo",)),
    _standard("vendors", "vendor", "Vendor"),
    # Contacts are missing from the documented webhook list (§2.6).
    _standard("contacts", "contact", "Contact", webhooks=False, hidden=("customerNumber",)),
    _standard("items", "item", "Item"),
    _standard("salesOrders", "salesOrder", "Sales Header"),
    _standard("salesOrderLines", "salesOrderLine", "Sales Line", modified=False,
              parent="salesOrders"),
    _mapped(RESCO_API, "RescoCustomer", "Customer", "No", (
        ("No", "number"), *_RESCO_ADDRESS, ("PrimaryContacNo", "primaryContactNo"),
        ("SystemModifiedAt", "@modified"), ("RowVersionNumber", "@rescoRv")),
        read_only=("No",)),
    _mapped(RESCO_API, "RescoContact", "Contact", "No", (
        ("No", "number"), *_RESCO_ADDRESS, ("CustomerNo", "customerNumber"),
        ("ContactBusinessRelation", "contactBusinessRelation"), ("Type", "type"),
        ("SystemModifiedAt", "@modified"), ("RowVersionNumber", "@rescoRv")),
        read_only=("No", "CustomerNo"), insert_defaults={"type": "Person"}),
    _mapped(RESCO_API, "RescoItem", "Item", "no", (
        ("no", "number"), ("description", "displayName"), ("type", "type"),
        ("unitPrice", "unitPrice"), ("unitCost", "unitCost"),
        ("baseUnitOfMeasure", "baseUnitOfMeasureCode"), ("inventory", "inventory"),
        ("blocked", "blocked"), ("systemId", "@id"), ("systemCreatedAt", "@created"),
        ("systemModifiedAt", "@modified"), ("rowVersionNumber", "@rescoRv"),
        ("lastDateTimeModified", "@modified")), read_only=("no",)),
    _mapped(CUSTOM_API, "trackedVendors", "Vendor", "id", (
        ("id", "@id"), ("number", "number"), ("displayName", "displayName"),
        ("email", "email"), ("phoneNumber", "phoneNumber"), ("city", "city"),
        ("country", "country"), ("balance", "balance"), ("systemModifiedAt", "@modified"),
        ("systemRowVersion", "@rv"))),
)


def find_page(api: str, entity_set: str) -> PageDef | None:
    """The page of ``entity_set`` in API route ``api`` (publisher/group case-insensitive).

    Args:
        api: Route after ``/api/``, e.g. ``resco/rescointegrations/v2.0``.
        entity_set: The entity set name (case-sensitive).

    Returns:
        The page, or None.
    """
    wanted = api.lower()
    return next((p for p in PAGES if p.api.lower() == wanted and p.entity_set == entity_set),
                None)

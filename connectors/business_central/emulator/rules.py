"""Business rules of the emulated tables: validation, number series, derived fields.

Features
    * Request bodies are checked against the page: unknown properties, read-only
      properties (accepted only when unchanged), EDM types, option values and text
      lengths, with Business Central's error codes.
    * ``number`` comes from the table's number series unless given; it is unique per
      company (``Internal_EntityWithSameKeyExists``).
    * Contacts get ``searchName`` and ``companyName``; sales orders get the customer's
      name and addresses, ``status = Draft``, and totals from their lines; sales lines
      get their item, sequence and amounts, and every line change modifies the header
      (as posting a line recalculates the order in Business Central).

Configuration
    None.

Limits
    * No tax calculation (tax is 0), no currency conversion, no posting.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

from connectors.business_central.emulator import errors
from connectors.business_central.emulator.model import TABLES, PageDef, PageField, default_value
from connectors.business_central.emulator.store import Company, Record, Store, format_datetime

__all__ = ["create", "find_by_number", "modify", "remove", "view"]

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_LINE_STEP = 10000


def view(page: PageDef, record: Record) -> dict[str, Any]:
    """The record as ``page`` shows it, ``@odata.etag`` first.

    Args:
        page: The API page.
        record: The table row.

    Returns:
        A JSON object.
    """
    out: dict[str, Any] = {"@odata.etag": record.etag}
    for f in page.fields:
        out[f.name] = _value(f, record)
    return out


def _value(f: PageField, record: Record) -> Any:
    source = f.source
    if source == "@id":
        return record.id
    if source == "@modified":
        return format_datetime(record.modified)
    if source == "@created":
        return format_datetime(record.created)
    if source == "@rv":
        return record.rv
    if source == "@rescoRv":
        return record.resco_rv
    return record.values.get(source, default_value(f.type))


def create(store: Store, company: Company, page: PageDef, body: dict[str, Any], *,
           parent: Record | None = None) -> Record:
    """Insert a record through ``page`` (POST), with the table's rules.

    Args:
        store: The store (inside a transaction).
        company: The company.
        page: The page posted to.
        body: The request body.
        parent: The sales order a line is posted under, if nested.

    Returns:
        The new record.

    Raises:
        BCError: 400 for a bad body, a duplicate number, an unknown customer or item.
    """
    table = TABLES[page.table]
    values = _table_values(page, body, None)
    record_id = values.pop("@id", None)
    values = {**page.insert_defaults, **values}
    if table.field("number") is not None and table.parent is None:
        number = str(values.get("number") or "") or store.next_number(company, table)
        _unique_number(company, page.table, number, None)
        values["number"] = number
    values = _derive(store, company, page.table, values, None, parent)
    record = store.insert(company, page.table, values, record_id=record_id)
    _after_write(store, company, page.table, record)
    return record


def modify(store: Store, company: Company, page: PageDef, record: Record,
           body: dict[str, Any], if_match: str | None) -> Record:
    """Update ``record`` through ``page`` (PATCH).

    Raises:
        BCError: 409 stale ETag, 400 bad body or duplicate number.
    """
    store.check_etag(record, if_match)
    values = _table_values(page, body, record)
    values.pop("@id", None)
    if "number" in values and values["number"] != record.values.get("number"):
        _unique_number(company, page.table, str(values["number"]), record.id)
    values = _derive(store, company, page.table, {**record.values, **values}, record, None)
    new = store.update(company, page.table, record, values, if_match=None)
    _after_write(store, company, page.table, new)
    return new


def remove(store: Store, company: Company, page: PageDef, record: Record,
           if_match: str | None) -> None:
    """Delete ``record`` (DELETE); an order takes its lines with it.

    Raises:
        BCError: 409 stale ETag.
    """
    store.delete(company, page.table, record, if_match=if_match)
    if page.table == "Sales Header":
        for line in [r for r in company.rows("Sales Line").values()
                     if r.values.get("documentId") == record.id]:
            store.delete(company, "Sales Line", line, if_match=None)
    _after_write(store, company, page.table, record)


def find_by_number(company: Company, table: str, number: str) -> Record | None:
    """The record of ``table`` whose ``number`` is ``number`` (case-insensitive), or None."""
    return company.by_number(table, number)


# -- bodies -------------------------------------------------------------------------------


def _table_values(page: PageDef, body: dict[str, Any], current: Record | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in body.items():
        if name.startswith("@odata.") or "@odata." in name:
            continue
        f = page.field(name)
        if f is None:
            raise errors.unknown_property(name, page.entity_type)
        writable_id = f.source == "@id" and current is None
        if f.read_only and not writable_id:
            if current is None or raw != _value(f, current):
                if current is None and raw in (None, "", 0, default_value(f.type)):
                    continue
                raise errors.read_only(name)
            continue
        value = _coerce(f, raw)
        out["@id" if f.source == "@id" else f.source] = value
    return out


def _coerce(f: PageField, raw: Any) -> Any:
    if raw is None:
        return default_value(f.type)
    t = f.type
    bad = errors.bad_request(f"Cannot convert the literal '{raw}' to the expected type "
                             f"'{t}'.")
    if t == "Edm.String":
        if not isinstance(raw, str):
            raise bad
        if f.enum is not None:
            match = next((v for v in f.enum if v.casefold() == raw.casefold()
                          or (v == " " and raw == "")), None)
            if match is None:
                raise errors.bad_request(f"The value \"{raw}\" can't be evaluated into type "
                                         f"{f.name}.", "BadRequest_InvalidEnumValue")
            return match
        if f.max_length is not None and len(raw) > f.max_length:
            raise errors.string_too_long(raw, f.max_length)
        return raw
    if t == "Edm.Guid":
        if not isinstance(raw, str) or not _GUID.match(raw):
            raise bad
        return raw.lower()
    if t == "Edm.Boolean":
        if not isinstance(raw, bool):
            raise bad
        return raw
    if t in ("Edm.Int32", "Edm.Int64"):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise bad
        return raw
    if t == "Edm.Decimal":
        return _decimal(raw, bad)
    if t == "Edm.Date":
        try:
            return date.fromisoformat(str(raw)).isoformat()
        except ValueError:
            raise bad from None
    try:
        return format_datetime(datetime.fromisoformat(str(raw).replace("Z", "+00:00")))
    except ValueError:
        raise bad from None


def _decimal(raw: Any, bad: errors.BCError) -> int | float:
    if isinstance(raw, bool):
        raise bad
    if isinstance(raw, int | float):
        number: float = float(raw)
    elif isinstance(raw, str):
        try:
            number = float(raw)
        except ValueError:
            raise bad from None
    else:
        raise bad
    number = round(number, 5)
    return int(number) if number.is_integer() else number


def _unique_number(company: Company, table: str, number: str, own_id: str | None) -> None:
    other = find_by_number(company, table, number)
    if other is not None and other.id != own_id:
        raise errors.duplicate_key(table, f"No.='{number}'")


# -- derived fields -----------------------------------------------------------------------


def _derive(store: Store, company: Company, table: str, values: dict[str, Any],
            current: Record | None, parent: Record | None) -> dict[str, Any]:
    if table == "Contact":
        values["searchName"] = str(values.get("displayName", "")).upper()
        company_no = values.get("companyNumber")
        if company_no:
            owner = find_by_number(company, "Contact", str(company_no))
            values["companyName"] = owner.values.get("displayName", "") if owner else ""
    elif table == "Sales Header":
        _derive_order(company, values, current, store)
    elif table == "Sales Line":
        _derive_line(company, values, current, parent)
    return values


def _derive_order(company: Company, values: dict[str, Any], current: Record | None,
                  store: Store) -> None:
    customer = None
    if values.get("customerNumber"):
        customer = find_by_number(company, "Customer", str(values["customerNumber"]))
    elif values.get("customerId"):
        customer = company.rows("Customer").get(str(values["customerId"]))
    if customer is None:
        raise errors.bad_request("The customer does not exist. Identification fields and "
                                 "values: No.='" + str(values.get("customerNumber", "")) + "'",
                                 "Internal_RecordNotFound")
    cv = customer.values
    values.update(customerId=customer.id, customerNumber=cv.get("number", ""),
                  customerName=cv.get("displayName", ""), billToName=cv.get("displayName", ""),
                  billToCustomerId=customer.id, billToCustomerNumber=cv.get("number", ""))
    if current is None:
        for prefix in ("sellTo", "billTo", "shipTo"):
            for api, own in (("addressLine1", "AddressLine1"), ("addressLine2", "AddressLine2"),
                             ("city", "City"), ("country", "Country"), ("state", "State"),
                             ("postalCode", "PostCode")):
                values.setdefault(prefix + own, cv.get(api, ""))
        values.setdefault("shipToName", cv.get("displayName", ""))
        values.setdefault("orderDate", store.clock().date().isoformat())
        values.setdefault("postingDate", values["orderDate"])
        values.setdefault("currencyCode", cv.get("currencyCode", ""))
        values["status"] = "Draft"
    _order_totals(company, values, current.id if current else None)


def _order_totals(company: Company, values: dict[str, Any], order_id: str | None) -> None:
    lines = [r.values for r in company.rows("Sales Line").values()
             if order_id is not None and r.values.get("documentId") == order_id]
    total = round(sum(float(v.get("amountExcludingTax", 0)) for v in lines), 2)
    total -= float(values.get("discountAmount", 0) or 0)
    values.update(totalAmountExcludingTax=total, totalTaxAmount=0, totalAmountIncludingTax=total,
                  fullyShipped=bool(lines) and all(
                      float(v.get("shippedQuantity", 0)) >= float(v.get("quantity", 0))
                      for v in lines))


def _derive_line(company: Company, values: dict[str, Any], current: Record | None,
                 parent: Record | None) -> None:
    if parent is not None:
        values["documentId"] = parent.id
    order_id = str(values.get("documentId") or "")
    if order_id not in company.rows("Sales Header"):
        raise errors.bad_request("The sales order does not exist.", "Internal_RecordNotFound")
    if current is None and not values.get("sequence"):
        taken = [int(r.values.get("sequence", 0)) for r in company.rows("Sales Line").values()
                 if r.values.get("documentId") == order_id]
        values["sequence"] = max(taken, default=0) + _LINE_STEP
    item = None
    if values.get("itemId") and values["itemId"] != default_value("Edm.Guid"):
        item = company.rows("Item").get(str(values["itemId"]))
    elif values.get("lineObjectNumber") and values.get("lineType", "Item") == "Item":
        item = find_by_number(company, "Item", str(values["lineObjectNumber"]))
    if item is not None:
        values.setdefault("lineType", "Item")
        values.update(itemId=item.id, lineObjectNumber=item.values.get("number", ""))
        values.setdefault("description", item.values.get("displayName", ""))
        if not values.get("unitPrice"):
            values["unitPrice"] = item.values.get("unitPrice", 0)
        values.setdefault("unitOfMeasureCode", item.values.get("baseUnitOfMeasureCode", ""))
    elif values.get("lineType", "Item") == "Item" and values.get("lineObjectNumber"):
        raise errors.bad_request("The item does not exist. Identification fields and values: "
                                 f"No.='{values['lineObjectNumber']}'", "Internal_RecordNotFound")
    gross = float(values.get("quantity", 0)) * float(values.get("unitPrice", 0))
    discount = float(values.get("discountAmount", 0) or 0) or round(
        gross * float(values.get("discountPercent", 0) or 0) / 100, 2)
    amount = round(gross - discount, 2)
    values.update(amountExcludingTax=amount, taxPercent=0, totalTaxAmount=0,
                  amountIncludingTax=amount, netAmount=amount)


def _after_write(store: Store, company: Company, table: str, record: Record) -> None:
    """A line change modifies its order (totals), so the order's version moves too."""
    if table != "Sales Line":
        return
    order = company.rows("Sales Header").get(str(record.values.get("documentId")))
    if order is None:
        return
    values = dict(order.values)
    _order_totals(company, values, order.id)
    store.update(company, "Sales Header", order, values, if_match=None)

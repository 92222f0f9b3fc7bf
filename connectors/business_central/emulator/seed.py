"""Realistic sample data for the emulator (``--seed N``).

Features
    * ``N`` customers, vendors, contacts (a company contact per customer and people
      working for them) and items, plus ``N // 4`` sales orders (at most 500) with one
      to four lines each; names, addresses, phone numbers and e-mails look real and
      are deterministic (the same ``N`` gives the same data).

Configuration
    ``count`` (N) and the ``company`` to fill.

Limits
    * US addresses only; no currencies other than the local one.
"""

from __future__ import annotations

import random

from connectors.business_central.emulator import rules
from connectors.business_central.emulator.model import API_V2, PageDef, find_page
from connectors.business_central.emulator.store import Company, Store

__all__ = ["seed"]

_FIRST = ("Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Henry", "Isla", "Jack",
          "Katie", "Liam", "Mia", "Noah", "Olivia", "Peter", "Quinn", "Ruby", "Sam", "Tara")
_LAST = ("Anderson", "Brown", "Clark", "Davis", "Evans", "Fisher", "Garcia", "Harris", "Irwin",
         "Johnson", "King", "Lopez", "Miller", "Nelson", "Owens", "Parker", "Reed", "Smith")
_WORDS = ("Adatum", "Alpine", "Blue", "Coho", "Contoso", "Fabrikam", "Litware", "Northwind",
          "Proseware", "Relecloud", "Summit", "Trey", "Wide World", "Woodgrove", "Tailspin")
_KINDS = ("Corporation", "Furniture", "Supplies", "Trading", "Industries", "Partners", "Ltd.")
_CITIES = (("Atlanta", "GA", "31772"), ("Chicago", "IL", "61236"), ("Miami", "FL", "37125"),
           ("Seattle", "WA", "98101"), ("Boston", "MA", "02108"), ("Denver", "CO", "80202"),
           ("Austin", "TX", "73301"), ("Portland", "OR", "97035"))
_STREETS = ("Main Street", "Oak Avenue", "Pine Road", "Lake Drive", "Hill Street", "Elm Way")
_ITEMS = ("Desk", "Chair", "Lamp", "Cabinet", "Table", "Shelf", "Sofa", "Stool", "Bench",
          "Locker")
_ITEM_WORDS = ("ATHENS", "PARIS", "ROME", "MUNICH", "BERLIN", "LONDON", "AMSTERDAM", "OSLO")
#: Most sales orders a seed creates.
MAX_ORDERS = 500


def seed(store: Store, company: Company, count: int, *, rng_seed: int = 7) -> None:
    """Fill ``company`` with ``count`` records per master table and some orders.

    Args:
        store: The store.
        company: The company to fill.
        count: Records per master table (customers, vendors, contacts, items).
        rng_seed: Seed of the pseudo-random generator.
    """
    if count <= 0:
        return
    rng = random.Random(rng_seed)
    pages = {name: _page(name) for name in
             ("customers", "vendors", "contacts", "items", "salesOrders", "salesOrderLines")}
    with store.transaction():
        customers = [rules.create(store, company, pages["customers"], _party(rng, i, True))
                     for i in range(count)]
        for i in range(count):
            rules.create(store, company, pages["vendors"], _party(rng, i + count, False))
        for i in range(count):
            works_for = customers[i % len(customers)].values
            rules.create(store, company, pages["contacts"], {
                **_address(rng), "type": "Person", "displayName": _person(rng),
                "companyNumber": "", "email": f"contact{i}@{_domain(works_for['displayName'])}",
                "phoneNumber": _phone(rng), "mobilePhoneNumber": _phone(rng)})
        items = [rules.create(store, company, pages["items"], _item(rng, i)) for i in range(count)]
        for _ in range(min(count // 4, MAX_ORDERS)):
            customer = rng.choice(customers)
            order = rules.create(store, company, pages["salesOrders"], {
                "customerNumber": customer.values["number"],
                "externalDocumentNumber": f"PO-{rng.randint(10000, 99999)}"})
            for _ in range(rng.randint(1, 4)):
                item = rng.choice(items)
                rules.create(store, company, pages["salesOrderLines"], {
                    "lineType": "Item", "lineObjectNumber": item.values["number"],
                    "quantity": rng.randint(1, 20)}, parent=order)


def _page(name: str) -> PageDef:
    page = find_page(API_V2, name)
    assert page is not None, name
    return page


def _party(rng: random.Random, i: int, customer: bool) -> dict[str, object]:
    name = f"{rng.choice(_WORDS)} {rng.choice(_KINDS)}" + (f" {i}" if i >= len(_WORDS) else "")
    values: dict[str, object] = {
        "displayName": name, **_address(rng), "phoneNumber": _phone(rng),
        "email": f"{'sales' if customer else 'accounts'}@{_domain(name)}",
        "website": f"www.{_domain(name)}", "taxLiable": rng.random() < 0.5,
    }
    if customer:
        values.update(type="Company", creditLimit=rng.choice((0, 5000, 10000, 25000)),
                      salespersonCode=rng.choice(("JR", "PS", "OF")))
    return values


def _address(rng: random.Random) -> dict[str, str]:
    city, state, postal = rng.choice(_CITIES)
    return {"addressLine1": f"{rng.randint(1, 999)} {rng.choice(_STREETS)}", "city": city,
            "state": state, "postalCode": postal, "country": "US"}


def _item(rng: random.Random, i: int) -> dict[str, object]:
    cost = round(rng.uniform(20, 900), 2)
    return {"displayName": f"{rng.choice(_ITEM_WORDS)} {rng.choice(_ITEMS)}"
                           + (f" {i}" if i >= len(_ITEMS) else ""),
            "type": rng.choice(("Inventory", "Inventory", "Service")), "unitCost": cost,
            "unitPrice": round(cost * 1.4, 2), "baseUnitOfMeasureCode": "PCS",
            "itemCategoryCode": rng.choice(("TABLE", "CHAIR", "MISC")),
            "gtin": f"{rng.randint(10 ** 12, 10 ** 13 - 1)}"}


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _phone(rng: random.Random) -> str:
    return f"+1 {rng.randint(200, 999)}-{rng.randint(200, 999)}-{rng.randint(1000, 9999)}"


def _domain(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())[:20] + ".example"

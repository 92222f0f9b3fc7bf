"""Realistic sample data for the emulator (``--seed N``): accounts with their contacts.

Features
    * Deterministic for a given N: company names, account numbers ``ACC-000001``…,
      addresses, phone numbers, industries, revenue, employees, credit limits.
    * One to three contacts per account, each with ``parentcustomerid`` → the account;
      the first one becomes the account's ``primarycontactid``.

Configuration
    None.

Limits
    * Names come from small word lists, so they repeat beyond a few thousand rows
      (account numbers and e-mail addresses stay unique).
"""

from __future__ import annotations

import random
import uuid

from connectors.dataverse.emulator.store import Store

__all__ = ["seed"]

_PREFIXES = ("Contoso", "Fabrikam", "Northwind", "Adventure", "Litware", "Proseware", "Tailspin",
             "Wingtip", "Alpine", "Blue Yonder", "Coho", "Fourth Coffee", "Humongous", "Lucerne",
             "Margie's", "Nod", "Relecloud", "Southridge", "Trey", "VanArsdel", "Woodgrove",
             "Wide World", "Graphic", "Datum", "Consolidated", "Baldwin", "Bellows", "City Power")
_SUFFIXES = ("Ltd", "Inc.", "Group", "Holdings", "Works", "Systems", "Partners", "Trading",
             "Logistics", "Foods", "Motors", "Insurance", "Bank", "Media", "Labs", "Supplies")
_CITIES = (("Bratislava", "Slovakia", "811 01"), ("Prague", "Czechia", "110 00"),
           ("Vienna", "Austria", "1010"), ("Berlin", "Germany", "10115"),
           ("Seattle", "United States", "98101"), ("London", "United Kingdom", "EC1A 1BB"),
           ("Paris", "France", "75001"), ("Warsaw", "Poland", "00-001"),
           ("Budapest", "Hungary", "1051"), ("Madrid", "Spain", "28001"))
_STREETS = ("Main Street", "Hlavná", "Oak Avenue", "Station Road", "Market Square", "Park Lane",
            "Mill Road", "Church Street", "High Street", "River Walk")
_FIRST = ("Anna", "Peter", "Maria", "John", "Eva", "Martin", "Julia", "Thomas", "Lucia",
          "Michael", "Sofia", "David", "Zuzana", "Daniel", "Emma", "Jakub", "Laura", "Adam")
_LAST = ("Novak", "Smith", "Horvath", "Kovac", "Muller", "Garcia", "Brown", "Varga", "Nagy",
         "Schmidt", "Wilson", "Tomas", "Svoboda", "Fischer", "Taylor", "Lee", "Baker", "Marek")
_TITLES = ("Purchasing Manager", "CFO", "Sales Director", "IT Manager", "Owner", "Accountant",
           "Operations Lead", "Buyer", None)
_NS = uuid.UUID("5f0c2a55-2f5e-4f39-9a53-7d5ad2b7a0ff")


def seed(store: Store, accounts: int) -> int:
    """Load ``accounts`` accounts and their contacts into ``store``.

    Args:
        store: An emulator store with the default ``account`` and ``contact`` tables.
        accounts: How many accounts.

    Returns:
        How many rows were created in all.
    """
    rng = random.Random(accounts)
    account_table, contact_table = store.tables["account"], store.tables["contact"]
    created = 0
    with store.request():
        for n in range(1, accounts + 1):
            account_id = str(uuid.uuid5(_NS, f"account/{n}"))
            city, country, postcode = rng.choice(_CITIES)
            name = f"{rng.choice(_PREFIXES)} {rng.choice(_SUFFIXES)}"
            domain = name.lower().replace(" ", "").replace("'", "").replace(".", "")
            store.insert(account_table, account_id, {
                "name": name, "accountnumber": f"ACC-{n:06d}",
                "telephone1": f"+421 2 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}",
                "emailaddress1": f"info@{domain}{n}.example", "websiteurl": f"https://{domain}.example",
                "address1_line1": f"{rng.randint(1, 200)} {rng.choice(_STREETS)}",
                "address1_city": city, "address1_postalcode": postcode, "address1_country": country,
                "industrycode": rng.randint(1, 33), "numberofemployees": rng.randint(1, 5000),
                "revenue": round(rng.uniform(10_000, 50_000_000), 2),
                "creditlimit": float(rng.choice((5_000, 10_000, 25_000, 50_000, 100_000))),
                "creditonhold": rng.random() < 0.05, "statecode": 0 if rng.random() < 0.95 else 1,
                "description": None,
            })
            created += 1
            first_contact = None
            for c in range(rng.randint(1, 3)):
                contact_id = str(uuid.uuid5(_NS, f"contact/{n}/{c}"))
                first, last = rng.choice(_FIRST), rng.choice(_LAST)
                store.insert(contact_table, contact_id, {
                    "firstname": first, "lastname": last, "jobtitle": rng.choice(_TITLES),
                    "emailaddress1": f"{first}.{last}.{n}.{c}@{domain}{n}.example".lower(),
                    "telephone1": f"+421 9{rng.randint(10, 99)} {rng.randint(100, 999)} "
                                  f"{rng.randint(100, 999)}",
                    "birthdate": f"{rng.randint(1950, 2000)}-{rng.randint(1, 12):02d}-"
                                 f"{rng.randint(1, 28):02d}",
                    "parentcustomerid": {"id": account_id, "logicalname": "account"},
                    "statecode": 0,
                })
                first_contact = first_contact or contact_id
                created += 1
            if first_contact is not None:
                store.update(account_table, account_id, {
                    "primarycontactid": {"id": first_contact, "logicalname": "contact"}})
    return created

"""The three systems of ``syncbus demo``: Dataverse, a SQLite hub, Business Central.

Features
    * The Dataverse and Business Central emulators on loopback (HTTPS, a local CA per
      emulator in ``<dir>/certs``), seeded with realistic accounts, contacts and
      customers; a SQLite hub database with ``accounts`` and ``contacts`` whose
      ``accounts.name`` is limited by a trigger (the rule the demo trips over).
    * ``<dir>/sync.yaml``: two-way links Dataverse accounts ↔ hub accounts ↔ Business
      Central customers and Dataverse contacts ↔ hub contacts (a lookup to accounts);
      secrets live in ``<dir>/secrets/`` (mode 0600) and the config reads them with
      ``${file:…}``, so the CLI can use the file while the demo runs.
    * Snapshots of each system on the synced fields, normalised so that the same
      content compares equal whichever system holds it.
    * The emulators keep their data in ``<dir>/dataverse.db`` and
      ``<dir>/business-central.db``: it outlives the demo (``syncbus emulate … --store``).

Configuration
    The demo directory, the broker URL and the seed sizes.

Limits
    * Files the demo writes are removed from the directory when it starts again;
      nothing else in the directory is touched.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from connectors.business_central.emulator import BusinessCentralEmulator
from connectors.dataverse import DataverseConnector
from connectors.dataverse.emulator import DataverseEmulator
from connectors.dataverse.emulator.model import CONTACT, KeyDef
from connectors.dataverse.emulator.seed import seed as seed_dataverse

__all__ = ["DemoWorld", "HUB_NAME_LIMIT", "Row"]

#: Characters the hub's ``accounts.name`` holds at first (a trigger enforces it).
HUB_NAME_LIMIT = 50
#: A record's synced fields as (name, city, phone, credit), normalised.
Row = tuple[str | None, ...]

#: Files and folders the demo owns in its directory (removed when it starts again).
_OWNED = ("sync.yaml", *(f"{db}.db{end}" for db in ("hub", "state", "bc-index", "dataverse",
                                                    "business-central")
                         for end in ("", "-wal", "-shm", "-journal")),
          "secrets", "certs", "dataverse", "dynamics-user")

_HUB_DDL = (
    """CREATE TABLE accounts (
        id INTEGER PRIMARY KEY, number TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
        city TEXT, phone TEXT, credit NUMERIC)""",
    """CREATE TABLE contacts (
        id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, firstname TEXT, lastname TEXT,
        account_id INTEGER REFERENCES accounts (id) ON DELETE SET NULL)""",
)

_CONFIG = """\
# syncbus demo: Dynamics 365 (Dataverse emulator) <-> hub (SQLite) <-> Business Central
# (emulator). Written by `syncbus demo`; usable with every syncbus command while the
# demo runs (`syncbus demo --keep-running`): the emulators' ports change on every run.
# Names start with demo_ so that the demo's queues and events (routing keys
# demo_crm.account.upsert, …) never mix with those of real links on the same broker.
broker:
  url: ${{file:secrets/amqp_url}}       # the broker URL may hold a password
state:
  url: {state_url}
connections:
  demo_crm:                             # Dynamics 365 / Dataverse (emulator)
    type: dataverse
    url: {dv_url}
    tenant_id: {dv_tenant}
    client_id: {dv_client}
    client_secret: ${{file:secrets/crm}}
    authority_host: {dv_url}
    ca_bundle: {dv_ca}
    state_dir: {dv_state}
  demo_hub:                             # the SQL hub in the middle
    type: sql
    url: {hub_url}
  demo_erp:                             # Business Central (emulator)
    type: business_central
    url: {bc_url}
    tenant_id: {bc_tenant}
    environment: {bc_environment}
    company: {bc_company}
    client_id: {bc_client}
    client_secret: ${{file:secrets/erp}}
    authority_host: {bc_url}
    ca_bundle: {bc_ca}
    index_url: {bc_index}
    entities:
      customers: {{sync_deletion: true, reconcile_interval: 0}}
links:
  demo_accounts:                        # Dynamics accounts <-> hub accounts
    source: {{connection: demo_crm, entity: account}}
    target: {{connection: demo_hub, entity: accounts}}
    direction: both
    key: accountnumber                  # an alternate key in Dataverse
    conflict: source_wins               # Dynamics is the master of account data
    fields:
      number: accountnumber
      name: name
      city: address1_city
      phone: telephone1
      credit: creditlimit
    poll_interval: 1s
    retry: {{delays: [0.5s, 1s, 2s], max_attempts: 8}}
  demo_contacts:                        # Dynamics contacts <-> hub contacts
    source: {{connection: demo_crm, entity: contact}}
    target: {{connection: demo_hub, entity: contacts}}
    direction: both
    key: emailaddress1
    fields:
      email: emailaddress1
      firstname: firstname
      lastname: lastname
      account_id: {{from: parentcustomerid, lookup: demo_accounts}}   # foreign key, both ways
    poll_interval: 1s
    retry: {{delays: [0.5s, 1s, 2s], max_attempts: 8}}
  demo_customers:                       # hub accounts <-> Business Central customers
    source: {{connection: demo_hub, entity: accounts}}
    target: {{connection: demo_erp, entity: customers}}
    direction: both
    key: number
    conflict: target_wins               # Business Central keeps its own edits
    fields:
      number: number
      displayName: name
      city: city
      phoneNumber: phone
      creditLimit: credit
    poll_interval: 1s
    retry: {{delays: [0.5s, 1s, 2s], max_attempts: 8}}
"""


class DemoWorld:
    """The emulators, the hub and the config file of one demo run.

    Args:
        directory: Where the hub, the state store, the config and the certificates go.
        amqp_url: The RabbitMQ the config names.
        accounts: Dataverse accounts to seed (each with one to three contacts).
        customers: Business Central customers to seed.
    """

    def __init__(self, directory: Path, *, amqp_url: str, accounts: int, customers: int) -> None:
        self.dir = directory.resolve()
        self.amqp_url = amqp_url
        self.accounts, self.customers = accounts, customers
        self.config_path = self.dir / "sync.yaml"
        self.hub_path = self.dir / "hub.db"
        self.dv: DataverseEmulator | None = None
        self.bc: BusinessCentralEmulator | None = None
        self.hub: sa.Engine | None = None
        self._user: DataverseConnector | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Clear the demo's old files, start and seed the emulators, create the hub, write
        the config.

        Raises:
            OSError: a file cannot be written or a port cannot be bound.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in _OWNED:
            _remove(self.dir / name)
        self.dv = DataverseEmulator(cert_dir=self.dir / "certs" / "dataverse",
                                    store=self.dir / "dataverse.db").start()
        # Upserts from the hub find Dataverse contacts by e-mail: an alternate key.
        self.dv.define_entity(replace(CONTACT, keys=(KeyDef("email_key", ("emailaddress1",)),)))
        seed_dataverse(self.dv.store, self.accounts)
        self.bc = BusinessCentralEmulator(cert_dir=self.dir / "certs" / "business-central",
                                          store=self.dir / "business-central.db",
                                          seed=self.customers).start()
        self.hub = sa.create_engine(f"sqlite:///{self.hub_path}")
        with self.hub.begin() as conn:
            for ddl in _HUB_DDL:
                conn.exec_driver_sql(ddl)
        self.limit_hub_names(HUB_NAME_LIMIT)
        self._write_config()

    def stop(self) -> None:
        """Stop the emulators and close the hub (idempotent)."""
        if self._user is not None:
            self._user.close()
            self._user = None
        for emulator in (self.bc, self.dv):
            if emulator is not None:
                emulator.stop()
        self.bc = self.dv = None
        if self.hub is not None:
            self.hub.dispose()
            self.hub = None

    def _write_config(self) -> None:
        dv, bc = self._dv(), self._bc()
        secrets = self.dir / "secrets"
        secrets.mkdir(mode=0o700)
        for name, value in (("amqp_url", self.amqp_url),
                            ("crm", str(dv.connection()["client_secret"])),
                            ("erp", bc.client_secret)):
            path = secrets / name
            path.touch(mode=0o600)
            path.write_text(value + "\n", encoding="utf-8")
        dv_conn = dv.connection()
        values = {
            "state_url": f"sqlite:///{self.dir}/state.db", "hub_url": f"sqlite:///{self.hub_path}",
            "dv_url": dv.url, "dv_tenant": dv_conn["tenant_id"], "dv_client": dv_conn["client_id"],
            "dv_ca": dv.ca_bundle, "dv_state": self.dir / "dataverse", "bc_url": bc.url,
            "bc_tenant": bc.tenant, "bc_environment": bc.environment, "bc_company": bc.company.name,
            "bc_client": bc.client_id, "bc_ca": bc.ca_bundle,
            "bc_index": f"sqlite:///{self.dir}/bc-index.db",
        }
        self.config_path.write_text(
            _CONFIG.format(**{k: _yaml_text(str(v)) for k, v in values.items()}), encoding="utf-8")

    # -- access ---------------------------------------------------------------------------

    def _dv(self) -> DataverseEmulator:
        assert self.dv is not None, "DemoWorld.start() first"
        return self.dv

    def _bc(self) -> BusinessCentralEmulator:
        assert self.bc is not None, "DemoWorld.start() first"
        return self.bc

    def _hub(self) -> sa.Engine:
        assert self.hub is not None, "DemoWorld.start() first"
        return self.hub

    @property
    def urls(self) -> dict[str, str]:
        """Where each system answers."""
        return {"Dataverse": self._dv().api_url, "Business Central": self._bc().company_url(),
                "hub": f"sqlite:///{self.hub_path}"}

    def dynamics_user(self) -> DataverseConnector:
        """A Web API client editing Dataverse as a user would (not the bus's connection)."""
        if self._user is None:
            self._user = DataverseConnector(
                "dynamics-user", **self._dv().connection(state_dir=str(self.dir / "dynamics-user")))
        return self._user

    def hub_sql(self, statement: str, params: dict[str, Any] | list[dict[str, Any]] | None = None,
                ) -> list[sa.Row[Any]]:
        """Run one SQL statement on the hub (committed); rows when it returns some."""
        with self._hub().begin() as conn:
            result = conn.execute(sa.text(statement), params or {})
            return list(result) if result.returns_rows else []

    def limit_hub_names(self, limit: int) -> None:
        """(Re)create the hub's rule: ``accounts.name`` holds at most ``limit`` characters."""
        with self._hub().begin() as conn:
            for op, when in (("insert", "INSERT"), ("update", "UPDATE OF name")):
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS accounts_name_length_{op}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER accounts_name_length_{op} BEFORE {when} ON accounts "
                    f"WHEN length(NEW.name) > {int(limit)} BEGIN SELECT RAISE(ABORT, "
                    f"'accounts.name holds at most {int(limit)} characters'); END")

    def bc_customer(self, number: str) -> dict[str, Any] | None:
        """A Business Central customer by number, as the API shows it."""
        return next((c for c in self._bc().rows("customers") if c["number"] == number), None)

    def bc_update(self, number: str, values: dict[str, Any]) -> None:
        """Edit a customer as a Business Central user would."""
        customer = self.bc_customer(number)
        if customer is None:
            raise KeyError(f"no Business Central customer {number}")
        self._bc().update("customers", customer["id"], values)

    def dv_account_ids(self) -> dict[str, str]:
        """Dataverse account number → accountid."""
        return {r["accountnumber"]: r["accountid"]
                for r in self._dv().store.tables["account"].rows.values()}

    # -- snapshots on the synced fields ------------------------------------------------------

    def dv_accounts(self) -> dict[str, Row]:
        """Dataverse accounts by number."""
        return {r["accountnumber"]: _row(r["name"], r.get("address1_city"), r.get("telephone1"),
                                         r.get("creditlimit"))
                for r in self._dv().store.tables["account"].rows.values()}

    def hub_accounts(self) -> dict[str, Row]:
        """Hub accounts by number."""
        rows = self.hub_sql("SELECT number, name, city, phone, credit FROM accounts")
        return {r[0]: _row(*r[1:]) for r in rows}

    def bc_customers(self) -> dict[str, Row]:
        """Business Central customers by number."""
        return {r["number"]: _row(r["displayName"], r["city"], r["phoneNumber"], r["creditLimit"])
                for r in self._bc().rows("customers")}

    def dv_contacts(self) -> dict[str, Row]:
        """Dataverse contacts by e-mail: (first name, last name, parent account number)."""
        numbers = {v: k for k, v in self.dv_account_ids().items()}
        out = {}
        for r in self._dv().store.tables["contact"].rows.values():
            parent = str((r.get("parentcustomerid") or {}).get("id"))
            out[r["emailaddress1"]] = _row(r.get("firstname"), r.get("lastname"),
                                           numbers.get(parent))
        return out

    def hub_contacts(self) -> dict[str, Row]:
        """Hub contacts by e-mail: (first name, last name, parent account number)."""
        rows = self.hub_sql("SELECT c.email, c.firstname, c.lastname, a.number FROM contacts c "
                            "LEFT JOIN accounts a ON a.id = c.account_id")
        return {r[0]: _row(*r[1:]) for r in rows}

    def differences(self, *, besides: frozenset[str] = frozenset()) -> list[str]:
        """Where the three systems disagree on the synced fields (empty: they agree).

        Args:
            besides: Account numbers left out of the comparison.
        """
        dv, hub, bc = (
            {k: v for k, v in system.items() if k not in besides}
            for system in (self.dv_accounts(), self.hub_accounts(), self.bc_customers()))
        out = _diff("Dynamics accounts", dv, "hub accounts", hub)
        out += _diff("hub accounts", hub, "Business Central customers", bc)
        out += _diff("Dynamics contacts", self.dv_contacts(), "hub contacts", self.hub_contacts())
        return out


def _row(*values: Any) -> Row:
    """Normalised values: numbers as plain decimals, empty text as None."""
    out: list[str | None] = []
    for v in values:
        if isinstance(v, (int, float, Decimal)) and not isinstance(v, bool):
            out.append(f"{Decimal(str(v)).normalize():f}")
        else:
            out.append(None if v in (None, "") else str(v))
    return tuple(out)


def _diff(a_name: str, a: dict[str, Row], b_name: str, b: dict[str, Row]) -> list[str]:
    """One line per kind of difference, naming the first few keys."""
    out = []
    for label, keys in ((f"only in {a_name}", sorted(a.keys() - b.keys())),
                        (f"only in {b_name}", sorted(b.keys() - a.keys())),
                        (f"{a_name} and {b_name} differ",
                         sorted(k for k in a.keys() & b.keys() if a[k] != b[k]))):
        if keys:
            first = ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" if k in a and k in b else k
                              for k in keys[:3])
            out.append(f"{label}: {len(keys)} ({first}{', …' if len(keys) > 3 else ''})")
    return out


def _yaml_text(value: str) -> str:
    """``value`` as a double-quoted YAML scalar."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        os.unlink(path)

"""``syncbus demo``: Dynamics 365 ↔ a SQL hub ↔ Business Central, two-way, on your machine.

The demo starts the Dataverse and Business Central emulators and a SQLite hub
(:mod:`bus.demo.world`), seeds a few hundred records, writes ``<dir>/sync.yaml`` and
runs the bus in this process (:class:`~bus.worker.worker.Worker`) with a live view of the
links (:mod:`bus.demo.view`). Then it plays a script, one plain line per step, each
checking its outcome on every system:

1. the first sync: every system ends with the same accounts (and contacts);
2. accounts renamed in Dynamics reach the hub and Business Central;
3. credit limits changed in Business Central reach the hub and Dynamics;
4. accounts and contacts added in the hub (plain SQL) reach both, contacts under
   their accounts;
5. accounts deleted in the hub disappear from both;
6. one account edited in Dynamics *and* in the hub before the next sync: the link's
   conflict policy picks the winner, and the conflict log keeps both versions;
7. an account the hub refuses (its name is longer than the hub's column allows) lands
   in the offline-transaction log;
8. the hub's column is widened and the transaction replayed: it arrives everywhere.

A failed check ends the demo with exit code 1, naming the step. ``--keep-running``
then leaves everything up (the worker keeps syncing) until Ctrl-C.

Every command the demo suggests can be pasted as it is printed: it starts the way
syncbus was started (``.venv/bin/syncbus`` when that is how the demo was run and
``syncbus`` is not on the PATH; see :func:`syncbus_command`). The last screen says
what the demo leaves behind (the emulators and the worker stop; the hub, the state
store and the transaction log stay) and how to go on exploring.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bus.amqp.errors import BrokerUnavailable
from bus.amqp.queues import BrokerSession
from bus.amqp.topology import all_link_queues
from bus.config.load import load_config
from bus.core.redact import redact_url
from bus.demo.view import DemoView
from bus.demo.world import HUB_NAME_LIMIT, DemoWorld
from bus.ops.txlog import Transaction, TxFilter, TxLog
from bus.state.store import StateStore
from bus.worker.worker import Worker
from connectors.base import BrokerConnectionError, BusError, WriteRow
from schemas.config import SyncConfig

__all__ = ["DemoFailed", "broker_problem", "run_demo", "syncbus_command"]

#: Sync passes a step may take before the bus counts as not settling.
SETTLE_ROUNDS = 8
#: Seconds one sync pass may wait for its deliveries.
PASS_WAIT = 60.0
#: Width the demo widens the hub's ``accounts.name`` to (Business Central's displayName).
WIDE_NAME = 100
#: The account the hub refuses at first.
LONG_NAME = ("Consolidated Messenger Logistics and Warehousing Services Central Europe "
             "GmbH")
#: Short names of the demo's connections in the live table and the totals.
LABELS = {"demo_crm": "dynamics", "demo_hub": "hub", "demo_erp": "bc"}
#: Accounts added in the hub: number, name, city, phone, and a contact's first and last name.
_HUB_ACCOUNTS = (
    ("HUB-0001", "Tatra Mountain Outfitters", "Poprad", "+421 52 772 1100", "Jana", "Kralova"),
    ("HUB-0002", "Danube River Freight", "Bratislava", "+421 2 5443 8800", "Milan", "Hruska"),
    ("HUB-0003", "Morava Organic Foods", "Brno", "+420 5 4321 0099", "Petra", "Dvorakova"),
)
_COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yml"
#: Where the demo works unless ``--dir`` says otherwise.
DEFAULT_DIR = Path(".syncbus/demo")
#: The RabbitMQ the demo uses unless told otherwise.
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def syncbus_command(argv0: str | None = None, *, executable: str | None = None,
                    path: str | None = None) -> tuple[str, str | None]:
    """How to start syncbus in a command the user pastes, and a hint for shorter ones.

    ``syncbus`` when that is on the PATH and is the program running; else the program
    as it was started (``.venv/bin/syncbus`` after the README's one-liner), with the
    hint to activate its virtual environment when it has one; when syncbus was not
    started through its script (``python -m bus.cli``), this Python with ``-m bus.cli``.

    Args:
        argv0: The program as started (default ``sys.argv[0]``).
        executable: The Python running (default ``sys.executable``).
        path: The search path (default ``$PATH``).

    Returns:
        (the command's start, a line on how to shorten it or None).
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    path = os.environ.get("PATH", "") if path is None else path
    on_path = shutil.which("syncbus", path=path)
    script = Path(argv0)
    if script.name != "syncbus":  # python -m bus.cli, or an embedding program
        return ("syncbus", None) if on_path else (f"{shlex.quote(executable)} -m bus.cli", None)
    if on_path and _same_file(on_path, script):
        return "syncbus", None
    activate = script.parent / "activate"
    hint = (f"(or run `source {shlex.quote(str(activate))}` once, then type just `syncbus`)"
            if activate.is_file() else None)
    return shlex.quote(argv0), hint


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class DemoFailed(Exception):
    """A step's check failed (or the bus did not settle)."""


def broker_problem(url: str, *, syncbus: str = "syncbus") -> list[str]:
    """Why RabbitMQ at ``url`` cannot be used, with how to get one; empty when it can.

    Args:
        url: The AMQP URL.
        syncbus: How the commands shown start (see :func:`syncbus_command`).

    Returns:
        Lines for the user (the password masked), or ``[]``.
    """
    try:
        with BrokerSession(url, timeout=5, retries=0):
            return []
    except BrokerUnavailable as exc:
        kind, reason = exc.reason, exc.message
    except BrokerConnectionError as exc:
        kind, reason = "unreachable", exc.message
    if kind == "login":
        return [reason, f"Give the right user and password: {syncbus} demo --amqp-url "
                        "amqp://USER:PASSWORD@HOST:5672/ (or set SYNCBUS_AMQP_URL)."]
    if kind != "unreachable":
        return [reason]  # a vhost or permission missing: the line says how to fix it
    compose = _compose_path()
    return [
        reason if reason.startswith("cannot reach")
        else f"cannot reach RabbitMQ at {redact_url(url)}: {reason}",
        f"The demo needs a RabbitMQ. Start one, then run `{syncbus} demo` again:",
        "  installed here:  sudo systemctl start rabbitmq-server   (or: sudo rabbitmq-server "
        "-detached)",
        "  not installed:   sudo apt-get install rabbitmq-server   (Debian, Ubuntu; "
        "dnf install rabbitmq-server on Fedora)",
        f"  with Docker:     docker compose -f {compose} up -d rabbitmq   (three nodes behind "
        "HAProxy on 127.0.0.1:5672), then",
        "                   SYNCBUS_AMQP_URL=amqp://syncbus:syncbus-sandbox@127.0.0.1:5672/ "
        f"{syncbus} demo",
        f"  another broker:  {syncbus} demo --amqp-url amqp://USER:PASSWORD@HOST:5672/VHOST",
    ]


def _compose_path() -> str:
    try:
        return str(_COMPOSE.relative_to(Path.cwd()))
    except ValueError:
        return str(_COMPOSE)


def run_demo(directory: Path, *, amqp_url: str, accounts: int = 100, customers: int = 100,
             keep_running: bool = False, live: bool | None = None,
             echo: Callable[[str], None] = print) -> int:
    """Run the demo in ``directory``; returns the exit code (0 ok, 1 a step failed).

    Args:
        directory: Where the hub, the state store, certificates and ``sync.yaml`` go.
        amqp_url: The RabbitMQ to use.
        accounts: Dataverse accounts to seed (each with one to three contacts).
        customers: Business Central customers to seed.
        keep_running: After the script, keep syncing until Ctrl-C.
        live: Show the live table; otherwise plain lines only. None: when stdout is a
            terminal.
        echo: Prints one plain line.
    """
    syncbus, hint = syncbus_command()
    if problem := broker_problem(amqp_url, syncbus=syncbus):
        for line in problem:
            echo(line)
        return 1
    started = time.monotonic()
    live = sys.stdout.isatty() if live is None else live
    world = DemoWorld(directory, amqp_url=amqp_url, accounts=accounts, customers=customers)
    worker: Worker | None = None
    with DemoView(echo, live=live, labels=LABELS) as view:
        try:
            world.start()
            worker = _open_worker(world, view)
            _Script(world, worker, view, syncbus).play()
            view.status = ""
            _print_totals(view, live)
            view.line(f"done in {time.monotonic() - started:.0f}s: every step arrived where it "
                      f"should. Config: {world.config_path}")
            if keep_running:
                _keep_running(world, worker, view, syncbus, hint)
            else:
                _what_is_left(world, view, syncbus, hint, _rerun(directory, amqp_url))
        except (DemoFailed, BusError, OSError) as exc:
            view.status = ""
            _print_totals(view, live)
            view.line(f"demo FAILED: {exc}")
            return 1
        finally:
            if worker is not None:
                worker.close()
            world.stop()
    return 0


def _rerun(directory: Path, amqp_url: str) -> str:
    """The options to give ``demo`` again to get the same demo (the URL's password masked)."""
    options = ""
    if directory.resolve() != DEFAULT_DIR.resolve():
        options += f" --dir {shlex.quote(str(directory))}"
    if amqp_url != os.environ.get("SYNCBUS_AMQP_URL", DEFAULT_AMQP_URL):
        shown = redact_url(amqp_url)
        options += f" --amqp-url {shlex.quote(shown)}"
        if shown != amqp_url:
            options += "   # put the broker's password back in place of ***"
    return options


def _what_is_left(world: DemoWorld, view: DemoView, syncbus: str, hint: str | None,
                  rerun: str) -> None:
    """The last screen of a demo that ends: what stays, what stops, how to go on."""
    cfg = shlex.quote(str(world.config_path))
    for line in (
        "",
        "The demo has ended: the Dynamics and Business Central emulators and the worker "
        "stopped, so `status` and `run` would find both systems unreachable now. What stays "
        f"in {world.dir}: the hub (hub.db), the state store (state.db) with the history and "
        "the conflict log, and the offline-transaction log on RabbitMQ. These still work:",
        f"  {syncbus} tx list -c {cfg} --status processed --limit 5   # what was applied",
        f"  {syncbus} tx conflicts -c {cfg} --all   # the conflict log, both versions",
        f"  {syncbus} tx stats -c {cfg}   # transactions per link and status",
        f"  sqlite3 {shlex.quote(str(world.hub_path))} \"SELECT number, name FROM accounts "
        "LIMIT 5\"   # the hub",
        "To explore a running bus (status, live change events, your own edits syncing "
        "between the three systems), start the demo with --keep-running: it keeps the "
        "emulators and the worker up until Ctrl-C:",
        f"  {syncbus} demo --keep-running{rerun}",
        *([hint] if hint else []),
    ):
        view.line(line)
def _open_worker(world: DemoWorld, view: DemoView) -> Worker:
    """Introduce the systems, clear an earlier run's leftovers, open the bus."""
    _introduce(world, view)
    config = load_config(world.config_path).config
    _drop_earlier_queues(config)
    worker = Worker(config)
    worker.prepare_sources()
    worker.open()
    _archive_earlier_errors(config, view)
    view.watch(worker)
    return worker


def _print_totals(view: DemoView, live: bool) -> None:
    """Without the live table, its counts as plain lines."""
    if not live:
        for line in view.totals():
            view.line(line)


def _introduce(world: DemoWorld, view: DemoView) -> None:
    urls = world.urls
    view.line(f"Dynamics 365 (Dataverse emulator): {world.accounts} accounts with their "
              f"contacts, {urls['Dataverse']}")
    view.line(f"Business Central (emulator): {world.customers} customers, "
              f"{urls['Business Central']}")
    view.line(f"hub (SQLite): {world.hub_path}, empty; config: {world.config_path}")


def _drop_earlier_queues(config: SyncConfig) -> None:
    """Delete the demo links' queues left by an earlier run: their events name records
    of emulators that are gone."""
    with BrokerSession(config.broker.url) as broker:
        broker.delete(queue for name, link in config.links.items()
                      for lq in all_link_queues(name, link)
                      for queue in (lq.work, *(q for _, q in lq.retries)))


def _archive_earlier_errors(config: SyncConfig, view: DemoView) -> None:
    """Set aside the demo links' transactions in error left by an earlier run."""
    log = TxLog(config)
    try:
        archived = sum(log.archive(TxFilter(link=name)).moved for name in config.links)
    finally:
        log.close()
    if archived:
        view.line(f"set aside {archived} transaction(s) in error left by an earlier demo run "
                  "(now Archived)")


def _keep_running(world: DemoWorld, worker: Worker, view: DemoView, syncbus: str,
                  hint: str | None) -> None:
    """Sync continuously and show how to explore, until Ctrl-C."""
    cfg = shlex.quote(str(world.config_path))
    urls = world.urls
    for line in (
        "Everything stays up and syncing until Ctrl-C. In another terminal:",
        f"  {syncbus} status -c {cfg}                  # links, detectors, broker",
        f"  {syncbus} tx list -c {cfg} --status processed   # what was applied",
        f"  {syncbus} tx conflicts -c {cfg} --all      # the conflict log",
        f"  {syncbus} tail 'demo_hub.#' -c {cfg}       # change events as they flow",
        f"  sqlite3 {shlex.quote(str(world.hub_path))} \"UPDATE accounts SET city = 'Graz' "
        "WHERE number = 'ACC-000001'\"   # then watch it reach Dynamics and Business Central",
        f"  Dataverse Web API:     {urls['Dataverse']}",
        f"  Business Central API:  {urls['Business Central']}",
        f"  (both trust the CA files under {world.dir / 'certs'}; credentials in "
        f"{world.dir / 'secrets'})",
        *([f"  {hint}"] if hint else []),
        "After Ctrl-C the emulators stop (then `status` finds them unreachable); the hub, "
        "the state store and the transaction log stay.",
    ):
        view.line(line)
    view.status = "syncing; Ctrl-C stops"
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="demo-worker", daemon=True)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda _s, _f: stop.set()) if main else None
    thread.start()
    try:
        while thread.is_alive() and not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        view.line("stopping: the worker finishes its batches, then the emulators stop")
        stop.set()
        thread.join()
        if main:
            signal.signal(signal.SIGTERM, previous)


class _Script:
    """The demo's steps over one world and one opened worker."""

    def __init__(self, world: DemoWorld, worker: Worker, view: DemoView,
                 syncbus: str = "syncbus") -> None:
        self.world, self.worker, self.view = world, worker, view
        self.config_path = shlex.quote(str(world.config_path))
        self.syncbus = syncbus
        self.steps: list[Callable[[], str]] = [
            self.first_sync, self.rename_in_dynamics, self.credit_in_business_central,
            self.add_in_hub, self.delete_in_hub, self.conflict, self.rejected, self.replay]
        self._rejected: Transaction | None = None

    def play(self) -> None:
        """Run every step; each prints its line.

        Raises:
            DemoFailed: a step's check failed, naming the step.
        """
        total = len(self.steps)
        for number, step in enumerate(self.steps, start=1):
            self.view.status = f"step {number}/{total}: running…"
            try:
                line = step()
            except (DemoFailed, BusError, KeyError) as exc:
                raise DemoFailed(f"step {number}/{total} ({step.__name__.replace('_', ' ')})"
                                 f": {exc}") from exc
            self.view.line(f"step {number}/{total}: {line}")

    # -- the steps ----------------------------------------------------------------------

    def first_sync(self) -> str:
        self.sync()
        hub = self.world.hub_accounts()
        want = self.world.accounts + self.world.customers
        self.check(len(hub) == want, f"the hub holds {len(hub)} accounts, expected {want}")
        contacts = len(self.world.hub_contacts())
        return (f"first sync: {self.world.accounts} Dynamics accounts and {self.world.customers}"
                f" Business Central customers → all three systems hold the same {len(hub)} "
                f"accounts; the hub has Dynamics' {contacts} contacts under their accounts")

    def rename_in_dynamics(self) -> str:
        ids = self.world.dv_account_ids()
        names = {n: f"{self.world.dv_accounts()[n][0]} (renamed)" for n in sorted(ids)[:5]}
        self.dynamics_upsert([({"accountid": ids[n]}, {"name": v}) for n, v in names.items()])
        self.sync()
        self.expect_field(names, 0)
        return ("renamed 5 accounts in Dynamics (Web API) → arrived in the hub and in "
                "Business Central")

    def credit_in_business_central(self) -> str:
        bc = self.world.bc_customers()
        numbers = sorted(bc)[10:15]
        credits = {n: str(int(float(bc[n][3] or 0)) + 5000) for n in numbers}
        for n, credit in credits.items():
            self.world.bc_update(n, {"creditLimit": int(credit)})
        self.sync()
        self.expect_field(credits, 3)
        return ("raised the credit limit of 5 customers in Business Central by 5,000 → "
                "arrived in the hub and in Dynamics")

    def add_in_hub(self) -> str:
        self.world.hub_sql(
            "INSERT INTO accounts (number, name, city, phone, credit) VALUES "
            "(:n, :name, :city, :phone, :credit)",
            [{"n": n, "name": name, "city": city, "phone": phone, "credit": 15000 * i}
             for i, (n, name, city, phone, _, _) in enumerate(_HUB_ACCOUNTS, start=1)])
        contacts = {f"{first}.{last}@{n}.example".lower(): n
                    for n, _, _, _, first, last in _HUB_ACCOUNTS}
        self.world.hub_sql(
            "INSERT INTO contacts (email, firstname, lastname, account_id) "
            "SELECT :e, :f, :l, id FROM accounts WHERE number = :n",
            [{"e": f"{first}.{last}@{n}.example".lower(), "f": first, "l": last, "n": n}
             for n, _, _, _, first, last in _HUB_ACCOUNTS])
        self.sync()
        for name, system in (("Dynamics", self.world.dv_accounts()),
                             ("Business Central", self.world.bc_customers())):
            missing = [a[0] for a in _HUB_ACCOUNTS if a[0] not in system]
            self.check(not missing, f"{', '.join(missing)} did not arrive in {name}")
        parents = self.world.dv_contacts()
        for email, number in contacts.items():
            got = parents.get(email, (None, None, None))[2]
            self.check(got == number, f"contact {email} in Dynamics has parent {got}, "
                                      f"expected {number}")
        return ("added 3 accounts with a contact each in the hub (SQL INSERT) → arrived in "
                "Dynamics and Business Central, the contacts under their accounts in Dynamics")

    def delete_in_hub(self) -> str:
        with_contacts = {c[2] for c in self.world.hub_contacts().values()}
        numbers = [n for n in sorted(self.world.hub_accounts())
                   if not n.startswith(("ACC-", "HUB-")) and n not in with_contacts][-2:]
        self.check(len(numbers) == 2, "no two Business Central accounts to delete")
        self.world.hub_sql("DELETE FROM accounts WHERE number IN (:a, :b)",
                           {"a": numbers[0], "b": numbers[1]})
        self.sync()
        for name, system in (("Dynamics", self.world.dv_accounts()),
                             ("Business Central", self.world.bc_customers())):
            left = [n for n in numbers if n in system]
            self.check(not left, f"{', '.join(left)} still in {name}")
        return (f"deleted accounts {numbers[0]} and {numbers[1]} in the hub (SQL DELETE) → "
                "gone from Dynamics and Business Central")

    def conflict(self) -> str:
        number = "ACC-000007"
        base = self.world.dv_accounts()[number][0]
        dynamics, hub = f"{base} (Dynamics edit)", f"{base} (hub edit)"
        before = self.conflict_ids()
        self.dynamics_upsert([({"accountid": self.world.dv_account_ids()[number]},
                               {"name": dynamics})])
        self.world.hub_sql("UPDATE accounts SET name = :v WHERE number = :n",
                           {"v": hub, "n": number})
        self.sync()
        self.expect_field({number: dynamics}, 0)
        rows = [r for r in self.state().conflict_rows(link="demo_accounts")
                if r["id"] not in before]
        self.check(bool(rows), "no conflict was logged for demo_accounts")
        self.check(all(r["winner"] == "a" for r in rows),
                   f"the conflict log names winner {[r['winner'] for r in rows]}, expected a")
        return (f"edited {number} in Dynamics ('{dynamics}') and in the hub ('{hub}') before "
                "the next sync → Dynamics won everywhere (link demo_accounts, conflict: "
                f"source_wins); conflict #{rows[0]['id']} keeps both versions: "
                f"{self.syncbus} tx conflicts -c {self.config_path} --all")

    def rejected(self) -> str:
        since = datetime.now(UTC)
        number = "ACC-900001"
        self.dynamics_upsert([({"accountnumber": number}, {
            "name": LONG_NAME, "address1_city": "Vienna", "telephone1": "+43 1 532 0990",
            "creditlimit": 20000})])
        self.sync(dead_expected=1, besides=frozenset({number}))
        errors = self.errors(TxFilter(link="demo_accounts", since=since))
        self.check(len(errors) == 1, f"{len(errors)} transactions in error, expected 1")
        tx = self._rejected = errors[0]
        self.check(f"at most {HUB_NAME_LIMIT} characters" in (tx.error or ""),
                   f"unexpected error: {tx.error}")
        self.check(number not in self.world.hub_accounts(), f"{number} reached the hub")
        return (f"created {number} in Dynamics with a {len(LONG_NAME)}-character name → the "
                f"hub refused it ({tx.error}); transaction {tx.id} waits in the "
                f"offline-transaction log (Error): {self.syncbus} tx list -c "
                f"{self.config_path}")

    def replay(self) -> str:
        tx = self._rejected
        self.check(tx is not None, "step 7 left no transaction to replay")
        assert tx is not None
        self.world.limit_hub_names(WIDE_NAME)
        log = TxLog(self.worker.config)
        try:
            moved = log.replay(TxFilter(ids={tx.id})).moved
        finally:
            log.close()
        self.check(moved == 1, f"{moved} transactions replayed, expected 1")
        self.sync()
        self.expect_field({"ACC-900001": LONG_NAME}, 0)
        left = self.errors(TxFilter(ids={tx.id}))
        self.check(not left, f"transaction {tx.id} is still in error: {left[0].error}"
                   if left else "")
        return (f"widened the hub's accounts.name to {WIDE_NAME} characters (Business "
                f"Central's limit) and replayed transaction {tx.id} ({self.syncbus} tx replay) → "
                "it arrived in the hub and in Business Central")

    # -- helpers --------------------------------------------------------------------------

    def sync(self, *, dead_expected: int = 0, besides: frozenset[str] = frozenset()) -> None:
        """Sync until a pass publishes nothing; then every system must agree.

        Raises:
            DemoFailed: the bus did not settle, a pass failed, dead letters other than
                ``dead_expected`` appeared, or the systems disagree (on other accounts
                than ``besides``).
        """
        dead = self.dead()
        for _ in range(SETTLE_ROUNDS):
            written = self.written()
            summary = self.worker.run_until_idle(max_wait=PASS_WAIT)
            self.view.polled(summary)
            if summary.errors or summary.timed_out:
                raise DemoFailed("; ".join(summary.errors) or
                                 f"deliveries still pending after {PASS_WAIT:.0f}s")
            # Quiet: nothing published and nothing written (a write, e.g. of a replayed
            # change, may have come after its target's poll of this pass).
            if not any(r.changes for r in summary.detected.values()) and \
                    self.written() == written:
                break
        else:
            raise DemoFailed(f"the systems were still changing after {SETTLE_ROUNDS} passes")
        if (new := self.dead() - dead) != dead_expected:
            errors = [f"{t.link} {t.key}: {t.error}" for t in self.errors(TxFilter())[-3:]]
            raise DemoFailed(f"{new} changes were dead-lettered, expected {dead_expected}: "
                             + "; ".join(errors))
        if differences := self.world.differences(besides=besides):
            raise DemoFailed("the systems disagree: " + "; ".join(differences))

    def written(self) -> int:
        return sum(a.stats.upserted + a.stats.deleted for _, a in self.worker.consumers)

    def dead(self) -> int:
        return sum(consumer.stats.dead for consumer, _ in self.worker.consumers)

    def errors(self, flt: TxFilter) -> list[Transaction]:
        log = TxLog(self.worker.config)
        try:
            return log.select("error", flt)
        finally:
            log.close()

    def conflict_ids(self) -> set[int]:
        return {r["id"] for r in self.state().conflict_rows()}

    def state(self) -> StateStore:
        assert self.worker.state is not None, "Worker.open() first"
        return self.worker.state

    def dynamics_upsert(self, rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        outcomes = self.world.dynamics_user().upsert(
            "account", [WriteRow(key, values) for key, values in rows])
        failed = [o.error for o in outcomes if not o.ok]
        self.check(not failed, f"Dynamics refused the edit: {failed}")

    def expect_field(self, wanted: dict[str, str], index: int) -> None:
        """Every system holds ``wanted[number]`` in field ``index`` of each account."""
        for name, system in (("Dynamics", self.world.dv_accounts()),
                             ("the hub", self.world.hub_accounts()),
                             ("Business Central", self.world.bc_customers())):
            for number, value in wanted.items():
                got = system.get(number, (None,) * 4)[index]
                self.check(got == value, f"{number} in {name}: {got!r}, expected {value!r}")

    @staticmethod
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise DemoFailed(message)


"""Two-way links between two SQL databases: echo rule, conflicts, lookups, filters, deletes.

Side a is SQLite, side b PostgreSQL; each side has its own primary keys (autoincrement
ids) and its own column names, so the id map and the inverted field map are exercised.
Every scenario ends by comparing both sides field by field and by proving the quiet
state: one more poll of every source publishes nothing.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from bus.cli.main import cli
from bus.config.load import load_config
from bus.state.store import StateStore
from bus.worker.worker import RunSummary, Worker

A_DDL = [
    """CREATE TABLE accounts (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT,
       status TEXT, credit NUMERIC(12, 2), is_deleted INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE contacts (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT,
       account_id INTEGER)""",
]
B_DDL = [
    """CREATE TABLE accounts (id SERIAL PRIMARY KEY, number TEXT NOT NULL UNIQUE, title TEXT,
       state TEXT, credit NUMERIC(12, 2))""",
    """CREATE TABLE people (id SERIAL PRIMARY KEY, code TEXT NOT NULL UNIQUE, full_name TEXT,
       account_id INTEGER REFERENCES accounts (id))""",
]


def _config(tmp: Path, a_url: str, b_url: str, amqp_url: str, **accounts: Any) -> Path:
    config = {
        "broker": {"url": amqp_url},
        "state": {"url": f"sqlite:///{tmp}/state.db"},
        "connections": {"a": {"type": "sql", "url": a_url}, "b": {"type": "sql", "url": b_url}},
        "links": {
            "accounts": {
                "source": {"connection": "a", "entity": "accounts"},
                "target": {"connection": "b", "entity": "accounts"},
                "direction": "both", "key": "code", "conflict": "source_wins",
                "fields": {"number": "code", "title": "name",
                           "state": {"from": "status", "map": {"A": "active", "I": "inactive"}},
                           "credit": "credit"},
                "retry": {"delays": [0.2, 0.5], "max_attempts": 4},
                **accounts,
            },
            "contacts": {
                "source": {"connection": "a", "entity": "contacts"},
                "target": {"connection": "b", "entity": "people"},
                "direction": "both", "key": "code",
                "fields": {"code": "code", "full_name": "name",
                           "account_id": {"from": "account_id", "lookup": "accounts"}},
                "retry": {"delays": [0.2, 0.5], "max_attempts": 6},
            },
        },
    }
    path = tmp / "sync.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def sides(tmp_path: Path, pg_url: str, amqp_url: str):
    a_url = f"sqlite:///{tmp_path}/a.db"
    a, b = sa.create_engine(a_url), sa.create_engine(pg_url)
    for engine, ddl in ((a, A_DDL), (b, B_DDL)):
        with engine.begin() as conn:
            for statement in ddl:
                conn.exec_driver_sql(statement)

    def make(**accounts: Any) -> Worker:
        path = _config(tmp_path, a_url, pg_url, amqp_url, **accounts)
        worker = Worker(load_config(path).config)
        worker.config_path = path  # type: ignore[attr-defined]
        worker.prepare_sources()
        worker.open()
        return worker

    yield a, b, make
    a.dispose()
    b.dispose()


def _sync(worker: Worker) -> RunSummary:
    summary = worker.run_until_idle(max_wait=60)
    assert not summary.timed_out, summary
    return summary


def _published(summary: RunSummary) -> int:
    return sum(r.changes for r in summary.detected.values())


def _settle(worker: Worker, rounds: int = 6) -> RunSummary:
    """Sync until a poll of every source publishes nothing (the quiet state)."""
    for _ in range(rounds):
        summary = _sync(worker)
        if _published(summary) == 0:
            return summary
    raise AssertionError(f"still publishing after {rounds} rounds: {summary.detected}")


def _rows(engine: sa.Engine, sql: str) -> dict[str, tuple[Any, ...]]:
    with engine.connect() as conn:
        return {r[0]: tuple(_plain(v) for v in r[1:]) for r in conn.execute(sa.text(sql))}


def _plain(value: Any) -> Any:
    return None if value is None else str(value)


def _a_accounts(a: sa.Engine) -> dict[str, tuple[Any, ...]]:
    rows = _rows(a, "SELECT code, name, CASE status WHEN 'A' THEN 'active' WHEN 'I' "
                    "THEN 'inactive' END, CAST(credit AS REAL) FROM accounts")
    return {k: (n, s, None if c is None else f"{float(c):.2f}") for k, (n, s, c) in rows.items()}


def _b_accounts(b: sa.Engine) -> dict[str, tuple[Any, ...]]:
    rows = _rows(b, "SELECT number, title, state, credit FROM accounts")
    return {k: (n, s, None if c is None else f"{float(c):.2f}") for k, (n, s, c) in rows.items()}


def _a_contacts(a: sa.Engine) -> dict[str, tuple[Any, ...]]:
    return _rows(a, "SELECT c.code, c.name, p.code FROM contacts c "
                    "LEFT JOIN accounts p ON p.id = c.account_id")


def _b_contacts(b: sa.Engine) -> dict[str, tuple[Any, ...]]:
    return _rows(b, "SELECT c.code, c.full_name, p.number FROM people c "
                    "LEFT JOIN accounts p ON p.id = c.account_id")


def _exec(engine: sa.Engine, sql: str, rows: list[dict[str, Any]] | dict[str, Any] | None = None
          ) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql), rows or {})


def test_random_edits_on_both_sides_converge_and_go_quiet(sides):
    a, b, make = sides
    rng = random.Random(7)
    _exec(a, "INSERT INTO accounts (code, name, status, credit) VALUES (:c, :n, :s, :cr)",
          [{"c": f"A{i}", "n": f"alpha {i}", "s": "A", "cr": f"{i}.50"} for i in range(40)])
    _exec(b, "INSERT INTO accounts (number, title, state, credit) VALUES (:c, :n, :s, :cr)",
          [{"c": f"B{i}", "n": f"beta {i}", "s": "inactive", "cr": f"{i}"} for i in range(30)])
    worker = make()
    try:
        _settle(worker)
        assert _a_accounts(a) == _b_accounts(b)
        assert len(_a_accounts(a)) == 70
        edits = 0
        for _round in range(5):  # 1,000 edits in all, spread over both sides
            codes = sorted(_a_accounts(a))
            side = {code: rng.choice("ab") for code in codes}  # within a round, one side each
            edited = set()
            for _ in range(200):
                code = rng.choice(codes)
                edited.add(code)
                if side[code] == "a":
                    _exec(a, "UPDATE accounts SET name = :n, credit = :c WHERE code = :k",
                          {"n": f"a-edit {edits}", "c": rng.randint(0, 999), "k": code})
                else:
                    _exec(b, "UPDATE accounts SET title = :n, state = :s WHERE number = :k",
                          {"n": f"b-edit {edits}", "s": rng.choice(["active", "inactive"]),
                           "k": code})
                edits += 1
            _exec(a, "INSERT INTO accounts (code, name, status) VALUES (:c, 'new a', 'I')",
                  {"c": f"NA{_round}"})
            _exec(b, "INSERT INTO accounts (number, title, state) VALUES (:c, 'new b', 'active')",
                  {"c": f"NB{_round}"})
            victim = rng.choice([c for c in codes if c.startswith("A") and c not in edited])
            _exec(a, "DELETE FROM accounts WHERE code = :k", {"k": victim})
            first = _sync(worker)
            assert _published(first) > 0
            quiet = _settle(worker)
            assert _published(quiet) == 0
            assert _a_accounts(a) == _b_accounts(b)
        assert edits == 1000
        state = StateStore(worker.config.state.url)
        assert state.conflict_rows() == []  # the edits never overlapped
    finally:
        worker.close()
    assert worker.consumers[0][0].stats.dead == 0


def test_echo_of_our_own_write_is_never_published(sides):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status, credit) VALUES ('K1', 'one', 'A', 1.5)")
    worker = make()
    try:
        first = _sync(worker)
        assert first.detected["a.accounts"].upserts == 1
        second = _sync(worker)
        # b's detector sees our write (in the first run if the write beat its poll, else in
        # the second): an echo, never an event.
        runs = (first.detected["b.accounts"], second.detected["b.accounts"])
        assert sum(r.upserts for r in runs) == 0
        assert sum(r.echoes for r in runs) == 1
        applied = {a.flow.direction: a.stats for _, a in worker.consumers
                   if a.name == "accounts"}
        assert applied["a2b"].upserted == 1  # the edit arrived on b exactly once
        assert applied["b2a"].upserted == 0
        assert _a_accounts(a) == _b_accounts(b) == {"K1": ("one", "active", "1.50")}
    finally:
        worker.close()


@pytest.mark.parametrize(("policy", "winner"), [("source_wins", "a"), ("target_wins", "b")])
def test_conflicting_edits_follow_the_policy_and_log_the_loser(sides, policy, winner):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status, credit) VALUES ('C1', 'base', 'A', 10)")
    worker = make(conflict=policy)
    try:
        _settle(worker)
        _exec(a, "UPDATE accounts SET name = 'from a' WHERE code = 'C1'")
        _exec(b, "UPDATE accounts SET title = 'from b' WHERE number = 'C1'")
        _settle(worker)
        expected = "from a" if winner == "a" else "from b"
        assert _a_accounts(a)["C1"][0] == expected
        assert _b_accounts(b)["C1"][0] == expected
        log = StateStore(worker.config.state.url).conflict_rows(link="accounts")
        assert log, "the conflict was not logged"
        assert {row["winner"] for row in log} == {winner}
        row = log[-1]
        assert row["a_values"]["name"] == "from a"
        assert row["b_values"]["title"] == "from b"
    finally:
        worker.close()


def test_manual_conflict_waits_for_an_operator(sides):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status, credit) VALUES ('M1', 'base', 'A', 10)")
    worker = make(conflict="manual")
    config_path = Path(worker.config_path)
    try:
        _settle(worker)
        _exec(a, "UPDATE accounts SET name = 'mine' WHERE code = 'M1'")
        _exec(b, "UPDATE accounts SET title = 'theirs' WHERE number = 'M1'")
        summary = _sync(worker)
        assert summary.dead >= 1
        assert _a_accounts(a)["M1"][0] == "mine"  # neither side overwritten
        assert _b_accounts(b)["M1"][0] == "theirs"
        state = StateStore(worker.config.state.url)
        pending = state.conflict_rows(pending=True)
        assert pending and pending[0]["a_values"]["name"] == "mine"
        assert pending[0]["b_values"]["title"] == "theirs"
        listed = CliRunner().invoke(cli, ["tx", "conflicts", "-c", str(config_path)])
        assert listed.exit_code == 0, listed.output
        assert "pending" in listed.output and "mine" in listed.output
        resolved = CliRunner().invoke(cli, ["tx", "resolve", "-c", str(config_path),
                                            str(pending[0]["id"]), "--keep", "b"])
        assert resolved.exit_code == 0, resolved.output
        assert "side b kept" in resolved.output
        summary = _settle(worker)
        assert summary.dead_total == 0  # the waiting changes were replayed and settled
        assert _a_accounts(a)["M1"][0] == _b_accounts(b)["M1"][0] == "theirs"
        assert state.conflict_rows(pending=True) == []
        assert {r["resolved_by"] for r in state.conflict_rows() if r["policy"] == "manual"} != {None}
    finally:
        worker.close()


def test_children_wait_for_their_parent_and_lookups_cross_the_id_map(sides):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (id, code, name, status) VALUES (500, 'P1', 'parent', 'A')")
    _exec(a, "INSERT INTO contacts (code, name, account_id) VALUES ('c1', 'child', 500)")
    _exec(b, "INSERT INTO accounts (number, title, state) VALUES ('P2', 'b parent', 'active')")
    worker = make()
    try:
        _settle(worker)
        # The ids differ on each side (500 in a, 1 or 2 in b): the id map translated them.
        assert _b_contacts(b) == {"c1": ("child", "P1")}
        with b.begin() as conn:
            p2 = conn.scalar(sa.text("SELECT id FROM accounts WHERE number = 'P2'"))
            conn.execute(sa.text("INSERT INTO people (code, full_name, account_id) "
                                 "VALUES ('c2', 'b child', :p)"), {"p": p2})
        _settle(worker)
        assert _a_contacts(a) == _b_contacts(b) == {"c1": ("child", "P1"), "c2": ("b child", "P2")}
    finally:
        worker.close()


def test_a_child_whose_parent_never_arrives_is_dead_lettered_naming_it(sides):
    a, b, make = sides
    _exec(a, "INSERT INTO contacts (code, name, account_id) VALUES ('orphan', 'o', 999)")
    worker = make()
    try:
        summary = worker.run_until_idle(max_wait=60)
        assert summary.dead == 1
    finally:
        worker.close()
    from bus.ops.txlog import TxLog  # noqa: PLC0415

    log = TxLog(worker.config)
    [tx] = log.select("error")
    assert "missing parent" in (tx.error or "")
    assert "'accounts'" in (tx.error or "") and "'999'" in (tx.error or "")


def test_filter_and_soft_delete(sides):
    a, b, make = sides
    _exec(a, "INSERT INTO accounts (code, name, status) VALUES ('F1', 'kept', 'A'), "
             "('F2', 'filtered', 'I')")
    worker = make(filter="status == 'A'", filter_action="delete",
                  b2a={"deletes": "soft", "soft_delete": {"field": "is_deleted", "value": 1},
                       "filter": "title != 'private'"})
    try:
        _settle(worker)
        assert set(_b_accounts(b)) == {"F1"}
        _exec(a, "UPDATE accounts SET status = 'I' WHERE code = 'F1'")  # leaves the filter
        _settle(worker)
        assert _b_accounts(b) == {}
        _exec(b, "INSERT INTO accounts (number, title, state) VALUES ('S1', 'soft', 'active'), "
                 "('P1', 'private', 'active')")
        _settle(worker)
        assert "P1" not in _a_accounts(a)  # b → a has its own (upload) filter
        assert "S1" in _a_accounts(a)
        _exec(b, "DELETE FROM accounts WHERE number = 'S1'")
        _settle(worker)
        with a.connect() as conn:
            assert conn.scalar(sa.text("SELECT is_deleted FROM accounts WHERE code = 'S1'")) == 1
    finally:
        worker.close()


@pytest.mark.parametrize("policy", ["source_wins", "target_wins", "newest_wins"])
def test_overlapping_random_edits_converge_under_every_policy(sides, policy):
    a, b, make = sides
    rng = random.Random(policy)
    _exec(a, "INSERT INTO accounts (code, name, status, credit) VALUES (:c, :n, 'A', 1)",
          [{"c": f"R{i}", "n": f"r {i}"} for i in range(30)])
    worker = make(conflict=policy)
    try:
        _settle(worker)
        for edit in range(60):  # the same records edited on both sides between two syncs
            code = f"R{rng.randrange(30)}"
            if rng.random() < 0.5:
                _exec(a, "UPDATE accounts SET name = :n WHERE code = :k", {"n": f"a{edit}", "k": code})
            else:
                _exec(b, "UPDATE accounts SET title = :n WHERE number = :k",
                      {"n": f"b{edit}", "k": code})
        _settle(worker)
        assert _a_accounts(a) == _b_accounts(b)
        log = StateStore(worker.config.state.url).conflict_rows(link="accounts")
        assert log, "overlapping edits were not seen as conflicts"
        for row in log:  # every overwritten version is kept with both values
            assert row["a_values"] is not None and row["b_values"] is not None
            assert row["winner"] in ("a", "b")
            if policy != "newest_wins":
                assert row["winner"] == ("a" if policy == "source_wins" else "b")
    finally:
        worker.close()

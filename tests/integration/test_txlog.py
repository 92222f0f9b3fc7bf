"""The offline-transaction log: retries, dead letters, list / show / replay / archive / purge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pika
import pytest
import sqlalchemy as sa

from bus.amqp.publisher import OutMessage, Publisher
from bus.amqp.topology import CHANGES_EXCHANGE, DEAD_EXCHANGE
from bus.cli import app
from bus.config.load import load_config
from bus.ops.txlog import TxFilter, TxLog, parse_since
from schemas.event import dumps, new_event
from tests.hostile import BIG, Case, hostile_cases, publish, valid_cases
from tests.proxy import TcpProxy
from tests.support import dead_letter_count, wait_for
from tests.syncenv import ROOT, insert_items, make_env, table_rows

pytestmark = pytest.mark.integration

NULLABLE_SOURCE = ("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, "
                   "price NUMERIC, updated TIMESTAMP)")


def tx_cli(config, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bus.cli", "tx", *args, "--config", str(config)],
                          cwd=ROOT, text=True, capture_output=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "300"})


def _run(env) -> tuple[int, list[str]]:
    lines: list[str] = []
    return app.run(env.config_path, until_idle=True, max_wait=60, echo=lines.append), lines


@pytest.fixture
def rejected(tmp_path, pg_url, amqp_url):
    """A sync where rows 7, 17 and 27 are rejected by the target (NULL name)."""
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url, source_ddl=NULLABLE_SOURCE)
    insert_items(env.source(), range(1, 41))
    with env.source().begin() as conn:
        conn.execute(sa.text("UPDATE items SET name = NULL WHERE id IN (7, 17, 27)"))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    code, lines = _run(env)
    assert code == app.EXIT_FAILED, lines
    log = TxLog(load_config(env.config_path).config)
    yield env, log
    log.close()


def test_permanent_errors_are_listed_with_the_targets_reason_and_every_filter_works(rejected):
    env, log = rejected
    errors = log.select("error")
    assert sorted(json.loads(t.key)["id"] for t in errors) == [7, 17, 27]
    assert all("null value" in t.error and t.error_class == "RecordRejected" for t in errors)
    assert all(t.link == "items" and t.entity == "items" and t.attempts == 1 for t in errors)

    assert [json.loads(t.key)["id"] for t in log.select("error", TxFilter(key="17"))] == [17]
    assert len(log.select("error", TxFilter(key='{"id": 27}'))) == 1
    assert len(log.select("error", TxFilter(link="items"))) == 3
    assert log.select("error", TxFilter(link="other")) == []
    assert len(log.select("error", TxFilter(entity="items"))) == 3
    assert log.select("error", TxFilter(entity="orders")) == []
    assert len(log.select("error", TxFilter(since=parse_since("1h")))) == 3
    assert log.select("error", TxFilter(since=parse_since("2099-01-01T00:00"))) == []
    assert len(log.select("error", TxFilter(error_contains="NOT-NULL CONSTRAINT"))) == 3
    assert log.select("error", TxFilter(error_contains="deadlock")) == []
    processed = log.select("processed", TxFilter(key="18"))
    assert [t.key for t in processed] == ['{"id":18}'] and processed[0].at

    listed = json.loads(tx_cli(env.config_path, "list", "--json", "--key", "17").stdout)
    assert [t["key"] for t in listed] == ['{"id":17}']
    shown = tx_cli(env.config_path, "show", listed[0]["id"])
    assert shown.returncode == 0 and '"status": "error"' in shown.stdout
    (one,) = json.loads(shown.stdout)
    assert one["event"]["data"]["record"]["name"] is None  # read back from the log
    assert [m["status"] for m in one["moves"]] == ["error"] and one["moves"][0]["by"] == "consumer"
    stats = json.loads(tx_cli(env.config_path, "stats", "--json").stdout)
    assert stats["items"]["error"] == 3 and stats["items"]["processed"] == 37


def test_replay_after_the_cause_is_fixed_delivers_and_empties_the_error_list(rejected):
    env, log = rejected
    with env.target().begin() as conn:
        conn.execute(sa.text("ALTER TABLE items ALTER COLUMN name DROP NOT NULL"))

    result = tx_cli(env.config_path, "replay", "--all")
    assert result.returncode == 0 and "3 transaction(s) replayed" in result.stdout, result

    code, lines = _run(env)
    assert code == app.EXIT_OK, lines
    assert table_rows(env.target()) == table_rows(env.source())
    assert log.select("error") == []
    assert len(log.select("processed", TxFilter(key="17"))) == 1


def test_a_replay_that_fails_again_returns_to_error_with_its_whole_history(rejected):
    env, log = rejected
    first = log.select("error", TxFilter(key="7"))[0]
    assert log.replay(TxFilter(ids={first.id})).moved == 1
    assert len(log.select("error")) == 2

    code, _ = _run(env)
    assert code == app.EXIT_FAILED
    again = log.select("error", TxFilter(key="7"))[0]
    assert again.id == first.id
    assert again.attempts == 2 and again.replays == 1
    assert [h["class"] for h in again.history] == ["RecordRejected", "Replayed", "RecordRejected"]
    assert again.first_failure == first.first_failure
    assert again.last_failure > first.last_failure
    (shown,) = log.find(first.id)
    assert [m["status"] for m in shown.moves] == ["error", "pending", "error"]
    assert shown.moves[1]["by"].startswith("operator:")


def test_explicit_ids_are_reported_one_by_one_and_unknown_or_archived_ones_fail(rejected):
    env, log = rejected
    seven, seventeen = (log.select("error", TxFilter(key=k))[0].id for k in ("7", "17"))
    assert tx_cli(env.config_path, "archive", seven).returncode == 0

    result = tx_cli(env.config_path, "replay", seven, seventeen, "no-such-id")
    assert result.returncode == 1, result.stdout
    assert f"{seventeen}: set to pending" in result.stdout
    assert f"{seven}: not error but archived (replay it with --status archived)" in result.stdout
    assert "no-such-id: no such transaction in this config" in result.stdout
    assert "1 transaction(s) replayed" in result.stdout

    again = tx_cli(env.config_path, "replay", "--status", "archived", seven)
    assert again.returncode == 0 and f"{seven}: set to pending" in again.stdout, again.stdout
    assert {t.id for t in log.select("pending")} == {seven, seventeen}
    listed = json.loads(tx_cli(env.config_path, "list", "--status", "all", "--json").stdout)
    statuses = {t["id"]: t["status"] for t in listed if t["status"] != "processed"}
    assert sorted(statuses.values()) == ["error", "pending", "pending"]


def test_archive_sets_aside_and_purge_deletes_old_archived_transactions(rejected):
    env, log = rejected
    target = log.select("error", TxFilter(key="27"))[0]
    result = tx_cli(env.config_path, "archive", target.id)
    assert result.returncode == 0 and "1 transaction(s) archived" in result.stdout

    assert sorted(json.loads(t.key)["id"] for t in log.select("error")) == [7, 17]
    archived = log.select("archived")
    assert [t.id for t in archived] == [target.id] and archived[0].error == target.error
    assert tx_cli(env.config_path, "purge", "--archived", "--older-than", "30d").stdout.startswith(
        "0 archived")
    assert len(log.select("archived")) == 1
    time.sleep(0.1)  # the behaviour under test: the archive grows older than 0.05 s
    assert log.purge_archived(0.05).moved == 1
    assert log.select("archived") == []
    assert tx_cli(env.config_path, "replay").returncode == 2  # refuses to act on nothing said


def test_bad_input_is_dead_lettered_with_a_reason_and_the_consumer_keeps_going(
        tmp_path, pg_url, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db", target_url=pg_url,
                   amqp_url=amqp_url)
    insert_items(env.source(), range(1, 11))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    assert _run(env)[0] == app.EXIT_OK  # topology and cursor in place
    good = new_event(connection="src", entity="items", op="upsert", key={"id": 99}, version=1,
                     record={"id": 99, "name": "x", "qty": 1, "price": "1", "updated": None},
                     modified_at=None, cursor=None)
    publisher, sign = Publisher(amqp_url), env.signer().headers  # signed, so the shape is read
    bodies = {"bad-json": b"not json {", "bad-event": b'{"id": "x", "data": {"op": "merge"}}',
              good["id"]: dumps(good)}
    publisher.publish_batch([OutMessage(CHANGES_EXCHANGE, "src.items.upsert", body, sign(body),
                                        message_id=ident) for ident, body in bodies.items()])
    publisher.close()

    code, _ = _run(env)
    assert code == app.EXIT_FAILED
    log = TxLog(load_config(env.config_path).config)
    errors = {t.id: t for t in log.select("error")}
    log.close()
    assert set(errors) == {"bad-json", "bad-event"}
    assert "malformed change event" in errors["bad-json"].error
    assert "malformed change event" in errors["bad-event"].error
    assert 99 in table_rows(env.target())


def test_a_message_that_kills_the_consumer_shows_how_often_it_was_delivered(
        tmp_path, amqp_url):
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/s.db",
                   target_url=f"sqlite:///{tmp_path}/t.db", amqp_url=amqp_url)
    env.config_path.write_text(env.config_path.read_text().replace(
        "broker:\n", "broker:\n  delivery_limit: 3\n", 1))
    config = load_config(env.config_path).config
    assert config.broker.delivery_limit == 3
    _declare(config)
    publish(amqp_url, CHANGES_EXCHANGE, "src.items.upsert", [Case("poison", b'{"poison": 1}')])
    deliveries = 0
    for _ in range(10):  # a consumer process that dies on it each time: never settled
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = conn.channel()

        def delivered_or_dead(channel=channel) -> str | None:
            if channel.basic_get("syncbus.link.items.a2b")[0] is not None:
                return "delivered"
            return "dead" if dead_letter_count(amqp_url) else None

        outcome = wait_for(delivered_or_dead, timeout=10, message="neither back nor dead")
        conn.close()  # killed: the broker puts the unacked message back and counts it
        if outcome == "dead":
            break
        deliveries += 1
    assert deliveries == 4  # the broker dead-letters it on the delivery after the limit

    for _list in range(2):  # no worker ran: the listing sweeps the log itself, once
        result = tx_cli(env.config_path, "list", "--json")
        assert result.returncode == 0, result.stderr
        (dead,) = json.loads(result.stdout)
        assert (dead["id"], dead["link"], dead["error_class"], dead["deliveries"]) == (
            "poison", "items", "Broker.delivery_limit", 4)
        assert "delivered 4 times without being settled (delivery_limit 3)" in dead["error"]
        assert dead["last_failure"] and dead["routing_key"] == "src.items.upsert"


def _declare(config) -> None:
    from kombu import Connection

    from bus.amqp.topology import declare_topology
    with Connection(config.broker.url) as conn:
        declare_topology(conn, config)


@pytest.fixture
def poisoned(tmp_path, amqp_url):
    """A config whose dead-letter queue holds two valid dead letters among hostile ones."""
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/s.db",
                   target_url=f"sqlite:///{tmp_path}/t.db", amqp_url=amqp_url)
    _declare(load_config(env.config_path).config)
    cases = valid_cases() + hostile_cases()
    publish(amqp_url, DEAD_EXCHANGE, "src.items.upsert", cases)
    return env, cases


def _id(case: Case, cases: list[Case]) -> str:
    """A case's transaction id: its message id. The case without one has ``5`` in its
    body, no event id of the bus (a UUID), so it is named by its letter: the offset
    it was published at into the fresh log."""
    return case.message_id or f"o:{cases.index(case)}"


def test_tx_list_shows_each_unreadable_dead_letter_with_size_first_bytes_and_why(poisoned):
    env, cases = poisoned
    result = tx_cli(env.config_path, "list")
    assert result.returncode == 0 and not result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert f"{len(cases)} error transaction(s)" in lines
    unreadable = [c for c in cases if c.reason]
    assert any(line.startswith(f"{len(unreadable)} with a body that cannot be read")
               for line in lines)
    for case in unreadable:
        (line,) = [ln for ln in lines if ln.startswith(f"  {case.message_id}  unreadable (")]
        assert f"({len(case.body)} bytes): {case.reason}" in line, line
        assert len(line) < 400  # a 5 MB body shows its first bytes only
    assert r"starts with b'\x00\x01\x02\x03" in result.stdout  # escaped, never raw
    for key in (1, 2):
        (row,) = [ln for ln in lines if ln.split()[:1] == [f"valid-{key}"]]
        assert row.split()[1:5] == ["items", "items", f'{{"id":{key}}}', "upsert"], row
    (odd_case,) = [c for c in cases if not c.message_id]
    (odd,) = [ln for ln in lines if ln.split()[:1] == [_id(odd_case, cases)]]  # ints and lists as text
    assert odd.split()[1:6] == ["items", "7", "[9]", "1", "1"], odd
    (bad,) = [ln for ln in lines if ln.split()[:1] == ["attempts-abc"]]
    assert bad.split()[5] == "?"
    # Markup and control characters from a message are printed as escaped plain text.
    assert "\x1b" not in result.stdout and "\x00" not in result.stdout
    assert r"[/red] \x1b[31mred\u202e" in result.stdout
    assert r'{"id":"[/bold]\u001b[2J"}' in result.stdout


def test_tx_list_json_show_stats_and_filters_read_every_hostile_dead_letter(poisoned):
    env, cases = poisoned
    result = tx_cli(env.config_path, "list", "--json")
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert len(result.stdout) < 500_000  # the two 5 MB bodies are not printed whole
    listed = {t["id"]: t for t in json.loads(result.stdout)}
    assert set(listed) == {_id(c, cases) for c in cases}
    for case in cases:
        tx = listed[_id(case, cases)]
        assert tx["link"] == "items" and tx["status"] == "error"
        if case.reason:
            assert case.reason in tx["unreadable"]["reason"], tx
            assert tx["unreadable"]["size"] == len(case.body)
            assert (tx["event"], tx["entity"], tx["key"]) == (None, None, None)
        else:
            assert "unreadable" not in tx and tx["key"], tx
    assert listed["valid-1"]["error"] == "boom" and listed["valid-1"]["attempts"] == 1
    odd = next(_id(c, cases) for c in cases if not c.message_id)
    assert [listed[odd][f] for f in ("entity", "op", "key", "version")] == ["7", "1", "[9]", "[1]"]
    assert listed["attempts-abc"]["attempts"] is None
    assert listed["history-not-list"]["history"] == []
    assert listed["error-bytes"]["error"] == "\\xff bad \x00"
    assert listed["big-event"]["key"] == '{"id":19}'
    for tx_id, key in (("valid-1", 1), ("deep-header", 17), ("foreign-encoded", 18)):
        (one,) = json.loads(tx_cli(env.config_path, "show", tx_id).stdout)
        assert one["event"]["data"]["key"] == {"id": key}
    (big,) = json.loads(tx_cli(env.config_path, "show", "big-event").stdout)
    assert big["event"] is None and big["key"] == '{"id":19}'
    assert big["event_preview"]["size"] > BIG and big["event_preview"]["preview"].startswith('{"')

    shown = tx_cli(env.config_path, "show", "deep-json")
    assert shown.returncode == 0, shown.stderr
    (deep,) = json.loads(shown.stdout)
    assert deep["unreadable"] == {"size": 100_000, "preview": "[" * 64,
                                  "reason": "nested deeper than 64 levels"}
    stats = tx_cli(env.config_path, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["items"]["error"] == len(cases)
    table = tx_cli(env.config_path, "stats")
    assert table.returncode == 0 and "items" in table.stdout

    log = TxLog(load_config(env.config_path).config)
    try:
        readable = {_id(c, cases) for c in cases if not c.reason}
        assert {t.id for t in log.select("error", TxFilter(entity="items"))} == readable - {
            _id(c, cases) for c in cases if not c.message_id}
        assert [t.id for t in log.select("error", TxFilter(key="1"))] == ["valid-1"]
        assert {t.id for t in log.select("error", TxFilter(error_contains="not json"))} == {
            "not-json", "nul", "nan"}
        assert {t.id for t in log.select("error", TxFilter(error_contains="unreadable"))} == {
            c.message_id for c in cases if c.reason}
        assert log.warnings == []
    finally:
        log.close()


def test_unreadable_dead_letters_can_be_archived_and_stay_readable_as_unreadable(poisoned):
    env, cases = poisoned
    unreadable = {c.message_id for c in cases if c.reason}
    result = tx_cli(env.config_path, "archive", "--error-contains", "unreadable")
    assert result.returncode == 0, result.stderr
    assert f"{len(unreadable)} transaction(s) archived" in result.stdout

    archived = json.loads(tx_cli(env.config_path, "list", "--status", "archived", "--json").stdout)
    assert {t["id"] for t in archived} == unreadable
    assert all(t["unreadable"]["reason"] and t["at"] for t in archived)
    left = json.loads(tx_cli(env.config_path, "list", "--json").stdout)
    assert {t["id"] for t in left} == {_id(c, cases) for c in cases if not c.reason}


#: The retry schedule of the outage test: short, so that it runs out within seconds.
OUTAGE_DELAYS = ["1s", "2s", "5s"]


def _most_attempts(log: TxLog) -> int:
    """The most failed attempts of a Pending transaction (from its retry headers)."""
    return max((t.attempts or 0 for t in log.select("pending")), default=0)


@pytest.mark.slow
def test_target_down_past_the_retry_schedule_nothing_dead_lettered_everything_delivered(
        tmp_path, pg_url, amqp_url):
    url = sa.make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    env = make_env(tmp_path, source_url=f"sqlite:///{tmp_path}/lite.db",
                   target_url=url.set(port=proxy.port).render_as_string(hide_password=False),
                   amqp_url=amqp_url, link={"retry": {"delays": OUTAGE_DELAYS}})
    src, dst = env.source(), sa.create_engine(pg_url)
    insert_items(src, range(1, 5_001))
    assert app.setup(env.config_path, echo=lambda _l: None) == 0
    stop = threading.Event()
    lines: list[str] = []
    worker = threading.Thread(target=lambda: app.run(env.config_path, echo=lines.append, stop=stop),
                              daemon=True)
    worker.start()
    try:
        wait_for(lambda: len(table_rows(dst, columns=("id", "name"))) > 500, timeout=60,
                 message="sync never started")
        proxy.cut()
        with src.begin() as conn:
            conn.execute(sa.text("UPDATE items SET qty = 0 WHERE id % 2 = 0"))
        log = TxLog(load_config(env.config_path).config)
        pending = wait_for(lambda: log.select("pending"), timeout=30,
                           message="nothing waited in retry while the target was down")
        # The target stays down until a change has failed once more than the schedule
        # has delays and still waits in retry: the last delay repeats (offline mode),
        # nothing goes to the dead-letter log.
        beyond = len(OUTAGE_DELAYS) + 1
        wait_for(lambda: _most_attempts(log) >= beyond, timeout=180, interval=1,
                 message=lambda: f"a change failing {beyond} times (most attempts: "
                                 f"{_most_attempts(log)}, errors: {len(log.select('error'))})")
        assert log.select("error") == [] and dead_letter_count(amqp_url) == 0
        proxy.restore()
        wait_for(lambda: table_rows(dst) == table_rows(src), timeout=90, interval=2,
                 message="target never caught up")
        assert log.select("error") == []
        log.close()
    finally:
        stop.set()
        worker.join(30)
        proxy.close()
    assert pending and all(t.status == "pending" for t in pending)

"""The state-store side of status, alerts and history (SQLite, no broker)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bus.state.rows import LinkDelta, RunRecord
from bus.state.store import StateStore


@pytest.fixture
def state(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    yield store
    store.close()


def test_activity_adds_up_per_link_and_feeds_the_dead_counters(state):
    now = datetime.now(UTC)
    state.add_link_activity([LinkDelta("a", applied=10, last_applied_at=now),
                             LinkDelta("b", dead=2, failure="boom", failure_at=now),
                             LinkDelta("c")])  # empty: nothing written
    state.add_link_activity([LinkDelta("a", applied=5, dead=1, skipped=3)])

    totals = state.activity_since(now - timedelta(minutes=1))
    assert totals == {"a": {"applied": 15, "skipped": 3, "retried": 0, "dead": 1},
                      "b": {"applied": 0, "skipped": 0, "retried": 0, "dead": 2}}
    assert state.activity_since(now + timedelta(minutes=1)) == {}
    assert state.link_errors_since("b", now - timedelta(minutes=1)) == 2
    rows = state.link_rows()
    assert rows["a"]["dead_count"] == 1 and rows["a"]["last_applied_at"] == now
    assert rows["b"]["dead_count"] == 2 and rows["b"]["last_failure"] == "boom"
    assert "c" not in rows

    state.set_dead_counts({"b": 5, "?": 1})
    assert {k: v["dead_count"] for k, v in state.link_rows().items()} == {"a": 0, "b": 5, "?": 1}


def test_pause_flags_know_who_why_and_when(state):
    assert state.set_link_paused("a", True, reason="maintenance", by="ops@host")
    assert not state.set_link_paused("a", True, reason="again")  # already paused
    row = state.link_rows()["a"]
    assert row["paused"] and row["paused_reason"] == "maintenance" and row["paused_by"] == "ops@host"
    assert state.set_link_paused("a", False, by="ops@host")
    row = state.link_rows()["a"]
    assert not row["paused"] and row["resumed_at"] >= row["paused_at"]
    assert not state.set_link_paused("never-paused", False)


def test_runs_filter_by_name_kind_and_time_and_are_purged(state):
    now = datetime.now(UTC)
    state.add_runs([
        RunRecord("r1", "run", "until-idle", now - timedelta(hours=2), now - timedelta(hours=2)),
        RunRecord("r1", "link", "items", now - timedelta(hours=2), now - timedelta(hours=2),
                  upserts=3),
        RunRecord("r1", "link", "other", now - timedelta(hours=2), now - timedelta(hours=2)),
        RunRecord("p1", "poll", "src.items", now, now, upserts=7, error="x" * 5000),
    ])
    assert [r["name"] for r in state.runs()] == ["src.items", "other", "items", "until-idle"]
    assert [r["name"] for r in state.runs(names=["items", "src.items"])] == [
        "src.items", "items", "until-idle"]
    assert [r["kind"] for r in state.runs(kinds=["run"])] == ["run"]
    assert [r["run_id"] for r in state.runs(since=now - timedelta(minutes=1))] == ["p1"]
    assert len(state.runs(limit=2)) == 2
    assert len(state.runs(kinds=["poll"])[0]["error"]) == 2000
    assert state.purge_runs(3600) == 3 and [r["run_id"] for r in state.runs()] == ["p1"]


def test_polls_are_recorded_with_their_last_success_and_last_error(state):
    started = datetime.now(UTC)
    state.record_poll("src.items", started=started, seconds=0.5, changes=3, worker="w1")
    state.record_poll("src.items", started=started, seconds=0.1, changes=0, error="down")
    row = state.detector_rows()["src.items"]
    assert row["last_ok_at"] == started and row["last_changes"] == 3
    assert row["last_error"] == "down" and row["last_error_at"] >= started
    state.save_cursor("src.items", "c1", changes=3)
    assert state.checkpoint_rows()["src.items"]["cursor"] == "c1"
    assert state.acquire_lease("src.items", "w1", 60)
    assert state.lease_owners() == {"src.items": "w1"}

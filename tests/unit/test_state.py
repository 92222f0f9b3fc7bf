"""The state store on SQLite: cursors, leases, the ordering guard."""

from __future__ import annotations

import pytest

from bus.state.store import StateStore
from tests.support import wait_for


@pytest.fixture
def state(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path}/sub/state.db")  # parent folders are created
    yield store
    store.close()


def test_cursor_round_trip(state):
    assert state.load_cursor("crm.customers") is None
    state.save_cursor("crm.customers", '{"after": 5}', changes=3)
    state.save_cursor("crm.customers", '{"after": 9}')
    assert state.load_cursor("crm.customers") == '{"after": 9}'


def test_a_lease_is_exclusive_until_released_or_expired(state):
    assert state.acquire_lease("crm.customers", "a", ttl=60)
    assert state.acquire_lease("crm.customers", "a", ttl=60)  # renewal
    assert not state.acquire_lease("crm.customers", "b", ttl=60)
    assert state.lease_owner("crm.customers") == "a"
    state.release_lease("crm.customers", "a")
    assert state.acquire_lease("crm.customers", "b", ttl=0.2)
    wait_for(lambda: state.lease_owner("crm.customers") is None, timeout=10, interval=0.05,
             message="b's 0.2 s lease to expire")
    assert state.acquire_lease("crm.customers", "a", ttl=60)


def test_the_guard_marks_older_and_equal_versions_stale_and_commits_new_ones(state):
    with state.guard("link", ["k1", "k2"]) as guard:
        assert not guard.is_stale("k1", 5)
        guard.record("k1", 5)
        guard.record("k1", 3)  # an older version never lowers the record
    assert state.applied_version("link", "k1") == 5
    with state.guard("link", ["k1"]) as guard:
        assert guard.is_stale("k1", 5) and guard.is_stale("k1", 4)
        assert not guard.is_stale("k1", 6)
        guard.record("k1", 6)
    assert state.applied_version("link", "k1") == 6


def test_the_guard_records_nothing_when_the_batch_fails(state):
    with pytest.raises(RuntimeError), state.guard("link", ["k"]) as guard:
        guard.record("k", 1)
        raise RuntimeError("target write failed")
    assert state.applied_version("link", "k") is None


def test_a_dead_owners_lease_is_taken_over_at_once(state):
    assert state.acquire_lease("crm.customers", "host:1:a", ttl=600)
    assert not state.acquire_lease("crm.customers", "host:2:b", ttl=600)
    assert state.acquire_lease("crm.customers", "host:2:b", ttl=600, dead_owner="host:1:a")
    assert state.lease_owner("crm.customers") == "host:2:b"
    assert not state.acquire_lease("crm.customers", "host:3:c", ttl=600, dead_owner="host:1:a")

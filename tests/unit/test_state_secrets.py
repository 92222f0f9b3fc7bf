"""Secrets the bus generates and keeps in the state store (webhook clientState)."""

from __future__ import annotations

import threading

import sqlalchemy as sa

from bus.state.store import StateStore


def test_a_kept_secret_is_made_once_and_survives_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    store = StateStore(url)
    made: list[str] = []

    def make() -> str:
        made.append(f"s{len(made)}")
        return made[-1]

    assert store.get_secret("bc", "erp/v2.0/customers") is None
    assert store.keep_secret("bc", "erp/v2.0/customers", make) == "s0"
    assert store.keep_secret("bc", "erp/v2.0/customers", make) == "s0"
    assert store.keep_secret("bc", "erp/v2.0/vendors", make) == "s1"
    assert store.keep_secret("other", "erp/v2.0/customers", make) == "s2"
    store.close()

    again = StateStore(url)
    assert again.get_secret("bc", "erp/v2.0/customers") == "s0"
    assert made == ["s0", "s1", "s2"]
    again.close()


def test_racing_writers_all_get_the_first_secret(tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    stores = [StateStore(url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    got: list[str] = []

    def keep(i: int) -> None:
        start.wait()
        got.append(stores[i].keep_secret("bc", "name", lambda: f"from {i}"))

    threads = [threading.Thread(target=keep, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0] == stores[0].get_secret("bc", "name")
    for s in stores:
        s.close()


def test_an_existing_state_store_gains_the_table(tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    StateStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE syncbus_secrets")  # a store made before it existed
    engine.dispose()
    store = StateStore(url)
    assert store.keep_secret("bc", "n", lambda: "v") == "v"
    store.close()

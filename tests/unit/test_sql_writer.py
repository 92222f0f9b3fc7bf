"""Grouping of upsert rows into executemany groups (no database)."""

from __future__ import annotations

from connectors.sql.writer import _group_upserts


def test_rows_with_one_column_set_form_one_group() -> None:
    prepared = [(i, ("id",), {"id": i, "name": f"n{i}"}) for i in range(5)]
    groups = _group_upserts(prepared)
    assert [g.indexes for g in groups] == [[0, 1, 2, 3, 4]]


def test_distinct_records_are_grouped_by_column_set_regardless_of_order() -> None:
    prepared = [(0, ("id",), {"id": 1, "a": 1}), (1, ("id",), {"id": 2, "b": 1}),
                (2, ("id",), {"id": 3, "a": 1})]
    assert [g.indexes for g in _group_upserts(prepared)] == [[0, 2], [1]]


def test_a_record_in_two_column_sets_keeps_the_batch_order() -> None:
    prepared = [(0, ("id",), {"id": 1, "a": 1}), (1, ("id",), {"id": 1, "a": 2, "b": 1}),
                (2, ("id",), {"id": 1, "a": 3})]
    assert [g.indexes for g in _group_upserts(prepared)] == [[0], [1], [2]]


def test_unhashable_key_values_fall_back_to_the_batch_order() -> None:
    prepared = [(0, ("k",), {"k": [1], "a": 1}), (1, ("k",), {"k": [2], "b": 1}),
                (2, ("k",), {"k": [3], "a": 1})]
    assert [g.indexes for g in _group_upserts(prepared)] == [[0], [1], [2]]

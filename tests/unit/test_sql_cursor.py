"""Cursor encoding, page merging and internal names of the SQL connector."""

from __future__ import annotations

import pytest

from connectors.base import ChangeRecord, Op, SchemaError
from connectors.sql.tracking import dump_cursor, internal_name, load_cursor, merge_page


def test_cursor_round_trip_and_foreign_cursors() -> None:
    state = {"prev": "10:12:11", "cur": None, "after": 7}
    assert load_cursor(dump_cursor(state), ("prev", "cur", "after"), "erp") == state
    assert load_cursor(None, ("after",), "erp") is None
    for foreign in ("12345", "[1]", '{"after": 3}', "W/\"etag\""):
        with pytest.raises(SchemaError, match="erp: .* is not a cursor"):
            load_cursor(foreign, ("prev", "cur", "after"), "erp")


def _rec(version: int, op: Op = Op.UPSERT) -> ChangeRecord:
    return ChangeRecord(key={"id": version}, op=op, version=version)


def test_merge_page_interleaves_by_version_and_reports_leftovers() -> None:
    upserts = [_rec(1), _rec(4), _rec(5)]
    deletes = [_rec(2, Op.DELETE), _rec(3, Op.DELETE)]

    page, more = merge_page(upserts, deletes, 4)
    assert [r.version for r in page] == [1, 2, 3, 4] and more
    page, more = merge_page(upserts, deletes, 5)
    assert [r.version for r in page] == [1, 2, 3, 4, 5] and not more


def test_internal_names_fit_postgresql_identifiers_and_stay_distinct() -> None:
    long_a, long_b = "x" * 70 + "a", "x" * 70 + "b"
    assert internal_name("ver", "items") == "_syncbus_items_ver"
    assert len(internal_name("ver", long_a)) <= 63
    assert internal_name("ver", long_a) != internal_name("ver", long_b)

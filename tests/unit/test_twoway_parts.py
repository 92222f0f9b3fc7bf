"""Two-way links without a broker: inverted field maps, content hashes, conflict winners."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from connectors.base import ConfigError
from consumers.flow import flows, side_fields
from consumers.mapping import FieldMapper
from consumers.twoway import content_hash, normalize, winner
from schemas.config import LinkConfig


def _link(**extra: object) -> LinkConfig:
    return LinkConfig.model_validate({
        "source": {"connection": "crm", "entity": "account"},
        "target": {"connection": "hub", "entity": "accounts"},
        "key": "accountnumber", "direction": "both",
        "fields": {"number": "accountnumber", "name": "name",
                   "status": {"from": "statecode", "map": {0: "active", 1: "inactive"}},
                   "code": {"from": "code", "transform": ["upper"]},
                   "origin": {"const": "crm"}},
        **extra})


def test_the_field_map_is_inverted_for_b_to_a():
    a2b, b2a = flows("accounts", _link())
    assert (a2b.direction, b2a.direction) == ("a2b", "b2a")
    assert b2a.key == ["number"]
    back = FieldMapper(b2a).map_record({"number": "A-1", "name": "Contoso", "status": "inactive",
                                        "code": "X", "origin": "crm"})
    assert back == {"accountnumber": "A-1", "name": "Contoso", "statecode": "1"}
    assert FieldMapper(b2a).target_key({"number": "A-1"}) == {"accountnumber": "A-1"}
    assert set(b2a.one_way) == {"code", "origin"}
    assert "has no inverse" in b2a.one_way["code"]


def test_b2a_fields_replace_and_add_to_the_inverted_map():
    _, b2a = flows("accounts", _link(b2a={"fields": {"code": "code", "description": "notes"}}))
    assert FieldMapper(b2a).map_record({"number": "A", "code": "x", "notes": "n"})["code"] == "x"
    assert "code" not in b2a.one_way
    assert FieldMapper(b2a).map_record({"number": "A", "notes": "n"})["description"] == "n"


def test_a_map_that_is_not_one_to_one_stays_one_way():
    link = _link(fields={"number": "accountnumber",
                         "kind": {"from": "type", "map": {"A": "x", "B": "x"}}})
    _, b2a = flows("accounts", link)
    assert "cannot be inverted" in b2a.one_way["kind"]


def test_a_transformed_key_cannot_flow_back():
    link = _link(fields={"number": {"from": "accountnumber", "transform": ["upper"]}})
    with pytest.raises(ConfigError, match="key field 'accountnumber' is not a plain copy"):
        flows("accounts", link)


def test_side_fields_cover_what_each_side_syncs():
    fields = side_fields(flows("accounts", _link()))
    assert fields == {"a": frozenset({"accountnumber", "name", "statecode", "code"}),
                      "b": frozenset({"number", "name", "status", "code"})}


def test_config_rules_of_directions_and_deletes():
    with pytest.raises(ValidationError, match="deletes: soft needs soft_delete"):
        _link(deletes="soft")
    with pytest.raises(ValidationError, match="b2a settings need direction"):
        _link(direction="a2b", b2a={"deletes": "ignore"})
    with pytest.raises(ValidationError, match="did you mean '=='"):
        _link(filter="statecode = 0")
    soft = _link(b2a={"deletes": "soft", "soft_delete": {"field": "is_deleted"}})
    a2b, _ = flows("accounts", soft)
    assert a2b.soft_marker is not None and a2b.soft_marker.field == "is_deleted"


@pytest.mark.parametrize(("one", "other"), [
    (12.5, "12.50"), (Decimal("12.50"), 12.5), (7, "7.0"), (True, 1), ("", None),
    ("2026-01-02T03:04:05Z", "2026-01-02T04:04:05+01:00"),
    ("2026-01-02T03:04:05", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
])
def test_the_same_content_hashes_equal_however_a_system_returns_it(one, other):
    assert normalize(one) == normalize(other)
    assert content_hash({"f": one}, ["f"]) == content_hash({"f": other}, ["f"])


@pytest.mark.parametrize(("one", "other"), [("012", "12"), ("a", "A"), (1, 2), ("x", None)])
def test_different_content_hashes_differently(one, other):
    assert content_hash({"f": one}, ["f"]) != content_hash({"f": other}, ["f"])


def test_absent_fields_count_as_null_and_other_fields_are_ignored():
    assert content_hash({"a": 1, "z": "ignored"}, ["a", "b"]) == content_hash({"a": 1, "b": None},
                                                                              ["a", "b"])


def test_conflict_winners():
    early, late = "2026-01-01T10:00:00Z", "2026-01-01T11:00:00Z"
    assert winner("source_wins", "b", late, early) == "a"
    assert winner("target_wins", "a", late, early) == "b"
    assert winner("manual", "a", late, early) is None
    assert winner("newest_wins", "a", late, early) == "a"
    assert winner("newest_wins", "a", early, late) == "b"
    assert winner("newest_wins", "b", late, late) == "a"  # a tie goes to side a
    assert winner("newest_wins", "b", None, late) == "b"  # unknown time: the change applied wins

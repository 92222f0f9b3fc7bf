"""Field maps: rename, const, default, transforms, value maps, identity, target keys."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from connectors.base import ConfigError, MappingError
from consumers.mapping import FieldMapper
from schemas.config import LinkConfig


def _mapper(fields: dict[str, Any] | None, *, key: Any = "id",
            target_fields: list[str] | None = None) -> FieldMapper:
    link = LinkConfig.model_validate({
        "source": {"connection": "crm", "entity": "customers"},
        "target": {"connection": "erp", "entity": "clients"},
        "key": key,
        **({"fields": fields} if fields is not None else {}),
    })
    return FieldMapper(link, target_fields=target_fields)


def _one(spec: Any, value: Any) -> Any:
    """Map ``value`` of source field ``v`` through ``spec`` into target field ``out``."""
    return _mapper({"id": "id", "out": spec}).map_record({"id": 1, "v": value})["out"]


def test_a_shorthand_renames_a_field():
    mapper = _mapper({"client_id": "id", "full_name": "name"})
    assert mapper.map_record({"id": 7, "name": "Anna", "extra": 1}) == {
        "client_id": 7, "full_name": "Anna"}


def test_an_absent_source_field_maps_to_null():
    assert _mapper({"id": "id", "name": "name"}).map_record({"id": 1}) == {"id": 1, "name": None}


@pytest.mark.parametrize("const", ["crm", 0, False, None, 1.5])
def test_a_constant_is_written_whatever_the_record(const):
    mapper = _mapper({"id": "id", "origin": {"const": const}})
    assert mapper.map_record({"id": 1, "origin": "ignored"}) == {"id": 1, "origin": const}


def test_a_list_constant_is_not_shared_between_records():
    mapper = _mapper({"id": "id", "tags": {"const": ["a"]}})
    first = mapper.map_record({"id": 1})
    first["tags"].append("b")
    assert mapper.map_record({"id": 2})["tags"] == ["a"]


@pytest.mark.parametrize(("value", "expected"), [(None, "SK"), ("CZ", "CZ"), ("", ""), (0, 0)])
def test_a_default_replaces_null_only(value, expected):
    assert _one({"from": "v", "default": "SK"}, value) == expected


def test_a_default_replaces_an_absent_field():
    assert _mapper({"id": "id", "c": {"from": "v", "default": "SK"}}).map_record({"id": 1}) == {
        "id": 1, "c": "SK"}


def test_the_default_goes_through_the_transforms_and_the_map():
    spec = {"from": "v", "default": " a ", "transform": ["strip", "upper"], "map": {"A": "active"}}
    assert _one(spec, None) == "active"


@pytest.mark.parametrize(
    ("transform", "value", "expected"),
    [
        ("upper", "sk", "SK"),
        ("lower", "A@Example.COM", "a@example.com"),
        ("strip", "  Anna Novak \t", "Anna Novak"),
        ("upper", None, None),
        ("strip", None, None),
        ("upper", 42, 42),
    ],
)
def test_text_transforms_touch_strings_only(transform, value, expected):
    assert _one({"from": "v", "transform": [transform]}, value) == expected


def test_transforms_apply_in_order():
    assert _one({"from": "v", "transform": ["strip", "upper"]}, "  sk ") == "SK"


@pytest.mark.parametrize(
    ("places", "value", "expected"),
    [
        (2, "12.345", "12.35"),  # decimal strings stay decimal strings
        (2, " 7 ", "7.00"),
        (0, "2.5", "3"),  # half-up, not banker's rounding
        (0, "-2.5", "-3"),
        (2, "-0.001", "0.00"),  # no negative zero
        (2, "1E+3", "1000.00"),
        (2, Decimal("2.675"), Decimal("2.68")),
        (2, 2.675, 2.68),  # rounded on its decimal text, not its binary value
        (0, 1234.5, 1235.0),
        (2, 42, 42),
        (2, None, None),
    ],
)
def test_round_keeps_the_type_of_the_value(places, value, expected):
    result = _one({"from": "v", "transform": [{"round": places}]}, value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value", ["abc", "", "NaN", float("inf"), True, [1]])
def test_round_rejects_what_is_not_a_finite_number(value):
    with pytest.raises(MappingError) as caught:
        _mapper({"id": "id", "credit": {"from": "credit_limit", "transform": [{"round": 2}]}}
                ).map_record({"id": 1, "credit_limit": value})
    message = caught.value.message
    assert "'credit'" in message and "'credit_limit'" in message and repr(value) in message
    assert caught.value.entity == "clients"


def test_a_value_map_translates_after_the_transforms():
    spec = {"from": "v", "transform": ["upper"], "map": {"A": "active", "I": "inactive"}}
    assert _one(spec, "a") == "active"
    assert _one(spec, None) is None


def test_value_map_keys_compare_as_text():
    spec = {"from": "v", "map": {1: "one", "2": "two", 3.0: "three", "x": "ex"}}
    assert [_one(spec, v) for v in (1, "1", 2, 3, 3.0, "3")] == [
        "one", "one", "two", "three", "three", "three"]
    flags = {"from": "v", "map": {True: "yes", False: "no"}}
    assert [_one(flags, v) for v in (True, "true", False, "false")] == ["yes", "yes", "no", "no"]


def test_an_unmapped_value_is_an_error_by_default():
    with pytest.raises(MappingError) as caught:
        _mapper({"id": "id", "status": {"from": "state", "map": {"A": "active"}}}).map_record(
            {"id": 1, "state": "X"})
    assert "'status'" in caught.value.message and "'state'" in caught.value.message
    assert "'X'" in caught.value.message and "'A'" in caught.value.message


@pytest.mark.parametrize(("policy", "expected"), [("keep", "X"), ("null", None)])
def test_unmapped_values_can_be_kept_or_nulled(policy, expected):
    assert _one({"from": "v", "map": {"A": "active"}, "unmapped": policy}, "X") == expected


def test_without_fields_every_source_field_is_copied():
    record = {"id": 1, "name": "Anna", "secret": "x"}
    assert _mapper(None).map_record(record) == record


def test_identity_mapping_keeps_only_target_fields_when_known():
    mapper = _mapper(None, target_fields=["id", "name"])
    assert mapper.map_record({"id": 1, "name": "Anna", "internal": "x"}) == {"id": 1, "name": "Anna"}
    assert mapper.target_key({"id": 1}) == {"id": 1}


def test_target_key_uses_the_mapped_key_columns():
    mapper = _mapper({"client_id": "id", "region_code": {"from": "region", "transform": ["upper"]},
                      "name": "name"}, key=["id", "region"])
    assert mapper.key_columns == ("client_id", "region_code")
    assert mapper.target_key({"id": 7, "region": "sk", "name": "x"}) == {
        "client_id": 7, "region_code": "SK"}
    assert mapper.target_key({"id": 7, "region": "sk"}) == {"client_id": 7, "region_code": "SK"}


@pytest.mark.parametrize("key", [{"name": "x"}, {"id": None}])
def test_a_missing_or_null_key_is_a_mapping_error(key):
    with pytest.raises(MappingError, match="key field 'id' is missing or null") as caught:
        _mapper({"client_id": "id"}).target_key(key)
    assert caught.value.entity == "clients"


def test_a_key_that_maps_to_null_is_a_mapping_error():
    mapper = _mapper({"code": {"from": "id", "map": {"1": "one"}, "unmapped": "null"}})
    with pytest.raises(MappingError, match="maps to null in target field 'code'"):
        mapper.target_key({"id": 2})


def test_a_key_field_reaching_no_target_field_is_a_config_error():
    with pytest.raises(ConfigError, match="'id' is not mapped"):
        _mapper({"name": "name"})
    with pytest.raises(ConfigError, match="'id' has no same-named field"):
        _mapper(None, target_fields=["name"])

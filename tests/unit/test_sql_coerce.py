"""Portable type names and value conversion of the SQL connector (no database)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from connectors.sql.coerce import (
    PORTABLE_TYPES,
    CoercionError,
    decoder_for,
    encoder_for,
    portable_type,
)


@pytest.mark.parametrize(("type_", "name"), [
    (sa.Integer(), "integer"), (sa.BigInteger(), "integer"), (sa.SmallInteger(), "integer"),
    (sa.Numeric(12, 2), "decimal"), (postgresql.NUMERIC(), "decimal"),
    (sa.Float(), "float"), (postgresql.DOUBLE_PRECISION(), "float"), (postgresql.REAL(), "float"),
    (sa.Boolean(), "boolean"), (sa.Date(), "date"), (sa.DateTime(), "datetime"),
    (postgresql.TIMESTAMP(timezone=True), "datetime"), (sqlite.DATETIME(), "datetime"),
    (sa.Time(), "time"), (sa.LargeBinary(), "binary"), (postgresql.BYTEA(), "binary"),
    (sa.JSON(), "json"), (postgresql.JSONB(), "json"), (postgresql.UUID(), "uuid"),
    (sa.Text(), "string"), (sa.String(20), "string"), (sa.Enum("a", "b"), "string"),
    (postgresql.INTERVAL(), "other"), (sa.types.NullType(), "other"),
])
def test_portable_type_names(type_: Any, name: str) -> None:
    assert portable_type(type_) == name
    assert name in PORTABLE_TYPES


@pytest.mark.parametrize(("type_", "given", "expected"), [
    (sa.Integer(), "42", 42), (sa.Integer(), 4.0, 4), (sa.Integer(), True, 1),
    (sa.Numeric(), "12.30", Decimal("12.30")), (sa.Numeric(), 3, Decimal(3)),
    (sa.Numeric(), 0.1, Decimal("0.1")),
    (sa.Float(), "1.5", 1.5), (sa.Boolean(), "false", False), (sa.Boolean(), 1, True),
    (sa.Date(), "2024-02-29", date(2024, 2, 29)),
    (sa.Date(), "2024-02-29T00:00:00", date(2024, 2, 29)),
    (sa.Time(), "10:11:12.5", time(10, 11, 12, 500000)),
    (sa.LargeBinary(), "aGVsbG8=", b"hello"),
    (postgresql.UUID(), "12345678-1234-5678-1234-567812345678",
     uuid.UUID("12345678-1234-5678-1234-567812345678")),
    (sa.Text(), 12, "12"), (sa.Text(), True, "true"),
    (sa.JSON(), {"a": [1]}, {"a": [1]}),
])
def test_encoders_accept_json_shaped_values(type_: Any, given: Any, expected: Any) -> None:
    assert encoder_for(type_)(given) == expected


def test_datetimes_are_normalised_to_utc_for_naive_columns_and_kept_aware_otherwise() -> None:
    naive, aware = encoder_for(sa.DateTime()), encoder_for(sa.DateTime(timezone=True))
    plus2 = timezone(timedelta(hours=2))

    assert naive("2024-03-04T07:06:07+02:00") == datetime(2024, 3, 4, 5, 6, 7)
    assert naive("2024-03-04T05:06:07Z") == datetime(2024, 3, 4, 5, 6, 7)
    assert naive("2024-03-04 05:06:07") == datetime(2024, 3, 4, 5, 6, 7)
    assert aware("2024-03-04T05:06:07") == datetime(2024, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert aware("2024-03-04T07:06:07+02:00") == datetime(2024, 3, 4, 7, 6, 7, tzinfo=plus2)


@pytest.mark.parametrize(("type_", "given"), [
    (sa.Integer(), "4.5"), (sa.Integer(), 4.5), (sa.Integer(), [1]),
    (sa.Numeric(), "12,34"), (sa.Numeric(), "NaN"), (sa.Numeric(), True),
    (sa.Float(), "nan"), (sa.Boolean(), "maybe"), (sa.Boolean(), 2),
    (sa.DateTime(), "yesterday"), (sa.Date(), "2024-02-30"), (sa.Date(), "2024-01-01T10:00"),
    (sa.Time(), 10), (sa.LargeBinary(), "not base64!"), (postgresql.UUID(), "xyz"),
    (sa.Text(), object()),
    # Nested structures are never turned into text silently; NUL cannot be stored.
    (sa.Text(), {"a": 1}), (sa.Text(), [[["deep"]]]), (sa.String(), "a\x00b"),
])
def test_encoders_refuse_values_that_do_not_fit(type_: Any, given: Any) -> None:
    with pytest.raises((ValueError, TypeError, ArithmeticError)):
        encoder_for(type_)(given)


def test_coercion_error_names_column_and_value() -> None:
    err = CoercionError("balance", "12,34", "not a decimal number")
    assert str(err) == "column 'balance': cannot use '12,34': not a decimal number"


@pytest.mark.parametrize(("type_", "raw", "expected"), [
    (sa.Numeric(12, 2), 1.5, Decimal("1.50")), (sa.Numeric(), "7", Decimal("7")),
    (sa.Boolean(), 0, False), (sa.JSON(), '{"a": 1}', {"a": 1}),
    (sa.DateTime(), "2024-01-02 03:04:05.000000", datetime(2024, 1, 2, 3, 4, 5)),
    (sa.Date(), "2024-01-02", date(2024, 1, 2)), (sa.Float(), 2, 2.0),
    # what SQLite lets a program store anyway comes back unchanged
    (sa.Numeric(), "abc", "abc"), (sa.DateTime(), 1700000000, 1700000000),
    (sa.JSON(), "not json", "not json"), (sa.Integer(), "x", "x"), (sa.Boolean(), None, None),
])
def test_sqlite_decoders_are_lenient(type_: Any, raw: Any, expected: Any) -> None:
    assert decoder_for(type_)(raw) == expected

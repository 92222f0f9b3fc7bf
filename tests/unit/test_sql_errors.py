"""Classification of database errors and the connector's failure modes without a server."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa

from connectors.base import ConfigError, ConnectorUnavailable, SchemaError, TransientError
from connectors.sql import SqlConnector
from connectors.sql.errors import ErrorKind, classify, db_error_text, error_code, to_bus_error


def _wrap(orig: BaseException) -> sa.exc.DBAPIError:
    return sa.exc.DBAPIError.instance(
        "INSERT INTO t VALUES (%(a)s)", {"a": "secret-value"}, orig, psycopg.Error)


@pytest.mark.parametrize(("sqlstate", "kind"), [
    ("23502", ErrorKind.DATA), ("23503", ErrorKind.DATA), ("22P02", ErrorKind.DATA),
    ("42703", ErrorKind.DATA), ("40001", ErrorKind.TRANSIENT), ("40P01", ErrorKind.TRANSIENT),
    ("55P03", ErrorKind.TRANSIENT), ("57014", ErrorKind.TRANSIENT),
    ("08006", ErrorKind.UNAVAILABLE), ("57P01", ErrorKind.UNAVAILABLE),
    ("53300", ErrorKind.UNAVAILABLE),
])
def test_postgresql_errors_are_classified_by_sqlstate(sqlstate: str, kind: ErrorKind) -> None:
    exc = _wrap(psycopg.errors.lookup(sqlstate)("boom"))
    assert classify(exc) is kind
    assert error_code(exc) == sqlstate


def test_lost_postgresql_connection_without_sqlstate_is_unavailable() -> None:
    assert classify(_wrap(psycopg.OperationalError("server closed the connection"))) is (
        ErrorKind.UNAVAILABLE)
    assert classify(_wrap(psycopg.ProgrammingError("cannot adapt type 'dict'"))) is ErrorKind.DATA


def _sqlite_error(setup: list[str], failing: str) -> sqlite3.Error:
    conn = sqlite3.connect(":memory:")
    for sql in setup:
        conn.execute(sql)
    try:
        conn.execute(failing)
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("no error")


def test_sqlite_errors_are_classified_by_result_code(tmp_path: Path) -> None:
    not_null = _sqlite_error(["CREATE TABLE t (a TEXT NOT NULL)"], "INSERT INTO t VALUES (NULL)")
    assert classify(sa.exc.IntegrityError("x", None, not_null)) is ErrorKind.DATA
    assert error_code(sa.exc.IntegrityError("x", None, not_null)) == "SQLITE_CONSTRAINT_NOTNULL"

    path = str(tmp_path / "l.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (a)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("SELECT * FROM t")
    holder.close()
    other.close()
    assert classify(sa.exc.OperationalError("x", None, locked.value)) is ErrorKind.TRANSIENT


def test_error_text_is_the_databases_own_without_sql_parameters_or_password() -> None:
    orig = psycopg.errors.lookup("23502")(
        'null value in column "name" violates not-null constraint\n'
        "DETAIL:  Failing row contains (1, null).\nHINT: whatever\n")
    exc = _wrap(orig)

    text = db_error_text(exc, secret="hunter2")
    assert text == ('null value in column "name" violates not-null constraint '
                    "DETAIL:  Failing row contains (1, null).")
    assert "secret-value" not in text and "INSERT" not in text
    assert db_error_text(_wrap(psycopg.OperationalError("bad hunter2")), secret="hunter2") == (
        "bad ***")


def test_to_bus_error_picks_the_type_and_masks_the_password() -> None:
    url = sa.make_url("postgresql+psycopg://sync:hunter2@db.example:5432/erp")
    down = to_bus_error(_wrap(psycopg.OperationalError("refused")), connector="erp", url=url)
    busy = to_bus_error(_wrap(psycopg.errors.lookup("40P01")("deadlock detected")),
                        connector="erp", url=url)
    bad = to_bus_error(_wrap(psycopg.errors.lookup("42P01")("relation x does not exist")),
                       connector="erp", url=url)

    assert type(down) is ConnectorUnavailable and "hunter2" not in str(down)
    assert "db.example" in str(down)
    assert type(busy) is TransientError and busy.status == "40P01"
    assert type(bad) is SchemaError


def test_unreachable_postgresql_raises_connector_unavailable_without_the_password() -> None:
    connector = SqlConnector(
        "erp", "postgresql+psycopg://sync:hunter2@127.0.0.1:1/erp?connect_timeout=2")
    try:
        with pytest.raises(ConnectorUnavailable) as info:
            connector.describe()
    finally:
        connector.close()
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(connector)
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)


def test_unopenable_sqlite_file_raises_connector_unavailable(tmp_path: Path) -> None:
    connector = SqlConnector("lite", f"sqlite:///{tmp_path}/missing/dir/x.db")
    with pytest.raises(ConnectorUnavailable, match="unable to open"):
        connector.has_changes("t", None)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url"])
def test_unsupported_or_malformed_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        SqlConnector("x", url)

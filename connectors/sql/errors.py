"""Translate database driver errors into syncbus errors, at one edge.

Every SQLAlchemy / DBAPI exception the SQL connector meets is sorted into one of
three kinds, from the SQLSTATE (PostgreSQL) or the extended result code name
(SQLite) rather than from the message text:

``UNAVAILABLE``
    the database cannot be reached: connection refused or lost, server shutting
    down, too many connections, file cannot be opened → ``ConnectorUnavailable``.
``TRANSIENT``
    the statement lost a race: lock time-out, deadlock, serialization failure,
    "database is locked" → ``TransientError``.
``DATA``
    the statement itself is refused (NOT NULL, CHECK, FK, unique, bad value,
    unknown column, permission) → a per-row ``PERMANENT`` outcome on writes,
    ``SchemaError`` elsewhere.

Texts are the database's own first line(s): never the SQL statement nor its
parameters, and the password of the connection URL is masked wherever it appears.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from connectors.base import BusError, ConnectorUnavailable, SchemaError, TransientError

__all__ = [
    "ErrorKind",
    "classify",
    "db_error_text",
    "describe_value",
    "error_code",
    "to_bus_error",
    "translate_errors",
]

#: Longest database error text kept in an outcome or exception (characters).
MAX_ERROR_TEXT = 500

#: PostgreSQL SQLSTATEs (or classes, two characters) meaning "cannot reach the database".
_PG_UNAVAILABLE = ("08", "57P01", "57P02", "57P03", "53300", "3D000", "28000", "28P01")
#: PostgreSQL SQLSTATEs (or classes) that a retry may cure.
_PG_TRANSIENT = ("40001", "40P01", "55P03", "55006", "57014", "53", "58", "25006")
#: SQLite extended result code name prefixes meaning "cannot reach the database file".
_SQLITE_UNAVAILABLE = (
    "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_NOTADB", "SQLITE_CORRUPT", "SQLITE_FULL",
    "SQLITE_PERM", "SQLITE_READONLY", "SQLITE_PROTOCOL",
)
#: SQLite result code name prefixes that a retry may cure.
_SQLITE_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED")


class ErrorKind(enum.Enum):
    """What a database error means for the caller."""

    UNAVAILABLE = "unavailable"
    TRANSIENT = "transient"
    DATA = "data"


def _orig(exc: BaseException) -> BaseException:
    """The driver's own exception inside a SQLAlchemy wrapper (or ``exc`` itself)."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def error_code(exc: BaseException) -> str | None:
    """The SQLSTATE (PostgreSQL) or result code name (SQLite) of ``exc``, if it has one.

    Args:
        exc: A SQLAlchemy or DBAPI exception.

    Returns:
        ``"23502"``, ``"SQLITE_CONSTRAINT_NOTNULL"``, … or None.
    """
    orig = _orig(exc)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)
    return str(code) if code else None


def _starts(code: str, prefixes: tuple[str, ...]) -> bool:
    return any(code.startswith(p) for p in prefixes)


def classify(exc: BaseException) -> ErrorKind:
    """Sort a database error into unavailable / transient / data.

    Args:
        exc: A SQLAlchemy exception (usually ``DBAPIError``) or a DBAPI exception.

    Returns:
        The kind; anything not recognised as unavailable or transient is ``DATA``.
    """
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return ErrorKind.UNAVAILABLE
    if isinstance(exc, sa.exc.TimeoutError):  # connection pool exhausted
        return ErrorKind.TRANSIENT
    orig = _orig(exc)
    if isinstance(orig, sqlite3.Error):
        return _classify_sqlite(orig)
    code = error_code(exc)
    if code is None:
        # psycopg reports connection failures and lost connections without a SQLSTATE.
        if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
            return ErrorKind.UNAVAILABLE
        return ErrorKind.DATA
    if _starts(code, _PG_UNAVAILABLE):
        return ErrorKind.UNAVAILABLE
    if _starts(code, _PG_TRANSIENT):
        return ErrorKind.TRANSIENT
    return ErrorKind.DATA


def _classify_sqlite(orig: sqlite3.Error) -> ErrorKind:
    name = getattr(orig, "sqlite_errorname", None)
    if name:
        if _starts(name, _SQLITE_TRANSIENT):
            return ErrorKind.TRANSIENT
        if _starts(name, _SQLITE_UNAVAILABLE):
            return ErrorKind.UNAVAILABLE
        return ErrorKind.DATA
    text = str(orig).lower()
    if "locked" in text or "busy" in text:
        return ErrorKind.TRANSIENT
    if "closed database" in text or "unable to open" in text:
        return ErrorKind.UNAVAILABLE
    return ErrorKind.DATA


def db_error_text(exc: BaseException, *, secret: str | None = None) -> str:
    """The database's own error text: first line(s), without SQL or parameters.

    Args:
        exc: A SQLAlchemy or DBAPI exception.
        secret: A string to mask wherever it appears (the connection password).

    Returns:
        For PostgreSQL the primary message and its DETAIL line, for SQLite the
        message; at most ``MAX_ERROR_TEXT`` characters.
    """
    orig = _orig(exc)
    text = str(orig)
    if orig is exc and isinstance(exc, sa.exc.StatementError):
        text = text.split("\n[SQL:", 1)[0]  # SQLAlchemy appends the statement
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()][:2]
    text = " ".join(lines) or type(orig).__name__
    if secret:
        text = text.replace(secret, "***")
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 1] + "…"
    return text


def to_bus_error(
    exc: BaseException,
    *,
    connector: str,
    url: URL,
    entity: str | None = None,
) -> BusError:
    """Build the syncbus error for a database error (the caller raises it ``from exc``).

    Args:
        exc: The SQLAlchemy / DBAPI exception.
        connector: The connector's name, put first in the message.
        url: The connection URL (its password is masked in every text).
        entity: The table concerned, if any.

    Returns:
        ``ConnectorUnavailable``, ``TransientError`` or ``SchemaError``.
    """
    secret = url.password if isinstance(url.password, str) and url.password else None
    text = db_error_text(exc, secret=secret)
    code = error_code(exc)
    kind = classify(exc)
    where = url.render_as_string(hide_password=True)
    if kind is ErrorKind.UNAVAILABLE:
        return ConnectorUnavailable(
            f"{connector}: database {where} unavailable: {text}", entity=entity, status=code
        )
    if kind is ErrorKind.TRANSIENT:
        return TransientError(f"{connector}: {text}", entity=entity, status=code)
    return SchemaError(f"{connector}: {text}", entity=entity, status=code)


@contextmanager
def translate_errors(
    *, connector: str, url: URL, entity: str | None = None
) -> Iterator[None]:
    """Re-raise SQLAlchemy errors met inside the block as syncbus errors.

    Args:
        connector: The connector's name.
        url: The connection URL (password masked in messages).
        entity: The table concerned, if any.

    Raises:
        ConnectorUnavailable: the database cannot be reached.
        TransientError: lock, deadlock, serialization failure, busy database.
        SchemaError: the database refused the statement (unknown table or column, …).
    """
    try:
        yield
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
        raise to_bus_error(exc, connector=connector, url=url, entity=entity) from exc
    except sa.exc.NoSuchTableError as exc:
        raise SchemaError(f"{connector}: no table {exc}", entity=entity) from exc


def describe_value(value: Any, limit: int = 60) -> str:
    """A short ``repr`` of a value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"

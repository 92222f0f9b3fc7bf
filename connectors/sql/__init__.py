"""SQL databases (SQLite and PostgreSQL) as syncbus sources and targets.

Modules: ``connector`` (the public ``SqlConnector``), ``tracking`` with its two
dialects ``sqlite`` and ``postgres`` (change tracking setup and the change feed),
``writer`` (batched upserts and deletes), ``schema`` (reflection), ``ddl`` (tables
created from other systems' metadata), ``coerce`` (column types and value conversion)
and ``errors`` (driver errors → syncbus errors).
"""

from __future__ import annotations

from connectors.sql.connector import SqlConnector

__all__ = ["SqlConnector"]

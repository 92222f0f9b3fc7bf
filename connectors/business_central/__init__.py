"""Dynamics 365 Business Central: the connector and (in ``emulator``) a local emulator.

Modules: ``connector`` (the public ``BusinessCentralConnector``), ``client`` (HTTP,
tokens, retries, paging, ``$batch``), ``metadata`` (``$metadata`` → entities),
``detection`` (row-version and modification-time change feeds, deletions),
``index`` (the key index for deletions), ``fetch`` (records by key), ``writer``
(upserts and deletes), ``webhooks`` (subscriptions and the receiver) and ``emulator``
(the sandbox).
"""

from __future__ import annotations

from connectors.business_central.connector import BusinessCentralConnector
from connectors.business_central.writer import ConflictHook, fail_on_conflict, retry_once

__all__ = ["BusinessCentralConnector", "ConflictHook", "fail_on_conflict", "retry_once"]

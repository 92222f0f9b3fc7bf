"""Microsoft Dataverse (Dynamics 365): the connector and a local emulator.

Modules: ``connector`` (the public ``DataverseConnector``), ``client`` (HTTP, tokens,
throttle, retries), ``changes`` (change tracking and resync), ``keyset`` (ids for
delete detection), ``fetch`` (rows by key), ``writer`` (``$batch`` writes and
outcomes), ``convert`` (values and ``@odata.bind``), ``metadata`` (``EntityDefinitions``
→ ``EntityInfo``), ``multipart`` (the ``$batch`` wire format), ``auth`` (operator
sign-in), and the ``emulator`` package.
"""

from __future__ import annotations

from connectors.dataverse.auth import login
from connectors.dataverse.connector import DataverseConnector

__all__ = ["DataverseConnector", "login"]

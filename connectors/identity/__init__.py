"""Microsoft Entra ID: a fake identity provider for the emulators, and the client side.

* :class:`FakeEntra` (``connectors.identity.fake``) serves the v2.0 endpoints a real
  MSAL client uses (discovery, token, device code) and verifies the bearer tokens the
  Dataverse and Business Central emulators receive.
* :class:`TokenProvider` and :func:`device_code_login` (``connectors.identity.provider``)
  obtain tokens with MSAL for the connectors; ``connectors._http`` re-exports them.
"""

from __future__ import annotations

from connectors.identity.credentials import ASSERTION_TYPE
from connectors.identity.fake import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
    DEFAULT_USER,
    DEVICE_CODE_GRANT,
    FakeEntra,
)
from connectors.identity.provider import OAuthSettings, TokenProvider, device_code_login
from connectors.identity.tokens import OAuthError, Unauthorized

__all__ = [
    "ASSERTION_TYPE",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_TENANT",
    "DEFAULT_USER",
    "DEVICE_CODE_GRANT",
    "FakeEntra",
    "OAuthError",
    "OAuthSettings",
    "TokenProvider",
    "Unauthorized",
    "device_code_login",
]

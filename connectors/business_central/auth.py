"""Operator sign-in for a Business Central connection (``syncbus login CONNECTION``).

A connection without ``client_secret`` and ``certificate_path`` uses the delegated
token of an operator who signed in once with the device-code flow (as Resco's
integrations do); the tokens (with the refresh token) stay in
``<state_dir>/<connection>.tokens.json``, readable by the owner only, and the
connector renews them silently.

Features
    * :func:`login` shows the sign-in URL and code through ``echo`` and blocks until
      the operator approved (or declined, or the code expired).
    * :func:`token_cache_path` is where the connector and the login share the cache;
      :func:`uses_sign_in` tells whether a connection needs one.

Configuration
    The connection's ``tenant_id``, ``client_id`` (a public client app registration
    with "Allow public client flows"), ``authority_host``, ``ca_bundle``, ``state_dir``.

Limits
    * The app registration needs the delegated ``Financials.ReadWrite.All`` (or
      ``user_impersonation``) permission of Dynamics 365 Business Central, and the
      operator a Business Central user with permissions on the company.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from connectors.identity.provider import device_code_login
from schemas.config import BusinessCentralConnection

__all__ = ["BC_SCOPE", "login", "token_cache_path", "uses_sign_in"]

#: The scope of the Business Central API (client credentials and delegated alike).
BC_SCOPE = "https://api.businesscentral.dynamics.com/.default"


def token_cache_path(name: str, state_dir: str | Path) -> Path:
    """The token cache file of connection ``name``."""
    return Path(state_dir) / f"{name}.tokens.json"


def uses_sign_in(config: BusinessCentralConnection) -> bool:
    """Whether the connection authenticates as a signed-in operator (no app credential)."""
    secret = config.client_secret.get_secret_value() if config.client_secret else ""
    return not secret and not config.certificate_path


def login(name: str, config: BusinessCentralConnection, echo: Callable[[str], None]) -> Path:
    """Sign an operator in with the device-code flow and keep the tokens.

    Args:
        name: The connection's name (names the cache file).
        config: The connection's settings.
        echo: Shows the instructions ("open <url> and enter the code …").

    Returns:
        The token cache file written.

    Raises:
        ConnectorUnavailable: Entra ID cannot be reached.
        PermanentError: the sign-in was declined or expired, or the app is refused.
        ConfigError: the CA bundle cannot be read.
    """
    path = token_cache_path(name, config.state_dir)
    device_code_login(config, BC_SCOPE, path, echo)
    return path

"""Operator sign-in for a Dataverse connection (``syncbus login CONNECTION``).

A connection without ``client_secret`` and ``certificate_path`` uses the delegated
token of an operator who signed in once with the device-code flow; the tokens (with
the refresh token) stay in ``<state_dir>/<connection>.tokens.json``, readable by the
owner only, and the connector renews them silently.

Features
    * :func:`login` shows the sign-in URL and code through ``echo`` and blocks until
      the operator approved (or declined, or the code expired).
    * :func:`token_cache_path` is where the connector and the login share the cache.

Configuration
    The connection's ``tenant_id``, ``client_id`` (a public client app registration
    with "Allow public client flows"), ``authority_host``, ``ca_bundle``, ``state_dir``.

Limits
    * The app registration needs the delegated ``user_impersonation`` permission of
      Dataverse (Dynamics CRM) for the device-code flow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from connectors._http import device_code_login
from schemas.config import DataverseConnection

__all__ = ["login", "scope_of", "token_cache_path"]


def token_cache_path(name: str, state_dir: str | Path) -> Path:
    """The token cache file of connection ``name``."""
    return Path(state_dir) / f"{name}.tokens.json"


def scope_of(url: str) -> str:
    """The token scope of an organisation: ``https://contoso.crm4.dynamics.com/.default``."""
    return f"{url.rstrip('/')}/.default"


def login(name: str, config: DataverseConnection, echo: Callable[[str], None]) -> Path:
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
    device_code_login(config, scope_of(config.url), path, echo)
    return path

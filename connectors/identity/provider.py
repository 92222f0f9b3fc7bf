"""Access tokens for the connectors, from Entra ID (or the fake) through MSAL.

Credentials, in order of preference:

* a client secret (``client_secret``) → ``ConfidentialClientApplication``;
* a certificate (``certificate_path``: PEM with the private key and, ideally, the
  certificate; ``certificate_thumbprint`` is needed only when the PEM holds no
  certificate) → a signed ``client_assertion`` (SHA-256 thumbprint, PS256);
* neither → the delegated token of an operator who signed in once with
  :func:`device_code_login`, kept in the token cache file and renewed with its
  refresh token.

MSAL configuration: ``authority=<authority_host>/<tenant_id>``, an ``http_client``
(a ``requests`` session passing ``verify=<ca_bundle>`` and ``timeout`` with every
request, so ``REQUESTS_CA_BUNDLE`` in the environment cannot override the CA), and for hosts
MSAL does not know (the emulators) ``instance_discovery=False`` — otherwise MSAL would
validate the host against the real ``login.microsoftonline.com``.

Secrets never appear in errors or logs; the token cache file is written with mode 0600.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import msal
import requests
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from pydantic import SecretStr

from connectors.base import (
    BusError,
    ConfigError,
    ConnectorUnavailable,
    PermanentError,
    TransientError,
)

__all__ = ["OAuthSettings", "TokenProvider", "device_code_login"]

log = structlog.get_logger(__name__)

#: Renew a token this many seconds before it expires (or a fifth of its life if shorter).
RENEW_MARGIN = 300.0
#: OAuth errors a later attempt may cure.
_TRANSIENT_OAUTH_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


class OAuthSettings(Protocol):
    """What :class:`TokenProvider` reads from a connection (``_OAuthConnection`` has it)."""

    @property
    def tenant_id(self) -> str: ...
    @property
    def client_id(self) -> str: ...
    @property
    def client_secret(self) -> SecretStr | None: ...
    @property
    def certificate_path(self) -> str | None: ...
    @property
    def certificate_thumbprint(self) -> str | None: ...
    @property
    def authority_host(self) -> str: ...
    @property
    def ca_bundle(self) -> str | None: ...
    @property
    def timeout(self) -> float: ...


class TokenProvider:
    """Bearer tokens for one resource scope, renewed before they expire. Thread-safe.

    Args:
        config: The connection settings (tenant, client, credential, authority, CA).
        scope: The resource scope, e.g. ``https://org.crm.dynamics.com/.default``.
        cache_path: File to persist MSAL's token cache in (mode 0600); required for the
            delegated (device-code) mode, optional otherwise.
        connection: The connection's name, for the ``syncbus login`` hint in errors.
    """

    def __init__(self, config: OAuthSettings, scope: str, *,
                 cache_path: Path | None = None, connection: str | None = None) -> None:
        self.config = config
        self.scope = scope
        self.connection = connection
        self._cache_path = cache_path
        self._cache = _load_cache(cache_path)
        self._lock = threading.Lock()
        self._app: msal.ClientApplication | None = None
        self._token: str | None = None
        self._renew_at = 0.0

    @property
    def mode(self) -> str:
        """``secret``, ``certificate`` or ``user`` (an operator's device-code sign-in)."""
        if self.config.client_secret is not None and self.config.client_secret.get_secret_value():
            return "secret"
        return "certificate" if self.config.certificate_path else "user"

    def token(self) -> str:
        """A valid access token, from memory, MSAL's cache, or Entra ID.

        Returns:
            The raw access token (without ``Bearer``).

        Raises:
            ConnectorUnavailable: Entra ID cannot be reached.
            TransientError: Entra ID answered 5xx / 429 or ``temporarily_unavailable``.
            PermanentError: the credentials, tenant or scope are refused, or no operator
                has signed in (delegated mode).
            ConfigError: the CA bundle or certificate file cannot be read.
        """
        with self._lock:
            if self._token is not None and time.monotonic() < self._renew_at:
                return self._token
            with _msal_errors(self.config):
                result = self._acquire()
            if "access_token" not in result:
                raise _refused(self.config, result, "the token request")
            _save_cache(self._cache, self._cache_path)
            lifetime = float(result.get("expires_in", 0))
            self._token = str(result["access_token"])
            self._renew_at = time.monotonic() + lifetime - min(RENEW_MARGIN, lifetime / 5)
            return self._token

    def invalidate(self, token: str | None = None) -> None:
        """Forget the current token (the service answered 401): the next call gets a new one.

        Args:
            token: The token the service refused; when another thread already replaced
                it, nothing is forgotten (so N parallel 401s cause one renewal).
        """
        with self._lock:
            if token is not None and token != self._token:
                return
            self._token, self._renew_at = None, 0.0
            for entry in list(self._cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN,
                                                 query={"client_id": self.config.client_id})):
                self._cache.remove_at(entry)

    def close(self) -> None:
        """Close MSAL's HTTP connections (a later :meth:`token` reconnects)."""
        with self._lock:
            app, self._app = self._app, None
        if app is not None:
            app.http_client.close()

    def _acquire(self) -> dict[str, Any]:
        if self._app is None:
            self._app = _build_app(self.config, self._cache, public=self.mode == "user")
        if isinstance(self._app, msal.ConfidentialClientApplication):
            return dict(self._app.acquire_token_for_client(scopes=[self.scope]))
        accounts = self._app.get_accounts()
        login = f"syncbus login -c CONFIG {self.connection or 'CONNECTION'}"
        if not accounts:
            raise PermanentError(
                f"no credential for client {self.config.client_id}: configure client_secret "
                f"or certificate_path, or sign in once with the device-code login ({login})")
        result = self._app.acquire_token_silent_with_error([self.scope], account=accounts[0])
        if result is None:
            raise PermanentError("the operator's sign-in has expired; sign in again with the "
                                 f"device-code login ({login})")
        return dict(result)


def device_code_login(config: OAuthSettings, scope: str, cache_path: Path,
                      echo: Callable[[str], None]) -> None:
    """Sign an operator in with the device-code flow and keep the tokens in ``cache_path``.

    Blocks until the operator approved, declined, or the code expired.

    Args:
        config: The connection settings (tenant, client id, authority, CA).
        scope: The resource scope, e.g. ``https://org.crm.dynamics.com/.default``.
        cache_path: Token cache file, shared with :class:`TokenProvider`.
        echo: Shows the sign-in instructions (URL and code) to the operator.

    Raises:
        ConnectorUnavailable: Entra ID cannot be reached.
        PermanentError: the flow could not start, was declined or expired.
        ConfigError: the CA bundle cannot be read.
    """
    cache = _load_cache(cache_path)
    with _msal_errors(config):
        app = _build_app(config, cache, public=True)
        flow = app.initiate_device_flow(scopes=[scope])
        if "user_code" not in flow:
            raise _refused(config, flow, "the device-code request")
        echo(str(flow["message"]))
        result = app.acquire_token_by_device_flow(flow)
    if "access_token" not in result:
        raise _refused(config, result, "the device-code sign-in")
    _save_cache(cache, cache_path)


def _build_app(config: OAuthSettings, cache: msal.TokenCache, *,
               public: bool) -> msal.ClientApplication:
    """Create the MSAL application; this already fetches the OpenID configuration."""
    host = urllib.parse.urlsplit(config.authority_host).hostname or ""
    options: dict[str, Any] = {
        "authority": f"{config.authority_host.rstrip('/')}/{config.tenant_id}",
        "token_cache": cache,
        "http_client": _HttpClient(_ca_bundle(config.ca_bundle), config.timeout),
    }
    if host not in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS:
        options["instance_discovery"] = False
    if public:
        return msal.PublicClientApplication(config.client_id, **options)
    return msal.ConfidentialClientApplication(
        config.client_id, client_credential=_credential(config), **options)


class _HttpClient:
    """The ``http_client`` MSAL is given: a ``requests`` session whose CA bundle wins.

    MSAL's own ``verify=`` sets ``Session.verify``, which ``requests`` lets the
    ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` environment variables override; passing
    ``verify`` with every request keeps the configured ``ca_bundle`` in force.
    """

    def __init__(self, verify: str | bool, timeout: float) -> None:
        self._verify, self._timeout = verify, timeout
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(max_retries=1)  # as MSAL does by default
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._session.get(url, **self._options(kwargs))

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._session.post(url, **self._options(kwargs))

    def close(self) -> None:
        self._session.close()

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.setdefault("timeout", self._timeout)
        kwargs.setdefault("verify", self._verify)
        return kwargs


def _credential(config: OAuthSettings) -> str | dict[str, str]:
    if config.client_secret is not None and config.client_secret.get_secret_value():
        return config.client_secret.get_secret_value()
    path = config.certificate_path or ""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate_path {path}: {exc.strerror}") from exc
    blocks = {m.group(1): m.group(0) for m in _PEM_BLOCK.finditer(text)}
    key = next((v for k, v in blocks.items() if k.endswith("PRIVATE KEY")), None)
    if key is None:
        raise ConfigError(f"certificate_path {path} holds no private key (PEM)")
    cert = blocks.get("CERTIFICATE")
    if cert is None:
        if not config.certificate_thumbprint:
            raise ConfigError(f"certificate_path {path} holds no certificate: "
                              "set certificate_thumbprint")
        return {"private_key": key, "thumbprint": config.certificate_thumbprint}
    wanted = (config.certificate_thumbprint or "").replace(":", "").lower()
    actual = x509.load_pem_x509_certificate(cert.encode()).fingerprint(hashes.SHA1()).hex()
    if wanted and wanted != actual:
        raise ConfigError(f"certificate_thumbprint does not match the certificate in {path} "
                          f"(its SHA-1 thumbprint is {actual.upper()})")
    return {"private_key": key, "public_certificate": cert}


def _ca_bundle(path: str | None) -> str | bool:
    if path is None:
        return True
    if not Path(path).is_file():
        raise ConfigError(f"ca_bundle {path} is not a readable file")
    return path


@contextlib.contextmanager
def _msal_errors(config: OAuthSettings) -> Iterator[None]:
    """Translate what MSAL and ``requests`` raise into the bus error tree."""
    where = f"Entra ID at {config.authority_host}"
    try:
        yield
    except BusError:
        raise
    except requests.Timeout as exc:
        raise ConnectorUnavailable(f"{where} timed out after {config.timeout:g} s") from exc
    except requests.RequestException as exc:
        raise ConnectorUnavailable(f"cannot reach {where}: {_scrub(str(exc), config)}") from exc
    except msal.exceptions.MsalServiceError as exc:
        raise TransientError(f"{where} failed: {_scrub(str(exc), config)}") from exc
    except ValueError as exc:
        raise PermanentError(f"{where} refused the authority: {_scrub(str(exc), config)}",
                             status="invalid_authority") from exc


def _refused(config: OAuthSettings, result: dict[str, Any], action: str) -> BusError:
    error = str(result.get("error") or "unknown_error")
    text = str(result.get("error_description") or "").replace("\r\n", " ")
    text = text.split(" Trace ID:")[0].strip()
    message = _scrub(f"Entra ID refused {action} of client {config.client_id} in tenant "
                     f"{config.tenant_id}: {error}: {text}", config)
    if error in _TRANSIENT_OAUTH_ERRORS:
        return TransientError(message, status=error)
    return PermanentError(message, status=error)


def _scrub(text: str, config: OAuthSettings) -> str:
    secret = config.client_secret.get_secret_value() if config.client_secret else ""
    return text.replace(secret, "***") if secret else text


def _load_cache(path: Path | None) -> msal.SerializableTokenCache:
    cache = msal.SerializableTokenCache()
    if path is None or not path.exists():
        return cache
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # a token cache holds refresh tokens: owner only
    try:
        cache.deserialize(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("token_cache_unreadable", path=str(path), error=type(exc).__name__)
    return cache


def _save_cache(cache: msal.SerializableTokenCache, path: Path | None) -> None:
    if path is None or not cache.has_state_changed:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(cache.serialize())
    os.replace(tmp, path)
    cache.has_state_changed = False

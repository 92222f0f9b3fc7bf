"""Pending device-code sign-ins and issued refresh tokens of the fake Entra ID.

A device-code grant waits until a test (or an operator through ``POST /devicelogin``)
approves its user code; polling before that answers ``authorization_pending``,
after ``expires_in`` ``expired_token``. Each grant is redeemed once.
"""

from __future__ import annotations

import secrets
import string
import threading
from dataclasses import dataclass

from connectors.identity.tokens import OAuthError, new_opaque

__all__ = ["DeviceGrant", "DeviceGrants", "UserGrant"]

_USER_CODE_ALPHABET = string.ascii_uppercase + string.digits
_USER_CODE_LENGTH = 9


@dataclass(slots=True)
class DeviceGrant:
    """One device-code sign-in in progress."""

    tenant: str
    client_id: str
    scope: str
    device_code: str
    user_code: str
    expires_at: float
    user: str | None = None
    declined: bool = False


@dataclass(frozen=True, slots=True)
class UserGrant:
    """What a redeemed device code or refresh token stands for."""

    tenant: str
    client_id: str
    user: str
    scope: str


class DeviceGrants:
    """Thread-safe store of device codes and refresh tokens (tests approve from another thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_device: dict[str, DeviceGrant] = {}
        self._refresh: dict[str, UserGrant] = {}

    def start(self, tenant: str, client_id: str, scope: str, expires_at: float) -> DeviceGrant:
        """Create a pending grant with a fresh device code and user code.

        Args:
            tenant: Tenant of the request.
            client_id: The public client asking.
            scope: The requested scope, kept for the tokens.
            expires_at: Clock time after which polling answers ``expired_token``.

        Returns:
            The new grant.
        """
        user_code = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(_USER_CODE_LENGTH))
        grant = DeviceGrant(tenant, client_id, scope, new_opaque(48), user_code, expires_at)
        with self._lock:
            self._by_device[grant.device_code] = grant
        return grant

    def pending(self) -> list[str]:
        """User codes of the grants neither approved nor declined yet."""
        with self._lock:
            return [g.user_code for g in self._by_device.values()
                    if g.user is None and not g.declined]

    def decide(self, user_code: str, *, user: str | None, decline: bool = False) -> None:
        """Approve (as ``user``) or decline the grant with ``user_code``.

        Args:
            user_code: The code shown to the operator (case-insensitive, dashes ignored).
            user: The signing-in user principal name (for approval).
            decline: True to decline instead.

        Raises:
            KeyError: no pending grant has this user code.
        """
        wanted = user_code.replace("-", "").strip().upper()
        with self._lock:
            for grant in self._by_device.values():
                if grant.user_code == wanted and grant.user is None and not grant.declined:
                    grant.user, grant.declined = (None, True) if decline else (user, False)
                    return
        raise KeyError(f"no pending device code {user_code!r}")

    def redeem(self, tenant: str, client_id: str, device_code: str, now: float) -> UserGrant:
        """Poll a device code: the approved grant, once, or the OAuth error to answer.

        Args:
            tenant: Tenant of the token request.
            client_id: The ``client_id`` form field.
            device_code: The ``device_code`` form field.
            now: The fake's clock.

        Returns:
            The user grant to issue tokens for.

        Raises:
            OAuthError: ``bad_verification_code``, ``expired_token``,
                ``authorization_declined`` or ``authorization_pending``.
        """
        with self._lock:
            grant = self._by_device.get(device_code)
            if grant is None or (grant.tenant, grant.client_id) != (tenant, client_id):
                raise OAuthError("bad_verification_code", 70000,
                                 "The provided value for the input parameter 'device_code' "
                                 "is not valid.")
            if now >= grant.expires_at:
                del self._by_device[device_code]
                raise OAuthError("expired_token", 70019, "Verification code expired.")
            if grant.declined:
                del self._by_device[device_code]
                raise OAuthError("authorization_declined", 70000,
                                 "The end user denied the authorization request.")
            if grant.user is None:
                raise OAuthError("authorization_pending", 70016, "OAuth 2.0 device flow error. "
                                 "Authorization is pending. Continue polling.")
            del self._by_device[device_code]
            return UserGrant(grant.tenant, grant.client_id, grant.user, grant.scope)

    def new_refresh_token(self, grant: UserGrant) -> str:
        """Issue an opaque refresh token standing for ``grant``.

        Args:
            grant: The user, client and tenant the token belongs to.

        Returns:
            The refresh token.
        """
        token = new_opaque(48)
        with self._lock:
            self._refresh[token] = grant
        return token

    def use_refresh_token(self, tenant: str, client_id: str, token: str) -> UserGrant:
        """Redeem (and revoke: tokens rotate) a refresh token.

        Args:
            tenant: Tenant of the token request.
            client_id: The ``client_id`` form field.
            token: The ``refresh_token`` form field.

        Returns:
            The grant it stood for.

        Raises:
            OAuthError: ``invalid_grant`` for an unknown, used or foreign token.
        """
        with self._lock:
            grant = self._refresh.pop(token, None)
        if grant is None or (grant.tenant, grant.client_id) != (tenant, client_id):
            raise OAuthError("invalid_grant", 70000, "The provided value for the input "
                             "parameter 'refresh_token' is not valid.")
        return grant

    def revoke_refresh_tokens(self) -> None:
        """Forget every refresh token (a forced sign-out)."""
        with self._lock:
            self._refresh.clear()

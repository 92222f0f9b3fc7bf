"""Event integrity: the bus signs what it publishes, consumers verify before trusting it.

Anyone allowed to publish on the broker could otherwise forge a change event: a fake
deletion, or a version of 2**63-1 that makes the ordering guard skip every later real
change of a record. So every change event syncbus publishes (detectors, Sync All,
conflict resolution) carries an HMAC-SHA256 of its exact body bytes in the AMQP header
``x-syncbus-signature`` (``v1=<hex>``), and a link consumer dead-letters an event
whose signature is missing or wrong as ``Unverified`` before the ordering guard, the
filters or the target see it.

Two control headers an operator's command sets on what it publishes, the winner of a
resolved conflict (``x-syncbus-winner``) and the master side of Sync All
(``x-syncbus-master``), are signed with the body: they decide conflicts, so they must
not be forgeable either.

The signature travels as a header, not as a CloudEvents attribute inside the body, so
it covers every byte of the event (record values included) without a canonical JSON
form, and costs one hash of the bytes on each side. Retry and dead-letter copies keep
the header, so a replayed transaction is verified again. Subscribers may ignore it.

The key is ``broker.signing_key`` from the config, or else a key generated once and
kept in the state store (:meth:`bus.state.store.StateStore.keep_secret`): every worker and
CLI command sharing the store signs and verifies alike.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any

from bus.state.store import StateStore
from schemas.config import SyncConfig

__all__ = ["BOUND_HEADERS", "SIGNATURE_HEADER", "STATE_KEY_NAME", "Signer", "signer_for"]

#: The AMQP header carrying an event's signature.
SIGNATURE_HEADER = "x-syncbus-signature"
#: Name of the generated key in the state store.
STATE_KEY_NAME = "event-signing-key"
#: Control headers covered by the signature together with the body.
BOUND_HEADERS = ("x-syncbus-winner", "x-syncbus-master")
_PREFIX = "v1="


class Signer:
    """Signs and verifies event bodies with one key.

    Args:
        key: The secret (at least 32 bytes of it in practice).
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("an empty signing key")
        self._key = key

    def __repr__(self) -> str:
        return "<Signer key=***>"

    def sign(self, body: bytes, headers: Mapping[str, Any] | None = None) -> str:
        """The header value that vouches for ``body`` and the :data:`BOUND_HEADERS` in
        ``headers``."""
        mac = hmac.new(self._key, body, hashlib.sha256)
        for name in BOUND_HEADERS:
            value = (headers or {}).get(name)
            if value is not None:
                mac.update(f"\x00{name}={value}".encode("utf-8", "backslashreplace"))
        return _PREFIX + mac.hexdigest()

    def headers(self, body: bytes, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``extra`` plus the signature header of ``body`` (and of ``extra``'s bound headers)."""
        return {**(extra or {}), SIGNATURE_HEADER: self.sign(body, extra)}

    def rebind(self, body: bytes, before: Mapping[str, Any],
               after: dict[str, Any]) -> dict[str, Any]:
        """``after`` (new headers of a copy of ``body``) signed anew, if ``before`` (the
        headers it carried) held a valid signature; as it is otherwise, so that an
        operator's command never vouches for an event the bus did not sign."""
        if self.problem(body, before) is not None:
            return after
        return {**after, SIGNATURE_HEADER: self.sign(body, after)}

    def problem(self, body: bytes, headers: Mapping[str, Any]) -> str | None:
        """Why the message's signature does not vouch for it; None if it does."""
        value = headers.get(SIGNATURE_HEADER)
        if value is None:
            return f"not signed by this bus (no {SIGNATURE_HEADER} header)"
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str) or not value.startswith(_PREFIX) or len(value) != 67:
            return f"malformed {SIGNATURE_HEADER} header (expected v1=<64 hex digits>)"
        if not hmac.compare_digest(self.sign(body, headers), value):
            return ("signature does not match: the event was changed, or signed with another "
                    "key (broker.signing_key)")
        return None


def signer_for(config: SyncConfig, state: StateStore) -> Signer:
    """The signer of ``config``: its ``broker.signing_key``, else the state store's key.

    Raises:
        ConnectorUnavailable: the key must come from the state store and it is down.
    """
    configured = config.broker.signing_key
    if configured is not None:
        return Signer(configured.get_secret_value().encode())
    return Signer(state.keep_secret("bus", STATE_KEY_NAME, _new_key).encode())


def _new_key() -> str:
    return secrets.token_urlsafe(32)

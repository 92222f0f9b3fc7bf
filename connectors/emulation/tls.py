"""Local TLS for the emulators: a CA and a server certificate it signs.

:func:`make_tls` writes ``ca.pem``, ``ca-key.pem``, ``cert.pem`` and ``key.pem`` (keys
0600) and reuses them while they are valid; clients trust ``ca.pem`` (the connection's
``ca_bundle``).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA_LIFETIME", "CERT_LIFETIME", "TLS_MIN_REMAINING", "TlsFiles", "make_tls"]

#: A reused certificate must stay valid at least this long.
TLS_MIN_REMAINING = timedelta(days=7)
#: Lifetime of a generated CA.
CA_LIFETIME = timedelta(days=3650)
#: Lifetime of a generated server certificate.
CERT_LIFETIME = timedelta(days=397)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of a local CA and a server certificate/key it signed."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_tls(cert_dir: Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1")) -> TlsFiles:
    """Create (or reuse) a local CA and a server certificate for ``hostnames``.

    Existing files are reused when the certificate is signed by the CA, matches its
    key, covers every host name and stays valid for :data:`TLS_MIN_REMAINING`. A
    file lock makes concurrent callers (parallel test workers) safe.

    Args:
        cert_dir: Directory of ``ca.pem``, ``ca-key.pem``, ``cert.pem``, ``key.pem``.
        hostnames: DNS names and IP addresses put in the subjectAltName.

    Returns:
        The paths; clients trust ``ca_pem``, the server uses ``cert_pem``/``key_pem``.
    """
    cert_dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(cert_dir / "ca.pem", cert_dir / "cert.pem", cert_dir / "key.pem")
    ca_key_path = cert_dir / "ca-key.pem"
    with _locked(cert_dir / ".tls.lock"):
        ca = _load_ca(files.ca_pem, ca_key_path)
        if ca is None:
            ca = _new_ca()
            _write(ca_key_path, _key_pem(ca[1]), private=True)
            _write(files.ca_pem, ca[0].public_bytes(serialization.Encoding.PEM))
        elif _server_cert_ok(files, ca[0], hostnames):
            return files
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _new_server_cert(ca, key, hostnames)
        _write(files.key_pem, _key_pem(key), private=True)
        _write(files.cert_pem, cert.public_bytes(serialization.Encoding.PEM))
    return files


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "syncbus emulators"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


_Ca = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _new_ca() -> _Ca:
    key, now = ec.generate_private_key(ec.SECP256R1()), datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(_name("syncbus local CA"))
        .issuer_name(_name("syncbus local CA")).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_server_cert(ca: _Ca, key: ec.EllipticCurvePrivateKey,
                     hostnames: Sequence[str]) -> x509.Certificate:
    ca_cert, ca_key = ca
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder().subject_name(_name(hostnames[0] if hostnames else "localhost"))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_sans(hostnames)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _sans(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _load_ca(ca_path: Path, key_path: Path) -> _Ca | None:
    try:
        cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    fresh = cert.not_valid_after_utc - datetime.now(UTC) > TLS_MIN_REMAINING
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not fresh:
        return None
    return (cert, key) if cert.public_key() == key.public_key() else None


def _server_cert_ok(files: TlsFiles, ca: x509.Certificate, hostnames: Sequence[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(files.cert_pem.read_bytes())
        key = serialization.load_pem_private_key(files.key_pem.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    fresh = cert.not_valid_after_utc - datetime.now(UTC) > TLS_MIN_REMAINING
    return fresh and key.public_key() == cert.public_key() and set(_sans(hostnames)) <= set(sans)

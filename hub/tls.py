"""The hub's TLS: a small CA of its own (or the operator's certificate), the server certificate
for HTTPS and the embedded broker, and the enrollment command that pins the CA.

Files, in ``<data_dir>/tls/`` unless the settings point elsewhere::

    ca.pem  ca.key      the hub's CA (EC P-256, 10 years); agents pin its key (`shared.tls`)
    server.pem          the server certificate (EC P-256), signed by the CA, with a SAN for
    server.key          every name and address the hub is reached at (`server_names`)
    crl.pem             the device certificates decommissioning revoked (`write_crl`), which
                        the broker's certificate listener checks

Device certificates (mutual TLS): `issue_device_certificate` certifies the key of a
device's certificate request with CN = its device id, which the broker takes as the
username, so the device's ACL applies as for a password login.

`ensure_certificates` makes what is missing and re-issues the server certificate when a
name it must carry is missing or it is close to expiry: the CA (and so every pin handed
out) stays. A certificate the operator installed (`install_operator_certificate`, or the
``AUTODL_HUB_TLS_*_FILE`` settings) is never touched; without a CA file from the operator
there is no pin, and agents trust the hub through their system store or ``--ca-file``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.config import HubSettings
from shared.tls import TrustError, ca_hash, is_loopback

__all__ = [
    "CertificateError",
    "ca_pem",
    "client_context",
    "device_credentials",
    "issue_device_certificate",
    "write_crl",
    "enroll_command",
    "ensure_certificates",
    "hub_ca_hash",
    "install_operator_certificate",
    "server_names",
]

logger = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 730
DEVICE_DAYS = 1825
RENEW_BEFORE = timedelta(days=30)


class CertificateError(Exception):
    """A certificate or key that cannot be read, or that does not fit."""


def _now() -> datetime:
    return datetime.now(UTC)


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    # Beside, then rename: mosquitto and uvicorn never read half a file.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: the hub's CA key must be an EC key")
    return key


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{path}: not a readable PEM certificate: {exc}") from exc


def _ensure_ca(settings: HubSettings) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Return the hub's own CA (made when there is none); None when the operator brought the CA."""
    cert_path, key_path = settings.tls_ca, settings.tls_ca_key
    if cert_path.exists() and key_path.exists():
        return _load_certificate(cert_path), _load_key(key_path)
    if cert_path.exists():
        return None  # the operator's CA: no key here
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"autodl hub CA {socket.gethostname()}"[:64])])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    logger.info("created the hub's CA in %s (pin %s)", cert_path, ca_hash(cert_path.read_bytes()))
    return cert, key


def server_names(settings: HubSettings) -> list[str]:
    """Return the names and addresses the server certificate must carry: those agents are told,
    this machine's, loopback, and the operator's extra ``tls_sans``."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    names.add(urlsplit(settings.public_url).hostname or "")
    names.add(settings.mqtt_public_host)
    if settings.host not in ("", "0.0.0.0", "::"):
        names.add(settings.host)
    try:  # this machine's addresses as its own name resolves (no DNS query leaves for /etc/hosts names)
        names.update(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    try:  # the address of the default route; connecting a UDP socket sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            names.add(probe.getsockname()[0])
    except OSError:
        pass
    names.update(settings.tls_sans)
    return sorted(n.strip().strip("[]").lower() for n in names if n and n.strip() and n != "0.0.0.0")


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    have = {str(ip).lower() for ip in san.get_values_for_type(x509.IPAddress)}
    return have | {dns.lower() for dns in san.get_values_for_type(x509.DNSName)}


def _covers(cert: x509.Certificate, names: list[str]) -> bool:
    return set(names) <= _names(cert)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    return cert.issuer == ca.subject


def ensure_certificates(settings: HubSettings) -> None:
    """Make the CA and the server certificate when missing; re-issue ours when a name is missing or it expires soon."""
    ca = _ensure_ca(settings)
    cert_path, key_path = settings.tls_cert, settings.tls_key
    if ca is None:
        if not (cert_path.exists() and key_path.exists()):
            raise CertificateError(
                f"a CA certificate without its key is in {settings.tls_ca}: give the server's "
                f"certificate and key too (autodl-hub init --tls-cert --tls-key)"
            )
        return
    ca_cert, ca_key = ca
    names = server_names(settings)
    if cert_path.exists() and key_path.exists():
        current = _load_certificate(cert_path)
        if not _issued_by(current, ca_cert):
            return  # the operator's: theirs to renew
        if _covers(current, names) and current.not_valid_after_utc - _now() > RENEW_BEFORE:
            return
        names = sorted(set(names) | _names(current))  # keep names given before (init --san)
        logger.info("re-issuing the hub's server certificate (names %s)", ", ".join(names))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def install_operator_certificate(settings: HubSettings, cert: Path, key: Path, ca: Path | None) -> None:
    """Take the operator's server certificate (PEM, chain allowed) and key, and the CA that issued it."""
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        authority = x509.load_pem_x509_certificate(ca.read_bytes()) if ca is not None else None
    except (OSError, ValueError, TypeError) as exc:
        raise CertificateError(f"cannot read the certificate, key or CA: {exc}") from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, public) != private.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise CertificateError(f"{key} is not the key of the certificate in {cert}")
    _write(settings.tls_cert, cert.read_bytes(), 0o644)
    _write(settings.tls_key, key.read_bytes())
    settings.tls_ca_key.unlink(missing_ok=True)  # no hub CA next to the operator's certificate
    if authority is not None:
        _write(settings.tls_ca, authority.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        settings.tls_ca.unlink(missing_ok=True)


def ca_pem(settings: HubSettings) -> bytes | None:
    """Return the CA agents pin (PEM), or None when the hub has none (the operator's publicly trusted certificate)."""
    try:
        return settings.tls_ca.read_bytes()
    except FileNotFoundError:
        return None


def hub_ca_hash(settings: HubSettings) -> str | None:
    """Return the CA's pin (``sha256:...``), or None without a CA."""
    pem = ca_pem(settings)
    if pem is None:
        return None
    try:
        return ca_hash(pem)
    except TrustError as exc:
        raise CertificateError(f"{settings.tls_ca}: {exc}") from exc


def client_context(settings: HubSettings) -> ssl.SSLContext:
    """Return how the hub's own CLI verifies a hub over HTTPS: the system's store and the hub's CA when present."""
    context = ssl.create_default_context()
    if settings.tls_ca.exists():
        context.load_verify_locations(cafile=str(settings.tls_ca))
    return context


def enroll_command(settings: HubSettings, token: str) -> str:
    """Return the ``autodl-agent enroll`` line for this hub: pinned over HTTPS, ``--insecure`` for plain HTTP off loopback."""
    words = ["autodl-agent", "enroll", "--hub", settings.public_url, "--token", token]
    url = urlsplit(settings.public_url)
    if url.scheme == "https":
        pin = hub_ca_hash(settings)
        if pin is not None:
            words += ["--ca-hash", pin]
    elif not is_loopback(url.hostname or ""):
        words.append("--insecure")
    return shlex.join(words)


def _hub_ca(settings: HubSettings) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = _ensure_ca(settings)
    if ca is None:
        raise CertificateError("device certificates need the hub's own CA; this hub uses the operator's certificate")
    return ca


def issue_device_certificate(
    settings: HubSettings, csr_pem: str, device_id: str, *, lifetime: timedelta = timedelta(days=DEVICE_DAYS)
) -> tuple[str, str]:
    """Certify the key of a device's certificate request as `device_id`; return (PEM, serial in hex).

    Only the key is taken from the request, after checking that it signed the request (the
    device holds it); the subject is the hub's choice.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise CertificateError(f"the certificate request is not a PEM PKCS#10 request: {exc}") from exc
    if not csr.is_signature_valid:
        raise CertificateError("the certificate request's signature does not verify: it was not made with its key")
    public = csr.public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise CertificateError("device keys must be Ed25519 or EC")
    ca_cert, ca_key = _hub_ca(settings)
    now = _now()
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), format(serial, "x")


def device_credentials(settings: HubSettings, device_id: str, lifetime: timedelta) -> tuple[bytes, bytes]:
    """Return a fresh (certificate PEM, key PEM) for `device_id`, for the hub itself to act as that device."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    cert, _ = issue_device_certificate(
        settings, csr.public_bytes(serialization.Encoding.PEM).decode(), device_id, lifetime=lifetime
    )
    return cert.encode(), _key_pem(key)


def write_crl(settings: HubSettings, serials: list[str]) -> Path:
    """Write the CRL of the revoked device certificates (hex serials); return its path."""
    ca_cert, ca_key = _hub_ca(settings)
    now = _now()
    # OpenSSL refuses every client once a CRL is past its next update; the hub rewrites it
    # at each start and each revocation, so the CA's own end is the honest bound.
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
    )
    for serial in serials:
        revoked = x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(now).build()
        builder = builder.add_revoked_certificate(revoked)
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(settings.tls_crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return settings.tls_crl

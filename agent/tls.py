"""Whom the agent trusts for HTTPS and MQTT over TLS, and the pinned first contact with a hub.

Trust, in order: ``ca_file`` (a CA from elsewhere), else the CA pinned at enrollment
(``<state_dir>/ca.pem``), else the system's store.

Mutual TLS (``enroll --device-cert``): the device makes an Ed25519 key (``device.key``,
0600, never sent anywhere) and a certificate request signed with it; the hub answers with
``device.pem`` (CN = device id), which the broker's certificate listener authenticates.
PyNaCl makes the key and the few DER bytes of the request are written here, so the agent
needs no `cryptography`. `fetch_pinned_ca` is the one
unverified request the agent ever makes: it reads the hub's CA certificate and keeps it
only when the certificate's key matches the ``--ca-hash`` the operator gave
(`shared.tls.ca_hash`); every later connection verifies against it.
"""

from __future__ import annotations

import base64
import os
import ssl
import textwrap
from pathlib import Path

import httpx
from nacl.signing import SigningKey

from agent.config import AgentSettings
from agent.errors import EnrollmentError, FatalError, HubUnavailableError
from shared import routes
from shared.tls import TrustError, ca_hash

__all__ = [
    "DEVICE_CERT_FILE",
    "DEVICE_KEY_FILE",
    "PINNED_CA_FILE",
    "DeviceKey",
    "ca_file",
    "client_certificate",
    "fetch_pinned_ca",
    "save_device_certificate",
    "save_pinned_ca",
    "ssl_context",
]

PINNED_CA_FILE = "ca.pem"
DEVICE_CERT_FILE = "device.pem"
DEVICE_KEY_FILE = "device.key"
_ED25519 = bytes.fromhex("06032b6570")  # OID 1.3.101.112
_COMMON_NAME = bytes.fromhex("0603550403")  # OID 2.5.4.3


def ca_file(settings: AgentSettings) -> Path | None:
    """Return the CA file the agent verifies the hub and broker with; None: the system's store."""
    if settings.ca_file is not None:
        return settings.ca_file
    pinned = settings.state_dir / PINNED_CA_FILE
    return pinned if pinned.exists() else None


def ssl_context(settings: AgentSettings, cadata: str | None = None) -> ssl.SSLContext:
    """Return a verifying client context: `cadata` (PEM) when given, else `ca_file`'s trust."""
    if cadata is not None:
        return ssl.create_default_context(cadata=cadata)
    path = ca_file(settings)
    try:
        return ssl.create_default_context(cafile=str(path) if path is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise FatalError(f"cannot read the CA file {path}: {exc}") from exc


def fetch_pinned_ca(hub_url: str, pin: str, timeout: float, transport: httpx.BaseTransport | None = None) -> str:
    """Fetch the hub's CA (PEM) without verifying TLS and return it only if its key hashes to `pin`."""
    url = routes.url(hub_url, routes.CA)
    try:
        with httpx.Client(timeout=timeout, verify=False, transport=transport) as client:  # noqa: S501 - pinned below
            response = client.get(url)
    except httpx.HTTPError as exc:
        raise HubUnavailableError(f"cannot reach the hub at {url}: {exc}") from exc
    if response.status_code != 200:
        raise EnrollmentError(
            f"the hub answered HTTP {response.status_code} for its CA at {url}: it has no CA to pin "
            "(use --ca-file, or no --ca-hash for a publicly trusted certificate)"
        )
    try:
        found = ca_hash(response.content)
        pem = response.content.decode("ascii")
        ssl.create_default_context(cadata=pem)  # a certificate the TLS library can use, too
    except (TrustError, UnicodeDecodeError, ssl.SSLError) as exc:
        raise EnrollmentError(f"the hub's CA at {url} is not a certificate: {exc}") from exc
    if found != pin:
        raise EnrollmentError(
            f"the hub's CA does not match --ca-hash: expected {pin}, the hub at {hub_url} has {found}. "
            "Nothing was sent or stored: this is another hub, or someone between you and it"
        )
    return pem


def save_pinned_ca(settings: AgentSettings, pem: str | None) -> None:
    """Keep the CA trusted at enrollment in the state dir (0600); None removes an older one."""
    path = settings.state_dir / PINNED_CA_FILE
    if pem is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pem)
    os.replace(tmp, path)


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _pem(kind: str, der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----\n"


class DeviceKey:
    """An Ed25519 key made on this device, and the certificate request (PKCS#10) it signs."""

    def __init__(self) -> None:
        self._key = SigningKey.generate()

    def private_pem(self) -> str:
        """Return the key as PKCS#8 PEM (what OpenSSL loads)."""
        seed = _der(0x04, bytes(self._key))
        return _pem("PRIVATE KEY", _der(0x30, _der(0x02, b"\x00") + _der(0x30, _ED25519) + _der(0x04, seed)))

    def csr_pem(self, common_name: str = "autodl-device") -> str:
        """Return a certificate request for this key (the hub sets the real subject: the device id)."""
        name = _der(0x30, _der(0x31, _der(0x30, _COMMON_NAME + _der(0x0C, common_name.encode()))))
        public = _der(0x30, _der(0x30, _ED25519) + _der(0x03, b"\x00" + self._key.verify_key.encode()))
        info = _der(0x30, _der(0x02, b"\x00") + name + public + _der(0xA0, b""))
        signature = self._key.sign(info).signature
        return _pem("CERTIFICATE REQUEST", _der(0x30, info + _der(0x30, _ED25519) + _der(0x03, b"\x00" + signature)))


def save_device_certificate(settings: AgentSettings, key: DeviceKey | None, certificate: str | None) -> None:
    """Keep the device's key (0600) and certificate; None removes an older pair."""
    paths = (settings.state_dir / DEVICE_KEY_FILE, settings.state_dir / DEVICE_CERT_FILE)
    if key is None or certificate is None:
        for path in paths:
            path.unlink(missing_ok=True)
        return
    for path, text in zip(paths, (key.private_pem(), certificate), strict=True):
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)


def client_certificate(settings: AgentSettings) -> tuple[str, str] | None:
    """Return (certificate, key) file paths when enrollment gave this device a certificate."""
    cert, key = settings.state_dir / DEVICE_CERT_FILE, settings.state_dir / DEVICE_KEY_FILE
    return (str(cert), str(key)) if cert.exists() and key.exists() else None

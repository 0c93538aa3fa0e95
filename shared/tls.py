"""Transport trust both sides agree on: the CA pin and which addresses may go without TLS.

The pin is kubeadm's ``--discovery-token-ca-cert-hash``: ``sha256:`` and the hex SHA-256 of
the CA certificate's DER SubjectPublicKeyInfo. Pinning the key rather than the whole
certificate lets the hub re-issue its CA certificate (a new expiry) without breaking
enrollment commands already handed out. The agent computes it without `cryptography`
(8 MB of RSS it otherwise never needs), so the few DER steps to reach the key are here.

Plain HTTP and MQTT are for loopback only; anything else needs TLS or an explicit
``--insecure`` on the side that chooses (`is_loopback` decides for both).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re

__all__ = ["CA_HASH_PREFIX", "TrustError", "ca_hash", "certificate_der", "is_loopback", "parse_ca_hash"]

CA_HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)
_SEQUENCE = 0x30
_EXPLICIT_0 = 0xA0


class TrustError(ValueError):
    """A certificate or pin that cannot be read."""


def parse_ca_hash(text: str) -> str:
    """Return a pin in its one spelling (``sha256:`` + 64 lowercase hex digits); TrustError otherwise."""
    pin = text.strip().lower()
    if _HASH_RE.match(pin) is None:
        raise TrustError(f"CA hash {text!r}: expected sha256:<64 hex digits> (as `autodl-hub token create` prints)")
    return pin


def certificate_der(data: bytes) -> bytes:
    """Return the DER of the first certificate in `data` (PEM or DER)."""
    match = _PEM_RE.search(data)
    if match is None:
        if data[:1] == bytes([_SEQUENCE]):
            return data
        raise TrustError("not a certificate: no PEM block and not DER")
    try:
        return base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except ValueError as exc:
        raise TrustError(f"the certificate's PEM body is not base64: {exc}") from exc


def ca_hash(certificate: bytes) -> str:
    """Return the pin of a certificate (PEM or DER): sha256 of its DER SubjectPublicKeyInfo."""
    return CA_HASH_PREFIX + hashlib.sha256(_subject_public_key_info(certificate_der(certificate))).hexdigest()


def is_loopback(host: str) -> bool:
    """Return True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1), as plain text may go there."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _subject_public_key_info(der: bytes) -> bytes:
    # Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
    #   signature, issuer, validity, subject, subjectPublicKeyInfo, ... }, ... }
    tag, body, _ = _element(der, 0)
    if tag != _SEQUENCE:
        raise TrustError("not a certificate: it does not start with a SEQUENCE")
    tag, tbs, _ = _element(der, body)
    if tag != _SEQUENCE:
        raise TrustError("not a certificate: no tbsCertificate")
    offset = tbs
    tag, _, end = _element(der, offset)
    if tag == _EXPLICIT_0:
        offset = end
    for _field in range(5):  # serialNumber, signature, issuer, validity, subject
        offset = _element(der, offset)[2]
    tag, _, end = _element(der, offset)
    if tag != _SEQUENCE:
        raise TrustError("not a certificate: no SubjectPublicKeyInfo where it belongs")
    return der[offset:end]


def _element(der: bytes, offset: int) -> tuple[int, int, int]:
    """Return (tag, start of content, end) of the DER element at `offset`."""
    try:
        tag, first = der[offset], der[offset + 1]
        start = offset + 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4:
                raise TrustError("not DER: indefinite or oversized length")
            length = int.from_bytes(der[start : start + count], "big")
            start += count
    except IndexError as exc:
        raise TrustError("not a certificate: truncated DER") from exc
    end = start + length
    if end > len(der):
        raise TrustError("not a certificate: truncated DER")
    return tag, start, end

"""shared.tls: the CA pin is kubeadm's (sha256 of the DER SubjectPublicKeyInfo) for every key
type, read without `cryptography`; loopback is the only place plain text may go."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from shared.tls import TrustError, ca_hash, certificate_der, is_loopback, parse_ca_hash


def _certificate(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(65537, 2048),
    ],
    ids=["ec", "ed25519", "rsa"],
)
def test_the_pin_is_the_sha256_of_the_subject_public_key_info(key: object) -> None:
    cert = _certificate(key)  # type: ignore[arg-type]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = "sha256:" + hashlib.sha256(spki).hexdigest()
    pem, der = cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER)
    assert ca_hash(pem) == ca_hash(der) == expected
    assert certificate_der(pem) == der


@pytest.mark.parametrize(
    "data", [b"", b"hello", b"\x30\x82\xff\xff\x00", b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----"]
)
def test_what_is_no_certificate_is_a_trust_error(data: bytes) -> None:
    with pytest.raises(TrustError):
        ca_hash(data)


def test_pins_have_one_spelling() -> None:
    assert parse_ca_hash(" SHA256:" + "AB" * 32 + " ") == "sha256:" + "ab" * 32
    for bad in ("ab" * 32, "sha256:" + "ab" * 31, "sha1:" + "ab" * 20, "sha256:" + "zz" * 32):
        with pytest.raises(TrustError, match="sha256:<64 hex digits>"):
            parse_ca_hash(bad)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("hub.example.com", False),
        ("", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback

"""hub.tls and the transport settings: TLS beyond loopback unless --insecure, one answer for the
broker's scheme, a CA whose pin survives server-certificate re-issues, the operator's own
certificate, the printed enrollment command, device certificates and their CRL."""

from __future__ import annotations

import base64
import shlex
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.tls import DeviceKey
from hub.config import HubSettings
from hub.tls import (
    CertificateError,
    enroll_command,
    ensure_certificates,
    hub_ca_hash,
    install_operator_certificate,
    issue_device_certificate,
    write_crl,
)


def _settings(tmp_path: Path, **values: object) -> HubSettings:
    return HubSettings(data_dir=tmp_path, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "tls", "scheme", "mqtt_port"),
    [
        ({"host": "127.0.0.1"}, False, "http", 1883),
        ({"host": "0.0.0.0"}, True, "https", 8883),
        ({"host": "10.1.2.3"}, True, "https", 8883),
        ({"host": "0.0.0.0", "insecure": True}, False, "http", 1883),
        ({"host": "127.0.0.1", "tls": True}, True, "https", 8883),
        ({"host": "0.0.0.0", "mqtt_port": 1999}, True, "https", 1999),
    ],
)
def test_tls_beyond_loopback_unless_insecure(
    tmp_path: Path, values: dict[str, object], tls: bool, scheme: str, mqtt_port: int
) -> None:
    settings = _settings(tmp_path, **values)
    assert settings.tls_enabled is tls and settings.mqtt_tls is tls
    assert settings.public_url.startswith(f"{scheme}://") and settings.mqtt_port == mqtt_port
    assert settings.transport_problem() is None


def test_tls_and_insecure_contradict(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one"):
        _settings(tmp_path, tls=True, insecure=True)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"host": "0.0.0.0", "public_url": "http://hub.example:8080"}, "not https://"),
        ({"host": "127.0.0.1", "public_url": "http://hub.example:8080"}, "plain HTTP beyond loopback"),
        ({"host": "127.0.0.1", "mqtt_public_host": "hub.example"}, "plain text"),
        ({"host": "0.0.0.0", "mqtt_url": "mqtt://broker.example:1883"}, "plain text"),
    ],
)
def test_plain_text_beyond_loopback_is_refused(tmp_path: Path, values: dict[str, object], problem: str) -> None:
    found = _settings(tmp_path, **values).transport_problem()
    assert found is not None and problem in found
    assert _settings(tmp_path, insecure=True, **values).transport_problem() is None


def test_the_broker_scheme_and_what_agents_are_told_are_one_answer(tmp_path: Path) -> None:
    assert _settings(tmp_path, host="0.0.0.0", mqtt_url="mqtts://broker:8883").mqtt_tls is True
    assert _settings(tmp_path, host="127.0.0.1", mqtt_url="mqtt://127.0.0.1:1883").mqtt_tls is False
    assert _settings(tmp_path, host="0.0.0.0", mqtt_url="mqtt://broker:1883", insecure=True).mqtt_tls is False


def test_server_certificate_follows_the_names_while_the_pin_stays(tmp_path: Path) -> None:
    settings = _settings(tmp_path, host="0.0.0.0", tls_sans=["hub.lan"])
    ensure_certificates(settings)
    pin = hub_ca_hash(settings)
    first = x509.load_pem_x509_certificate(settings.tls_cert.read_bytes())
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert "hub.lan" in names and "localhost" in names
    ensure_certificates(settings)  # nothing missing: kept
    assert x509.load_pem_x509_certificate(settings.tls_cert.read_bytes()) == first

    moved = _settings(tmp_path, host="0.0.0.0", public_url="https://hub.example.com:8443")
    ensure_certificates(moved)
    second = x509.load_pem_x509_certificate(settings.tls_cert.read_bytes())
    names = second.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert "hub.example.com" in names and "hub.lan" in names  # the new name, and the one given before
    assert hub_ca_hash(moved) == pin
    second.verify_directly_issued_by(x509.load_pem_x509_certificate(settings.tls_ca.read_bytes()))


def test_the_operators_certificate_is_used_as_it_is(tmp_path: Path) -> None:
    own = _settings(tmp_path / "own", host="0.0.0.0", tls_sans=["corp.example"])
    ensure_certificates(own)  # stands for the operator's CA and certificate
    settings = _settings(tmp_path / "hub", host="0.0.0.0")
    with pytest.raises(CertificateError, match="is not the key"):
        install_operator_certificate(settings, own.tls_cert, own.tls_ca_key, own.tls_ca)
    install_operator_certificate(settings, own.tls_cert, own.tls_key, own.tls_ca)
    ensure_certificates(settings)
    assert settings.tls_cert.read_bytes() == own.tls_cert.read_bytes()  # not re-issued
    assert hub_ca_hash(settings) == hub_ca_hash(own) and not settings.tls_ca_key.exists()
    with pytest.raises(CertificateError, match="own CA"):
        issue_device_certificate(settings, DeviceKey().csr_pem(), "dev-1")


def test_the_enroll_command_pins_https_and_says_insecure_for_plain_text(tmp_path: Path) -> None:
    settings = _settings(tmp_path, host="0.0.0.0", public_url="https://hub.example:8080")
    ensure_certificates(settings)
    words = shlex.split(enroll_command(settings, "aen_x"))
    assert words == [
        "autodl-agent",
        "enroll",
        "--hub",
        "https://hub.example:8080",
        "--token",
        "aen_x",
        "--ca-hash",
        hub_ca_hash(settings),
    ]
    plain = _settings(tmp_path, insecure=True, public_url="http://hub.example:8080")
    assert shlex.split(enroll_command(plain, "t"))[-1] == "--insecure"
    local = _settings(tmp_path, host="127.0.0.1")
    assert "--insecure" not in enroll_command(local, "t") and "--ca-hash" not in enroll_command(local, "t")


def test_device_certificates_take_the_key_of_a_verified_request_and_can_be_revoked(tmp_path: Path) -> None:
    settings = _settings(tmp_path, host="0.0.0.0")
    ensure_certificates(settings)
    key = DeviceKey()
    pem, serial = issue_device_certificate(settings, key.csr_pem(), "dev-abc")
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert cert.subject.rfc4514_string() == "CN=dev-abc" and format(cert.serial_number, "x") == serial
    private = serialization.load_pem_private_key(key.private_pem().encode(), None)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert cert.public_key().public_bytes(*raw) == private.public_key().public_bytes(*raw)

    request = x509.load_pem_x509_csr(key.csr_pem().encode()).public_bytes(serialization.Encoding.DER)
    forged = request[:-8] + bytes(8)  # the signature no longer verifies
    body = base64.encodebytes(forged).decode()
    with pytest.raises(CertificateError, match="signature"):
        issue_device_certificate(
            settings, f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n", "x"
        )
    with pytest.raises(CertificateError, match="not a PEM"):
        issue_device_certificate(settings, "nonsense", "dev-x")

    crl = x509.load_pem_x509_crl(write_crl(settings, [serial]).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl.is_signature_valid(x509.load_pem_x509_certificate(settings.tls_ca.read_bytes()).public_key())  # type: ignore[arg-type]

"""Revoking a device certificate at the embedded mosquitto: a connected device is dropped, and the
broker refuses the certificate from then on (CRL re-read on SIGHUP, session taken over)."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.tls import DeviceKey
from hub.broker.embedded import EmbeddedBroker
from hub.broker.revocation import CertificateRevocation
from hub.config import HubSettings
from hub.db import create_engine_for, migrate, session_factory
from hub.models import Device
from hub.tls import ensure_certificates, issue_device_certificate
from tests.support.processes import free_port
from tests.support.waiting import wait_for


class DeviceClient:
    """An MQTT client logged in with a device certificate; records how its connection went."""

    def __init__(self, settings: HubSettings, port: int, cert: Path, key: Path) -> None:
        self.events: list[str] = []
        self.answered = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anything", protocol=mqtt.MQTTv5)
        self.client.tls_set(str(settings.tls_ca), str(cert), str(key))
        self.client.on_connect = lambda _c, _u, _f, reason, _p: (
            self.events.append(f"connect {reason}"),
            self.answered.set(),
        )
        self.client.on_disconnect = lambda _c, _u, _f, reason, _p: (self.events.append("closed"), self.answered.set())
        self.port = port

    def connect(self) -> str:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=10)
        except OSError as exc:
            return f"refused {exc}"
        self.client.loop_start()
        self.answered.wait(10)
        return self.events[0] if self.events else "no answer"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def settings(tmp_path: Path) -> HubSettings:
    settings = HubSettings(
        data_dir=tmp_path, host="127.0.0.1", tls=True, mqtt_port=free_port(), mqtt_mtls_port=free_port()
    )
    ensure_certificates(settings)
    return settings


def test_a_connected_device_is_dropped_and_its_certificate_refused(settings: HubSettings, tmp_path: Path) -> None:
    engine = create_engine_for(settings)
    migrate(engine)
    sessions = session_factory(engine)
    key = DeviceKey()
    pem, serial = issue_device_certificate(settings, key.csr_pem(), "dev-a")
    cert_path, key_path = tmp_path / "device.pem", tmp_path / "device.key"
    cert_path.write_text(pem)
    key_path.write_text(key.private_pem())
    with sessions() as session:
        session.add(Device(id="dev-a", certificate_serial=serial))
        session.commit()
    broker = EmbeddedBroker.from_settings(settings)
    revocation = CertificateRevocation(settings, sessions, broker)
    revocation.write_crl()
    broker.start()
    device = DeviceClient(settings, broker.tls.certificate_port or 0, cert_path, key_path)  # type: ignore[union-attr]
    try:
        assert device.connect() == "connect Success"
        with sessions() as session:
            row = session.get(Device, "dev-a")
            assert row is not None
            row.decommissioned = True
            session.commit()
        revocation.revoke("dev-a")
        wait_for("the device dropped", lambda: "closed" in device.events, 15)
        device.close()
        again = DeviceClient(settings, broker.tls.certificate_port or 0, cert_path, key_path)  # type: ignore[union-attr]
        outcome = again.connect()
        again.close()
        assert outcome != "connect Success", outcome
        # A restarted broker reads the same CRL.
        broker.stop()
        broker.start()
        restarted = DeviceClient(settings, broker.tls.certificate_port or 0, cert_path, key_path)  # type: ignore[union-attr]
        assert restarted.connect() != "connect Success"
        restarted.close()
    finally:
        device.close()
        broker.stop()
        engine.dispose()

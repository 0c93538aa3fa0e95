"""Revoking device certificates at the embedded broker: the CRL, its reload, the live connection.

What mosquitto 2.0.11 does (tried, see tests/e2e/test_trust.py): SIGHUP re-reads the
``crlfile`` of a listener, so a revoked certificate cannot connect again, but a client
already connected with it stays connected (the reload re-checks the certificate's CN, not
the CRL). So after the reload the hub takes the device's session over: it connects to the
certificate listener with a short-lived certificate of its own for the same CN, which the
broker also makes the client id (``use_username_as_clientid``); the broker closes the
device's connection for it, and the hub leaves with a clean start and no session expiry,
discarding the device's persistent session as well.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlmodel import col, select

from hub.broker.embedded import BrokerError, EmbeddedBroker
from hub.config import HubSettings
from hub.db import SessionFactory
from hub.models import Device
from hub.tls import device_credentials, write_crl

__all__ = ["CertificateRevocation", "RevocationError"]

logger = logging.getLogger(__name__)


class RevocationError(BrokerError):
    """The broker could not be made to refuse a revoked certificate."""


class CertificateRevocation:
    """Keep the embedded broker's CRL to the decommissioned devices' certificates and drop their connections."""

    def __init__(
        self,
        settings: HubSettings,
        sessions: SessionFactory,
        broker: EmbeddedBroker,
        *,
        reload_s: float = 0.5,
        timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.broker = broker
        self.reload_s = reload_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()

    def write_crl(self) -> Path:
        """Write the CRL of every decommissioned device's certificate (at start, before the broker reads it)."""
        with self.sessions() as session:
            query = select(Device.certificate_serial).where(
                col(Device.decommissioned).is_(True), col(Device.certificate_serial).is_not(None)
            )
            serials = sorted(str(s) for s in session.exec(query).all())
        return write_crl(self.settings, serials)

    def revoke(self, device_id: str) -> None:
        """Refuse the device's certificate from now on and end its connection; RevocationError if that failed."""
        with self._lock:
            self.write_crl()
            if not self.broker.reload():
                return  # the broker reads the new CRL when the supervisor restarts it
            # mosquitto reloads in its next loop turn; the device only reconnects after its backoff.
            time.sleep(self.reload_s)
            self._take_over(device_id)
        logger.info("revoked the certificate of %s and closed its connection", device_id)

    def _take_over(self, device_id: str) -> None:
        port = self.broker.tls.certificate_port if self.broker.tls is not None else None
        if port is None:
            return
        cert, key = device_credentials(self.settings, device_id, timedelta(minutes=10))
        connected = threading.Event()
        outcome: list[str] = []
        with tempfile.TemporaryDirectory(dir=self.settings.tls_dir) as tmp:
            cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_path.write_bytes(cert)
            key_path.write_bytes(key)
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
            client.tls_set(ca_certs=str(self.settings.tls_ca), certfile=str(cert_path), keyfile=str(key_path))

            def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
                outcome.append(str(reason))
                connected.set()

            client.on_connect = on_connect
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
            try:
                client.connect(self.broker.connect_host, port, keepalive=10, clean_start=True, properties=props)
                client.loop_start()
                if not connected.wait(self.timeout_s) or outcome != ["Success"]:
                    raise RevocationError(f"could not take over {device_id}'s connection: {outcome or 'no answer'}")
            except OSError as exc:
                raise RevocationError(f"could not take over {device_id}'s connection: {exc}") from exc
            finally:
                client.disconnect()
                client.loop_stop()

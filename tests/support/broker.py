"""Brokers for tests: the plain mosquitto (`Broker`, the `mqtt_broker` fixture) and a test-owned
mosquitto with dynamic security (`secured_broker`: per-device logins and ACLs, as in production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub.broker.embedded import EmbeddedBroker
from tests.support.processes import Broker, free_port

__all__ = ["HUB_PASSWORD", "HUB_USER", "Broker", "secured_broker"]

HUB_USER = "autodl-hub"
HUB_PASSWORD = "test-hub-password-0123456789"


def secured_broker(
    directory: Path, *, hub_password: str = HUB_PASSWORD, roles: bool = True, **kwargs: Any
) -> EmbeddedBroker:
    """Start mosquitto with dynamic security on a free loopback port; the caller stops it.

    `roles` puts the device and hub roles in place (as the hub's bootstrap does); `kwargs` go
    to EmbeddedBroker (backoff_max_s, say: its supervisor restarts a killed broker).
    """
    broker = EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password=hub_password, bind_host="127.0.0.1", **kwargs
    )
    broker.start()
    if roles:
        with broker.admin() as admin:
            admin.ensure_roles()
    return broker

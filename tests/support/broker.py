"""Brokers for tests: the plain mosquitto (`Broker`, the `mqtt_broker` fixture) and a test-owned
mosquitto with per-device logins and ACLs (`secured_broker`): by default with dynamic security,
as an external mosquitto (``--mqtt-url``) runs it, which the hub manages over MQTT;
``auth="passwd"`` gives the embedded broker's password file and pattern ACLs instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub.broker.embedded import BrokerAdmin, EmbeddedBroker
from tests.support.processes import Broker, free_port

__all__ = ["HUB_PASSWORD", "HUB_USER", "Broker", "secured_broker"]

HUB_USER = "autodl-hub"
HUB_PASSWORD = "test-hub-password-0123456789"


def secured_broker(
    directory: Path, *, hub_password: str = HUB_PASSWORD, roles: bool = True, **kwargs: Any
) -> EmbeddedBroker:
    """Start a secured mosquitto on a free loopback port; the caller stops it.

    With dynamic security (the default), `roles` puts the device and hub roles in place (as the
    hub's bootstrap does); `kwargs` go to EmbeddedBroker (``auth="passwd"``; backoff_max_s, say:
    its supervisor restarts a killed broker).
    """
    kwargs.setdefault("auth", "dynsec")
    broker = EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password=hub_password, bind_host="127.0.0.1", **kwargs
    )
    broker.start()
    admin = broker.admin()
    if roles and isinstance(admin, BrokerAdmin):
        with admin:
            admin.ensure_roles()
    return broker

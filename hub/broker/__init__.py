"""The MQTT broker: the embedded, supervised mosquitto and its password file of devices
(`passwd`), the administration of an external mosquitto through the dynamic-security
plugin (`admin`), and the bootstrap that gives an external mosquitto the hub's user.
"""

from __future__ import annotations

from hub.broker.admin import (
    DEVICE_ROLE_PREFIX,
    HUB_ROLE,
    BrokerAdmin,
    BrokerAdminError,
    BrokerUnavailable,
    DynsecCommandError,
    MqttEndpoint,
    default_acl_access,
    device_role_acls,
    device_role_name,
    find_dynsec_plugin,
    hash_password,
    hub_role_acls,
    verify_password,
    write_hub_dynsec,
)
from hub.broker.bootstrap import BootstrapError, write_hub_auth
from hub.broker.embedded import (
    BrokerError,
    BrokerStartError,
    EmbeddedBroker,
    find_mosquitto,
    load_or_create_hub_password,
    migrate_dynsec_devices,
)
from hub.broker.passwd import PasswordFileUsers

__all__ = [
    "BootstrapError",
    "BrokerAdmin",
    "BrokerAdminError",
    "BrokerError",
    "BrokerStartError",
    "BrokerUnavailable",
    "DEVICE_ROLE_PREFIX",
    "DynsecCommandError",
    "EmbeddedBroker",
    "HUB_ROLE",
    "MqttEndpoint",
    "PasswordFileUsers",
    "default_acl_access",
    "device_role_acls",
    "device_role_name",
    "find_dynsec_plugin",
    "find_mosquitto",
    "hash_password",
    "hub_role_acls",
    "load_or_create_hub_password",
    "migrate_dynsec_devices",
    "verify_password",
    "write_hub_auth",
    "write_hub_dynsec",
]

"""The fleet: devices (enrollment, labels, desired state, decommissioning), commands, and telemetry
queries.
"""

from __future__ import annotations

from hub.fleet.commands import CommandPublisher, expire_commands, list_commands, send_command, to_message
from hub.fleet.devices import (
    BrokerCredentials,
    DesiredPublisher,
    RetainedCleaner,
    UnknownDeviceError,
    decommission,
    deploy_model,
    enroll,
    get_device,
    list_devices,
    set_labels,
    stage_desired,
    undeploy_model,
    update_desired,
)
from hub.fleet.telemetry import Bucket, downsample, query_points

__all__ = [
    "BrokerCredentials",
    "Bucket",
    "CommandPublisher",
    "DesiredPublisher",
    "RetainedCleaner",
    "UnknownDeviceError",
    "decommission",
    "deploy_model",
    "downsample",
    "enroll",
    "expire_commands",
    "get_device",
    "list_commands",
    "list_devices",
    "query_points",
    "send_command",
    "set_labels",
    "stage_desired",
    "to_message",
    "undeploy_model",
    "update_desired",
]

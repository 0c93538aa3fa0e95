"""Every MQTT topic of the protocol, built here and nowhere else.

Layout (root ``autodl/v1``):

    devices/{id}/desired      hub -> agent   QoS 1, retained   DesiredState
    devices/{id}/reported     agent -> hub   QoS 1, retained   ReportedState
    devices/{id}/commands     hub -> agent   QoS 1             Command
    devices/{id}/results      agent -> hub   QoS 1             CommandResult
    devices/{id}/telemetry    agent -> hub   QoS 1             TelemetryBatch
    devices/{id}/online       agent -> hub   QoS 1, retained   Presence (also the last will)
    models/{name}/releases    hub -> hub     QoS 1, retained   Release (devices may not read it)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ROOT",
    "DEVICE_TO_HUB",
    "HUB_TO_DEVICE",
    "RETAINED",
    "DeviceChannel",
    "ParsedTopic",
    "TopicError",
    "device_topic",
    "device_wildcard",
    "device_prefix",
    "release_topic",
    "release_wildcard",
    "parse",
    "validate_id",
]

ROOT = "autodl/v1"

# Ids become topic levels and file names: no MQTT wildcards, separators or spaces.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TopicError(ValueError):
    """A topic or an id that does not fit the protocol's layout."""


class DeviceChannel(StrEnum):
    """The per-device channels; the value is the last topic level."""

    DESIRED = "desired"
    REPORTED = "reported"
    COMMANDS = "commands"
    RESULTS = "results"
    TELEMETRY = "telemetry"
    ONLINE = "online"


# Channels the hub publishes (the agent subscribes) and the ones the agent publishes.
HUB_TO_DEVICE = frozenset({DeviceChannel.DESIRED, DeviceChannel.COMMANDS})
DEVICE_TO_HUB = frozenset(
    {DeviceChannel.REPORTED, DeviceChannel.RESULTS, DeviceChannel.TELEMETRY, DeviceChannel.ONLINE}
)
RETAINED = frozenset({DeviceChannel.DESIRED, DeviceChannel.REPORTED, DeviceChannel.ONLINE})


def validate_id(value: str, what: str = "id") -> str:
    """Return `value` if it is usable as a topic level, else raise TopicError."""
    if not _ID_RE.match(value):
        raise TopicError(f"invalid {what} {value!r}: use 1-128 of [A-Za-z0-9._-], not starting with . - _")
    return value


def device_prefix(device_id: str) -> str:
    """Return ``autodl/v1/devices/{id}``, the root of one device's topics."""
    return f"{ROOT}/devices/{validate_id(device_id, 'device id')}"


def device_topic(device_id: str, channel: DeviceChannel) -> str:
    """Return the topic of one device's channel."""
    return f"{device_prefix(device_id)}/{DeviceChannel(channel).value}"


def device_wildcard(channel: DeviceChannel) -> str:
    """Return the subscription filter for one channel of every device (for the hub)."""
    return f"{ROOT}/devices/+/{DeviceChannel(channel).value}"


def release_topic(model_name: str) -> str:
    """Return the retained release topic of a model."""
    return f"{ROOT}/models/{validate_id(model_name, 'model name')}/releases"


def release_wildcard() -> str:
    """Return the subscription filter for every model's releases."""
    return f"{ROOT}/models/+/releases"


@dataclass(frozen=True)
class ParsedTopic:
    """A topic taken apart: a device channel or a model release."""

    kind: str  # "device" or "release"
    subject: str  # device id or model name
    channel: DeviceChannel | None = None


def parse(topic: str) -> ParsedTopic:
    """Take a concrete topic apart; raise TopicError for anything outside the layout."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"topic outside {ROOT}: {topic!r}")
    parts = topic[len(prefix) :].split("/")
    if len(parts) == 3 and parts[0] == "devices":
        try:
            channel = DeviceChannel(parts[2])
        except ValueError as exc:
            raise TopicError(f"unknown device channel in {topic!r}") from exc
        return ParsedTopic("device", validate_id(parts[1], "device id"), channel)
    if len(parts) == 3 and parts[0] == "models" and parts[2] == "releases":
        return ParsedTopic("release", validate_id(parts[1], "model name"))
    raise TopicError(f"unknown topic {topic!r}")

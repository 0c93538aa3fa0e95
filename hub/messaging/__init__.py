"""The hub's MQTT side: the session that publishes desired state, releases and commands, and the
ingest path for what devices say (decode, validate, one writer thread into the database).
"""

from __future__ import annotations

from hub.messaging.decode import TelemetryRows, decode_telemetry
from hub.messaging.ingest import (
    REJECT_REASONS,
    CounterSnapshot,
    IngestRejected,
    MessageCounters,
    active_devices,
    apply_presence,
    apply_reported,
    apply_result,
    insert_telemetry,
    mark_stale_offline,
    telemetry_rows,
)
from hub.messaging.session import CommandExpired, HubMessaging, MessagingError, MessagingUnavailable
from hub.messaging.writer import Inbound, IngestWriter

__all__ = [
    "CommandExpired",
    "CounterSnapshot",
    "HubMessaging",
    "Inbound",
    "IngestRejected",
    "IngestWriter",
    "MessageCounters",
    "MessagingError",
    "MessagingUnavailable",
    "REJECT_REASONS",
    "TelemetryRows",
    "active_devices",
    "apply_presence",
    "apply_reported",
    "apply_result",
    "decode_telemetry",
    "insert_telemetry",
    "mark_stale_offline",
    "telemetry_rows",
]

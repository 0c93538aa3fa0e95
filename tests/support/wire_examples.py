"""One valid example of every wire message in shared.messages (round-trip and JSON Schema tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from shared.messages import (
    Command,
    CommandName,
    CommandResult,
    DesiredModel,
    DesiredState,
    ModelStatus,
    Presence,
    Release,
    ReportedState,
    TelemetryBatch,
    TelemetryPoint,
    UpdateState,
)
from shared.targets import DeviceProfile, TargetId

__all__ = ["EXAMPLES", "NOW"]

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

EXAMPLES: list[BaseModel] = [
    DesiredState(
        device_id="d1",
        revision=3,
        models={"digits": DesiredModel(version="1.2.0", manifest_url="http://hub/m.json")},
        config={"telemetry_interval_s": 5},
    ),
    ReportedState(
        device_id="d1",
        revision=3,
        models={"digits": ModelStatus(active="1.2.0", previous="1.1.0", target=TargetId.CPU_INT8)},
        update_state=UpdateState.ACTIVE,
        profile=DeviceProfile(cpu_flags=["avx2"], cores=4, memory_mb=2048),
        agent_version="0.1.0",
    ),
    Command(id="c1", device_id="d1", name=CommandName.PING, expires_at=NOW + timedelta(minutes=5)),
    CommandResult(id="c1", device_id="d1", ok=True, output={"pong": True}),
    TelemetryBatch(
        device_id="d1",
        points=[TelemetryPoint(seq=i, ts=NOW, name="latency_ms", value=1.5, labels={"model": "m"}) for i in range(3)],
    ),
    Presence(device_id="d1", online=False),
    Release(name="digits", version="1.2.0", manifest_url="http://hub/m.json"),
]

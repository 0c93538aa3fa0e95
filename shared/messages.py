"""Pydantic models for every payload that crosses the wire.

Each MQTT message carries ``kind`` (which model it is) and ``schema_version``; decoding
is validation (`shared.codec.decode`). Models are frozen and refuse unknown fields, so
a typo on one side is an error on the other instead of a silently ignored setting.
Enrollment (HTTP) bodies live here as well: they are part of the same contract.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.targets import DeviceProfile, TargetId
from shared.topics import validate_id

__all__ = [
    "SCHEMA_VERSION",
    "AnyMessage",
    "Command",
    "CommandName",
    "CommandResult",
    "DesiredModel",
    "DesiredState",
    "EnrollRequest",
    "EnrollResponse",
    "LabelKey",
    "LabelValue",
    "Labels",
    "Message",
    "ModelStatus",
    "OutboxReport",
    "Presence",
    "Release",
    "ReportedState",
    "TelemetryBatch",
    "TelemetryPoint",
    "UpdateState",
    "utcnow",
]

SCHEMA_VERSION = 1

Id = Annotated[str, Field(min_length=1, max_length=128)]
Version = Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$", max_length=64)]
# Device labels, the same rules wherever they are set (enrollment, the API, tokens, selectors).
LabelKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, Field(max_length=128)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=32)]


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Message(BaseModel):
    """Base of every wire model: frozen, strict about unknown fields, versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1


class UpdateState(StrEnum):
    """Where a model's update stands on the agent (see agent.updates)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    ACTIVE = "active"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


class CommandName(StrEnum):
    """Commands an agent obeys."""

    PING = "ping"
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    RELOAD = "reload"
    SET_CONFIG = "set-config"
    DIAGNOSTICS = "diagnostics"
    RESTART = "restart"


class DesiredModel(BaseModel):
    """One model a device should run: a version and where its signed manifest lives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Version
    manifest_url: str = Field(min_length=1, max_length=2048)
    manifest_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class DesiredState(Message):
    """What the hub wants a device to run (retained on devices/{id}/desired)."""

    kind: Literal["desired_state"] = "desired_state"
    device_id: Id
    revision: int = Field(
        ge=0,
        description="grows with every change; the agent reports the one it applied and ignores one older than it has seen",
    )
    models: dict[str, DesiredModel] = Field(default_factory=dict, max_length=64)
    config: dict[str, Any] = Field(default_factory=dict, description="agent settings to apply (set-config keys)")
    issued_at: datetime = Field(default_factory=utcnow)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, DesiredModel]) -> dict[str, DesiredModel]:
        for name in value:
            validate_id(name, "model name")
        return value


class ModelStatus(BaseModel):
    """The state of one model name on a device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    active: Version | None = None
    previous: Version | None = None
    target: TargetId | None = None
    desired: Version | None = None
    state: UpdateState = UpdateState.IDLE
    error: str | None = Field(default=None, max_length=4096)
    updated_at: datetime = Field(default_factory=utcnow)


class OutboxReport(BaseModel):
    """How the device's outbox fares: what waits, what was dropped, what the broker refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pending: int = Field(default=0, ge=0, description="telemetry points and messages not yet delivered")
    dropped: int = Field(default=0, ge=0, description="points dropped, oldest first, to keep the outbox bound")
    refused: int = Field(default=0, ge=0, description="deliveries the broker refused (kept and retried)")


class ReportedState(Message):
    """What a device runs now (retained on devices/{id}/reported)."""

    kind: Literal["reported_state"] = "reported_state"
    device_id: Id
    revision: int = Field(ge=0, description="the desired revision last applied")
    models: dict[str, ModelStatus] = Field(default_factory=dict, max_length=64)
    update_state: UpdateState = UpdateState.IDLE
    errors: list[str] = Field(default_factory=list, max_length=32)
    profile: DeviceProfile | None = None
    agent_version: str = Field(default="", max_length=64)
    grpc_port: int | None = Field(default=None, ge=0, le=65535, description="KServe v2 gRPC port, when served")
    outbox: OutboxReport | None = None
    reported_at: datetime = Field(default_factory=utcnow)


class Command(Message):
    """An order for one device (devices/{id}/commands); answered by a CommandResult."""

    kind: Literal["command"] = "command"
    id: Id
    device_id: Id
    name: CommandName
    args: dict[str, Any] = Field(default_factory=dict)
    issued_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        """Return True when the command's expiry has passed."""
        return self.expires_at is not None and (now or utcnow()) >= self.expires_at


class CommandResult(Message):
    """The answer to a Command (devices/{id}/results)."""

    kind: Literal["command_result"] = "command_result"
    id: Id
    device_id: Id
    ok: bool
    output: dict[str, Any] | None = None
    error: str | None = Field(default=None, max_length=4096)
    finished_at: datetime = Field(default_factory=utcnow)


class TelemetryPoint(BaseModel):
    """One measurement; (device, seq) identifies it, so ingest is idempotent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0)
    ts: datetime
    name: str = Field(min_length=1, max_length=128)
    value: float
    labels: dict[str, str] = Field(default_factory=dict, max_length=16)


class TelemetryBatch(Message):
    """Points from one device in sequence order (devices/{id}/telemetry); at least once."""

    kind: Literal["telemetry"] = "telemetry"
    device_id: Id
    points: list[TelemetryPoint] = Field(min_length=1, max_length=5000)

    @property
    def first_seq(self) -> int:
        """Return the sequence number of the first point."""
        return self.points[0].seq


class Presence(Message):
    """Whether a device is connected (retained on devices/{id}/online; also the last will)."""

    kind: Literal["presence"] = "presence"
    device_id: Id
    online: bool
    agent_version: str = Field(default="", max_length=64)
    ts: datetime = Field(default_factory=utcnow)


class Release(Message):
    """A published model version (retained on models/{name}/releases)."""

    kind: Literal["release"] = "release"
    name: Id
    version: Version
    manifest_url: str = Field(min_length=1, max_length=2048)
    manifest_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    published_at: datetime = Field(default_factory=utcnow)


AnyMessage = Annotated[
    DesiredState | ReportedState | Command | CommandResult | TelemetryBatch | Presence | Release,
    Field(discriminator="kind"),
]


class EnrollRequest(BaseModel):
    """Body of ``POST /enroll``: an enrollment token and the device's facts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str = Field(min_length=1, max_length=256)
    name: str | None = Field(default=None, min_length=1, max_length=128)
    labels: Labels = Field(default_factory=dict)
    profile: DeviceProfile = Field(default_factory=DeviceProfile)
    agent_version: str = Field(default="", max_length=64)
    csr: str | None = Field(
        default=None,
        max_length=8192,
        description="PEM certificate request for a device certificate (mutual TLS); the key never leaves the device",
    )


class EnrollResponse(BaseModel):
    """Answer to ``POST /enroll``: the device's identity and how to reach the hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: Id
    device_token: str = Field(min_length=16, description="HTTP bearer token")
    mqtt_host: str
    mqtt_port: int = Field(ge=1, le=65535)
    mqtt_tls: bool = False
    mqtt_username: str
    mqtt_password: str
    signing_public_key: str = Field(description="base64 raw Ed25519 public key that signs manifests")
    hub_url: str
    labels: dict[str, str] = Field(default_factory=dict)
    device_certificate: str | None = Field(
        default=None,
        description="PEM certificate (CN = device id) for the CSR; mqtt_port is then the broker's certificate listener",
    )

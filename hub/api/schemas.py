"""Request and response bodies of the hub's REST API (wire models for devices live in shared/)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hub.config import parse_rate_limit
from hub.models import ApiKeyBase, AuditEventBase, CommandBase, EnrollmentTokenBase, Role, TelemetryPointBase
from shared.messages import CommandName, DesiredState, LabelKey, Labels, ReportedState

__all__ = [
    "ID_PATTERN",
    "AliasSet",
    "ApiKeyCreate",
    "ApiKeyCreated",
    "ApiKeyPublic",
    "ArtifactPublic",
    "AuditEventPublic",
    "BucketPublic",
    "CommandCreate",
    "CommandPublic",
    "ConfigUpdate",
    "DeployRequest",
    "DevicePublic",
    "EnrollmentTokenCreate",
    "EnrollmentTokenCreated",
    "EnrollmentTokenPublic",
    "LabelsUpdate",
    "ModelCreate",
    "ModelPublic",
    "TelemetryPointPublic",
    "TelemetryResponse",
    "VersionPublic",
]

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiKeyCreate(_Body):
    """A new API key."""

    name: str = Field(min_length=1, max_length=128)
    role: Role
    rate_limit: str | None = Field(default=None, description="overrides the hub-wide limit, such as 100/hour")

    @field_validator("rate_limit")
    @classmethod
    def _limit(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)
        return value


class ApiKeyPublic(ApiKeyBase):
    """An API key as listed (never its secret)."""

    id: int
    role: Role  # stored as its value; shown as the enum


class ApiKeyCreated(ApiKeyPublic):
    """A created API key; `key` is shown this once."""

    key: str


class EnrollmentTokenCreate(_Body):
    """A new enrollment token."""

    max_uses: int = Field(default=1, ge=1, le=1_000_000)
    expires_in_s: int | None = Field(default=86400, ge=1, le=10 * 365 * 86400, description="None: never expires")
    labels: Labels = Field(default_factory=dict, description="applied to every device it enrolls")
    device_label_keys: list[LabelKey] | None = Field(
        default=None,
        max_length=32,
        description="label keys a device may set itself; default: any but the protected keys and those of rollout selectors",
    )
    note: str = Field(default="", max_length=256)


class EnrollmentTokenPublic(EnrollmentTokenBase):
    """An enrollment token as listed (never its secret)."""

    id: int


class EnrollmentTokenCreated(EnrollmentTokenPublic):
    """A created enrollment token; `token` is shown this once."""

    token: str
    enroll_command: str = Field(description="the `autodl-agent enroll` line for it, pinning the hub's CA")


class ModelCreate(_Body):
    """A new model name."""

    name: str = Field(pattern=ID_PATTERN)
    task: str = Field(default="", max_length=64)
    description: str = Field(default="", max_length=2048)


class ModelPublic(BaseModel):
    """A model with its versions (newest first) and aliases."""

    name: str
    task: str
    description: str
    created_at: datetime
    versions: list[str]
    aliases: dict[str, str]


class ArtifactPublic(BaseModel):
    """A stored file of a version."""

    target: str | None
    file: str
    size: int
    sha256: str
    url: str


class VersionPublic(BaseModel):
    """A model version with its lineage and files."""

    model: str
    version: str
    status: str
    task: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    dataset_hash: str | None
    parent_version: str | None
    manifest_url: str
    manifest_sha256: str
    published_by: str
    created_at: datetime
    deprecated_at: datetime | None
    artifacts: list[ArtifactPublic]


class AliasSet(_Body):
    """Point an alias at a version (or at another alias)."""

    version: str = Field(min_length=1, max_length=64)


class DevicePublic(BaseModel):
    """A device: facts, presence, and desired next to reported state."""

    id: str
    name: str
    labels: dict[str, str]
    profile: dict[str, Any]
    agent_version: str
    online: bool
    last_seen: datetime | None
    desired: DesiredState | None
    reported: ReportedState | None
    decommissioned: bool
    created_at: datetime


class LabelsUpdate(_Body):
    """Labels to set and label keys to remove."""

    set: Labels = Field(default_factory=dict)
    remove: list[LabelKey] = Field(default_factory=list, max_length=32)


class DeployRequest(_Body):
    """The version (or alias) a device should run."""

    version: str = Field(min_length=1, max_length=64)


class ConfigUpdate(_Body):
    """Agent settings to put in a device's desired state (replaces the previous set)."""

    config: dict[str, Any] = Field(max_length=64)


class CommandCreate(_Body):
    """A command for one device (`device_id`) or for every device matching `selector`."""

    name: CommandName
    device_id: str | None = Field(default=None, pattern=ID_PATTERN)
    selector: Labels | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_s: int = Field(default=3600, ge=1, le=30 * 86400)


class CommandPublic(CommandBase):
    """A command and, once answered, its result."""


class TelemetryPointPublic(TelemetryPointBase):
    """One stored measurement."""


class BucketPublic(BaseModel):
    """A downsampled step of one metric."""

    start: datetime
    name: str
    count: int
    mean: float
    min: float
    max: float


class TelemetryResponse(BaseModel):
    """Raw points, or buckets when a step was asked for."""

    points: list[TelemetryPointPublic] = Field(default_factory=list)
    buckets: list[BucketPublic] = Field(default_factory=list)


class AuditEventPublic(AuditEventBase):
    """One recorded change."""

    id: int

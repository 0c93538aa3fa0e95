"""The hub's tables (SQLModel). The schema itself is created by `hub.migrations`.

JSON columns are not mutation-tracked: assign a new dict or list to change one
(``device.labels = {**device.labels, "k": "v"}``), never edit it in place.
Timestamps are timezone-aware UTC on both SQLite and PostgreSQL (`UTCDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, LargeBinary, Text, UniqueConstraint
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = [
    "TelemetryPointBase",
    "EnrollmentTokenBase",
    "CommandBase",
    "AuditEventBase",
    "ApiKeyBase",
    "ApiKey",
    "TelemetryRollup",
    "UiSession",
    "Artifact",
    "AuditEvent",
    "CapturedItem",
    "Command",
    "CommandStatus",
    "DeploymentHistory",
    "Device",
    "EnrollmentToken",
    "Model",
    "ModelAlias",
    "ModelVersion",
    "Role",
    "Rollout",
    "RolloutDevice",
    "RolloutEvent",
    "SigningKey",
    "TelemetryPoint",
    "TrainingData",
    "TrainingJob",
    "UTCDateTime",
    "VersionStatus",
    "utcnow",
]

BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER keys


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A datetime stored as UTC and always read back timezone-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Role(StrEnum):
    """What an API key may do; each role includes the ones below it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class VersionStatus(StrEnum):
    """Lifecycle of a model version."""

    ACTIVE = "active"
    DEPRECATED = "deprecated"


class CommandStatus(StrEnum):
    """Lifecycle of a command: pending -> sent -> succeeded | failed, or expired."""

    PENDING = "pending"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


class Model(SQLModel, table=True):
    """A model name; its versions hold the artifacts."""

    __tablename__ = "model"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True, index=True)
    task: str = Field(default="", max_length=64)
    description: str = Field(default="", max_length=2048)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ModelVersion(SQLModel, table=True):
    """One published version: its signed manifest, metrics and lineage."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="model.id", index=True)
    version: str = Field(max_length=64)
    status: str = Field(default=VersionStatus.ACTIVE.value, max_length=16)
    task: str = Field(default="", max_length=64)
    manifest: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    signed_manifest: str = Field(sa_type=Text)
    manifest_sha256: str = Field(max_length=64)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    lineage: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    dataset_hash: str | None = Field(default=None, max_length=128)
    training_config: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    parent_version: str | None = Field(default=None, max_length=64)
    published_by: str = Field(default="", max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    deprecated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ModelAlias(SQLModel, table=True):
    """A movable name for a version (``stable``, ``canary``...); ``latest`` is computed."""

    __tablename__ = "model_alias"
    __table_args__ = (UniqueConstraint("model_id", "alias", name="uq_model_alias"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="model.id", index=True)
    alias: str = Field(max_length=64)
    version_id: int = Field(foreign_key="model_version.id")
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Artifact(SQLModel, table=True):
    """A file of a version (a variant for a target, or the tokenizer), stored by sha256."""

    __tablename__ = "artifact"

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="model_version.id", index=True)
    target: str | None = Field(default=None, max_length=32)
    file: str = Field(max_length=256)
    size: int = Field(sa_type=BigInteger)
    sha256: str = Field(max_length=64, index=True)


class Device(SQLModel, table=True):
    """An enrolled device; its id is also its MQTT username."""

    __tablename__ = "device"

    id: str = Field(primary_key=True, max_length=128)
    name: str = Field(default="", max_length=128)
    labels: dict[str, str] = Field(default_factory=dict, sa_type=JSON)
    profile: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    agent_version: str = Field(default="", max_length=64)
    online: bool = Field(default=False, index=True)
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)
    desired: dict[str, Any] | None = Field(default=None, sa_type=JSON, description="shared DesiredState")
    reported: dict[str, Any] | None = Field(default=None, sa_type=JSON, description="shared ReportedState")
    token_hash: str | None = Field(default=None, max_length=64, unique=True)
    mqtt_password_hash: str | None = Field(default=None, max_length=64)
    # Hex serial of its certificate (mutual TLS); decommissioning puts it on the CRL (hub.tls).
    certificate_serial: str | None = Field(default=None, max_length=64)
    enrollment_token_id: int | None = Field(default=None, foreign_key="enrollment_token.id")
    decommissioned: bool = Field(default=False, index=True)
    decommissioned_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class EnrollmentTokenBase(SQLModel):
    """An enrollment token's fields the API shows (`hub.api.schemas.EnrollmentTokenPublic`)."""

    note: str = Field(default="", max_length=256)
    labels: dict[str, str] = Field(default_factory=dict, sa_type=JSON)
    # The label keys a device may set itself; None: any but the protected ones (hub.fleet.devices).
    device_label_keys: list[str] | None = Field(default=None, sa_type=JSON)
    max_uses: int = Field(default=1, ge=1)
    uses: int = Field(default=0)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class EnrollmentToken(EnrollmentTokenBase, table=True):
    """A secret that lets up to `max_uses` devices enroll before `expires_at`."""

    __tablename__ = "enrollment_token"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    created_by: str = Field(default="", max_length=128)


class ApiKeyBase(SQLModel):
    """An API key's fields the API shows (`hub.api.schemas.ApiKeyPublic`): never its hash."""

    name: str = Field(max_length=128)
    role: str = Field(max_length=16)
    rate_limit: str | None = Field(default=None, max_length=32)
    revoked: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ApiKey(ApiKeyBase, table=True):
    """A hashed API key with a role; `rate_limit` overrides the hub-wide limit."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    key_hash: str = Field(max_length=64, unique=True)
    created_by: str = Field(default="", max_length=128)


class UiSession(SQLModel, table=True):
    """A dashboard session: a random id (only its hash stored) bound to one API key, with its CSRF token."""

    __tablename__ = "ui_session"

    id_hash: str = Field(primary_key=True, max_length=64)
    api_key_id: int = Field(foreign_key="api_key.id", index=True)
    csrf: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)


class CommandBase(SQLModel):
    """A command's fields, as stored and as the API shows them (`hub.api.schemas.CommandPublic`)."""

    id: str = Field(primary_key=True, max_length=128)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    name: str = Field(max_length=32)
    args: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    status: str = Field(default=CommandStatus.PENDING.value, max_length=16, index=True)
    result: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    error: str | None = Field(default=None, max_length=4096)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Command(CommandBase, table=True):
    """A command sent to one device and, once it answers, its result."""

    __tablename__ = "command"


class TelemetryPointBase(SQLModel):
    """A telemetry point's fields the API shows (`hub.api.schemas.TelemetryPointPublic`)."""

    device_id: str = Field(max_length=128)
    seq: int = Field(sa_type=BigInteger)
    ts: datetime = Field(sa_type=UTCDateTime)
    name: str = Field(max_length=128)
    value: float
    labels: dict[str, str] = Field(default_factory=dict, sa_type=JSON)


class TelemetryPoint(TelemetryPointBase, table=True):
    """One measurement of one device; (device_id, seq) is unique, so ingest is idempotent."""

    __tablename__ = "telemetry_point"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
        Index("ix_telemetry_device_name_ts", "device_id", "name", "ts"),
    )

    id: int | None = Field(default=None, sa_type=BigId, primary_key=True)


class TelemetryRollup(SQLModel, table=True):
    """Hourly history of one device's metric, kept after its raw points are pruned (hub.fleet.retention)."""

    __tablename__ = "telemetry_rollup"
    __table_args__ = (UniqueConstraint("device_id", "name", "hour", name="uq_telemetry_rollup"),)

    id: int | None = Field(default=None, sa_type=BigId, primary_key=True)
    device_id: str = Field(max_length=128, index=True)
    name: str = Field(max_length=128)
    hour: datetime = Field(sa_type=UTCDateTime)
    count: int = Field(sa_type=BigInteger)
    sum: float
    min: float
    max: float


class AuditEventBase(SQLModel):
    """An audit event's fields, as stored and as the API shows them (`hub.api.schemas.AuditEventPublic`)."""

    id: int | None = Field(default=None, sa_type=BigId, primary_key=True)
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    actor: str = Field(max_length=128)
    action: str = Field(max_length=64, index=True)
    subject: str = Field(default="", max_length=256)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class AuditEvent(AuditEventBase, table=True):
    """A record of one change: who did what to which thing."""

    __tablename__ = "audit_event"


class Rollout(SQLModel, table=True):
    """A deployment of one model version to a set of devices, step by step (hub.rollouts.engine)."""

    __tablename__ = "rollout"

    id: str = Field(primary_key=True, max_length=64)
    model: str = Field(max_length=128, index=True)
    version: str = Field(max_length=64)
    baseline_version: str | None = Field(default=None, max_length=64)
    spec: dict[str, Any] = Field(default_factory=dict, sa_type=JSON, description="hub.rollouts.spec.RolloutSpec")
    state: str = Field(max_length=16, index=True)
    step: int = 0
    step_started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    reason: str = Field(default="", max_length=4096)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class RolloutDevice(SQLModel, table=True):
    """One device of a rollout: its cohort rank, what it ran before and what it was given."""

    __tablename__ = "rollout_device"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id", name="uq_rollout_device"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(foreign_key="rollout.id", index=True, max_length=64)
    device_id: str = Field(max_length=128, index=True)
    rank: str = Field(max_length=64)
    previous_version: str | None = Field(default=None, max_length=64)
    assigned_version: str | None = Field(default=None, max_length=64)
    moved_at_step: int | None = None
    state: str = Field(default="pending", max_length=16)
    error: str | None = Field(default=None, max_length=4096)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RolloutEvent(SQLModel, table=True):
    """One entry of a rollout's timeline."""

    __tablename__ = "rollout_event"

    id: int | None = Field(default=None, sa_type=BigId, primary_key=True)
    rollout_id: str = Field(foreign_key="rollout.id", index=True, max_length=64)
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    kind: str = Field(max_length=32)
    step: int = 0
    message: str = Field(default="", max_length=4096)
    actor: str = Field(default="", max_length=128)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class DeploymentHistory(SQLModel, table=True):
    """Which version of a model a device was told to run or reported running, and when."""

    __tablename__ = "deployment_history"
    __table_args__ = (Index("ix_deployment_history_device_model_ts", "device_id", "model", "ts"),)

    id: int | None = Field(default=None, sa_type=BigId, primary_key=True)
    device_id: str = Field(max_length=128)
    model: str = Field(max_length=128)
    version: str | None = Field(default=None, max_length=64)
    event: str = Field(max_length=16, description="desired | active | rolled_back")
    rollout_id: str | None = Field(default=None, max_length=64, index=True)
    actor: str = Field(default="", max_length=128)
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class TrainingData(SQLModel, table=True):
    """An uploaded data archive (tar.gz) for training jobs; in the database so any worker reads it."""

    __tablename__ = "training_data"

    id: str = Field(primary_key=True, max_length=64, description="the archive's sha256")
    size: int = Field(sa_type=BigInteger)
    content: bytes = Field(sa_type=LargeBinary)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class TrainingJob(SQLModel, table=True):
    """A training job: queued until a worker claims it, then running under that worker's heartbeats."""

    __tablename__ = "training_job"
    __table_args__ = (Index("ix_training_job_status_created", "status", "created_at"),)

    id: str = Field(primary_key=True, max_length=16)
    model: str = Field(max_length=128)
    task: str = Field(sa_type=Text, description="the task file (YAML)")
    base_dir: str | None = Field(default=None, max_length=4096)
    data_id: str | None = Field(default=None, foreign_key="training_data.id", max_length=64)
    dry_run: bool = False
    actor: str = Field(default="", max_length=128)
    resource: str = Field(default="cpu", max_length=8, description="cpu | cuda")
    status: str = Field(default="queued", max_length=16)
    note: str = Field(default="", max_length=1024, description="why a queued job waits")
    worker: str | None = Field(default=None, max_length=128)
    attempts: int = 0
    losses: int = 0
    cancel_requested: bool = False
    study_name: str | None = Field(default=None, max_length=128, description="a search other workers may join")
    helpers: int = 0
    progress: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    log: list[str] = Field(default_factory=list, sa_type=JSON)
    result: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    error: str | None = Field(default=None, sa_type=Text)
    version: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class CapturedItem(SQLModel, table=True):
    """A hard example a device captured: its raw input (a file in the artifact store), the model's answer, a label."""

    __tablename__ = "captured_item"
    __table_args__ = (Index("ix_captured_item_model_created", "model", "created_at"),)

    id: str = Field(primary_key=True, max_length=64, description="sha256 of content + model + version")
    model: str = Field(max_length=128)
    version: str = Field(max_length=64)
    device_id: str = Field(max_length=128, index=True)
    reason: str = Field(max_length=32)
    content_type: str = Field(max_length=128)
    content_sha256: str = Field(max_length=64)
    size: int
    outputs: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    prediction: str | None = Field(default=None, max_length=256)
    label: str | None = Field(default=None, max_length=256)
    labelled_by: str | None = Field(default=None, max_length=128)
    labelled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    captured_at: datetime = Field(sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class SigningKey(SQLModel, table=True):
    """A manifest-signing key the hub has used: its public half and the statements that chain it.

    The private key lives in the signing key file only (one at a time); this table holds what
    devices need to follow a rotation (``shared.keys``): the endorsement that chains a key to
    the one before it (none for the first key) and, once retired, the signed retirement.
    """

    __tablename__ = "signing_key"

    key_id: str = Field(primary_key=True, max_length=16)
    public_key: str = Field(max_length=64)
    previous_key_id: str | None = Field(default=None, max_length=16)
    endorsement: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    created_by: str = Field(default="", max_length=128)
    retired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    retirement: dict[str, Any] | None = Field(default=None, sa_type=JSON)

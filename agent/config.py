"""Agent settings (env ``AUTODL_AGENT_*`` and flags) and the enrolled identity file.

Settings are a plain pydantic model that fills the fields it is not given from the
environment: a settings library would cost the daemon 5 MB of RSS for this one loop.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import FatalError, NotEnrolledError
from shared.capture import CapturePolicy
from shared.manifest import Batching
from shared.messages import EnrollResponse, utcnow

__all__ = [
    "AgentSettings",
    "Identity",
    "default_state_dir",
    "delete_identity",
    "load_identity",
    "save_identity",
]

IDENTITY_FILE = "identity.json"
ENV_PREFIX = "AUTODL_AGENT_"


def default_state_dir() -> Path:
    """Return /var/lib/autodl-agent for root, else the user's data dir."""
    if os.geteuid() == 0:
        return Path("/var/lib/autodl-agent")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "autodl-agent"


class AgentSettings(BaseModel):
    """Everything the agent can be told; tests shorten the intervals instead of sleeping.

    A field not passed in comes from ``AUTODL_AGENT_<FIELD>`` when that is set (flags win).
    """

    model_config = ConfigDict(extra="ignore")

    state_dir: Path = Field(default_factory=default_state_dir)
    host: str = Field(default="127.0.0.1", description="local API bind address: loopback unless opened on purpose")
    port: int = Field(default=8500, ge=0, le=65535)
    api_token: str | None = Field(default=None, min_length=16, description="bearer token the local API requires")
    log_level: str = "INFO"
    # Local API (issue "Serving")
    grpc_port: int | None = Field(default=None, ge=0, le=65535, description="KServe v2 gRPC; needs the grpc extra")
    http_workers: int = Field(default=8, ge=1, le=256, description="requests run at once; more wait in the queue")
    http_queue: int = Field(default=64, ge=0, description="requests waiting for a worker; past it: 503")
    max_body_mb: float = Field(default=32.0, gt=0, description="larger bodies are refused before they are read")
    body_budget_mb: float = Field(default=96.0, gt=0, description="bodies in flight at once; past it: 413, retry")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a request head must arrive within this")
    body_timeout_s: float = Field(default=30.0, gt=0, description="a request body must arrive within this")
    http_keepalive_s: float = Field(default=75.0, gt=0, description="idle keep-alive connections closed after this")
    http_busy_poll_us: int = Field(
        default=300, ge=0, le=10_000, description="after an answer on the selector, poll this long before sleeping"
    )
    batching: dict[str, Batching] = Field(
        default_factory=dict, description="dynamic batching per model, over the manifest's (max_batch_size 1: off)"
    )
    # Trust (agent.tls)
    ca_file: Path | None = Field(
        default=None, description="CA of the hub and broker; default: the one pinned at enrollment, else the system's"
    )
    insecure: bool = Field(default=False, description="allow plain HTTP and MQTT to a hub beyond loopback")
    # MQTT session
    keepalive_s: int = Field(default=30, ge=1)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0)
    backoff_min_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    # Downloads and updates
    http_timeout_s: float = Field(default=30.0, gt=0)
    download_chunk_bytes: int = Field(default=256 * 1024, ge=1024)
    download_retries: int = Field(default=5, ge=0)
    retry_min_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)
    disk_reserve_mb: int = Field(default=64, ge=0)
    keep_versions: int = Field(default=2, ge=1, description="versions per model kept in the cache")
    # Runtime
    intra_op_threads: int | None = Field(default=None, ge=1, description="default: physical cores")
    warmup_runs: int = Field(default=2, ge=0)
    malloc_arena_max: int = Field(
        default=2, ge=0, description="glibc heap arenas (agent.runtime.tune_heap); 0: glibc's"
    )
    malloc_mmap_threshold_kb: int = Field(
        default=1024,
        ge=0,
        le=32768,
        description="buffers this large are mapped, returned on free; 0: glibc's dynamic one",
    )
    # Text generation (agent.textgen): sequences in flight per model, the queue behind them, time per request
    generation_max_sequences: int | None = Field(
        default=None, ge=1, description="default: from free memory and the model's KV bytes per token"
    )
    generation_queue: int = Field(default=8, ge=0, description="requests waiting for a sequence; more get 503")
    generation_timeout_s: float = Field(default=300.0, gt=0, description="a generation ends after this long")
    generation_backend: Literal["loop", "genai"] = Field(
        default="loop", description="genai: ONNX Runtime GenAI (extra `genai`) where installed, else the own loop"
    )
    generation_batching: bool = Field(
        default=True, description="the own loop decodes the sequences in flight as one batch, where the graph allows"
    )
    # Outbox, telemetry and heartbeat (issue "Agent offline")
    outbox_max_mb: float = Field(default=64.0, gt=0, description="bound of the on-disk outbox")
    outbox_batch: int = Field(default=1000, ge=1, le=5000, description="telemetry points per MQTT message")
    publish_timeout_s: float = Field(default=10.0, gt=0, description="wait for a PUBACK before resending")
    telemetry_interval_s: float = Field(default=10.0, gt=0, description="aggregation period of telemetry points")
    heartbeat_s: float = Field(default=30.0, gt=0, description="presence is re-published this often")
    telemetry_max_points_s: float = Field(
        default=100.0, gt=0, description="send no faster (the hub's per-device quota); the rest waits in the outbox"
    )
    telemetry_burst_s: float = Field(default=600.0, gt=0, description="seconds of that rate sent at once")
    # Commands
    command_rate: int = Field(default=30, ge=1, description="commands accepted per minute; more are refused")
    # Self-healing
    health_window_s: float = Field(default=300.0, ge=0, description="watch a new version this long, then commit")
    health_min_requests: int = Field(default=20, ge=1, description="requests needed before judging a version")
    health_latency_ratio: float = Field(default=2.0, gt=1, description="roll back past previous p95 x this")
    health_latency_min_ms: float = Field(default=5.0, ge=0, description="...and past previous p95 + this")
    health_error_delta: float = Field(default=0.05, ge=0, description="roll back past previous error rate + this")
    watchdog_stuck_s: float = Field(default=60.0, gt=0, description="a request running this long means stuck")
    watchdog_errors: int = Field(default=20, ge=1, description="consecutive failures that reload the session")
    capture: dict[str, CapturePolicy] = Field(
        default_factory=dict, max_length=64, description="hard-example capture per model (off unless set)"
    )
    capture_interval_s: float = Field(default=10.0, gt=0, description="how often captured items are uploaded")

    @model_validator(mode="before")
    @classmethod
    def _environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        env = {
            name: os.environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if name not in data and ENV_PREFIX + name.upper() in os.environ
        }
        return {**env, **data}

    @property
    def identity_path(self) -> Path:
        """Return the path of the identity file."""
        return self.state_dir / IDENTITY_FILE

    @property
    def db_path(self) -> Path:
        """Return the path of the agent's SQLite store."""
        return self.state_dir / "agent.db"

    @property
    def cache_dir(self) -> Path:
        """Return the content-addressed artifact cache."""
        return self.state_dir / "cache"


class Identity(BaseModel):
    """What enrollment gave this device; secret, so stored with mode 0600."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    device_token: str
    mqtt_host: str
    mqtt_port: int
    mqtt_tls: bool = False
    mqtt_username: str
    mqtt_password: str
    signing_public_key: str
    hub_url: str
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    enrolled_at: datetime = Field(default_factory=utcnow)
    client_certificate: bool = Field(default=False, description="MQTT with the device certificate (agent.tls)")

    @classmethod
    def from_response(cls, response: EnrollResponse, name: str | None) -> Identity:
        """Build the identity from the hub's enrollment answer (the certificate is kept in its own file)."""
        fields = response.model_dump(exclude={"device_certificate"})
        return cls(name=name, client_certificate=response.device_certificate is not None, **fields)


def save_identity(settings: AgentSettings, identity: Identity) -> Path:
    """Write the identity atomically with mode 0600."""
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = settings.identity_path
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(identity.model_dump_json(indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def load_identity(settings: AgentSettings) -> Identity:
    """Read the identity; raise NotEnrolledError when there is none."""
    path = settings.identity_path
    try:
        raw = path.read_text()
    except FileNotFoundError as exc:
        raise NotEnrolledError(f"not enrolled: no {path}; run `autodl-agent enroll --hub URL --token T`") from exc
    try:
        return Identity.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise FatalError(f"identity file {path} is unreadable: {exc}") from exc


def delete_identity(settings: AgentSettings) -> bool:
    """Remove the identity file; return False when there was none."""
    try:
        settings.identity_path.unlink()
    except FileNotFoundError:
        return False
    return True

"""The hub's settings: one pydantic-settings class, read from ``AUTODL_HUB_*`` variables.

Everything with a path defaults to a place inside the data dir, so ``--data-dir`` (or
``AUTODL_HUB_DATA_DIR``) is the only thing a single-machine hub needs.

At scale (several stateless hub replicas)::

    AUTODL_HUB_DATABASE_URL=postgresql+psycopg://user:pw@db/autodl
    AUTODL_HUB_ARTIFACT_DIR=/shared/artifacts        # one volume for every replica
    AUTODL_HUB_PUBLIC_URL=https://hub.example.com    # what agents are told
    AUTODL_HUB_MQTT_URL=mqtts://mqtt.example.com:8883
    AUTODL_HUB_MQTT_USERNAME=autodl-hub  AUTODL_HUB_MQTT_PASSWORD=...
    AUTODL_HUB_MQTT_PUBLIC_HOST=mqtt.example.com     # AUTODL_HUB_MQTT_PUBLIC_PORT if it differs
    AUTODL_HUB_SIGNING_KEY_PATH=/secrets/signing_key.pem   # the same key on every replica

Broker set-up (dynamic security on Mosquitto, EMQX rules) is in `hub.broker.admin`.
Rate limits are kept per replica, in memory.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["HubSettings", "default_data_dir", "get_settings", "parse_rate_limit"]

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")
_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def parse_rate_limit(text: str) -> tuple[int, int]:
    """Parse ``"100/hour"`` into (100, 3600); raise ValueError otherwise."""
    match = _RATE_RE.match(text)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"rate limit {text!r}: use N/second, N/minute, N/hour or N/day with N >= 1")
    return int(match.group(1)), _PERIODS[match.group(2)]


def default_data_dir() -> Path:
    """Return /var/lib/autodl-hub for root, else the per-user data dir (XDG)."""
    if os.name == "posix" and os.geteuid() == 0:
        return Path("/var/lib/autodl-hub")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "autodl-hub"


class HubSettings(BaseSettings):
    """Settings of one hub process."""

    model_config = SettingsConfigDict(env_prefix="AUTODL_HUB_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = Field(default="", description="default sqlite:///<data_dir>/hub.db")
    artifact_dir: Path | None = Field(default=None, description="default <data_dir>/artifacts")
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str = Field(default="", description="the URL agents use; default http://127.0.0.1:<port>")
    mqtt_url: str | None = Field(default=None, description="external broker mqtt://host:port; None = embedded")
    mqtt_port: int = Field(default=1883, ge=1, le=65535, description="port of the embedded broker")
    mqtt_public_host: str = Field(default="127.0.0.1", description="the MQTT host agents are told")
    mqtt_public_port: int | None = Field(default=None, ge=1, le=65535, description="default: the broker's port")
    mqtt_tls: bool = False
    mqtt_username: str = "autodl-hub"
    mqtt_password: str | None = Field(default=None, description="default: generated into the data dir")
    signing_key_path: Path | None = Field(default=None, description="default <data_dir>/signing_key.pem")
    rate_limit: str = Field(default="1000/minute", description="per API key, such as 100/hour")
    enroll_rate_limit: str = Field(default="600/minute", description="POST /enroll per client address")
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1)
    heartbeat_timeout_s: float = Field(default=90.0, gt=0)
    telemetry_batch_size: int = Field(default=500, ge=1)
    telemetry_flush_s: float = Field(default=1.0, gt=0)
    command_ttl_s: int = Field(default=3600, ge=1)
    metrics_public: bool = Field(default=True, description="serve /metrics without a key (for Prometheus)")

    @field_validator("rate_limit", "enroll_rate_limit")
    @classmethod
    def _valid_limit(cls, value: str) -> str:
        parse_rate_limit(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        # An empty environment variable means "use the default", not "the empty path".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and v == "" and k != "database_url")}
        return data

    @model_validator(mode="after")
    def _derive_paths(self) -> HubSettings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'hub.db'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        if self.signing_key_path is None:
            self.signing_key_path = self.data_dir / "signing_key.pem"
        if not self.public_url:
            self.public_url = f"http://127.0.0.1:{self.port}"
        self.public_url = self.public_url.rstrip("/")
        return self

    @property
    def artifacts(self) -> Path:
        """Return the artifact dir (always set after validation)."""
        assert self.artifact_dir is not None
        return self.artifact_dir

    @property
    def signing_key(self) -> Path:
        """Return the signing key path (always set after validation)."""
        assert self.signing_key_path is not None
        return self.signing_key_path

    @property
    def agent_mqtt_port(self) -> int:
        """Return the MQTT port agents are told: explicit, else the external URL's, else the embedded one."""
        if self.mqtt_public_port is not None:
            return self.mqtt_public_port
        if self.mqtt_url:
            parts = urlsplit(self.mqtt_url if "://" in self.mqtt_url else f"mqtt://{self.mqtt_url}")
            return parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)
        return self.mqtt_port

    @property
    def api_rate(self) -> tuple[int, int]:
        """Return the per-key limit as (requests, period seconds)."""
        return parse_rate_limit(self.rate_limit)

    @property
    def enroll_rate(self) -> tuple[int, int]:
        """Return the enrollment limit as (requests, period seconds)."""
        return parse_rate_limit(self.enroll_rate_limit)


@lru_cache
def get_settings() -> HubSettings:
    """Return the settings from the environment, read once."""
    return HubSettings()

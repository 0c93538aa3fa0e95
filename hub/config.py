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
    AUTODL_HUB_TLS_CERT_FILE=/secrets/tls.crt  AUTODL_HUB_TLS_KEY_FILE=/secrets/tls.key  # the same on every replica

Transport: a hub that listens beyond loopback serves HTTPS and MQTT over TLS (`tls_enabled`,
certificates from `hub.tls`); plain text there needs ``insecure``. On loopback it stays plain
unless ``tls`` asks for it.

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

from shared.tls import is_loopback

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
    public_url: str = Field(default="", description="the URL agents use; default http(s)://127.0.0.1:<port>")
    tls: bool = Field(default=False, description="HTTPS and MQTT over TLS on loopback too (beyond it: always)")
    insecure: bool = Field(default=False, description="plain HTTP and MQTT on addresses beyond loopback")
    tls_cert_file: Path | None = Field(
        default=None, description="server certificate (PEM); default <data_dir>/tls/server.pem"
    )
    tls_key_file: Path | None = Field(default=None, description="its key (PEM); default <data_dir>/tls/server.key")
    tls_ca_file: Path | None = Field(default=None, description="the CA agents pin; default <data_dir>/tls/ca.pem")
    tls_sans: list[str] = Field(default_factory=list, description="more names/addresses for the server certificate")
    mqtt_url: str | None = Field(
        default=None, description="external broker mqtt://host:port or mqtts://; None = embedded"
    )
    mqtt_port: int = Field(default=1883, ge=1, le=65535, description="port of the embedded broker; TLS: default 8883")
    mqtt_public_host: str = Field(default="127.0.0.1", description="the MQTT host agents are told")
    mqtt_public_port: int | None = Field(default=None, ge=1, le=65535, description="default: the broker's port")
    mqtt_mtls_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="broker port for device certificates (mutual TLS); embedded with TLS: default mqtt_port + 1",
    )
    mqtt_ca_file: Path | None = Field(
        default=None, description="CA of an external mqtts:// broker; default: the system's"
    )
    mqtt_username: str = "autodl-hub"
    mqtt_password: str | None = Field(default=None, description="default: generated into the data dir")
    signing_key_path: Path | None = Field(default=None, description="default <data_dir>/signing_key.pem")
    rate_limit: str = Field(default="1000/minute", description="per API key, such as 100/hour")
    enroll_rate_limit: str = Field(default="600/minute", description="POST /enroll per client address")
    device_rate_limit: str = Field(default="600/minute", description="per device token")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses whose X-Forwarded-For / X-Forwarded-Proto are believed; default none",
    )
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1, description="model uploads, after authentication")
    max_json_bytes: int = Field(default=256 * 1024, ge=1024, description="any other request body")
    max_enroll_bytes: int = Field(default=64 * 1024, ge=1024, description="POST /enroll (unauthenticated)")
    header_timeout_s: float = Field(default=10.0, gt=0, description="time for a request line and its headers")
    body_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for the next piece of a body")
    protected_label_keys: list[str] = Field(
        default_factory=lambda: ["ring"],
        description="label keys a device may not set itself unless its token allows it (besides rollout selectors')",
    )
    telemetry_quota_points_s: float = Field(default=100.0, gt=0, description="telemetry points per second per device")
    telemetry_quota_bytes_s: float = Field(default=64 * 1024, gt=0, description="telemetry bytes per second per device")
    telemetry_quota_burst_s: float = Field(
        default=600.0, gt=0, description="seconds of quota a device may spend at once"
    )
    telemetry_retention_s: float = Field(default=30 * 86400, gt=0, description="raw points older than this are pruned")
    telemetry_max_points: int = Field(default=50_000_000, ge=1, description="raw points kept at most (oldest go first)")
    telemetry_prune_interval_s: float = Field(default=600.0, gt=0, description="how often retention runs")
    heartbeat_timeout_s: float = Field(default=90.0, gt=0)
    telemetry_batch_size: int = Field(default=500, ge=1)
    telemetry_flush_s: float = Field(default=1.0, gt=0)
    command_ttl_s: int = Field(default=3600, ge=1)
    metrics_public: bool = Field(default=True, description="serve /metrics without a key (for Prometheus)")
    job_heartbeat_s: float = Field(default=2.0, gt=0, description="how often a training worker reports")
    job_lost_after_s: float = Field(default=60.0, gt=0, description="a job silent this long lost its worker")
    job_poll_s: float = Field(default=1.0, gt=0, description="how often an idle worker looks for work")
    job_log_lines: int = Field(default=1000, ge=10, description="the last lines of a job's log that are kept")
    max_job_data_bytes: int = Field(default=64 * 1024**2, ge=1, description="largest data archive for a job")

    @field_validator("rate_limit", "enroll_rate_limit", "device_rate_limit")
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
        if self.tls and self.insecure:
            raise ValueError("tls and insecure contradict each other: choose one")
        if self.tls_enabled and "mqtt_port" not in self.model_fields_set:
            self.mqtt_port = 8883
        if not self.public_url:
            self.public_url = f"{'https' if self.tls_enabled else 'http'}://127.0.0.1:{self.port}"
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
    def tls_enabled(self) -> bool:
        """Return True when the hub serves HTTPS (and its embedded broker TLS): asked for, or
        listening beyond loopback without ``insecure``."""
        return self.tls or (not self.insecure and not is_loopback(self.host))

    @property
    def mqtt_tls(self) -> bool:
        """Return whether the broker speaks TLS: the one answer for the hub's own URL scheme and what agents are told."""
        if self.mqtt_url:
            return urlsplit(self.mqtt_url if "://" in self.mqtt_url else f"mqtt://{self.mqtt_url}").scheme in (
                "mqtts",
                "ssl",
            )
        return self.tls_enabled

    @property
    def tls_dir(self) -> Path:
        """Return where the hub keeps its CA and server certificate."""
        return self.data_dir / "tls"

    @property
    def tls_cert(self) -> Path:
        """Return the server certificate's path."""
        return self.tls_cert_file or self.tls_dir / "server.pem"

    @property
    def tls_key(self) -> Path:
        """Return the server key's path."""
        return self.tls_key_file or self.tls_dir / "server.key"

    @property
    def tls_ca(self) -> Path:
        """Return the path of the CA certificate agents pin."""
        return self.tls_ca_file or self.tls_dir / "ca.pem"

    @property
    def tls_crl(self) -> Path:
        """Return the path of the revoked device certificates (the broker reads it)."""
        return self.tls_dir / "crl.pem"

    @property
    def mtls_port(self) -> int | None:
        """Return the broker port where devices log in with their certificate, or None where there is none."""
        if self.mqtt_url:
            return self.mqtt_mtls_port  # an external broker: only where the operator made one
        if not self.tls_enabled:
            return None
        return self.mqtt_mtls_port or self.mqtt_port + 1

    @property
    def tls_ca_key(self) -> Path:
        """Return the path of the hub CA's key (absent when the operator brought the certificates)."""
        return self.tls_dir / "ca.key"

    def transport_problem(self) -> str | None:
        """Return why this hub would send plain text beyond loopback without ``insecure``, or None."""
        if self.insecure:
            return None
        url = urlsplit(self.public_url)
        if self.tls_enabled and url.scheme != "https":
            return f"the hub serves HTTPS but its public URL {self.public_url} is not https://: fix --public-url"
        if url.scheme == "http" and not is_loopback(url.hostname or ""):
            return f"the public URL {self.public_url} is plain HTTP beyond loopback: use https://, or --insecure"
        if not self.mqtt_tls:
            broker = urlsplit(self.mqtt_url if self.mqtt_url and "://" in self.mqtt_url else f"mqtt://{self.mqtt_url}")
            hosts = [self.mqtt_public_host] + ([broker.hostname or ""] if self.mqtt_url else [])
            beyond = [h for h in hosts if not is_loopback(h)]
            if beyond:
                return f"MQTT to {beyond[0]} would be plain text: use an mqtts:// broker, or --insecure"
        return None

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
    def device_rate(self) -> tuple[int, int]:
        """Return the per-device-token limit as (requests, period seconds)."""
        return parse_rate_limit(self.device_rate_limit)

    @property
    def enroll_rate(self) -> tuple[int, int]:
        """Return the enrollment limit as (requests, period seconds)."""
        return parse_rate_limit(self.enroll_rate_limit)


@lru_cache
def get_settings() -> HubSettings:
    """Return the settings from the environment, read once."""
    return HubSettings()

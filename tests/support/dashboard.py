"""Shared set-up for the dashboard tests: versions with gate figures, and a device speaking MQTT."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session

from hub.config import HubSettings
from hub.registry import publish_version, set_alias
from hub.security import load_or_create_signing_key
from shared.codec import encode
from shared.manifest import SkippedVariant, VariantMetrics
from shared.messages import CommandResult, TelemetryBatch, TelemetryPoint
from shared.metrics import ERRORS, LATENCY_P95_MS, REQUESTS, serving_labels
from shared.targets import TargetId
from shared.topics import DeviceChannel, device_topic
from tests.support.models import make_release, write_files
from tests.support.waiting import wait_for

__all__ = ["SERVING", "TELEMETRY_NAMES", "DeviceVoice", "publish_versions", "telemetry_points", "ui_login"]

# Serving metrics per model version (shared.metrics), then per-device resource metrics.
SERVING = ("latency_p50_ms", LATENCY_P95_MS, REQUESTS, ERRORS, "throughput_rps")
TELEMETRY_NAMES = (*SERVING, "cpu_percent", "memory_percent")


def ui_login(client: httpx.Client, key: str, **fields: str) -> httpx.Response:
    """Post the dashboard's sign-in form as a browser does: fetch it (token and cookie), then submit it."""
    form = client.get("/ui/login")
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', form.text)
    assert match, form.text
    response: httpx.Response = client.post(
        "/ui/login", data={"key": key, "csrf": match.group(1), **fields}, follow_redirects=False
    )
    return response


def publish_versions(session: Session, settings: HubSettings, model: str, workdir: Path) -> None:
    """Publish 1.0.0 and 2.0.0 of a small linear model, with gate figures and a skipped target; alias stable."""
    key = load_or_create_signing_key(settings.signing_key)
    for version, seed, accuracy, latency in (("1.0.0", 1, 0.912, 0.042), ("2.0.0", 2, 0.934, 0.038)):
        release = make_release(key, model, version, seed)
        variant = release.manifest.variants[0].model_copy(
            update={
                "metrics": VariantMetrics(
                    metric="accuracy", value=accuracy, reference=accuracy + 0.001, latency_ms=latency
                )
            }
        )
        manifest = release.manifest.model_copy(
            update={
                "variants": [variant],
                "skipped": [SkippedVariant(target=TargetId.CPU_INT8, reason="accuracy drop 0.031 > 0.01")],
                "metrics": {"accuracy": accuracy},
            }
        )
        publish_version(session, settings, manifest, write_files(release, workdir / version), actor="ui-test")
    set_alias(session, model, "stable", "1.0.0", actor="ui-test")


def telemetry_points(model: str, version: str, start_seq: int, now: datetime, count: int = 30) -> list[TelemetryPoint]:
    """Return `count` points of every telemetry name, one every 20 s up to `now`, with a clear trend."""
    points = []
    seq = start_seq
    for i in range(count):
        ts = now - timedelta(seconds=20 * (count - 1 - i))
        values = {
            "latency_p50_ms": 4.0 + (i % 5) * 0.3,
            LATENCY_P95_MS: 9.0 + (i % 7) * 0.5,
            REQUESTS: 800.0 + 20 * i,
            ERRORS: float(i % 3),
            "throughput_rps": 40.0 + i,
            "cpu_percent": 20.0 + (i * 3) % 50,
            "memory_percent": 35.0 + i * 0.2,
        }
        for name, value in values.items():
            labels = serving_labels(model, version) if name in SERVING else {}
            points.append(TelemetryPoint(seq=seq, ts=ts, name=name, value=value, labels=labels))
            seq += 1
    return points


class DeviceVoice:
    """An MQTT client logged in as an enrolled device (its identity.json), publishing what an agent would."""

    def __init__(self, state_dir: Path) -> None:
        identity = json.loads((state_dir / "identity.json").read_text())
        self.device_id: str = identity["device_id"]
        # The broker binds a device's client id to its user: the voice presents the device id.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(identity["mqtt_username"], identity["mqtt_password"])
        self.host, self.port = identity["mqtt_host"], int(identity["mqtt_port"])

    def __enter__(self) -> DeviceVoice:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        wait_for(f"device {self.device_id} to connect to the broker", self.client.is_connected, 10, every=0.05)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _publish(self, channel: DeviceChannel, payload: bytes) -> None:
        info = self.client.publish(device_topic(self.device_id, channel), payload, qos=1)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            raise TimeoutError(f"the broker did not acknowledge {channel.value} of {self.device_id}")

    def telemetry(self, points: Sequence[TelemetryPoint]) -> None:
        """Publish telemetry batches."""
        for start in range(0, len(points), 500):
            batch = TelemetryBatch(device_id=self.device_id, points=list(points[start : start + 500]))
            self._publish(DeviceChannel.TELEMETRY, encode(batch))

    def answer(self, command_id: str, output: dict[str, object]) -> None:
        """Publish a successful result for a command."""
        result = CommandResult(id=command_id, device_id=self.device_id, ok=True, output=output)
        self._publish(DeviceChannel.RESULTS, encode(result))

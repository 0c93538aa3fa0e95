"""Simulated devices on a real broker: obey desired state, report like an agent, send telemetry."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared import codec, metrics, topics
from shared.messages import (
    DesiredState,
    ModelStatus,
    Presence,
    ReportedState,
    TelemetryBatch,
    TelemetryPoint,
    UpdateState,
    utcnow,
)
from shared.topics import DeviceChannel

__all__ = ["SimDevice"]


class SimDevice:
    """A device that applies what the hub wants, except versions in `broken` (its smoke test fails).

    `latency_ms` maps a version to the p95 latency it reports while serving.
    """

    def __init__(
        self,
        port: int,
        device_id: str,
        model: str,
        *,
        active: str | None,
        broken: frozenset[str] = frozenset(),
        latency_ms: Mapping[str, float] | None = None,
    ) -> None:
        self.device_id, self.model = device_id, model
        self.active = active
        self.broken = broken
        self.latency_ms = dict(latency_ms or {})
        self.applied: list[str] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.will_set(
            topics.device_topic(device_id, DeviceChannel.ONLINE),
            codec.encode(Presence(device_id=device_id, online=False)),
            qos=1,
            retain=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.port = port

    def start(self) -> SimDevice:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.publish(
            topics.device_topic(self.device_id, DeviceChannel.ONLINE),
            codec.encode(Presence(device_id=self.device_id, online=False)),
            qos=1,
            retain=True,
        ).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_args: object) -> None:
        client.subscribe(topics.device_topic(self.device_id, DeviceChannel.DESIRED), qos=1)
        client.publish(
            topics.device_topic(self.device_id, DeviceChannel.ONLINE),
            codec.encode(Presence(device_id=self.device_id, online=True)),
            qos=1,
            retain=True,
        )

    def _on_message(self, client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        desired = codec.decode(msg.payload, DesiredState)
        entry = desired.models.get(self.model)
        with self._lock:
            if entry is None:
                status = ModelStatus(active=self.active)
            elif entry.version in self.broken:
                status = ModelStatus(
                    active=self.active,
                    desired=entry.version,
                    state=UpdateState.ROLLED_BACK,
                    error=f"smoke test failed for {entry.version}: output differs from the manifest sample",
                )
            else:
                previous, self.active = self.active, entry.version
                self.applied.append(entry.version)
                status = ModelStatus(
                    active=entry.version, previous=previous, desired=entry.version, state=UpdateState.COMMITTED
                )
            report = ReportedState(device_id=self.device_id, revision=desired.revision, models={self.model: status})
        client.publish(
            topics.device_topic(self.device_id, DeviceChannel.REPORTED), codec.encode(report), qos=1, retain=True
        )

    def serve(self, requests: int = 100, latency: Callable[[str], float] | None = None) -> None:
        """Publish one interval of serving telemetry for the active version."""
        with self._lock:
            version = self.active
        if version is None:
            return
        p95 = latency(version) if latency else self.latency_ms.get(version, 5.0)
        labels = metrics.serving_labels(self.model, version)
        now = utcnow()
        points = [
            TelemetryPoint(seq=next(self._seq), ts=now, name=metrics.REQUESTS, value=requests, labels=labels),
            TelemetryPoint(seq=next(self._seq), ts=now, name=metrics.ERRORS, value=0, labels=labels),
            TelemetryPoint(seq=next(self._seq), ts=now, name=metrics.LATENCY_P95_MS, value=p95, labels=labels),
        ]
        batch = TelemetryBatch(device_id=self.device_id, points=points)
        self.client.publish(topics.device_topic(self.device_id, DeviceChannel.TELEMETRY), codec.encode(batch), qos=1)

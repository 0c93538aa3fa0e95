"""The outbox sender against a real mosquitto: order, PUBACK before delete, outage, bound, live first."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentSettings, Identity
from agent.store import Store
from agent.sync import MqttSession
from shared import topics
from shared.codec import decode, encode
from shared.messages import CommandResult, TelemetryBatch
from tests.support.processes import Broker
from tests.support.waiting import wait_for

DEVICE = "dev-sender"


class Hub:
    """Records what arrives on the device's results and telemetry topics, in order."""

    def __init__(self, broker: Broker) -> None:
        self.arrivals: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hub-probe", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_message = self.on_message
        ready = threading.Event()

        def subscribed(*_a: Any) -> None:
            ready.set()

        self.client.on_subscribe = subscribed
        self.client.on_connect = lambda c, *a: c.subscribe(
            [(topics.device_topic(DEVICE, topics.DeviceChannel.TELEMETRY), 1),
             (topics.device_topic(DEVICE, topics.DeviceChannel.RESULTS), 1)]
        )  # fmt: skip
        # A persistent session: what is published while the probe reconnects waits for it.
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 300
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert ready.wait(10)

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        decoded = decode(bytes(message.payload))
        with self.lock:
            if isinstance(decoded, TelemetryBatch):
                self.arrivals.append(("telemetry", [p.seq for p in decoded.points]))
            elif isinstance(decoded, CommandResult):
                self.arrivals.append(("result", decoded.id))

    def seqs(self) -> list[int]:
        with self.lock:
            return [s for kind, batch in self.arrivals if kind == "telemetry" for s in batch]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def session(broker: Broker, tmp_path: Path, store: Store) -> MqttSession:
    settings = AgentSettings(
        state_dir=tmp_path, backoff_min_s=0.05, backoff_max_s=0.2, outbox_batch=500, publish_timeout_s=2
    )
    identity = Identity(
        device_id=DEVICE, device_token="t" * 16, mqtt_host=broker.host, mqtt_port=broker.port,
        mqtt_username=DEVICE, mqtt_password="x", signing_public_key="", hub_url="http://127.0.0.1:1",
    )  # fmt: skip
    return MqttSession(identity, settings, on_desired=lambda d: None, store=store)


def points(n: int) -> list[tuple[str, str, float, dict[str, str]]]:
    return [("2026-01-01T00:00:00+00:00", "cpu_percent", float(i), {}) for i in range(n)]


def result(cid: str) -> str:
    return encode(CommandResult(id=cid, device_id=DEVICE, ok=True)).decode()


def test_backlog_drains_in_order_with_live_results_first_and_the_bound_counted(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    hub = Hub(mqtt_broker)
    store = Store(tmp_path / "agent.db")
    store.outbox_max_bytes = 3000 * 100  # about 3,000 points of ~100 bytes
    mqtt_broker.stop()  # offline from the start: everything queues on disk
    s = session(mqtt_broker, tmp_path, store)
    s.start()
    try:
        for _ in range(10):
            store.enqueue_telemetry(points(1000))
        store.enqueue_message("results", result("r-before"))
        store.enqueue_message("results", result("r-live"))
        stats = store.outbox_stats()
        # Past the bound the oldest points went (the messages' bytes count too); all counted.
        assert stats.dropped > 0 and stats.telemetry_pending + stats.dropped == 10_000
        assert stats.messages_pending == 2
        kept = stats.telemetry_pending
        mqtt_broker.start()
        wait_for("drained", lambda: store.outbox_stats().telemetry_pending == 0, 60)
        wait_for("all points received", lambda: len(hub.seqs()) >= kept, 30)
        seqs = hub.seqs()
        # The newest points survived the bound, each arrived once, in order.
        assert seqs == list(range(10_001 - kept, 10_001))
        with hub.lock:
            results = [i for i, (kind, _) in enumerate(hub.arrivals) if kind == "result"]
            batches = [i for i, (kind, _) in enumerate(hub.arrivals) if kind == "telemetry"]
            ids = [hub.arrivals[i][1] for i in results]
        assert ids == ["r-before", "r-live"]
        # Results do not wait behind the telemetry backlog: they go before its first batch.
        assert results[-1] < batches[0]
        assert store.outbox_stats().messages_pending == 0
    finally:
        s.stop()
        hub.close()

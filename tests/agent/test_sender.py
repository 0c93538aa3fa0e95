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
from agent.daemon import reported_state
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


def session(broker: Broker, tmp_path: Path, store: Store, **overrides: Any) -> MqttSession:
    settings = AgentSettings(
        state_dir=tmp_path, backoff_min_s=0.05, backoff_max_s=0.2, outbox_batch=500, publish_timeout_s=2, **overrides
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


def test_no_matching_subscribers_keeps_the_rows_until_the_hub_subscribes_again(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    store = Store(tmp_path / "agent.db")
    s = session(mqtt_broker, tmp_path, store)
    store.enqueue_telemetry(points(10))
    store.enqueue_message("results", result("r-1"))
    s.start()  # nobody subscribes: each PUBACK says 0x10 "no matching subscribers"
    hub: Hub | None = None
    try:
        wait_for("refusals counted and retried", lambda: store.outbox_stats().refused >= 3, 30)
        stats = store.outbox_stats()
        assert stats.telemetry_pending == 10 and stats.messages_pending == 1
        hub = Hub(mqtt_broker)
        wait_for("the kept points delivered", lambda: len(hub.seqs()) >= 10, 30)
        assert hub.seqs() == list(range(1, 11))
        with hub.lock:
            assert ("result", "r-1") in hub.arrivals
        wait_for("the rows acknowledged", lambda: store.outbox_stats().telemetry_pending == 0, 10)
        assert store.outbox_stats().messages_pending == 0
        refused = store.outbox_stats().refused
        assert s.refusals == 0  # a delivery ends the backoff
        store.enqueue_telemetry(points(5))
        s.wake()
        wait_for("new points delivered", lambda: len(hub.seqs()) >= 15, 30)
        assert store.outbox_stats().refused == refused
        # The hub sees the count in the reported state.
        reported = reported_state(s.identity, store, 0, None, [])
        assert reported.outbox is not None and reported.outbox.refused == refused
    finally:
        s.stop()
        if hub is not None:
            hub.close()


def test_telemetry_beyond_the_quota_waits_in_the_outbox_and_arrives_later(mqtt_broker: Broker, tmp_path: Path) -> None:
    hub = Hub(mqtt_broker)
    store = Store(tmp_path / "agent.db")
    # 100 points at once, then 100 a second.
    s = session(mqtt_broker, tmp_path, store, telemetry_max_points_s=100.0, telemetry_burst_s=1.0)
    store.enqueue_telemetry(points(400))
    s.start()
    try:
        wait_for("the first burst", lambda: len(hub.seqs()) >= 100, 30)
        # Held back, not dropped: the rest is still queued while the first points are at the hub.
        assert store.outbox_stats().telemetry_pending > 0 and store.outbox_stats().dropped == 0
        wait_for("every point, later", lambda: len(hub.seqs()) >= 400, 60)
        assert hub.seqs() == list(range(1, 401))
        assert s.throttled > 0
    finally:
        s.stop()
        hub.close()

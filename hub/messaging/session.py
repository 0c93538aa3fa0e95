"""The hub's MQTT session: publish desired state, releases and commands; ingest what devices say.

One paho-mqtt MQTT 5 client, every callback wired in `_wire`. paho's network thread only
decodes and validates (`shared.codec.decode`, then "is the payload's device the topic's
device"); one writer thread (`hub.messaging.writer.IngestWriter`) owns the database: it
applies state, presence and command results as they come and writes telemetry in batches
(on `telemetry_batch_size` points or every `telemetry_flush_s`), then acknowledges the
MQTT messages (manual acks), so a message the hub crashed on is delivered again and
stored once. It also marks devices offline that missed their heartbeat window
(`heartbeat_timeout_s`).

The session is persistent (clean_start off, a session expiry), so the broker queues device
messages while the hub restarts. On every connect the hub re-publishes the desired state
of every device from the database, unsent commands, and the releases it published:
retained messages lost with a crashed broker come back.

Nothing a device sends can stop the consumer: each bad message is counted under a
reason (`counters`) and dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlmodel import Session, col, select

from hub.broker.admin import MqttEndpoint
from hub.fleet.commands import to_message
from hub.messaging.decode import TelemetryRows, decode_telemetry
from hub.messaging.ingest import CounterSnapshot, IngestRejected, MessageCounters
from hub.messaging.quota import TelemetryQuota
from hub.messaging.writer import Inbound, IngestWriter
from hub.models import Command, CommandStatus, Device, utcnow
from shared import codec, topics, tracing
from shared.messages import Command as CommandMessage
from shared.messages import CommandResult, DesiredState, Presence, Release, ReportedState, TelemetryBatch
from shared.topics import DeviceChannel

__all__ = ["CommandExpired", "HubMessaging", "MessagingError", "MessagingUnavailable", "hub_client_id"]

logger = logging.getLogger(__name__)

SessionFactory = Callable[[], Session]

_EXPECTED: dict[DeviceChannel, type[ReportedState | CommandResult | TelemetryBatch | Presence]] = {
    DeviceChannel.REPORTED: ReportedState,
    DeviceChannel.RESULTS: CommandResult,
    DeviceChannel.TELEMETRY: TelemetryBatch,
    DeviceChannel.ONLINE: Presence,
}


def hub_client_id(username: str, password: str | None, instance: str | None = None) -> str:
    """Return this hub process's MQTT client id: stable per replica, distinct between replicas, not guessable.

    The suffix is an HMAC of the replica's name (its host name) under the hub's MQTT
    password, so a restarted replica resumes its persistent session while nobody without
    the password can name it (and so try to take it over on a broker that does not bind
    client ids to users).
    """
    name = instance or socket.gethostname()
    digest = hmac.new((password or "").encode(), f"autodl-hub-client:{name}".encode(), hashlib.sha256).hexdigest()
    return f"{username[:40]}-{digest[:20]}"


class MessagingError(Exception):
    """Base of the hub messaging errors."""


class MessagingUnavailable(MessagingError):
    """The hub is not connected to the broker; the command stays pending and goes out on reconnect."""


class CommandExpired(MessagingError):
    """The command's expiry has passed; it is not sent."""


class HubMessaging:
    """The hub's single MQTT session and the writer thread that stores what devices send."""

    def __init__(
        self,
        settings: Any,
        session_factory: SessionFactory,
        *,
        url: str | None = None,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        share_group: str | None = None,
        sweep_interval_s: float | None = None,
        max_payload_bytes: int = codec.DEFAULT_MAX_BYTES,
        session_expiry_s: int = 86400,
        queue_size: int = 10000,
        tls_ca_certs: str | None = None,
    ) -> None:
        self.endpoint = MqttEndpoint.parse(url or settings.mqtt_url or f"mqtt://127.0.0.1:{settings.mqtt_port}")
        self.tls_ca_certs = tls_ca_certs
        self.username = username or settings.mqtt_username
        self._password = password if password is not None else settings.mqtt_password
        self.client_id = client_id or hub_client_id(self.username, self._password)
        self.share_group = share_group
        self.max_payload_bytes = max_payload_bytes
        self.session_expiry_s = session_expiry_s
        self._sessions = session_factory
        self.counters = MessageCounters()
        self.quota = TelemetryQuota(
            float(settings.telemetry_quota_points_s),
            float(settings.telemetry_quota_bytes_s),
            float(settings.telemetry_quota_burst_s),
        )
        heartbeat = float(settings.heartbeat_timeout_s)
        self._writer = IngestWriter(
            session_factory,
            self.counters,
            ack=lambda mid, qos: self._ack(self._client, mid, qos),
            on_resync=self._resync,
            on_desired=self.publish_desired,
            batch_size=int(settings.telemetry_batch_size),
            flush_s=float(settings.telemetry_flush_s),
            heartbeat_timeout_s=heartbeat,
            sweep_interval_s=sweep_interval_s or min(max(heartbeat / 3, 0.05), 10.0),
            queue_size=queue_size,
        )
        self._client: mqtt.Client | None = None
        self._accepting = threading.Event()
        self._connected = threading.Event()
        self._publish_lock = threading.Lock()
        self._desired_revision: dict[str, float] = {}  # highest revision this process published
        self._releases: dict[str, Release] = {}

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread and connect (in the background, retrying with backoff)."""
        if self._client is not None:
            return
        self._accepting.set()
        self._writer.start()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        self._wire(client)
        if self._password is not None:
            client.username_pw_set(self.username, self._password)
        if self.endpoint.tls:
            client.tls_set(ca_certs=self.tls_ca_certs)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = 65535
        client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=30, clean_start=False, properties=props)
        client.loop_start()
        self._client = client
        logger.info("hub messaging connecting to %s:%s as %s", self.endpoint.host, self.endpoint.port, self.username)

    def stop(self, timeout: float = 10.0) -> None:
        """Store what is queued, acknowledge it, then disconnect."""
        self._accepting.clear()  # messages arriving now stay unacknowledged and come again
        self._writer.stop(timeout)
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> HubMessaging:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        """Return True while the session with the broker is up."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Block until connected; return False after `timeout` seconds."""
        return self._connected.wait(timeout)

    def snapshot(self) -> CounterSnapshot:
        """Return the ingest counters (messages by kind, rejections by reason, points)."""
        return self.counters.snapshot()

    @property
    def queue_depth(self) -> int:
        """Return how many validated messages wait for the writer thread."""
        return self._writer.queue.qsize()

    # -- paho callbacks (network thread) -------------------------------------------

    def _wire(self, client: mqtt.Client) -> None:
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe

    def _filters(self) -> list[tuple[str, SubscribeOptions]]:
        # retainHandling=1: retained messages only for a new subscription, not a resumed session.
        # noLocal is a protocol error on a shared subscription (MQTT 5, 3.8.3.1).
        options = SubscribeOptions(qos=1, noLocal=not self.share_group, retainHandling=1)
        prefix = f"$share/{self.share_group}/" if self.share_group else ""
        return [(prefix + topics.device_wildcard(ch), options) for ch in sorted(topics.DEVICE_TO_HUB)]

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            logger.error("broker refused the hub's connection: %s (retrying)", reason)
            return
        logger.info("hub messaging connected (session present: %s)", getattr(flags, "session_present", None))
        client.subscribe(self._filters())

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        for (topic, _opts), reason in zip(self._filters(), reasons, strict=False):
            if reason.is_failure:
                logger.error("broker refused the hub's subscription to %s: %s", topic, reason)
        # "Connected" once the subscriptions hold, so nothing published after it is missed.
        self._connected.set()
        self._writer.request_resync()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connected.clear()
        if self._client is not None:
            logger.warning("hub messaging disconnected: %s (reconnecting)", reason)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # Nothing may escape a paho callback: it would end the network thread.
        try:
            item = self._validate(msg)
        except IngestRejected as exc:
            self._reject(exc.reason, msg.topic, exc.detail)
            item = None
        except codec.ProtocolError as exc:
            self._reject(exc.reason, msg.topic, exc.detail)
            item = None
        except Exception:
            logger.exception("unexpected error reading %s", msg.topic)
            self.counters.rejected("internal")
            item = None
        if item is None:
            self._ack(client, msg.mid, msg.qos)
            return
        while self._accepting.is_set():
            try:
                self._writer.put(item, timeout=1.0)
                return
            except queue.Full:
                logger.warning("ingest queue full (%d); holding the network thread", self._writer.queue.maxsize)

    def _validate(self, msg: mqtt.MQTTMessage) -> Inbound | None:
        try:
            parsed = topics.parse(msg.topic)
        except topics.TopicError as exc:
            raise IngestRejected("bad_topic", str(exc)) from exc
        if parsed.kind != "device" or parsed.channel not in _EXPECTED:
            raise IngestRejected("bad_topic", f"not a device-to-hub topic: {msg.topic}")
        if not msg.payload:
            return None  # an empty retained message clears the topic; nothing to store
        message: ReportedState | CommandResult | TelemetryBatch | TelemetryRows | Presence
        if parsed.channel is DeviceChannel.TELEMETRY:
            # Most of the traffic: validated straight into rows (same rules, same error reasons).
            message = decode_telemetry(bytes(msg.payload), max_bytes=self.max_payload_bytes)
            if message.device_id == parsed.subject and not self.quota.allow(
                message.device_id, message.count, len(msg.payload)
            ):
                raise IngestRejected("quota", f"{message.count} points from {message.device_id} over its quota")
        else:
            message = codec.decode(bytes(msg.payload), _EXPECTED[parsed.channel], max_bytes=self.max_payload_bytes)
        if message.device_id != parsed.subject:
            raise IngestRejected("device_mismatch", f"payload of {message.device_id!r} on {parsed.subject!r}'s topic")
        return Inbound(message, not msg.retain, msg.mid, msg.qos, utcnow())

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        self.counters.rejected(reason)
        logger.warning("dropped message on %s: %s: %s", topic, reason, detail[:300])

    def _ack(self, client: mqtt.Client | None, mid: int, qos: int) -> None:
        if client is not None and qos > 0:
            client.ack(mid, qos)

    def _resync(self) -> None:
        """Re-publish desired states and releases, and send commands still pending."""
        with self._sessions() as session:
            # A JSON column stores None as JSON null, not SQL NULL: filter here, not in SQL.
            stored = session.exec(select(Device.desired).where(col(Device.decommissioned).is_(False)))
            desired = [raw for raw in stored if raw]
            now = utcnow()
            pending = list(
                session.exec(
                    select(Command).where(
                        Command.status == CommandStatus.PENDING.value,
                        col(Command.expires_at).is_(None) | (col(Command.expires_at) > now),
                    )
                )
            )
        for raw in desired:
            try:
                self.publish_desired(DesiredState.model_validate(raw), force=False)
            except Exception:
                logger.exception("stored desired state does not validate: %r", raw)
        for release in list(self._releases.values()):
            self.publish_release(release)
        sent = []
        for row in pending:
            try:
                self.publish_command(to_message(row))
                sent.append(row.id)
            except MessagingError as exc:
                logger.warning("pending command %s not sent: %s", row.id, exc)
        if sent:
            with self._sessions() as session:
                for row_id in sent:
                    command = session.get(Command, row_id)
                    if command is not None and command.status == CommandStatus.PENDING.value:
                        command.status = CommandStatus.SENT.value
                        session.add(command)
                session.commit()
        logger.info(
            "resynced %d desired states, %d releases, %d commands", len(desired), len(self._releases), len(sent)
        )

    # -- publishing (any thread) ----------------------------------------------------

    def _publish(self, topic: str, payload: bytes, *, retain: bool, properties: Properties | None = None) -> None:
        client = self._client
        if client is None or not self.connected:
            raise MessagingUnavailable(f"not connected to the broker; {topic} not published")
        info = client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise MessagingUnavailable(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def publish_desired(self, state: DesiredState, *, force: bool = True) -> bool:
        """Publish a device's desired state (retained, QoS 1); return False if not sent now.

        Never raises for a missing connection: the database holds the state and the hub
        re-publishes it on reconnect. An older revision than one already published by
        this process is skipped (unless `force`), so a resync never overwrites a newer one.
        """
        with self._publish_lock:
            if not force and state.revision < self._desired_revision.get(state.device_id, -1):
                return False
            self._desired_revision[state.device_id] = max(
                state.revision, self._desired_revision.get(state.device_id, -1)
            )
            try:
                with tracing.span("hub.mqtt.publish desired", {"device": state.device_id, "revision": state.revision}):
                    self._publish(
                        topics.device_topic(state.device_id, DeviceChannel.DESIRED),
                        codec.encode(state),
                        retain=True,
                        properties=_with_trace(None),
                    )
            except MessagingUnavailable as exc:
                logger.info("desired state of %s goes out on reconnect: %s", state.device_id, exc)
                return False
        return True

    def clear_desired(self, device_id: str) -> bool:
        """Delete a device's retained desired state (for a decommissioned device)."""
        with self._publish_lock:
            self._desired_revision[device_id] = math.inf
            try:
                self._publish(topics.device_topic(device_id, DeviceChannel.DESIRED), b"", retain=True)
            except MessagingUnavailable as exc:
                logger.warning("retained desired state of %s not cleared: %s", device_id, exc)
                return False
        return True

    def forget_device(self, device_id: str) -> bool:
        """Delete every retained message of a decommissioned device: desired, reported, online."""
        cleared = self.clear_desired(device_id)
        for channel in (DeviceChannel.REPORTED, DeviceChannel.ONLINE):
            try:
                self._publish(topics.device_topic(device_id, channel), b"", retain=True)
            except MessagingUnavailable as exc:
                logger.warning("retained %s of %s not cleared: %s", channel.value, device_id, exc)
                cleared = False
        return cleared

    def publish_release(self, release: Release) -> bool:
        """Publish a model's newest release (retained, QoS 1); return False if not sent now."""
        self._releases[release.name] = release
        try:
            self._publish(topics.release_topic(release.name), codec.encode(release), retain=True)
        except MessagingUnavailable as exc:
            logger.info("release %s %s goes out on reconnect: %s", release.name, release.version, exc)
            return False
        return True

    def publish_command(self, cmd: CommandMessage) -> None:
        """Send a command (QoS 1), with an MQTT message expiry matching `expires_at`.

        Raises CommandExpired if it expired already, MessagingUnavailable when the hub is
        not connected (the stored command stays pending; it is sent on reconnect).
        """
        properties = None
        if cmd.expires_at is not None:
            remaining = (cmd.expires_at - utcnow()).total_seconds()
            if remaining <= 0:
                raise CommandExpired(f"command {cmd.id} expired at {cmd.expires_at.isoformat()}")
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = max(1, math.ceil(remaining))
        with tracing.span("hub.mqtt.publish command", {"device": cmd.device_id, "command": cmd.name}):
            self._publish(
                topics.device_topic(cmd.device_id, DeviceChannel.COMMANDS),
                codec.encode(cmd),
                retain=False,
                properties=_with_trace(properties),
            )

    # -- metrics ----------------------------------------------------------------------

    def collector(self) -> Collector:
        """Return a Prometheus collector of the ingest counters (register it on /metrics' registry)."""
        return _MessagingCollector(self)


class _MessagingCollector(Collector):
    """Exposes `HubMessaging.counters` as Prometheus metrics at scrape time."""

    def __init__(self, messaging: HubMessaging) -> None:
        self._messaging = messaging

    def collect(self) -> Iterator[Metric]:
        snap = self._messaging.snapshot()
        ingested = CounterMetricFamily(
            "autodl_hub_mqtt_messages_ingested", "Device messages stored, by kind", labels=["kind"]
        )
        for kind, n in sorted(snap.ingested.items()):
            ingested.add_metric([kind], n)
        rejected = CounterMetricFamily(
            "autodl_hub_mqtt_messages_rejected", "Device messages dropped, by reason", labels=["reason"]
        )
        for reason, n in sorted(snap.rejected.items()):
            rejected.add_metric([reason], n)
        points = CounterMetricFamily(
            "autodl_hub_telemetry_points", "Telemetry points received, new or duplicate", labels=["outcome"]
        )
        points.add_metric(["written"], snap.points_written)
        points.add_metric(["duplicate"], snap.points_duplicate)
        yield ingested
        yield rejected
        yield points
        yield CounterMetricFamily(
            "autodl_hub_devices_marked_offline",
            "Devices marked offline after a missed heartbeat",
            value=snap.devices_marked_offline,
        )
        yield GaugeMetricFamily(
            "autodl_hub_mqtt_connected", "1 while the hub's MQTT session is up", value=int(self._messaging.connected)
        )
        yield GaugeMetricFamily(
            "autodl_hub_ingest_queue_depth",
            "Validated messages waiting for the database writer",
            value=self._messaging.queue_depth,
        )


def _with_trace(properties: Properties | None) -> Properties | None:
    """Add the current span's `traceparent` as an MQTT 5 user property (nothing when tracing is off)."""
    carried = tracing.user_properties()
    if not carried:
        return properties
    if properties is None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = carried
    return properties

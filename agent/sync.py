"""The agent's MQTT 5 session: persistent session, last will, presence, backoff, desired state in.

All paho callbacks are wired in `_wire`. The connection loop is ours (not paho's
reconnect) so the delay between attempts is capped exponential with jitter and bad
credentials stop it for good. On every connect: subscribe (again), publish "online",
then let the daemon publish its reported state.

A row leaves the outbox only on a PUBACK whose reason code says the broker took the
message: "no matching subscribers" (0x10) means nobody got it (the hub's session is gone)
and codes >= 0x80 are refusals (not authorized, quota exceeded, payload too large...).
Then the rows stay, the refusal is counted (`outbox_refused_total`) and the sender
retries after a capped exponential backoff.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel

from agent import __version__
from agent.config import AgentSettings, Identity
from agent.errors import CredentialsError, backoff_delay
from agent.store import Store
from agent.tls import ca_file, client_certificate
from shared import topics, tracing
from shared.codec import ProtocolError, decode, encode
from shared.messages import DesiredState, Presence, TelemetryBatch, TelemetryPoint
from shared.topics import DeviceChannel
from shared.tracecontext import TraceParent, from_user_properties

__all__ = ["MqttSession"]

logger = logging.getLogger(__name__)

# CONNACK reason codes that retrying will not fix.
_FATAL_CONNACK = {
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorized",
    138: "banned",
}


# PUBACK reason code: the broker accepted the message but no subscription matched it.
_NO_MATCHING_SUBSCRIBERS = 0x10


class _Round(enum.Enum):
    """What one pass over the outbox achieved."""

    SENT = "sent"  # something was delivered
    IDLE = "idle"  # nothing to send
    STALLED = "stalled"  # no PUBACK in time, or the connection went: send again
    REFUSED = "refused"  # the broker answered with a reason code that is not a delivery


class MqttSession:
    """One device's connection to the broker, kept alive from a background thread."""

    def __init__(
        self,
        identity: Identity,
        settings: AgentSettings,
        on_desired: Callable[[DesiredState], None],
        on_connected: Callable[[], None] = lambda: None,
        on_command: Callable[[bytes], None] | None = None,
        on_invalid: Callable[[str], None] = lambda reason: None,
        store: Store | None = None,
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.on_desired = on_desired
        self.on_connected = on_connected
        self.on_command = on_command
        self.on_invalid = on_invalid
        self.connected = threading.Event()
        self.fatal: CredentialsError | None = None
        self.rejected: dict[str, int] = {}
        self.connects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self.store = store
        self.sent_points = 0
        self.refusals = 0  # consecutive refused deliveries (the backoff's exponent)
        self.throttled = 0  # rounds that held telemetry back to stay within the hub's quota
        self._budget = settings.telemetry_max_points_s * settings.telemetry_burst_s
        self._budget_at = time.monotonic()
        # PUBACK reason codes by message id. paho calls on_publish before it marks the message
        # published, so the code is here by the time the sender sees it acknowledged.
        self._puback_reasons: dict[int, int] = {}
        self._wake = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="outbox", daemon=True)
        self._client = self._wire()

    def _topic(self, channel: DeviceChannel) -> str:
        return topics.device_topic(self.identity.device_id, channel)

    def _presence(self, online: bool) -> bytes:
        return encode(Presence(device_id=self.identity.device_id, online=online, agent_version=__version__))

    def _wire(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.identity.device_id,
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(self.identity.mqtt_username, self.identity.mqtt_password)
        if self.identity.mqtt_tls:
            ca = ca_file(self.settings)
            pair = client_certificate(self.settings) if self.identity.client_certificate else None
            certfile, keyfile = pair or (None, None)
            client.tls_set(ca_certs=str(ca) if ca is not None else None, certfile=certfile, keyfile=keyfile)
        # The will is set before connecting: the broker publishes it if we vanish.
        client.will_set(self._topic(DeviceChannel.ONLINE), self._presence(False), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting in the background (and draining the outbox, when there is one)."""
        self._thread.start()
        if self.store is not None:
            self._sender.start()

    def stop(self) -> None:
        """Publish "offline" and disconnect cleanly."""
        self._stop.set()
        self._wake.set()
        if self._sender.is_alive():
            self._sender.join(timeout=self.settings.publish_timeout_s + 1)
        if self.connected.is_set():
            info = self._client.publish(self._topic(DeviceChannel.ONLINE), self._presence(False), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
            self._client.disconnect()
        self._thread.join(timeout=10)

    def wait_fatal(self, timeout: float | None = None) -> CredentialsError | None:
        """Return the fatal error once the loop has stopped for good (or None on timeout)."""
        self._thread.join(timeout)
        return self.fatal

    def publish(self, channel: DeviceChannel, message: BaseModel, retain: bool = False) -> bool:
        """Publish a message on one of this device's channels; return False when offline."""
        if not self.connected.is_set():
            return False
        info = self._client.publish(self._topic(channel), encode(message), qos=1, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def count_rejected(self, reason: str) -> None:
        """Count a message from the hub not acted on (shown in diagnostics and /metrics)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def wake(self) -> None:
        """Tell the sender the outbox has something new."""
        self._wake.set()

    # the outbox sender ---------------------------------------------------------------------------
    def _send_loop(self) -> None:
        """Drain the outbox in order while connected; a row goes only after its PUBACK.

        Each round sends the queued messages (reported state, command results: small and
        live) first, then one batch of the oldest telemetry, so a backlog of points drains
        in batches without holding back what happens now.
        """
        last_presence = 0.0
        while not self._stop.is_set():
            if not self.connected.wait(0.2):
                continue
            now = time.monotonic()
            if now - last_presence >= self.settings.heartbeat_s:
                # Presence doubles as the heartbeat: an idle agent is not marked offline.
                last_presence = now
                self._client.publish(self._topic(DeviceChannel.ONLINE), self._presence(True), qos=1, retain=True)
            try:
                outcome = self._send_round()
            except Exception:  # a store or encoding failure must not end the sender
                logger.exception("outbox round failed")
                outcome = _Round.IDLE
            if outcome is _Round.REFUSED:
                delay = backoff_delay(self.refusals, self.settings.backoff_min_s, self.settings.backoff_max_s)
                self.refusals += 1
                logger.warning("the broker refused a delivery; the rows stay queued, retrying in %.1fs", delay)
                self._stop.wait(delay)
                continue
            if outcome is _Round.SENT:
                self.refusals = 0
            elif outcome is _Round.IDLE:
                self._wake.wait(min(0.5, self.settings.heartbeat_s))
                self._wake.clear()

    def _send_round(self) -> _Round:
        assert self.store is not None
        sent = False
        messages = self.store.next_messages(100)
        infos = [
            (
                m,
                self._client.publish(self._topic(DeviceChannel(m.channel)), m.payload.encode(), qos=1, retain=m.retain),
            )
            for m in messages
        ]
        for message, info in infos:
            outcome = self._delivered(info, retained=message.retain)
            if outcome is not _Round.SENT:
                return outcome
            self.store.ack_messages([message.seq])
            sent = True
        allowed = self._telemetry_budget()
        if allowed < 1:
            self.throttled += 1
            return _Round.SENT if sent else _Round.IDLE  # the points wait in the outbox for budget
        rows = self.store.next_telemetry(min(self.settings.outbox_batch, allowed))
        if rows:
            batch = TelemetryBatch(
                device_id=self.identity.device_id,
                points=[TelemetryPoint(seq=seq, **fields) for seq, fields in rows],
            )
            info = self._client.publish(self._topic(DeviceChannel.TELEMETRY), encode(batch), qos=1)
            outcome = self._delivered(info, retained=False)
            if outcome is not _Round.SENT:
                return outcome
            self.store.ack_telemetry([seq for seq, _ in rows])
            self.sent_points += len(rows)
            self._budget -= len(rows)
            sent = True
        return _Round.SENT if sent else _Round.IDLE

    def _telemetry_budget(self) -> int:
        """Return how many points may go now: a token bucket at the hub's per-device quota."""
        rate, burst = self.settings.telemetry_max_points_s, self.settings.telemetry_burst_s
        now = time.monotonic()
        self._budget = min(rate * burst, self._budget + (now - self._budget_at) * rate)
        self._budget_at = now
        return int(self._budget)

    def _delivered(self, info: mqtt.MQTTMessageInfo, *, retained: bool) -> _Round:
        """Wait for the PUBACK and judge its reason code; the rows stay queued unless SENT."""
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return _Round.STALLED
        deadline = time.monotonic() + self.settings.publish_timeout_s
        while not info.is_published():
            if self._stop.is_set() or not self.connected.is_set() or time.monotonic() > deadline:
                return _Round.STALLED
            try:
                info.wait_for_publish(timeout=0.1)
            except (RuntimeError, ValueError):
                return _Round.STALLED
        code = self._puback_reasons.pop(info.mid, 0)
        # A retained message with no subscriber is still kept by the broker: whoever subscribes gets it.
        if code == 0 or (code == _NO_MATCHING_SUBSCRIBERS and retained):
            return _Round.SENT
        assert self.store is not None
        self.store.count_refused()
        logger.warning("broker refused message %d: reason code 0x%02x", info.mid, code)
        return _Round.REFUSED

    # the connection loop -----------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        host, port = self.identity.mqtt_host, self.identity.mqtt_port
        while not self._stop.is_set():
            try:
                self._client.connect(
                    host, port, keepalive=self.settings.keepalive_s, clean_start=False, properties=props
                )
            except OSError as exc:
                delay = backoff_delay(attempt, self.settings.backoff_min_s, self.settings.backoff_max_s)
                attempt += 1
                logger.warning("MQTT broker %s:%d unreachable (%s); retrying in %.1fs", host, port, exc, delay)
                self._stop.wait(delay)
                continue
            while not self._stop.is_set() and self.fatal is None:
                if self._client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                    break
            if self.connected.is_set():
                self.connected.clear()
            if self.fatal is not None:
                logger.error("%s", self.fatal)
                return
            if self._stop.is_set():
                # Drain the outgoing "offline" and DISCONNECT written by stop().
                for _ in range(10):
                    if self._client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                        break
                return
            attempt = 0 if self.connects else attempt
            delay = backoff_delay(attempt, self.settings.backoff_min_s, self.settings.backoff_max_s)
            attempt += 1
            logger.warning("MQTT connection lost; reconnecting in %.1fs", delay)
            self._stop.wait(delay)

    # paho callbacks (run on the loop thread) -----------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            code = int(reason.value)
            if code in _FATAL_CONNACK:
                self.fatal = CredentialsError(
                    f"the MQTT broker refused device {self.identity.device_id}: {_FATAL_CONNACK[code]}"
                    " (re-enroll with `autodl-agent enroll --force`)"
                )
            else:
                logger.warning("MQTT connect refused: %s", reason)
            return
        self.connects += 1
        logger.info("MQTT connected (session present: %s)", getattr(flags, "session_present", None))
        client.subscribe(
            [(self._topic(DeviceChannel.DESIRED), 1), (self._topic(DeviceChannel.COMMANDS), 1)],
        )
        client.publish(self._topic(DeviceChannel.ONLINE), self._presence(True), qos=1, retain=True)
        self.connected.set()
        try:
            self.on_connected()
        except Exception:  # the daemon's hook must not break the session
            logger.exception("on_connected hook failed")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._puback_reasons[mid] = int(getattr(reason, "value", 0))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if getattr(reason, "value", 0) in _FATAL_CONNACK and self.fatal is None:
            self.fatal = CredentialsError(f"the MQTT broker disconnected device {self.identity.device_id}: {reason}")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._topic(DeviceChannel.DESIRED):
            if not message.payload:
                return  # a cleared retained desired state
            try:
                desired = decode(bytes(message.payload), DesiredState)
            except ProtocolError as exc:
                self.count_rejected(exc.reason)
                logger.warning("rejected desired state: %s", exc)
                self.on_invalid(f"desired state rejected: {exc}")
                return
            try:
                with (
                    tracing.remote(_traceparent(message)),
                    tracing.span("agent.desired", {"revision": desired.revision}),
                ):
                    self.on_desired(desired)
            except Exception as exc:  # a bad desired state is reported, never fatal to the session
                logger.warning("desired revision %d refused: %s", desired.revision, exc)
                self.on_invalid(f"desired revision {desired.revision} refused: {exc}")
        elif message.topic == self._topic(DeviceChannel.COMMANDS) and self.on_command is not None:
            try:
                with tracing.remote(_traceparent(message)), tracing.span("agent.command"):
                    self.on_command(bytes(message.payload))
            except Exception:
                logger.exception("command handling failed")


def _traceparent(message: mqtt.MQTTMessage) -> TraceParent | None:
    """Return the hub's trace context from the MQTT 5 user properties (None if absent or malformed)."""
    return from_user_properties(getattr(message.properties, "UserProperty", None))

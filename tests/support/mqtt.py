"""MQTT clients for tests: a recording `Probe` (what the broker granted, refused, delivered and
dropped) and a `Watcher` of what agents report."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from shared import topics
from shared.codec import ProtocolError, decode
from shared.messages import Presence, ReportedState

__all__ = ["Probe", "Watcher"]


class Probe:
    """One MQTT client whose events tests can wait for."""

    def __init__(self, port: int, username: str | None, password: str | None, *, client_id: str | None = None) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.connacks: list[ReasonCode] = []
        self.disconnects: list[ReasonCode] = []
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.pubacks: dict[int, ReasonCode] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self.expiry: dict[str, int | None] = {}  # topic -> MessageExpiryInterval of the last message
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.connacks.append(reason)
            self._cond.notify_all()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.disconnects.append(reason)
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._cond:
            self.subacks[mid] = reasons
            self._cond.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.pubacks[mid] = reason
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.expiry[msg.topic] = getattr(msg.properties, "MessageExpiryInterval", None)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until `predicate` holds (checked under the probe's lock)."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def connect(self, timeout: float = 10.0) -> ReasonCode:
        """Connect, wait for the CONNACK and return its reason code (the loop keeps running)."""
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        assert self.wait(lambda: bool(self.connacks), timeout), "no CONNACK"
        return self.connacks[-1]

    def subscribe(self, topic: str, qos: int = 1) -> ReasonCode:
        """Subscribe and return the SUBACK reason code."""
        _rc, mid = self.client.subscribe(topic, qos)
        assert self.wait(lambda: mid in self.subacks), f"no SUBACK for {topic}"
        return self.subacks[mid][0]

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> ReasonCode | None:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return None
        assert self.wait(lambda: info.mid in self.pubacks), f"no PUBACK for {topic}"
        return self.pubacks[info.mid]

    def received(self, topic: str) -> list[bytes]:
        """Return the payloads delivered on `topic` so far."""
        with self._cond:
            return [payload for t, payload, _retain in self.messages if t == topic]

    def wait_message(self, topic: str, payload: bytes | None = None, timeout: float = 10.0) -> bool:
        """Wait until a message on `topic` (with `payload`, if given) has arrived."""
        return self.wait(lambda: any(t == topic and payload in (None, p) for t, p, _r in self.messages), timeout)

    def close(self) -> None:
        """Disconnect and stop the network loop."""
        self.client.disconnect()
        self.client.loop_stop()


class Watcher:
    """Collects every reported state and presence message from the broker."""

    def __init__(self, host: str, port: int) -> None:
        self.reported: list[ReportedState] = []
        self.presence: list[Presence] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-watcher", protocol=mqtt.MQTTv5)
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *a: c.subscribe(
            [
                (topics.device_wildcard(topics.DeviceChannel.REPORTED), 1),
                (topics.device_wildcard(topics.DeviceChannel.ONLINE), 1),
            ]
        )
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            decoded = decode(bytes(message.payload))
        except ProtocolError:
            return
        with self._cond:
            if isinstance(decoded, ReportedState):
                self.reported.append(decoded)
            elif isinstance(decoded, Presence):
                self.presence.append(decoded)
            self._cond.notify_all()

    def wait_reported(self, predicate: Callable[[ReportedState], bool], timeout: float = 30) -> ReportedState:
        """Return the latest reported state that satisfies `predicate`, waiting up to `timeout` for one."""
        found: list[ReportedState] = []

        def match() -> bool:
            found[:] = [r for r in reversed(self.reported) if predicate(r)][:1]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(match, timeout):
                raise TimeoutError(f"no matching reported state in {timeout}s")
        return found[0]

    def wait_presence(self, online: bool, timeout: float = 30) -> Presence:
        """Return the first presence message with `online`, waiting up to `timeout` for one."""
        with self._cond:
            if not self._cond.wait_for(lambda: any(p.online is online for p in self.presence), timeout):
                raise TimeoutError(f"no presence online={online} in {timeout}s")
            return next(p for p in self.presence if p.online is online)

    def close(self) -> None:
        """Disconnect and stop the network loop."""
        self._client.loop_stop()
        self._client.disconnect()

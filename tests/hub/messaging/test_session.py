"""The hub's MQTT session against a real mosquitto and a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlmodel import Session, func, select

from hub.broker.embedded import BrokerAdmin, EmbeddedBroker
from hub.config import HubSettings
from hub.db import create_engine_for, migrate, session_factory
from hub.messaging.session import CommandExpired, HubMessaging
from hub.models import Command, CommandStatus, Device, TelemetryPoint
from shared import codec, topics
from shared.messages import (
    Command as CommandMessage,
)
from shared.messages import (
    CommandName,
    CommandResult,
    DesiredModel,
    DesiredState,
    Presence,
    Release,
    ReportedState,
    TelemetryBatch,
)
from shared.messages import (
    TelemetryPoint as WirePoint,
)
from shared.topics import DeviceChannel
from tests.support.broker import secured_broker
from tests.support.mqtt import Probe
from tests.support.waiting import wait_for

HUB_USER = "autodl-hub"
HUB_PASSWORD = "hub-password-for-tests"


@dataclass
class Rig:
    """A broker, a migrated database, the hub's messaging and two enrolled devices."""

    broker: EmbeddedBroker
    admin: BrokerAdmin
    engine: Engine
    settings: HubSettings
    messaging: HubMessaging
    a: str
    b: str
    probes: list[Probe]

    def session(self) -> Session:
        """Open a session on the test database."""
        return Session(self.engine, expire_on_commit=False)

    def device(self, device_id: str) -> Device:
        """Read a device row afresh."""
        with self.session() as session:
            device = session.get(Device, device_id)
            assert device is not None
            return device

    def probe(self, user: str, password: str) -> Probe:
        """Connect an MQTT client as `user` (a device presents its own id; hub probes each their own)."""
        client_id = f"{user}-probe-{uuid.uuid4().hex[:8]}" if user == HUB_USER else None
        probe = Probe(self.broker.port, user, password, client_id=client_id)
        self.probes.append(probe)
        assert not probe.connect().is_failure
        return probe

    def as_device(self, device_id: str) -> Probe:
        """Connect as an enrolled device (password = "pw-" + id)."""
        return self.probe(device_id, f"pw-{device_id}")

    def points(self, device_id: str) -> int:
        """Count the stored telemetry points of a device."""
        with self.session() as session:
            query = select(func.count()).select_from(TelemetryPoint).where(TelemetryPoint.device_id == device_id)
            return int(session.exec(query).one())


def make_rig(tmp_path: Path, database_url: str, **overrides: Any) -> Iterator[Rig]:
    """Start everything the messaging tests need; stop it afterwards."""
    settings = HubSettings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        mqtt_username=HUB_USER,
        mqtt_password=HUB_PASSWORD,
        **{"telemetry_batch_size": 50, "telemetry_flush_s": 0.1, "heartbeat_timeout_s": 300.0, **overrides},
    )
    engine = create_engine_for(settings)
    migrate(engine)
    broker = secured_broker(tmp_path / "mosquitto", hub_password=HUB_PASSWORD, roles=False)
    admin = broker.admin()
    suffix = uuid.uuid4().hex[:8]
    a, b = f"dev-a-{suffix}", f"dev-b-{suffix}"
    with Session(engine) as session:
        for device_id in (a, b):
            session.add(Device(id=device_id, name=device_id))
            admin.add_device(device_id, f"pw-{device_id}")
        session.commit()
    messaging = HubMessaging(settings, session_factory(engine), url=broker.url, client_id=f"hub-{suffix}")
    messaging.start()
    rig = Rig(broker, admin, engine, settings, messaging, a, b, [])
    try:
        assert messaging.wait_connected()
        yield rig
    finally:
        for probe in rig.probes:
            probe.close()
        messaging.stop()
        admin.close()
        broker.stop()
        engine.dispose()


@pytest.fixture
def rig(tmp_path: Path, database_url: str) -> Iterator[Rig]:
    """The rig on SQLite and on PostgreSQL."""
    yield from make_rig(tmp_path, database_url)


@pytest.fixture
def sqlite_rig(tmp_path: Path) -> Iterator[Rig]:
    """The rig on SQLite only."""
    yield from make_rig(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}")


def batch(device_id: str, first: int, n: int) -> bytes:
    """Encode a telemetry batch of `n` points starting at sequence `first`."""
    now = datetime.now(UTC)
    points = [
        WirePoint(seq=first + i, ts=now, name="latency_ms", value=float(first + i), labels={"model": "digits"})
        for i in range(n)
    ]
    return codec.encode(TelemetryBatch(device_id=device_id, points=points))


def telemetry(device_id: str) -> str:
    return topics.device_topic(device_id, DeviceChannel.TELEMETRY)


def test_telemetry_delivered_twice_is_stored_once(rig: Rig) -> None:
    device = rig.as_device(rig.a)
    device.publish(telemetry(rig.a), batch(rig.a, 0, 10))
    device.publish(telemetry(rig.a), batch(rig.a, 0, 10))  # the agent resends after a lost PUBACK
    device.publish(telemetry(rig.a), batch(rig.a, 5, 10))  # overlaps: 5..9 again, 10..14 new

    wait_for(
        'rig.messaging.snapshot().ingested.get("telemetry", 0) == 3',
        lambda: rig.messaging.snapshot().ingested.get("telemetry", 0) == 3,
    )
    assert rig.points(rig.a) == 15
    with rig.session() as session:
        seqs = sorted(session.exec(select(TelemetryPoint.seq).where(TelemetryPoint.device_id == rig.a)))
    assert seqs == list(range(15))
    with rig.session() as session:
        point = session.exec(
            select(TelemetryPoint).where(TelemetryPoint.device_id == rig.a, TelemetryPoint.seq == 12)
        ).one()
    assert (point.name, point.value, point.labels) == ("latency_ms", 12.0, {"model": "digits"})
    assert point.ts.tzinfo is not None and abs((datetime.now(UTC) - point.ts).total_seconds()) < 600
    snap = rig.messaging.snapshot()
    assert (snap.points_written, snap.points_duplicate) == (15, 15)
    assert rig.device(rig.a).online is True
    assert snap.total_rejected == 0


def test_state_presence_and_command_results_are_stored(rig: Rig) -> None:
    with rig.session() as session:
        session.add(Command(id="cmd-1", device_id=rig.a, name="ping", status=CommandStatus.SENT.value))
        session.commit()
    device = rig.as_device(rig.a)
    reported = ReportedState(device_id=rig.a, revision=3, agent_version="1.2.3")
    device.publish(topics.device_topic(rig.a, DeviceChannel.REPORTED), codec.encode(reported), retain=True)
    result = CommandResult(id="cmd-1", device_id=rig.a, ok=True, output={"pong": True})
    device.publish(topics.device_topic(rig.a, DeviceChannel.RESULTS), codec.encode(result))
    wait_for(
        'rig.messaging.snapshot().ingested.get("command_result", 0) == 1',
        lambda: rig.messaging.snapshot().ingested.get("command_result", 0) == 1,
    )

    stored = rig.device(rig.a)
    assert stored.reported is not None and stored.reported["revision"] == 3
    assert stored.agent_version == "1.2.3"
    assert stored.online is True and stored.last_seen is not None
    with rig.session() as session:
        command = session.get(Command, "cmd-1")
        assert command is not None
        assert command.status == CommandStatus.SUCCEEDED.value and command.result == {"pong": True}

    offline = Presence(device_id=rig.a, online=False)
    device.publish(topics.device_topic(rig.a, DeviceChannel.ONLINE), codec.encode(offline), retain=True)
    wait_for("rig.device(rig.a).online is False", lambda: rig.device(rig.a).online is False)


def test_malformed_payloads_are_counted_by_reason_and_ingest_goes_on(sqlite_rig: Rig) -> None:
    rig = sqlite_rig
    a = rig.as_device(rig.a)
    hub = rig.probe(HUB_USER, HUB_PASSWORD)  # may publish anywhere: plays a device that was never enrolled
    good = json.loads(batch(rig.a, 0, 1))
    flood: list[tuple[Probe, str, bytes, str]] = [
        (a, telemetry(rig.a), b"{not json", "malformed"),
        (a, telemetry(rig.a), b"[1, 2, 3]", "malformed"),
        (a, telemetry(rig.a), b"\xff\xfe\x00", "malformed"),
        (a, telemetry(rig.a), b"x" * (codec.DEFAULT_MAX_BYTES + 1), "too_large"),
        (a, telemetry(rig.a), json.dumps({**good, "schema_version": 99}).encode(), "schema_version"),
        (a, telemetry(rig.a), json.dumps({**good, "kind": "gossip"}).encode(), "unknown_kind"),
        (a, telemetry(rig.a), codec.encode(Presence(device_id=rig.a, online=True)), "wrong_kind"),
        (a, telemetry(rig.a), json.dumps({**good, "points": []}).encode(), "invalid"),
        (a, telemetry(rig.a), json.dumps({**good, "extra": 1}).encode(), "invalid"),
        (a, telemetry(rig.a), batch(rig.b, 0, 1), "device_mismatch"),  # A claims to be B
        (hub, telemetry("ghost"), batch("ghost", 0, 1), "unknown_device"),
        (
            hub,
            topics.device_topic("ghost", DeviceChannel.ONLINE),
            codec.encode(Presence(device_id="ghost", online=True)),
            "unknown_device",
        ),
        (
            a,
            topics.device_topic(rig.a, DeviceChannel.RESULTS),
            codec.encode(CommandResult(id="nope", device_id=rig.a, ok=True)),
            "unknown_command",
        ),
    ]
    for _ in range(3):
        for probe, topic, payload, _reason in flood:
            probe.publish(topic, payload)
    a.publish(telemetry(rig.a), batch(rig.a, 100, 5))

    expected: dict[str, int] = {}
    for *_rest, reason in flood:
        expected[reason] = expected.get(reason, 0) + 3
    wait_for(
        'rig.messaging.snapshot().ingested.get("telemetry", 0) == 1',
        lambda: rig.messaging.snapshot().ingested.get("telemetry", 0) == 1,
    )
    wait_for(
        "dict(rig.messaging.snapshot().rejected) == expected",
        lambda: dict(rig.messaging.snapshot().rejected) == expected,
    )
    assert rig.points(rig.a) == 5
    assert rig.messaging.connected

    registry = CollectorRegistry()
    registry.register(rig.messaging.collector())
    for reason, n in expected.items():
        assert registry.get_sample_value("autodl_hub_mqtt_messages_rejected_total", {"reason": reason}) == n
    assert registry.get_sample_value("autodl_hub_mqtt_messages_ingested_total", {"kind": "telemetry"}) == 1
    assert registry.get_sample_value("autodl_hub_mqtt_connected") == 1


def test_desired_state_releases_and_commands_reach_the_device(rig: Rig) -> None:
    desired = DesiredState(
        device_id=rig.a, revision=1, models={"digits": DesiredModel(version="1.0.0", manifest_url="http://hub/m")}
    )
    assert rig.messaging.publish_desired(desired)
    assert rig.messaging.publish_release(Release(name="digits", version="1.0.0", manifest_url="http://hub/m"))

    device = rig.as_device(rig.a)  # subscribes after the fact: both are retained
    hub = rig.probe(HUB_USER, HUB_PASSWORD)
    desired_topic = topics.device_topic(rig.a, DeviceChannel.DESIRED)
    commands_topic = topics.device_topic(rig.a, DeviceChannel.COMMANDS)
    for topic in (desired_topic, commands_topic):
        assert not device.subscribe(topic).is_failure
    # Releases are the hub's (replicas, tools): devices learn versions from their desired state.
    assert device.subscribe(topics.release_wildcard()).is_failure
    assert not hub.subscribe(topics.release_wildcard()).is_failure
    assert device.wait_message(desired_topic)
    assert hub.wait_message(topics.release_topic("digits"))
    assert codec.decode(device.received(desired_topic)[-1], DesiredState) == desired

    expires = datetime.now(UTC) + timedelta(seconds=120)
    command = CommandMessage(id="c1", device_id=rig.a, name=CommandName.PING, expires_at=expires)
    rig.messaging.publish_command(command)
    assert device.wait_message(commands_topic)
    assert codec.decode(device.received(commands_topic)[0], CommandMessage).id == "c1"
    expiry = device.expiry[commands_topic]
    assert expiry is not None and 0 < expiry <= 120

    late = CommandMessage(
        id="c2", device_id=rig.a, name=CommandName.PING, expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    with pytest.raises(CommandExpired):
        rig.messaging.publish_command(late)

    # Decommissioning clears the device's retained messages: a new subscriber gets none.
    reported_topic = topics.device_topic(rig.a, DeviceChannel.REPORTED)
    device.publish(reported_topic, codec.encode(ReportedState(device_id=rig.a, revision=1)), retain=True)
    wait_for(
        'rig.messaging.snapshot().ingested.get("reported_state", 0) == 1',
        lambda: rig.messaging.snapshot().ingested.get("reported_state", 0) == 1,
    )
    watcher = rig.probe(HUB_USER, HUB_PASSWORD)
    for topic in (desired_topic, reported_topic):
        assert not watcher.subscribe(topic).is_failure
    assert rig.messaging.forget_device(rig.a)
    assert watcher.wait_message(desired_topic, b"") and watcher.wait_message(reported_topic, b"")  # the clears
    observer = rig.probe(HUB_USER, HUB_PASSWORD)
    for topic in (desired_topic, reported_topic, topics.release_wildcard()):
        assert not observer.subscribe(topic).is_failure
    assert observer.wait_message(topics.release_topic("digits"))  # retained ones arrive right at subscribe
    assert observer.received(desired_topic) == [] and observer.received(reported_topic) == []


def test_devices_without_heartbeat_are_marked_offline(tmp_path: Path) -> None:
    rig_iter = make_rig(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", heartbeat_timeout_s=0.5)
    rig = next(rig_iter)
    try:
        device = rig.as_device(rig.a)
        device.publish(
            topics.device_topic(rig.a, DeviceChannel.ONLINE), codec.encode(Presence(device_id=rig.a, online=True))
        )
        wait_for(
            'rig.messaging.snapshot().ingested.get("presence", 0) == 1',
            lambda: rig.messaging.snapshot().ingested.get("presence", 0) == 1,
        )
        # The sweep runs every heartbeat_timeout/3; the device is online until it has been silent long enough.
        wait_for("rig.device(rig.a).online is False", lambda: rig.device(rig.a).online is False, 10)
        assert rig.messaging.snapshot().devices_marked_offline >= 1
        device.publish(telemetry(rig.a), batch(rig.a, 0, 1))  # any message is a heartbeat
        wait_for("rig.points(rig.a) == 1", lambda: rig.points(rig.a) == 1)
        wait_for(
            'rig.messaging.snapshot().ingested.get("telemetry") == 1',
            lambda: rig.messaging.snapshot().ingested.get("telemetry") == 1,
        )
    finally:
        rig_iter.close()


def test_points_sent_before_going_offline_do_not_bring_the_device_back_online(tmp_path: Path) -> None:
    # A long flush interval holds the points in the writer's batch while "offline" arrives.
    rig_iter = make_rig(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", telemetry_flush_s=30.0)
    rig = next(rig_iter)
    try:
        device = rig.as_device(rig.a)
        online = topics.device_topic(rig.a, DeviceChannel.ONLINE)
        device.publish(online, codec.encode(Presence(device_id=rig.a, online=True)))
        device.publish(telemetry(rig.a), batch(rig.a, 0, 5))
        device.publish(online, codec.encode(Presence(device_id=rig.a, online=False)), retain=True)
        wait_for(
            'rig.messaging.snapshot().ingested.get("presence", 0) == 2',
            lambda: rig.messaging.snapshot().ingested.get("presence", 0) == 2,
        )
        assert rig.points(rig.a) == 5  # stored before the offline presence was applied
        assert rig.device(rig.a).online is False
    finally:
        rig_iter.close()


def test_reconnect_republishes_desired_state_and_pending_commands(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'hub.db'}"
    rig_iter = make_rig(tmp_path, database_url)
    rig = next(rig_iter)
    try:
        rig.messaging.stop()
        # Written to the database while no hub was connected (or lost with a crashed broker).
        desired = DesiredState(device_id=rig.b, revision=7)
        with rig.session() as session:
            device = session.get(Device, rig.b)
            assert device is not None
            device.desired = desired.model_dump(mode="json")
            session.add(device)
            expires = datetime.now(UTC) + timedelta(minutes=5)
            session.add(Command(id="pending-1", device_id=rig.b, name="ping", expires_at=expires))
            session.commit()
        b = rig.as_device(rig.b)
        for channel in (DeviceChannel.DESIRED, DeviceChannel.COMMANDS):
            assert not b.subscribe(topics.device_topic(rig.b, channel)).is_failure

        again = HubMessaging(rig.settings, session_factory(rig.engine), url=rig.broker.url, client_id="hub-again")
        rig.messaging = again
        again.start()
        assert b.wait_message(topics.device_topic(rig.b, DeviceChannel.DESIRED))
        assert (
            codec.decode(b.received(topics.device_topic(rig.b, DeviceChannel.DESIRED))[-1], DesiredState).revision == 7
        )
        assert b.wait_message(topics.device_topic(rig.b, DeviceChannel.COMMANDS))

        def sent() -> bool:
            with rig.session() as session:
                row = session.get(Command, "pending-1")
                return row is not None and row.status == CommandStatus.SENT.value

        wait_for("sent()", sent)
    finally:
        rig_iter.close()


def test_a_database_behind_its_devices_renumbers_their_desired_state(rig: Rig) -> None:
    # A database restored from a backup holds revision 2; the device applied 5 meanwhile and
    # ignores anything older, so the hub republishes revision 6 with the stored models.
    model = DesiredModel(version="1.0.0", manifest_url="http://hub/m")
    with rig.session() as session:
        device = session.get(Device, rig.a)
        assert device is not None
        device.desired = DesiredState(device_id=rig.a, revision=2, models={"m": model}).model_dump(mode="json")
        session.add(device)
        session.commit()
    probe = rig.as_device(rig.a)
    desired_topic = topics.device_topic(rig.a, DeviceChannel.DESIRED)
    assert not probe.subscribe(desired_topic).is_failure
    reported = ReportedState(device_id=rig.a, revision=5)
    probe.publish(topics.device_topic(rig.a, DeviceChannel.REPORTED), codec.encode(reported), retain=True)

    def renumbered() -> DesiredState | None:  # the stored revision 2 may come first (retained, or resent)
        states = [codec.decode(payload, DesiredState) for payload in probe.received(desired_topic)]
        return next((state for state in states if state.revision > 2), None)

    published = wait_for("the renumbered desired state", renumbered, 30)
    assert published.revision == 6 and published.models == {"m": model}
    stored = rig.device(rig.a).desired
    assert stored is not None and stored["revision"] == 6


def test_hub_session_survives_a_broker_restart(sqlite_rig: Rig) -> None:
    rig = sqlite_rig
    pid = rig.broker.pid
    assert pid is not None
    rig.broker.stop()
    rig.broker.start()
    assert rig.messaging.wait_connected(timeout=30)
    wait_for("rig.messaging.connected", lambda: rig.messaging.connected, 30)
    device = rig.as_device(rig.a)
    device.publish(telemetry(rig.a), batch(rig.a, 0, 3))
    wait_for("rig.points(rig.a) == 3", lambda: rig.points(rig.a) == 3, 30)


def test_telemetry_sent_while_the_hub_is_down_is_stored_when_it_returns(sqlite_rig: Rig) -> None:
    rig = sqlite_rig
    client_id = rig.messaging.client_id
    rig.messaging.stop()
    device = rig.as_device(rig.a)
    device.publish(telemetry(rig.a), batch(rig.a, 0, 4))  # the broker queues it in the hub's session
    device.publish(telemetry(rig.a), batch(rig.a, 4, 4))
    assert rig.points(rig.a) == 0

    rig.messaging = HubMessaging(rig.settings, session_factory(rig.engine), url=rig.broker.url, client_id=client_id)
    rig.messaging.start()
    wait_for("rig.points(rig.a) == 8", lambda: rig.points(rig.a) == 8)
    # Counted once the commit returns, a moment after the points are visible.
    wait_for(
        'rig.messaging.snapshot().ingested.get("telemetry") == 2',
        lambda: rig.messaging.snapshot().ingested.get("telemetry") == 2,
    )


def test_replicas_in_a_share_group_store_each_message_once(sqlite_rig: Rig) -> None:
    rig = sqlite_rig
    rig.messaging.stop()
    replicas = [
        HubMessaging(
            rig.settings, session_factory(rig.engine), url=rig.broker.url, client_id=f"replica-{i}", share_group="hubs"
        )
        for i in range(2)
    ]
    try:
        for replica in replicas:
            replica.start()
            assert replica.wait_connected()
        device = rig.as_device(rig.a)
        wait_for("all(r.connected for r in replicas)", lambda: all(r.connected for r in replicas))
        for i in range(6):
            device.publish(telemetry(rig.a), batch(rig.a, i * 2, 2))
        wait_for(
            'sum(r.snapshot().ingested.get("telemetry", 0) for r in replicas) == 6',
            lambda: sum(r.snapshot().ingested.get("telemetry", 0) for r in replicas) == 6,
        )
        assert rig.points(rig.a) == 12
        assert sum(r.snapshot().points_duplicate for r in replicas) == 0  # no message went to both
    finally:
        for replica in replicas:
            replica.stop()


def test_retained_replay_stores_state_but_does_not_claim_the_device_is_online(sqlite_rig: Rig) -> None:
    rig = sqlite_rig
    rig.messaging.stop()
    device = rig.as_device(rig.a)
    presence = codec.encode(Presence(device_id=rig.a, online=True))
    device.publish(topics.device_topic(rig.a, DeviceChannel.ONLINE), presence, retain=True)
    reported = codec.encode(ReportedState(device_id=rig.a, revision=9))
    device.publish(topics.device_topic(rig.a, DeviceChannel.REPORTED), reported, retain=True)
    device.close()

    # A hub with a new session gets both as retained messages, possibly long after the fact.
    rig.messaging = HubMessaging(rig.settings, session_factory(rig.engine), url=rig.broker.url, client_id="new-hub")
    rig.messaging.start()
    wait_for(
        'rig.messaging.snapshot().ingested.get("presence", 0) == 1',
        lambda: rig.messaging.snapshot().ingested.get("presence", 0) == 1,
    )
    wait_for(
        'rig.messaging.snapshot().ingested.get("reported_state", 0) == 1',
        lambda: rig.messaging.snapshot().ingested.get("reported_state", 0) == 1,
    )
    stored = rig.device(rig.a)
    assert stored.reported is not None and stored.reported["revision"] == 9
    assert stored.online is False and stored.last_seen is None


_CRASHING_HUB = """
import sys
from hub.config import HubSettings
from hub.db import create_engine_for, session_factory
from hub.messaging.session import HubMessaging
settings = HubSettings(telemetry_batch_size=100000, telemetry_flush_s=3600)
messaging = HubMessaging(settings, session_factory(create_engine_for(settings)), url=sys.argv[1], client_id=sys.argv[2])
put = messaging._writer.put
def traced_put(item, timeout):
    put(item, timeout)
    print("queued", flush=True)
messaging._writer.put = traced_put
messaging.start()
assert messaging.wait_connected()
print("ready", flush=True)
sys.stdin.read()
"""


def test_messages_a_crashed_hub_never_stored_are_delivered_again(sqlite_rig: Rig) -> None:
    rig = sqlite_rig
    client_id = rig.messaging.client_id
    rig.messaging.stop()
    env = {
        **os.environ,
        "AUTODL_HUB_DATA_DIR": str(rig.settings.data_dir),
        "AUTODL_HUB_DATABASE_URL": rig.settings.database_url,
        "AUTODL_HUB_MQTT_USERNAME": HUB_USER,
        "AUTODL_HUB_MQTT_PASSWORD": HUB_PASSWORD,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_HUB, rig.broker.url, client_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        device = rig.as_device(rig.a)
        for i in range(3):
            device.publish(telemetry(rig.a), batch(rig.a, i * 2, 2))
        for _ in range(3):  # the hub holds all three in its batch, unacknowledged...
            assert proc.stdout.readline().strip() == "queued"
    finally:
        proc.kill()  # ...and dies before writing them
        proc.wait()
    assert rig.points(rig.a) == 0

    rig.messaging = HubMessaging(rig.settings, session_factory(rig.engine), url=rig.broker.url, client_id=client_id)
    rig.messaging.start()
    wait_for("rig.points(rig.a) == 6", lambda: rig.points(rig.a) == 6)


def test_a_device_over_its_telemetry_quota_is_refused_while_another_devices_points_arrive(tmp_path: Path) -> None:
    overrides = {"telemetry_quota_points_s": 10.0, "telemetry_quota_burst_s": 10.0}  # 100 points at once
    for quota_rig in make_rig(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", **overrides):
        _flood(quota_rig)


def _flood(rig: Rig) -> None:
    flooder, neighbour = rig.as_device(rig.a), rig.as_device(rig.b)
    for i in range(10):
        assert flooder.publish(telemetry(rig.a), batch(rig.a, i * 100, 100)) is not None
    assert neighbour.publish(telemetry(rig.b), batch(rig.b, 0, 50)) is not None
    wait_for("all of the neighbour's points", lambda: rig.points(rig.b) == 50)
    wait_for("the refusals counted", lambda: rig.messaging.snapshot().rejected.get("quota", 0) >= 5)
    # The first batch fit the burst; most of the rest did not (a few seconds refill 10 per second).
    assert 100 <= rig.points(rig.a) <= 400

"""The embedded mosquitto with dynamic security: per-device ACLs, runtime changes, supervision."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.broker.embedded import (
    BrokerAdmin,
    BrokerStartError,
    EmbeddedBroker,
    find_dynsec_plugin,
    load_or_create_hub_password,
)
from shared import topics
from shared.topics import DeviceChannel
from tests.support.broker import secured_broker
from tests.support.mqtt import Probe
from tests.support.processes import Broker, free_port
from tests.support.waiting import wait_for

HUB_USER = "autodl-hub"
HUB_PASSWORD = "hub-secret-password"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """An embedded broker on a free loopback port in this test's data dir."""
    embedded = secured_broker(tmp_path / "mosquitto", hub_password=HUB_PASSWORD, roles=False, backoff_min_s=0.1)
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture
def admin(broker: EmbeddedBroker) -> Iterator[BrokerAdmin]:
    """The hub's dynamic-security client, with devices A and B added."""
    with broker.admin() as client:
        client.ensure_roles()
        client.add_device("dev-a", "password-a")
        client.add_device("dev-b", "password-b")
        yield client


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    """Collects the probes a test opens and closes them afterwards."""
    opened: list[Probe] = []
    yield opened
    for probe in opened:
        probe.close()


def connect(broker: EmbeddedBroker, probes: list[Probe], user: str | None, password: str | None) -> Probe:
    """Open a probe as `user` and return it (whatever the CONNACK said)."""
    probe = Probe(broker.port, user, password)
    probes.append(probe)
    probe.connect()
    return probe


def connected(broker: EmbeddedBroker, probes: list[Probe], user: str, password: str) -> Probe:
    """Open a probe as `user` and check the broker accepted it."""
    probe = connect(broker, probes, user, password)
    assert not probe.connacks[-1].is_failure, probe.connacks[-1]
    return probe


def test_device_cannot_read_or_write_another_devices_topics(
    broker: EmbeddedBroker, admin: BrokerAdmin, probes: list[Probe]
) -> None:
    hub = connected(broker, probes, HUB_USER, HUB_PASSWORD)
    a = connected(broker, probes, "dev-a", "password-a")
    b = connected(broker, probes, "dev-b", "password-b")
    b_commands = topics.device_topic("dev-b", DeviceChannel.COMMANDS)
    b_telemetry = topics.device_topic("dev-b", DeviceChannel.TELEMETRY)
    a_telemetry = topics.device_topic("dev-a", DeviceChannel.TELEMETRY)

    # A may not subscribe to B's commands, nor to everything, nor to a wildcard over devices.
    assert a.subscribe(b_commands).is_failure
    assert a.subscribe("#").is_failure
    assert a.subscribe(topics.device_wildcard(DeviceChannel.COMMANDS)).is_failure
    assert not b.subscribe(b_commands).is_failure
    assert not hub.subscribe(topics.device_wildcard(DeviceChannel.TELEMETRY)).is_failure

    # A publishes into B's telemetry and commands, then into its own telemetry. MQTT keeps one
    # client's messages in order, so once A's own message arrives the forged ones never will.
    a.publish(b_telemetry, b"forged telemetry")
    a.publish(b_commands, b"forged command")
    a.publish(a_telemetry, b"own telemetry")
    assert hub.wait_message(a_telemetry, b"own telemetry")
    hub.publish(b_commands, b"real command")
    assert b.wait_message(b_commands, b"real command")
    assert hub.received(b_telemetry) == []
    assert b.received(b_commands) == [b"real command"]
    assert a.received(b_commands) == []


def test_device_publishes_its_own_topics_and_reads_releases(
    broker: EmbeddedBroker, admin: BrokerAdmin, probes: list[Probe]
) -> None:
    hub = connected(broker, probes, HUB_USER, HUB_PASSWORD)
    assert not hub.subscribe("autodl/v1/devices/dev-a/+").is_failure
    release = topics.release_topic("resnet")
    hub.publish(release, b"release 1.0.0", retain=True)

    a = connected(broker, probes, "dev-a", "password-a")
    for channel in topics.DEVICE_TO_HUB:
        a.publish(topics.device_topic("dev-a", channel), channel.value.encode())
    for channel in topics.DEVICE_TO_HUB:
        assert hub.wait_message(topics.device_topic("dev-a", channel), channel.value.encode())

    for channel in topics.HUB_TO_DEVICE:
        assert not a.subscribe(topics.device_topic("dev-a", channel)).is_failure
    assert not a.subscribe(topics.release_wildcard()).is_failure
    assert a.wait_message(release, b"release 1.0.0")  # the retained release
    hub.publish(topics.device_topic("dev-a", DeviceChannel.DESIRED), b"desired", retain=True)
    assert a.wait_message(topics.device_topic("dev-a", DeviceChannel.DESIRED), b"desired")

    # A device cannot publish a release, nor write its own desired state.
    assert not hub.subscribe(topics.release_wildcard()).is_failure
    a.publish(topics.release_topic("evil"), b"forged release")
    a.publish(topics.device_topic("dev-a", DeviceChannel.DESIRED), b"forged desired")
    a.publish(topics.device_topic("dev-a", DeviceChannel.ONLINE), b"barrier")
    assert hub.wait_message(topics.device_topic("dev-a", DeviceChannel.ONLINE), b"barrier")
    assert hub.received(topics.release_topic("evil")) == []
    assert a.received(topics.device_topic("dev-a", DeviceChannel.DESIRED)) == [b"desired"]


def test_hub_has_full_access_and_strangers_are_refused(
    broker: EmbeddedBroker, admin: BrokerAdmin, probes: list[Probe]
) -> None:
    hub = connected(broker, probes, HUB_USER, HUB_PASSWORD)
    assert not hub.subscribe("#").is_failure
    for topic in ("autodl/v1/devices/dev-b/commands", "autodl/v1/models/m/releases", "other/thing"):
        hub.publish(topic, b"x")
        assert hub.wait_message(topic, b"x")

    assert connect(broker, probes, None, None).connacks[-1].is_failure  # anonymous
    assert connect(broker, probes, "dev-a", "wrong-password").connacks[-1].is_failure
    assert connect(broker, probes, "nobody", "password-a").connacks[-1].is_failure


def test_removed_device_is_dropped_at_once_and_cannot_reconnect(
    broker: EmbeddedBroker, admin: BrokerAdmin, probes: list[Probe]
) -> None:
    a = connected(broker, probes, "dev-a", "password-a")
    b = connected(broker, probes, "dev-b", "password-b")

    admin.remove_device("dev-a")

    assert a.wait(lambda: bool(a.disconnects)), "the removed device's live connection stayed up"
    assert connect(broker, probes, "dev-a", "password-a").connacks[-1].is_failure
    assert "dev-a" not in admin.list_devices()
    assert b.disconnects == []
    admin.remove_device("dev-a")  # removing twice is not an error


def test_adding_a_device_at_runtime_keeps_other_clients_connected(
    broker: EmbeddedBroker, admin: BrokerAdmin, probes: list[Probe]
) -> None:
    hub = connected(broker, probes, HUB_USER, HUB_PASSWORD)
    b = connected(broker, probes, "dev-b", "password-b")
    b_desired = topics.device_topic("dev-b", DeviceChannel.DESIRED)
    assert not b.subscribe(b_desired).is_failure

    for i in range(5):
        admin.add_device(f"new-{i}", f"password-new-{i}")
    admin.ensure_roles()  # already set up: must change nothing
    c = connected(broker, probes, "new-4", "password-new-4")

    hub.publish(b_desired, b"after enrollments")
    assert b.wait_message(b_desired, b"after enrollments")
    assert hub.disconnects == [] and b.disconnects == [] and c.disconnects == []
    assert len(hub.connacks) == 1 and len(b.connacks) == 1
    assert set(admin.list_devices()) == {"dev-a", "dev-b", *(f"new-{i}" for i in range(5))}


def test_reenrolling_a_device_replaces_its_password(
    broker: EmbeddedBroker, admin: BrokerAdmin, probes: list[Probe]
) -> None:
    admin.add_device("dev-a", "new-password-a")
    assert connect(broker, probes, "dev-a", "password-a").connacks[-1].is_failure
    connected(broker, probes, "dev-a", "new-password-a")


def test_reconcile_removes_devices_the_hub_no_longer_knows(
    broker: EmbeddedBroker, admin: BrokerAdmin, probes: list[Probe]
) -> None:
    assert admin.reconcile(["dev-a"]) == ["dev-b"]
    connected(broker, probes, "dev-a", "password-a")
    assert connect(broker, probes, "dev-b", "password-b").connacks[-1].is_failure


def test_supervisor_restarts_a_killed_broker_with_its_devices(
    broker: EmbeddedBroker, admin: BrokerAdmin, probes: list[Probe]
) -> None:
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    assert broker.wait_restarted(pid), "mosquitto was not restarted"
    assert broker.restarts == 1
    connected(broker, probes, "dev-a", "password-a")  # devices added at runtime survive
    assert connect(broker, probes, "dev-a", "password-b").connacks[-1].is_failure
    admin.add_device("dev-c", "password-c")  # the admin client reconnected by itself
    connected(broker, probes, "dev-c", "password-c")


def test_stop_ends_mosquitto_and_start_keeps_state(tmp_path: Path) -> None:
    directory = tmp_path / "mq"
    first = EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password="pw-1", bind_host="127.0.0.1"
    )
    with first:
        pid = first.pid
        with first.admin() as admin:
            admin.add_device("dev-a", "password-a")
    assert pid is not None and not first.running
    wait_for('not os.path.exists(f"/proc/{pid}")', lambda: not os.path.exists(f"/proc/{pid}"))

    # A new hub password rewrites the hub's entry but keeps the devices.
    second = EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password="pw-2", bind_host="127.0.0.1"
    )
    probes: list[Probe] = []
    with second:
        try:
            assert not connect(second, probes, "dev-a", "password-a").connacks[-1].is_failure
            assert connect(second, probes, HUB_USER, "pw-1").connacks[-1].is_failure
            assert not connect(second, probes, HUB_USER, "pw-2").connacks[-1].is_failure
        finally:
            for probe in probes:
                probe.close()
    config = json.loads((directory / "dynamic-security.json").read_text())
    assert config["defaultACLAccess"]["subscribe"] is False
    assert (directory / "dynamic-security.json").stat().st_mode & 0o077 == 0
    assert f"plugin {find_dynsec_plugin()}" in (directory / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in (directory / "mosquitto.conf").read_text()


def test_hub_password_is_generated_once(tmp_path: Path) -> None:
    first = load_or_create_hub_password(tmp_path / "mq")
    assert len(first) >= 32
    assert load_or_create_hub_password(tmp_path / "mq") == first
    assert (tmp_path / "mq" / "hub-mqtt-password").stat().st_mode & 0o077 == 0


def test_admin_sets_up_an_external_mosquitto_initialised_by_mosquitto_ctrl(tmp_path: Path) -> None:
    ctrl = shutil.which("mosquitto_ctrl")
    if ctrl is None:
        pytest.skip("mosquitto_ctrl is not installed")
    dynsec = tmp_path / "external" / "dynamic-security.json"
    dynsec.parent.mkdir()
    subprocess.run([ctrl, "dynsec", "init", str(dynsec), "admin", "admin-password"], check=True, capture_output=True)
    extra = f"allow_anonymous false\nplugin {find_dynsec_plugin()}\nplugin_opt_config_file {dynsec}\n"
    external = Broker(tmp_path / "external", extra_config=extra)
    external.start()
    probes: list[Probe] = []
    try:
        # The operator's dynsec admin creates the hub's role and user once...
        with BrokerAdmin(external.url, "admin", "admin-password") as admin:
            admin.ensure_roles()
            admin.set_hub_credentials(HUB_USER, HUB_PASSWORD)
        # ...then the hub manages devices with its own user, exactly as on the embedded broker.
        with BrokerAdmin(external.url, HUB_USER, HUB_PASSWORD) as hub_admin:
            hub_admin.add_device("dev-a", "password-a")
            a = Probe(external.port, "dev-a", "password-a")
            probes.append(a)
            assert not a.connect().is_failure
            assert a.subscribe("autodl/v1/devices/dev-b/commands").is_failure
            assert not a.subscribe("autodl/v1/devices/dev-a/commands").is_failure
            hub_admin.remove_device("dev-a")
            assert a.wait(lambda: bool(a.disconnects))
    finally:
        for probe in probes:
            probe.close()
        external.stop()


def test_a_taken_port_is_a_clear_start_error(broker: EmbeddedBroker, tmp_path: Path) -> None:
    second = EmbeddedBroker(
        tmp_path / "second", port=broker.port, hub_username=HUB_USER, hub_password="x", bind_host="127.0.0.1"
    )
    with pytest.raises(BrokerStartError, match="mosquitto"):
        second.start()
    assert not second.running
    assert broker.running


def test_a_corrupt_dynamic_security_file_is_set_aside(tmp_path: Path) -> None:
    directory = tmp_path / "mq"
    directory.mkdir()
    (directory / "dynamic-security.json").write_text("{ not json")
    with EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password=HUB_PASSWORD, bind_host="127.0.0.1"
    ) as broker:
        probe = Probe(broker.port, HUB_USER, HUB_PASSWORD)
        try:
            assert not probe.connect().is_failure
        finally:
            probe.close()
    assert list(directory.glob("dynamic-security.json.corrupt-*"))

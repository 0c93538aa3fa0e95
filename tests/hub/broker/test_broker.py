"""The embedded mosquitto: per-device logins and ACLs, runtime changes, supervision.

Each behaviour runs against both ways the hub manages a broker's users: the embedded
broker's password file with ``%u`` pattern ACLs reloaded in batches ("passwd", the
default) and the dynamic-security plugin an external mosquitto runs ("dynsec").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pytest

from hub.broker.admin import device_role_acls, write_hub_dynsec
from hub.broker.admin import hash_password as dynsec_hash
from hub.broker.embedded import (
    BrokerAdmin,
    BrokerStartError,
    EmbeddedBroker,
    find_dynsec_plugin,
    load_or_create_hub_password,
)
from hub.broker.passwd import PasswordFileUsers, hash_password, mqtt_login, read_password_file, verify_password
from hub.messaging.session import hub_client_id
from shared import topics
from shared.topics import DeviceChannel
from tests.support.broker import secured_broker
from tests.support.mqtt import Probe
from tests.support.processes import Broker, free_port
from tests.support.waiting import wait_for

HUB_USER = "autodl-hub"
HUB_PASSWORD = "hub-secret-password"


Users = PasswordFileUsers | BrokerAdmin


@pytest.fixture(params=["passwd", "dynsec"])
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EmbeddedBroker]:
    """An embedded broker on a free loopback port in this test's data dir, with each kind of auth."""
    embedded = secured_broker(
        tmp_path / "mosquitto", hub_password=HUB_PASSWORD, roles=False, backoff_min_s=0.1, auth=request.param
    )
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture
def passwd_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """The embedded broker as `autodl-hub serve` runs it: password file and pattern ACLs."""
    embedded = secured_broker(tmp_path / "mosquitto", hub_password=HUB_PASSWORD, auth="passwd")
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture
def admin(broker: EmbeddedBroker) -> Iterator[Users]:
    """What manages the broker's devices, with devices A and B added."""
    with broker.admin() as client:
        if isinstance(client, BrokerAdmin):
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
    broker: EmbeddedBroker, admin: Users, probes: list[Probe]
) -> None:
    hub = connected(broker, probes, HUB_USER, HUB_PASSWORD)
    a = connected(broker, probes, "dev-a", "password-a")
    b = connected(broker, probes, "dev-b", "password-b")
    b_commands = topics.device_topic("dev-b", DeviceChannel.COMMANDS)
    b_desired = topics.device_topic("dev-b", DeviceChannel.DESIRED)
    b_telemetry = topics.device_topic("dev-b", DeviceChannel.TELEMETRY)
    a_telemetry = topics.device_topic("dev-a", DeviceChannel.TELEMETRY)
    a_desired = topics.device_topic("dev-a", DeviceChannel.DESIRED)
    hub.publish(b_desired, b"b's desired state", retain=True)

    # A subscribes to B's commands, to everything, to wildcards over devices. Dynamic security
    # refuses those SUBSCRIBEs; mosquitto 2.0's ACL file grants every SUBSCRIBE and checks each
    # message, live or retained, against the read patterns: A receives nothing of B's (below).
    stolen = [
        b_commands,
        "#",
        topics.device_wildcard(DeviceChannel.COMMANDS),
        topics.device_wildcard(DeviceChannel.DESIRED),
    ]
    subacks = [a.subscribe(f) for f in stolen]
    if broker.auth == "dynsec":
        assert all(r.is_failure for r in subacks)
    assert not a.subscribe(a_desired).is_failure
    assert not b.subscribe(b_commands).is_failure
    assert not b.subscribe(b_desired).is_failure
    assert b.wait_message(b_desired, b"b's desired state")
    assert not hub.subscribe(topics.device_wildcard(DeviceChannel.TELEMETRY)).is_failure

    # A publishes into B's telemetry and commands, then into its own telemetry. MQTT keeps one
    # client's messages in order, so once A's own message arrives the forged ones never will.
    a.publish(b_telemetry, b"forged telemetry")
    a.publish(b_commands, b"forged command")
    a.publish(a_telemetry, b"own telemetry")
    assert hub.wait_message(a_telemetry, b"own telemetry")
    hub.publish(b_commands, b"real command")
    assert b.wait_message(b_commands, b"real command")
    hub.publish(a_desired, b"a's own desired state")  # after B's command: once A has it, B's never comes
    assert a.wait_message(a_desired, b"a's own desired state")
    assert hub.received(b_telemetry) == []
    assert b.received(b_commands) == [b"real command"]
    assert a.received(b_commands) == [] and a.received(b_desired) == []


def test_device_publishes_its_own_topics_and_reads_no_releases(
    broker: EmbeddedBroker, admin: Users, probes: list[Probe]
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
    # Releases would tell a device which models the hub holds: it learns versions from its desired
    # state. Dynamic security refuses the SUBSCRIBE; with the ACL file nothing is delivered (below).
    subacks = [a.subscribe(topics.release_wildcard()), a.subscribe(release)]
    if broker.auth == "dynsec":
        assert all(r.is_failure for r in subacks)
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
    assert a.received(release) == []


def test_hub_has_full_access_and_strangers_are_refused(
    broker: EmbeddedBroker, admin: Users, probes: list[Probe]
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
    broker: EmbeddedBroker, admin: Users, probes: list[Probe]
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
    broker: EmbeddedBroker, admin: Users, probes: list[Probe]
) -> None:
    hub = connected(broker, probes, HUB_USER, HUB_PASSWORD)
    b = connected(broker, probes, "dev-b", "password-b")
    b_desired = topics.device_topic("dev-b", DeviceChannel.DESIRED)
    assert not b.subscribe(b_desired).is_failure

    for i in range(5):
        admin.add_device(f"new-{i}", f"password-new-{i}")
    if isinstance(admin, BrokerAdmin):
        admin.ensure_roles()  # already set up: must change nothing
    c = connected(broker, probes, "new-4", "password-new-4")

    hub.publish(b_desired, b"after enrollments")
    assert b.wait_message(b_desired, b"after enrollments")
    assert hub.disconnects == [] and b.disconnects == [] and c.disconnects == []
    assert len(hub.connacks) == 1 and len(b.connacks) == 1
    assert set(admin.list_devices()) == {"dev-a", "dev-b", *(f"new-{i}" for i in range(5))}


def test_reenrolling_a_device_replaces_its_password(broker: EmbeddedBroker, admin: Users, probes: list[Probe]) -> None:
    admin.add_device("dev-a", "new-password-a")
    assert connect(broker, probes, "dev-a", "password-a").connacks[-1].is_failure
    connected(broker, probes, "dev-a", "new-password-a")


def test_reconcile_removes_devices_the_hub_no_longer_knows(
    broker: EmbeddedBroker, admin: Users, probes: list[Probe]
) -> None:
    assert admin.reconcile(["dev-a"]) == ["dev-b"]
    connected(broker, probes, "dev-a", "password-a")
    assert connect(broker, probes, "dev-b", "password-b").connacks[-1].is_failure


def test_supervisor_restarts_a_killed_broker_with_its_devices(
    broker: EmbeddedBroker, admin: Users, probes: list[Probe]
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


@pytest.mark.parametrize("auth", ["passwd", "dynsec"])
def test_stop_ends_mosquitto_and_start_keeps_state(tmp_path: Path, auth: Literal["passwd", "dynsec"]) -> None:
    directory = tmp_path / "mq"
    first = EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password="pw-1", bind_host="127.0.0.1", auth=auth
    )
    with first:
        pid = first.pid
        with first.admin() as admin:
            admin.add_device("dev-a", "password-a")
    assert pid is not None and not first.running
    wait_for('not os.path.exists(f"/proc/{pid}")', lambda: not os.path.exists(f"/proc/{pid}"))

    # A new hub password rewrites the hub's entry but keeps the devices.
    second = EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password="pw-2", bind_host="127.0.0.1", auth=auth
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
    conf = (directory / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf
    if auth == "dynsec":
        config = json.loads((directory / "dynamic-security.json").read_text())
        assert config["defaultACLAccess"]["subscribe"] is False
        assert (directory / "dynamic-security.json").stat().st_mode & 0o077 == 0
        assert f"plugin {find_dynsec_plugin()}" in conf
    else:
        assert "plugin" not in conf and "use_username_as_clientid true" in conf
        assert set(read_password_file(directory / "passwd")) >= {HUB_USER, "dev-a"}
        for name in ("passwd", "acl"):
            assert (directory / name).stat().st_mode & 0o077 == 0


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
        directory,
        port=free_port(),
        hub_username=HUB_USER,
        hub_password=HUB_PASSWORD,
        bind_host="127.0.0.1",
        auth="dynsec",
    ) as broker:
        probe = Probe(broker.port, HUB_USER, HUB_PASSWORD)
        try:
            assert not probe.connect().is_failure
        finally:
            probe.close()
    assert list(directory.glob("dynamic-security.json.corrupt-*"))


def test_devices_of_a_dynamic_security_data_dir_keep_their_passwords(tmp_path: Path) -> None:
    # A data dir from before the password file: the hub's user and a device in dynamic-security.json.
    directory = tmp_path / "mq"
    directory.mkdir()
    path = directory / "dynamic-security.json"
    write_hub_dynsec(path, HUB_USER, HUB_PASSWORD)
    config = json.loads(path.read_text())
    device = {"username": "dev-old", "clientid": "dev-old", "roles": [{"rolename": "autodl-device-dev-old"}]}
    config["clients"].append({**device, **dynsec_hash("old-password")})
    path.write_text(json.dumps(config))

    probes: list[Probe] = []
    with EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password=HUB_PASSWORD, bind_host="127.0.0.1"
    ) as broker:
        try:
            connected(broker, probes, "dev-old", "old-password")
            assert connect(broker, probes, "dev-old", "other-password").connacks[-1].is_failure
            assert broker.users.list_devices() == ["dev-old"]
        finally:
            for probe in probes:
                probe.close()
    assert not path.exists() and (directory / "dynamic-security.json.migrated").exists()


def test_mosquitto_and_the_hub_read_each_others_password_hashes(passwd_broker: EmbeddedBroker, tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    written = tmp_path / "by-mosquitto"
    subprocess.run([tool, "-c", "-b", str(written), "dev-x", "the-password"], check=True, capture_output=True)
    encoded = read_password_file(written)["dev-x"]
    assert encoded.startswith("$7$")
    assert verify_password("the-password", encoded) and not verify_password("another", encoded)

    # ...and the real mosquitto accepts what the hub writes (and only with that password).
    ours = hash_password("hub-made-password")
    assert ours.startswith("$7$1$") and verify_password("hub-made-password", ours)
    passwd_broker.users.add_device("dev-y", "hub-made-password")
    assert mqtt_login(passwd_broker.connect_host, passwd_broker.port, "dev-y", "hub-made-password") == 0
    assert mqtt_login(passwd_broker.connect_host, passwd_broker.port, "dev-y", "the-password") != 0


def test_enrollments_arriving_together_share_reloads_and_each_can_log_in_at_once(
    passwd_broker: EmbeddedBroker, probes: list[Probe]
) -> None:
    users = passwd_broker.users
    users.add_device("dev-early", "password-early")
    early = connected(passwd_broker, probes, "dev-early", "password-early")
    before = users.reloads
    start = threading.Barrier(40)

    def enroll(i: int) -> int:
        start.wait()
        users.add_device(f"dev-{i:03d}", f"password-{i}")
        # Returned: the broker runs with it, so the device's first CONNECT succeeds.
        return mqtt_login(passwd_broker.connect_host, passwd_broker.port, f"dev-{i:03d}", f"password-{i}")

    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(enroll, range(40)))

    assert codes == [0] * 40
    assert users.reloads - before < 20, f"{users.reloads - before} reloads for 40 enrollments"
    assert len(read_password_file(passwd_broker.password_path)) == 1 + 1 + 1 + 40  # hub, probe, early, 40
    assert early.disconnects == [] and len(early.connacks) == 1  # reloads keep everyone else connected


def test_devices_removed_together_are_all_dropped(passwd_broker: EmbeddedBroker, probes: list[Probe]) -> None:
    # mosquitto 2.0.11 drops only one connected client per reload: the hub spaces such removals.
    users = passwd_broker.users
    for i in range(5):
        users.add_device(f"dev-{i}", f"password-{i}")
    stale = [connected(passwd_broker, probes, f"dev-{i}", f"password-{i}") for i in range(1, 5)]
    kept = connected(passwd_broker, probes, "dev-0", "password-0")

    assert users.reconcile(["dev-0"]) == ["dev-1", "dev-2", "dev-3", "dev-4"]

    assert all(p.wait(lambda p=p: bool(p.disconnects)) for p in stale), "a removed device stayed connected"
    assert kept.disconnects == []
    assert users.list_devices() == ["dev-0"]


def test_a_device_presenting_another_clients_id_is_refused_and_the_victim_keeps_its_session(
    broker: EmbeddedBroker, admin: Users, probes: list[Probe]
) -> None:
    hub_id = hub_client_id(HUB_USER, HUB_PASSWORD)
    hub = Probe(broker.port, HUB_USER, HUB_PASSWORD, client_id=hub_id, clean_start=False)
    victim = Probe(broker.port, "dev-b", "password-b", clean_start=False)
    probes += [hub, victim]
    assert not hub.connect().is_failure and not victim.connect().is_failure
    b_desired = topics.device_topic("dev-b", DeviceChannel.DESIRED)
    b_telemetry = topics.device_topic("dev-b", DeviceChannel.TELEMETRY)
    assert not victim.subscribe(b_desired).is_failure
    assert not hub.subscribe(topics.device_wildcard(DeviceChannel.TELEMETRY)).is_failure

    # Device A, with its own valid credentials, presents B's client id, then the hub's. paho
    # retries every second or two: the takeover loop of the report, kept up for a while.
    attackers = [Probe(broker.port, "dev-a", "password-a", client_id=target) for target in ("dev-b", hub_id)]
    probes += attackers
    if broker.auth == "dynsec":
        # The client id is bound to the user: refused, again and again.
        for attacker in attackers:
            assert attacker.connect().value == 135  # not authorized
        assert all(a.wait(lambda a=a: len(a.connacks) >= 2, timeout=10) for a in attackers)
        assert all(c.is_failure for a in attackers for c in a.connacks)
    else:
        # use_username_as_clientid: the broker replaces the client id with the username, so A
        # only ever reaches its own session (the two attackers take it from each other).
        for attacker in attackers:
            attacker.connect()
        assert all(a.wait(lambda a=a: len(a.connacks) >= 2, timeout=10) for a in attackers)
    for attacker in attackers:
        attacker.close()

    assert victim.disconnects == [] and hub.disconnects == []
    victim.publish(b_telemetry, b"still here")
    assert hub.wait_message(b_telemetry, b"still here")
    # The victim's persistent session is intact: a message sent while it is away waits for it.
    victim.close()
    hub.publish(b_desired, b"while away")
    back = Probe(broker.port, "dev-b", "password-b", clean_start=False)
    probes.append(back)
    assert not back.connect().is_failure
    assert back.wait_message(b_desired, b"while away")


def test_devices_enrolled_before_the_binding_are_bound_at_start(tmp_path: Path) -> None:
    path = tmp_path / "dynamic-security.json"
    device = {"username": "dev-old", "roles": [{"rolename": "autodl-device-dev-old"}]}
    old_acl = {"acltype": "subscribePattern", "topic": topics.release_wildcard(), "allow": True}
    role = {"rolename": "autodl-device-dev-old", "acls": [old_acl]}
    path.write_text(json.dumps({"clients": [device], "roles": [role], "groups": []}))
    write_hub_dynsec(path, HUB_USER, HUB_PASSWORD)
    written = json.loads(path.read_text())
    clients = {c["username"]: c for c in written["clients"]}
    assert clients["dev-old"]["clientid"] == "dev-old"
    assert "clientid" not in clients[HUB_USER]
    roles = {r["rolename"]: r for r in written["roles"]}
    assert roles["autodl-device-dev-old"]["acls"] == device_role_acls("dev-old")  # no more release topics


def test_the_hubs_client_id_is_stable_per_replica_and_not_guessable() -> None:
    first = hub_client_id("autodl-hub", "secret", "hub-0")
    assert first == hub_client_id("autodl-hub", "secret", "hub-0")
    assert first != hub_client_id("autodl-hub", "secret", "hub-1")
    assert first != hub_client_id("autodl-hub", "other-secret", "hub-0")
    assert "hub-0" not in first and first.startswith("autodl-hub-")

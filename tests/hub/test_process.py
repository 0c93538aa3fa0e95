"""The hub as users run it: `autodl-hub init` and `autodl-hub serve` as processes, real HTTP and MQTT."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from hub.broker.embedded import EmbeddedBroker
from hub.broker.passwd import mqtt_login, read_password_file
from shared import topics
from shared.codec import decode, encode
from shared.manifest import load_public_key, verify_manifest
from shared.messages import DesiredState, EnrollResponse, TelemetryBatch, TelemetryPoint, utcnow
from shared.topics import DeviceChannel
from tests.support.hub import HubProcess
from tests.support.hub_app import build_version
from tests.support.mqtt import Probe
from tests.support.postgres import pg_schema_url
from tests.support.processes import free_port
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _upload(hub: HubProcess, tmp_path: Path) -> tuple[str, bytes]:
    built = build_version(tmp_path / "build", size=2_000_000)
    parts = [("manifest", ("manifest.json", built.manifest.model_dump_json().encode(), "application/json"))]
    parts += [("files", (name, path.read_bytes(), "application/octet-stream")) for name, path in built.files.items()]
    with hub.api() as client:
        response = client.post("/models/digits/versions", files=parts)
    assert response.status_code == 201, response.text
    variant = built.manifest.variants[0]
    return variant.sha256, built.files[variant.file].read_bytes()


def _enroll(hub: HubProcess, token: str, name: str) -> EnrollResponse:
    response = httpx.post(f"{hub.url}/enroll", json={"token": token, "name": name}, timeout=30)
    assert response.status_code == 200, response.text
    return EnrollResponse.model_validate(response.json())


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_enroll_deploy_download_and_decommission_against_a_real_hub(hub_process: HubProcess, tmp_path: Path) -> None:
    hub = hub_process
    created = hub.run_cli("token", "create", "--max-uses", "2", "--label", "site=lab", "--json").stdout
    token = json.loads(created)["token"]
    device = _enroll(hub, token, "cam-1")
    other = _enroll(hub, token, "cam-2")
    assert device.mqtt_port == hub.mqtt_port and device.labels == {"site": "lab"}
    sha, data = _upload(hub, tmp_path)

    # The device logs in to the embedded broker with its own credentials and gets its desired state.
    probe = Probe(device.mqtt_port, device.mqtt_username, device.mqtt_password)
    try:
        assert probe.connect().is_failure is False
        desired_topic = topics.device_topic(device.device_id, DeviceChannel.DESIRED)
        assert probe.subscribe(desired_topic).is_failure is False
        with hub.api() as client:
            deployed = client.put(f"/devices/{device.device_id}/models/digits", json={"version": "latest"})
        assert deployed.status_code == 200, deployed.text
        assert probe.wait(lambda: bool(probe.received(desired_topic)), timeout=15), hub.log_tail()
        state = decode(probe.received(desired_topic)[-1], DesiredState)
        assert state.revision == 1 and state.models["digits"].version == "1.0.0"

        # Telemetry sent twice (at-least-once) is stored once and shows in the API and /metrics.
        points = [TelemetryPoint(seq=i, ts=utcnow(), name="latency_ms", value=float(i)) for i in range(5)]
        batch = encode(TelemetryBatch(device_id=device.device_id, points=points))
        telemetry_topic = topics.device_topic(device.device_id, DeviceChannel.TELEMETRY)
        for _ in range(2):  # the broker must accept both copies (a refused PUBACK is a failure code)
            ack = probe.publish(telemetry_topic, batch)
            assert ack is not None and not ack.is_failure, ack
        with hub.api() as client:

            def stored() -> list[int]:
                answer = client.get("/telemetry", params={"device_id": device.device_id}).json()
                return [p["seq"] for p in answer["points"]]

            wait_for("stored() == [0, 1, 2, 3, 4]", lambda: stored() == [0, 1, 2, 3, 4], 15)
            metrics = client.get("/metrics").text
        ingested = re.search(r'^autodl_hub_mqtt_messages_ingested_total\{kind="telemetry"\} (\S+)$', metrics, re.M)
        assert ingested is not None and float(ingested.group(1)) >= 1
        assert "autodl_hub_devices_online 1.0" in metrics
    finally:
        probe.close()

    # The manifest it names verifies with the key from enrollment; the file downloads resumably.
    auth = {"Authorization": f"Bearer {device.device_token}"}
    manifest = httpx.get(state.models["digits"].manifest_url, headers=auth, timeout=30)
    assert hashlib.sha256(manifest.content).hexdigest() == state.models["digits"].manifest_sha256
    verify_manifest(manifest.content, load_public_key(device.signing_public_key))
    received = bytearray()
    with httpx.stream("GET", f"{hub.url}/artifacts/{sha}", headers=auth, timeout=30) as partial:
        for chunk in partial.iter_bytes():
            received += chunk
            if len(received) > 500_000:
                break  # the connection drops mid-download
    assert len(received) < len(data)
    rest = httpx.get(f"{hub.url}/artifacts/{sha}", headers={**auth, "Range": f"bytes={len(received)}-"}, timeout=30)
    assert rest.status_code == 206
    assert hashlib.sha256(bytes(received) + rest.content).hexdigest() == sha

    # The other device was not given the version: its token reads neither the manifest nor the file.
    other_auth = {"Authorization": f"Bearer {other.device_token}"}
    assert httpx.get(state.models["digits"].manifest_url, headers=other_auth, timeout=30).status_code == 404
    assert httpx.get(f"{hub.url}/artifacts/{sha}", headers=other_auth, timeout=30).status_code == 404
    assert (
        httpx.get(f"{hub.url}/artifacts/{sha}", headers={"Authorization": f"Bearer {hub.admin_key}"}).status_code == 200
    )

    # The CLI talks to the same hub.
    listed = hub.run_cli("device", "list", "--hub", hub.url, "--api-key", hub.admin_key).stdout
    assert device.device_id in listed and other.device_id in listed

    # Decommissioning revokes HTTP and MQTT at once, and drops the device's live connection.
    live = Probe(device.mqtt_port, device.mqtt_username, device.mqtt_password)
    try:
        assert live.connect().is_failure is False
        decommission = hub.run_cli(
            "device", "decommission", device.device_id, "--hub", hub.url, "--api-key", hub.admin_key
        )
        assert "decommissioned" in decommission.stdout
        assert live.wait(lambda: bool(live.disconnects), timeout=15), "the decommissioned device stayed connected"
    finally:
        live.close()
    assert httpx.get(f"{hub.url}/artifacts/{sha}", headers=auth, timeout=30).status_code == 401
    refused = Probe(device.mqtt_port, device.mqtt_username, device.mqtt_password)
    try:
        assert refused.connect().is_failure
    finally:
        refused.close()
    still = Probe(other.mqtt_port, other.mqtt_username, other.mqtt_password)
    try:
        assert still.connect().is_failure is False
    finally:
        still.close()

    # SIGTERM stops the hub cleanly, and its mosquitto with it.
    assert hub.stop(signal.SIGTERM) == 0
    wait_for("not _listening(hub.mqtt_port)", lambda: not _listening(hub.mqtt_port), 10)


def test_devices_enrolling_together_can_each_log_in_at_once(hub_process: HubProcess) -> None:
    # The embedded broker takes the logins of enrollments that arrive together in one reload;
    # each answer comes only once the broker knows the device, so its first CONNECT succeeds.
    hub = hub_process
    token = hub.enrollment_token(max_uses=24)
    with ThreadPoolExecutor(24) as pool:
        devices = list(pool.map(lambda i: _enroll(hub, token, f"edge-{i}"), range(24)))

    def first_login(device: EnrollResponse) -> int:
        return mqtt_login("127.0.0.1", device.mqtt_port, device.mqtt_username, device.mqtt_password)

    with ThreadPoolExecutor(24) as pool:
        assert list(pool.map(first_login, devices)) == [0] * 24
    passwd = read_password_file(hub.data_dir / "mosquitto" / "passwd")
    assert {d.device_id for d in devices} <= set(passwd)


def test_http_only_hub_on_postgresql(tmp_path: Path) -> None:
    urls = pg_schema_url()
    with HubProcess(tmp_path / "hub", mqtt=False, database_url=next(urls)) as hub:
        assert not _listening(hub.mqtt_port)
        token = hub.enrollment_token()
        assert _enroll(hub, token, "solo").device_id.startswith("dev-")
        assert httpx.post(f"{hub.url}/enroll", json={"token": token}, timeout=30).status_code == 401
    urls.close()  # drops the PostgreSQL schema


def test_serve_with_an_external_broker(tmp_path: Path) -> None:
    # A mosquitto with dynamic security that the hub did not start: the --mqtt-url set-up.
    broker = EmbeddedBroker(
        tmp_path / "external-mosquitto",
        port=free_port(),
        hub_username="autodl-hub",
        hub_password="external-secret",
        bind_host="127.0.0.1",
        auth="dynsec",
    )
    broker.start()
    try:
        env = {"AUTODL_HUB_MQTT_PASSWORD": "external-secret", "AUTODL_HUB_MQTT_PUBLIC_PORT": str(broker.port)}
        with HubProcess(tmp_path / "hub", mqtt_url=broker.url, env=env) as hub:
            assert not _listening(hub.mqtt_port)  # no embedded broker
            device = _enroll(hub, hub.enrollment_token(), "edge")
            assert device.mqtt_port == broker.port
            probe = Probe(device.mqtt_port, device.mqtt_username, device.mqtt_password)
            try:
                assert probe.connect().is_failure is False
            finally:
                probe.close()
    finally:
        broker.stop()

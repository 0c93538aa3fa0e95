"""Trust end to end: a hub serving HTTPS and MQTT over TLS with the CA `autodl-hub init` made,
agents that enroll pinned to it (`--ca-hash`, as kubeadm join), a hub with another
certificate that gets neither the token nor the device, and devices that log in to the
broker with their own certificate until decommissioning revokes it.
"""

from __future__ import annotations

import json
import shlex
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from hub.security import signing_public_key
from tests.support.agent import AgentProcess
from tests.support.hub import HubProcess
from tests.support.models import SAMPLE_X, linear_weights, make_release, reference
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "lin"
WRONG_PIN = "sha256:" + "0" * 64


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    with HubProcess(tmp_path / "hub", tls=True) as process:
        yield process


def _plain_mqtt_connack(port: int) -> bytes:
    """Send a plain-text MQTT CONNECT to 127.0.0.1:`port`; return the first bytes of the answer."""
    connect = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 1]) + b"x"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect)
        try:
            return sock.recv(4)
        except (ConnectionResetError, TimeoutError):
            return b""


def _enrolled_nothing(state_dir: Path) -> bool:
    return not (state_dir / "identity.json").exists() and not (state_dir / "ca.pem").exists()


def test_agent_pins_the_hub_ca_enrolls_over_https_and_converges_over_mqtt_tls(hub: HubProcess, tmp_path: Path) -> None:
    answer = hub.enrollment()
    command = shlex.split(answer["enroll_command"])
    assert command[:4] == ["autodl-agent", "enroll", "--hub", hub.url] and hub.url.startswith("https://")
    assert command[command.index("--ca-hash") + 1] == hub.ca_hash

    state_dir = tmp_path / "agent"
    agent = AgentProcess(state_dir)
    refused = agent.run_cli(
        "enroll", "--hub", hub.url, "--token", answer["token"], "--ca-hash", WRONG_PIN, "--state-dir", str(state_dir)
    )
    assert refused.returncode == 1 and "does not match --ca-hash" in refused.stderr
    assert _enrolled_nothing(state_dir)

    # The command as printed (the single-use token was not spent by the refused attempt).
    out = agent.run_cli(*command[1:], "--state-dir", str(state_dir))
    assert out.returncode == 0, out.stderr
    device = out.stdout.split()[2]
    assert (state_dir / "ca.pem").read_bytes() == hub.ca_file.read_bytes()
    identity = json.loads((state_dir / "identity.json").read_text())
    assert identity["mqtt_tls"] is True and identity["signing_public_key"] == signing_public_key(
        hub.settings.signing_key
    )
    # The broker speaks TLS only: a plain-text CONNECT gets no CONNACK.
    assert _plain_mqtt_connack(hub.mqtt_port)[:1] != b"\x20"

    hub.upload(make_release(Ed25519PrivateKey.generate(), MODEL, "1.0.0", seed=1))
    agent.start()
    try:
        agent.wait_live()
        hub.deploy(device, MODEL, "1.0.0")
        wait_for("v1 served", lambda: agent.serving(MODEL) == "1.0.0", 90)
        np.testing.assert_allclose(agent.infer(MODEL)[1], reference(SAMPLE_X, *linear_weights(1)), atol=1e-5)
        # Reported back over MQTT/TLS: the hub knows what the device runs.
        wait_for("hub sees v1", lambda: hub.reported(device, MODEL).get("active") == "1.0.0", 60)
    finally:
        agent.stop()


def test_a_hub_with_another_certificate_gets_neither_the_token_nor_the_device(hub: HubProcess, tmp_path: Path) -> None:
    token = hub.enrollment_token()
    with HubProcess(tmp_path / "mitm", tls=True) as mitm:
        mitm_verify = mitm.verify
        mitm_ca = tmp_path / "mitm-ca.pem"
        mitm_ca.write_bytes(mitm.ca_file.read_bytes())
        state_dir = tmp_path / "agent"
        agent = AgentProcess(state_dir)

        def enroll_with(url: str) -> tuple[int, str]:
            out = agent.run_cli(
                "enroll", "--hub", url, "--token", token, "--ca-hash", hub.ca_hash, "--state-dir", str(state_dir)
            )
            return out.returncode, out.stderr

        # Its own CA: the pin does not match.
        code, err = enroll_with(mitm.url)
        assert code == 1 and "does not match --ca-hash" in err, err
        assert _enrolled_nothing(state_dir)

        # It serves the real hub's CA (public, after all), but cannot prove it holds a certificate from it.
        mitm.ca_file.write_bytes(hub.ca_file.read_bytes())
        code, err = enroll_with(mitm.url)
        assert code == 1 and "does not chain to the trusted CA" in err, err
        assert _enrolled_nothing(state_dir)
        with mitm.api(verify=mitm_verify) as client:
            assert client.get("/devices").json() == []  # the token never reached it

    # The real hub: the same token works, and the signing key the agent keeps is the real hub's.
    device = agent.enroll(hub.url, token, "--ca-hash", hub.ca_hash)
    identity = json.loads((state_dir / "identity.json").read_text())
    assert identity["device_id"] == device
    assert identity["signing_public_key"] == signing_public_key(hub.settings.signing_key)
    assert identity["signing_public_key"] != signing_public_key(mitm.settings.signing_key)

    # A CA from elsewhere (--ca-file) instead of a pin: the wrong one is refused, the right one kept.
    other_dir = tmp_path / "other"
    other = AgentProcess(other_dir)
    token = hub.enrollment_token()
    out = other.run_cli(
        "enroll", "--hub", hub.url, "--token", token, "--ca-file", str(mitm_ca), "--state-dir", str(other_dir)
    )
    assert out.returncode == 1 and "does not chain to the trusted CA" in out.stderr
    other.enroll(hub.url, token, "--ca-file", str(hub.ca_file))
    assert (other_dir / "ca.pem").read_bytes() == hub.ca_file.read_bytes()


def _certificate_login(hub: HubProcess, state_dir: Path) -> str:
    """Log in to the certificate listener with the device's certificate; return the outcome
    ("Success", or how the broker refused: in TLS 1.3 a refused client certificate closes the
    connection right after the handshake)."""
    done, outcome = threading.Event(), []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    client.tls_set(str(hub.ca_file), str(state_dir / "device.pem"), str(state_dir / "device.key"))
    client.on_connect = lambda _c, _u, _f, reason, _p: (outcome.append(str(reason)), done.set())
    client.on_disconnect = lambda _c, _u, _f, reason, _p: (outcome.append(f"closed: {reason}"), done.set())
    try:
        client.connect("127.0.0.1", hub.mtls_port, keepalive=10)
        client.loop_start()
        done.wait(10)
    except OSError as exc:  # the TLS handshake refused
        outcome.append(f"refused: {exc}")
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome[0] if outcome else "no answer"


def _connected(agent: AgentProcess) -> bool | None:
    try:
        return bool(httpx.get(f"{agent.url}/v1/status", timeout=5).json()["connected"])
    except httpx.HTTPError:
        return None


def test_device_certificate_logs_in_until_decommissioning_revokes_it(hub: HubProcess, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    agent = AgentProcess(state_dir)
    device = agent.enroll(hub.url, hub.enrollment_token(), "--ca-hash", hub.ca_hash, "--device-cert")
    key = state_dir / "device.key"
    assert key.stat().st_mode & 0o777 == 0o600
    certificate = x509.load_pem_x509_certificate((state_dir / "device.pem").read_bytes())
    certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(hub.ca_file.read_bytes()))
    assert certificate.subject.rfc4514_string() == f"CN={device}"
    identity = json.loads((state_dir / "identity.json").read_text())
    assert identity["client_certificate"] is True and identity["mqtt_port"] == hub.mtls_port
    assert key.read_bytes() not in b"".join(p.read_bytes() for p in hub.data_dir.rglob("*") if p.is_file())

    assert _certificate_login(hub, state_dir) == "Success"

    hub.upload(make_release(Ed25519PrivateKey.generate(), MODEL, "1.0.0", seed=1))
    agent.start()
    try:
        agent.wait_live()
        hub.deploy(device, MODEL, "1.0.0")
        wait_for("v1 served", lambda: agent.serving(MODEL) == "1.0.0", 90)
        wait_for("hub sees v1", lambda: hub.reported(device, MODEL).get("active") == "1.0.0", 60)
        assert _connected(agent) is True

        hub.call("POST", f"/devices/{device}/decommission")
        wait_for("the connected device dropped", lambda: _connected(agent) is False, 30)
        assert _certificate_login(hub, state_dir) != "Success", "the broker still takes the certificate"
        # It keeps trying (its backoff is short in tests), and stays out.
        with pytest.raises(Exception, match="still connected"):
            wait_for("still connected", lambda: _connected(agent), 5)
        broker_log = (hub.data_dir / "mosquitto" / "mosquitto.log").read_text()
        assert "certificate verify failed" in broker_log
    finally:
        agent.stop()

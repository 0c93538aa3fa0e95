"""Trust end to end: a hub serving HTTPS and MQTT over TLS with the CA `autodl-hub init` made,
agents that enroll pinned to it (`--ca-hash`, as kubeadm join), and a hub with another
certificate that gets neither the token nor the device.
"""

from __future__ import annotations

import json
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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

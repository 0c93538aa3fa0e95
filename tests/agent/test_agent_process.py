"""`autodl-agent run` as a real process: real mosquitto, real HTTP, real ONNX Runtime.

The hub's HTTP API is the in-test stand-in (tests/support/hubstub.py); tests/e2e repeats
these with the real hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.config import AgentSettings
from agent.enrollment import enroll
from shared import topics
from shared.messages import UpdateState
from tests.support.agent import AgentProcess
from tests.support.hubstub import HubStub, publish_desired, publisher
from tests.support.models import SAMPLE_X, linear_weights, make_release, reference
from tests.support.mqtt import Watcher
from tests.support.processes import Broker
from tests.support.traffic import Traffic
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def test_agent_converges_swaps_without_failures_and_refuses_bad_versions(
    tmp_state_dir: Path, hub_stub: HubStub, mqtt_broker: Broker, enrolled: str, watcher: Watcher
) -> None:
    device = enrolled
    releases = {
        "1.0.0": make_release(hub_stub.key, "m", "1.0.0", seed=1),
        "2.0.0": make_release(hub_stub.key, "m", "2.0.0", seed=2),
        "3.0.0": make_release(hub_stub.key, "m", "3.0.0", seed=3),
        "4.0.0": make_release(hub_stub.key, "m", "4.0.0", seed=4, wrong_sample=True),
    }
    desired = {v: hub_stub.publish(r) for v, r in releases.items()}
    bad = releases["3.0.0"]
    data = hub_stub.artifacts[bad.sha256]
    hub_stub.artifacts[bad.sha256] = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]

    agent = AgentProcess(tmp_state_dir).start()
    try:
        with publisher(mqtt_broker.host, mqtt_broker.port) as hub_mqtt:
            publish_desired(hub_mqtt, device, 1, {"m": desired["1.0.0"]})
            agent.wait_live()
            wait_for("v1 served", lambda: agent.serving("m") == "1.0.0")
            version, y = agent.infer("m")
            np.testing.assert_allclose(y, reference(SAMPLE_X, *linear_weights(1)), rtol=1e-5, atol=1e-5)
            state = watcher.wait_reported(lambda r: r.revision == 1 and r.models["m"].active == "1.0.0")
            assert state.device_id == device and state.profile is not None and state.update_state == UpdateState.ACTIVE
            wait_for("online presence", lambda: any(p.online for p in watcher.presence))

            # The broker restarts: the agent reconnects, resubscribes and still gets new desired states.
            mqtt_broker.restart()

        with publisher(mqtt_broker.host, mqtt_broker.port) as hub_mqtt:
            with Traffic([agent], "m", pause_s=0) as traffic:
                wait_for("requests answered by v1", lambda: "1.0.0" in traffic.versions, 30)
                publish_desired(hub_mqtt, device, 2, {"m": desired["2.0.0"]})
                wait_for("v2 served", lambda: agent.serving("m") == "2.0.0")
                wait_for("requests answered by v2", lambda: "2.0.0" in traffic.versions)
            assert traffic.failures == [] and traffic.versions == {"1.0.0", "2.0.0"}
            np.testing.assert_allclose(agent.infer("m")[1], reference(SAMPLE_X, *linear_weights(2)), atol=1e-5)
            state = watcher.wait_reported(lambda r: r.revision == 2 and r.models["m"].active == "2.0.0")
            assert state.models["m"].previous == "1.0.0"

            # A corrupted artifact is refused; v2 keeps serving.
            publish_desired(hub_mqtt, device, 3, {"m": desired["3.0.0"]})
            state = watcher.wait_reported(lambda r: r.revision == 3 and r.models["m"].state == UpdateState.ROLLED_BACK)
            assert "sha256" in (state.models["m"].error or "") and state.models["m"].active == "2.0.0"
            assert agent.infer("m")[0] == "2.0.0"

            # A model failing its smoke test is refused; v2 keeps serving.
            publish_desired(hub_mqtt, device, 4, {"m": desired["4.0.0"]})
            state = watcher.wait_reported(lambda r: r.revision == 4 and r.models["m"].state == UpdateState.ROLLED_BACK)
            assert "max difference" in (state.models["m"].error or "") and state.models["m"].active == "2.0.0"
            assert agent.infer("m")[0] == "2.0.0"

            # A desired state that fails validation is reported, and the daemon stays up.
            hub_mqtt.publish(
                topics.device_topic(device, topics.DeviceChannel.DESIRED), b'{"kind": "desired_state"}', qos=1
            ).wait_for_publish(5)
            watcher.wait_reported(lambda r: any("desired state rejected" in e for e in r.errors))
            assert agent.infer("m")[0] == "2.0.0"

            # A broker that crashed brings back an old retained desired state: older than one
            # seen already, it is counted and ignored, so v2 keeps serving and nothing is refused.
            publish_desired(hub_mqtt, device, 1, {"m": desired["1.0.0"]})
            stale = 'autodl_agent_mqtt_messages_rejected_total{reason="stale_revision"} 1'
            wait_for("the stale desired state counted", lambda: stale in httpx.get(f"{agent.url}/metrics").text)
            assert agent.infer("m")[0] == "2.0.0"
            assert httpx.get(f"{agent.url}/v1/status").json()["applied_revision"] == 4

        status = subprocess.run(
            [*STATUS, "--state-dir", str(tmp_state_dir), "--port", str(agent.port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0 and "running, connected" in status.stdout and "active=2.0.0" in status.stdout
        base = ["--state-dir", str(tmp_state_dir), "--port", str(agent.port)]
        listed = subprocess.run([*CLI, "models", *base], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and listed.stdout.split()[:3] == ["m", "2.0.0", "cpu-fp32"]
        predicted = subprocess.run(
            [*CLI, "predict", "m", "[1, 2, 3, 4]", *base], capture_output=True, text=True, timeout=60
        )
        assert predicted.returncode == 0, predicted.stderr
        got = np.asarray(json.loads(predicted.stdout)["predictions"][0], np.float32)
        np.testing.assert_allclose(got, reference(SAMPLE_X[:1], *linear_weights(2))[0], rtol=1e-5, atol=1e-5)
        wrong = subprocess.run([*CLI, "predict", "m", "[1, 2]", *base], capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1 and "HTTP 400" in wrong.stderr and "float32[batch, 4]" in wrong.stderr
    finally:
        assert agent.stop() == 0, agent.log_tail()
    assert watcher.presence[-1].online is False


CLI = [sys.executable, "-c", "from agent.cli import main; main()"]
STATUS = [*CLI, "status"]


def test_kill9_during_download_resumes_with_range(
    tmp_state_dir: Path, hub_stub: HubStub, mqtt_broker: Broker, enrolled: str
) -> None:
    release = make_release(hub_stub.key, "m", "1.0.0", seed=1, padding_bytes=400_000)
    desired = hub_stub.publish(release)
    hub_stub.hold_after = 100_000
    agent = AgentProcess(tmp_state_dir).start()
    try:
        with publisher(mqtt_broker.host, mqtt_broker.port) as hub_mqtt:
            publish_desired(hub_mqtt, enrolled, 1, {"m": desired})
        assert hub_stub.holding.wait(60), agent.log_tail()
        part = tmp_state_dir / "cache" / "partial" / f"{release.sha256}.part"
        wait_for("partial file on disk", lambda: part.exists() and part.stat().st_size > 0)
        agent.kill9()
        kept = part.stat().st_size
        hub_stub.hold_after = None
        hub_stub.released.set()
        hub_stub.ranges.clear()
        agent = AgentProcess(tmp_state_dir).start()
        agent.wait_live()
        wait_for("v1 served after resume", lambda: agent.serving("m") == "1.0.0")
        assert hub_stub.ranges[0] == f"bytes={kept}-"
        assert agent.infer("m")[0] == "1.0.0"
    finally:
        agent.stop()


def test_bad_mqtt_credentials_are_fatal_with_a_clear_message(
    tmp_path: Path, tmp_state_dir: Path, hub_stub: HubStub
) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "dev-1", "not-the-secret"], check=True, capture_output=True
    )
    broker = Broker(tmp_path / "secure", extra_config=f"allow_anonymous false\npassword_file {passwd}\n")
    broker.start()
    try:
        hub_stub.mqtt_host, hub_stub.mqtt_port = broker.host, broker.port
        enroll(AgentSettings(state_dir=tmp_state_dir), hub_stub.url, "good-token")
        agent = AgentProcess(tmp_state_dir).start()
        assert agent.proc is not None
        code = agent.proc.wait(60)
        assert code == 2
        assert "bad user name or password" in agent.log_tail(10**7) or "not authorized" in agent.log_tail(10**7)
    finally:
        broker.stop()


def test_the_local_api_with_a_token_refuses_requests_without_it(
    tmp_state_dir: Path, hub_stub: HubStub, mqtt_broker: Broker, enrolled: str
) -> None:
    token = "local-api-token-0123456789"
    os.chmod(tmp_state_dir, 0o755)  # as an older version (or a person) left it
    os.chmod(tmp_state_dir / "identity.json", 0o644)
    agent = AgentProcess(tmp_state_dir, env={"AUTODL_AGENT_API_TOKEN": token}).start()
    try:
        agent.wait_live()  # the probes need no token
        # State is the owner's only: tightened at start, and what the agent made since too.
        assert tmp_state_dir.stat().st_mode & 0o777 == 0o700
        for path in tmp_state_dir.rglob("*"):
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"
        assert httpx.get(f"{agent.url}/healthz", timeout=10).status_code == 200
        for path in ("/v1/models", "/v1/status", "/metrics", "/v2/models/m"):
            assert httpx.get(f"{agent.url}{path}", timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token-at-all"}
        assert httpx.get(f"{agent.url}/v1/models", headers=wrong, timeout=10).status_code == 401
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
        refused = httpx.post(f"{agent.url}/v2/models/m/infer", json=body, timeout=10)
        assert refused.status_code == 401
        right = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{agent.url}/v1/models", headers=right, timeout=10).status_code == 200
        # Bound to loopback: a page on another name (DNS rebinding) is not answered.
        rebound = httpx.get(f"{agent.url}/v1/models", headers={**right, "Host": "evil.example:8500"}, timeout=10)
        assert rebound.status_code == 421
        # The CLI on the device reads the token from the same setting.
        env = {**agent.env, "AUTODL_AGENT_PORT": str(agent.port)}
        status = subprocess.run(
            [sys.executable, "-c", "from agent.cli import main; main()", "status", "--state-dir", str(tmp_state_dir)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
    finally:
        agent.stop()

"""Agent core end to end: a real hub (`autodl-hub serve` with its embedded mosquitto) and real
`autodl-agent` processes: enroll, publish, converge, swap under load, refuse bad versions, resume
a download after kill -9.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.agent import AgentProcess
from tests.support.hub import HubProcess
from tests.support.models import SAMPLE_X, linear_weights, make_release, reference
from tests.support.stall_proxy import StallProxy
from tests.support.traffic import Traffic
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "lin"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub")
    try:
        process.start()
        yield process
    finally:
        process.stop()


def test_agent_converges_swaps_and_refuses_bad_versions_with_a_real_hub(hub: HubProcess, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()  # only to build the Release objects; the hub signs what it serves
    releases = {
        "1.0.0": make_release(key, MODEL, "1.0.0", seed=1),
        "2.0.0": make_release(key, MODEL, "2.0.0", seed=2),
        "3.0.0": make_release(key, MODEL, "3.0.0", seed=3),
        "4.0.0": make_release(key, MODEL, "4.0.0", seed=4, wrong_sample=True),
    }
    for release in releases.values():
        hub.upload(release)
    # Rot version 3's file in the hub's store: the agent must refuse it.
    blob = next(p for p in (hub.data_dir / "artifacts").rglob(releases["3.0.0"].sha256) if p.is_file())
    data = blob.read_bytes()
    blob.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])

    state_dir = tmp_path / "agent"
    agent = AgentProcess(state_dir)
    device = agent.enroll(hub.url, hub.enrollment_token())
    again = agent.run_cli("enroll", "--hub", hub.url, "--token", "x", "--state-dir", str(state_dir))
    assert again.returncode == 1 and "already enrolled" in again.stderr
    agent.start()
    try:
        agent.wait_live()
        hub.deploy(device, MODEL, "1.0.0")
        wait_for("v1 served", lambda: agent.serving(MODEL) == "1.0.0", 60)
        with hub.api() as client:
            signed = client.get(f"/models/{MODEL}/versions/1.0.0/manifest").json()
        hub_sample = np.asarray(signed["manifest"]["sample"]["outputs"]["y"]["data"], np.float32).reshape(2, 3)
        version, y = agent.infer(MODEL)
        np.testing.assert_allclose(y, hub_sample, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, reference(SAMPLE_X, *linear_weights(1)), rtol=1e-5, atol=1e-5)
        wait_for("hub sees v1", lambda: hub.reported(device, MODEL).get("active") == "1.0.0", 30)

        with Traffic([agent], MODEL) as traffic:
            wait_for("requests answered by v1", lambda: "1.0.0" in traffic.versions, 30)
            hub.deploy(device, MODEL, "2.0.0")
            wait_for("v2 served", lambda: agent.serving(MODEL) == "2.0.0", 60)
            wait_for("requests answered by v2", lambda: "2.0.0" in traffic.versions, 30)
        assert traffic.failures == [] and traffic.versions == {"1.0.0", "2.0.0"}
        np.testing.assert_allclose(agent.infer(MODEL)[1], reference(SAMPLE_X, *linear_weights(2)), atol=1e-5)

        for bad, reason in (("3.0.0", "sha256"), ("4.0.0", "max difference")):
            hub.deploy(device, MODEL, bad)
            reported = wait_for(
                f"{bad} refused",
                lambda b=bad: (
                    (m := hub.reported(device, MODEL)).get("desired") == b and m.get("state") == "rolled_back" and m
                ),
                60,
            )
            assert reason in reported["error"] and reported["active"] == "2.0.0"
            assert agent.infer(MODEL)[0] == "2.0.0"
        status = agent.run_cli("status", "--json", "--state-dir", str(state_dir))
        info = json.loads(status.stdout)
        assert info["connected"] is True and info["device_id"] == device
    finally:
        assert agent.stop() == 0, agent.log_tail()
    wait_for("hub sees the agent offline", lambda: not hub.device(device)["online"], 30)


def test_kill9_during_download_resumes_with_range_against_a_real_hub(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub")
    proxy = StallProxy(hub.port)
    # Agents reach the hub through the proxy: the manifest and artifact URLs point at it.
    hub.env["AUTODL_HUB_PUBLIC_URL"] = proxy.url
    agent: AgentProcess | None = None
    try:
        hub.start()
        release = make_release(Ed25519PrivateKey.generate(), MODEL, "1.0.0", seed=1, padding_bytes=2_000_000)
        hub.upload(release)
        state_dir = tmp_path / "agent"
        agent = AgentProcess(state_dir)
        device = agent.enroll(proxy.url, hub.enrollment_token())
        proxy.hold_after = 300_000
        agent.start().wait_live()
        hub.deploy(device, MODEL, "1.0.0")
        assert proxy.holding.wait(60), agent.log_tail()
        part = state_dir / "cache" / "partial" / f"{release.sha256}.part"
        wait_for("partial file on disk", lambda: part.exists() and part.stat().st_size > 0, 30)
        agent.kill9()
        kept = part.stat().st_size
        proxy.hold_after = None
        proxy.released.set()
        proxy.ranges.clear()
        agent.start().wait_live()
        wait_for("v1 served after the resumed download", lambda: agent.serving(MODEL) == "1.0.0", 60)
        assert proxy.ranges[0] == f"bytes={kept}-"
        np.testing.assert_allclose(agent.infer(MODEL)[1], reference(SAMPLE_X, *linear_weights(1)), atol=1e-5)
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()
        proxy.close()

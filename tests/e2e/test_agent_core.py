"""Agent core end to end: a real hub (`autodl-hub serve` with its embedded mosquitto) and real
`autodl-agent` processes: enroll, publish, converge, swap under load, refuse bad versions, resume
a download after kill -9.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.agent.models import SAMPLE_X, Release, linear_weights, make_release, reference
from tests.agent.process import AgentProcess, wait_until
from tests.e2e.stall_proxy import StallProxy
from tests.support.hub import HubProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLI = [sys.executable, "-c", "from agent.cli import main; main()"]
MODEL = "lin"


def upload(hub: HubProcess, release: Release) -> None:
    """Publish a version through the hub's API (the hub signs it)."""
    manifest = release.manifest.model_dump_json().encode()
    parts: list[tuple[str, tuple[str, bytes, str]]] = [("manifest", ("manifest.json", manifest, "application/json"))]
    for variant in release.manifest.variants:
        parts.append(("files", (variant.file, release.files[variant.sha256], "application/octet-stream")))
    with hub.api() as client:
        response = client.post(f"/models/{release.name}/versions", files=parts)
    assert response.status_code == 201, response.text


def deploy(hub: HubProcess, device: str, version: str) -> None:
    with hub.api() as client:
        response = client.put(f"/devices/{device}/models/{MODEL}", json={"version": version})
    assert response.status_code == 200, response.text


def hub_reported(hub: HubProcess, device: str) -> dict[str, Any]:
    with hub.api() as client:
        body: dict[str, Any] = client.get(f"/devices/{device}").json()
    return body.get("reported") or {}


def enroll(hub_url: str, token: str, state_dir: Path) -> str:
    out = subprocess.run(
        [*CLI, "enroll", "--hub", hub_url, "--token", token, "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[2]


def infer(url: str) -> tuple[str, np.ndarray]:
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": SAMPLE_X.ravel().tolist()}]}
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=10)
    response.raise_for_status()
    out = response.json()
    return out["model_version"], np.asarray(out["outputs"][0]["data"], np.float32).reshape(2, 3)


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
        upload(hub, release)
    # Rot version 3's file in the hub's store: the agent must refuse it.
    blob = next(p for p in (hub.data_dir / "artifacts").rglob(releases["3.0.0"].sha256) if p.is_file())
    data = blob.read_bytes()
    blob.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])

    state_dir = tmp_path / "agent"
    device = enroll(hub.url, hub.enrollment_token(), state_dir)
    again = subprocess.run(
        [*CLI, "enroll", "--hub", hub.url, "--token", "x", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "already enrolled" in again.stderr
    agent = AgentProcess(state_dir).start()
    try:
        agent.wait_live()
        deploy(hub, device, "1.0.0")
        wait_until(lambda: agent.serving(MODEL) == "1.0.0", 60, "v1 served")
        with hub.api() as client:
            signed = client.get(f"/models/{MODEL}/versions/1.0.0/manifest").json()
        hub_sample = np.asarray(signed["manifest"]["sample"]["outputs"]["y"]["data"], np.float32).reshape(2, 3)
        version, y = infer(agent.url)
        np.testing.assert_allclose(y, hub_sample, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y, reference(SAMPLE_X, *linear_weights(1)), rtol=1e-5, atol=1e-5)
        wait_until(
            lambda: hub_reported(hub, device).get("models", {}).get(MODEL, {}).get("active") == "1.0.0",
            30,
            "hub sees v1",
        )

        failures: list[str] = []
        versions: set[str] = set()
        stop = threading.Event()

        def steady_load() -> None:
            body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": SAMPLE_X.ravel().tolist()}]}
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    try:
                        r = client.post(f"{agent.url}/v2/models/{MODEL}/infer", json=body)
                    except httpx.HTTPError as exc:
                        failures.append(str(exc))
                        continue
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        versions.add(r.json()["model_version"])

        load = threading.Thread(target=steady_load)
        load.start()
        try:
            wait_until(lambda: "1.0.0" in versions, 30, "requests answered by v1")
            deploy(hub, device, "2.0.0")
            wait_until(lambda: agent.serving(MODEL) == "2.0.0", 60, "v2 served")
            wait_until(lambda: "2.0.0" in versions, 30, "requests answered by v2")
        finally:
            stop.set()
            load.join()
        assert failures == [] and versions == {"1.0.0", "2.0.0"}
        np.testing.assert_allclose(infer(agent.url)[1], reference(SAMPLE_X, *linear_weights(2)), atol=1e-5)

        for bad, reason in (("3.0.0", "sha256"), ("4.0.0", "max difference")):
            deploy(hub, device, bad)
            reported = wait_until(
                lambda b=bad: (
                    (m := hub_reported(hub, device).get("models", {}).get(MODEL, {})).get("desired") == b
                    and m.get("state") == "rolled_back"
                    and m
                ),
                60,
                f"{bad} refused",
            )
            assert reason in reported["error"] and reported["active"] == "2.0.0"
            assert infer(agent.url)[0] == "2.0.0"
        status = subprocess.run(
            [*CLI, "status", "--json", "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=60
        )
        info = json.loads(status.stdout)
        assert info["connected"] is True and info["device_id"] == device
    finally:
        assert agent.stop() == 0, agent.log()[-3000:]
    wait_until(lambda: not _device(hub, device)["online"], 30, "hub sees the agent offline")


def _device(hub: HubProcess, device: str) -> dict[str, Any]:
    with hub.api() as client:
        body: dict[str, Any] = client.get(f"/devices/{device}").json()
    return body


def test_kill9_during_download_resumes_with_range_against_a_real_hub(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub")
    proxy = StallProxy(hub.port)
    # Agents reach the hub through the proxy: the manifest and artifact URLs point at it.
    hub.env["AUTODL_HUB_PUBLIC_URL"] = proxy.url
    agent: AgentProcess | None = None
    try:
        hub.start()
        release = make_release(Ed25519PrivateKey.generate(), MODEL, "1.0.0", seed=1, padding_bytes=2_000_000)
        upload(hub, release)
        state_dir = tmp_path / "agent"
        device = enroll(proxy.url, hub.enrollment_token(), state_dir)
        proxy.hold_after = 300_000
        agent = AgentProcess(state_dir).start()
        agent.wait_live()
        deploy(hub, device, "1.0.0")
        assert proxy.holding.wait(60), agent.log()[-3000:]
        part = state_dir / "cache" / "partial" / f"{release.sha256}.part"
        wait_until(lambda: part.exists() and part.stat().st_size > 0, 30, "partial file on disk")
        agent.kill9()
        kept = part.stat().st_size
        proxy.hold_after = None
        proxy.released.set()
        proxy.ranges.clear()
        agent = AgentProcess(state_dir).start()
        agent.wait_live()
        wait_until(lambda: agent.serving(MODEL) == "1.0.0", 60, "v1 served after the resumed download")
        assert proxy.ranges[0] == f"bytes={kept}-"
        np.testing.assert_allclose(infer(agent.url)[1], reference(SAMPLE_X, *linear_weights(1)), atol=1e-5)
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()
        proxy.close()

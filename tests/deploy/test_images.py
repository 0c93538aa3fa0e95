"""The built images, run with Docker: opt-in (``AUTODL_TEST_IMAGES=1``) after
``scripts/build-images.sh``, because building them is far too heavy for ``make test``.

Containers run as they would in the K3s manifests: read-only root filesystem, every
capability dropped, no privilege escalation, host networking to reach the host's hub.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.hub import HubProcess
from tests.support.processes import free_port
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

AGENT_IMAGE = os.environ.get("AUTODL_TEST_AGENT_IMAGE", "autodl-agent:cpu")
HUB_IMAGE = os.environ.get("AUTODL_TEST_HUB_IMAGE", "autodl-hub:latest")
LOCKED_DOWN = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def _docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {out.stderr}")
    return out


@pytest.fixture(scope="module")
def docker() -> None:
    if os.environ.get("AUTODL_TEST_IMAGES") != "1":
        pytest.skip("set AUTODL_TEST_IMAGES=1 after scripts/build-images.sh to test the images")
    if shutil.which("docker") is None or _docker("info", check=False).returncode != 0:
        pytest.fail("AUTODL_TEST_IMAGES=1 but no Docker daemon answers")


@pytest.fixture
def containers(docker: None) -> Iterator[list[str]]:
    """Names of containers this test starts; removed (with their logs printed) at the end."""
    names: list[str] = []
    yield names
    for name in names:
        logs = _docker("logs", "--tail", "40", name, check=False)
        print(f"--- {name}\n{logs.stdout}{logs.stderr}")
        _docker("rm", "-f", name, check=False)


def _agent_dirs(tmp_path: Path, token: str) -> tuple[Path, Path]:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "token").write_text(token + "\n")
    (secrets_dir / "token").chmod(0o444)
    state = tmp_path / "agent-state"
    state.mkdir()
    if os.geteuid() == 0:
        os.chown(state, 10001, 10001)  # what the DaemonSet's init container does on the node
    else:
        state.chmod(0o777)
    return secrets_dir, state


def _run_agent(name: str, hub_url: str, port: int, secrets_dir: Path, state: Path) -> None:
    _docker(
        "run", "-d", "--name", name, "--network", "host", *LOCKED_DOWN,
        "-e", f"AUTODL_HUB_URL={hub_url}", "-e", f"AUTODL_AGENT_PORT={port}", "-e", "AUTODL_AGENT_HOST=127.0.0.1",
        "-e", "AUTODL_AGENT_ENROLL_NAME=container-agent", "-e", "AUTODL_AGENT_ENROLL_LABELS=runtime=docker",
        "-v", f"{secrets_dir}:/run/secrets/autodl:ro", "-v", f"{state}:/var/lib/autodl-agent",
        AGENT_IMAGE,
    )  # fmt: skip


def test_agent_image_help(docker: None) -> None:
    out = _docker("run", "--rm", *LOCKED_DOWN, AGENT_IMAGE, "--help")
    assert "enroll" in out.stdout and "run" in out.stdout
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'sqlmodel', 'fastapi') if u.find_spec(m)])"
    out = _docker("run", "--rm", "--entrypoint", "python3", AGENT_IMAGE, "-c", probe)
    assert out.stdout.strip() == "[]"


def test_agent_image_enrolls_against_a_host_hub_and_restarts_as_the_same_device(
    tmp_path: Path, containers: list[str]
) -> None:
    with HubProcess(tmp_path / "hub") as hub:
        secrets_dir, state = _agent_dirs(tmp_path, hub.enrollment_token(max_uses=1))
        port = free_port()
        name = f"autodl-agent-test-{uuid.uuid4().hex[:8]}"
        containers.append(name)

        def online() -> dict[str, Any] | None:
            with hub.api() as client:
                return next((d for d in client.get("/devices").json() if d["online"]), None)

        _run_agent(name, hub.url, port, secrets_dir, state)
        wait_for(
            "live", lambda: httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2).status_code == 200, 120
        )
        device = wait_for("the containerized agent online at the hub", online, 120)
        assert device["name"] == "container-agent" and device["labels"]["runtime"] == "docker"
        # Same volume, new container: the same device, without the (single-use) token.
        _docker("restart", name)
        wait_for(
            "live", lambda: httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2).status_code == 200, 120
        )
        with hub.api() as client:
            devices = client.get("/devices").json()
        assert [d["id"] for d in devices] == [device["id"]]


def test_hub_image_serves_and_an_agent_image_enrolls_with_it(tmp_path: Path, containers: list[str]) -> None:
    port, mqtt_port, agent_port = free_port(), free_port(), free_port()
    hub_url = f"http://127.0.0.1:{port}"
    data = tmp_path / "hub-data"
    data.mkdir()
    if os.geteuid() == 0:
        os.chown(data, 10001, 10001)
    env = [
        "-e", f"AUTODL_HUB_PORT={port}", "-e", f"AUTODL_HUB_MQTT_PORT={mqtt_port}",
        "-e", f"AUTODL_HUB_PUBLIC_URL={hub_url}", "-e", "AUTODL_HUB_MQTT_PUBLIC_HOST=127.0.0.1",
    ]  # fmt: skip
    volume = ["-v", f"{data}:/var/lib/autodl-hub"]
    admin = _docker("run", "--rm", *env, *volume, HUB_IMAGE, "init", "--json").stdout.strip().splitlines()[-1]
    admin_key = json.loads(admin)["admin_key"]
    name = f"autodl-hub-test-{uuid.uuid4().hex[:8]}"
    containers.append(name)
    _docker("run", "-d", "--name", name, "--network", "host", *LOCKED_DOWN, *env, *volume, HUB_IMAGE)
    wait_for("the hub container ready", lambda: httpx.get(f"{hub_url}/readyz", timeout=2).status_code == 200, 120)
    # The image's HEALTHCHECK command, run as Docker would.
    health = _docker("inspect", "--format", "{{json .Config.Healthcheck.Test}}", name).stdout
    _docker("exec", name, *json.loads(health)[1:])
    headers = {"Authorization": f"Bearer {admin_key}"}
    token = httpx.post(f"{hub_url}/enrollment-tokens", json={"max_uses": 1}, headers=headers, timeout=30).json()[
        "token"
    ]
    secrets_dir, state = _agent_dirs(tmp_path, token)
    agent = f"autodl-agent-test-{uuid.uuid4().hex[:8]}"
    containers.append(agent)
    _run_agent(agent, hub_url, agent_port, secrets_dir, state)

    def online() -> bool:
        devices = httpx.get(f"{hub_url}/devices", headers=headers, timeout=5).json()
        return any(d["online"] for d in devices)

    wait_for("the agent container online at the hub container", online, 120)

"""The K3s layout on one machine, with real processes: a separate mosquitto whose auth the
hub's init step writes (k3s/base/mosquitto.yaml), a hub on that external broker, and an agent
started by the image's entrypoint that enrolls from a token file, then runs."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hub.broker.bootstrap import BootstrapError, write_hub_auth
from hub.broker.embedded import find_dynsec_plugin
from tests.support.hub import HubProcess
from tests.support.paths import K3S
from tests.support.processes import free_port, mosquitto_binary, stop_process, wait_for_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

Render = Callable[[Path], list[dict[str, Any]]]


def _bootstrap(directory: Path, password: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTODL_HUB_")}
    env.update({"AUTODL_HUB_MQTT_USERNAME": "autodl-hub", "AUTODL_HUB_MQTT_PASSWORD": password})
    return subprocess.run(
        [sys.executable, "-m", "hub.broker.bootstrap", str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass(frozen=True)
class RunningBroker:
    """A mosquitto started from the K3s ConfigMap's config."""

    host: str
    port: int
    password: str

    @property
    def url(self) -> str:
        """Return ``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"


def _connect_code(broker: RunningBroker, username: str | None, password: str | None) -> int:
    """Return the broker's CONNACK reason code value for these credentials (0: accepted)."""
    result: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: result.append(reason.value)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        wait_for("a CONNACK", lambda: result, 10)
    finally:
        client.loop_stop()
        client.disconnect()
    return result[0]


def _k3s_broker_config(render: Render, data_dir: Path, port: int) -> str:
    """Return the ConfigMap's mosquitto.conf with the pod's paths and port mapped to this machine."""
    docs = render(K3S / "overlays" / "k3s")
    conf: str = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "autodl-mosquitto")[
        "data"
    ]["mosquitto.conf"]
    assert "listener 1883\n" in conf and "plugin /usr/lib/mosquitto_dynamic_security.so\n" in conf
    conf = conf.replace("listener 1883\n", f"listener {port} 127.0.0.1\n")
    conf = conf.replace("/usr/lib/mosquitto_dynamic_security.so", str(find_dynsec_plugin()))
    conf = conf.replace("/mosquitto/data/", f"{data_dir}/")
    if os.geteuid() == 0:
        conf += "user root\n"  # else mosquitto drops to "mosquitto", who cannot read the 0600 file
    return conf


@pytest.fixture
def separate_broker(tmp_path: Path, render: Render) -> Iterator[RunningBroker]:
    """mosquitto run with k3s/base/mosquitto.yaml's config, after the hub-auth init step."""
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    password = secrets.token_urlsafe(24)
    out = _bootstrap(directory, password)
    assert out.returncode == 0, out.stderr
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(_k3s_broker_config(render, directory, port))
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port)
        except TimeoutError:
            proc.kill()
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"mosquitto did not start with the K3s config: {output}")
        yield RunningBroker("127.0.0.1", port, password)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_the_hub_user_written_by_the_init_step_is_the_only_way_in(separate_broker: RunningBroker) -> None:
    broker, password = separate_broker, separate_broker.password
    assert _connect_code(broker, "autodl-hub", password) == 0
    assert _connect_code(broker, "autodl-hub", password + "x") != 0
    assert _connect_code(broker, None, None) != 0


def test_rerunning_the_init_step_rotates_the_password_and_keeps_devices(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    path = write_hub_auth(directory, "autodl-hub", "first")
    config = json.loads(path.read_text())
    config["clients"].append({"username": "dev-1", "roles": [{"rolename": "autodl-device-dev-1"}]})
    path.write_text(json.dumps(config))
    write_hub_auth(directory, "autodl-hub", "second")
    clients = {c["username"]: c for c in json.loads(path.read_text())["clients"]}
    assert set(clients) == {"autodl-hub", "dev-1"}
    with pytest.raises(BootstrapError, match="AUTODL_HUB_MQTT_PASSWORD"):
        write_hub_auth(directory, "autodl-hub", "")
    assert _bootstrap(tmp_path / "missing", "pw").returncode == 1


def _start_agent(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTODL_AGENT_", "AUTODL_HUB_"))}
    full_env.update(env)
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.entrypoint"], env=full_env, stdout=handle, stderr=subprocess.STDOUT
        )


@pytest.mark.slow
def test_agent_enrolls_from_a_token_file_through_a_separate_broker(
    tmp_path: Path, separate_broker: RunningBroker
) -> None:
    broker, password = separate_broker, separate_broker.password
    with HubProcess(tmp_path / "hub", mqtt_url=broker.url, env={"AUTODL_HUB_MQTT_PASSWORD": password}) as hub:
        token_file = tmp_path / "secrets" / "token"
        token_file.parent.mkdir()
        token_file.write_text(hub.enrollment_token(max_uses=1) + "\n")
        port = free_port()
        env = {
            "AUTODL_HUB_URL": hub.url,
            "AUTODL_AGENT_ENROLL_TOKEN_FILE": str(token_file),
            "AUTODL_AGENT_ENROLL_NAME": "edge-node-1",
            "AUTODL_AGENT_ENROLL_LABELS": "cluster=k3s",
            "AUTODL_AGENT_STATE_DIR": str(tmp_path / "agent"),
            "AUTODL_AGENT_HOST": "127.0.0.1",
            "AUTODL_AGENT_PORT": str(port),
        }
        log = tmp_path / "agent.log"
        live = f"http://127.0.0.1:{port}/v2/health/live"
        ready = f"http://127.0.0.1:{port}/v2/health/ready"

        def online_device() -> dict[str, Any] | None:
            with hub.api() as client:
                devices = client.get("/devices").json()
            return next((d for d in devices if d["online"]), None)

        agent = _start_agent(env, log)
        try:
            wait_for("the agent's liveness", lambda: httpx.get(live, timeout=2).status_code == 200)
            wait_for("the agent's readiness", lambda: httpx.get(ready, timeout=2).status_code == 200)
            device = wait_for("the device online at the hub", online_device)
        finally:
            stop_process(agent, 30)
        assert device["name"] == "edge-node-1"
        assert device["labels"]["cluster"] == "k3s"
        assert (tmp_path / "agent" / "identity.json").exists()

        def offline() -> bool:
            with hub.api() as client:
                return not client.get(f"/devices/{device['id']}").json()["online"]

        wait_for("the stopped agent shown offline", offline)
        # A restarted pod is the same device: the single-use token is not needed again.
        agent = _start_agent(env, log)
        try:
            wait_for("the restarted agent's liveness", lambda: httpx.get(live, timeout=2).status_code == 200)
            again = wait_for("the device online again", online_device)
        finally:
            stop_process(agent, 30)
        assert again["id"] == device["id"]
        with hub.api() as client:
            assert len(client.get("/devices").json()) == 1
        assert log.read_text().count("/enroll") == 1, log.read_text()[-3000:]

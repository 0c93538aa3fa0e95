"""A real fleet for rollout end-to-end tests: mosquitto, an `autodl-hub serve` process, `autodl-agent run` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from onnx import helper, numpy_helper

from hub.broker.embedded import EmbeddedBroker
from hub.config import HubSettings
from hub.db import create_engine_for, migrate, session_factory
from hub.models import Role
from hub.registry import publish_version
from hub.security import create_api_key, create_enrollment_token, load_or_create_signing_key
from tests.agent.models import linear_io_model, make_release, write_files
from tests.support.processes import free_port, stop_process, wait_for_port

__all__ = ["AgentProcess", "HubProcess", "Traffic", "slow_linear_onnx", "wait_for"]

BIN = Path(sys.executable).parent
HUB_USER = "autodl-hub"
HUB_PASSWORD = "e2e-hub-password-0123456789"


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90.0, every: float = 0.25) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass  # a process that is (re)starting
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def slow_linear_onnx(weights: np.ndarray, bias: np.ndarray, width: int = 768, layers: int = 24) -> bytes:
    """Return y = x @ W + b, like tests.agent.models.linear_onnx, but slow: it also runs a deep
    tanh MLP on x whose result joins the output multiplied by zero (same answers, more work)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array((rng.normal(size=(4, width)) / 2).astype(np.float32), "A"),
        numpy_helper.from_array((rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32), "B"),
        numpy_helper.from_array(np.zeros((1,), dtype=np.float32), "zero"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h0"])]
    for i in range(layers):
        nodes += [
            helper.make_node("MatMul", [f"h{i}", "B"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceSum", [f"h{layers}"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["nothing"]),
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["xwb"]),
        helper.make_node("Add", ["xwb", "nothing"], ["y"]),
    ]
    return linear_io_model(nodes, inits, "slow_linear")


class Traffic:
    """Requests to every agent's OIP v2 endpoint from a background thread, as clients would send."""

    def __init__(self, agents: list[AgentProcess], model: str) -> None:
        self.agents, self.model = agents, model
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                for agent in self.agents:
                    if agent.proc is None:
                        continue
                    try:
                        response = client.post(f"http://127.0.0.1:{agent.port}/v2/models/{self.model}/infer", json=body)
                        self.sent += 1
                        self.failed += response.status_code != 200
                    except httpx.HTTPError:
                        self.failed += 1
                self._stop.wait(0.01)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60.0) -> None:
    """Wait until `proc` listens on `port`; fail at once, with its log, if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        try:
            wait_for_port(port, timeout=0.5)
            return
        except TimeoutError:
            continue
    raise RuntimeError(f"nothing listens on {port} after {timeout}s: {log.read_text(errors='replace')[-3000:]}")


def start_broker(directory: Path) -> EmbeddedBroker:
    """Start mosquitto with dynamic security (per-device logins and ACLs), owned by the test."""
    broker = EmbeddedBroker(
        directory, port=free_port(), hub_username=HUB_USER, hub_password=HUB_PASSWORD, bind_host="127.0.0.1"
    )
    broker.start()
    with broker.admin() as admin:
        admin.ensure_roles()
    return broker


class HubProcess:
    """`autodl-hub serve` against an external broker; `kill()` is a crash, `start()` a restart."""

    def __init__(self, data_dir: Path, broker: EmbeddedBroker) -> None:
        self.data_dir = data_dir
        self.broker = broker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = HubSettings(data_dir=data_dir, port=self.port, mqtt_url=broker.url)
        self.log = data_dir / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def prepare(self, model: str, versions: dict[str, dict[str, Any]]) -> tuple[str, str]:
        """Create the DB, publish `versions` ({version: make_release kwargs}); return (API key, enrollment token)."""
        engine = create_engine_for(self.settings)
        migrate(engine)
        sessions = session_factory(engine)
        key = load_or_create_signing_key(self.settings.signing_key)
        with sessions() as session:
            for version, kwargs in versions.items():
                release = make_release(key, model, version, **kwargs)
                publish_version(session, self.settings, release.manifest, write_files(release, self.data_dir / version))
            api_key = create_api_key(session, "e2e", Role.OPERATOR, actor="e2e")[1]
            token = create_enrollment_token(session, actor="e2e", max_uses=100)[1]
        engine.dispose()
        return api_key, token

    def start(self) -> None:
        env = {
            **os.environ,
            "AUTODL_HUB_MQTT_PASSWORD": HUB_PASSWORD,
            "AUTODL_HUB_ROLLOUT_INTERVAL_S": "0.5",
            "AUTODL_HUB_HEARTBEAT_TIMEOUT_S": "600",
            "AUTODL_HUB_TELEMETRY_FLUSH_S": "0.2",
        }
        args = [
            str(BIN / "autodl-hub"),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--public-url",
            self.url,
            "--mqtt-url",
            self.broker.url,
            "--mqtt-public-host",
            "127.0.0.1",
            "--log-level",
            "info",
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        _wait_listening(self.proc, self.port, self.log)

    def kill(self) -> None:
        """End the hub hard (SIGKILL), as a crash or an OOM kill would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)
        self.proc = None

    def api(self, key: str, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(
            method, self.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs
        )
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def tail(self, limit: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-limit:] if self.log.exists() else ""


class AgentProcess:
    """One `autodl-agent` with its own state dir and local API port."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.log = state_dir.parent / f"{state_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.device_id = ""

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AUTODL_AGENT_BACKOFF_MIN_S": "0.2",
            "AUTODL_AGENT_BACKOFF_MAX_S": "1",
            "AUTODL_AGENT_RETRY_MIN_S": "0.2",
            "AUTODL_AGENT_RETRY_MAX_S": "1",
            "AUTODL_AGENT_WARMUP_RUNS": "0",
            "AUTODL_AGENT_INTRA_OP_THREADS": "1",
            "AUTODL_AGENT_DISK_RESERVE_MB": "0",
            "AUTODL_AGENT_TELEMETRY_INTERVAL_S": "0.5",
            # The agent's own health window would roll a slow version back by itself; these
            # tests are about the hub's analysis, so only a 1000x slowdown would trip it.
            "AUTODL_AGENT_HEALTH_LATENCY_RATIO": "1000",
        }

    def enroll(self, hub_url: str, token: str) -> str:
        out = subprocess.run(
            [
                str(BIN / "autodl-agent"),
                "enroll",
                "--hub",
                hub_url,
                "--token",
                token,
                "--state-dir",
                str(self.state_dir),
            ],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        self.device_id = out.stdout.split()[2]  # "enrolled as dev-... (hub ..."
        return self.device_id

    def start(self) -> None:
        args = [str(BIN / "autodl-agent"), "run", "--state-dir", str(self.state_dir), "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, env=self._env(), stdout=log, stderr=subprocess.STDOUT)
        _wait_listening(self.proc, self.port, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)
        self.proc = None

    def serving(self, model: str) -> str | None:
        """Return the version of `model` the agent's local API serves now."""
        data = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=5).json()
        return next((m["version"] for m in data["models"] if m["name"] == model), None)

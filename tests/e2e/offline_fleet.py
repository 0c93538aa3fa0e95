"""A real hub on an external (stoppable) mosquitto with one real agent, for the offline tests and bench."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from onnx import helper, numpy_helper

from hub.broker.embedded import EmbeddedBroker
from tests.agent.models import SAMPLE_X, linear_io_model, linear_weights
from tests.agent.process import AgentProcess, wait_until
from tests.e2e.test_agent_core import MODEL, enroll
from tests.support.hub import HubProcess
from tests.support.processes import free_port

__all__ = ["OfflineFleet", "slow_linear_onnx"]

HUB_PASSWORD = "offline-test-secret"


def slow_linear_onnx(seed: int, rounds: int = 24, width: int = 256) -> bytes:
    """Return y = x @ W + b, plus a chain of width x width MatMuls whose sum is added times zero.

    The outputs equal the plain linear model's (the sample passes), but every request
    pays for `rounds` real matrix products on data derived from the input: an honest
    model that is correct and slow.
    """
    weights, bias = linear_weights(seed)
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(rng.normal(size=(4, width)).astype(np.float32), "P"),
        numpy_helper.from_array((rng.normal(size=(width, width)) / width).astype(np.float32), "Q"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["lin"]),
        helper.make_node("MatMul", ["x", "P"], ["h0"]),
        helper.make_node("Transpose", ["h0"], ["h0t"]),
        helper.make_node("MatMul", ["h0t", "h0"], ["m0"]),
    ]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "Q"], [f"p{i}"]))
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [f"m{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"m{rounds}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["nothing"]),
        helper.make_node("Add", ["lin", "nothing"], ["y"]),
    ]
    return linear_io_model(nodes, inits, "slow_linear")


def infer(url: str) -> str:
    """Run one inference; return the version that answered."""
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": SAMPLE_X.ravel().tolist()}]}
    response = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=10)
    response.raise_for_status()
    return str(response.json()["model_version"])


class OfflineFleet:
    """mosquitto (dynamic security, stoppable), `autodl-hub serve` on it, one enrolled agent."""

    def __init__(
        self, root: Path, agent_env: dict[str, str] | None = None, hub_env: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.broker = EmbeddedBroker(
            root / "mosquitto",
            port=free_port(),
            hub_username="autodl-hub",
            hub_password=HUB_PASSWORD,
            bind_host="127.0.0.1",
        )
        self.broker.start()
        env = {
            "AUTODL_HUB_MQTT_PASSWORD": HUB_PASSWORD,
            "AUTODL_HUB_MQTT_PUBLIC_PORT": str(self.broker.port),
            **(hub_env or {}),
        }
        self.hub = HubProcess(root / "hub", mqtt_url=self.broker.url, env=env)
        self.hub.start()
        self.device = enroll(self.hub.url, self.hub.enrollment_token(), root / "agent")
        self.agent = AgentProcess(root / "agent", agent_env).start()
        self.agent.wait_live()

    def close(self) -> None:
        self.agent.stop()
        self.hub.stop()
        self.broker.stop()

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.agent.url}/v1/status", timeout=5).json()
        return body

    def command(self, name: str, args: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        """Send a command through the hub's API and return it once it has a result."""
        with self.hub.api() as client:
            response = client.post("/commands", json={"name": name, "device_id": self.device, "args": args or {}})
            assert response.status_code == 201, response.text
            command_id = response.json()[0]["id"] if isinstance(response.json(), list) else response.json()["id"]

            def done() -> dict[str, Any] | None:
                body: dict[str, Any] = client.get(f"/commands/{command_id}").json()
                return body if body["status"] in ("succeeded", "failed", "expired") else None

            try:
                result: dict[str, Any] = wait_until(done, timeout, f"result of {name}")
            except TimeoutError as exc:
                row = client.get(f"/commands/{command_id}").json()
                raise TimeoutError(f"{exc}: {row} agent: {self.status()}") from exc
            return result

    def hub_seqs(self) -> list[int]:
        """Return the telemetry sequence numbers the hub stored for the device, in order."""
        with sqlite3.connect(self.root / "hub" / "hub.db", timeout=30) as db:
            rows = db.execute("SELECT seq FROM telemetry_point WHERE device_id = ? ORDER BY seq", (self.device,))
            return [int(r[0]) for r in rows]

    def wait_drained(self, timeout: float = 120) -> dict[str, Any]:
        """Wait until the agent's outbox is empty; return its stats."""

        def empty() -> dict[str, Any] | None:
            outbox: dict[str, Any] = self.status()["outbox"]
            return outbox if outbox["telemetry_pending"] == 0 and outbox["messages_pending"] == 0 else None

        stats: dict[str, Any] = wait_until(empty, timeout, "outbox drained")
        return stats

    @staticmethod
    def elapsed(start: float) -> float:
        return time.monotonic() - start

"""One real fleet for the fault tests: mosquitto (test-owned, supervised), an `autodl-hub serve`
process and two `autodl-agent run` processes, with versions published up front.

Every version of model ``clf`` is a linear model of its own seed, so an agent's answer to
the manifest sample tells which bytes it really runs (`Fleet.assert_serves`).
``AUTODL_FAULT_RUNS`` sets how many randomized runs the repeated tests make (`make faults`: 20).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from hub.broker.embedded import EmbeddedBroker
from tests.agent.models import SAMPLE_X, linear_weights, reference
from tests.e2e.rollout_fleet import AgentProcess, HubProcess, start_broker, wait_for

MODEL = "clf"
GOOD = {f"{i}.0.0": i for i in range(1, 7)}  # version -> seed
CORRUPT, TRUNCATED, BAD_SIGNATURE = "7.0.0", "7.1.0", "7.2.0"
BIG = "8.0.0"  # 12 MB of padding: the disk-full test fills its tmpfs while this downloads
VERSIONS: dict[str, dict[str, Any]] = {
    **{v: {"seed": s} for v, s in GOOD.items()},
    CORRUPT: {"seed": 7},
    TRUNCATED: {"seed": 8},
    BAD_SIGNATURE: {"seed": 9},
    BIG: {"seed": 10, "padding_bytes": 12 * 1024 * 1024},
}
SEEDS = {v: kw["seed"] for v, kw in VERSIONS.items()}


def fault_runs(default: int = 2) -> int:
    """Return how many randomized runs a repeated fault test makes."""
    return int(os.environ.get("AUTODL_FAULT_RUNS", default))


@dataclass
class Fleet:
    root: Path
    broker: EmbeddedBroker
    hub: HubProcess
    key: str
    token: str
    agents: list[AgentProcess]

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.hub.api(self.key, method, path, **kwargs)

    def deploy(self, agent: AgentProcess, version: str) -> None:
        self.api("PUT", f"/devices/{agent.device_id}/models/{MODEL}", json={"version": version})

    def converge(self, version: str, agents: list[AgentProcess] | None = None) -> None:
        """Deploy `version` to `agents` (default: all) and wait until each serves it, verified."""
        agents = agents or self.agents
        for agent in agents:
            self.deploy(agent, version)
        for agent in agents:
            wait_for(f"{agent.device_id} to serve {version}", lambda a=agent: a.serving(MODEL) == version)
            self.assert_serves(agent, version)

    def assert_serves(self, agent: AgentProcess, version: str) -> None:
        """Check the agent answers the sample exactly as `version`'s weights do."""
        body = {
            "inputs": [
                {"name": "x", "shape": list(SAMPLE_X.shape), "datatype": "FP32", "data": SAMPLE_X.ravel().tolist()}
            ]
        }
        response = httpx.post(f"http://127.0.0.1:{agent.port}/v2/models/{MODEL}/infer", json=body, timeout=10)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model_version"] == version
        got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(SAMPLE_X.shape[0], -1)
        np.testing.assert_allclose(got, reference(SAMPLE_X, *linear_weights(SEEDS[version])), rtol=1e-4, atol=1e-4)

    def assert_alive(self) -> None:
        """Hub, broker and every agent process are up and answering."""
        assert self.hub.proc is not None and self.hub.proc.poll() is None, self.hub.tail()
        assert httpx.get(f"{self.hub.url}/readyz", timeout=10).status_code == 200
        assert self.broker.running
        for agent in self.agents:
            assert agent.proc is not None and agent.proc.poll() is None, agent.log.read_text()[-3000:]
            assert httpx.get(f"http://127.0.0.1:{agent.port}/v2/health/live", timeout=5).status_code == 200

    def identity(self, agent: AgentProcess) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((agent.state_dir / "identity.json").read_text())
        return data


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("faults")
    broker = start_broker(root / "mosquitto")
    # Twenty kills in a row look like a crash loop; keep the supervisor's restart delay short.
    broker.backoff_max_s = 2.0
    hub = HubProcess(root / "hub", broker)
    agents: list[AgentProcess] = []
    try:
        key, token = hub.prepare(MODEL, VERSIONS)
        hub.start()
        for i in range(2):
            agent = AgentProcess(root / f"agent{i}")
            agent.enroll(hub.url, token)
            agent.start()
            agents.append(agent)
        fleet = Fleet(root, broker, hub, key, token, agents)
        fleet.converge("1.0.0")
        yield fleet
    except BaseException:
        print(hub.tail())  # noqa: T201  (a failed set-up is read from the test output)
        raise
    finally:
        for agent in agents:
            agent.stop()
        hub.stop()
        broker.stop()

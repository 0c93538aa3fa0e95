"""`Fleet`: one real fleet for end-to-end tests, set up and torn down in order.

mosquitto with dynamic security (test-owned, stoppable) → the versions published → an
`autodl-hub serve` process on it → N enrolled `autodl-agent run` processes → every agent
serving `initial` → ... → agents, hub and broker stopped. When set-up or the body fails,
the logs of every process are printed (pytest shows them with the failure).

    with Fleet(tmp / "fleet", versions={"1.0.0": {"seed": 1}, "2.0.0": {"seed": 2}}, agents=2) as fleet:
        fleet.converge("2.0.0")                     # deploy to each device; wait until each serves it
        fleet.assert_serves(fleet.agents[0], "2.0.0")

`versions` maps a version to `tests.support.models.make_release` keyword arguments (each a
linear model of its ``seed``, so `assert_serves` can check the bytes an agent runs).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session

from hub.config import HubSettings
from tests.support.agent import AgentProcess
from tests.support.broker import secured_broker
from tests.support.hub import HubProcess
from tests.support.models import SAMPLE_X, linear_weights, make_release, reference
from tests.support.waiting import WaitTimeout, wait_for

__all__ = ["FLEET_AGENT_ENV", "FLEET_HUB_ENV", "HUB_JUDGES_LATENCY", "Fleet"]

# A quick rollout controller; devices stay "online" between their heartbeats in a slow CI.
FLEET_HUB_ENV = {"AUTODL_HUB_ROLLOUT_INTERVAL_S": "0.5", "AUTODL_HUB_HEARTBEAT_TIMEOUT_S": "600"}
# Telemetry often enough for the hub's rollout analysis to see a step within seconds.
FLEET_AGENT_ENV = {"AUTODL_AGENT_TELEMETRY_INTERVAL_S": "0.5"}
# For tests of the hub's analysis: the agent's own health window would roll a slow version back
# by itself, so with this agent_env only a 1000x slowdown trips it.
HUB_JUDGES_LATENCY = {"AUTODL_AGENT_HEALTH_LATENCY_RATIO": "1000"}


class Fleet:
    """A broker, a hub and `agents` agents; a context manager (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        model: str = "clf",
        versions: Mapping[str, Mapping[str, Any]] | None = None,
        agents: int = 2,
        initial: str | None = None,
        publish: Callable[[Session, HubSettings], None] | None = None,
        labels: Mapping[str, str] | None = None,
        hub_env: Mapping[str, str] | None = None,
        agent_env: Mapping[str, str] | None = None,
        broker_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.root, self.model = root, model
        self.versions = {v: dict(kwargs) for v, kwargs in (versions or {}).items()}
        self.initial = initial
        self._publish, self._labels = publish, dict(labels or {})
        self.broker = secured_broker(root / "mosquitto", **dict(broker_options or {}))
        self.hub = HubProcess(root / "hub", broker=self.broker, env={**FLEET_HUB_ENV, **(hub_env or {})})
        self.agents = [
            AgentProcess(root / f"agent{i}", {**FLEET_AGENT_ENV, **(agent_env or {})}) for i in range(agents)
        ]
        self.key = self.token = ""

    # -- set-up and tear-down ------------------------------------------------------------

    def __enter__(self) -> Fleet:
        try:
            self._up()
        except BaseException:
            self.print_logs()
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.print_logs()
        self.close()

    def _up(self) -> None:
        signer = Ed25519PrivateKey.generate()  # the hub re-signs what it publishes with its own key
        for version, kwargs in self.versions.items():
            self.hub.publish(make_release(signer, self.model, version, **kwargs))
        if self._publish is not None:
            with self.hub.session() as session:
                self._publish(session, self.hub.settings)
        self.hub.start()
        self.key = self.hub.new_key("operator", name="fleet-operator")
        self.token = self.hub.enrollment_token(max_uses=100, labels=self._labels)
        for agent in self.agents:
            agent.enroll(self.hub.url, self.token)
            agent.start()
        for agent in self.agents:
            agent.wait_live()
        if self.initial is not None:
            self.converge(self.initial)

    def close(self) -> None:
        """Stop every agent, the hub and the broker."""
        for agent in self.agents:
            agent.stop()
        self.hub.stop()
        self.broker.stop()

    def logs(self) -> str:
        """Return the end of every process's log."""
        parts = [f"--- hub ---\n{self.hub.log_tail()}"]
        parts += [f"--- {a.state_dir.name} ({a.device_id}) ---\n{a.log_tail()}" for a in self.agents]
        return "\n".join(parts)

    def print_logs(self) -> None:
        """Print every process's log tail (pytest shows it with a failure)."""
        print(self.logs())  # noqa: T201  (read from the failed test's output)

    @property
    def agent(self) -> AgentProcess:
        """Return the first agent (for one-agent fleets)."""
        return self.agents[0]

    @property
    def device(self) -> str:
        """Return the first agent's device id."""
        return self.agents[0].device_id

    # -- the fleet's model ---------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the hub's API with the operator key; return the JSON body."""
        return self.hub.call(method, path, key=self.key, **kwargs)

    def deploy(self, agent: AgentProcess, version: str) -> None:
        """Pin the model at `version` on one agent's device."""
        self.hub.deploy(agent.device_id, self.model, version, key=self.key)

    def serving(self) -> dict[str, str | None]:
        """Return what each running agent serves, by device id."""
        return {a.device_id: a.serving(self.model) for a in self.agents if a.proc is not None}

    def converge(self, version: str, agents: list[AgentProcess] | None = None, timeout: float = 90) -> None:
        """Deploy `version` to `agents` (default: all) and wait until each serves it (its bytes, when known)."""
        agents = agents or self.agents
        for agent in agents:
            self.deploy(agent, version)
        for agent in agents:
            wait_for(f"{agent.device_id} to serve {version}", lambda a=agent: a.serving(self.model) == version, timeout)  # type: ignore[misc]
            if "seed" in self.versions.get(version, {}):
                self.assert_serves(agent, version)

    def assert_serves(self, agent: AgentProcess, version: str) -> None:
        """Check the agent answers the sample as `version` and exactly as its weights do."""
        answered, got = agent.infer(self.model)
        assert answered == version
        expected = reference(SAMPLE_X, *linear_weights(self.versions[version]["seed"]))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    def assert_alive(self) -> None:
        """Hub, broker and every agent process are up and answering."""
        assert self.hub.running, self.hub.log_tail()
        assert httpx.get(f"{self.hub.url}/readyz", timeout=10).status_code == 200
        assert self.broker.running
        for agent in self.agents:
            assert agent.running, agent.log_tail()
            assert httpx.get(f"{agent.url}/v2/health/live", timeout=5).status_code == 200

    def identity(self, agent: AgentProcess) -> dict[str, Any]:
        """Return the agent's enrolled identity file."""
        data: dict[str, Any] = json.loads((agent.state_dir / "identity.json").read_text())
        return data

    # -- rollouts ------------------------------------------------------------------------

    def start_rollout(
        self, version: str, steps: list[float], selector: dict[str, Any] | None = None, **analysis: Any
    ) -> str:
        """Start a rollout of `version` in `steps` to `selector` (every device by default); return its id."""
        body = {
            "model": self.model,
            "version": version,
            "selector": selector or {"all": True},
            "steps": steps,
            "analysis": {"min_observation_s": 1.0, "min_devices_reporting": 1, "update_timeout_s": 120, **analysis},
        }
        rollout_id: str = self.api("POST", "/rollouts", json=body)["id"]
        return rollout_id

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """Return the rollout's detail."""
        body: dict[str, Any] = self.api("GET", f"/rollouts/{rollout_id}")
        return body

    def finished(
        self, rollout_id: str, timeout: float = 120.0, moving: tuple[str, ...] = ("running",)
    ) -> dict[str, Any]:
        """Wait until the rollout's state is none of `moving`; return its detail."""
        return wait_for(
            f"rollout {rollout_id} to end",
            lambda: (r := self.rollout(rollout_id))["state"] not in moving and r,
            timeout,
        )

    # -- one agent's view: status, commands, outbox --------------------------------------

    def status(self, agent: AgentProcess | None = None) -> dict[str, Any]:
        """Return `autodl-agent`'s /v1/status (the first agent by default)."""
        body: dict[str, Any] = httpx.get(f"{(agent or self.agents[0]).url}/v1/status", timeout=5).json()
        return body

    def command(
        self, name: str, args: dict[str, Any] | None = None, agent: AgentProcess | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        """Send a command through the hub's API and return it once it has a result."""
        device = (agent or self.agents[0]).device_id
        sent = self.api("POST", "/commands", json={"name": name, "device_id": device, "args": args or {}})
        command_id = sent[0]["id"] if isinstance(sent, list) else sent["id"]

        def done() -> dict[str, Any] | None:
            body: dict[str, Any] = self.api("GET", f"/commands/{command_id}")
            return body if body["status"] in ("succeeded", "failed", "expired") else None

        try:
            return wait_for(f"the result of {name}", done, timeout)
        except WaitTimeout as exc:
            row = self.api("GET", f"/commands/{command_id}")
            raise WaitTimeout(f"{exc}: {row} agent: {self.status(agent)}") from exc

    def hub_seqs(self, agent: AgentProcess | None = None) -> list[int]:
        """Return the telemetry sequence numbers the hub stored for the device, in order."""
        device = (agent or self.agents[0]).device_id
        with sqlite3.connect(self.hub.data_dir / "hub.db", timeout=30) as db:
            rows = db.execute("SELECT seq FROM telemetry_point WHERE device_id = ? ORDER BY seq", (device,))
            return [int(r[0]) for r in rows]

    def wait_drained(self, agent: AgentProcess | None = None, timeout: float = 120) -> dict[str, Any]:
        """Wait until the agent's outbox is empty; return its stats."""

        def empty() -> dict[str, Any] | None:
            outbox: dict[str, Any] = self.status(agent)["outbox"]
            return outbox if outbox["telemetry_pending"] == 0 and outbox["messages_pending"] == 0 else None

        return wait_for("the outbox drained", empty, timeout)

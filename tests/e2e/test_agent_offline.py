"""Agent offline end to end: real mosquitto, real `autodl-hub serve`, real `autodl-agent run`.

The broker goes away; the agent keeps serving and buffers over 10,000 telemetry points on
disk; it is killed with SIGKILL while offline and started again; the broker comes back;
every point reaches the hub's database exactly once. Every command round-trips through
the hub's API with its result. A version whose latency degrades after activation is
rolled back by the agent's health window.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.support.fleet import Fleet
from tests.support.models import make_release, slow_linear_onnx
from tests.support.traffic import Traffic
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

POINTS = 10_000
MODEL = "lin"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    env = {
        "AUTODL_AGENT_TELEMETRY_INTERVAL_S": "0.005",  # many points fast
        "AUTODL_AGENT_HEARTBEAT_S": "1",
        # Long enough for the slow version to collect its evidence on a busy machine;
        # the rollback itself happens as soon as enough requests are in.
        "AUTODL_AGENT_HEALTH_WINDOW_S": "60",
        "AUTODL_AGENT_HEALTH_MIN_REQUESTS": "10",
    }
    versions = {"1.0.0": {"seed": 1}, "2.0.0": {"seed": 2}}
    with Fleet(tmp_path, model=MODEL, versions=versions, agents=1, initial="1.0.0", agent_env=env) as fleet:
        yield fleet


def test_offline_buffering_survives_kill_9_and_every_point_arrives_once(fleet: Fleet) -> None:
    wait_for("first telemetry at the hub", lambda: fleet.hub_seqs(), 30)
    fleet.broker.stop()
    wait_for("agent sees the broker gone", lambda: not fleet.status()["connected"], 30)

    # Offline: inference goes on, points pile up on disk.
    served = [fleet.agent.infer(MODEL)[0] for _ in range(20)]
    assert set(served) == {"1.0.0"}
    wait_for("half the backlog", lambda: fleet.status()["outbox"]["telemetry_pending"] >= POINTS // 2, 120)
    fleet.agent.kill9()
    fleet.agent.start()
    fleet.agent.wait_live()
    wait_for("v1 restored offline", lambda: fleet.agent.serving(MODEL) == "1.0.0", 60)
    assert fleet.agent.infer(MODEL)[0] == "1.0.0"
    buffered = wait_for(
        f"{POINTS} points", lambda: (n := fleet.status()["outbox"]["telemetry_pending"]) >= POINTS and n, 120
    )
    assert buffered >= POINTS

    fleet.broker.start()
    # Stop producing points (a command through the hub), then everything must drain.
    result = fleet.command("set-config", {"telemetry_interval_s": 3600})
    assert result["status"] == "succeeded", result
    outbox = fleet.wait_drained()
    assert outbox["dropped"] == 0
    last = outbox["last_telemetry_seq"]
    assert last >= POINTS
    seqs = wait_for("every point at the hub", lambda: (s := fleet.hub_seqs()) and len(s) >= last and s, 120)
    assert len(seqs) == last, "duplicates or extra points at the hub"
    assert seqs == list(range(1, last + 1)), "a point is missing"
    with fleet.hub.api() as client:
        device = client.get(f"/devices/{fleet.device}").json()
        served = client.get("/telemetry", params={"device_id": fleet.device, "name": "requests"}).json()
    assert device["online"] is True
    # The serving points the rollout analysis reads, labelled with model and version.
    assert served, "no requests telemetry at the hub"
    # The local Prometheus view and the K3s probes.
    metrics = httpx.get(f"{fleet.agent.url}/metrics", timeout=5).text
    assert f'autodl_agent_requests_total{{model="{MODEL}",version="1.0.0"}}' in metrics
    assert "autodl_agent_outbox_dropped_total 0" in metrics
    assert httpx.get(f"{fleet.agent.url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{fleet.agent.url}/readyz", timeout=5).status_code == 200


def test_an_idle_connected_agent_stays_online_through_its_heartbeat(tmp_path: Path) -> None:
    # No telemetry and no traffic: only the heartbeat keeps the hub's 2 s window satisfied.
    env = {"AUTODL_AGENT_TELEMETRY_INTERVAL_S": "3600", "AUTODL_AGENT_HEARTBEAT_S": "0.5"}
    with Fleet(
        tmp_path, model=MODEL, agents=1, agent_env=env, hub_env={"AUTODL_HUB_HEARTBEAT_TIMEOUT_S": "2"}
    ) as fleet:

        def online() -> bool:
            return bool(fleet.hub.device(fleet.device)["online"])

        wait_for("device online", online, 30)
        deadline = time.monotonic() + 6  # three heartbeat windows
        while time.monotonic() < deadline:
            assert online(), "an idle but connected agent was marked offline"
            time.sleep(0.3)
        fleet.agent.kill9()  # no heartbeat any more: the will or the window marks it offline
        wait_for("device offline after kill -9", lambda: not online(), 30)


def test_every_command_round_trips_through_the_hub(fleet: Fleet) -> None:
    ping = fleet.command("ping")
    assert ping["status"] == "succeeded" and ping["result"]["pong"] is True

    deployed = fleet.command("deploy", {"model": MODEL, "version": "2.0.0"})
    assert deployed["status"] == "succeeded", deployed
    assert fleet.agent.serving(MODEL) == "2.0.0"

    back = fleet.command("rollback", {"model": MODEL})
    assert back["status"] == "succeeded" and back["result"]["version"] == "1.0.0"
    assert fleet.agent.serving(MODEL) == "1.0.0"
    again = fleet.command("rollback", {"model": MODEL})
    assert again["status"] == "failed" and "no previous version" in again["error"]

    reloaded = fleet.command("reload", {"model": MODEL})
    assert reloaded["status"] == "succeeded" and reloaded["result"]["reloaded"] == {MODEL: "1.0.0"}

    bad = fleet.command("set-config", {"telemetry_interval_s": -1})
    assert bad["status"] == "failed" and "invalid configuration" in bad["error"]
    config = fleet.command("set-config", {"log_level": "DEBUG", "heartbeat_s": 2})
    assert config["status"] == "succeeded" and config["result"]["applied"]["heartbeat_s"] == 2

    diagnostics = fleet.command("diagnostics")
    assert diagnostics["status"] == "succeeded"
    report = diagnostics["result"]
    assert {m["name"]: m["active"] for m in report["models"]} == {MODEL: "1.0.0"}
    assert report["outbox"]["dropped"] == 0 and report["profile"]["arch"]
    assert report["commands"]["succeeded"] >= 5
    assert report["settings"]["log_level"] == "DEBUG" and report["settings"]["heartbeat_s"] == 2

    # Settings in the desired state (PUT /devices/{id}/config) apply the same way.
    with fleet.hub.api() as client:
        response = client.put(f"/devices/{fleet.device}/config", json={"config": {"command_rate": 50}})
        assert response.status_code == 200, response.text
    wait_for(
        "desired config applied", lambda: fleet.command("diagnostics")["result"]["settings"]["command_rate"] == 50, 30
    )

    before = fleet.agent.proc.pid if fleet.agent.proc else None
    restarted = fleet.command("restart")
    assert restarted["status"] == "succeeded" and restarted["result"] == {"restarting": True}
    # execv keeps the pid; the process answers again with the persisted configuration.
    wait_for("restarted agent", lambda: fleet.command("ping", timeout=30)["result"]["uptime_s"] < 30, 60)
    assert fleet.agent.proc is not None and fleet.agent.proc.pid == before
    assert fleet.command("diagnostics")["result"]["models"][0]["active"] == "1.0.0"


def test_a_version_whose_latency_degrades_is_rolled_back(fleet: Fleet, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    fleet.hub.upload(make_release(key, MODEL, "3.0.0", seed=1, model_bytes=slow_linear_onnx(seed=1, rounds=96)))
    fast = [fleet.agent.infer(MODEL)[0] for _ in range(60)]  # the baseline of 1.0.0
    assert set(fast) == {"1.0.0"}
    with Traffic([fleet.agent], MODEL, pause_s=0):
        fleet.deploy(fleet.agent, "3.0.0")
        reported = wait_for(
            "automatic rollback reported to the hub",
            lambda: (m := fleet.hub.reported(fleet.device, MODEL)) and m.get("state") == "rolled_back" and m,
            90,
        )
    assert reported["active"] == "1.0.0"
    assert "p95 latency" in reported["error"] and "3.0.0" in reported["error"]
    assert fleet.agent.serving(MODEL) == "1.0.0"
    # The desired state still names 3.0.0; the agent does not bring the bad version back.
    assert fleet.agent.infer(MODEL)[0] == "1.0.0"

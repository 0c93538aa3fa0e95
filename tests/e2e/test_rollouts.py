"""Rollouts end to end: a real hub process, mosquitto, and six real `autodl-agent run` processes.

Each test first puts the whole fleet on a known version, then rolls out another one and
checks what the agents' local APIs serve. Versions: 1.0.0, 2.0.0, 3.0.0, 4.0.0 and 5.0.0
are good; 2.1.0 fails its smoke test (its manifest sample does not match the model); 5.1.0
gives the same answers as 5.0.0 but takes far longer to compute them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fleet import HUB_JUDGES_LATENCY, Fleet
from tests.support.models import slow_linear_onnx
from tests.support.traffic import Traffic
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "clf"
AGENTS = 6
VERSIONS: dict[str, dict[str, Any]] = {
    "1.0.0": {"seed": 1},
    "2.0.0": {"seed": 2},
    "2.1.0": {"seed": 5, "wrong_sample": True},
    "3.0.0": {"seed": 3},
    "4.0.0": {"seed": 4},
    "5.0.0": {"seed": 6},
    # The answers of 5.0.0, about 40 million multiply-adds more a request.
    "5.1.0": {"seed": 6, "model_bytes": slow_linear_onnx(6, rounds=18, width=128)},
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("rollout-e2e")
    with Fleet(
        root, model=MODEL, versions=VERSIONS, agents=AGENTS, initial="1.0.0", agent_env=HUB_JUDGES_LATENCY
    ) as fleet:
        yield fleet


def test_good_version_canaries_through_its_steps_to_every_agent(fleet: Fleet) -> None:
    fleet.converge("1.0.0")
    rollout_id = fleet.start_rollout("2.0.0", [20, 60, 100])
    detail = fleet.finished(rollout_id)
    assert detail["state"] == "succeeded", detail["reason"]
    moved = [e["message"] for e in detail["events"] if e["kind"] == "moved"]
    assert [m.split(":")[0] for m in moved] == ["step 1 (20%)", "step 2 (60%)", "step 3 (100%)"]
    assert [m.split(": ")[1] for m in moved] == ["2 devices -> 2.0.0", "2 devices -> 2.0.0", "2 devices -> 2.0.0"]
    assert set(fleet.serving().values()) == {"2.0.0"}


def test_version_failing_its_smoke_test_stops_at_the_canary(fleet: Fleet) -> None:
    fleet.converge("2.0.0")
    rollout_id = fleet.start_rollout("2.1.0", [20, 100])
    detail = fleet.finished(rollout_id)
    assert detail["state"] == "failed"
    assert "failed to update to 2.1.0" in detail["reason"]
    canary = [d for d in detail["device_states"] if d["cohort_step"] == 1]
    assert len(canary) == 2 and {d["state"] for d in canary} == {"reverted"}
    assert [e["kind"] for e in detail["events"]].count("moved") == 1  # never left the canary step
    devices = {d["id"]: d for d in fleet.api("GET", "/devices")}
    for d in canary:
        assert devices[d["device_id"]]["desired"]["models"][MODEL]["version"] == "2.0.0"
    # Every agent, canary included, serves the old version.
    wait_for("the canary to report 2.0.0", lambda: all(_reported(fleet, d["device_id"]) == "2.0.0" for d in canary))
    assert set(fleet.serving().values()) == {"2.0.0"}


def test_hub_killed_mid_rollout_finishes_it_after_restart(fleet: Fleet) -> None:
    fleet.converge("2.0.0")
    rollout_id = fleet.start_rollout("3.0.0", [20, 60, 100], min_observation_s=4.0)
    wait_for("step 2", lambda: fleet.rollout(rollout_id)["step"] >= 2)
    fleet.hub.kill()
    serving = fleet.serving()
    assert 2 <= list(serving.values()).count("3.0.0") < AGENTS  # stopped in the middle
    fleet.hub.start()
    detail = fleet.finished(rollout_id)
    assert detail["state"] == "succeeded", detail["reason"]
    assert set(fleet.serving().values()) == {"3.0.0"}


def test_agent_offline_for_the_whole_rollout_converges_when_back(fleet: Fleet) -> None:
    fleet.converge("3.0.0")
    away = fleet.agents[-1]
    away.stop()
    wait_for("the hub to see the agent offline", lambda: not _device(fleet, away.device_id)["online"])
    try:
        rollout_id = fleet.start_rollout("4.0.0", [50, 100])
        detail = fleet.finished(rollout_id)
        assert detail["state"] == "succeeded", detail["reason"]
        assert _reported(fleet, away.device_id) == "3.0.0"
    finally:
        away.start()
    wait_for("the returning agent to serve 4.0.0", lambda: away.serving(MODEL) == "4.0.0")
    wait_for("the hub to hear about it", lambda: _reported(fleet, away.device_id) == "4.0.0")
    assert set(fleet.serving().values()) == {"4.0.0"}


def test_version_with_degraded_latency_is_rolled_back_by_the_analysis(fleet: Fleet) -> None:
    fleet.converge("5.0.0")
    with Traffic(fleet.agents, MODEL) as traffic:
        rollout_id = fleet.start_rollout(
            "5.1.0", [20, 100], min_observation_s=8.0, min_requests=5, max_latency_increase=1.0
        )
        detail = fleet.finished(rollout_id)
    assert detail["state"] == "failed", detail["reason"]
    assert "p95 latency" in detail["reason"] and "on 5.1.0 vs" in detail["reason"], detail["reason"]
    canary = [d["device_id"] for d in detail["device_states"] if d["cohort_step"] == 1]
    assert {d["state"] for d in detail["device_states"] if d["device_id"] in canary} == {"reverted"}
    # The canary served 5.1.0 (its own telemetry is what failed it) and is back on 5.0.0.
    wait_for("every agent to serve 5.0.0 again", lambda: set(fleet.serving().values()) == {"5.0.0"})
    assert traffic.sent > 0 and traffic.failed == 0


def _device(fleet: Fleet, device_id: str) -> dict[str, Any]:
    body: dict[str, Any] = fleet.api("GET", f"/devices/{device_id}")
    return body


def _reported(fleet: Fleet, device_id: str) -> str | None:
    reported = _device(fleet, device_id).get("reported") or {}
    active: str | None = ((reported.get("models") or {}).get(MODEL) or {}).get("active")
    return active

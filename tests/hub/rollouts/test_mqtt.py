"""Rollouts over a real broker: the controller thread moves devices with retained desired state,
simulated devices answer with ReportedState and telemetry, the hub's MQTT ingest stores them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hub.models import Device
from tests.support.processes import Broker
from tests.support.rollout_hub import MODEL, NEW, OLD, RolloutHub, spec
from tests.support.sim_device import SimDevice
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

ANALYSIS = {"min_observation_s": 1.0, "min_devices_reporting": 1, "update_timeout_s": 120}


@pytest.fixture(autouse=True)
def fast_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODL_HUB_ROLLOUT_INTERVAL_S", "0.2")


def make_hub(tmp_path: Path, broker: Broker) -> RolloutHub:
    hub = RolloutHub(tmp_path, mqtt_url=broker.url)
    return hub


def while_serving(sims: Sequence[SimDevice], check: Callable[[], bool]) -> Callable[[], bool]:
    """Return a poll of `check` that has the devices serve traffic first (their telemetry feeds the analysis)."""

    def poll() -> bool:
        for sim in sims:
            sim.serve()
        return check()

    return poll


@contextmanager
def fleet(hub: RolloutHub, broker: Broker, n: int, **sim_args: Any) -> Iterator[list[SimDevice]]:
    """Enroll `n` devices, start a simulated agent for each, deploy OLD to all and wait until they run it."""
    ids = hub.enroll(n)
    sims = [SimDevice(broker.port, d, MODEL, active=None, **sim_args).start() for d in ids]
    try:
        for device_id in ids:
            hub.deploy(device_id, OLD)
        wait_for("the fleet to run the old version", lambda: all(s.active == OLD for s in sims))
        wait_for("the hub to store their reports", lambda: all(reported(hub, d) == OLD for d in ids))
        yield sims
    finally:
        for sim in sims:
            sim.client.loop_stop()


def reported(hub: RolloutHub, device_id: str) -> str | None:
    with hub.sessions() as session:
        device = session.get(Device, device_id)
        assert device is not None
        return (((device.reported or {}).get("models") or {}).get(MODEL) or {}).get("active")


def rollout(hub: RolloutHub, rid: str) -> dict[str, Any]:
    body: dict[str, Any] = hub.client.get(f"/rollouts/{rid}", headers=hub.headers("viewer")).json()
    return body


def start(hub: RolloutHub, **overrides: Any) -> str:
    response = hub.client.post("/rollouts", json=spec(**{"analysis": ANALYSIS, **overrides}), headers=hub.headers())
    assert response.status_code == 201, response.text
    rid: str = response.json()["id"]
    return rid


def test_good_version_canaries_to_every_device(tmp_path: Path, mqtt_broker: Broker) -> None:
    hub = make_hub(tmp_path, mqtt_broker)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    with fleet(hub, mqtt_broker, 5) as sims, hub.client:  # `with client`: the controller thread runs
        rid = start(hub, steps=[20, 60, 100])
        wait_for("the rollout to finish", while_serving(sims, lambda: rollout(hub, rid)["state"] != "running"))
        detail = rollout(hub, rid)
        assert detail["state"] == "succeeded", detail["reason"]
        assert all(s.active == NEW for s in sims)
        assert [e["message"].split(":")[0] for e in detail["events"] if e["kind"] == "moved"] == [
            "step 1 (20%)",
            "step 2 (60%)",
            "step 3 (100%)",
        ]
        # The cohort order decided who went first: the first device moved at step 1.
        first = detail["device_states"][0]["device_id"]
        assert next(s for s in sims if s.device_id == first).applied == [OLD, NEW]
    hub.close()


def test_failed_smoke_test_returns_the_canary_to_the_old_version(tmp_path: Path, mqtt_broker: Broker) -> None:
    hub = make_hub(tmp_path, mqtt_broker)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    with fleet(hub, mqtt_broker, 5, broken=frozenset({NEW})) as sims, hub.client:
        rid = start(hub, steps=[40, 100])
        wait_for("the rollout to stop", while_serving(sims, lambda: rollout(hub, rid)["state"] != "running"))
        detail = rollout(hub, rid)
        assert detail["state"] == "failed"
        assert "failed to update to 2.0.0: smoke test failed" in detail["reason"]
        canary = {d["device_id"] for d in detail["device_states"] if d["state"] == "reverted"}
        assert len(canary) == 2  # stopped at the canary step
        assert all(hub.desired(d) == OLD for d in hub.all_devices())
        # Every canary device got the old version as its desired state again, and runs it.
        wait_for("the canary to report the old version", lambda: all(reported(hub, d) == OLD for d in canary))
        assert all(s.active == OLD for s in sims)
    hub.close()


def test_degraded_latency_is_rolled_back_by_the_analysis(tmp_path: Path, mqtt_broker: Broker) -> None:
    hub = make_hub(tmp_path, mqtt_broker)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    with fleet(hub, mqtt_broker, 5, latency_ms={OLD: 5.0, NEW: 25.0}) as sims, hub.client:
        rid = start(hub, steps=[40, 100])
        wait_for("the rollout to stop", while_serving(sims, lambda: rollout(hub, rid)["state"] != "running"))
        detail = rollout(hub, rid)
        assert detail["state"] == "failed"
        assert "p95 latency 25.0 ms on 2.0.0 vs 5.0 ms on the previous version" in detail["reason"]
        wait_for("every device back on the old version", lambda: all(s.active == OLD for s in sims))
        assert sum(NEW in s.applied for s in sims) == 2  # only the canary ever ran it
    hub.close()


def test_hub_restarted_mid_rollout_finishes_it(tmp_path: Path, mqtt_broker: Broker) -> None:
    hub = make_hub(tmp_path, mqtt_broker)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    with fleet(hub, mqtt_broker, 5) as sims:
        with hub.client:
            rid = start(hub, steps=[20, 60, 100], analysis={**ANALYSIS, "min_observation_s": 2.0})
            wait_for("step 2", while_serving(sims, lambda: rollout(hub, rid)["step"] >= 2))
        hub.close()  # the controller, ingest and DB connections are gone
        assert rollout(hub, rid)["state"] == "running"
        assert sum(s.active == NEW for s in sims) < 5

        again = make_hub(tmp_path, mqtt_broker)
        with again.client:
            wait_for("the rollout to finish", while_serving(sims, lambda: rollout(again, rid)["state"] != "running"))
            assert rollout(again, rid)["state"] == "succeeded"
            assert all(s.active == NEW for s in sims)
        again.close()


def test_device_offline_for_the_whole_rollout_converges_when_back(tmp_path: Path, mqtt_broker: Broker) -> None:
    hub = make_hub(tmp_path, mqtt_broker)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    with fleet(hub, mqtt_broker, 5) as sims, hub.client:
        away = sims[-1]
        away.stop()
        wait_for("the hub to see it offline", lambda: not _online(hub, away.device_id))
        rid = start(hub, steps=[40, 100])
        wait_for("the rollout to finish", while_serving(sims[:-1], lambda: rollout(hub, rid)["state"] != "running"))
        assert rollout(hub, rid)["state"] == "succeeded"
        assert away.active == OLD and reported(hub, away.device_id) == OLD

        back = SimDevice(mqtt_broker.port, away.device_id, MODEL, active=OLD).start()
        wait_for("the returning device to run the new version", lambda: back.active == NEW)
        wait_for("the hub to store it", lambda: reported(hub, away.device_id) == NEW)
        back.stop()
    hub.close()


def _online(hub: RolloutHub, device_id: str) -> bool:
    with hub.sessions() as session:
        device = session.get(Device, device_id)
        return bool(device and device.online)

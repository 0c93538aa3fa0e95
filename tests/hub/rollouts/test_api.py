"""Rollouts through the real API and database: canary steps, rollback, operator actions, conflicts, restart.

Devices' reports are written to the DB as the MQTT ingest would (test_rollouts_mqtt.py
covers the same flows over a real broker); the controller is driven with `tick()`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hub.models import Device, Rollout, TelemetryPoint, utcnow
from hub.rollouts.engine import RolloutContext
from shared.messages import DesiredState, UpdateState
from tests.support.rollout_hub import MODEL, NEW, OLD, RolloutHub, spec


@pytest.fixture(autouse=True)
def history_every_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODL_HUB_ROLLOUT_HISTORY_INTERVAL_S", "0")


@pytest.fixture
def hub(tmp_path: Path) -> RolloutHub:
    hub = RolloutHub(tmp_path)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    return hub


def fleet(hub: RolloutHub, n: int = 10, labels: dict[str, str] | None = None) -> list[str]:
    ids = hub.enroll(n, labels)
    for device_id in ids:
        hub.deploy(device_id, OLD)
    hub.converge(ids)
    return ids


def start(hub: RolloutHub, **overrides: Any) -> dict[str, Any]:
    response = hub.client.post("/rollouts", json=spec(**overrides), headers=hub.headers())
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def get(hub: RolloutHub, rollout_id: str) -> dict[str, Any]:
    response = hub.client.get(f"/rollouts/{rollout_id}", headers=hub.headers("viewer"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def on_new(hub: RolloutHub, ids: list[str]) -> set[str]:
    return {d for d in ids if hub.desired(d) == NEW}


def test_canary_advances_step_by_step_to_every_device(hub: RolloutHub) -> None:
    ids = fleet(hub, 10)
    rollout = start(hub)
    assert rollout["state"] == "running" and rollout["baseline_version"] == OLD and rollout["devices"] == 10
    order = [d["device_id"] for d in rollout["device_states"]]

    hub.controller.tick()
    assert on_new(hub, ids) == set(order[:2])  # 20% of 10, the first two in cohort order
    hub.controller.tick()
    assert get(hub, rollout["id"])["step"] == 1  # nobody reported yet: the step waits

    hub.converge(ids)
    hub.controller.tick()  # step 1 passes
    hub.controller.tick()  # step 2 moves 50%
    assert on_new(hub, ids) == set(order[:5])
    hub.converge(ids)
    hub.controller.tick()
    hub.controller.tick()
    assert on_new(hub, ids) == set(ids)
    hub.converge(ids)
    hub.controller.tick()

    detail = get(hub, rollout["id"])
    assert detail["state"] == "succeeded", detail["reason"]
    assert [p["status"] for p in detail["progress"]] == ["done", "done", "done"]
    assert [p["devices"] for p in detail["progress"]] == [2, 5, 10]
    assert {d["state"] for d in detail["device_states"]} == {"updated"}
    assert {d["active_version"] for d in detail["device_states"]} == {NEW}
    kinds = [e["kind"] for e in detail["events"]]
    assert kinds[0] == "created" and kinds.count("step_passed") == 3 and kinds.count("moved") == 3

    history = hub.client.get("/deployments", params={"device_id": order[0]}, headers=hub.headers("viewer")).json()
    entries = [(h["event"], h["version"], h["rollout_id"]) for h in history]
    assert entries[0] == ("active", NEW, rollout["id"])  # credited to the rollout that moved it
    assert ("desired", NEW, rollout["id"]) in entries and ("active", OLD, None) in entries
    listed = hub.client.get("/rollouts", params={"model": MODEL}, headers=hub.headers("viewer")).json()
    assert [r["id"] for r in listed] == [rollout["id"]] and listed[0]["updated"] == 10


def test_failed_smoke_test_stops_the_canary_and_rolls_it_back(hub: RolloutHub) -> None:
    ids = fleet(hub, 10)
    rollout = start(hub)
    hub.controller.tick()
    canary = on_new(hub, ids)
    assert len(canary) == 2
    untouched = {d: hub.revision(d) for d in ids if d not in canary}

    hub.converge(ids, fail=canary, error="smoke test: output differs from the manifest sample")
    hub.controller.tick()

    detail = get(hub, rollout["id"])
    assert detail["state"] == "failed"
    assert "2 of 2 devices failed to update to 2.0.0: smoke test: output differs" in detail["reason"]
    assert on_new(hub, ids) == set()  # every canary device is told to run the old version again
    assert {hub.desired(d) for d in ids} == {OLD}
    assert {d: hub.revision(d) for d in untouched} == untouched  # the rest never moved
    assert {d["state"] for d in detail["device_states"] if d["device_id"] in canary} == {"reverted"}
    assert [e["kind"] for e in detail["events"]][-2:] == ["step_failed", "rolled_back"]


def test_latency_degradation_fails_the_step(hub: RolloutHub) -> None:
    ids = fleet(hub, 10)
    rollout = start(hub)
    hub.controller.tick()
    canary = on_new(hub, ids)
    hub.converge(ids)
    now = utcnow() + timedelta(seconds=1)
    with hub.sessions() as session:
        for seq, device_id in enumerate(ids):
            version = NEW if device_id in canary else OLD
            labels = {"model": MODEL, "version": version}
            latency = 40.0 if device_id in canary else 5.0
            session.add(
                TelemetryPoint(device_id=device_id, seq=seq * 2, ts=now, name="requests", value=100, labels=labels)
            )
            session.add(
                TelemetryPoint(
                    device_id=device_id, seq=seq * 2 + 1, ts=now, name="latency_p95_ms", value=latency, labels=labels
                )
            )
        session.commit()
    hub.controller.tick()
    detail = get(hub, rollout["id"])
    assert detail["state"] == "failed"
    assert "p95 latency 40.0 ms on 2.0.0 vs 5.0 ms" in detail["reason"]
    assert on_new(hub, ids) == set()


def test_operator_actions(hub: RolloutHub) -> None:
    ids = fleet(hub, 10)
    rollout = start(hub)
    rid = rollout["id"]
    paused = hub.client.post(f"/rollouts/{rid}/pause", json={"reason": "lunch"}, headers=hub.headers())
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    hub.controller.tick()
    assert on_new(hub, ids) == set()  # a paused rollout moves nobody
    assert hub.client.post(f"/rollouts/{rid}/pause", headers=hub.headers()).status_code == 409

    assert hub.client.post(f"/rollouts/{rid}/resume", headers=hub.headers()).json()["state"] == "running"
    hub.controller.tick()
    assert len(on_new(hub, ids)) == 2

    promoted = hub.client.post(f"/rollouts/{rid}/promote", headers=hub.headers())
    assert promoted.status_code == 200 and promoted.json()["state"] == "succeeded"
    assert on_new(hub, ids) == set(ids)
    assert hub.client.post(f"/rollouts/{rid}/abort", headers=hub.headers()).status_code == 409


def test_abort_reverts_every_device_it_touched(hub: RolloutHub) -> None:
    ids = fleet(hub, 10)
    fresh = hub.enroll(1)[0]  # had no version of the model before the rollout
    rollout = start(hub, steps=[50, 100], selector={"device_ids": [*ids[:4], fresh]})
    hub.controller.tick()
    moved = on_new(hub, ids + [fresh])
    assert len(moved) == 3
    aborted = hub.client.post(f"/rollouts/{rollout['id']}/abort", json={"reason": "bad idea"}, headers=hub.headers())
    assert aborted.status_code == 200 and aborted.json()["state"] == "aborted"
    assert aborted.json()["reason"] == "bad idea"
    assert on_new(hub, ids + [fresh]) == set()
    assert {hub.desired(d) for d in ids} == {OLD}
    assert hub.desired(fresh) in (None, OLD)  # back to nothing, or the baseline it was given


def test_a_step_larger_than_one_transaction_publishes_each_device_after_its_commit(hub: RolloutHub) -> None:
    ids = [f"dev-many-{i:04d}" for i in range(600)]
    with hub.sessions() as session:
        for device_id in ids:
            session.add(Device(id=device_id))
        session.commit()
    committed: dict[str, bool] = {}  # device -> was its new desired state stored when it was published

    class Recorder:
        def publish_desired(self, state: DesiredState) -> bool:
            committed[state.device_id] = (
                hub.revision(state.device_id) == state.revision
                and hub.desired(state.device_id) == state.models[MODEL].version
            )
            return True

        def clear_desired(self, device_id: str) -> bool:
            return True

    hub.controller._context = RolloutContext(hub.settings, Recorder())
    start(hub, steps=[100])
    hub.controller.tick()
    assert committed == dict.fromkeys(ids, True)
    assert on_new(hub, ids) == set(ids)


def test_conflicting_rollout_is_refused(hub: RolloutHub) -> None:
    fleet(hub, 3, {"site": "a"})
    fleet(hub, 3, {"site": "b"})
    first = start(hub, selector={"labels": {"site": "a"}})
    again = hub.client.post("/rollouts", json=spec(selector={"all": True}), headers=hub.headers())
    assert again.status_code == 409 and first["id"] in again.json()["detail"]
    assert (
        hub.client.post("/rollouts", json=spec(selector={"labels": {"site": "b"}}), headers=hub.headers()).status_code
        == 201
    )
    # Once the first one ends, its devices are free again.
    hub.client.post(f"/rollouts/{first['id']}/abort", headers=hub.headers())
    assert (
        hub.client.post("/rollouts", json=spec(selector={"labels": {"site": "a"}}), headers=hub.headers()).status_code
        == 201
    )


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (spec(version="9.9.9"), 404, "no version"),
        (spec(model="nope"), 404, "no model"),
        (spec(selector={"labels": {"site": "mars"}}), 422, "matches no device"),
        (spec(steps=[50, 20]), 422, "increase"),
        (spec(selector={}), 422, "give all=true"),
    ],
)
def test_bad_requests(hub: RolloutHub, body: dict[str, Any], status: int, detail: str) -> None:
    fleet(hub, 2)
    response = hub.client.post("/rollouts", json=body, headers=hub.headers())
    assert response.status_code == status, response.text
    assert detail in response.text


def test_roles(hub: RolloutHub) -> None:
    fleet(hub, 2)
    assert hub.client.post("/rollouts", json=spec()).status_code == 401
    assert hub.client.post("/rollouts", json=spec(), headers=hub.headers("viewer")).status_code == 403
    rid = start(hub)["id"]
    assert hub.client.get(f"/rollouts/{rid}", headers=hub.headers("viewer")).status_code == 200
    assert hub.client.post(f"/rollouts/{rid}/abort", headers=hub.headers("viewer")).status_code == 403
    assert hub.client.get("/rollouts/ro-000000000000", headers=hub.headers("viewer")).status_code == 404
    assert hub.client.get("/rollouts/not-a-rollout", headers=hub.headers("viewer")).status_code == 422


def test_device_enrolled_mid_rollout_gets_its_cohorts_version(hub: RolloutHub) -> None:
    ids = fleet(hub, 4)
    rollout = start(hub, steps=[50, 100])
    hub.controller.tick()
    late = hub.enroll(3)
    hub.controller.tick()
    detail = get(hub, rollout["id"])
    assert detail["devices"] == 7
    moved = on_new(hub, ids + late)
    assert len(moved) >= 2 and ids[0] in {d["device_id"] for d in detail["device_states"]}
    for device_id in late:
        # Inside the 50% it gets the new version, outside it the version the others run.
        assert hub.desired(device_id) == (NEW if device_id in moved else OLD)
    assert any(e["kind"] == "device_joined" for e in detail["events"])


def test_offline_devices_do_not_hold_a_step_and_converge_later(hub: RolloutHub) -> None:
    ids = fleet(hub, 5)
    rollout = start(hub, steps=[40, 100])
    hub.controller.tick()
    canary = sorted(on_new(hub, ids))
    offline = canary[0]
    hub.report(offline, OLD, state=UpdateState.IDLE, online=False)
    hub.converge([d for d in ids if d != offline])
    for _ in range(3):
        hub.controller.tick()
        hub.converge([d for d in ids if d != offline])
    detail = get(hub, rollout["id"])
    assert detail["state"] == "succeeded", detail["reason"]
    assert hub.desired(offline) == NEW  # waiting for it, retained, when it comes back
    assert next(d for d in detail["device_states"] if d["device_id"] == offline)["state"] == "pending"


def test_hub_restart_resumes_from_the_database(tmp_path: Path) -> None:
    hub = RolloutHub(tmp_path)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    ids = fleet(hub, 10)
    rid = start(hub)["id"]
    hub.controller.tick()
    hub.converge(ids)
    hub.controller.tick()  # step 1 passed
    hub.app.state.engine.dispose()

    restarted = RolloutHub(tmp_path)  # same data dir, a fresh app, engine and controller
    restarted.operator, restarted.viewer = hub.operator, hub.viewer
    assert get(restarted, rid)["step"] == 2
    for _ in range(4):
        restarted.controller.tick()
        restarted.converge(ids)
    assert get(restarted, rid)["state"] == "succeeded"
    assert {restarted.desired(d) for d in ids} == {NEW}


def test_require_approval_pauses_after_each_step(hub: RolloutHub) -> None:
    ids = fleet(hub, 10)
    rid = start(hub, require_approval=True)["id"]
    hub.controller.tick()
    hub.converge(ids)
    hub.controller.tick()
    detail = get(hub, rid)
    assert detail["state"] == "paused" and detail["step"] == 2
    hub.controller.tick()
    assert len(on_new(hub, ids)) == 2  # waits for the operator
    hub.client.post(f"/rollouts/{rid}/resume", headers=hub.headers())
    hub.controller.tick()
    assert len(on_new(hub, ids)) == 5


def test_postgres(tmp_path: Path, postgres_url: str) -> None:
    hub = RolloutHub(tmp_path, database_url=postgres_url)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    ids = fleet(hub, 5)
    rid = start(hub, steps=[40, 100])["id"]
    for _ in range(4):
        hub.controller.tick()
        hub.converge(ids)
    hub.controller.tick()
    assert get(hub, rid)["state"] == "succeeded"
    assert {hub.desired(d) for d in ids} == {NEW}


def test_deployment_history_covers_changes_outside_rollouts(hub: RolloutHub) -> None:
    device = hub.enroll(1)[0]
    hub.deploy(device, OLD)
    hub.report(device, OLD)
    hub.controller.tick()
    hub.deploy(device, NEW)
    hub.report(device, OLD, state=UpdateState.ROLLED_BACK, error="smoke test failed")
    hub.controller.tick()
    hub.controller.tick()  # nothing changed: nothing added
    history = hub.client.get("/deployments", params={"device_id": device}, headers=hub.headers("viewer")).json()
    assert [(h["event"], h["version"]) for h in history] == [("desired", NEW), ("active", OLD), ("desired", OLD)]
    assert all(h["rollout_id"] is None for h in history)


def test_a_broken_rollout_is_paused_and_does_not_stop_the_others(hub: RolloutHub) -> None:
    fleet(hub, 4, {"site": "a"})
    ids_b = fleet(hub, 4, {"site": "b"})
    broken = start(hub, selector={"labels": {"site": "a"}})["id"]
    healthy = start(hub, selector={"labels": {"site": "b"}}, steps=[50, 100])["id"]
    with hub.sessions() as session:
        row = session.get(Rollout, broken)
        assert row is not None
        row.spec = {"model": MODEL, "steps": "garbage"}  # as a bad manual edit or a buggy migration would
        session.add(row)
        session.commit()
    hub.controller.tick()
    hub.controller.tick()
    assert (get(hub, broken)["state"], get(hub, broken)["reason"]) == ("paused", "unreadable spec")
    assert len(on_new(hub, ids_b)) == 2  # the other rollout moved on
    assert get(hub, healthy)["state"] == "running"
    # A new rollout of the model is refused while the unreadable one is active, not a 500.
    fleet(hub, 1, {"site": "c"})
    again = hub.client.post("/rollouts", json=spec(selector={"labels": {"site": "c"}}), headers=hub.headers())
    assert again.status_code == 409 and broken in again.json()["detail"]
    # It can still be read and aborted.
    assert get(hub, broken)["strategy"] == "unreadable"
    assert hub.client.post(f"/rollouts/{broken}/pause", headers=hub.headers()).status_code == 409
    aborted = hub.client.post(f"/rollouts/{broken}/abort", headers=hub.headers())
    assert aborted.status_code == 200 and aborted.json()["state"] == "aborted"


def test_an_interrupted_rollback_is_finished_on_restart(hub: RolloutHub) -> None:
    ids = fleet(hub, 10)
    rid = start(hub)["id"]
    hub.controller.tick()
    assert len(on_new(hub, ids)) == 2
    # The hub died after marking the rollout failed and before reverting the devices.
    with hub.sessions() as session:
        row = session.get(Rollout, rid)
        assert row is not None
        row.state, row.reason = "failed", "smoke test failed"
        session.add(row)
        session.commit()
    hub.controller.start()  # recovery runs first, then the loop
    hub.controller.stop()
    assert on_new(hub, ids) == set()
    assert {d["state"] for d in get(hub, rid)["device_states"] if d["assigned_version"] is not None} <= {
        "reverted",
        "baseline",
    }

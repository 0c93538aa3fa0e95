"""Devices, desired state, commands and telemetry queries through the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hub.models import Command, CommandStatus, Device, TelemetryPoint
from shared.messages import DesiredState, ModelStatus, ReportedState
from tests.support.hub_app import Hub, build_version, upload


def test_deploy_sets_desired_state_with_growing_revisions(hub: Hub, tmp_path: Path) -> None:
    upload(hub, build_version(tmp_path / "a", version="1.0.0", size=100))
    upload(hub, build_version(tmp_path / "b", version="1.1.0", size=100))
    device = hub.enrolled_device(name="d")["device_id"]
    operator = hub.new_key("operator")

    first = hub.request("PUT", f"/devices/{device}/models/digits", key=operator, json={"version": "1.0.0"})
    second = hub.request("PUT", f"/devices/{device}/models/digits", key=operator, json={"version": "latest"})

    assert first.status_code == 200 and second.status_code == 200
    state = DesiredState.model_validate(second.json())
    assert state.revision == 2 and state.models["digits"].version == "1.1.0"
    assert state.models["digits"].manifest_url == "http://hub.test/models/digits/versions/1.1.0/manifest"
    shown = hub.request("GET", f"/devices/{device}").json()
    assert DesiredState.model_validate(shown["desired"]) == state
    assert shown["reported"] is None

    configured = hub.request("PUT", f"/devices/{device}/config", key=operator, json={"config": {"threads": 2}})
    assert configured.json()["config"] == {"threads": 2} and configured.json()["revision"] == 3
    assert configured.json()["models"]["digits"]["version"] == "1.1.0"  # models untouched

    removed = hub.request("DELETE", f"/devices/{device}/models/digits", key=operator)
    assert removed.json()["revision"] == 4 and removed.json()["models"] == {}
    assert removed.json()["config"] == {"threads": 2}
    assert hub.request("DELETE", f"/devices/{device}/models/digits", key=operator).status_code == 404
    viewer = hub.new_key("viewer")
    assert (
        hub.request("PUT", f"/devices/{device}/models/digits", key=viewer, json={"version": "1.0.0"}).status_code == 403
    )
    assert hub.request("PUT", "/devices/nope/models/digits", json={"version": "1.0.0"}).status_code == 404
    assert hub.request("PUT", f"/devices/{device}/models/none", json={"version": "1.0.0"}).status_code == 404


def test_filter_devices_by_label_presence_and_reported_model(hub: Hub) -> None:
    a = hub.enrolled_device(name="a", labels={"site": "north"})["device_id"]
    b = hub.enrolled_device(name="b", labels={"site": "south"})["device_id"]
    with hub.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        row = session.get(Device, b)
        assert row is not None
        row.online = True
        # As the ingest stores it: a validated ReportedState.
        reported = ReportedState(device_id=b, revision=1, models={"digits": ModelStatus(active="1.0.0")})
        row.reported = reported.model_dump(mode="json")
        session.add(row)
        session.commit()

    def ids(**params: object) -> list[str]:
        return [d["id"] for d in hub.request("GET", "/devices", params=params).json()]

    assert ids(label="site=north") == [a]
    assert ids(online=True) == [b]
    assert ids(model="digits", version="1.0.0") == [b]
    assert ids(model="digits", version="2.0.0") == []
    assert hub.request("GET", "/devices", params={"label": "nonsense"}).status_code == 422

    relabel = hub.request("PATCH", f"/devices/{a}/labels", json={"set": {"site": "south", "tier": "1"}, "remove": []})
    assert relabel.json()["labels"] == {"site": "south", "tier": "1"}
    assert sorted(ids(label="site=south")) == sorted([a, b])
    assert hub.request("PATCH", f"/devices/{a}/labels", json={"set": {"bad key!": "x"}}).status_code == 422


def test_commands_go_to_one_device_or_a_selector_and_expire(hub: Hub) -> None:
    a = hub.enrolled_device(name="a", labels={"site": "north"})["device_id"]
    hub.enrolled_device(name="b", labels={"site": "north"})
    hub.enrolled_device(name="c", labels={"site": "south"})

    one = hub.request("POST", "/commands", json={"name": "ping", "device_id": a})
    many = hub.request("POST", "/commands", json={"name": "diagnostics", "selector": {"site": "north"}, "ttl_s": 1})
    both = hub.request("POST", "/commands", json={"name": "ping", "device_id": a, "selector": {"site": "x"}})

    assert one.status_code == 201 and [c["device_id"] for c in one.json()] == [a]
    assert one.json()[0]["status"] == CommandStatus.PENDING.value  # no broker in this app
    assert many.status_code == 201 and len(many.json()) == 2
    assert both.status_code == 422
    assert hub.request("POST", "/commands", json={"name": "format-disk", "device_id": a}).status_code == 422
    with hub.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        for command_id in (c["id"] for c in many.json()):
            row = session.get(Command, command_id)
            assert row is not None
            row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
            session.add(row)
        session.commit()
    statuses = {c["name"]: c["status"] for c in hub.request("GET", "/commands").json()}
    assert statuses == {"ping": "pending", "diagnostics": "expired"}
    assert len(hub.request("GET", "/commands", params={"device_id": a}).json()) == 2
    assert hub.request("GET", f"/commands/{one.json()[0]['id']}").json()["name"] == "ping"
    assert hub.request("GET", "/commands/unknown").status_code == 404


def test_telemetry_query_by_device_name_range_and_downsampled(hub: Hub) -> None:
    device = hub.enrolled_device()["device_id"]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {
            "device_id": device,
            "seq": i,
            "ts": start + timedelta(seconds=i),
            "name": name,
            "value": float(i),
            "labels": {},
        }
        for i in range(120)
        for name in ("latency_ms",)
    ] + [{"device_id": device, "seq": 1000, "ts": start, "name": "cpu", "value": 50.0, "labels": {}}]
    with hub.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        session.add_all([TelemetryPoint(**row) for row in rows])
        session.commit()

    points = hub.request(
        "GET",
        "/telemetry",
        params={
            "device_id": device,
            "name": "latency_ms",
            "start": (start + timedelta(seconds=10)).isoformat(),
            "end": (start + timedelta(seconds=20)).isoformat(),
        },
    ).json()["points"]
    assert [p["seq"] for p in points] == list(range(10, 20))

    buckets = hub.request("GET", "/telemetry", params={"name": "latency_ms", "step_s": 60}).json()["buckets"]
    assert [(b["count"], b["min"], b["max"], b["mean"]) for b in buckets] == [
        (60, 0.0, 59.0, 29.5),
        (60, 60.0, 119.0, 89.5),
    ]
    assert hub.request("GET", "/telemetry", params={"step_s": 0}).status_code == 422

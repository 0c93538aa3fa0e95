"""POST /jobs: a background training job with status, log and result, through the real app."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.hub_app import Hub
from tests.support.waiting import wait_for


def _wait(hub: Hub, job_id: str, states: set[str], timeout: float = 280.0) -> dict[str, Any]:
    def job() -> dict[str, Any] | None:
        response = hub.request("GET", f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body if body["status"] in states else None

    return wait_for(f"job {job_id} to be {' or '.join(sorted(states))}", job, timeout, every=0.5)


def test_bad_task_is_refused_with_the_field(sqlite_hub: Hub) -> None:
    task = "task: tabular-classification\ndata: {path: x.csv, target: y}\nmodel: {candidates: [gpt-7]}\npublish: {model: m}\n"
    response = sqlite_hub.request("POST", "/jobs", json={"task": task})
    assert response.status_code == 422
    assert "model.candidates[0]: unknown candidate 'gpt-7'" in response.json()["detail"]
    syntax = sqlite_hub.request("POST", "/jobs", json={"task": "task: [oops"})
    assert syntax.status_code == 422 and "line 1" in syntax.json()["detail"]


def test_viewer_cannot_start_a_job(sqlite_hub: Hub, small_task: Callable[..., Path]) -> None:
    viewer = sqlite_hub.new_key("viewer")
    response = sqlite_hub.request("POST", "/jobs", key=viewer, json={"task": small_task("churn").read_text()})
    assert response.status_code == 403
    assert sqlite_hub.request("GET", "/jobs", key=viewer).status_code == 200
    assert sqlite_hub.request("GET", "/jobs/0123456789abcdef").status_code == 404


@pytest.mark.slow
def test_job_trains_builds_and_registers(sqlite_hub: Hub, small_task: Callable[..., Path]) -> None:
    task = small_task(
        "churn", search={"trials": 1, "cv_folds": 2}, training={"epochs": 6}, build={"targets": ["cpu-fp32"]}
    ).read_text()
    created = sqlite_hub.request("POST", "/jobs", json={"task": task})
    assert created.status_code == 202, created.text
    job = _wait(sqlite_hub, created.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", (job["error"], job["log"][-20:])
    result = job["result"]
    assert result["model"] == "churn" and result["version"] == "0.1.0"
    assert result["published_targets"] == ["cpu-fp32"]
    assert result["cv_score"] is not None and result["test_metric"] is not None
    assert any(line.startswith("trial 0") for line in job["log"])
    assert any("published churn 0.1.0" in line for line in job["log"])
    version = sqlite_hub.request("GET", "/models/churn/versions/0.1.0")
    assert version.status_code == 200, version.text
    listed = sqlite_hub.request("GET", "/jobs").json()
    assert [j["id"] for j in listed] == [job["id"]]


def test_jobs_can_be_cancelled(sqlite_hub: Hub, small_task: Callable[..., Path]) -> None:
    long_task = small_task("digits", search={"trials": 50}, training={"epochs": 500, "early_stopping": None})
    first = sqlite_hub.request("POST", "/jobs", json={"task": long_task.read_text()}).json()
    second = sqlite_hub.request("POST", "/jobs", json={"task": long_task.read_text()}).json()
    assert second["status"] == "queued"
    cancelled = sqlite_hub.request("POST", f"/jobs/{second['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    assert _wait(sqlite_hub, first["id"], {"running"}, timeout=60)["status"] == "running"
    sqlite_hub.request("POST", f"/jobs/{first['id']}/cancel")
    job = _wait(sqlite_hub, first["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
    assert job["status"] == "cancelled" and job["result"] is None

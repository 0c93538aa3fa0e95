"""``autodl-hub rollout ...`` against a real hub served over HTTP (uvicorn in a thread)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from hub.cli.main import app
from tests.support.processes import free_port, wait_for_port
from tests.support.rollout_hub import NEW, OLD, RolloutHub


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RolloutHub, str]]:
    monkeypatch.setenv("AUTODL_HUB_ROLLOUT_ENABLED", "false")  # the test drives the controller
    hub = RolloutHub(tmp_path)
    hub.publish(OLD, seed=1)
    hub.publish(NEW, seed=2)
    ids = hub.enroll(4)
    for device_id in ids:
        hub.deploy(device_id, OLD)
    hub.converge(ids)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(hub.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    try:
        yield hub, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def run(url: str, key: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["rollout", *args, "--hub", url, "--api-key", key], env={"COLUMNS": "160"})
    return result.exit_code, result.output


def test_start_status_steer(served: tuple[RolloutHub, str]) -> None:
    hub, url = served
    code, out = run(url, hub.operator, "start", "clf", NEW, "--steps", "50,100", "--min-observation", "0", "--json")
    assert code == 0, out
    rid = json.loads(out)["id"]

    hub.controller.tick()
    code, out = run(url, hub.viewer, "status", rid)
    assert code == 0, out
    assert rid in out and "1.0.0 -> 2.0.0" in out and "step 1/2" in out and "moved" in out

    code, out = run(url, hub.viewer, "status")
    assert code == 0 and rid in out and "running" in out

    assert run(url, hub.viewer, "pause", rid)[0] == 1  # a viewer may not steer
    code, out = run(url, hub.operator, "pause", rid, "--reason", "checking dashboards")
    assert (code, out.strip()) == (0, f"{rid}: paused (step 1/2)")
    assert run(url, hub.operator, "resume", rid)[1].strip() == f"{rid}: running (step 1/2)"
    assert run(url, hub.operator, "promote", rid)[1].strip() == f"{rid}: succeeded (step 2/2)"
    assert {hub.desired(d) for d in hub.all_devices()} == {NEW}

    code, out = run(url, hub.operator, "abort", rid)
    assert code == 1 and "409" in out and "succeeded" in out
    # --watch on a finished rollout draws it once and exits 0 for success.
    code, out = run(url, hub.viewer, "status", rid, "--watch")
    assert code == 0 and "succeeded" in out and "checking dashboards" in out  # the timeline keeps reasons


def test_errors_are_one_line(served: tuple[RolloutHub, str]) -> None:
    hub, url = served
    code, out = run(url, hub.operator, "start", "clf", "9.9.9")
    assert code == 1 and out.startswith("error: 404") and "9.9.9" in out
    code, out = run(url, hub.operator, "start", "clf", NEW, "--steps", "ten")
    assert code == 1 and "--steps" in out
    code, out = run("http://127.0.0.1:9", hub.operator, "status")
    assert code == 1 and "cannot reach the hub" in out

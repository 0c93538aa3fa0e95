"""``autodl-hub rollout ...`` against a real hub served over HTTP (uvicorn in a thread)."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from hub.cli.main import app
from tests.support.hub import HUB_CLI
from tests.support.processes import free_port, wait_for_port
from tests.support.rollout_hub import NEW, OLD, RolloutHub
from tests.support.waiting import wait_for


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


def test_watch_prints_one_plain_line_per_change_into_a_pipe(served: tuple[RolloutHub, str]) -> None:
    hub, url = served
    code, out = run(url, hub.operator, "start", "clf", NEW, "--steps", "50,100", "--min-observation", "0", "--json")
    assert code == 0, out
    rid = json.loads(out)["id"]
    args = [*HUB_CLI, "rollout", "status", rid, "--watch", "--interval", "0.1", "--hub", url, "--api-key", hub.viewer]
    # stdout is a pipe, as under `| tee` or in a CI log.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True)
    reader.start()
    seen: list[str] = []

    def printed(text: str) -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return any(text in line for line in seen)

    try:
        # The lines arrive while the rollout moves, not at its end.
        wait_for(
            "the first progress line",
            lambda: printed(f"{rid} clf 1.0.0 -> 2.0.0: running, step 1/2, 0/4 updated, 0 pending"),
            60,
        )
        hub.controller.tick()
        wait_for("the line of step 1", lambda: printed("running, step 1/2, 0/4 updated, 2 pending"), 30)
        wait_for("the event of step 1", lambda: printed("moved: step 1 (50%)"), 30)
        hub.converge(hub.all_devices())
        hub.controller.tick()
        wait_for("the event of step 1 passed", lambda: printed("step_passed: 2 devices run 2.0.0"), 30)
        wait_for("the line of step 2", lambda: printed("running, step 2/2, 2/4 updated, 0 pending"), 30)
        assert run(url, hub.operator, "promote", rid)[0] == 0
        assert proc.wait(30) == 0  # succeeded
        reader.join(10)
        printed("")
    except BaseException:
        print("".join(seen))  # noqa: T201  (what the command printed, with the failure)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    progress = [line for line in seen if line.startswith(rid)]
    assert "succeeded, step 2/2" in progress[-1]
    assert all(a != b for a, b in zip(progress, progress[1:], strict=False))  # one line per change
    assert not any("\x1b" in line for line in seen)  # no terminal control codes in a log


def test_without_hub_url_the_cli_finds_the_local_hub_as_serve_was_configured(served: tuple[RolloutHub, str]) -> None:
    hub, url = served
    port = url.rsplit(":", 1)[1]
    args = ["rollout", "status", "--api-key", hub.viewer]
    # The hub here serves plain HTTP: as `serve --insecure` on every interface would.
    local = {
        "AUTODL_HUB_URL": None,
        "AUTODL_HUB_PORT": port,
        "AUTODL_HUB_HOST": "0.0.0.0",
        "AUTODL_HUB_INSECURE": "true",
    }
    result = CliRunner().invoke(app, args, env=local)
    assert result.exit_code == 0, result.output
    # Nothing listens there: the error names the address it tried and the variable to set.
    nothing = free_port()
    result = CliRunner().invoke(app, args, env={**local, "AUTODL_HUB_PORT": str(nothing)})
    assert result.exit_code == 1
    assert f"cannot reach the hub at http://127.0.0.1:{nothing}" in result.output
    # Without --insecure, serve on every interface speaks HTTPS, and so does the CLI.
    result = CliRunner().invoke(app, args, env={**local, "AUTODL_HUB_INSECURE": None, "AUTODL_HUB_PORT": str(nothing)})
    assert f"cannot reach the hub at https://127.0.0.1:{nothing}" in result.output
    assert "AUTODL_HUB_URL" in result.output and "AUTODL_HUB_PORT" in result.output

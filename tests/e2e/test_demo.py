"""`autodl-hub demo` end to end: the real command trains, rolls out and serves, then Ctrl-C stops it all;
SIGTERM (what a container runtime or systemd sends) stops it all as well, at any stage."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.hub import HUB_CLI
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_CLI = HUB_CLI


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _summary(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """Read the demo's output until its JSON summary line."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("{"):
            summary: dict[str, Any] = json.loads(line)
            return summary
        if time.monotonic() > deadline:
            break
    raise AssertionError("no summary from the demo:\n" + "".join(seen[-40:]))


@pytest.mark.timeout(900)  # two trainings, an int4 LM build behind its gate, a canary rollout
def test_demo_rolls_out_serves_and_stops_every_child_on_ctrl_c(tmp_path: Path) -> None:
    args = [*_CLI, "demo", "--data-dir", str(tmp_path / "demo"), "--epochs", "2", "--requests", "20", "--json"]
    args += ["--lm-steps", "30"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        summary = _summary(proc, timeout=840)
        assert summary["rollout"]["state"] == "succeeded", summary["rollout"]
        assert len(summary["versions"]) == 2
        candidate = summary["versions"][1]
        assert [d["serving"] for d in summary["devices"]] == [candidate, candidate]
        assert {d["labels"]["ring"] for d in summary["devices"]} == {"canary", "stable"}
        assert summary["inference"]["requests"] == 20
        assert summary["inference"]["model_version"] == candidate
        assert summary["inference"]["accuracy"] >= 0.6  # real digits through a real model
        assert summary["telemetry_points"] > 0
        # The text-generation model beside the digits one: one completion streamed from an agent.
        assert summary["lm_version"] == "0.1.0"
        completion = summary["completion"]
        assert completion["tokens"] > 0 and completion["text"] and completion["ttft_ms"] > 0
        hub_port = int(summary["hub_url"].rsplit(":", 1)[1])
        ports = [hub_port, *(d["port"] for d in summary["devices"])]
        assert all(_listening(p) for p in ports)

        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        # Two agents, the hub with its training worker and mosquitto stop in turn: on a busy
        # machine that can take more than a minute.
        assert proc.wait(180) == 0
        assert not any(_listening(p) for p in ports)  # hub and both agents are gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(600)  # trains the demo's classifier before the agents serve; slow on a busy machine
def test_demo_stopped_with_sigterm_mid_run_stops_every_child(tmp_path: Path) -> None:
    args = [*_CLI, "demo", "--data-dir", str(tmp_path / "demo"), "--epochs", "1", "--requests", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        # Wait until hub, mosquitto and both agents run (the rollout has not started yet).
        for line in proc.stdout:
            seen.append(line)
            if "both agents serve" in line:
                break
        else:
            raise AssertionError("the demo ended before its agents served:\n" + "".join(seen[-40:]))
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(c.name() for c in children)
        assert "mosquitto" in names and len(children) >= 4, names  # hub, its broker, two agents

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0, "".join(seen[-40:]) + proc.stdout.read()
        wait_for("every child of the demo to exit", lambda: not any(_alive(c) for c in children), 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(process: psutil.Process) -> bool:
    """Return True while `process` runs (a zombie waiting for its reaper has ended)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

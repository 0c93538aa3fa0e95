"""Fault injection against a real hub, broker and agents (see conftest.py).

Each test breaks something (a process killed mid-rollout or mid-update, a bad artifact,
a full disk, a flood of garbage on the hub's topics) and then checks that every daemon
is alive, every agent serves a model whose answers match its version's weights, and
nothing was lost. `make faults` runs the randomized ones 20 times (AUTODL_FAULT_RUNS).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session, select

from hub.db import create_engine_for
from hub.models import ModelVersion
from hub.registry import artifact_path
from shared import codec, topics
from shared.messages import TelemetryBatch, TelemetryPoint, utcnow
from shared.topics import DeviceChannel
from tests.support.agent import AgentProcess
from tests.support.faults import BAD_SIGNATURE, BIG, CORRUPT, GOOD, MODEL, TRUNCATED, fault_runs
from tests.support.fleet import HUB_JUDGES_LATENCY, Fleet
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


EXPECTED_ERROR = {CORRUPT: "sha256", TRUNCATED: "", BAD_SIGNATURE: "signature"}


def _other(current: str, rng: random.Random) -> str:
    return rng.choice([v for v in GOOD if v != current])


def _rollout(fleet: Fleet, version: str) -> str:
    return fleet.start_rollout(version, [50, 100], selector={"device_ids": [a.device_id for a in fleet.agents]})


def _finished(fleet: Fleet, rollout_id: str) -> dict[str, Any]:
    return fleet.finished(rollout_id, timeout=180, moving=("running", "paused"))


def _wait_error(fleet: Fleet, agent: AgentProcess, what: str) -> str:
    """Wait until the agent's reported state carries an error for the model; return it."""
    seen: list[str] = []

    def found() -> bool:
        error = _model_error(fleet, agent)
        if error:
            seen.append(error)
        return bool(seen)

    wait_for(f"the agent to report {what}", found, timeout=90)
    return seen[0]


def _model_error(fleet: Fleet, agent: AgentProcess) -> str | None:
    reported = fleet.api("GET", f"/devices/{agent.device_id}").get("reported") or {}
    status = (reported.get("models") or {}).get(MODEL) or {}
    error: str | None = status.get("error")
    return error


@pytest.mark.parametrize("run", range(fault_runs(1)))
def test_broker_killed_and_restarted_mid_rollout(fleet: Fleet, run: int) -> None:
    rng = random.Random(f"broker-{run}")
    fleet.converge("1.0.0")
    target = _other("1.0.0", rng)
    rollout_id = _rollout(fleet, target)
    time.sleep(rng.uniform(0.0, 1.5))
    pid = fleet.broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the supervisor starts it again
    wait_for("mosquitto to be back", lambda: fleet.broker.pid not in (None, pid), timeout=30)
    detail = _finished(fleet, rollout_id)
    assert detail["state"] == "succeeded", detail["reason"]
    fleet.assert_alive()
    for agent in fleet.agents:
        fleet.assert_serves(agent, target)


@pytest.mark.parametrize("run", range(fault_runs(1)))
def test_hub_killed_and_restarted_mid_rollout(fleet: Fleet, run: int) -> None:
    rng = random.Random(f"hub-{run}")
    fleet.converge("1.0.0")
    target = _other("1.0.0", rng)
    rollout_id = _rollout(fleet, target)
    time.sleep(rng.uniform(0.0, 1.5))
    fleet.hub.kill()
    time.sleep(rng.uniform(0.0, 1.0))
    fleet.hub.start()
    detail = _finished(fleet, rollout_id)
    assert detail["state"] == "succeeded", detail["reason"]
    fleet.assert_alive()
    for agent in fleet.agents:
        fleet.assert_serves(agent, target)


@pytest.mark.parametrize("run", range(fault_runs(3)))
def test_agent_killed_at_a_random_step_of_an_update(fleet: Fleet, run: int) -> None:
    rng = random.Random(f"agent-{run}")
    agent = fleet.agents[0]
    current = agent.serving(MODEL) or "1.0.0"
    fleet.converge(current, [agent])
    target = _other(current, rng)
    fleet.deploy(agent, target)
    time.sleep(rng.uniform(0.0, 1.2))  # somewhere in download, verify, load, smoke test or swap
    agent.kill9()
    agent.start()
    wait_for(f"the restarted agent to serve {target}", lambda: agent.serving(MODEL) == target, timeout=90)
    fleet.assert_serves(agent, target)
    fleet.assert_alive()


def _artifact(fleet: Fleet, version: str) -> Any:
    engine = create_engine_for(fleet.hub.settings)
    try:
        with Session(engine) as session:
            row = session.exec(select(ModelVersion).where(ModelVersion.version == version)).one()
            return artifact_path(fleet.hub.settings, row.manifest["variants"][0]["sha256"])
    finally:
        engine.dispose()


def _break(fleet: Fleet, version: str) -> None:
    """Damage `version` on the hub the way its name says."""
    if version == CORRUPT:
        path = _artifact(fleet, version)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif version == TRUNCATED:
        path = _artifact(fleet, version)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif version == BAD_SIGNATURE:
        engine = create_engine_for(fleet.hub.settings)
        with Session(engine) as session:
            row = session.exec(select(ModelVersion).where(ModelVersion.version == version)).one()
            signed = json.loads(row.signed_manifest)
            signed["manifest"]["labels"] = ["tampered", "after", "signing"]
            row.signed_manifest = json.dumps(signed)
            # The desired state carries this digest: match it, so the signature is what must catch it.
            row.manifest_sha256 = hashlib.sha256(row.signed_manifest.encode()).hexdigest()
            session.add(row)
            session.commit()
        engine.dispose()


@pytest.mark.parametrize("bad", [CORRUPT, TRUNCATED, BAD_SIGNATURE])
def test_bad_artifact_is_refused_and_the_verified_model_keeps_serving(fleet: Fleet, bad: str) -> None:
    agent = fleet.agents[1]
    fleet.converge("2.0.0", [agent])
    _break(fleet, bad)
    fleet.deploy(agent, bad)
    error = _wait_error(fleet, agent, f"refusing {bad}")
    assert EXPECTED_ERROR[bad] in error, error
    assert agent.serving(MODEL) == "2.0.0"
    fleet.assert_serves(agent, "2.0.0")
    fleet.assert_alive()
    fleet.converge("3.0.0", [agent])  # and it still takes the next good version


@pytest.fixture
def small_disk(fleet: Fleet) -> Iterator[tuple[AgentProcess, Path]]:
    """A third agent whose state dir is a 24 MB tmpfs; decommissioned afterwards."""
    mount = fleet.root / "small-disk"
    mount.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); needs root")
    # FAST downloads in 4 KiB blocks, so a download lasts long enough to fill the disk under it.
    agent = AgentProcess(mount / "agent", HUB_JUDGES_LATENCY)
    agent.log_path = fleet.root / "small-disk-agent.log"  # not on the disk that fills up
    try:
        agent.enroll(fleet.hub.url, fleet.token)
        agent.start()
        yield agent, mount
    finally:
        agent.stop()
        if agent.device_id:
            fleet.api("POST", f"/devices/{agent.device_id}/decommission")
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path, leave: int = 0) -> None:
    """Write `path` until the disk it is on has at most `leave` bytes free (or is full)."""
    block = b"\0" * 65536
    try:  # opening fails too when something else (the download) filled the disk first
        with path.open("ab") as fh:
            while shutil.disk_usage(path.parent).free > leave + len(block):
                fh.write(block)
                fh.flush()
            fh.write(b"\0" * max(0, shutil.disk_usage(path.parent).free - leave))
            fh.flush()
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise


def test_disk_filling_during_a_download(fleet: Fleet, small_disk: tuple[AgentProcess, Path]) -> None:
    agent, mount = small_disk
    fleet.deploy(agent, "1.0.0")
    wait_for("the small-disk agent to serve 1.0.0", lambda: agent.serving(MODEL) == "1.0.0")
    fleet.assert_serves(agent, "1.0.0")
    _fill(mount / "filler-1", leave=15 * 1024 * 1024)  # room for the 12 MB download when it starts
    fleet.deploy(agent, BIG)
    wait_for("the download to start", lambda: any(mount.rglob("*.part")), timeout=60, every=0.005)
    _fill(mount / "filler-2")  # now the disk fills up under the download
    # The agent cannot even write its journal now (it shares the disk), so it cannot report
    # until there is room again; it must stay up and keep serving what it verified before.
    failed = re.compile(rf"update to {re.escape(BIG)}(: disk full| refused| crashed)")
    wait_for("the download to fail", lambda: failed.search(agent.log_tail(10**7)) is not None, timeout=60)
    assert BIG not in (agent.serving(MODEL) or "")
    assert agent.running, agent.log_tail()
    fleet.assert_serves(agent, "1.0.0")
    # Nothing lost: once there is room again, the same desired version completes.
    (mount / "filler-1").unlink()
    (mount / "filler-2").unlink(missing_ok=True)
    wait_for(f"the agent to serve {BIG}", lambda: agent.serving(MODEL) == BIG, timeout=120)
    fleet.assert_serves(agent, BIG)
    fleet.assert_alive()


def _rejected(fleet: Fleet) -> float:
    text = httpx.get(f"{fleet.hub.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("autodl_hub_mqtt_messages_rejected_total")
    )


def _garbage(device_id: str, rng: random.Random) -> list[bytes]:
    valid = codec.encode(
        TelemetryBatch(device_id=device_id, points=[TelemetryPoint(seq=1, ts=utcnow(), name="x", value=1.0)])
    )
    return [
        b"not json",
        b"\x00\xff\xfe" * 50,
        rng.randbytes(512),
        b"[]",
        b'{"kind": "telemetry"}',
        b'{"schema_version": 99, "kind": "telemetry"}',
        b'{"schema_version": 1, "kind": "no_such_kind"}',
        valid.replace(device_id.encode(), b"someone-else"),
        valid.replace(b'"value":1.0', b'"value":"high"'),
        b"{" + b" " * 300_000 + b"}",
    ]


def test_flood_of_malformed_payloads_on_every_topic_the_hub_reads(fleet: Fleet) -> None:
    rng = random.Random("flood")
    # A device of its own: the broker binds client ids to users, so the flood cannot share a
    # running agent's credentials without being refused.
    enrolled = httpx.post(f"{fleet.hub.url}/enroll", json={"token": fleet.token, "name": "flood"}, timeout=10)
    assert enrolled.status_code == 200, enrolled.text
    identity = enrolled.json()
    device_id = identity["device_id"]
    before = _rejected(fleet)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(identity["mqtt_username"], identity["mqtt_password"])
    client.connect(identity["mqtt_host"], identity["mqtt_port"])
    client.loop_start()
    try:
        sent = 0
        infos = []
        for _ in range(5):
            for channel in (
                DeviceChannel.REPORTED,
                DeviceChannel.RESULTS,
                DeviceChannel.ONLINE,
                DeviceChannel.TELEMETRY,
            ):
                for payload in _garbage(device_id, rng):
                    infos.append(client.publish(topics.device_topic(device_id, channel), payload, qos=1))
                    sent += 1
        for info in infos:
            info.wait_for_publish(30)
        wait_for("the hub to count every bad message", lambda: _rejected(fleet) - before >= sent, timeout=60)
        # Nothing lost: good telemetry right after the flood is stored, every point.
        seq0 = 10**12 + rng.randrange(10**6) * 1000
        points = [TelemetryPoint(seq=seq0 + i, ts=utcnow(), name="fault_probe", value=float(i)) for i in range(100)]
        good = codec.encode(TelemetryBatch(device_id=device_id, points=points))
        client.publish(topics.device_topic(device_id, DeviceChannel.TELEMETRY), good, qos=1).wait_for_publish(30)
    finally:
        client.loop_stop()
        client.disconnect()

    def stored() -> int:
        params = {"device_id": device_id, "name": "fault_probe", "limit": 100_000}
        return len(fleet.api("GET", "/telemetry", params=params)["points"])

    wait_for("the probe points to be stored", lambda: stored() >= 100)
    assert stored() >= 100
    fleet.assert_alive()
    for a in fleet.agents:
        version = a.serving(MODEL)
        assert version is not None
        fleet.assert_serves(a, version)

"""The closed loop with real processes: capture on a device -> offline -> upload once -> label -> retrain -> rollout.

The device serves a digits model trained on scikit-learn's digits, dark ink on a light page
never seen: inverted digits. Its capture policy keeps the answers it is unsure of; the hub is
down while they are captured; when it is back they arrive once; an operator labels them
through the API; a task with `data.include_captured` trains a version that reads them, and a
canary rollout ships it to the device.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.support.agent import AgentProcess
from tests.support.hub import HubProcess
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]

HUB_CLI = [sys.executable, "-c", "from hub.cli import main; main()"]
TASK = """\
task: image-classification
data:
  path: builtin:digits
  validation_split: 0.2
{captured}model:
  candidates: [cnn-small]
search:
  strategy: random
  trials: 1
  cv_folds: 2
training:
  epochs: {epochs}
  batch_size: 32
  seed: 0
resource:
  use_gpu: false
  threads: 2
build:
  targets: [cpu-fp32]
publish:
  model: digits
  version: {version}
"""


def _png(pixels: np.ndarray) -> str:
    """Encode an 8x8 0..16 digit as a base64 grayscale PNG, as a camera client would send it."""
    image = Image.fromarray(np.clip(pixels * 255 / 16, 0, 255).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _inverted(count: int, offset: int) -> list[tuple[bytes, str]]:
    """Return (request body, true label) of inverted digits: light ink on dark paper."""
    digits = load_digits()
    rows = []
    for i in range(offset, offset + count):
        body = json.dumps({"image": _png(16 - digits.images[i])}).encode()
        rows.append((body, str(int(digits.target[i]))))
    return rows


def _predict(agent: AgentProcess, body: bytes) -> tuple[str, str]:
    response = httpx.post(
        f"{agent.url}/v1/models/digits:predict",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    response.raise_for_status()
    answer = response.json()
    prediction = answer["predictions"][0]
    label = prediction["label"] if isinstance(prediction, dict) else prediction[0]["label"]
    return str(label), answer["model_version"]


def _accuracy(agent: AgentProcess, rows: list[tuple[bytes, str]]) -> float:
    return float(np.mean([_predict(agent, body)[0] == label for body, label in rows]))


def _train(hub: HubProcess, tmp_path: Path, version: str, epochs: int, captured: bool) -> dict[str, Any]:
    extra = "  include_captured: {model: digits, labelled_only: true, repeat: 4}\n" if captured else ""
    task = tmp_path / f"task-{version}.yaml"
    task.write_text(TASK.format(captured=extra, epochs=epochs, version=version))
    result = subprocess.run(
        [*HUB_CLI, "train", str(task), "--json"], env=hub.env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    with HubProcess(tmp_path / "hub", start_timeout=180) as process:
        yield process


def test_hard_examples_flow_from_a_device_to_a_better_version_on_that_device(hub: HubProcess, tmp_path: Path) -> None:
    _train(hub, tmp_path, "1.0.0", epochs=4, captured=False)
    api = hub.api()
    agent = AgentProcess(tmp_path / "agent", env={"AUTODL_AGENT_CAPTURE_INTERVAL_S": "0.5"})
    device = agent.enroll(hub.url, hub.enrollment_token())
    agent.start()
    try:
        agent.wait_live()
        api.put(f"/devices/{device}/models/digits", json={"version": "1.0.0"}).raise_for_status()
        _wait(lambda: agent.serving("digits") == "1.0.0", 120, "the device to serve 1.0.0")

        # A policy that does not validate is reported and capture stays off.
        api.put(f"/devices/{device}/config", json={"config": {"capture": {"digits": {}}}}).raise_for_status()
        _wait(
            lambda: any(
                "capture" in e for e in (api.get(f"/devices/{device}").json()["reported"] or {}).get("errors", [])
            ),
            60,
            "the refused policy in the reported state",
        )
        policy = {"digits": {"min_confidence": 0.9, "min_margin": 0.3, "daily_cap": 500, "disk_budget_mb": 16}}
        api.put(f"/devices/{device}/config", json={"config": {"capture": policy}}).raise_for_status()
        field = _inverted(240, 0)
        # The policy is active once a request is offered to capture.
        _wait(lambda: _predict(agent, field[0][0]) and _metric(agent, "capture_offered_total") > 0, 60, "policy")

        probes = int(_metrics(agent)["autodl_capture_offered_total"])  # judged off the request path: wait for it
        _wait(lambda: _judged_all(agent, probes) and _metric(agent, "capture_spool_items") == 0, 60, "the probes")
        kept_online = int(_metrics(agent)["autodl_capture_kept_total"])

        # The hub goes away; the device keeps serving and captures what it is unsure of.
        hub.stop()
        answered = [_predict(agent, body) for body, _ in field]
        offered_before = int(_metrics(agent)["autodl_capture_offered_total"])
        assert {version for _, version in answered} == {"1.0.0"}
        before = float(np.mean([guess == label for (guess, _), (_, label) in zip(answered, field, strict=True)]))
        metrics = _wait(lambda: _judged_all(agent, offered_before) and _metrics(agent), 60, "every request judged")
        kept = int(metrics["autodl_capture_kept_total"])
        assert kept - kept_online >= 100, metrics  # the old version is unsure of most inverted digits
        assert metrics["autodl_capture_uploaded_total"] == kept_online
        assert metrics["autodl_capture_spool_items"] == kept - kept_online

        # Back online: every captured item arrives, once.
        hub.start()
        api = hub.api()
        _wait(lambda: _metric(agent, "capture_spool_items") == 0, 120, "the spool to drain")
        page = api.get("/datasets/digits/items", params={"limit": 1000}).json()
        after = _metrics(agent)
        # Every kept item was answered for; the probe, captured again while offline, came back a duplicate.
        assert after["autodl_capture_uploaded_total"] + after["autodl_capture_upload_duplicates_total"] == kept
        assert after["autodl_capture_upload_refused_total"] == 0
        assert page["total"] == after["autodl_capture_uploaded_total"] >= kept - 1
        assert len({item["id"] for item in page["items"]}) == page["total"]

        # An operator labels them through the API (the truth of each request, as a person would read it).
        truth = dict(field)
        for item in page["items"]:
            content = api.get(f"/datasets/digits/items/{item['id']}/content").content
            api.put(f"/datasets/digits/items/{item['id']}/label", json={"label": truth[content]}).raise_for_status()
        labelled_bodies = {api.get(f"/datasets/digits/items/{i['id']}/content").content for i in page["items"]}
        captured = [(body, truth[body]) for body in labelled_bodies]
        old_on_captured = _accuracy(agent, captured)

        # Retrain with the field's examples; the version records which ones it used.
        summary = _train(hub, tmp_path, "1.1.0", epochs=8, captured=True)
        assert "from_field" in json.dumps(summary["data_report"])
        manifest = api.get("/models/digits/versions/1.1.0").json()
        lineage = manifest.get("lineage") or manifest["manifest"]["lineage"]
        assert sorted(lineage["captured_items"]) == sorted(i["id"] for i in page["items"])

        # A canary rollout ships it to the device.
        rollout = api.post(
            "/rollouts",
            json={
                "model": "digits",
                "version": "1.1.0",
                "selector": {"all": True},
                "steps": [50, 100],
                "analysis": {"min_observation_s": 1.0, "min_devices_reporting": 1, "update_timeout_s": 120},
            },
        ).json()
        _wait(lambda: api.get(f"/rollouts/{rollout['id']}").json()["state"] != "running", 240, "the rollout")
        assert api.get(f"/rollouts/{rollout['id']}").json()["state"] == "succeeded"
        assert agent.serving("digits") == "1.1.0"
        new_on_captured = _accuracy(agent, captured)
        assert new_on_captured > old_on_captured + 0.2, (old_on_captured, new_on_captured, before)
        unseen = _inverted(120, 600)  # inverted digits no device captured: the new version reads them too
        assert _accuracy(agent, unseen) > before
    finally:
        agent.stop()


def _metrics(agent: AgentProcess) -> dict[str, float]:
    """Return the capture counters as {autodl_capture_<outcome>_total: value} and the spool size."""
    out = {}
    for line in httpx.get(f"{agent.url}/metrics", timeout=5).text.splitlines():
        if line.startswith('autodl_agent_capture_items_total{outcome="'):
            outcome = line.split('"')[1]
            out[f"autodl_capture_{outcome}_total"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("autodl_agent_capture_spool_items "):
            out["autodl_capture_spool_items"] = float(line.rsplit(" ", 1)[1])
    return out


def _metric(agent: AgentProcess, name: str) -> float:
    return _metrics(agent).get(f"autodl_{name}", -1.0)


def _judged_all(agent: AgentProcess, offered: int) -> bool:
    m = _metrics(agent)
    return m["autodl_capture_offered_total"] == offered and m["autodl_capture_judged_total"] == offered - m.get(
        "autodl_capture_queue_full_total", 0
    ) - m.get("autodl_capture_too_large_total", 0)


def _wait(check: Any, timeout: float, what: str) -> Any:
    return wait_for(what, check, timeout=timeout)

"""A text-generation model rolled out (canary) by a real hub to agents that also serve a classifier.

Real processes: mosquitto with dynamic security, `autodl-hub serve`, two `autodl-agent run`.
The language model is tests/agent/lm.py's (a folder variant: graph, tokenizer); the hub
stores each file by sha256 and signs the manifest; the agents verify every file, load it
with the shared generation loop, smoke-test it with the manifest's parity tokens, and
answer the stock `openai` SDK with the manifest's reference greedy output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hub.db import create_engine_for, session_factory
from hub.registry import publish_version
from hub.security import load_or_create_signing_key
from tests.support.agent import AgentProcess
from tests.support.broker import secured_broker
from tests.support.hub import HubProcess
from tests.support.lm import SCRIPT, TinyLM, make_lm_release
from tests.support.traffic import Traffic
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLASSIFIER = "clf"
LM = "chat"


def publish_lm(hub: HubProcess, tiny: TinyLM, root: Path) -> None:
    """Publish a folder variant: every file by its path in the manifest."""
    release = tiny.release
    files: dict[str, Path] = {}
    for item in release.manifest.variants[0].files:
        path = root / release.version / item.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(release.files[item.sha256])
        files[item.path] = path
    engine = create_engine_for(hub.settings)
    with session_factory(engine)() as session:
        publish_version(session, hub.settings, release.manifest, files)
    engine.dispose()


@dataclass
class Fleet:
    hub: HubProcess
    key: str
    agents: list[AgentProcess]
    reference: TinyLM

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.hub.call(method, path, key=self.key, **kwargs)

    def serving(self, model: str) -> list[str | None]:
        return [a.serving(model) for a in self.agents]

    def rollout(self, version: str, steps: list[float]) -> dict[str, Any]:
        body = {
            "model": LM,
            "version": version,
            "selector": {"all": True},
            "steps": steps,
            "analysis": {"min_observation_s": 1.0, "min_devices_reporting": 1, "update_timeout_s": 120},
        }
        rollout_id = self.api("POST", "/rollouts", json=body)["id"]
        wait_for(f"rollout {rollout_id}", lambda: self.api("GET", f"/rollouts/{rollout_id}")["state"] != "running", 180)
        detail: dict[str, Any] = self.api("GET", f"/rollouts/{rollout_id}")
        return detail


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("textgen-e2e")
    broker = secured_broker(root / "mosquitto")
    hub = HubProcess(root / "hub", broker)
    agents: list[AgentProcess] = []
    try:
        key, token = hub.prepare(CLASSIFIER, {"1.0.0": {"seed": 1}})
        signing = load_or_create_signing_key(hub.settings.signing_key)
        reference = make_lm_release(signing, LM, "1.0.0")
        publish_lm(hub, reference, root / "lm")
        publish_lm(hub, make_lm_release(signing, LM, "2.0.0"), root / "lm")
        publish_lm(hub, make_lm_release(signing, LM, "2.1.0", wrong_parity=True), root / "lm")
        hub.start()
        for i in range(2):
            agent = AgentProcess(root / f"agent{i}")
            agent.enroll(hub.url, token)
            agent.start().wait_live()
            agents.append(agent)
        f = Fleet(hub, key, agents, reference)
        for agent in agents:
            for model, version in ((CLASSIFIER, "1.0.0"), (LM, "1.0.0")):
                f.api("PUT", f"/devices/{agent.device_id}/models/{model}", json={"version": version})
        wait_for("both models on both agents", lambda: f.serving(CLASSIFIER) + f.serving(LM) == ["1.0.0"] * 4, 120)
        yield f
    except BaseException:
        print(hub.log_tail())  # noqa: T201  (a failed set-up is read from the test output)
        raise
    finally:
        for agent in agents:
            agent.stop()
        hub.stop()
        broker.stop()


def sdk(agent: AgentProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{agent.port}/v1", api_key="unused", max_retries=0)


def test_text_model_canaries_to_every_agent_and_answers_the_sdk(fleet: Fleet) -> None:
    spec = fleet.reference.release.manifest.generation
    assert spec is not None
    sample = spec.samples[0]
    reference_text = fleet.reference.tokenizer.decode(sample.expected_ids)  # the manifest's greedy tokens
    with Traffic(fleet.agents, CLASSIFIER) as traffic:
        detail = fleet.rollout("2.0.0", [50, 100])
    assert detail["state"] == "succeeded", detail["reason"]
    assert fleet.serving(LM) == ["2.0.0", "2.0.0"] and fleet.serving(CLASSIFIER) == ["1.0.0", "1.0.0"]
    assert traffic.sent > 0 and traffic.failed == 0  # the classifier served throughout
    for agent in fleet.agents:
        client = sdk(agent)
        messages = [{"role": "user", "content": sample.text}]
        whole = client.chat.completions.create(model=LM, messages=messages, max_tokens=len(sample.expected_ids))  # type: ignore[arg-type]
        assert whole.choices[0].message.content == reference_text
        stream = client.chat.completions.create(model=LM, messages=messages, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == SCRIPT

    # Generation telemetry reaches the hub, per model and version.
    def ttft_points() -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = fleet.api("GET", "/telemetry", params={"name": "ttft_p95_ms"})["points"]
        return [p for p in points if p["labels"].get("model") == LM and p["labels"].get("version") == "2.0.0"]

    wait_for("time-to-first-token points at the hub", lambda: len(ttft_points()) > 0, 60)


def test_a_text_model_failing_its_parity_tokens_stops_at_the_canary_and_the_old_keeps_generating(
    fleet: Fleet,
) -> None:
    detail = fleet.rollout("2.1.0", [50, 100])
    assert detail["state"] == "failed" and "failed to update to 2.1.0" in detail["reason"], detail["reason"]
    wait_for("every agent on 2.0.0", lambda: fleet.serving(LM) == ["2.0.0", "2.0.0"], 60)
    for agent in fleet.agents:
        reply = sdk(agent).chat.completions.create(model=LM, messages=[{"role": "user", "content": "Hi"}])  # type: ignore[arg-type]
        assert reply.choices[0].message.content == SCRIPT
    reported = fleet.api("GET", f"/devices/{fleet.agents[0].device_id}")
    assert reported["reported"]["models"][CLASSIFIER]["active"] == "1.0.0"
    assert httpx.get(f"http://127.0.0.1:{fleet.agents[0].port}/v2/health/ready").status_code == 200

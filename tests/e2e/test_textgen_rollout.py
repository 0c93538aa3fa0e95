"""A text-generation model rolled out (canary) by a real hub to agents that also serve a classifier.

Real processes: mosquitto with dynamic security, `autodl-hub serve`, two `autodl-agent run`.
The language models: tests/agent/lm.py's (a folder variant: graph, tokenizer), and a tiny
Llama trained and exported in the test by the hub's own text-generation build (model
builder, torch reference, gate). The hub stores each file by sha256 and signs the manifest;
the agents verify every file, load it with the shared generation loop, smoke-test it with
the manifest's parity tokens, and answer the stock `openai` SDK with the hub's reference
greedy output.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlmodel import Session

from hub.config import HubSettings
from hub.registry import publish_build, publish_version
from tests.support.agent import AgentProcess
from tests.support.fleet import Fleet as SupportFleet
from tests.support.lm import SCRIPT, TinyLM, make_lm_release
from tests.support.traffic import Traffic
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLASSIFIER = "clf"
LM = "chat"
CODER = "coder"


def build_coder(root: Path) -> Any:
    """Train a tiny Llama and build it with the hub's text-generation build (cpu-fp32, cpu-int8)."""
    from hub.build.textgen import build_text_generation
    from hub.build.textgen_request import TextGenBuildRequest
    from shared.targets import TargetId
    from tests.support.lm_checkpoints import make_checkpoint, validation_texts

    request = TextGenBuildRequest(
        name=CODER,
        version="1.0.0",
        checkpoint=make_checkpoint(root / "checkpoint", "llama", steps=20),
        validation_texts=tuple(validation_texts()),
        sample_prompts=("def main(",),
        parity_tokens=6,
        targets=(TargetId.CPU_FP32, TargetId.CPU_INT8),
        min_speedup=0.0,
        threads=1,
        decode_tokens=8,
    )
    return build_text_generation(request, root / "work")


def publish_lm(session: Session, settings: HubSettings, tiny: TinyLM, root: Path) -> None:
    """Publish a folder variant: every file by its path in the manifest (the hub signs it)."""
    release = tiny.release
    files: dict[str, Path] = {}
    for item in release.manifest.variants[0].files:
        path = root / release.version / item.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(release.files[item.sha256])
        files[item.path] = path
    publish_version(session, settings, release.manifest, files, actor="e2e")


class Fleet:
    """The support fleet (broker, hub, two agents serving the classifier) and the language models."""

    def __init__(self, fleet: SupportFleet, reference: TinyLM, coder: Any) -> None:
        self.fleet, self.reference, self.coder = fleet, reference, coder
        self.hub, self.agents = fleet.hub, fleet.agents

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.fleet.api(method, path, **kwargs)

    def serving(self, model: str) -> list[str | None]:
        return [a.serving(model) for a in self.agents]

    def rollout(self, version: str, steps: list[float], model: str = LM) -> dict[str, Any]:
        body = {
            "model": model,
            "version": version,
            "selector": {"all": True},
            "steps": steps,
            "analysis": {"min_observation_s": 1.0, "min_devices_reporting": 1, "update_timeout_s": 120},
        }
        rollout_id = self.api("POST", "/rollouts", json=body)["id"]
        return self.fleet.finished(rollout_id, timeout=180)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("textgen-e2e")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = Ed25519PrivateKey.generate()  # the hub re-signs what it publishes
    reference = make_lm_release(signer, LM, "1.0.0")
    coder = build_coder(root / "coder")

    def publish(session: Session, settings: HubSettings) -> None:
        publish_lm(session, settings, reference, root / "lm")
        publish_lm(session, settings, make_lm_release(signer, LM, "2.0.0"), root / "lm")
        publish_lm(session, settings, make_lm_release(signer, LM, "2.1.0", wrong_parity=True), root / "lm")
        publish_build(session, settings, coder, actor="e2e")

    versions = {"1.0.0": {"seed": 1}}
    with SupportFleet(
        root / "fleet", model=CLASSIFIER, versions=versions, agents=2, initial="1.0.0", publish=publish
    ) as support:
        f = Fleet(support, reference, coder)
        for agent in f.agents:
            f.hub.deploy(agent.device_id, LM, "1.0.0", key=support.key)
        wait_for("the language model on both agents", lambda: f.serving(LM) == ["1.0.0", "1.0.0"], 120)
        yield f


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
    assert traffic.sent > 0 and traffic.failures == []  # the classifier served throughout
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


def test_a_model_built_by_the_hub_rolls_out_and_streams_its_reference_greedy_output(fleet: Fleet) -> None:
    manifest = fleet.coder.manifest
    assert manifest.generation is not None and {v.target.value for v in manifest.variants} >= {"cpu-fp32"}
    detail = fleet.rollout("1.0.0", [50, 100], model=CODER)
    assert detail["state"] == "succeeded", detail["reason"]
    assert fleet.serving(CODER) == ["1.0.0", "1.0.0"] and fleet.serving(LM) == ["2.0.0", "2.0.0"]
    sample = manifest.generation.samples[0]
    n = manifest.generation.parity_tokens
    for agent in fleet.agents:
        # The agent's tokenizer turns the sample's text into the prompt ids the hub recorded.
        body = {"text_input": sample.text, "parameters": {"max_tokens": n, "temperature": 0}}
        r = httpx.post(f"http://127.0.0.1:{agent.port}/v2/models/{CODER}/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        stream = sdk(agent).completions.create(
            model=CODER, prompt=sample.text, max_tokens=n, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].text for c in stream)
        assert streamed == r.json()["text_output"]
        served_variant = next(v for v in manifest.variants if v.target.value == agent_target(fleet, agent))
        metrics = served_variant.metrics.generation if served_variant.metrics else None
        matched = metrics.parity_matched if metrics and metrics.parity_matched is not None else n
        assert matched >= 1
        reference = fleet_decode(fleet, sample.expected_ids[: min(n, matched)])
        assert streamed.startswith(reference)
        # Streams at once decode as one batch (one step makes a token of each) and say what one says alone.
        alone = streams_at_once(agent, sample.text, 64, 1)
        before = decode_counts(agent)
        together = streams_at_once(agent, sample.text, 64, 4)
        assert together == alone * 4
        steps, rows = (after - earlier for after, earlier in zip(decode_counts(agent), before, strict=True))
        assert 0 < steps < rows, (steps, rows)


def streams_at_once(agent: AgentProcess, prompt: str, tokens: int, count: int) -> list[str]:
    """Return the texts of `count` greedy completions streamed at once with the SDK."""
    texts: list[str] = []
    clients = [sdk(agent) for _ in range(count)]  # made first: making one takes longer than a short stream
    start = threading.Barrier(count)

    def one(client: openai.OpenAI) -> None:
        start.wait()
        chunks = client.completions.create(model=CODER, prompt=prompt, max_tokens=tokens, temperature=0, stream=True)
        texts.append("".join(c.choices[0].text for c in chunks))

    threads = [threading.Thread(target=one, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return texts


def decode_counts(agent: AgentProcess) -> tuple[float, float]:
    """Return the agent's decode steps and the rows they ran, for the coder model."""
    found = {}
    for line in httpx.get(f"http://127.0.0.1:{agent.port}/metrics", timeout=5).text.splitlines():
        for name in ("steps", "rows"):
            if line.startswith(f"autodl_agent_generation_decode_{name}_total{{") and f'model="{CODER}"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
    return found["steps"], found["rows"]


def agent_target(fleet: Fleet, agent: AgentProcess) -> str:
    data = httpx.get(f"http://127.0.0.1:{agent.port}/v1/models", timeout=5).json()
    return str(next(m["target"] for m in data["data"] if m["id"] == CODER))


def fleet_decode(fleet: Fleet, ids: list[int]) -> str:
    from tokenizers import Tokenizer

    variant = fleet.coder.manifest.variants[0]
    tokenizer_file = next(f for f in variant.files if f.path.endswith("/tokenizer.json"))
    path = next(p for name, p in fleet.coder.files.items() if name == tokenizer_file.path)
    return str(Tokenizer.from_file(str(path)).decode(ids))

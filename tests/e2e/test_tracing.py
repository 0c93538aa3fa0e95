"""Tracing end to end: a real hub, mosquitto and agent export OTLP/HTTP to a real receiver.

One rollout must come out as one trace holding the hub's rollout step and MQTT publish and
the agent's update steps (the `traceparent` rode in the desired state's MQTT 5 user
properties); one inference request as one trace under the client's `traceparent`, with
its pre-processing, session run and post-processing spans. A malformed `traceparent` is
ignored, and a collector that is down costs dropped spans, not requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.agent import AgentProcess
from tests.support.fleet import Fleet
from tests.support.hub import HubProcess
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import free_port
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "clf"
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
UPDATE_STEPS = {"agent.update.download", "agent.update.verify", "agent.update.load", "agent.update.smoke_test"}
UPDATE_STEPS |= {"agent.update.swap"}


@dataclass
class Traced:
    receiver: OtlpReceiver
    fleet: Fleet

    @property
    def hub(self) -> HubProcess:
        return self.fleet.hub

    @property
    def agent(self) -> AgentProcess:
        return self.fleet.agent

    @property
    def key(self) -> str:
        return self.fleet.key

    def api(self, method: str, path: str, **kwargs: object) -> object:
        return self.fleet.api(method, path, **kwargs)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    root = tmp_path_factory.mktemp("tracing-e2e")
    with OtlpReceiver() as receiver, pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        with Fleet(root, model=MODEL, versions={"1.0.0": {"seed": 1}, "2.0.0": {"seed": 2}}, agents=1) as fleet:
            yield Traced(receiver, fleet)


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {len(found)} spans in {sorted(s.name for s in spans)}"
    return found[0]


def test_a_rollout_is_one_trace_from_the_hubs_step_to_the_agents_update(traced: Traced) -> None:
    traced.api("PUT", f"/devices/{traced.agent.device_id}/models/{MODEL}", json={"version": "1.0.0"})
    wait_for("the agent to serve 1.0.0", lambda: traced.agent.serving(MODEL) == "1.0.0")
    body = {
        "model": MODEL,
        "version": "2.0.0",
        "selector": {"all": True},
        "steps": [100],
        "analysis": {"min_observation_s": 0.5, "min_devices_reporting": 1, "update_timeout_s": 120},
    }
    rollout = traced.api("POST", "/rollouts", json=body)
    assert isinstance(rollout, dict)
    wait_for("the agent to serve 2.0.0", lambda: traced.agent.serving(MODEL) == "2.0.0")

    def swap_trace() -> str | None:
        swaps = [
            s
            for s in traced.receiver.spans()
            if s.name == "agent.update.swap" and s.service == "autodl-agent" and s.attributes.get("version") == "2.0.0"
        ]
        return swaps[0].trace_id if swaps else None

    wait_for("the agent's swap span", lambda: swap_trace() is not None, timeout=30)
    trace_id = swap_trace()
    assert trace_id is not None
    wait_for(
        "the hub's spans of the trace", lambda: any(s.service == "autodl-hub" for s in traced.receiver.spans(trace_id))
    )
    spans = traced.receiver.spans(trace_id)
    by_id = {s.span_id: s for s in spans}

    # The hub: the rollout's reconcile step published the desired state inside it.
    step = _one(spans, "hub.rollout.step")
    publish = _one(spans, "hub.mqtt.publish desired")
    assert step.service == publish.service == "autodl-hub"
    assert publish.parent_id == step.span_id
    assert publish.attributes["device"] == traced.agent.device_id
    # The agent: its desired-state span is the child of the hub's publish (across MQTT) ...
    desired = _one(spans, "agent.desired")
    assert desired.service == "autodl-agent" and desired.parent_id == publish.span_id
    # ... and every update step hangs below it, through the update span on the worker thread.
    update = _one(spans, "agent.update")
    assert update.parent_id == desired.span_id and update.attributes["version"] == "2.0.0"
    names = {s.name for s in spans}
    assert names >= UPDATE_STEPS, f"missing {UPDATE_STEPS - names}"
    for name in UPDATE_STEPS:
        span = _one(spans, name)
        ancestors = []
        while span.parent_id in by_id:
            span = by_id[span.parent_id]
            ancestors.append(span.name)
        assert "agent.update" in ancestors and ancestors[-1] == "hub.rollout.step", (name, ancestors)
    # The reported state the agent sent on the way is part of the same trace.
    assert any(s.name == "agent.report" for s in spans)


def test_an_inference_request_joins_the_clients_trace_with_its_steps(traced: Traced) -> None:
    wait_for("a served model", lambda: traced.agent.serving(MODEL) is not None)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = httpx.post(
        f"http://127.0.0.1:{traced.agent.port}/v2/models/{MODEL}/infer",
        json=BODY,
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        timeout=10,
    )
    assert response.status_code == 200
    wait_for("the inference spans", lambda: len(traced.receiver.spans(trace_id)) >= 4, timeout=30)
    spans = traced.receiver.spans(trace_id)
    root = _one(spans, "agent.infer")
    assert root.parent_id == parent_id and root.attributes["model"] == MODEL
    for name in ("agent.infer.preprocess", "agent.infer.run", "agent.infer.postprocess"):
        assert _one(spans, name).parent_id == root.span_id


def test_a_malformed_traceparent_is_ignored(traced: Traced) -> None:
    wait_for("a served model", lambda: traced.agent.serving(MODEL) is not None)
    before = {s.span_id for s in traced.receiver.spans() if s.name == "agent.infer"}
    bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"  # an all-zero trace id is invalid
    for header in (bad, "garbage", "00-" + "g" * 32 + "-00f067aa0ba902b7-01", "x" * 5000):
        response = httpx.post(
            f"http://127.0.0.1:{traced.agent.port}/v2/models/{MODEL}/infer",
            json=BODY,
            headers={"traceparent": header},
            timeout=10,
        )
        assert response.status_code == 200

    def fresh() -> list[ReceivedSpan]:
        return [s for s in traced.receiver.spans() if s.name == "agent.infer" and s.span_id not in before]

    wait_for("four new inference traces", lambda: len(fresh()) == 4, timeout=30)
    assert all(s.parent_id == "" for s in fresh()), "a malformed traceparent must start a new trace"
    assert len({s.trace_id for s in fresh()}) == 4


def test_a_collector_that_is_down_costs_spans_not_requests(tmp_path_factory: pytest.TempPathFactory) -> None:
    """An agent whose collector never answers serves as before and counts what it drops."""
    root = tmp_path_factory.mktemp("tracing-down")
    dead = free_port()  # nothing listens there
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{dead}")
        env.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
        env.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
        with Fleet(root, model=MODEL, versions={"1.0.0": {"seed": 1}}, agents=1, initial="1.0.0") as fleet:
            agent = fleet.agent
            url = f"http://127.0.0.1:{agent.port}/v2/models/{MODEL}/infer"
            with httpx.Client(timeout=10) as client:
                started = time.monotonic()
                for _ in range(200):
                    assert client.post(url, json=BODY).status_code == 200
                elapsed = time.monotonic() - started
            metrics = httpx.get(f"http://127.0.0.1:{agent.port}/metrics", timeout=10).text
            dropped = next(
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith('autodl_agent_tracing_spans_total{outcome="dropped"}')
            )
            # 200 requests of 5 spans through a 16-span queue that never drains (the exporter
            # keeps retrying the first batch): most are dropped and counted, none blocked.
            assert dropped > 500, metrics
            assert elapsed < 60, f"200 requests took {elapsed:.1f}s with the collector down"
            assert fleet.api("GET", "/devices")  # the hub (tracing on, collector down) answers


def test_both_sides_count_their_exported_spans_on_metrics(traced: Traced) -> None:
    def exported(text: str, name: str) -> float:
        prefix = f'{name}{{outcome="exported"}} '
        return next((float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)), 0.0)

    wait_for(
        "exported spans on the hub's /metrics",
        lambda: exported(httpx.get(traced.hub.url + "/metrics").text, "autodl_hub_tracing_spans_total") > 0,
        timeout=30,
    )
    agent = httpx.get(f"http://127.0.0.1:{traced.agent.port}/metrics").text
    assert exported(agent, "autodl_agent_tracing_spans_total") > 0


def test_a_command_carries_its_trace_to_the_agent(traced: Traced) -> None:
    sent = traced.api("POST", "/commands", json={"name": "ping", "device_id": traced.agent.device_id})
    assert isinstance(sent, list) and sent

    def received() -> list[ReceivedSpan]:
        return [s for s in traced.receiver.spans() if s.name == "agent.command"]

    wait_for("the agent's command span", lambda: bool(received()), timeout=30)
    command = received()[-1]
    wait_for("the hub's publish span", lambda: command.parent_id in {s.span_id for s in traced.receiver.spans()})
    spans = {s.span_id: s for s in traced.receiver.spans(command.trace_id)}
    publish = spans[command.parent_id]
    assert publish.name == "hub.mqtt.publish command" and publish.service == "autodl-hub"
    assert publish.attributes["command"] == "ping"
    # ... inside the API request that asked for it (FastAPI instrumentation).
    assert any(s.name.startswith("POST /commands") for s in spans.values()), sorted(s.name for s in spans.values())

"""A text-generation model on a real `autodl-agent run` process beside a classifier.

Real mosquitto, real HTTP, real ONNX Runtime, the stock `openai` SDK and the agent's own
CLI; the hub's HTTP API is the in-test stand-in (tests/support/hubstub.py). The rollout by
a real hub is tests/e2e/test_textgen_rollout.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared.messages import UpdateState
from tests.support.agent import AgentProcess
from tests.support.hubstub import HubStub, publish_desired, publisher
from tests.support.lm import SCRIPT, make_lm_release
from tests.support.models import make_release
from tests.support.mqtt import Watcher
from tests.support.processes import Broker
from tests.support.waiting import wait_for


def wait_until(check: Any, timeout: float = 30, what: str = "condition") -> Any:
    return wait_for(what, check, timeout)


pytestmark = pytest.mark.slow


def metric(url: str, name: str, model: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"autodl_agent_{name}{{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_text_model_beside_a_classifier_serves_the_sdk_and_refuses_a_bad_version(
    tmp_state_dir: Path, hub_stub: HubStub, mqtt_broker: Broker, enrolled: str, watcher: Watcher
) -> None:
    classifier = hub_stub.publish(make_release(hub_stub.key, "m", "1.0.0", seed=1))
    good = make_lm_release(hub_stub.key, "chat", "1.0.0")
    lm_v1 = hub_stub.publish(good.release)
    lm_bad = hub_stub.publish(make_lm_release(hub_stub.key, "chat", "2.0.0", wrong_parity=True).release)
    agent = AgentProcess(tmp_state_dir).start()
    try:
        with publisher(mqtt_broker.host, mqtt_broker.port) as hub_mqtt:
            publish_desired(hub_mqtt, enrolled, 1, {"m": classifier, "chat": lm_v1})
            agent.wait_live()
            wait_for("both served", lambda: agent.serving("chat") == "1.0.0" and agent.serving("m") == "1.0.0")
            sdk = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="x", max_retries=0)
            messages = [{"role": "user", "content": "你好 🙂"}]
            whole = sdk.chat.completions.create(model="chat", messages=messages, temperature=0)  # type: ignore[arg-type]
            assert whole.choices[0].message.content == good.greedy_text(good.chat_prompt_ids("你好 🙂")) == SCRIPT
            streamed = sdk.chat.completions.create(model="chat", messages=messages, stream=True)  # type: ignore[arg-type]
            deltas = [c.choices[0].delta.content or "" for c in streamed if c.choices]
            assert "".join(deltas) == SCRIPT and not any("\ufffd" in d for d in deltas)
            assert agent.infer("m")[0] == "1.0.0"  # the classifier is unaffected

            # The CLI streams to the terminal; --chat keeps the conversation going from stdin.
            cli = [sys.executable, "-c", "from agent.cli import main; main()", "generate", "--state-dir"]
            cli += [str(tmp_state_dir), "--port", str(agent.port)]
            out = subprocess.run(
                [*cli, "chat", "Hi", "--chat"], input="more\n", capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines() == [SCRIPT, SCRIPT]
            completion = subprocess.run([*cli, "chat", "Hi\n", "--max-tokens", "2"], capture_output=True, text=True)
            assert completion.returncode == 0 and completion.stdout.strip() == "Edge models"
            unknown = subprocess.run([*cli, "nope", "Hi"], capture_output=True, text=True, timeout=60)
            assert unknown.returncode == 1 and "not loaded" in unknown.stderr

            # A version whose greedy tokens differ from the manifest's is refused; 1.0.0 keeps generating.
            stop = threading.Event()
            answers: list[str] = []
            failures: list[str] = []

            def keep_asking() -> None:
                client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="x", max_retries=0)
                while not stop.is_set():
                    try:
                        r = client.chat.completions.create(model="chat", messages=messages, max_tokens=3)  # type: ignore[arg-type]
                        answers.append(r.choices[0].message.content or "")
                    except openai.OpenAIError as exc:
                        failures.append(str(exc))

            load = threading.Thread(target=keep_asking)
            load.start()
            try:
                publish_desired(hub_mqtt, enrolled, 2, {"m": classifier, "chat": lm_bad})
                state = watcher.wait_reported(
                    lambda r: r.revision == 2 and r.models["chat"].state == UpdateState.ROLLED_BACK, timeout=60
                )
            finally:
                stop.set()
                load.join(30)
            assert "greedy tokens" in (state.models["chat"].error or "")
            assert state.models["chat"].active == "1.0.0" and state.models["m"].active == "1.0.0"
            assert failures == [] and len(answers) > 0
            assert agent.serving("chat") == "1.0.0"

            # Telemetry per model and version; bad input counted, the server unaffected.
            bad = httpx.post(f"{agent.url}/v1/chat/completions", json={"model": "chat", "messages": []})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
            assert (metric(agent.url, "generation_completion_tokens_total", "chat") or 0) > 0
            assert (metric(agent.url, "generation_first_tokens_total", "chat") or 0) > 0
            assert (metric(agent.url, "generation_bad_requests_total", "chat") or 0) >= 1
            assert sdk.models.list().data[0].id in ("chat", "m")
    finally:
        agent.stop()


def test_concurrency_limit_and_disconnect_on_the_agent_process(
    tmp_state_dir: Path, hub_stub: HubStub, mqtt_broker: Broker, enrolled: str
) -> None:
    slow = make_lm_release(hub_stub.key, "slow", "1.0.0", slow_steps=40, context=2048)
    desired = hub_stub.publish(slow.release)
    env = {"AUTODL_AGENT_GENERATION_MAX_SEQUENCES": "2", "AUTODL_AGENT_GENERATION_QUEUE": "0"}
    agent = AgentProcess(tmp_state_dir, env).start()
    try:
        with publisher(mqtt_broker.host, mqtt_broker.port) as hub_mqtt:
            publish_desired(hub_mqtt, enrolled, 1, {"slow": desired})
            agent.wait_live()
            wait_for("served", lambda: agent.serving("slow") == "1.0.0", 60)
        assert metric(agent.url, "generation_sequences_max", "slow") == 2

        # A client that goes away mid-stream frees its sequence.
        body = json.dumps({"model": "slow", "prompt": "Hi\n", "max_tokens": 1500, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", agent.port))
        head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        got = b""
        while got.count(b"data: ") < 2:
            got += sock.recv(4096)
        assert metric(agent.url, "generation_sequences_in_flight", "slow") == 1
        sock.close()
        wait_for("sequence freed", lambda: metric(agent.url, "generation_sequences_in_flight", "slow") == 0, 10)

        # Two sequences run; a third request is refused with 503 + Retry-After; the two complete.
        done: list[str] = []

        def long_one() -> None:
            client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="x", max_retries=0)
            stream = client.completions.create(model="slow", prompt="Hi\n", max_tokens=400, stream=True)
            done.append("".join(c.choices[0].text for c in stream))

        workers = [threading.Thread(target=long_one) for _ in range(2)]
        for w in workers:
            w.start()
        wait_for("two in flight", lambda: metric(agent.url, "generation_sequences_in_flight", "slow") == 2, 20)
        refused = httpx.post(
            f"{agent.url}/v1/completions", json={"model": "slow", "prompt": "Hi\n", "max_tokens": 2}, timeout=10
        )
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        for w in workers:
            w.join(120)
        assert len(done) == 2 and all(d.startswith("Edge models speak") for d in done)
    finally:
        agent.stop()


def test_the_model_limit_not_the_http_workers_bounds_generation_requests(
    tmp_state_dir: Path, hub_stub: HubStub, mqtt_broker: Broker, enrolled: str
) -> None:
    """Two HTTP workers, no HTTP queue; the model allows three sequences and one queued request.

    Four streams are accepted (three generate, one waits), the fifth gets the model's 503, and
    the classifier beside it is still answered while all four hold their connections.
    """
    classifier = hub_stub.publish(make_release(hub_stub.key, "m", "1.0.0", seed=1))
    slow = make_lm_release(hub_stub.key, "slow", "1.0.0", slow_steps=40, context=2048)
    env = {
        "AUTODL_AGENT_HTTP_WORKERS": "2",
        "AUTODL_AGENT_HTTP_QUEUE": "0",
        "AUTODL_AGENT_GENERATION_MAX_SEQUENCES": "3",
        "AUTODL_AGENT_GENERATION_QUEUE": "1",
    }
    agent = AgentProcess(tmp_state_dir, env).start()
    try:
        with publisher(mqtt_broker.host, mqtt_broker.port) as hub_mqtt:
            publish_desired(hub_mqtt, enrolled, 1, {"m": classifier, "slow": hub_stub.publish(slow.release)})
            agent.wait_live()
            wait_for("both served", lambda: agent.serving("slow") == "1.0.0" and agent.serving("m") == "1.0.0", 60)

        client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="x", max_retries=0, timeout=300)

        def open_stream() -> Any:
            return client.completions.create(model="slow", prompt="Hi\n", max_tokens=600, stream=True)

        # Three streams generate (each has sent its first chunk and is still going) ...
        streams = [open_stream() for _ in range(3)]
        firsts = [next(iter(stream)).choices[0].text for stream in streams]
        assert metric(agent.url, "generation_sequences_in_flight", "slow") == 3
        # ... and a fourth waits in the model's queue, holding no HTTP worker either.
        queued: list[Any] = []
        fourth = threading.Thread(target=lambda: queued.append("".join(c.choices[0].text for c in open_stream())))
        fourth.start()
        wait_for("one queued", lambda: metric(agent.url, "generation_sequences_queued", "slow") == 1, 60)
        # The HTTP workers are free: inference is answered while four generation requests are open.
        assert agent.infer("m")[0] == "1.0.0"
        # Past the model's sequences and queue, its own 503 in OpenAI's shape, with Retry-After.
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="slow", prompt="Hi\n", max_tokens=2)
        assert refused.value.status_code == 503
        assert refused.value.response.json()["error"]["code"] == "overloaded"
        assert int(refused.value.response.headers["retry-after"]) >= 1
        # All four complete.
        done = [
            first + "".join(c.choices[0].text for c in stream) for first, stream in zip(firsts, streams, strict=True)
        ]
        fourth.join(300)
        done += queued
        assert len(done) == 4 and all(d.startswith("Edge models speak") for d in done)
        wait_for("slots freed", lambda: metric(agent.url, "generation_sequences_in_flight", "slow") == 0, 10)
        # The connections went back to the server: a kept-alive client asks again on its connection.
        with httpx.Client(timeout=30) as kept:
            for _ in range(2):
                r = kept.post(f"{agent.url}/v1/completions", json={"model": "slow", "prompt": "Hi\n", "max_tokens": 2})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Edge models"
    finally:
        agent.stop()

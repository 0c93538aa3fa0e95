"""The OpenAI-compatible and Triton generate API over real HTTP, real ONNX Runtime, the stock `openai` SDK.

The server is the agent's own (agent.server) in this process, serving a tiny language model
(tests/agent/lm.py) through the shared generation loop; tests/agent/test_textgen_process.py
and tests/e2e repeat the essentials with real agent and hub processes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentSettings
from agent.openai_api import GenerationHooks
from agent.runtime import LoadedModel, ModelRegistry
from agent.server import InferenceServer, ServerContext
from agent.textgen import Finished
from agent.textgen_runtime import load_text_model, smoke_test_text
from tests.support.lm import FOLDER, SCRIPT, TinyLM, make_lm_release

NAME = "chat"


def write_folder(tiny: TinyLM, root: Path) -> Path:
    for f in tiny.release.manifest.variants[0].files:
        path = root / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny.release.files[f.sha256])
    return root / FOLDER


def load(tiny: TinyLM, root: Path, **settings: Any) -> LoadedModel:
    manifest = tiny.release.manifest
    model = load_text_model(
        manifest, manifest.variants[0], write_folder(tiny, root), 1, AgentSettings(state_dir=root, **settings)
    )
    smoke_test_text(model)
    return model


class Served:
    """An in-process agent API serving language models, with what its hooks saw."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.observed: list[tuple[str, str, bool, Finished | None]] = []
        self.bad: list[tuple[str, str]] = []
        hooks = GenerationHooks(
            observe=lambda name, version, s, ok, done: self.observed.append((name, version, ok, done)),
            bad_request=lambda model, code: self.bad.append((model, code)),
        )
        context = ServerContext(registry, lambda: True, lambda: {}, generation=hooks)
        self.server = InferenceServer("127.0.0.1", 0, context)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.sdk = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny() -> TinyLM:
    return make_lm_release(Ed25519PrivateKey.generate(), NAME, "1.0.0")


@pytest.fixture(scope="module")
def served(tiny: TinyLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    registry = ModelRegistry()
    registry.activate(load(tiny, tmp_path_factory.mktemp("lm")))
    s = Served(registry)
    yield s
    s.server.stop()


def chat(user: str = "Hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": user}]


def test_sdk_chat_not_streamed_equals_the_reference_greedy_output(served: Served, tiny: TinyLM) -> None:
    reply = served.sdk.chat.completions.create(model=NAME, messages=chat(), temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == tiny.greedy_text(tiny.chat_prompt_ids("Hi")) == SCRIPT
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens == len(tiny.chat_prompt_ids("Hi"))
    assert reply.usage.completion_tokens == len(tiny.tokenizer.encode(SCRIPT).ids)


def test_sdk_chat_streamed_equals_the_reference_and_ends_with_finish_reason_and_usage(
    served: Served, tiny: TinyLM
) -> None:
    stream = served.sdk.chat.completions.create(
        model=NAME,
        messages=chat(),  # type: ignore[arg-type]
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPT
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # token by token
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(tiny.tokenizer.encode(SCRIPT).ids)
    assert all("\ufffd" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_sse_framing_is_openai_s(served: Served) -> None:
    body = {"model": NAME, "messages": chat(), "stream": True, "max_tokens": 3}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked"
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first, last = json.loads(events[0][6:]), json.loads(events[-2][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_completions_streamed_and_not(served: Served, tiny: TinyLM) -> None:
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    whole = served.sdk.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    expected = tiny.tokenizer.decode(tiny.tokenizer.encode(SCRIPT).ids[:4])
    assert whole.choices[0].text == expected
    streamed = served.sdk.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_a_stop_split_across_tokens_ends_the_output_without_leaking(served: Served, tiny: TinyLM) -> None:
    pieces = [tiny.tokenizer.decode([i]) for i in tiny.tokenizer.encode("Edge models speak").ids]
    assert len(pieces) == 3
    stop = pieces[1][-3:] + pieces[2][:3]  # "els Sp..." spans the two tokens
    stream = served.sdk.chat.completions.create(model=NAME, messages=chat(), stop=[stop], stream=True)  # type: ignore[arg-type]
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    text = "".join(deltas)
    assert text == SCRIPT[: SCRIPT.index(stop)]
    assert not any(stop[:2] in d for d in deltas)
    reply = served.sdk.chat.completions.create(model=NAME, messages=chat(), stop=stop)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == "stop"


def test_chinese_and_emoji_stream_without_replacement_characters(served: Served) -> None:
    stream = served.sdk.chat.completions.create(
        model=NAME,
        messages=chat("你好 🙂 世界"),  # type: ignore[arg-type]
        stream=True,
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == SCRIPT and "你界🚀" in SCRIPT
    assert not any("\ufffd" in d for d in deltas)


def test_same_seed_same_output(served: Served) -> None:
    def sample(seed: int) -> str:
        prompt = "def f(x):"
        r = served.sdk.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=1.5, seed=seed)
        return r.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(5)}) > 1


def test_triton_generate_and_generate_stream(served: Served, tiny: TinyLM) -> None:
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    r = httpx.post(
        f"{served.url}/v2/models/{NAME}/generate",
        json={"text_input": prompt, "parameters": {"max_tokens": 64, "temperature": 0}},
        timeout=10,
    )
    assert r.status_code == 200
    assert r.json() == {"model_name": NAME, "model_version": "1.0.0", "text_output": SCRIPT, "finish_reason": "stop"}
    with httpx.stream(
        "POST",
        f"{served.url}/v2/models/{NAME}/versions/1.0.0/generate_stream",
        json={"text_input": prompt, "max_tokens": 5},
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == tiny.tokenizer.decode(tiny.tokenizer.encode(SCRIPT).ids[:5])
    assert events[-1]["finish_reason"] == "length"
    bad = httpx.post(f"{served.url}/v2/models/{NAME}/generate", json={"text_input": "x", "parameters": {"top_p": 0}})
    assert bad.status_code == 400 and "top_p" in bad.json()["error"]


def test_models_list_is_openai_s_and_keeps_the_agent_fields(served: Served) -> None:
    listing = served.sdk.models.list()
    ids = [m.id for m in listing.data]
    assert ids == [NAME]
    raw = httpx.get(f"{served.url}/v1/models").json()
    assert (
        raw["object"] == "list" and raw["data"][0]["version"] == "1.0.0" and raw["data"][0]["task"] == "text-generation"
    )
    assert raw["models"][0]["name"] == NAME  # the former shape, kept beside `data`
    assert served.sdk.models.retrieve(NAME).id == NAME


BAD: list[tuple[str, Any, str | None]] = [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, "model"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "system", "content": "x"}]}, "messages"),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        "temperature",
    ),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_p": 1.01}, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ["y" * 65]}, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 3}, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "word " * 200}, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_input_is_a_400_in_openai_s_shape_counted_and_harmless(
    served: Served, path: str, body: Any, param: str | None
) -> None:
    before = len(served.bad)
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{served.url}{path}", timeout=10, headers={"Content-Type": "application/json"}, **kwargs)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert len(served.bad) == before + 1
    ok = served.sdk.chat.completions.create(model=NAME, messages=chat(), max_tokens=2)  # type: ignore[arg-type]
    assert ok.choices[0].finish_reason == "length"


def test_a_prompt_over_the_context_names_both_lengths(served: Served, tiny: TinyLM) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        served.sdk.completions.create(model=NAME, prompt="word " * 200)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    context = tiny.release.manifest.generation.context_length  # type: ignore[union-attr]
    prompt_tokens = len(tiny.tokenizer.encode("word " * 200).ids)
    assert f"prompt is {prompt_tokens} tokens" in str(info.value) and f"{context} tokens" in str(info.value)


def test_max_tokens_is_clamped_to_the_context(served: Served, tiny: TinyLM) -> None:
    r = served.sdk.completions.create(model=NAME, prompt="def f(x):", max_tokens=10_000, temperature=2, seed=1)
    context = tiny.release.manifest.generation.context_length  # type: ignore[union-attr]
    assert r.usage is not None and r.usage.prompt_tokens + r.usage.completion_tokens <= context


def test_a_template_that_fails_to_render_is_a_400(tiny: TinyLM, tmp_path: Path) -> None:
    registry = ModelRegistry()
    model = load(tiny, tmp_path)
    assert model.text is not None
    from agent.chat_template import ChatTemplate

    model.text.template = ChatTemplate("{{ raise_exception('only one turn') if messages|length > 1 else 'x' }}")
    registry.activate(model)
    s = Served(registry)
    try:
        two = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": NAME, "messages": two})
        assert r.status_code == 400 and r.json()["error"]["code"] == "template_error"
        assert "only one turn" in r.json()["error"]["message"]
    finally:
        s.server.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A model at the pace of a real one (tens of ms a token), one sequence at a time, none queued."""
    tiny = make_lm_release(Ed25519PrivateKey.generate(), "slow", "1.0.0", slow_steps=40, context=2048)
    registry = ModelRegistry()
    registry.activate(load(tiny, tmp_path_factory.mktemp("slow"), generation_max_sequences=1, generation_queue=0))
    s = Served(registry)
    yield s
    s.server.stop()


def long_body() -> dict[str, Any]:
    """A request that runs for half a minute unless stopped (the slow model never ends by itself)."""
    return {"model": "slow", "prompt": "Hi\n", "max_tokens": 1500, "temperature": 0, "stream": True}


def limiter_running(s: Served) -> int:
    model = s.registry.get("slow")
    assert model is not None and model.text is not None
    return model.text.limiter.running


def test_a_client_that_disconnects_frees_its_sequence(slow: Served) -> None:
    host, port = "127.0.0.1", slow.server.port
    payload = json.dumps(long_body()).encode()
    sock = socket.create_connection((host, port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    got = b""
    while got.count(b"data: ") < 3:
        got += sock.recv(4096)
    assert limiter_running(slow) == 1
    sock.close()
    left = time.monotonic()
    # The stream's thread frees the slot, then reports the request (a moment later).
    while (limiter_running(slow) or not slow.observed) and time.monotonic() - left < 5:
        time.sleep(0.01)
    assert limiter_running(slow) == 0
    name, _, ok, done = slow.observed[-1]
    assert name == "slow" and ok and done is not None and done.cancelled and done.completion_tokens < 50  # not 1500


def test_over_the_limit_gets_503_with_retry_after_and_the_rest_complete(slow: Served) -> None:
    results: list[str] = []

    def first() -> None:
        stream = slow.sdk.completions.create(**{**long_body(), "max_tokens": 40})
        results.append("".join(c.choices[0].text for c in stream))

    worker = threading.Thread(target=first)
    worker.start()
    deadline = time.monotonic() + 10
    while limiter_running(slow) == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    r = httpx.post(f"{slow.url}/v1/completions", json={**long_body(), "stream": False, "max_tokens": 2}, timeout=10)
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "overloaded"
    worker.join(60)
    assert len(results) == 1 and results[0]
    after = slow.sdk.completions.create(model="slow", prompt="def f(x):", max_tokens=2)
    assert after.choices[0].finish_reason == "length"


def test_onnxruntime_genai_backend_reads_the_same_folder_and_answers_alike(tmp_path: Path) -> None:
    from agent.genai_backend import GenaiLoop

    tiny = make_lm_release(Ed25519PrivateKey.generate(), NAME, "1.0.0", genai_config=True)
    model = load(tiny, tmp_path, generation_backend="genai")  # smoke-tested through ORT GenAI
    assert model.text is not None and isinstance(model.text.loop, GenaiLoop) and model.session is None
    registry = ModelRegistry()
    registry.activate(model)
    s = Served(registry)
    try:
        whole = s.sdk.chat.completions.create(model=NAME, messages=chat(), temperature=0)  # type: ignore[arg-type]
        assert whole.choices[0].message.content == SCRIPT and whole.choices[0].finish_reason == "stop"
        stream = s.sdk.chat.completions.create(model=NAME, messages=chat("你好"), stream=True, max_tokens=9)  # type: ignore[arg-type]
        chunks = [c for c in stream if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == tiny.tokenizer.decode(
            tiny.tokenizer.encode(SCRIPT).ids[:9]
        )
        assert chunks[-1].choices[0].finish_reason == "length"

        def sample(seed: int) -> str:
            r = s.sdk.completions.create(model=NAME, prompt="def f(x):", max_tokens=12, temperature=1.5, seed=seed)
            return r.choices[0].text

        assert sample(5) == sample(5)
        tensor = {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1]}
        infer = httpx.post(f"{s.url}/v2/models/{NAME}/infer", json={"inputs": [tensor]})
        assert infer.status_code == 501  # no plain session: tensors are the loop's business
    finally:
        s.server.stop()


def test_a_generation_past_its_time_limit_ends_with_length(tmp_path: Path) -> None:
    tiny = make_lm_release(Ed25519PrivateKey.generate(), "slow", "1.0.0", slow_steps=40, context=2048)
    registry = ModelRegistry()
    registry.activate(load(tiny, tmp_path, generation_timeout_s=1.0))
    s = Served(registry)
    try:
        r = s.sdk.completions.create(model="slow", prompt="Hi\n", max_tokens=1500, temperature=0)
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and 0 < r.usage.completion_tokens < 1500  # cut by the limit, not max_tokens
        done = s.observed[-1][3]
        assert done is not None and done.timed_out
    finally:
        s.server.stop()

"""Text-generation requests: validation in OpenAI's error shape, roles, chat templates in a sandbox, limits."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from agent.chat_template import ChatMessage, ChatTemplate, TemplateError, check_roles
from agent.openai_schema import BadRequest, ChatRequest, CompletionRequest, GenerateRequest, parse
from agent.textgen import Busy, SequenceLimiter, derive_max_sequences

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": -3}, "max_tokens"),
        ({**CHAT, "temperature": -0.1}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "top_p": 1.5}, "top_p"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "stop": ["x" * 65]}, "stop"),
        ({**CHAT, "n": 2}, "n"),
        ({"model": "m", "messages": []}, "messages"),
        ({"messages": CHAT["messages"]}, "model"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_bad_chat_parameters_name_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse(ChatRequest, body)
    assert info.value.param == param
    assert info.value.status == 400


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(BadRequest, match="JSON object"):
        parse(CompletionRequest, ["prompt"])


def test_good_requests_parse_with_defaults_and_extras_ignored() -> None:
    req = parse(ChatRequest, {**CHAT, "stop": "END", "user": "u1", "frequency_penalty": 0, "max_completion_tokens": 7})
    assert req.stop == ["END"] and req.limit() == 7 and req.n == 1
    gen = parse(GenerateRequest, {"text_input": "x", "parameters": {"max_tokens": 3, "temperature": 0}})
    assert gen.limit() == 3


def test_triton_parameter_errors_name_the_parameter_not_the_wrapper() -> None:
    with pytest.raises(BadRequest) as info:
        parse(GenerateRequest, {"text_input": "x", "parameters": {"top_p": 2}})
    assert info.value.param == "top_p"


@pytest.mark.parametrize(
    ("roles", "problem"),
    [
        (["user"], None),
        (["system", "user"], None),
        (["system", "user", "assistant", "user"], None),
        (["system"], "no user turn"),
        (["assistant", "user"], "out of order"),
        (["user", "user"], "out of order"),
        (["user", "system"], "out of order"),
        (["user", "assistant"], "last message"),
    ],
)
def test_roles(roles: list[str], problem: str | None) -> None:
    found = check_roles([ChatMessage(r, "x") for r in roles])
    assert (found is None) if problem is None else (found is not None and problem in found)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_renders_like_hugging_face() -> None:
    prompt = ChatTemplate(CHATML).render([ChatMessage("system", "be brief"), ChatMessage("user", "你好")])
    assert prompt == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",  # sandbox escape attempt
        "{% do messages.append(1) %}{{ messages }}",  # mutation (no `do` extension either)
        "{{ raise_exception('no system role') }}",
        "{{ messages[5]['content'] }}",
        "{% for %}",  # does not compile
    ],
)
def test_a_template_that_escapes_or_fails_is_a_template_error(source: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([ChatMessage("user", "x")])


def test_immutable_sandbox_refuses_mutating_the_messages() -> None:
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages.append({'role': 'x'}) }}").render([ChatMessage("user", "x")])


def test_max_sequences_from_memory_and_kv_size() -> None:
    kv = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M fp32 KV bytes per token
    assert derive_max_sequences(8 * 2**30, kv, 2048) == 45  # 4 GiB / 94 MB
    assert derive_max_sequences(100 * 2**20, kv, 2048) == 1  # never below one
    assert derive_max_sequences(2**40, kv, 2048) == 64  # capped


def test_limiter_queues_then_refuses_with_retry_after() -> None:
    limiter = SequenceLimiter(slots=1, queue=1)
    assert limiter.acquire(lambda: False)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(limiter.acquire(lambda: False)))
    waiter.start()
    while limiter.waiting == 0:
        pass
    with pytest.raises(Busy) as info:
        limiter.acquire(lambda: False)
    assert info.value.retry_after_s >= 1
    limiter.release(0.5)
    waiter.join(5)
    assert got == [True] and limiter.running == 1
    limiter.release(0.5)
    assert limiter.running == 0


def test_a_queued_request_whose_client_left_gives_up_its_place() -> None:
    limiter = SequenceLimiter(slots=1, queue=4)
    assert limiter.acquire(lambda: False)
    assert limiter.acquire(lambda: True) is False
    assert limiter.waiting == 0


def test_admission_takes_a_slot_or_a_queue_place_without_waiting() -> None:
    limiter = SequenceLimiter(slots=1, queue=1)
    assert limiter.admit() is True  # a slot
    assert limiter.admit() is False and limiter.waiting == 1  # a queue place, held without a thread waiting
    with pytest.raises(Busy):
        limiter.admit()
    limiter.leave()  # the queued request will not begin: its place is free again
    assert limiter.waiting == 0 and limiter.admit() is False
    limiter.release(None)
    assert limiter.wait(lambda: False) and limiter.running == 1 and limiter.waiting == 0

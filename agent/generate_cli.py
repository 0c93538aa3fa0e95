"""`autodl-agent generate NAME "prompt"`: stream a completion from the running agent to the terminal.

With `--chat` the prompt is the first user turn of a conversation that goes on: each
answer is kept, and the next line read from the terminal is the next user turn (an
empty line or end of input ends it). It speaks the agent's own OpenAI-compatible API.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from agent.errors import AgentError

__all__ = ["add_arguments", "stream_events"]


def add_arguments(sub: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    sub.add_argument("name", help="model name")
    sub.add_argument("prompt", help="the prompt (with --chat: the first user message)")
    sub.add_argument("--chat", action="store_true", help="chat: keep a conversation, read more turns from stdin")
    sub.add_argument("--system", help="a system message first (with --chat)")
    sub.add_argument("--max-tokens", type=int, help="tokens to generate at most")
    sub.add_argument("--temperature", type=float, help="0 is greedy")
    sub.add_argument("--top-p", type=float)
    sub.add_argument("--top-k", type=int)
    sub.add_argument("--seed", type=int, help="the same seed gives the same output")
    sub.add_argument("--stop", action="append", help="a stop string (repeatable, up to 4)")


def stream_events(url: str, body: dict[str, Any], timeout: float = 600) -> Iterator[dict[str, Any]]:
    """POST a streaming request; yield each server-sent event's JSON until `[DONE]`; raise AgentError."""
    import httpx

    try:
        with httpx.stream("POST", url, json=body, timeout=httpx.Timeout(timeout, connect=5)) as response:
            if response.status_code >= 400:
                response.read()
                try:
                    error = response.json().get("error")
                    message = error.get("message") if isinstance(error, dict) else error
                except ValueError:
                    message = response.text
                raise AgentError(f"HTTP {response.status_code}: {message}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                yield json.loads(data)
    except httpx.HTTPError as exc:
        raise AgentError(f"the agent does not answer at {url} (is `autodl-agent run` running?): {exc}") from exc


def _body(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    return {"model": args.name, "stream": True, **{k: v for k, v in options.items() if v is not None}}


def _answer(url: str, body: dict[str, Any], out: TextIO) -> str:
    parts: list[str] = []
    for event in stream_events(url, body):
        for choice in event.get("choices") or []:
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if text:
                parts.append(text)
                out.write(text)
                out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


def generate(args: argparse.Namespace, base_url: str, out: TextIO = sys.stdout, inp: TextIO = sys.stdin) -> None:
    """Run the command against the agent at `base_url`."""
    body = _body(args)
    if not args.chat:
        _answer(f"{base_url}/v1/completions", {**body, "prompt": args.prompt}, out)
        return
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    prompt: str | None = args.prompt
    while prompt:
        messages.append({"role": "user", "content": prompt})
        answer = _answer(f"{base_url}/v1/chat/completions", {**body, "messages": messages}, out)
        messages.append({"role": "assistant", "content": answer})
        if inp.isatty():
            out.write("> ")
            out.flush()
        line = inp.readline()
        prompt = line.rstrip("\n") if line else None

"""Text generation on the agent's port: OpenAI chat/completions and Triton's generate extension.

POST /v1/chat/completions            OpenAI chat (SSE with `stream: true`, `data: [DONE]` at the end)
POST /v1/completions                 OpenAI completions, one prompt string
GET  /v1/models, /v1/models/{id}     OpenAI's list shape; each entry keeps the agent's own fields
                                     (version, target, providers, task), and the former `models`
                                     array stays beside `data`
POST /v2/models/{name}/generate      Triton generate: `text_input` -> `text_output`
POST /v2/models/{name}/generate_stream   the same as SSE, one `text_output` delta per event

A streamed response is written chunk by chunk (HTTP/1.1 chunked), each delta as soon as
it is safe to send, and before each token the socket is polled, so a client that went
away stops its generation within one token and frees its sequence.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from agent.chat_template import ChatMessage, check_roles
from agent.openai_schema import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
    error_body,
    parse,
)
from agent.textgen import Busy, Delta, Finished, Generation, SequenceLimiter, TextModel

if TYPE_CHECKING:
    from agent.runtime import LoadedModel, ModelRegistry

__all__ = ["GenerationHooks", "handles", "models_list", "route", "sequence_metrics"]

logger = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024


@dataclass(frozen=True)
class GenerationHooks:
    """Where the API reports what happened (agent.telemetry)."""

    observe: Callable[[str, str, float, bool, Finished | None], None] = lambda *a: None
    bad_request: Callable[[str, str], None] = lambda model, code: None


def handles(method: str, path: str) -> bool:
    """Return True for the paths this module answers."""
    if path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
        return True
    if path == "/v1/models" or path.startswith("/v1/models/") and ":" not in path:
        return method == "GET"
    parts = path.strip("/").split("/")
    return method == "POST" and len(parts) >= 4 and parts[:2] == ["v2", "models"] and _triton_kind(parts) is not None


def _triton_kind(parts: list[str]) -> str | None:
    rest = parts[3:]
    if len(rest) == 3 and rest[0] == "versions":
        rest = rest[2:]
    return rest[0] if len(rest) == 1 and rest[0] in ("generate", "generate_stream") else None


def models_list(registry: ModelRegistry) -> dict[str, Any]:
    """Return GET /v1/models: OpenAI's list, with the agent's former `models` array kept."""
    described = registry.describe()
    data = []
    for model, info in zip(registry.all(), described, strict=True):
        data.append(
            {
                "id": model.name,
                "object": "model",
                "created": int(model.manifest.created_at.timestamp()),
                "owned_by": "autodl",
                **info,
                "task": model.manifest.task,
            }
        )
    return {"object": "list", "data": data, "models": described}


def sequence_metrics(registry: ModelRegistry) -> str:
    """Return Prometheus lines: sequences in flight, queued and allowed, per text-generation model."""
    lines: list[str] = []
    rows = [(m.name, m.version, m.text.limiter) for m in registry.all() if m.text is not None]
    series: list[tuple[str, str, Callable[[SequenceLimiter], int]]] = [
        ("generation_sequences_in_flight", "Sequences being generated.", lambda lim: lim.running),
        ("generation_sequences_queued", "Requests waiting for a sequence slot.", lambda lim: lim.waiting),
        ("generation_sequences_max", "Sequences allowed at once.", lambda lim: lim.slots),
    ]
    for metric, help_text, read in series:
        lines += [f"# HELP autodl_{metric} {help_text}", f"# TYPE autodl_{metric} gauge"]
        lines += [f'autodl_{metric}{{model="{n}",version="{v}"}} {read(lim)}' for n, v, lim in rows]
    return "\n".join(lines) + "\n"


def route(
    handler: BaseHTTPRequestHandler, registry: ModelRegistry, hooks: GenerationHooks, method: str, path: str
) -> None:
    """Answer one request of `handles()`; never raises (errors become responses)."""
    triton = path.startswith("/v2/")
    model_name = ""
    try:
        if method == "GET":
            _get_models(handler, registry, path)
            return
        if triton:
            parts = path.strip("/").split("/")
            model_name = parts[2]
            _generate(handler, registry, hooks, parts, _triton_kind(parts) == "generate_stream")
        else:
            body = _read_json(handler)
            model_name = str(body.get("model") or "") if isinstance(body, dict) else ""
            _openai(handler, registry, hooks, path, body)
    except BadRequest as exc:
        hooks.bad_request(model_name, exc.code)
        if triton:
            _send_json(handler, exc.status, {"error": str(exc)})
        else:
            _send_json(handler, exc.status, error_body(str(exc), exc.kind, exc.param, exc.code))
    except Busy as exc:
        hooks.bad_request(model_name, "overloaded")
        headers = {"Retry-After": str(exc.retry_after_s)}
        body = {"error": str(exc)} if triton else error_body(str(exc), "server_error", None, "overloaded")
        _send_json(handler, 503, body, headers)
    except (BrokenPipeError, ConnectionResetError):
        logger.debug("client went away on %s", path)
    except Exception as exc:  # one bad request must never take the server down
        logger.exception("%s %s failed", method, path)
        try:
            _send_json(handler, 500, error_body(f"internal error: {exc}", "server_error", None, "internal_error"))
        except OSError:
            pass


def _get_models(handler: BaseHTTPRequestHandler, registry: ModelRegistry, path: str) -> None:
    listing = models_list(registry)
    if path == "/v1/models":
        _send_json(handler, 200, listing)
        return
    wanted = path.removeprefix("/v1/models/")
    found = next((m for m in listing["data"] if m["id"] == wanted), None)
    if found is None:
        raise BadRequest(f"model {wanted!r} is not loaded", "model", "model_not_found", status=404)
    _send_json(handler, 200, found)


def _text_model(registry: ModelRegistry, name: str) -> tuple[LoadedModel, TextModel]:
    loaded = registry.get(name)
    if loaded is None:
        raise BadRequest(f"model {name!r} is not loaded on this agent", "model", "model_not_found")
    text = loaded.text
    if text is None:
        raise BadRequest(f"model {name!r} is a {loaded.manifest.task} model, not text generation", "model")
    return loaded, text


def _openai(
    handler: BaseHTTPRequestHandler, registry: ModelRegistry, hooks: GenerationHooks, path: str, body: Any
) -> None:
    chat = path == "/v1/chat/completions"
    request: ChatRequest | CompletionRequest = parse(ChatRequest, body) if chat else parse(CompletionRequest, body)
    loaded, model = _text_model(registry, request.model)
    if isinstance(request, ChatRequest):
        messages = [ChatMessage(m.role, m.text()) for m in request.messages]
        problem = check_roles(messages)
        if problem is not None:
            raise BadRequest(problem, "messages", "invalid_value")
        prompt_ids = model.encode(model.chat_prompt(messages), special=False)
        param = "messages"
    else:
        prompt_ids = model.encode(request.prompt, special=True)
        param = "prompt"
    params = model.params(request, request.limit(), len(prompt_ids), param)
    stops = model.stops(request)
    prefix = "chatcmpl" if chat else "cmpl"
    ident = f"{prefix}-{uuid.uuid4().hex[:24]}"
    started = time.monotonic()
    generation = _admit(handler, model, prompt_ids, params, stops)
    if generation is None:
        hooks.observe(loaded.name, loaded.version, time.monotonic() - started, True, None)
        return
    shape = _OpenAIShape(ident, "chat.completion" if chat else "text_completion", model.name, int(time.time()), chat)
    try:
        if request.stream:
            usage = bool(request.stream_options and request.stream_options.include_usage)
            finished = _stream(handler, generation, shape.chunks(usage), done=True)
        else:
            text, finished = _collect(generation)
            if finished is not None and not finished.cancelled:
                _send_json(handler, 200, shape.whole(text, finished))
    except Exception:
        hooks.observe(loaded.name, loaded.version, time.monotonic() - started, False, None)
        raise
    # A client that went away is not the model's failure: counted as a request, not an error.
    hooks.observe(loaded.name, loaded.version, time.monotonic() - started, True, finished)


def _generate(
    handler: BaseHTTPRequestHandler,
    registry: ModelRegistry,
    hooks: GenerationHooks,
    parts: list[str],
    stream: bool,
) -> None:
    body = _read_json(handler)
    if isinstance(body, dict):
        # Triton passes top-level keys other than text_input on as parameters.
        extra = {k: v for k, v in body.items() if k not in ("text_input", "parameters")}
        if extra:
            given = body.get("parameters")
            params_in: dict[str, Any] = given if isinstance(given, dict) else {}
            body = {"text_input": body.get("text_input"), "parameters": {**extra, **params_in}}
    request = parse(GenerateRequest, body)
    loaded, model = _text_model(registry, parts[2])
    if len(parts) > 5 and parts[3] == "versions" and parts[4] != loaded.version:
        raise BadRequest(f"model {loaded.name} serves {loaded.version}, not {parts[4]}", "model", status=404)
    fields: SamplingFields = request.parameters
    prompt_ids = model.encode(request.text_input, special=True)
    params = model.params(fields, request.limit(), len(prompt_ids), "text_input")
    started = time.monotonic()
    generation = _admit(handler, model, prompt_ids, params, model.stops(fields))
    if generation is None:
        hooks.observe(loaded.name, loaded.version, time.monotonic() - started, True, None)
        return
    head = {"model_name": loaded.name, "model_version": loaded.version}

    def events(item: Delta | Finished) -> list[dict[str, Any]]:
        if isinstance(item, Delta):
            return [{**head, "text_output": item.text}]
        return [{**head, "text_output": "", "finish_reason": item.reason}]

    try:
        if stream:
            finished = _stream(handler, generation, events, done=False)
        else:
            text, finished = _collect(generation)
            if finished is not None and not finished.cancelled:
                _send_json(handler, 200, {**head, "text_output": text, "finish_reason": finished.reason})
    except Exception:
        hooks.observe(loaded.name, loaded.version, time.monotonic() - started, False, None)
        raise
    hooks.observe(loaded.name, loaded.version, time.monotonic() - started, True, finished)


def _admit(
    handler: BaseHTTPRequestHandler, model: TextModel, prompt_ids: list[int], params: Any, stops: list[str]
) -> Generation | None:
    return model.start(prompt_ids, params, stops, lambda: _disconnected(handler.connection))


def _disconnected(conn: socket.socket) -> bool:
    """Return True when the peer closed the connection (readable, and a peek reads nothing)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def _collect(generation: Generation) -> tuple[str, Finished | None]:
    parts: list[str] = []
    finished: Finished | None = None
    for item in generation:
        if isinstance(item, Delta):
            parts.append(item.text)
        else:
            finished = item
    return "".join(parts), finished


class _OpenAIShape:
    """OpenAI's response objects for one request."""

    def __init__(self, ident: str, kind: str, model: str, created: int, chat: bool) -> None:
        self.ident, self.kind, self.model, self.created, self.chat = ident, kind, model, created, chat

    def _base(self, chunk: bool) -> dict[str, Any]:
        kind = f"{self.kind}.chunk" if chunk and self.chat else self.kind
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(f: Finished) -> dict[str, int]:
        return {
            "prompt_tokens": f.prompt_tokens,
            "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens,
        }

    def whole(self, text: str, f: Finished) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": f.reason}
        return {**self._base(False), "choices": [choice], "usage": self.usage(f)}

    def _choice(self, text: str | None, reason: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    def chunks(self, include_usage: bool) -> Callable[[Delta | Finished], list[dict[str, Any]]]:
        state = {"first": True}
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def events(item: Delta | Finished) -> list[dict[str, Any]]:
            first, state["first"] = state["first"], False
            if isinstance(item, Delta):
                return [{**self._base(True), "choices": [self._choice(item.text, None, first)], **extra}]
            out = [{**self._base(True), "choices": [self._choice(None, item.reason, first)], **extra}]
            if include_usage:
                out.append({**self._base(True), "choices": [], "usage": self.usage(item)})
            return out

        return events


def _stream(
    handler: BaseHTTPRequestHandler,
    generation: Generation,
    events: Callable[[Delta | Finished], list[dict[str, Any]]],
    done: bool,
) -> Finished | None:
    """Write server-sent events as they come; return the Finished, None when a write failed."""
    finished: Finished | None = None
    iterator = iter(generation)
    try:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.flush()
        for item in iterator:
            if isinstance(item, Finished):
                finished = item
                if item.cancelled:
                    return item  # nobody is listening
            payload = b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in events(item))
            _chunk(handler, payload)
        if done:
            _chunk(handler, b"data: [DONE]\n\n")
        _chunk(handler, b"")
        return finished
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        logger.info("%s: client went away mid-stream", generation.model.name)
        handler.close_connection = True
        return None
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops the loop and frees the sequence slot now, not at garbage collection
        generation.close()


def _chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


def _read_json(handler: BaseHTTPRequestHandler) -> Any:
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError as exc:
        raise BadRequest("bad Content-Length", None, "invalid_request") from exc
    if length > MAX_BODY:
        raise BadRequest(f"body over {MAX_BODY} bytes", None, "request_too_large", status=413)
    raw = handler.rfile.read(length) if length else b""
    try:
        return json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}", None, "invalid_json") from exc


def _send_json(handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)

"""Text generation on the agent's port: OpenAI chat/completions and Triton's generate extension.

POST /v1/chat/completions            OpenAI chat (SSE with `stream: true`, `data: [DONE]` at the end)
POST /v1/completions                 OpenAI completions, one prompt string
GET  /v1/models, /v1/models/{id}     OpenAI's list shape; each entry keeps the agent's own fields
                                     (version, target, providers, task), and the former `models`
                                     array stays beside `data`
POST /v2/models/{name}/generate      Triton generate: `text_input` -> `text_output`
POST /v2/models/{name}/generate_stream   the same as SSE, one `text_output` delta per event

Routes are added to the agent's own HTTP server (`register`, called by agent.server). A
generation request is checked and takes a sequence slot or a queue place of its model on
the server's worker (503 + Retry-After past both), then is answered on a thread of its
own (`agent.http.Deferred`): the model's limit, not the server's worker pool, bounds
generation requests, and long streams never take the workers that inference needs. A
streamed answer is `agent.http.Streaming`: written chunk by chunk (HTTP/1.1 chunked), each
delta as soon as it is safe to send; before each token the connection is polled, so a
client that went away stops its generation within one token and frees its sequence.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.chat_template import ChatMessage, check_roles
from agent.http import Deferred, Request, Response, Router, Streaming
from agent.openai_schema import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
    error_body,
    parse,
)
from agent.textgen import Admitted, Busy, Delta, Finished, Generation, SequenceLimiter, TextModel

if TYPE_CHECKING:
    from agent.runtime import LoadedModel, ModelRegistry

__all__ = ["GenerationHooks", "models_list", "register", "sequence_metrics"]

logger = logging.getLogger(__name__)

Observer = Callable[[bool, "Finished | None"], None]  # (ok, how it ended) -> reported once per request
_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"


@dataclass(frozen=True)
class GenerationHooks:
    """Where the API reports what happened (agent.telemetry)."""

    observe: Callable[[str, str, float, bool, Finished | None], None] = lambda *a: None
    bad_request: Callable[[str, str], None] = lambda model, code: None


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
    """Return Prometheus lines per text-generation model: sequences in flight, queued and allowed; decode batches."""
    lines: list[str] = []
    texts = [(m.name, m.version, m.text) for m in registry.all() if m.text is not None]
    rows = [(n, v, text.limiter) for n, v, text in texts]
    series: list[tuple[str, str, Callable[[SequenceLimiter], int]]] = [
        ("generation_sequences_in_flight", "Sequences being generated.", lambda lim: lim.running),
        ("generation_sequences_queued", "Requests waiting for a sequence slot.", lambda lim: lim.waiting),
        ("generation_sequences_max", "Sequences allowed at once.", lambda lim: lim.slots),
    ]
    for metric, help_text, read in series:
        lines += [f"# HELP autodl_agent_{metric} {help_text}", f"# TYPE autodl_agent_{metric} gauge"]
        lines += [f'autodl_agent_{metric}{{model="{n}",version="{v}"}} {read(lim)}' for n, v, lim in rows]
    # Batched decoding (shared.generation.batch): rows / steps is the mean batch of a decode step.
    batched = [(n, v, text.loop) for n, v, text in texts if hasattr(text.loop, "steps")]
    for metric, help_text, attr in (
        ("generation_decode_steps_total", "Decode steps run (each one batch of sequences).", "steps"),
        ("generation_decode_rows_total", "Sequence tokens those steps made.", "rows"),
    ):
        lines += [f"# HELP autodl_agent_{metric} {help_text}", f"# TYPE autodl_agent_{metric} counter"]
        lines += [f'autodl_agent_{metric}{{model="{n}",version="{v}"}} {getattr(loop, attr)}' for n, v, loop in batched]
    return "\n".join(lines) + "\n"


def register(router: Router, registry: ModelRegistry, hooks: GenerationHooks) -> None:
    """Add the text-generation routes and the OpenAI-shaped model list to the agent's router."""
    api = _Api(registry, hooks)
    router.add("GET", "/v1/models", lambda r: _json(200, models_list(registry)))
    router.add("GET", "/v1/models/{name}", api.model)
    router.add("POST", "/v1/chat/completions", lambda r: api.openai(r, chat=True))
    router.add("POST", "/v1/completions", lambda r: api.openai(r, chat=False))
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add("POST", prefix + "/generate", lambda r: api.triton(r, stream=False))
        router.add("POST", prefix + "/generate_stream", lambda r: api.triton(r, stream=True))


def _json(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(body, ensure_ascii=False).encode(), _JSON, headers)


class _Api:
    """The handlers; each turns its own errors into answers (OpenAI's shape, or Triton's)."""

    def __init__(self, registry: ModelRegistry, hooks: GenerationHooks) -> None:
        self.registry = registry
        self.hooks = hooks

    def model(self, request: Request) -> Response:
        found = next((m for m in models_list(self.registry)["data"] if m["id"] == request.params["name"]), None)
        if found is None:
            message = f"model {request.params['name']!r} is not loaded"
            return _json(404, error_body(message, "invalid_request_error", "model", "model_not_found"))
        return _json(200, found)

    def openai(self, request: Request, chat: bool) -> Response | Deferred:
        name = ""
        try:
            body = _loads(request.body)
            name = str(body.get("model") or "") if isinstance(body, dict) else ""
            return self._openai(request, chat, body)
        except BadRequest as exc:
            self.hooks.bad_request(name, exc.code)
            return _json(exc.status, error_body(str(exc), exc.kind, exc.param, exc.code))
        except Busy as exc:
            self.hooks.bad_request(name, "overloaded")
            body = error_body(str(exc), "server_error", None, "overloaded")
            return _json(503, body, (("Retry-After", str(exc.retry_after_s)),))

    def triton(self, request: Request, stream: bool) -> Response | Deferred:
        name = request.params["name"]
        try:
            return self._triton(request, stream)
        except BadRequest as exc:
            self.hooks.bad_request(name, exc.code)
            return _json(exc.status, {"error": str(exc)})
        except Busy as exc:
            self.hooks.bad_request(name, "overloaded")
            return _json(503, {"error": str(exc)}, (("Retry-After", str(exc.retry_after_s)),))

    def _text_model(self, name: str) -> tuple[LoadedModel, TextModel]:
        loaded = self.registry.get(name)
        if loaded is None:
            raise BadRequest(f"model {name!r} is not loaded on this agent", "model", "model_not_found")
        if loaded.text is None:
            raise BadRequest(f"model {name!r} is a {loaded.manifest.task} model, not text generation", "model")
        return loaded, loaded.text

    def _openai(self, request: Request, chat: bool, body: Any) -> Deferred:
        parsed: ChatRequest | CompletionRequest = parse(ChatRequest, body) if chat else parse(CompletionRequest, body)
        loaded, model = self._text_model(parsed.model)
        if isinstance(parsed, ChatRequest):
            messages = [ChatMessage(m.role, m.text()) for m in parsed.messages]
            problem = check_roles(messages)
            if problem is not None:
                raise BadRequest(problem, "messages", "invalid_value")
            prompt_ids = model.encode(model.chat_prompt(messages), special=False)
            param = "messages"
        else:
            prompt_ids = model.encode(parsed.prompt, special=True)
            param = "prompt"
        params = model.params(parsed, parsed.limit(), len(prompt_ids), param)
        admitted = model.admit(prompt_ids, params, model.stops(parsed), request.disconnected)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = _OpenAIShape(
            ident, "chat.completion" if chat else "text_completion", model.name, int(time.time()), chat
        )
        usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        stream = parsed.stream

        def answer(generation: Generation, observe: Observer) -> Response | Streaming:
            if stream:
                return Streaming(_sse(generation, shape.chunks(usage), observe, done=True), content_type=_SSE)
            text, finished = _collect(generation, observe)
            return _json(200, shape.whole(text, finished))

        return self._deferred(loaded, admitted, answer)

    def _triton(self, request: Request, stream: bool) -> Deferred:
        body = _loads(request.body)
        if isinstance(body, dict):
            # Triton passes top-level keys other than text_input on as parameters.
            extra = {k: v for k, v in body.items() if k not in ("text_input", "parameters")}
            if extra:
                given = body.get("parameters")
                params_in: dict[str, Any] = given if isinstance(given, dict) else {}
                body = {"text_input": body.get("text_input"), "parameters": {**extra, **params_in}}
        parsed = parse(GenerateRequest, body)
        loaded, model = self._text_model(request.params["name"])
        version = request.params.get("version")
        if version is not None and version != loaded.version:
            raise BadRequest(f"model {loaded.name} serves {loaded.version}, not {version}", "model", status=404)
        fields: SamplingFields = parsed.parameters
        prompt_ids = model.encode(parsed.text_input, special=True)
        params = model.params(fields, parsed.limit(), len(prompt_ids), "text_input")
        admitted = model.admit(prompt_ids, params, model.stops(fields), request.disconnected)
        head = {"model_name": loaded.name, "model_version": loaded.version}

        def events(item: Delta | Finished) -> list[dict[str, Any]]:
            if isinstance(item, Delta):
                return [{**head, "text_output": item.text}]
            return [{**head, "text_output": "", "finish_reason": item.reason}]

        def answer(generation: Generation, observe: Observer) -> Response | Streaming:
            if stream:
                return Streaming(_sse(generation, events, observe, done=False), content_type=_SSE)
            text, finished = _collect(generation, observe)
            return _json(200, {**head, "text_output": text, "finish_reason": finished.reason})

        return self._deferred(loaded, admitted, answer)

    def _deferred(
        self, loaded: LoadedModel, admitted: Admitted, answer: Callable[[Generation, Observer], Response | Streaming]
    ) -> Deferred:
        """Answer on a thread of the server's own: the wait in the queue and the generation hold no HTTP worker.

        What bounds these threads is the model's limit: the request holds a sequence slot or
        a queue place (`admitted`) before this returns, and past both it got 503 already.
        """

        def run() -> Response | Streaming:
            generation = admitted.begin()
            if generation is None:
                return self._gone(loaded, admitted.started)
            return answer(generation, self._observer(loaded, admitted.started))

        return Deferred(run, admitted.abandon)

    def _observer(self, loaded: LoadedModel, started: float) -> Observer:
        def observe(ok: bool, finished: Finished | None) -> None:
            self.hooks.observe(loaded.name, loaded.version, time.monotonic() - started, ok, finished)

        return observe

    def _gone(self, loaded: LoadedModel, started: float) -> Response:
        """The client left (or the time limit passed) while queued: nobody reads this answer."""
        self.hooks.observe(loaded.name, loaded.version, time.monotonic() - started, True, None)
        return _json(503, error_body("the request ended while queued", "server_error", None, "cancelled"))


def _collect(generation: Generation, observe: Callable[[bool, Finished | None], None]) -> tuple[str, Finished]:
    """Run a whole generation; report it; a failure of the loop is the model's error (500)."""
    parts: list[str] = []
    finished: Finished | None = None
    try:
        for item in generation:
            if isinstance(item, Delta):
                parts.append(item.text)
            else:
                finished = item
    except Exception:
        observe(False, None)
        raise
    finally:
        generation.close()
    assert finished is not None  # a generation always ends with one
    # A client that went away is not the model's failure: counted as a request, not an error.
    observe(True, finished)
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


def _sse(
    generation: Generation,
    events: Callable[[Delta | Finished], list[dict[str, Any]]],
    observe: Callable[[bool, Finished | None], None],
    done: bool,
) -> Iterator[bytes]:
    """Yield server-sent events as the text comes; the server closes this when the client is gone."""
    finished: Finished | None = None
    ok = True
    try:
        for item in generation:
            if isinstance(item, Finished):
                finished = item
                if item.cancelled:
                    return  # nobody is listening
            yield b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in events(item))
        if done:
            yield b"data: [DONE]\n\n"
    except GeneratorExit:
        logger.info("%s: client went away mid-stream", generation.model.name)
        raise
    except Exception as exc:  # the status is sent already: the error goes in the stream, as Triton does
        ok = False
        logger.exception("%s: generation failed mid-stream", generation.model.name)
        yield b"data: " + json.dumps(error_body(f"generation failed: {exc}", "server_error", None, "internal")).encode()
        yield b"\n\n"
    finally:
        generation.close()  # frees the sequence slot now, not at garbage collection
        observe(ok, finished)


def _loads(raw: bytes | bytearray) -> Any:
    try:
        return json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}", None, "invalid_json") from exc

"""Local inference API: the routes, on the agent's own HTTP/1.1 server (agent.http).

GET  /v2                             server metadata and the protocol extensions served
GET  /v2/health/live                 the process answers
GET  /v2/health/ready                startup finished (active models restored)
GET  /v2/models/{name}               OIP v2 model metadata
GET  /v2/models/{name}/ready         the model is loaded
POST /v2/models/{name}/infer         OIP v2 tensors, JSON or with the binary tensor data extension
POST /v1/models/{name}:predict       JSON numbers, text or base64 image; pre/post-processing applied
GET  /v1/models                      active models: OpenAI's list (`data`), the former `models` kept
POST /v1/chat/completions, /v1/completions, /v2/models/{name}/generate[_stream]   text (agent.openai_api)
GET  /v1/status                      identity, connection, models, update state
GET  /metrics                        Prometheus text format (serving, device, outbox)
GET  /healthz, /readyz               K3s liveness (the agent's loops tick) and readiness probes

(`/v2/models/{name}/versions/{version}/...` address the active version.) Other modules add
routes with ``server.router.add(method, pattern, handler)``; a handler takes an
`agent.http.Request` and returns a `Response` or a `Streaming`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import Any

import numpy as np

from agent import __version__, local_access, openai_api
from agent.batching import Batchers, BatchStats
from agent.http import HttpError, HttpServer, Limits, Request, Response
from agent.openai_api import GenerationHooks
from agent.postprocess import postprocess
from agent.preprocess import preprocess
from agent.runtime import LoadedModel, ModelRegistry
from agent.tensors import DTYPE_TO_V2, InvalidInputError, UnsupportedInputError, decode_request, encode_response, loads
from shared import tracecontext, tracing
from shared.manifest import Batching, Manifest

__all__ = ["EXTENSIONS", "InferenceServer", "ServerContext", "model_metadata"]

logger = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data"]
_JSON = "application/json"
INLINE_MAX_BODY = 16 * 1024  # a larger body takes longer to decode than the selector may be held


@dataclass(frozen=True)
class ServerContext:
    """What the API needs from the daemon."""

    registry: ModelRegistry
    ready: Callable[[], bool]
    status: Callable[[], dict[str, Any]]
    track: Callable[[LoadedModel], AbstractContextManager[Any]] = lambda model: nullcontext()
    metrics: Callable[[], str] = lambda: ""
    live: Callable[[], bool] = lambda: True
    refused: Callable[[str], None] = lambda reason: None  # a request refused, by reason (/metrics)
    batching: Callable[[LoadedModel], Batching | None] = lambda model: model.variant.batching
    batch_stats: BatchStats = lambda model, version, rows, waited, compute: None
    batch_instances: int = 1  # runs of one model at once (cores / intra-op threads)
    limits: Limits = field(default_factory=Limits)
    generation: GenerationHooks = field(default_factory=GenerationHooks)
    api_token: str | None = None  # agent.local_access: bearer token, Host checks
    bind_host: str = "127.0.0.1"
    # Hard-example capture (agent.capture): (manifest, raw request body, first output), called once
    # the answer is written; it copies the body only for models whose capture policy is on.
    capture: Callable[[Manifest, bytes | bytearray, np.ndarray], None] = lambda manifest, body, output: None


def _json(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body).encode(), _JSON)


def _error_body(error: HttpError) -> bytes:
    return json.dumps({"error": str(error)}).encode()


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    """Return the OIP v2 metadata of a model (also the gRPC ModelMetadata answer)."""

    def spec(s: Any) -> dict[str, Any]:
        return {
            "name": s.name,
            "datatype": DTYPE_TO_V2.get(s.dtype, s.dtype),
            "shape": [d if isinstance(d, int) else -1 for d in s.shape],
        }

    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [spec(s) for s in model.manifest.inputs],
        "outputs": [spec(s) for s in model.manifest.outputs],
        "parameters": {"target": model.target, "providers": list(model.providers), "task": model.manifest.task},
    }


class InferenceServer:
    """The local API, served by a selector thread and a bounded worker pool."""

    def __init__(self, host: str, port: int, context: ServerContext) -> None:
        self.context = context
        self.extensions = list(EXTENSIONS)
        self.batchers = Batchers(context.batching, context.batch_stats, context.batch_instances)
        self.router = local_access.GuardedRouter(context.api_token, context.bind_host)
        self._routes()
        self._http = HttpServer(host, port, self.router, context.limits, context.refused, _error_body, self._inline)

    @property
    def port(self) -> int:
        """Return the bound port (useful with port 0)."""
        return self._http.port

    @property
    def connections(self) -> int:
        """Return the open connections."""
        return self._http.connections

    def start(self) -> None:
        """Start serving."""
        self._http.start()
        logger.info("inference API on port %d", self.port)

    def stop(self) -> None:
        """Stop serving."""
        self._http.stop()

    # routes ---------------------------------------------------------------------------------------
    def _routes(self) -> None:
        ctx, add = self.context, self.router.add
        add(
            "GET",
            "/v2",
            lambda r: _json(200, {"name": "autodl-agent", "version": __version__, "extensions": self.extensions}),
        )
        for path in ("/v2/health/live", "/healthz"):
            add("GET", path, lambda r: self._probe("live", ctx.live()))
        for path in ("/v2/health/ready", "/readyz"):
            add("GET", path, lambda r: self._probe("ready", ctx.ready()))
        add("GET", "/metrics", lambda r: Response(200, ctx.metrics().encode(), "text/plain; version=0.0.4"))
        add("GET", "/v1/status", lambda r: _json(200, ctx.status()))
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            add("GET", prefix, lambda r: _json(200, model_metadata(self.model(r))))
            add("GET", prefix + "/ready", lambda r: _json(200, {"name": self.model(r).name, "ready": True}))
            add("POST", prefix + "/infer", self._infer)
        add("POST", "/v1/models/{name}:predict", self._predict)
        openai_api.register(self.router, ctx.registry, ctx.generation)  # text generation, and GET /v1/models

    def _inline(self, request: Request) -> bool:
        """Return whether the HTTP selector answers `request` itself: a small OIP request to a quick model."""
        if request.method != "POST" or len(request.body) > INLINE_MAX_BODY or not request.path.endswith("/infer"):
            return False
        parts = request.path.split("/", 4)  # ["", "v2", "models", name, "infer" or "versions/{version}/infer"]
        if len(parts) != 5 or parts[1] != "v2" or parts[2] != "models":
            return False
        model = self.context.registry.get(parts[3])
        batcher = None if model is None else self.batchers.peek(model)
        return batcher is not None and batcher.quick

    @staticmethod
    def _probe(what: str, ok: bool) -> Response:
        return _json(200 if ok else 503, {what: ok})

    def model(self, request: Request) -> LoadedModel:
        """Return the active model a request names; raise HttpError 404."""
        name = request.params["name"]
        # Take the reference once: a swap during this request does not affect it.
        model = self.context.registry.get(name)
        if model is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"model {name!r} is not loaded", "no_model")
        version = request.params.get("version")
        if version is not None and version != model.version:
            raise HttpError(
                HTTPStatus.NOT_FOUND, f"model {model.name} serves {model.version}, not {version}", "no_model"
            )
        return model

    @staticmethod
    def _span(name: str, model: LoadedModel, request: Request) -> AbstractContextManager[Any]:
        # A client's malformed traceparent parses to None: the request starts its own trace.
        parent = tracecontext.parse(request.headers.get(tracecontext.HEADER))
        return tracing.span(name, {"model": model.name, "version": model.version}, parent=parent)

    def _infer(self, request: Request) -> Response:
        model = self.model(request)
        length = request.headers.get("inference-header-content-length")
        with self._span("agent.infer", model, request), _client_errors():
            if length is not None and not (length.isdigit() and len(length) < 19):
                raise InvalidInputError(
                    f"Inference-Header-Content-Length {length[:40]!r} is not a non-negative integer"
                )
            with tracing.span("agent.infer.preprocess"):
                decoded = decode_request(request.body, None if length is None else int(length), model.input_specs)
            unknown = [w for w in decoded.outputs or [] if w not in model.output_names]
            if unknown:
                raise InvalidInputError(f"unknown outputs {unknown}; the model has {model.output_names}")
            with self.context.track(model), tracing.span("agent.infer.run"):
                outputs = self.batchers.get(model).run(decoded.inputs, decoded.outputs)
            binary = set(decoded.binary) | (
                set(outputs) if decoded.binary_default and decoded.outputs is None else set()
            )
            # An answer carries the request's id when it had one (as Triton answers).
            head = (
                model.answer_head
                if decoded.id is None
                else model.answer_head + b',"id":' + json.dumps(decoded.id).encode()
            )
            with tracing.span("agent.infer.postprocess"):
                body, header_length = encode_response(head, outputs, binary)
        capture = partial(self.context.capture, model.manifest, request.body, next(iter(outputs.values())))
        if header_length is None:
            return Response(200, body, _JSON, after=capture)
        sizes = (("Inference-Header-Content-Length", str(header_length)),)
        return Response(200, body, "application/octet-stream", sizes, after=capture)

    def _predict(self, request: Request) -> Response:
        model = self.model(request)
        with self._span("agent.predict", model, request), _client_errors():
            with tracing.span("agent.infer.preprocess"):
                body = loads(request.body or b"null")
                inputs = preprocess(model.manifest, body, model.tokenizer_path)
            with self.context.track(model), tracing.span("agent.infer.run"):
                outputs = self.batchers.get(model).run(inputs)
            with tracing.span("agent.infer.postprocess"):
                predictions = postprocess(model.manifest, outputs, inputs.get("attention_mask"))
        answer = {"model_name": model.name, "model_version": model.version, "predictions": predictions}
        after = partial(self.context.capture, model.manifest, request.body, next(iter(outputs.values())))
        return Response(200, json.dumps(answer).encode(), _JSON, after=after)


class _client_errors:  # noqa: N801 - used as a context manager, named for what it catches
    """Turn the request's own faults into 400/501 and anything else into a logged 500."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, HttpError):
            return
        if isinstance(exc, InvalidInputError):
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_input") from exc
        if isinstance(exc, UnsupportedInputError):
            raise HttpError(HTTPStatus.NOT_IMPLEMENTED, str(exc), "unsupported_input") from exc
        if isinstance(exc, Exception):
            logger.error("request failed", exc_info=exc)
            raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}", "internal") from exc

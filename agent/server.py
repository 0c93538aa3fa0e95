"""Local inference API on a stdlib threading HTTP server (small footprint, no web framework).

GET  /v2/health/live                 the process answers
GET  /v2/health/ready                startup finished (active models restored)
GET  /v2/models/{name}               OIP v2 model metadata
GET  /v2/models/{name}/ready         the model is loaded
POST /v2/models/{name}/infer         OIP v2 typed tensors
POST /v1/models/{name}:predict       JSON numbers, text or base64 image; pre/post-processing applied
GET  /v1/models                      active models
GET  /v1/status                      identity, connection, models, update state
GET  /metrics                        Prometheus text format (serving, device, outbox)
GET  /healthz, /readyz               K3s liveness (the agent's loops tick) and readiness probes
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from agent import __version__
from agent.postprocess import postprocess
from agent.preprocess import preprocess
from agent.runtime import LoadedModel, ModelRegistry
from agent.tensors import DTYPE_TO_V2, InvalidInputError, UnsupportedInputError, from_v2, to_v2
from shared.manifest import Manifest

__all__ = ["InferenceServer", "ServerContext"]

logger = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServerContext:
    """What the API needs from the daemon."""

    registry: ModelRegistry
    ready: Callable[[], bool]
    status: Callable[[], dict[str, Any]]
    track: Callable[[LoadedModel], AbstractContextManager[Any]] = lambda model: nullcontext()
    metrics: Callable[[], str] = lambda: ""
    live: Callable[[], bool] = lambda: True
    # Hard-example capture: (manifest, raw request body, first output) handed off the request path.
    capture: Callable[[Manifest, bytes, np.ndarray], None] = lambda manifest, body, output: None


class _Text(str):
    """A plain-text body (the Prometheus exposition format)."""


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    _raw: bytes = b""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        ctx = self.server.context
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            status, body = self._route(ctx, method, path)
        except _HttpError as exc:
            status, body = exc.status, {"error": str(exc)}
        except InvalidInputError as exc:
            status, body = HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        except UnsupportedInputError as exc:
            status, body = HTTPStatus.NOT_IMPLEMENTED, {"error": str(exc)}
        except Exception as exc:  # one bad request must never take the server down
            logger.exception("%s %s failed", method, path)
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}"}
        self._send(status, body)

    def _route(self, ctx: ServerContext, method: str, path: str) -> tuple[HTTPStatus, Any]:
        parts = path.strip("/").split("/")
        if method == "GET" and path in ("/v2/health/live", "/healthz"):
            live = ctx.live()
            return (HTTPStatus.OK if live else HTTPStatus.SERVICE_UNAVAILABLE), {"live": live}
        if method == "GET" and path == "/metrics":
            return HTTPStatus.OK, _Text(ctx.metrics())
        if method == "GET" and path in ("/v2/health/ready", "/readyz"):
            ready = ctx.ready()
            return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE), {"ready": ready}
        if method == "GET" and path == "/v2":
            return HTTPStatus.OK, {"name": "autodl-agent", "version": __version__, "extensions": []}
        if method == "GET" and path == "/v1/models":
            return HTTPStatus.OK, {"models": ctx.registry.describe()}
        if method == "GET" and path == "/v1/status":
            return HTTPStatus.OK, ctx.status()
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            model = self._model(ctx, parts[2])
            rest = parts[3:]
            # /v2/models/{name}/versions/{v}/... addresses the active version only.
            if len(rest) >= 2 and rest[0] == "versions":
                if rest[1] != model.version:
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"model {model.name} serves {model.version}, not {rest[1]}")
                rest = rest[2:]
            if method == "GET" and not rest:
                return HTTPStatus.OK, _metadata(model)
            if method == "GET" and rest == ["ready"]:
                return HTTPStatus.OK, {"name": model.name, "ready": True}
            if method == "POST" and rest == ["infer"]:
                body = self._json()
                with ctx.track(model):
                    answer, first = _infer(model, body)
                ctx.capture(model.manifest, self._raw, first)
                return HTTPStatus.OK, answer
        if len(parts) == 3 and parts[:2] == ["v1", "models"] and parts[2].endswith(":predict") and method == "POST":
            model = self._model(ctx, parts[2].removesuffix(":predict"))
            body = self._json()
            with ctx.track(model):
                answer, first = _predict(model, body)
            ctx.capture(model.manifest, self._raw, first)
            return HTTPStatus.OK, answer
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no route for {method} {path}")

    def _model(self, ctx: ServerContext, name: str) -> LoadedModel:
        # Take the reference once: a swap during this request does not affect it.
        model = ctx.registry.get(name)
        if model is None:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"model {name!r} is not loaded")
        return model

    def _json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from exc
        if length > MAX_BODY:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        self._raw = raw
        try:
            return json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from exc

    def _send(self, status: HTTPStatus, body: Any) -> None:
        text = isinstance(body, _Text)
        data = body.encode() if text else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _metadata(model: LoadedModel) -> dict[str, Any]:
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


def _infer(model: LoadedModel, body: Any) -> tuple[dict[str, Any], np.ndarray]:
    inputs = from_v2(body, model.manifest.inputs)
    wanted = None
    if isinstance(body, dict) and isinstance(body.get("outputs"), list):
        wanted = [str(o.get("name")) for o in body["outputs"] if isinstance(o, dict)]
        known = {o.name for o in model.session.get_outputs()}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise InvalidInputError(f"unknown outputs {unknown}; the model has {sorted(known)}")
    outputs = model.run(inputs, wanted or None)
    request_id = body.get("id") if isinstance(body, dict) else None
    answer = {
        "model_name": model.name,
        "model_version": model.version,
        "id": str(request_id or uuid.uuid4()),
        "outputs": to_v2(outputs),
    }
    return answer, next(iter(outputs.values()))


def _predict(model: LoadedModel, body: Any) -> tuple[dict[str, Any], np.ndarray]:
    inputs = preprocess(model.manifest, body, model.tokenizer_path)
    outputs = model.run(inputs)
    predictions = postprocess(model.manifest, outputs, inputs.get("attention_mask"))
    answer = {"model_name": model.name, "model_version": model.version, "predictions": predictions}
    return answer, next(iter(outputs.values()))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], context: ServerContext) -> None:
        self.context = context
        super().__init__(address, _Handler)


class InferenceServer:
    """The local API, served from a background thread."""

    def __init__(self, host: str, port: int, context: ServerContext) -> None:
        self._server = _Server((host, port), context)
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        """Return the bound port (useful with port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()
        logger.info("inference API on http://%s:%d", self._server.server_address[0], self.port)

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

"""The KServe v2 gRPC API (`inference.GRPCInferenceService`) on its own port: the `grpc` extra.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, with
tensors as `raw_input_contents` / `raw_output_contents` or typed contents. It serves the
same models as the HTTP API, through the same batchers, watchdog and telemetry. The
messages come from `agent/oip/inference.proto` (generated code in `agent/oip`, `make
grpc-stubs`); the service is registered by hand, so no generated service code is needed.
At most `http_workers` calls run at once and `http_workers + http_queue` are accepted;
past that a call gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from agent import __version__
from agent.oip import message
from agent.runtime import LoadedModel
from agent.server import InferenceServer, model_metadata
from agent.tensors import InvalidInputError, tensor_bytes, tensor_from

__all__ = ["GrpcServer"]

logger = logging.getLogger(__name__)


class pb:  # noqa: N801 - read like protoc's generated module
    """The messages used here."""

    ServerLiveRequest = message("ServerLiveRequest")
    ServerLiveResponse = message("ServerLiveResponse")
    ServerReadyRequest = message("ServerReadyRequest")
    ServerReadyResponse = message("ServerReadyResponse")
    ModelReadyRequest = message("ModelReadyRequest")
    ModelReadyResponse = message("ModelReadyResponse")
    ServerMetadataRequest = message("ServerMetadataRequest")
    ServerMetadataResponse = message("ServerMetadataResponse")
    ModelMetadataRequest = message("ModelMetadataRequest")
    ModelMetadataResponse = message("ModelMetadataResponse")
    ModelInferRequest = message("ModelInferRequest")
    ModelInferResponse = message("ModelInferResponse")


SERVICE = "inference.GRPCInferenceService"

# Typed contents field of each datatype (when raw contents are not used)
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class GrpcServer:
    """gRPC next to an `InferenceServer`, sharing its models, limits and accounting."""

    def __init__(self, host: str, port: int, api: InferenceServer) -> None:
        self.api = api
        limits = api.context.limits
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=limits.workers + limits.queue,
            options=[
                ("grpc.max_receive_message_length", limits.max_body),
                ("grpc.max_send_message_length", limits.max_body),
            ],
        )
        handlers = {
            "ServerLive": _unary(self.server_live, pb.ServerLiveRequest),
            "ServerReady": _unary(self.server_ready, pb.ServerReadyRequest),
            "ModelReady": _unary(self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": _unary(self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": _unary(self.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": _unary(self.model_infer, pb.ModelInferRequest),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot bind {host}:{port}")

    def start(self) -> None:
        """Start serving."""
        self._server.start()
        logger.info("KServe v2 gRPC API on port %d", self.port)

    def stop(self) -> None:
        """Stop serving; calls in flight get a second to finish."""
        self._server.stop(1.0).wait(5)

    # methods -------------------------------------------------------------------------------------
    def server_live(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self.api.context.live())

    def server_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.api.context.ready())

    def server_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="autodl-agent", version=__version__, extensions=self.api.extensions)

    def model_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self.api.context.registry.get(request.name)
        return pb.ModelReadyResponse(ready=model is not None and request.version in ("", model.version))

    def model_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        meta = model_metadata(self._model(request.name, request.version, context))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    def model_infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._model(request.model_name, request.model_version, context)
        try:
            inputs = self._inputs(model, request)
            wanted = [o.name for o in request.outputs] or None
            unknown = [w for w in wanted or [] if w not in model.output_names]
            if unknown:
                raise InvalidInputError(f"unknown outputs {unknown}; the model has {model.output_names}")
            with self.api.context.track(model):
                outputs = self.api.batchers.get(model).run(inputs, wanted)
        except InvalidInputError as exc:
            self.api.context.refused("invalid_input")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id or str(uuid.uuid4())
        )
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype=_datatype(array), shape=list(array.shape))
            response.raw_output_contents.append(tensor_bytes(array))
        return response

    def _model(self, name: str, version: str, context: grpc.ServicerContext) -> LoadedModel:
        model = self.api.context.registry.get(name)
        if model is None or version not in ("", model.version):
            self.api.context.refused("no_model")
            what = f"model {name!r} is not loaded" if model is None else f"model {name} serves {model.version}"
            context.abort(grpc.StatusCode.NOT_FOUND, what)
        assert model is not None
        return model

    @staticmethod
    def _inputs(model: LoadedModel, request: Any) -> dict[str, np.ndarray]:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        arrays: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(request.inputs):
            shape = list(tensor.shape)
            if raw:
                array = tensor_from(model.input_specs, tensor.name, tensor.datatype, shape, raw=raw[i])
            else:
                field = _CONTENTS.get(tensor.datatype)
                if field is None:
                    raise InvalidInputError(f"input {tensor.name!r}: {tensor.datatype} needs raw_input_contents")
                values = list(getattr(tensor.contents, field))
                if tensor.datatype == "BYTES":
                    values = [v.decode("utf-8", "replace") for v in values]
                array = tensor_from(model.input_specs, tensor.name, tensor.datatype, shape, data=values)
            arrays[tensor.name] = array
        missing = [name for name in model.input_specs if name not in arrays]
        if missing:
            raise InvalidInputError(f"missing inputs: {', '.join(missing)}")
        return arrays


def _datatype(array: np.ndarray) -> str:
    from agent.tensors import DTYPE_TO_V2

    return "BYTES" if array.dtype == object else DTYPE_TO_V2.get(str(array.dtype), "FP32")


def _unary(method: Callable[[Any, grpc.ServicerContext], Any], request_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        method, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString()
    )

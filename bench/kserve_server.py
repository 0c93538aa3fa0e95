"""The stock Python KServe model server wrapping ONNX files: what a Python user would otherwise run.

Run by bench/serving.py with the interpreter of its own venv (``pip install kserve``),
never with the project's: it imports nothing of autodl.

    python bench/kserve_server.py --port 8080 --grpc-port 8081 --threads 1 digits=/x/model.onnx ...
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import kserve
import numpy as np
import onnxruntime as ort

_V2 = {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64", np.dtype("int32"): "INT32", np.dtype("float64"): "FP64"}


class OnnxModel(kserve.Model):  # type: ignore[misc]
    """One ONNX file behind KServe's v2 REST API, with the agent's session options."""

    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.ready = True

    def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
        feed = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        values = self.session.run(self.outputs, feed)
        outputs = []
        for name, value in zip(self.outputs, values, strict=True):
            out = kserve.InferOutput(name=name, shape=list(value.shape), datatype=_V2[value.dtype])
            out.set_data_from_numpy(value, binary_data=False)
            outputs.append(out)
        return kserve.InferResponse(
            response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs
        )


def main() -> None:
    """Serve the models until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("models", nargs="+", help="name=path.onnx")
    args = parser.parse_args()
    models = [OnnxModel(*spec.split("=", 1), args.threads) for spec in args.models]
    kserve.ModelServer(
        http_port=args.port, grpc_port=args.grpc_port, enable_grpc=False, enable_latency_logging=False
    ).start(models)


if __name__ == "__main__":
    main()

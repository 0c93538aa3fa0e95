"""Run torch and ONNX Runtime models over a batched input set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

__all__ = ["make_session", "run_onnx", "run_torch", "session_feed"]

Arrays = dict[str, np.ndarray]


def make_session(
    path: Path,
    *,
    threads: int = 1,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """Open an ONNX Runtime session with a fixed thread count (measurements stay comparable)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers))


def session_feed(session: ort.InferenceSession, inputs: Arrays, rows: slice) -> Arrays:
    """Return the slice of `inputs` the session takes, cast to the dtypes it declares."""
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(float16)": np.float16}  # fmt: skip
    feed = {}
    for spec in session.get_inputs():
        arr = inputs[spec.name][rows]
        feed[spec.name] = arr.astype(dtypes.get(spec.type, arr.dtype), copy=False)
    return feed


def run_onnx(session: ort.InferenceSession, inputs: Arrays, batch_size: int = 32) -> list[np.ndarray]:
    """Run every row of `inputs` through the session; outputs concatenated on the batch axis."""
    n = next(iter(inputs.values())).shape[0]
    parts: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        parts.append(session.run(None, session_feed(session, inputs, slice(start, start + batch_size))))
    return [np.concatenate([p[i] for p in parts]).astype(np.float32) for i in range(len(parts[0]))]


def run_torch(module: Callable[..., object], inputs: Arrays, batch_size: int = 32) -> list[np.ndarray]:
    """Run every row of `inputs` through a torch module (positional, in dict order)."""
    n = next(iter(inputs.values())).shape[0]
    parts: list[list[np.ndarray]] = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            args = [torch.from_numpy(np.ascontiguousarray(a[start : start + batch_size])) for a in inputs.values()]
            out: Any = module(*args)
            if isinstance(out, torch.Tensor):
                out = (out,)
            elif isinstance(out, dict):
                out = tuple(out.values())
            elif hasattr(out, "to_tuple"):
                out = out.to_tuple()
            parts.append([t.detach().float().numpy() for t in out])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

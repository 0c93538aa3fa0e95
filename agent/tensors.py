"""Open Inference Protocol v2 tensors: JSON to numpy and back, checked against the manifest."""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.errors import AgentError
from shared.manifest import TensorSpec

__all__ = ["InvalidInputError", "UnsupportedInputError", "check_input", "from_v2", "spec_text", "to_v2"]

# OIP v2 datatype names <-> manifest dtypes
V2_TO_DTYPE = {
    "FP32": "float32",
    "FP16": "float16",
    "FP64": "float64",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}
DTYPE_TO_V2 = {v: k for k, v in V2_TO_DTYPE.items()}


class InvalidInputError(AgentError, ValueError):
    """A request that does not fit the model's interface (HTTP 400)."""


class UnsupportedInputError(AgentError):
    """A valid request this install cannot decode: an optional package is missing (HTTP 501)."""


def spec_text(spec: TensorSpec) -> str:
    """Return a tensor spec as people read it: ``input float32[batch, 4]``."""
    dims = ", ".join(str(d) for d in spec.shape)
    return f"{spec.name} {spec.dtype}[{dims}]"


def check_input(spec: TensorSpec, array: np.ndarray) -> None:
    """Raise InvalidInputError unless `array` has the spec's dtype and shape."""
    if array.dtype != np.dtype(spec.dtype):
        raise InvalidInputError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec_text(spec)}")
    if array.ndim != len(spec.shape) or any(
        isinstance(want, int) and want >= 0 and want != got for want, got in zip(spec.shape, array.shape, strict=False)
    ):
        raise InvalidInputError(f"input {spec.name!r} has shape {list(array.shape)}, expected {spec_text(spec)}")


def from_v2(body: Any, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Decode an OIP v2 infer request's inputs and check them against the model's specs."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InvalidInputError("request body must be a JSON object with an 'inputs' list")
    by_name = {s.name: s for s in specs}
    arrays: dict[str, np.ndarray] = {}
    for item in body["inputs"]:
        if not isinstance(item, dict):
            raise InvalidInputError("each input must be an object with name, shape, datatype, data")
        name, shape, datatype, data = (item.get(k) for k in ("name", "shape", "datatype", "data"))
        spec = by_name.get(str(name))
        if spec is None:
            raise InvalidInputError(f"unknown input {name!r}; the model takes {', '.join(map(spec_text, specs))}")
        dtype = V2_TO_DTYPE.get(str(datatype))
        if dtype is None:
            raise InvalidInputError(f"input {name!r}: unsupported datatype {datatype!r}, expected {spec_text(spec)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidInputError(f"input {name!r}: shape must be a list of non-negative ints")
        try:
            array = np.asarray(data, dtype=np.dtype(dtype))
            array = array.reshape(shape)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"input {name!r}: data does not fit shape {shape} as {datatype}: {exc}") from exc
        check_input(spec, array)
        arrays[spec.name] = array
    missing = [spec_text(s) for s in specs if s.name not in arrays]
    if missing:
        raise InvalidInputError(f"missing inputs: {', '.join(missing)}")
    return arrays


def to_v2(outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Encode output arrays as OIP v2 tensors."""
    result = []
    for name, array in outputs.items():
        datatype = DTYPE_TO_V2.get(str(array.dtype), "FP32")
        flat = array.astype(np.float32) if datatype == "FP32" and array.dtype != np.float32 else array
        result.append({"name": name, "shape": list(array.shape), "datatype": datatype, "data": flat.ravel().tolist()})
    return result

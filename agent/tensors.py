"""Open Inference Protocol v2 tensors: JSON and the binary tensor data extension, to numpy and back.

A request body is a JSON header, optionally followed by binary tensor data: the
``Inference-Header-Content-Length`` HTTP header gives the JSON part's length, and each
input with ``parameters.binary_data_size`` takes that many bytes, in input order.
Outputs are answered in binary when asked (``binary_data`` on a requested output, or the
request's ``binary_data_output``). BYTES elements are sent as a 4-byte little-endian
length and the bytes; they reach the model as text (ONNX string tensors). Everything is checked against the model's specs: a request that
does not fit gets InvalidInputError naming what is wrong, never a numpy traceback.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from agent.errors import AgentError
from shared.manifest import TensorSpec

__all__ = [
    "DTYPE_TO_V2",
    "V2_TO_DTYPE",
    "InferRequest",
    "InvalidInputError",
    "UnsupportedInputError",
    "bytes_tensor",
    "check_input",
    "decode_request",
    "encode_response",
    "head_json",
    "from_v2",
    "loads",
    "raw_tensor",
    "input_spec",
    "spec_text",
    "tensor_bytes",
    "tensor_from",
    "v2_datatype",
    "to_v2",
]

# OIP v2 datatype names <-> manifest dtypes ("string" is ONNX's string tensor, numpy object)
V2_TO_DTYPE = {
    "FP32": "float32",
    "FP16": "float16",
    "FP64": "float64",
    "INT64": "int64",
    "INT32": "int32",
    "INT16": "int16",
    "INT8": "int8",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "BOOL": "bool",
    "BYTES": "string",
}
DTYPE_TO_V2 = {v: k for k, v in V2_TO_DTYPE.items()}
NUMPY = {v2: np.dtype(object if d == "string" else d).newbyteorder("<") for v2, d in V2_TO_DTYPE.items()}
_INT_KINDS = {"i", "u"}
MAX_ELEMENTS = 64 * 1024 * 1024  # a shape can claim no more elements than this


class InvalidInputError(AgentError, ValueError):
    """A request that does not fit the model's interface (HTTP 400)."""


class UnsupportedInputError(AgentError):
    """A valid request this install cannot decode: an optional package is missing (HTTP 501)."""


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: arrays by input name, the outputs wanted and how."""

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: every output
    binary: frozenset[str]  # outputs to answer as binary data
    binary_default: bool  # binary_data_output: every output not named otherwise
    id: str | None = None


def spec_text(spec: TensorSpec) -> str:
    """Return a tensor spec as people read it: ``input float32[batch, 4]``."""
    dims = ", ".join(str(d) for d in spec.shape)
    return f"{spec.name} {spec.dtype}[{dims}]"


def check_input(spec: TensorSpec, array: np.ndarray) -> None:
    """Raise InvalidInputError unless `array` has the spec's dtype and shape."""
    if array.dtype != _numpy_dtype(spec.dtype):
        raise InvalidInputError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec_text(spec)}")
    if array.ndim != len(spec.shape) or any(
        isinstance(want, int) and want >= 0 and want != got for want, got in zip(spec.shape, array.shape, strict=False)
    ):
        raise InvalidInputError(f"input {spec.name!r} has shape {list(array.shape)}, expected {spec_text(spec)}")


def _not_json(value: str) -> Any:
    raise ValueError(f"{value} is not a JSON number")


# Made once: `json.loads(..., parse_constant=...)` would build a decoder for every request.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def loads(raw: bytes | bytearray | memoryview) -> Any:
    """Parse JSON strictly (no NaN/Infinity); raise InvalidInputError naming what is wrong.

    orjson reads a well-formed body about 7x faster than the json module. What it refuses
    (NaN, a number past a double, deep nesting, other encodings than UTF-8) is read again by
    the json module's strict decoder, whose value or named error stands: the answers are
    the json module's, but for integers past 64 bits, which orjson reads as floats.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        data = bytes(raw) if not isinstance(raw, bytes) else raw
        return _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))  # as json.loads does
    except RecursionError as exc:
        raise InvalidInputError("body is not JSON: nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, the integer digit limit, NaN
        raise InvalidInputError(f"body is not JSON: {exc}") from exc


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**31 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape must be a list of non-negative ints, got {str(shape)[:80]}")
    count = 1
    for dim in shape:
        count *= dim
    if count > MAX_ELEMENTS:
        raise InvalidInputError(f"input {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    dtype = NUMPY[datatype]
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=object).ravel()
            if not all(isinstance(v, str) for v in flat):
                raise InvalidInputError(f"input {name!r}: BYTES data must be strings")
            array = flat
        elif dtype.kind in _INT_KINDS or dtype.kind == "b":
            natural = np.asarray(data)
            kinds = {"b"} if dtype.kind == "b" else _INT_KINDS
            if natural.size and natural.dtype.kind not in kinds:
                what = "booleans" if dtype.kind == "b" else "integers"
                raise InvalidInputError(f"input {name!r} is {datatype}: data holds {natural.dtype} values, not {what}")
            array = natural.astype(dtype)
            if natural.size and dtype.kind != "b" and not np.array_equal(array, natural):
                raise InvalidInputError(f"input {name!r}: values out of the range of {datatype}")
        else:
            array = np.asarray(data, dtype=dtype)
            if not np.isfinite(array).all():
                raise InvalidInputError(f"input {name!r}: values out of the range of {datatype}")
        return array.reshape(shape)
    except InvalidInputError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"input {name!r}: data does not fit shape {list(shape)} as {datatype}: {exc}") from exc


def raw_tensor(name: str, datatype: str, shape: tuple[int, ...], raw: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode one tensor's raw bytes (the binary extension, gRPC raw contents)."""
    count = 1
    for dim in shape:
        count *= dim
    if datatype == "BYTES":
        return bytes_tensor(name, shape, raw, count)
    dtype = NUMPY[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInputError(
            f"input {name!r}: {len(raw)} bytes of data, but shape {list(shape)} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def bytes_tensor(name: str, shape: tuple[int, ...], raw: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    """Decode length-prefixed BYTES elements."""
    view, items, at = memoryview(raw), [], 0
    while at < len(view):
        if at + 4 > len(view):
            raise InvalidInputError(f"input {name!r}: BYTES data ends inside an element's length")
        (size,) = struct.unpack_from("<I", view, at)
        if at + 4 + size > len(view):
            raise InvalidInputError(f"input {name!r}: a BYTES element of {size} bytes runs past the data")
        try:  # ONNX string tensors hold text: ORT takes str, not bytes
            items.append(str(view[at + 4 : at + 4 + size], "utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"input {name!r}: a BYTES element is not UTF-8 text: {exc}") from exc
        at += 4 + size
    if len(items) != count:
        raise InvalidInputError(f"input {name!r}: {len(items)} BYTES elements, shape {list(shape)} needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def tensor_bytes(array: np.ndarray) -> bytes:
    """Encode an array as raw little-endian bytes (BYTES: length-prefixed elements)."""
    if array.dtype == object:
        parts = []
        for value in array.ravel():
            item = value if isinstance(value, bytes) else str(value).encode()
            parts += [struct.pack("<I", len(item)), item]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def input_spec(specs: dict[str, TensorSpec], name: str, datatype: Any) -> TensorSpec:
    """Return the spec of a named input; raise InvalidInputError when the name or datatype is wrong."""
    spec = specs.get(name)
    if spec is None:
        raise InvalidInputError(f"unknown input {name!r}; the model takes {', '.join(map(spec_text, specs.values()))}")
    if datatype not in NUMPY:
        raise InvalidInputError(f"input {name!r}: unsupported datatype {datatype!r}, expected {spec_text(spec)}")
    if V2_TO_DTYPE[datatype] != spec.dtype:
        raise InvalidInputError(f"input {name!r} has dtype {V2_TO_DTYPE[datatype]}, expected {spec_text(spec)}")
    return spec


def tensor_from(
    specs: dict[str, TensorSpec], name: str, datatype: str, shape: Any, *, raw: bytes | None = None, data: Any = None
) -> np.ndarray:
    """Return one input from raw bytes or a list of values, checked against the model's spec."""
    spec = input_spec(specs, name, datatype)
    dims = _shape(name, shape)
    array = raw_tensor(name, datatype, dims, raw) if raw is not None else _from_json(name, datatype, dims, data)
    check_input(spec, array)
    return array


def decode_request(raw: bytes | bytearray, header_length: int | None, specs: dict[str, TensorSpec]) -> InferRequest:
    """Decode an infer request body (JSON, or JSON then binary data) against the model's specs."""
    if header_length is not None and not 0 <= header_length <= len(raw):
        raise InvalidInputError(f"Inference-Header-Content-Length {header_length} is past the body's {len(raw)} bytes")
    end = len(raw) if header_length is None else header_length
    body = loads(memoryview(raw)[:end])
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InvalidInputError("request body must be a JSON object with an 'inputs' list")
    offset = end
    arrays: dict[str, np.ndarray] = {}
    for item in body["inputs"]:
        if not isinstance(item, dict):
            raise InvalidInputError("each input must be an object with name, shape, datatype, data")
        name, datatype = str(item.get("name")), str(item.get("datatype"))
        spec = input_spec(specs, name, datatype)
        shape = _shape(name, item.get("shape"))
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidInputError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(raw):
                raise InvalidInputError(
                    f"input {name!r}: binary_data_size {size} runs past the body "
                    f"({len(raw) - offset} bytes of binary data left)"
                )
            array = raw_tensor(name, datatype, shape, memoryview(raw)[offset : offset + size])
            offset += size
        elif "data" in item:
            array = _from_json(name, datatype, shape, item["data"])
        else:
            raise InvalidInputError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        check_input(spec, array)
        arrays[name] = array
    if offset != len(raw):
        raise InvalidInputError(f"{len(raw) - offset} bytes of binary data after the inputs belong to no input")
    missing = [spec_text(s) for s in specs.values() if s.name not in arrays]
    if missing:
        raise InvalidInputError(f"missing inputs: {', '.join(missing)}")
    return _outputs(body, arrays)


def _outputs(body: dict[str, Any], arrays: dict[str, np.ndarray]) -> InferRequest:
    if len(body) == 1:  # only "inputs": every output, as JSON (the common request)
        return InferRequest(arrays, None, _NONE, False)
    params = body.get("parameters")
    binary_default = bool(isinstance(params, dict) and params.get("binary_data_output") is True)
    wanted, binary = None, set()
    if isinstance(body.get("outputs"), list):
        wanted = []
        for out in body["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise InvalidInputError("each requested output must be an object with a name")
            wanted.append(out["name"])
            flag = (out.get("parameters") or {}).get("binary_data")
            if flag is True or (flag is None and binary_default):
                binary.add(out["name"])
    request_id = body.get("id")
    return InferRequest(arrays, wanted, frozenset(binary), binary_default, str(request_id) if request_id else None)


_NONE: frozenset[str] = frozenset()


def _json_data(array: np.ndarray) -> list[Any]:
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return list(array.ravel().tolist())


_V2_OF = {np.dtype(d): v2 for v2, d in V2_TO_DTYPE.items() if d != "string"}  # looked up per output


def v2_datatype(array: np.ndarray) -> str:
    """Return the OIP v2 datatype of an array (an unknown float kind answers as FP32)."""
    return "BYTES" if array.dtype == object else _V2_OF.get(array.dtype, "FP32")


@lru_cache(maxsize=32)
def _numpy_dtype(name: str) -> np.dtype[Any]:
    return np.dtype(object) if name == "string" else np.dtype(name)


def _data_json(array: np.ndarray) -> bytes:
    """Return a tensor's values as a flat JSON array.

    orjson writes a numeric array in one call, each float as the shortest text that reads
    back as the same value of its own precision (float32 in at most 9 digits, not a
    double's 17). NaN and infinities, which JSON lacks, it writes as null: such arrays, and
    strings, go through the json module as before.
    """
    if array.dtype != object:
        try:
            data = orjson.dumps(array.reshape(-1), option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:  # a dtype orjson does not write, or a non-contiguous array
            pass
        else:
            if b"null" not in data:
                return data
    return json.dumps(_json_data(array), separators=(",", ":")).encode()


@lru_cache(maxsize=256)
def _meta_json(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """Return an output's ``{"name":..,"datatype":..,"shape":[..]`` (no closing brace): the same per model."""
    return json.dumps({"name": name, "datatype": datatype, "shape": list(shape)}, separators=(",", ":")).encode()[:-1]


def encode_response(
    head: dict[str, Any] | bytes, outputs: dict[str, np.ndarray], binary: set[str] | frozenset[str]
) -> tuple[bytes, int | None]:
    """Return the response body and, when some outputs are binary, the JSON header's length.

    `head` is the answer's fields before "outputs": a dict, or `head_json` of one made once.
    """
    tensors, blobs = [], []
    for name, array in outputs.items():
        meta = _meta_json(name, v2_datatype(array), array.shape)
        if name in binary:
            blob = tensor_bytes(array)
            blobs.append(blob)
            tensors.append(b'%s,"parameters":{"binary_data_size":%d}}' % (meta, len(blob)))
        else:
            tensors.append(meta + b',"data":' + _data_json(array) + b"}")
    header = (head if isinstance(head, bytes) else head_json(head)) + b',"outputs":[' + b",".join(tensors) + b"]}"
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def head_json(head: dict[str, Any]) -> bytes:
    """Return an answer's leading fields as JSON without the closing brace (for `encode_response`)."""
    return json.dumps(head, separators=(",", ":")).encode()[:-1]


def from_v2(body: Any, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Decode a parsed JSON infer request's inputs against the model's specs."""
    raw = json.dumps(body).encode()
    return decode_request(raw, None, {s.name: s for s in specs}).inputs


def to_v2(outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Encode output arrays as OIP v2 JSON tensors."""
    return [
        {"name": name, "shape": list(a.shape), "datatype": v2_datatype(a), "data": _json_data(a)}
        for name, a in outputs.items()
    ]

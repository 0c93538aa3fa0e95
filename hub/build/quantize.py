"""Quantization recipes: dynamic INT8, static QDQ INT8 (CPU and TensorRT flavours), FP16."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from hub.build.errors import CalibrationError, TargetBuildError
from hub.build.runner import Arrays

__all__ = [
    "CALIBRATION_ROWS",
    "calibration_table",
    "dynamic_int8",
    "fp16",
    "infer_shapes",
    "preprocess",
    "verify_precision",
    "quantizable_nodes",
    "static_int8",
]

logger = logging.getLogger(__name__)

CALIBRATION_ROWS = 128  # MinMax ranges settle long before this; more only costs time
_DTYPES = {1: np.float32, 7: np.int64, 6: np.int32, 10: np.float16}


def infer_shapes(source: Path, dest: Path, target: str) -> Path:
    """Run symbolic shape inference; without it fused ops have no shapes and silently stay fp32."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # The loop of SymbolicShapeInference.infer_shapes, which on failure also dumps the
    # half-inferred model and its weights into the working directory (the hub's cwd).
    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
    try:
        inference._preprocess(onnx.load(str(source)))
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    except Exception as exc:  # symbolic inference raises bare Exceptions
        raise TargetBuildError("shape-inference", target, f"{type(exc).__name__}: {exc}") from exc
    if not complete:
        raise TargetBuildError("shape-inference", target, "incomplete symbolic shape inference")
    onnx.save(inference.out_mp_, str(dest))
    return dest


def quantizable_nodes(path: Path, op_types: Sequence[str]) -> list[str]:
    """Return the names of nodes of `op_types` whose weights are initializers (what INT8 touches)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type in op_types and any(i in weights for i in n.input)]


def dynamic_int8(source: Path, dest: Path, *, exclude: Sequence[str] = (), target: str = "cpu-int8") -> Path:
    """Quantize weights to signed 8 bits per channel; activations are quantized at run time.

    Per-tensor weights lost far more accuracy on MiniLM; reduce_range stays off because
    it costs a bit of precision and the u8s8 kernels here do not need it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            str(source),
            str(dest),
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            extra_options={"MatMulConstBOnly": True},
        )
    except Exception as exc:  # the quantizer raises bare Exceptions
        raise TargetBuildError("quantize", target, f"dynamic INT8 failed: {type(exc).__name__}: {exc}") from exc
    return dest


class _Reader:
    """Feed calibration rows to ORT's calibrator, a few at a time."""

    def __init__(self, model: Path, data: Arrays, batch: int = 8) -> None:
        graph = onnx.load(str(model), load_external_data=False).graph
        init = {i.name for i in graph.initializer}
        self._types = {i.name: _DTYPES.get(i.type.tensor_type.elem_type) for i in graph.input if i.name not in init}
        n = min(next(iter(data.values())).shape[0], CALIBRATION_ROWS)
        self._batches = iter(range(0, n, batch))
        self._data, self._batch = data, batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = next(self._batches, None)
        if start is None:
            return None
        return {
            k: self._data[k][start : start + self._batch].astype(t or self._data[k].dtype, copy=False)
            for k, t in self._types.items()
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (item := self.get_next()) is not None:
            yield item


def static_int8(
    source: Path,
    dest: Path,
    calibration: Arrays | None,
    *,
    target: str,
    tensorrt: bool = False,
    exclude: Sequence[str] = (),
    cache: Path | None = None,
) -> Path:
    """Quantize to QDQ INT8 with ranges measured on the calibration set.

    CPU: unsigned activations, signed per-channel weights. TensorRT: both signed and
    symmetric, which is the only QDQ form TensorRT accepts. `cache` keeps the measured
    ranges so retries (excluding sensitive nodes) do not calibrate again.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not (cache is not None and cache.is_file()):
        if not calibration or next(iter(calibration.values())).shape[0] == 0:
            raise CalibrationError("calibrate", f"target {target} needs calibration data and the set is empty")
    extra: dict[str, object] = {"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "MatMulConstBOnly": True}
    op_types = None
    if tensorrt:
        extra |= {"ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True}
        # Only the weight GEMMs and convolutions, as TensorRT's own INT8 recipes do: quantizing
        # embeddings, LayerNorm and softmax inputs cost MiniLM all its accuracy (cosine 0.1).
        op_types = ["MatMul", "Gemm", "Conv"]
    try:
        quantize_static(
            str(source),
            str(dest),
            _Reader(source, calibration) if calibration else None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            op_types_to_quantize=op_types,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=extra,
            calibration_cache_path=cache,
        )
    except CalibrationError:
        raise
    except Exception as exc:  # the quantizer raises bare Exceptions
        raise TargetBuildError("quantize", target, f"static INT8 failed: {type(exc).__name__}: {exc}") from exc
    return dest


def calibration_table(cache: Path) -> dict[str, float]:
    """Return TensorRT's per-tensor dynamic ranges (max |value|) from a calibration cache."""
    raw = json.loads(cache.read_text())
    table: dict[str, float] = {}
    for name, entry in raw.get("data", raw).items():
        if not isinstance(entry, dict) or "lowest" not in entry:
            continue
        lo, hi = (np.asarray(_values(entry[key]), dtype=np.float64) for key in ("lowest", "highest"))
        table[name] = float(f"{max(float(np.abs(lo).max()), float(np.abs(hi).max())):.6g}")
    return table


def _values(item: object) -> object:
    """Unwrap ORT's JSON encoding of a numpy array ({"data": [...], "CLS": "numpy.array"})."""
    return item["data"] if isinstance(item, dict) else item


def fp16(source: Path, dest: Path, *, target: str) -> Path:
    """Convert weights and compute to float16, keeping float32 inputs and outputs."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        model = OnnxModel(onnx.load(str(source)))
        model.convert_float_to_float16(keep_io_types=True)  # also re-sorts the graph after inserting casts
        model.save_model_to_file(str(dest))
        onnx.checker.check_model(str(dest))
    except Exception as exc:  # converter and checker raise various types
        raise TargetBuildError("convert-fp16", target, f"{type(exc).__name__}: {exc}") from exc
    return dest


def preprocess(source: Path, dest: Path, target: str) -> Path:
    """Shape inference and basic folding before static quantization, as ORT recommends."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(dest), skip_symbolic_shape=False, auto_merge=True)
    except Exception as exc:  # the pre-processor raises bare Exceptions
        raise TargetBuildError("quantize-preprocess", target, f"{type(exc).__name__}: {exc}") from exc
    return dest


_INT8_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger",
                       "QAttention", "QLinearConv", "QLinearMatMul", "ConvInteger", "QEmbedLayerNormalization"})  # fmt: skip


def verify_precision(path: Path, precision: str, target: str) -> None:
    """Raise TargetBuildError when a recipe left the graph in its old precision.

    The quantizers skip what they cannot handle (float64 weights, unknown ops) without
    an error; an "int8" artifact that is really fp32 must not be published as one.
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    if precision == "int8" and not any(node.op_type in _INT8_OPS for node in graph.node):
        kinds = sorted({onnx.TensorProto.DataType.Name(i.data_type) for i in graph.initializer})
        raise TargetBuildError(
            "quantize",
            target,
            f"no operator was quantized (weights are {', '.join(kinds) or 'none'}); INT8 cannot be built",
        )
    if precision == "fp16" and not any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer):
        kinds = sorted({onnx.TensorProto.DataType.Name(i.data_type) for i in graph.initializer})
        raise TargetBuildError(
            "convert-fp16", target, f"no weight became float16 (weights are {', '.join(kinds) or 'none'})"
        )

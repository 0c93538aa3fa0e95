"""Assemble the manifest: interface, processing, sample, per-variant metrics and recipes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from shared.manifest import (
    Batching,
    Dtype,
    Manifest,
    Sample,
    SkippedVariant,
    TensorData,
    TensorSpec,
    TextPreprocessing,
    Variant,
    VariantMetrics,
)
from shared.targets import TargetId

__all__ = [
    "batching_for",
    "file_digest",
    "sample_for",
    "tensor_data",
    "tensor_specs",
    "text_preprocessing",
    "variant_entry",
]

_ONNX_DTYPES: dict[int, Dtype] = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


def file_digest(path: Path) -> tuple[int, str]:
    """Return a file's size and sha256."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def tensor_specs(
    path: Path, output_shapes: dict[str, tuple[int, ...]] | None = None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Return the graph's inputs and outputs; unnamed output dims are filled from torch's shapes."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims: list[int | str] = [d.dim_param or d.dim_value or "dim" for d in tensor.shape.dim]
        return TensorSpec(name=value.name, dtype=_ONNX_DTYPES.get(tensor.elem_type, "float32"), shape=dims)

    def fixed(value: onnx.ValueInfoProto) -> TensorSpec:
        out = spec(value)
        known = (output_shapes or {}).get(value.name)
        if known is None or len(known) + 1 != len(out.shape):
            return out
        # The exporter names dims it could not infer (e.g. after normalize); all but batch are static.
        dims: list[int | str] = [out.shape[0], *known]
        return out.model_copy(update={"shape": dims})

    return [spec(v) for v in graph.input if v.name not in initializers], [fixed(v) for v in graph.output]


def tensor_data(array: np.ndarray) -> TensorData:
    """Return a small array as manifest JSON."""
    array = np.asarray(array)
    dtype = str(array.dtype)
    if dtype not in ("float32", "float16", "int64", "int32", "int8", "uint8", "bool"):
        array, dtype = array.astype(np.float32), "float32"
    return TensorData(dtype=dtype, shape=list(array.shape), data=array.reshape(-1).tolist())


def text_preprocessing(tokenizer: Path, max_length: int) -> TextPreprocessing:
    """Describe the tokenizer shipped next to the model."""
    size, sha = file_digest(tokenizer)
    return TextPreprocessing(tokenizer_sha256=sha, tokenizer_size=size, max_length=max_length)


def sample_for(
    inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], *, precision: str, task: str, min_cosine: float
) -> Sample:
    """Return the smoke-test sample: exact for fp32, arg-max or cosine for reduced precision."""
    tensors_in = {k: tensor_data(v) for k, v in inputs.items()}
    tensors_out = {k: tensor_data(v) for k, v in outputs.items()}
    if precision == "fp32":
        return Sample(inputs=tensors_in, outputs=tensors_out, atol=1e-3, rtol=1e-2)
    if task == "classification":
        return Sample(inputs=tensors_in, outputs=tensors_out, argmax_match=True)
    if task == "regression":
        scale = max(float(np.abs(v).max()) for v in outputs.values())
        return Sample(inputs=tensors_in, outputs=tensors_out, atol=max(1e-3, 0.05 * scale), rtol=0.05)
    return Sample(inputs=tensors_in, outputs=tensors_out, min_cosine=min_cosine)


def variant_entry(
    target: TargetId,
    precision: str,
    providers: list[str],
    file_name: str,
    path: Path,
    metrics: VariantMetrics,
    sample: Sample | None,
    recipe: dict[str, Any],
    batching: Batching | None = None,
) -> Variant:
    """Return one manifest variant with the file's size and hash."""
    size, sha = file_digest(path)
    return Variant(
        target=target,
        precision=precision,
        providers=providers,
        file=file_name,
        size=size,
        sha256=sha,
        metrics=metrics,
        sample=sample,
        recipe=recipe,
        batching=batching,
    )


def batching_for(inputs: list[TensorSpec], outputs: list[TensorSpec], recipe: dict[str, Any]) -> Batching | None:
    """Return the batching a variant allows: a leading batch axis everywhere, rows independent of each other."""
    batch_axis = all(spec.shape and spec.shape[0] == "batch" for spec in [*inputs, *outputs])
    # Dynamic quantization takes one activation scale over the whole batch: a row's result
    # would depend on the rows run with it.
    dynamic = str(recipe.get("method", "")).startswith("dynamic")
    return Batching() if batch_axis and not dynamic else None


def skipped(target: TargetId, reason: str) -> SkippedVariant:
    """Return a manifest entry for a variant the gate refused."""
    return SkippedVariant(target=target, reason=reason[:1000])


def manifest(**fields: Any) -> Manifest:
    """Validate and return the manifest."""
    return Manifest(**fields)

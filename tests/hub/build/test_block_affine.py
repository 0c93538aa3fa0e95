"""Block-affine int4 keeps a GGUF Q4_1 grid exactly and gathers a tied embedding from the int8 head.

A small graph shaped as the model builder writes it (embedding = Gather over Transpose of the
head, a projection, the head) is converted and run by ONNX Runtime against numpy on the same
weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from hub.build.errors import TargetBuildError
from hub.build.lm_block_affine import quantize_block_affine

HIDDEN, VOCAB = 64, 96


def _q4_1_grid(rng: np.random.Generator, k: int, n: int) -> NDArray[np.float32]:
    """Weights [K, N] as GGUF Q4_1 dequantizes them: m + d * q per block of 32 along K, q in 0..15."""
    q = rng.integers(0, 16, size=(n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's quantizer maps each block's min to 0 and max to 15
    d = rng.uniform(0.005, 0.05, size=(n, k // 32, 1))
    m = rng.uniform(-0.3, 0.0, size=(n, k // 32, 1))
    return (m + d * q).astype(np.float32).reshape(n, k).T.copy()


def _q8_0_grid(rng: np.random.Generator, k: int, n: int) -> NDArray[np.float32]:
    """Weights [K, N] on GGUF Q8_0's grid: d * q per block of 32 along K, q in -127..127."""
    q = rng.integers(-127, 128, size=(n, k // 32, 32))
    q[..., 0] = 127
    d = rng.uniform(0.001, 0.01, size=(n, k // 32, 1))
    return (d * q).astype(np.float32).reshape(n, k).T.copy()


def _builder_like(folder: Path, projection: NDArray[np.float32], head: NDArray[np.float32]) -> None:
    folder.mkdir(parents=True)
    nodes = [
        helper.make_node("Transpose", ["head"], ["head_t"], name="/model/embed_tokens/Transpose"),
        helper.make_node("Gather", ["head_t", "input_ids"], ["embedded"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["embedded", "proj"], ["hidden"], name="/model/layers.0/proj/MatMul"),
        helper.make_node("MatMul", ["hidden", "head"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "builder-like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", VOCAB])],
        [numpy_helper.from_array(head, "head"), numpy_helper.from_array(projection, "proj")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    (folder / "genai_config.json").write_text(json.dumps({"model": {"vocab_size": VOCAB}}))
    (folder / "tokenizer.json").write_text("{}")


def _run(folder: Path, ids: NDArray[np.int64]) -> NDArray[np.float32]:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids})
    return np.asarray(logits, dtype=np.float32)


def test_a_q4_1_checkpoint_converts_without_rounding_again(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    projection, head = _q4_1_grid(rng, HIDDEN, HIDDEN), _q8_0_grid(rng, HIDDEN, VOCAB)
    _builder_like(tmp_path / "fp32", projection, head)
    # accuracy_level 0: float activations, so any difference is the weights' own.
    stats = quantize_block_affine(tmp_path / "fp32", tmp_path / "int4", accuracy_level=0)
    assert (stats.int4_matmuls, stats.int8_matmuls) == (1, 1) and stats.grid_offset < 1e-4
    ids = np.array([[3, 17, 95, 0]], dtype=np.int64)
    expected = (head.T[ids[0]] @ projection @ head)[None]
    np.testing.assert_allclose(_run(tmp_path / "int4", ids), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_run(tmp_path / "fp32", ids), expected, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "int4" / "genai_config.json").read_text() == (
        tmp_path / "fp32" / "genai_config.json"
    ).read_text()
    # The float head is gone: the embedding gathers the int8 head's rows.
    converted = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False)
    assert {n.op_type for n in converted.graph.node} >= {"GatherBlockQuantized", "MatMulNBits"}
    assert "head" not in {i.name for i in converted.graph.initializer}
    size = sum(p.stat().st_size for p in (tmp_path / "int4").glob("model.onnx*"))
    assert size < sum(p.stat().st_size for p in (tmp_path / "fp32").glob("model.onnx*")) / 2


def test_weights_off_any_grid_round_within_half_a_step_closer_than_symmetric_int4(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(0.01, 0.05, size=(HIDDEN, HIDDEN)).astype(np.float32)
    folder = tmp_path / "fp32"
    folder.mkdir()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", HIDDEN])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(folder / "model.onnx")
    )
    stats = quantize_block_affine(folder, tmp_path / "int4", accuracy_level=0)
    assert stats.int4_matmuls == 1 and 0.2 < stats.grid_offset < 0.3  # uniform in [0, 0.5] steps
    # The identity as input reads the weights back as the graph computes with them.
    session = ort.InferenceSession(str(tmp_path / "int4" / "model.onnx"), providers=["CPUExecutionProvider"])
    (read,) = session.run(["y"], {"x": np.eye(HIDDEN, dtype=np.float32)[None]})
    error = np.abs(np.asarray(read)[0] - weight)
    blocks = weight.reshape(HIDDEN // 32, 32, HIDDEN)
    step = ((blocks.max(axis=1) - blocks.min(axis=1)) / 15).repeat(32, axis=0)
    assert (error <= step / 2 + 1e-6).all()
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7  # symmetric int4, what the builder writes
    symmetric = np.abs(np.clip(np.rint(blocks / scale), -8, 7) * scale - blocks).reshape(HIDDEN, HIDDEN)
    assert error.mean() < 0.8 * symmetric.mean()


def test_a_graph_without_a_constant_matmul_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "fp32"
    folder.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "no-matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    with pytest.raises(TargetBuildError, match="no MatMul with a constant"):
        quantize_block_affine(folder, tmp_path / "int4")

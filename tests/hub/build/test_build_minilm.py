"""End to end: MiniLM-L6 (a BERT-class encoder) through fusion, INT8, FP16 and the gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from hub.build.loader import tokenize
from hub.build.package import file_digest
from hub.build.pipeline import BuildResult, build
from hub.build.request import BuildRequest
from hub.build.runner import make_session
from shared.targets import TargetId
from tests.support.digits import sentences


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    validation = tokenize(minilm_dir / "tokenizer.json", sentences(48), 128)
    req = BuildRequest(
        name="minilm",
        version="1.0.0",
        model=minilm_dir,
        task="embedding",
        validation=validation,
        output_names=("sentence_embedding",),
        targets=("cpu-fp32", "cpu-int8", "cuda-fp16"),
    )
    return build(req, tmp_path_factory.mktemp("minilm"))


def test_attention_is_fused(minilm: BuildResult) -> None:
    assert minilm.fused["Attention"] == 6
    assert minilm.fused["SkipLayerNormalization"] == 12
    assert minilm.fused["BiasGelu"] == 6
    ops = [n.op_type for n in onnx.load(str(minilm.files["model.onnx"])).graph.node]
    assert ops.count("Attention") == 6 and "Softmax" not in ops


def test_int8_keeps_cosine_and_is_gated_on_speed(minilm: BuildResult) -> None:
    entry = next(e for e in minilm.report if e.measurement.target == TargetId.CPU_INT8)
    assert entry.measurement.metric == "cosine_min"
    assert entry.measurement.value is not None and entry.measurement.value >= 0.98
    assert entry.recipe["method"].startswith("dynamic INT8")
    int8 = minilm.manifest.variant(TargetId.CPU_INT8)
    skipped = {s.target: s.reason for s in minilm.manifest.skipped}
    assert (int8 is not None) != (TargetId.CPU_INT8 in skipped)
    if int8 is not None:
        # The fused graph really is quantized (symbolic shape inference ran before it).
        ops = {n.op_type for n in onnx.load(str(minilm.files[int8.file])).graph.node}
        assert {"QAttention", "DynamicQuantizeMatMul"} & ops or "MatMulInteger" in ops
        assert int8.sample is not None and int8.sample.min_cosine == 0.98
    else:
        assert skipped[TargetId.CPU_INT8].startswith("latency:")
    fp16 = minilm.manifest.variant(TargetId.CUDA_FP16)
    assert fp16 is not None and fp16.metrics is not None and fp16.metrics.latency_ms is None


def test_text_manifest_ships_the_tokenizer(minilm: BuildResult, minilm_dir: Path) -> None:
    manifest = minilm.manifest
    text = manifest.preprocessing.text
    assert manifest.preprocessing.type == "text" and text is not None
    assert (text.tokenizer_size, text.tokenizer_sha256) == file_digest(minilm_dir / "tokenizer.json")
    assert minilm.files["tokenizer.json"].read_bytes() == (minilm_dir / "tokenizer.json").read_bytes()
    assert [i.name for i in manifest.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest.inputs[0].shape == ["batch", "sequence"]
    assert manifest.outputs[0].shape == ["batch", 384]
    # Pooling and normalization are in the graph: outputs are unit vectors, any batch and length.
    batch = tokenize(minilm_dir / "tokenizer.json", ["short", "a somewhat longer sentence about edge devices"], 128)
    out = make_session(minilm.files["model.onnx"]).run(None, batch)[0]
    assert out.shape == (2, 384) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def test_every_variant_passes_its_own_smoke_test(minilm: BuildResult) -> None:
    manifest = minilm.manifest
    inputs = {k: np.asarray(t.data, np.int64).reshape(t.shape) for k, t in manifest.sample.inputs.items()}
    for variant in manifest.variants:
        if not variant.target.value.startswith("cpu"):
            continue
        sample = variant.sample or manifest.sample
        want = np.asarray(sample.outputs["sentence_embedding"].data).reshape(1, -1)
        got = make_session(minilm.files[variant.file]).run(None, inputs)[0]
        if sample.min_cosine is not None:
            cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
            assert cos >= sample.min_cosine
        else:
            assert np.allclose(got, want, atol=sample.atol, rtol=sample.rtol)

"""End to end: the digits CNN through export, quantization, the gate, packaging and the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from hub.build import gate
from hub.build.errors import BuildInputError, CalibrationError, ExportError, TargetBuildError
from hub.build.pipeline import BuildResult, build
from hub.build.request import DEFAULT_TARGETS, BuildRequest
from hub.build.runner import make_session
from shared.manifest import (
    SignedManifest,
    load_private_key,
    load_public_key,
    public_key_b64,
    sign_manifest,
    verify_manifest,
)
from shared.targets import TargetId
from tests.support.digits import CLASSES, Digits, digits_request

torch = pytest.importorskip("torch")

request = digits_request


def _run(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(path).run(None, inputs)[0]


def test_every_target_built_and_gated(cnn: BuildResult) -> None:
    manifest = cnn.manifest
    published = {v.target for v in manifest.variants}
    skipped = {s.target: s.reason for s in manifest.skipped}
    assert published | set(skipped) == set(DEFAULT_TARGETS)
    fp32 = manifest.variant(TargetId.CPU_FP32)
    assert fp32 is not None and fp32.metrics is not None and fp32.metrics.latency_ms is not None
    # The CPU INT8 variant is published only when it measured faster than cpu-fp32 by the margin.
    entry = next(e for e in cnn.report if e.measurement.target == TargetId.CPU_INT8)
    int8_ms, fp32_ms = entry.measurement.latency_ms, fp32.metrics.latency_ms
    assert int8_ms is not None
    if TargetId.CPU_INT8 in published:
        assert int8_ms * gate.Policy().min_speedup <= fp32_ms
    else:
        assert skipped[TargetId.CPU_INT8].startswith(("latency:", "accuracy:"))
    # No GPU here: GPU variants are checked and published with their latency marked unmeasured.
    for target in (TargetId.CUDA_FP16, TargetId.JETSON_TRT_INT8):
        variant = manifest.variant(target)
        assert variant is not None and variant.metrics is not None
        assert variant.metrics.latency_ms is None
        assert variant.metrics.latency_note is not None and variant.metrics.latency_note.startswith("unmeasured")
        onnx.checker.check_model(str(cnn.files[variant.file]))
    trt = manifest.variant(TargetId.JETSON_TRT_INT8)
    assert trt is not None and trt.recipe["calibration_table"]
    assert all(v > 0 for v in trt.recipe["calibration_table"].values())


def test_manifest_describes_the_model_and_its_smoke_test(cnn: BuildResult, digits: Digits) -> None:
    manifest = cnn.manifest
    assert [(t.name, t.dtype, t.shape) for t in manifest.inputs] == [("input", "float32", ["batch", 1, 8, 8])]
    assert [t.name for t in manifest.outputs] == ["logits"]
    assert manifest.labels == CLASSES
    assert manifest.metrics["torch_accuracy"] > 0.85
    sample_in = {k: np.asarray(t.data, np.float32).reshape(t.shape) for k, t in manifest.sample.inputs.items()}
    expected = np.asarray(manifest.sample.outputs["logits"].data).reshape(manifest.sample.outputs["logits"].shape)
    for variant in manifest.variants:
        assert variant.sha256 and variant.size == cnn.files[variant.file].stat().st_size
        if variant.target.value.startswith("cpu"):
            got = _run(cnn.files[variant.file], sample_in)
            if variant.precision == "fp32":
                assert np.allclose(got, expected, atol=1e-3)
            else:
                assert variant.sample is not None and variant.sample.argmax_match
                assert got.argmax(-1) == expected.argmax(-1)
    # Dynamic batch: the published fp32 graph takes any batch size.
    assert _run(cnn.files["model.onnx"], {"input": digits.validation[:7]}).shape == (7, 10)


def test_signed_manifest_verifies(cnn: BuildResult) -> None:
    from shared.manifest import generate_signing_key

    key = load_private_key(generate_signing_key())
    signed = SignedManifest.from_bytes(sign_manifest(cnn.manifest, key).to_bytes())
    assert verify_manifest(signed, load_public_key(public_key_b64(key))) == cnn.manifest


def test_gate_refuses_variant_calibrated_on_clipped_range(digits: Digits, tmp_path: Path) -> None:
    # Calibrating on images scaled to 2% of their range clips every real activation.
    damaged = request(
        digits,
        calibration={"input": digits.train[:256] * 0.02},
        targets=("cpu-fp32", "cpu-int8"),
        max_excluded_nodes=0,
    )
    result = build(damaged, tmp_path)
    assert [v.target for v in result.manifest.variants] == [TargetId.CPU_FP32]
    (skip,) = result.manifest.skipped
    assert skip.target == TargetId.CPU_INT8 and skip.reason.startswith("accuracy:")
    entry = next(e for e in result.report if e.measurement.target == TargetId.CPU_INT8)
    assert entry.measurement.value is not None and entry.measurement.value < entry.measurement.reference - 0.01


def test_sensitive_nodes_are_excluded_until_accuracy_returns(digits: Digits, tmp_path: Path) -> None:
    damaged = request(
        digits, calibration={"input": digits.train[:256] * 0.02}, targets=("cpu-fp32", "cpu-int8"), max_excluded_nodes=4
    )
    result = build(damaged, tmp_path)
    entry = next(e for e in result.report if e.measurement.target == TargetId.CPU_INT8)
    assert entry.recipe["first_try"].startswith("accuracy")
    assert entry.recipe["excluded_nodes"] and set(entry.recipe["excluded_nodes"]) <= set(entry.recipe["sensitivity"])
    ok, _ = gate.accuracy_ok(entry.measurement, gate.Policy())
    assert ok
    # Published, or refused for speed only: never for accuracy any more.
    skipped = {s.target: s.reason for s in result.manifest.skipped}
    assert TargetId.CPU_INT8 not in skipped or skipped[TargetId.CPU_INT8].startswith("latency:")


class Eigen(torch.nn.Module):
    """Runs in torch, but the ONNX exporter has no eigenvalue operator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x).real


def test_model_that_does_not_export(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(4, 3, 3)).astype(np.float32)
    bad = BuildRequest(name="eig", version="1.0.0", model=Eigen(), validation={"x": x}, task="embedding")
    with pytest.raises(ExportError) as info:
        build(bad, tmp_path)
    assert info.value.step == "export"


def test_validation_set_of_the_wrong_shape(digits: Digits, tmp_path: Path) -> None:
    flat = {"input": digits.validation.reshape(len(digits.validation), 64)}
    with pytest.raises(BuildInputError) as info:
        build(request(digits, validation=flat, calibration=None), tmp_path)
    assert info.value.step == "validation" and "[397, 64]" in str(info.value)
    with pytest.raises(BuildInputError, match="labels have shape"):
        request(digits, labels=digits.labels[:10])


def test_empty_calibration_set(digits: Digits) -> None:
    with pytest.raises(CalibrationError) as info:
        request(digits, calibration={"input": np.zeros((0, 1, 8, 8), np.float32)})
    assert info.value.step == "calibration" and "empty" in info.value.message
    with pytest.raises(CalibrationError, match="rows are"):
        request(digits, calibration={"input": np.zeros((5, 1, 4, 4), np.float32)})


def test_unknown_target(digits: Digits) -> None:
    with pytest.raises(BuildInputError) as info:
        request(digits, targets=("cpu-fp32", "tpu-int4"))
    assert info.value.step == "targets" and "tpu-int4" in info.value.message


def test_mlp_gets_a_real_int8_variant(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    req = BuildRequest(name="mlp", version="1.0.0", model=mlp, validation={"x": x}, task="regression",
                       targets=("cpu-fp32", "cpu-int8"), max_accuracy_drop=0.05)  # fmt: skip
    result = build(req, tmp_path)
    entry = next(e for e in result.report if e.measurement.target == TargetId.CPU_INT8)
    assert entry.measurement.metric == "r2_vs_torch" and (entry.measurement.value or 0) > 0.95
    ops = {n.op_type for n in onnx.load(str(tmp_path / "model-int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops  # Gemm layers really quantized, not silently left fp32


def test_target_that_cannot_be_built_from_this_model(tmp_path: Path) -> None:
    # float64 weights: the INT8 quantizers skip every operator, so there is no INT8 model to ship.
    double = torch.nn.Sequential(torch.nn.Linear(8, 4)).double().eval()
    x = np.random.default_rng(0).normal(size=(16, 8))
    req = BuildRequest(name="dbl", version="1.0.0", model=double, validation={"x": x}, task="embedding",
                       targets=("cpu-fp32", "cpu-int8"))  # fmt: skip
    with pytest.raises(TargetBuildError) as info:
        build(req, tmp_path)
    assert (info.value.step, info.value.target) == ("quantize", "cpu-int8")
    assert "DOUBLE" in info.value.message

"""The build's dynamic-batching hint: only a leading batch axis everywhere and rows that do not mix."""

from __future__ import annotations

from hub.build.package import batching_for
from shared.manifest import TensorSpec

IMAGE = [TensorSpec(name="input", dtype="float32", shape=["batch", 1, 8, 8])]
LOGITS = [TensorSpec(name="logits", dtype="float32", shape=["batch", 10])]


def test_a_batch_axis_and_static_quantization_allow_batching() -> None:
    assert batching_for(IMAGE, LOGITS, {"method": "static QDQ INT8, u8 activations"}) is not None
    assert batching_for(IMAGE, LOGITS, {"graph": "ORT_ENABLE_EXTENDED"}) is not None


def test_dynamic_quantization_or_no_batch_axis_forbid_it() -> None:
    assert batching_for(IMAGE, LOGITS, {"method": "dynamic INT8, s8 per-channel weights"}) is None
    fixed = [TensorSpec(name="input", dtype="float32", shape=[1, 1, 8, 8])]
    assert batching_for(fixed, LOGITS, {}) is None

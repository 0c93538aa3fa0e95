"""The gate's decisions from given measurements (no timing: the numbers are the inputs)."""

from __future__ import annotations

import numpy as np
import pytest

from hub.build.gate import Measurement, Policy, decide, score
from shared.targets import TargetId

CPU32, CPU8, FP16 = TargetId.CPU_FP32, TargetId.CPU_INT8, TargetId.CUDA_FP16
MEASURABLE = {CPU32: True, CPU8: True, FP16: False}


@pytest.mark.parametrize(
    ("int8", "published", "reason"),
    [
        (Measurement(CPU8, "accuracy", 0.95, 0.955, latency_ms=5.0), True, "faster than cpu-fp32"),
        (Measurement(CPU8, "accuracy", 0.94, 0.955, latency_ms=5.0), False, "accuracy:"),
        (Measurement(CPU8, "accuracy", 0.95, 0.955, latency_ms=12.0), False, "latency:"),
        # Within the noise margin (less than 1.05x faster) the fp32 variant is kept.
        (Measurement(CPU8, "accuracy", 0.95, 0.955, latency_ms=9.8), False, "latency:"),
        (Measurement(CPU8, "cosine_min", 0.979, 1.0, latency_ms=5.0), False, "accuracy: cosine min 0.9790 < 0.98"),
        (Measurement(CPU8, "cosine_min", 0.985, 1.0, latency_ms=5.0), True, "cosine min 0.9850 >= 0.98"),
    ],
)
def test_cpu_variant_needs_accuracy_and_speed(int8: Measurement, published: bool, reason: str) -> None:
    fp32 = Measurement(CPU32, int8.metric, int8.reference, int8.reference, latency_ms=10.0)
    decisions = decide({CPU32: fp32, CPU8: int8}, MEASURABLE, Policy())
    assert decisions[CPU32].published
    assert decisions[CPU8].published is published
    assert reason in decisions[CPU8].reason


def test_gpu_variant_published_with_latency_unmeasured_unless_inaccurate() -> None:
    fp32 = Measurement(CPU32, "accuracy", 0.95, 0.95, latency_ms=10.0)
    good = Measurement(FP16, "accuracy", 0.95, 0.95)
    bad = Measurement(FP16, "accuracy", 0.80, 0.95)
    assert "unmeasured" in decide({CPU32: fp32, FP16: good}, MEASURABLE, Policy())[FP16].reason
    assert not decide({CPU32: fp32, FP16: bad}, MEASURABLE, Policy())[FP16].published


def test_scores() -> None:
    ref = [np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])]
    labels = np.array([1, 0, 0])
    m = score(CPU8, "classification", [np.array([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6]])], ref, labels)
    assert (m.metric, m.value, m.reference) == ("accuracy", pytest.approx(1 / 3), pytest.approx(2 / 3))
    m = score(CPU8, "embedding", [ref[0] * 2], ref, None)
    assert m.metric == "cosine_min" and m.value == pytest.approx(1.0)
    m = score(CPU8, "regression", [ref[0] + 0.01], ref, None)
    assert m.metric == "r2_vs_torch" and 0.99 < (m.value or 0) < 1

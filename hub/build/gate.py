"""The gate: measure each variant's task metric and latency, and decide what is published."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from shared.targets import TargetId

__all__ = [
    "Decision",
    "Measurement",
    "Policy",
    "accuracy_ok",
    "cosine_rows",
    "decide",
    "measure_latency",
    "score",
]

UNMEASURED = "unmeasured: no CUDA or TensorRT on the build machine"


@dataclass(frozen=True)
class Policy:
    """The publication thresholds."""

    max_accuracy_drop: float = 0.01
    min_cosine: float = 0.98
    # Faster means faster by a margin: a tie within noise keeps the simpler fp32 variant.
    min_speedup: float = 1.05


@dataclass(frozen=True)
class Measurement:
    """What the gate measured for one variant."""

    target: TargetId
    metric: str
    value: float | None
    reference: float
    latency_ms: float | None = None
    cosine_mean: float | None = None


@dataclass(frozen=True)
class Decision:
    """Published or not, and why."""

    target: TargetId
    published: bool
    reason: str


def cosine_rows(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Return the cosine similarity of each row (batch item) of two outputs."""
    a = got.reshape(got.shape[0], -1).astype(np.float64)
    b = want.reshape(want.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.asarray((a * b).sum(1) / np.maximum(denom, 1e-12))


def score(
    target: TargetId, task: str, outputs: list[np.ndarray], reference: list[np.ndarray], labels: np.ndarray | None
) -> Measurement:
    """Compare a variant's outputs with torch's: accuracy with labels, else agreement or cosine."""
    got, want = outputs[0], reference[0]
    if task == "classification" and labels is not None:
        ref = float((want.argmax(-1) == labels).mean())
        return Measurement(target, "accuracy", float((got.argmax(-1) == labels).mean()), ref)
    if task == "regression":
        # R^2 of the variant's predictions against torch's: 1.0 is identical, 0 is no better than the mean.
        residual = float(((got - want) ** 2).sum())
        spread = float(((want - want.mean(0)) ** 2).sum()) or 1e-12
        return Measurement(target, "r2_vs_torch", 1.0 - residual / spread, 1.0)
    cos = cosine_rows(got, want)
    if task == "classification":
        return Measurement(target, "agreement", float((got.argmax(-1) == want.argmax(-1)).mean()), 1.0)
    return Measurement(target, "cosine_min", float(cos.min()), 1.0, cosine_mean=float(cos.mean()))


def accuracy_ok(m: Measurement, policy: Policy) -> tuple[bool, str]:
    """Return whether the metric is within budget, and a sentence saying so."""
    if m.value is None:
        return True, "accuracy not measurable here"
    if m.metric == "cosine_min":
        ok = m.value >= policy.min_cosine
        return ok, f"cosine min {m.value:.4f} {'>=' if ok else '<'} {policy.min_cosine}"
    floor = m.reference - policy.max_accuracy_drop
    ok = m.value >= floor - 1e-12
    return (
        ok,
        f"{m.metric} {m.value:.4f} {'>=' if ok else '<'} {floor:.4f} (torch {m.reference:.4f} - {policy.max_accuracy_drop})",
    )


def measure_latency(
    runners: Mapping[str, Callable[[], object]], *, runs: int = 30, warmup: int = 5, min_sample_ms: float = 2.0
) -> dict[str, float]:
    """Return the median milliseconds per call for each runner.

    Runs are interleaved (one sample of every runner per round) so machine noise hits all
    alike; a sample of a sub-millisecond model times several calls, so a scheduler hiccup
    in one call does not decide between two variants that differ by microseconds.
    """
    repeats: dict[str, int] = {}
    for key, run in runners.items():
        for _ in range(warmup):
            run()
        start = time.perf_counter()
        run()
        once_ms = (time.perf_counter() - start) * 1000
        repeats[key] = max(1, min(1000, math.ceil(min_sample_ms / max(once_ms, 1e-6))))
    samples: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(runs):
        for key, run in runners.items():
            n = repeats[key]
            start = time.perf_counter()
            for _ in range(n):
                run()
            samples[key].append((time.perf_counter() - start) * 1000 / n)
    return {key: statistics.median(values) for key, values in samples.items()}


def decide(
    measurements: Mapping[TargetId, Measurement], measurable: Mapping[TargetId, bool], policy: Policy
) -> dict[TargetId, Decision]:
    """Decide each variant: cpu-fp32 always; others by accuracy, CPU ones also by speed over cpu-fp32."""
    fp32 = measurements[TargetId.CPU_FP32]
    out: dict[TargetId, Decision] = {}
    for target, m in measurements.items():
        ok, why = accuracy_ok(m, policy)
        if target == TargetId.CPU_FP32:
            out[target] = Decision(target, True, f"baseline; {why}")
        elif not ok:
            out[target] = Decision(target, False, f"accuracy: {why}")
        elif not measurable.get(target, False):
            out[target] = Decision(target, True, f"{why}; latency {UNMEASURED}")
        elif m.latency_ms is None or fp32.latency_ms is None:
            out[target] = Decision(target, False, "latency: not measured")
        elif m.latency_ms * policy.min_speedup > fp32.latency_ms:
            out[target] = Decision(
                target,
                False,
                f"latency: {m.latency_ms:.3f} ms is not faster than cpu-fp32 {fp32.latency_ms:.3f} ms "
                f"by {policy.min_speedup}x ({why})",
            )
        else:
            out[target] = Decision(target, True, f"{why}; {fp32.latency_ms / m.latency_ms:.2f}x faster than cpu-fp32")
    return out

"""Task metrics, their direction, and the trivial baseline every model must beat."""

from __future__ import annotations

import numpy as np

__all__ = ["baseline", "higher_is_better", "score"]

_LOWER_IS_BETTER = frozenset({"rmse", "mae"})


def higher_is_better(metric: str) -> bool:
    """Return True when a larger value of `metric` is better."""
    return metric not in _LOWER_IS_BETTER


def score(metric: str, y_true: np.ndarray, outputs: np.ndarray) -> float:
    """Score model outputs (logits, or predictions for regression) against the truth."""
    if metric in ("accuracy", "f1_macro"):
        predicted = outputs.argmax(axis=1) if outputs.ndim == 2 else outputs.astype(np.int64)
        return _classification(metric, y_true.astype(np.int64), predicted)
    predicted = outputs.reshape(-1).astype(np.float64)
    truth = y_true.reshape(-1).astype(np.float64)
    if metric == "rmse":
        return float(np.sqrt(np.mean((predicted - truth) ** 2)))
    if metric == "mae":
        return float(np.mean(np.abs(predicted - truth)))
    if metric == "r2":
        total = float(np.sum((truth - truth.mean()) ** 2))
        return 1.0 - float(np.sum((truth - predicted) ** 2)) / total if total > 0 else 0.0
    raise ValueError(f"unknown metric {metric!r}")


def baseline(metric: str, y_train: np.ndarray, y_eval: np.ndarray) -> float:
    """Score the trivial model: the majority class, or the training mean for regression."""
    if metric in ("accuracy", "f1_macro"):
        majority = int(np.bincount(y_train.astype(np.int64)).argmax())
        return _classification(metric, y_eval.astype(np.int64), np.full(len(y_eval), majority))
    return score(metric, y_eval, np.full(len(y_eval), float(np.mean(y_train))))


def _classification(metric: str, truth: np.ndarray, predicted: np.ndarray) -> float:
    if metric == "accuracy":
        return float(np.mean(truth == predicted)) if len(truth) else 0.0
    scores = []
    for cls in np.union1d(truth, predicted):
        tp = float(np.sum((predicted == cls) & (truth == cls)))
        fp = float(np.sum((predicted == cls) & (truth != cls)))
        fn = float(np.sum((predicted != cls) & (truth == cls)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0)
    return float(np.mean(scores)) if scores else 0.0

"""Model output tensors -> an answer: pooling, normalization, softmax, labels, top-k."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.manifest import Manifest

__all__ = ["postprocess"]


def postprocess(
    manifest: Manifest, outputs: dict[str, np.ndarray], attention_mask: np.ndarray | None = None
) -> list[Any]:
    """Return one answer per example, as the manifest's postprocessing says."""
    post = manifest.postprocessing
    name = post.output or next(iter(outputs))
    values = outputs[name].astype(np.float32)
    if post.pooling == "mean" and values.ndim == 3:
        mask = np.ones(values.shape[:2], np.float32) if attention_mask is None else attention_mask.astype(np.float32)
        summed = (values * mask[..., np.newaxis]).sum(axis=1)
        values = summed / np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)
    elif post.pooling == "cls" and values.ndim == 3:
        values = values[:, 0, :]
    if post.normalize:
        norms = np.linalg.norm(values, axis=-1, keepdims=True)
        values = values / np.clip(norms, 1e-12, None)
    if post.softmax:
        shifted = values - values.max(axis=-1, keepdims=True)
        exp = np.exp(shifted)
        values = exp / exp.sum(axis=-1, keepdims=True)
    labels = post.labels or manifest.labels
    if post.top_k is None and labels is None:
        return [row.tolist() for row in values]
    answers = []
    for row in values.reshape(values.shape[0], -1):
        order = np.argsort(-row)[: post.top_k or len(row)]
        answers.append(
            [
                {
                    "label": labels[i] if labels and i < len(labels) else str(int(i)),
                    "index": int(i),
                    "score": float(row[i]),
                }
                for i in order
            ]
        )
    return answers

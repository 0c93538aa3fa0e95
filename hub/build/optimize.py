"""Offline graph optimization: ORT's transformer fusions, or ORT_ENABLE_EXTENDED for the rest."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

from hub.build.errors import OptimizeError
from hub.build.request import TransformerShape

__all__ = ["FUSED_OPS", "fused_counts", "optimize"]

logger = logging.getLogger(__name__)

FUSED_OPS = ("Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization", "FastGelu", "Gelu")


def fused_counts(path: Path) -> dict[str, int]:
    """Count the fused operators in an ONNX graph."""
    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: ops[op] for op in FUSED_OPS if ops[op]}


def optimize(source: Path, dest: Path, transformer: TransformerShape | None) -> dict[str, int]:
    """Write an optimized copy of `source`; return the fused-operator counts.

    ENABLE_ALL is left to the device: it writes layouts specific to this machine's CPU.
    """
    try:
        if transformer is not None:
            from onnxruntime.transformers import optimizer

            model = optimizer.optimize_model(
                str(source),
                model_type=transformer.model_type,
                num_heads=transformer.num_heads,
                hidden_size=transformer.hidden_size,
                opt_level=0,
            )
            model.save_model_to_file(str(dest))
        else:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(dest)
            options.log_severity_level = 3
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        onnx.checker.check_model(str(dest))
    except Exception as exc:  # optimizer and ORT raise many error types
        raise OptimizeError("optimize", f"{type(exc).__name__}: {exc}") from exc
    counts = fused_counts(dest)
    if transformer is not None and not counts.get("Attention"):
        # Without fused attention the int8 and fp16 recipes lose most of their gain; say so loudly.
        logger.warning("no Attention fusion in %s: %s", dest.name, counts)
    return counts

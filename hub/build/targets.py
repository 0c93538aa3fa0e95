"""One named recipe per target id: what graph it starts from, how it is made, where it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.targets import TARGET_PRECISION, TARGET_PROVIDERS, TargetId

__all__ = ["RECIPES", "Recipe", "recipe_for"]

Method = Literal["fp32", "int8-cpu", "fp16", "int8-tensorrt"]


@dataclass(frozen=True)
class Recipe:
    """How to make and check one target's artifact."""

    target: TargetId
    method: Method
    # "optimized": ORT-fused graph (com.microsoft ops CPU and CUDA run); "exported": plain
    # ONNX ops, which TensorRT parses (it rejects ORT's contrib ops).
    source: Literal["optimized", "exported"]
    measurable_here: bool
    shares_artifact_with: TargetId | None = None

    @property
    def providers(self) -> list[str]:
        """Execution providers in order of preference."""
        return list(TARGET_PROVIDERS[self.target])

    @property
    def precision(self) -> Literal["fp32", "fp16", "int8"]:
        """Numeric precision of the artifact."""
        value = TARGET_PRECISION[self.target]
        assert value in ("fp32", "fp16", "int8")
        return value  # type: ignore[return-value]

    @property
    def needs_calibration(self) -> bool:
        """Whether the recipe measures activation ranges (static INT8)."""
        return self.method == "int8-tensorrt"


RECIPES: dict[TargetId, Recipe] = {
    TargetId.CPU_FP32: Recipe(TargetId.CPU_FP32, "fp32", "optimized", measurable_here=True),
    TargetId.CPU_INT8: Recipe(TargetId.CPU_INT8, "int8-cpu", "optimized", measurable_here=True),
    TargetId.CUDA_FP16: Recipe(TargetId.CUDA_FP16, "fp16", "optimized", measurable_here=False),
    TargetId.CUDA_INT8: Recipe(TargetId.CUDA_INT8, "int8-tensorrt", "exported", measurable_here=False),
    TargetId.JETSON_FP16: Recipe(
        TargetId.JETSON_FP16, "fp16", "optimized", measurable_here=False, shares_artifact_with=TargetId.CUDA_FP16
    ),
    TargetId.JETSON_TRT_INT8: Recipe(
        TargetId.JETSON_TRT_INT8,
        "int8-tensorrt",
        "exported",
        measurable_here=False,
        shares_artifact_with=TargetId.CUDA_INT8,
    ),
}


def recipe_for(target: TargetId) -> Recipe:
    """Return the recipe of a target."""
    return RECIPES[target]

"""What to build: a frozen, validated description of one model version's build."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hub.build.errors import BuildInputError, CalibrationError
from shared.manifest import Postprocessing, Preprocessing
from shared.targets import TargetId

__all__ = ["BuildRequest", "DEFAULT_TARGETS", "TransformerShape", "parse_targets"]

# int4 targets are weight-only quantized language models (hub.build.textgen); not for tensors in, tensors out.
DEFAULT_TARGETS: tuple[TargetId, ...] = tuple(t for t in TargetId if t not in (TargetId.CPU_INT4, TargetId.CUDA_INT4))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$")


def parse_targets(values: list[str] | tuple[str, ...]) -> tuple[TargetId, ...]:
    """Turn target names into ids; raise BuildInputError naming an unknown one."""
    known = {t.value: t for t in TargetId}
    out: list[TargetId] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in known:
                raise BuildInputError("targets", f"unknown target {part!r}; known: {', '.join(known)}")
            if known[part] not in out:
                out.append(known[part])
    if not out:
        raise BuildInputError("targets", "no targets requested")
    return tuple(out)


@dataclass(frozen=True)
class TransformerShape:
    """What ONNX Runtime's transformer optimizer needs to fuse attention."""

    model_type: str
    num_heads: int
    hidden_size: int


def _batch(step: str, arrays: dict[str, np.ndarray], what: str) -> int:
    error = CalibrationError if what == "calibration" else BuildInputError
    if not arrays:
        raise error(step, f"the {what} set is empty")
    sizes = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise error(step, f"{what} inputs disagree on the batch size: {sizes}")
    n = next(iter(sizes.values()))
    if n < 1:
        raise error(step, f"the {what} set is empty")
    return n


@dataclass(frozen=True)
class BuildRequest:
    """A validated build request; see `hub.build.pipeline.build`.

    `model` is a torch.nn.Module, or a path to a torch.save'd module, a TorchScript file or a
    local Hugging Face directory. `validation` maps input names (in forward order) to arrays
    whose first axis is the batch; `labels` (classification) are compared with the arg-max
    of the first output, otherwise variants are compared with torch's outputs by cosine.
    """

    name: str
    version: str
    model: Any
    validation: dict[str, np.ndarray]
    task: str = "classification"
    labels: np.ndarray | None = None
    calibration: dict[str, np.ndarray] | None = None
    targets: tuple[TargetId, ...] = DEFAULT_TARGETS
    max_accuracy_drop: float = 0.01
    min_cosine: float = 0.98
    output_names: tuple[str, ...] = ("output",)
    dynamic_axes: dict[str, dict[int, str]] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    class_names: list[str] | None = None
    tokenizer_file: Path | None = None
    transformer: TransformerShape | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    max_length: int = 128
    opset: int = 17
    latency_runs: int = 30
    warmup_runs: int = 5
    threads: int = 1
    min_speedup: float = 1.05
    max_excluded_nodes: int = 8

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise BuildInputError("request", f"model name {self.name!r} is not a valid name")
        if not _SEMVER.match(self.version):
            raise BuildInputError("request", f"version {self.version!r} is not a semantic version")
        object.__setattr__(
            self, "targets", parse_targets([t.value if isinstance(t, TargetId) else t for t in self.targets])
        )
        if int4 := [t.value for t in self.targets if t not in DEFAULT_TARGETS]:
            raise BuildInputError("targets", f"{', '.join(int4)}: int4 targets are built for text generation only")
        if TargetId.CPU_FP32 not in self.targets:
            # cpu-fp32 is the baseline every other variant is gated against, and the fallback.
            object.__setattr__(self, "targets", (TargetId.CPU_FP32, *self.targets))
        validation = {k: np.asarray(v) for k, v in self.validation.items()}
        object.__setattr__(self, "validation", validation)
        n = _batch("validation", validation, "validation")
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (n,):
                raise BuildInputError("validation", f"labels have shape {labels.shape}, expected ({n},)")
            object.__setattr__(self, "labels", labels)
        if self.calibration is not None:
            calibration = {k: np.asarray(v) for k, v in self.calibration.items()}
            _batch("calibration", calibration, "calibration")
            if set(calibration) != set(validation):
                raise CalibrationError(
                    "calibration", f"calibration inputs {sorted(calibration)} differ from {sorted(validation)}"
                )
            for key, arr in calibration.items():
                ref = validation[key]
                if arr.ndim != ref.ndim or arr.dtype != ref.dtype:
                    raise CalibrationError(
                        "calibration",
                        f"input {key!r}: calibration {arr.dtype}{list(arr.shape)} vs validation {ref.dtype}{list(ref.shape)}",
                    )
                if not np.issubdtype(arr.dtype, np.integer) and arr.shape[1:] != ref.shape[1:]:
                    raise CalibrationError(
                        "calibration",
                        f"input {key!r}: calibration rows are {list(arr.shape[1:])}, validation rows {list(ref.shape[1:])}",
                    )
            object.__setattr__(self, "calibration", calibration)
        if not 0 <= self.max_accuracy_drop < 1:
            raise BuildInputError("request", "max_accuracy_drop must be in [0, 1)")
        if not 0 < self.min_cosine <= 1:
            raise BuildInputError("request", "min_cosine must be in (0, 1]")
        if self.opset < 17:
            raise BuildInputError("request", f"opset {self.opset} < 17")
        if self.latency_runs < 30:
            raise BuildInputError("request", "latency_runs must be >= 30")
        if not self.output_names:
            raise BuildInputError("request", "output_names is empty")
        if self.tokenizer_file is not None and not Path(self.tokenizer_file).is_file():
            raise BuildInputError("request", f"tokenizer file {self.tokenizer_file} does not exist")

    @property
    def input_names(self) -> tuple[str, ...]:
        """Return the model's input names, in forward order."""
        return tuple(self.validation)

    @property
    def size(self) -> int:
        """Return the number of validation examples."""
        return int(next(iter(self.validation.values())).shape[0])

    def axes(self) -> dict[str, dict[int, str]]:
        """Return the dynamic axes: batch everywhere, sequence on 2-D integer inputs."""
        if self.dynamic_axes is not None:
            return self.dynamic_axes
        axes: dict[str, dict[int, str]] = {}
        for key, arr in self.validation.items():
            axes[key] = {0: "batch"}
            if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
                axes[key][1] = "sequence"
        for out in self.output_names:
            axes[out] = {0: "batch"}
        return axes

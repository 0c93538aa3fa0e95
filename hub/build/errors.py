"""The build pipeline's errors; each names the step that failed and why.

Errors::

    BuildError (step, message)
    ├── BuildInputError          the request makes no sense (wrong shapes, empty sets, unknown target)
    ├── ModelLoadError           the model file or directory cannot be loaded
    ├── ExportError              torch -> ONNX failed
    │   └── OutputMismatchError  ONNX Runtime disagrees with torch (names the largest difference)
    ├── OptimizeError            graph fusion failed or changed the outputs
    ├── CalibrationError         no usable calibration data for a static INT8 target
    └── TargetBuildError         a target's recipe cannot be built here (names the target)
"""

from __future__ import annotations

__all__ = [
    "BuildError",
    "BuildInputError",
    "CalibrationError",
    "ExportError",
    "ModelLoadError",
    "OptimizeError",
    "OutputMismatchError",
    "TargetBuildError",
]


class BuildError(Exception):
    """A build that stopped at `step`; nothing was registered."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class BuildInputError(BuildError):
    """The request is inconsistent: shapes, sizes, empty sets, unknown targets."""


class ModelLoadError(BuildError):
    """The model cannot be loaded from the given path."""


class ExportError(BuildError):
    """The torch model does not export to ONNX."""


class OutputMismatchError(ExportError):
    """ONNX Runtime's outputs differ from torch's beyond tolerance."""

    def __init__(self, step: str, output: str, max_abs_diff: float, index: tuple[int, ...], tolerance: float) -> None:
        super().__init__(
            step,
            f"output {output!r} differs from torch by {max_abs_diff:.3g} at index {index} (tolerance {tolerance:.3g})",
        )
        self.output = output
        self.max_abs_diff = max_abs_diff
        self.index = index


class OptimizeError(BuildError):
    """Graph optimization failed."""


class CalibrationError(BuildError):
    """Static quantization has no usable calibration data."""


class TargetBuildError(BuildError):
    """One target's recipe failed or cannot run on this machine."""

    def __init__(self, step: str, target: str, message: str) -> None:
        super().__init__(step, f"target {target}: {message}")
        self.target = target

"""Export a torch module to ONNX (opset >= 17, dynamic axes) and check it against torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from hub.build.errors import BuildInputError, ExportError, OutputMismatchError
from hub.build.runner import Arrays, make_session, run_onnx, run_torch

__all__ = ["check_against", "export_onnx", "reference_outputs"]

logger = logging.getLogger(__name__)


def reference_outputs(module: torch.nn.Module, inputs: Arrays, output_names: tuple[str, ...]) -> list[np.ndarray]:
    """Run the torch model on the validation set; a failure means the set does not fit the model."""
    try:
        outputs = run_torch(module, inputs)
    except Exception as exc:  # any forward failure on these inputs is a mismatch between set and model
        shapes = {k: f"{v.dtype}{list(v.shape)}" for k, v in inputs.items()}
        raise BuildInputError("validation", f"the model does not accept the validation inputs {shapes}: {exc}") from exc
    if len(outputs) < len(output_names):
        raise BuildInputError(
            "validation", f"the model returns {len(outputs)} outputs, {len(output_names)} output names given"
        )
    return outputs[: len(output_names)]


def export_onnx(
    module: torch.nn.Module,
    example: Arrays,
    path: Path,
    *,
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int = 17,
) -> Path:
    """Export with the TorchScript exporter, whose graphs ORT's optimizer fuses (Attention etc.)."""
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example.values())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(example),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        onnx.checker.check_model(str(path))
    except Exception as exc:  # the exporter raises many error types; all mean "does not export"
        raise ExportError("export", f"{type(exc).__name__}: {exc}") from exc
    logger.info("exported %s (opset %d)", path.name, opset)
    return path


def check_against(
    path: Path,
    inputs: Arrays,
    reference: list[np.ndarray],
    output_names: tuple[str, ...],
    *,
    step: str,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> None:
    """Run the ONNX model on ONNX Runtime and raise OutputMismatchError if it disagrees with torch."""
    try:
        session = make_session(path)
        outputs = run_onnx(session, inputs)
    except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
        raise ExportError(step, f"ONNX Runtime cannot run {path.name}: {exc}") from exc
    for name, got, want in zip(output_names, outputs, reference, strict=False):
        if got.shape != want.shape:
            raise ExportError(step, f"output {name!r} has shape {got.shape}, torch gives {want.shape}")
        diff = np.abs(got - want)
        excess = diff - (atol + rtol * np.abs(want))
        if np.any(excess > 0):
            worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
            raise OutputMismatchError(step, name, float(diff[worst]), worst, atol)

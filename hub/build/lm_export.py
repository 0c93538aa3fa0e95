"""Export a causal LM checkpoint with a KV cache, one folder per target.

The primary exporter is ONNX Runtime GenAI's model builder (fused GroupQueryAttention with
rotary, SkipSimplifiedLayerNorm, MatMulNBits weight-only int4/int8: the fastest graph measured
on this machine). It needs transformers 5 and onnxruntime >= 1.31 while the hub pins
transformers < 4.58 (optimum-onnx) and onnxruntime < 1.29, so it runs in its own virtual
environment as a subprocess (`builder_python`). `GlmForCausalLM` is built with the builder's
ChatGLM support by relabelling `architectures` (same layout: fused gate/up, partial rotary 0.5,
interleaved rotary); the gate's torch-vs-ONNX greedy parity check decides whether that holds.
Where the builder cannot build a model, optimum's `text-generation-with-past` export (in the
hub's own environment) is the fallback, with ORT's MatMulNBits quantizer for int4/int8.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.build.errors import TargetBuildError
from shared.targets import TargetId

__all__ = [
    "BUILDER_ENV",
    "EXPORTS",
    "BuiltFolder",
    "ExportJob",
    "builder_python",
    "export_optimum",
    "prepare_source",
    "run_builder",
]

logger = logging.getLogger(__name__)

BUILDER_ENV = "AUTODL_LM_BUILDER_PYTHON"
_DRIVER = Path(__file__).with_name("lm_builder_driver.py")
# What the builder makes per target: precision and execution provider.
EXPORTS: dict[TargetId, tuple[str, str]] = {
    TargetId.CPU_INT4: ("int4", "cpu"),
    TargetId.CPU_INT8: ("int8", "cpu"),
    TargetId.CPU_FP32: ("fp32", "cpu"),
    TargetId.CUDA_FP16: ("fp16", "cuda"),
    TargetId.CUDA_INT4: ("int4", "cuda"),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def builder_python(explicit: Path | None = None) -> Path:
    """Return the builder environment's python: `explicit`, $AUTODL_LM_BUILDER_PYTHON, or <repo>/.venv-builder."""
    candidates = [explicit] if explicit is not None else []
    if os.environ.get(BUILDER_ENV):
        candidates.append(Path(os.environ[BUILDER_ENV]))
    candidates.append(Path(__file__).resolve().parents[2] / ".venv-builder" / "bin" / "python")
    for path in candidates:
        if path is not None and path.is_file():
            return path
    raise TargetBuildError(
        "export",
        "builder",
        f"no model-builder environment at {candidates[-1]} (`make install` creates it; or set {BUILDER_ENV})",
    )


@dataclass(frozen=True)
class ExportJob:
    """One builder run: a target's precision and provider, and extra builder options."""

    target: TargetId
    output: Path
    extra_options: dict[str, str] = field(default_factory=dict)
    source: Path | None = None  # this job's checkpoint folder, when not the run's

    @property
    def precision(self) -> str:
        """Return the builder's precision (int4, int8, fp32, fp16)."""
        return EXPORTS[self.target][0]

    @property
    def execution_provider(self) -> str:
        """Return the builder's execution provider (cpu, cuda)."""
        return EXPORTS[self.target][1]


@dataclass(frozen=True)
class BuiltFolder:
    """A variant folder as exported, or why it could not be."""

    job: ExportJob
    folder: Path | None
    error: str | None = None
    seconds: float = 0.0
    exporter: str = "onnxruntime-genai model builder"


def prepare_source(checkpoint: Path, workdir: Path) -> tuple[Path, str | None]:
    """Return the folder to build from, and the relabel applied (GLM -> ChatGLMModel) if any."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    if (config.get("architectures") or [""])[0] != "GlmForCausalLM":
        return checkpoint, None
    # The builder knows GLM's layout as the remote-code ChatGLM one; give it that name on a copy
    # whose weights are links to the originals.
    source = workdir / "source-chatglm"
    if source.exists():
        shutil.rmtree(source)
    source.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.is_file() and item.name != "config.json":
            (source / item.name).symlink_to(item.resolve())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["ChatGLMModel"]}, indent=2))
    return source, "ChatGLMModel"


def run_builder(
    source: Path,
    jobs: list[ExportJob],
    workdir: Path,
    *,
    python: Path | None = None,
    timeout: float = 3600,
) -> list[BuiltFolder]:
    """Build every job in one builder process; a job that fails is returned with its error."""
    if not jobs:
        return []
    interpreter = builder_python(python)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = [
        {
            "target": job.target.value,
            "input": str(job.source or source),
            "output": str(job.output),
            "precision": job.precision,
            "execution_provider": job.execution_provider,
            "cache_dir": str(workdir / "builder-cache"),
            "extra_options": job.extra_options,
        }
        for job in jobs
    ]
    jobs_file, results_file, log_file = (
        workdir / "builder-jobs.json",
        workdir / "builder-results.json",
        workdir / "builder.log",
    )
    jobs_file.write_text(json.dumps(spec, indent=2))
    results_file.unlink(missing_ok=True)
    # Offline: the builder must read only the local folder, never reach the Hugging Face Hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    with log_file.open("w") as log:
        try:
            proc = subprocess.run(
                [str(interpreter), str(_DRIVER), str(jobs_file), str(results_file)],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise TargetBuildError(
                "export", "builder", f"the model builder ran over {timeout:.0f} s; log: {log_file}"
            ) from exc
    results: list[dict[str, Any]] = json.loads(results_file.read_text()) if results_file.is_file() else []
    by_target = {r["target"]: r for r in results}
    out = []
    for job in jobs:
        result = by_target.get(job.target.value)
        if result is None:
            tail = log_file.read_text(errors="replace")[-1500:]
            out.append(BuiltFolder(job, None, f"the builder exited {proc.returncode} before this target: {tail}"))
        elif not result["ok"]:
            out.append(BuiltFolder(job, None, str(result["error"])[:1500], float(result["seconds"])))
        else:
            out.append(BuiltFolder(job, job.output, None, float(result["seconds"])))
    return out


def restore_tokenizer(checkpoint: Path, folder: Path) -> None:
    """Put the checkpoint's own tokenizer files in the variant folder.

    The builder re-saves the tokenizer with transformers 5; the checkpoint's files are the ones
    torch was measured with, and the agent reads tokenizer.json with `tokenizers` directly.
    """
    for name in _TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, folder / name)


def export_optimum(checkpoint: Path, output: Path, precision: str, *, block_size: int = 32) -> Path:
    """Fallback: optimum's text-generation-with-past export, then MatMulNBits for int4/int8."""
    from optimum.exporters.onnx import main_export

    fp32 = output.parent / (output.name + "-optimum-fp32")
    if not (fp32 / "model.onnx").is_file():
        try:
            main_export(str(checkpoint), output=str(fp32), task="text-generation-with-past", no_post_process=True)
        except Exception as exc:  # optimum raises many types for unsupported models
            raise TargetBuildError("export", precision, f"optimum cannot export the model either: {exc}") from exc
    output.mkdir(parents=True, exist_ok=True)
    if precision in ("fp32", "fp16"):
        for item in fp32.iterdir():
            shutil.copyfile(item, output / item.name)
        if precision == "fp16":
            from hub.build import quantize

            quantize.fp16(fp32 / "model.onnx", output / "model.onnx", target="cuda-fp16")
        return output
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32 / "model.onnx"))
    quantizer = MatMulNBitsQuantizer(
        model, bits=4 if precision == "int4" else 8, block_size=block_size, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    for item in fp32.iterdir():
        if not item.name.startswith("model.onnx"):
            shutil.copyfile(item, output / item.name)
    quantizer.model.save_model_to_file(str(output / "model.onnx"), use_external_data_format=True)
    return output

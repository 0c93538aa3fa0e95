"""The build: load, export, check, optimize, quantize per target, gate, package.

Nothing is registered here: `build` returns an unsigned manifest and its files, and
`BuildResult.publish` hands both to the registry in one transaction, so a failed build
leaves nothing half-registered.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from hub.build import gate, package, quantize
from hub.build.errors import BuildError, TargetBuildError
from hub.build.export import check_against, export_onnx, reference_outputs
from hub.build.loader import load_model, transformer_shape
from hub.build.optimize import optimize
from hub.build.request import BuildRequest
from hub.build.runner import make_session, run_onnx, session_feed
from hub.build.sensitivity import exclusion_steps, rank_nodes
from hub.build.targets import Recipe, recipe_for
from shared import tracing
from shared.manifest import Manifest, Preprocessing, VariantMetrics
from shared.targets import TargetId

if TYPE_CHECKING:
    pass

__all__ = ["BuildRequest", "BuildResult", "GateEntry", "Progress", "build"]

logger = logging.getLogger(__name__)

Progress = Callable[[str, str], None]
TOKENIZER_FILE = "tokenizer.json"
_FILE_NAMES = {"fp32": "model.onnx", "int8-cpu": "model-int8.onnx", "fp16": "model-fp16.onnx",
               "int8-tensorrt": "model-int8-qdq-trt.onnx"}  # fmt: skip


@dataclass(frozen=True)
class GateEntry:
    """One target's measurement, the gate's decision, and how it was made."""

    measurement: gate.Measurement
    decision: gate.Decision
    recipe: dict[str, Any]


@dataclass(frozen=True)
class BuildResult:
    """An unsigned manifest, the files it references, and the gate's report."""

    manifest: Manifest
    files: dict[str, Path]
    report: list[GateEntry]
    fused: dict[str, int] = field(default_factory=dict)
    torch_latency_ms: float | None = None


@dataclass
class _Context:
    request: BuildRequest
    module: torch.nn.Module
    workdir: Path
    reference: list[np.ndarray]
    exported: Path
    optimized: Path
    progress: Progress
    calibration_note: str = "calibration set"
    shaped: Path | None = None
    preprocessed: Path | None = None

    def static_source(self, target: str) -> Path:
        if self.preprocessed is None:
            self.preprocessed = quantize.preprocess(self.exported, self.workdir / "exported-pre.onnx", target)
        return self.preprocessed

    @property
    def calibration(self) -> dict[str, np.ndarray]:
        return self.request.calibration if self.request.calibration is not None else self.request.validation


@dataclass
class _Artifact:
    path: Path
    recipe: dict[str, Any]
    measurement: gate.Measurement
    outputs: list[np.ndarray] | None = None


def _quiet(step: str, detail: str) -> None:
    logger.info("%s: %s", step, detail)


@tracing.traced("hub.build")
def build(request: BuildRequest, workdir: Path, progress: Progress | None = None) -> BuildResult:
    """Build every requested target, gate it, and return the manifest and files to register."""
    say = progress or _quiet
    workdir.mkdir(parents=True, exist_ok=True)
    request = _resolve(request, say)
    module = request.model
    say("validation", f"running torch on {request.size} validation examples")
    reference = reference_outputs(module, request.validation, request.output_names)
    example = {k: v[: min(2, request.size)] for k, v in request.validation.items()}
    say("export", f"torch -> ONNX opset {request.opset}")
    exported = export_onnx(
        module, example, workdir / "exported.onnx", output_names=request.output_names,
        dynamic_axes=request.axes(), opset=request.opset,
    )  # fmt: skip
    check_against(exported, request.validation, reference, request.output_names, step="export")
    say("optimize", "transformer fusions" if request.transformer else "ORT_ENABLE_EXTENDED")
    optimized = workdir / "model.onnx"
    fused = optimize(exported, optimized, request.transformer)
    check_against(optimized, request.validation, reference, request.output_names, step="optimize", atol=1e-3)
    ctx = _Context(request, module, workdir, reference, exported, optimized, say)
    if request.calibration is None:
        ctx.calibration_note = "validation set (no calibration set given)"

    artifacts: dict[TargetId, _Artifact] = {}
    for target in request.targets:
        recipe = recipe_for(target)
        shared_with = recipe.shares_artifact_with
        if shared_with is not None and shared_with in artifacts:
            artifacts[target] = replace(
                artifacts[shared_with], measurement=replace(artifacts[shared_with].measurement, target=target)
            )
            continue
        say(f"build {target.value}", recipe.method)
        artifacts[target] = _build_target(ctx, recipe)

    say("measure", f"latency of {sum(recipe_for(t).measurable_here for t in artifacts)} CPU variants, batch 1")
    torch_ms = _measure_latency(ctx, artifacts)
    policy = gate.Policy(request.max_accuracy_drop, request.min_cosine, request.min_speedup)
    measurable = {t: recipe_for(t).measurable_here for t in artifacts}
    decisions = gate.decide({t: a.measurement for t, a in artifacts.items()}, measurable, policy)
    for target, decision in decisions.items():
        say("gate", f"{target.value}: {'publish' if decision.published else 'skip'} ({decision.reason})")
    say("package", "manifest and files")
    return _package(ctx, artifacts, decisions, fused, torch_ms)


def _resolve(request: BuildRequest, say: Progress) -> BuildRequest:
    """Load the model if a path was given and fill in what its directory says."""
    model = request.model
    if isinstance(model, torch.nn.Module):
        return request if request.transformer else replace(request, transformer=transformer_shape(model))
    if not isinstance(model, str | Path):
        raise BuildError("load", f"model must be a torch.nn.Module or a path, not {type(model).__name__}")
    say("load", str(model))
    loaded = load_model(Path(model))
    return replace(
        request,
        model=loaded.module,
        transformer=request.transformer or loaded.transformer,
        tokenizer_file=request.tokenizer_file or loaded.tokenizer_file,
        class_names=request.class_names or loaded.class_names,
    )


def _file(ctx: _Context, recipe: Recipe) -> Path:
    return ctx.workdir / _FILE_NAMES[recipe.method]


def _make(ctx: _Context, recipe: Recipe, dest: Path, exclude: list[str]) -> tuple[Path, dict[str, Any]]:
    """Run a recipe once; return the artifact and what was done."""
    target = recipe.target.value
    if recipe.method == "fp32":
        return ctx.optimized, {
            "graph": "ort-transformer-optimizer" if ctx.request.transformer else "ORT_ENABLE_EXTENDED"
        }
    if recipe.method == "fp16":
        # Transformer graphs keep ORT's fused ops (CUDA has fp16 kernels for them);
        # other graphs convert from the plain export.
        source = ctx.optimized if ctx.request.transformer else ctx.exported
        return quantize.fp16(source, dest, target=target), {"method": "float16", "keep_io_types": True}
    if recipe.method == "int8-tensorrt":
        cache = ctx.workdir / "calibration-trt.json"
        source = ctx.static_source(target)
        quantize.static_int8(source, dest, ctx.calibration, target=target, tensorrt=True, exclude=exclude, cache=cache)
        return dest, {
            "method": "static QDQ INT8, symmetric signed activations and per-channel weights (TensorRT)",
            "calibration": ctx.calibration_note,
            "calibration_table": quantize.calibration_table(cache),
        }
    if not ctx.request.transformer:
        # Conv nets and MLPs: static QDQ (ORT's dynamic quantizer skips Gemm, so an MLP would stay fp32).
        cache = ctx.workdir / "calibration-cpu.json"
        source = ctx.static_source(target)
        quantize.static_int8(source, dest, ctx.calibration, target=target, exclude=exclude, cache=cache)
        return dest, {
            "method": "static QDQ INT8, u8 activations, s8 per-channel weights",
            "calibration": ctx.calibration_note,
        }
    if ctx.shaped is None:
        ctx.shaped = quantize.infer_shapes(ctx.optimized, ctx.workdir / "model-shaped.onnx", target)
    quantize.dynamic_int8(ctx.shaped, dest, exclude=exclude, target=target)
    return dest, {
        "method": "dynamic INT8, s8 per-channel weights",
        "graph": "fused" if ctx.request.transformer else "optimized",
    }


def _score(ctx: _Context, recipe: Recipe, path: Path) -> tuple[gate.Measurement, list[np.ndarray] | None]:
    """Measure the task metric on CPU; GPU-only artifacts may not run here (value None)."""
    try:
        outputs = run_onnx(make_session(path, threads=max(ctx.request.threads, 1)), ctx.request.validation)
    except Exception as exc:  # fp16 graphs may lack CPU kernels; any other failure is a build error
        if recipe.measurable_here:
            raise TargetBuildError("measure", recipe.target.value, f"ONNX Runtime cannot run it: {exc}") from exc
        metric = "accuracy" if ctx.request.labels is not None and ctx.request.task == "classification" else "cosine_min"
        return gate.Measurement(recipe.target, metric, None, 1.0), None
    m = gate.score(recipe.target, ctx.request.task, outputs, ctx.reference, ctx.request.labels)
    return m, outputs


def _mean_error(ctx: _Context, path: Path, rows: int = 32) -> float:
    # Ranking needs only the order of nodes, so a slice of the validation set is enough.
    subset = {k: v[:rows] for k, v in ctx.request.validation.items()}
    outputs = run_onnx(make_session(path, threads=max(ctx.request.threads, 1)), subset)
    return 1.0 - float(gate.cosine_rows(outputs[0], ctx.reference[0][:rows]).mean())


@tracing.traced("hub.build.target")
def _build_target(ctx: _Context, recipe: Recipe) -> _Artifact:
    """Build, check and score one target; for INT8, retry without the most sensitive nodes."""
    dest = _file(ctx, recipe)
    path, details = _make(ctx, recipe, dest, [])
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # the checker raises ValidationError and friends
        raise TargetBuildError("onnx-check", recipe.target.value, str(exc)) from exc
    quantize.verify_precision(path, recipe.precision, recipe.target.value)
    measurement, outputs = _score(ctx, recipe, path)
    policy = gate.Policy(ctx.request.max_accuracy_drop, ctx.request.min_cosine)
    ok, why = gate.accuracy_ok(measurement, policy)
    details = {"opset": ctx.request.opset, **details}
    if ok or recipe.precision != "int8" or ctx.request.max_excluded_nodes == 0:
        return _Artifact(path, details, measurement, outputs)

    ctx.progress(f"build {recipe.target.value}", f"{why}; measuring node sensitivity")
    op_types = ("Conv", "MatMul", "Gemm", "Attention")
    static = recipe.method == "int8-tensorrt" or not ctx.request.transformer
    source = ctx.static_source(recipe.target.value) if static else (ctx.shaped or ctx.optimized)
    candidates = quantize.quantizable_nodes(source, op_types)
    probe = ctx.workdir / "probe.onnx"
    ranked = rank_nodes(
        candidates,
        lambda node: _make(ctx, recipe, probe, [c for c in candidates if c != node])[0],
        lambda p: _mean_error(ctx, p),
    )
    details["first_try"] = why
    details["sensitivity"] = {s.node: round(s.error, 6) for s in ranked[:10]}
    for k in exclusion_steps(ctx.request.max_excluded_nodes, len(ranked)):
        excluded = [s.node for s in ranked[:k]]
        path, extra = _make(ctx, recipe, dest, excluded)
        measurement, outputs = _score(ctx, recipe, path)
        ok, why = gate.accuracy_ok(measurement, policy)
        ctx.progress(f"build {recipe.target.value}", f"excluding {k} node(s): {why}")
        details.update(extra, excluded_nodes=excluded)
        if ok:
            break
    return _Artifact(path, details, measurement, outputs)


def _measure_latency(ctx: _Context, artifacts: dict[TargetId, _Artifact]) -> float | None:
    """Median batch-1 latency of torch and every CPU variant, runs interleaved."""
    request = ctx.request
    row = {k: v[:1] for k, v in request.validation.items()}
    runners: dict[str, Callable[[], object]] = {}
    for target, art in artifacts.items():
        if recipe_for(target).measurable_here:
            runners[target.value] = _onnx_runner(art.path, row, request.threads)
    tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in row.values()]
    runners["torch"] = lambda: ctx.module(*tensors)
    previous = torch.get_num_threads()
    torch.set_num_threads(request.threads)
    try:
        with torch.inference_mode():
            medians = gate.measure_latency(runners, runs=request.latency_runs, warmup=request.warmup_runs)
    finally:
        torch.set_num_threads(previous)
    for target, art in artifacts.items():
        if target.value in medians:
            art.measurement = replace(art.measurement, latency_ms=round(medians[target.value], 4))
    return round(medians["torch"], 4)


def _onnx_runner(path: Path, row: dict[str, np.ndarray], threads: int) -> Callable[[], object]:
    session = make_session(path, threads=threads)
    feed = session_feed(session, row, slice(0, 1))
    return lambda: session.run(None, feed)


@tracing.traced("hub.build.package")
def _package(
    ctx: _Context,
    artifacts: dict[TargetId, _Artifact],
    decisions: dict[TargetId, gate.Decision],
    fused: dict[str, int],
    torch_ms: float | None,
) -> BuildResult:
    request = ctx.request
    shapes = {name: tuple(ref.shape[1:]) for name, ref in zip(request.output_names, ctx.reference, strict=False)}
    inputs, outputs = package.tensor_specs(artifacts[TargetId.CPU_FP32].path, shapes)
    row = _sample_row(ctx, artifacts, decisions)
    sample_in = {k: v[row : row + 1] for k, v in request.validation.items()}
    sample_out = {name: ref[row : row + 1] for name, ref in zip(request.output_names, ctx.reference, strict=False)}
    files: dict[str, Path] = {}
    variants, skipped, report = [], [], []
    for target, art in artifacts.items():
        recipe, decision, m = recipe_for(target), decisions[target], art.measurement
        report.append(GateEntry(m, decision, art.recipe))
        if not decision.published:
            skipped.append(package.skipped(target, decision.reason))
            continue
        file_name = _FILE_NAMES[recipe.method]
        files[file_name] = art.path
        metrics = VariantMetrics(
            metric=m.metric, value=m.value, reference=m.reference, latency_ms=m.latency_ms,
            latency_note=None if recipe.measurable_here else gate.UNMEASURED,
        )  # fmt: skip
        sample = package.sample_for(
            sample_in, sample_out, precision=recipe.precision, task=request.task, min_cosine=request.min_cosine
        )
        variants.append(
            package.variant_entry(
                target,
                recipe.precision,
                recipe.providers,
                file_name,
                art.path,
                metrics,
                sample,
                {**art.recipe, "gate": decision.reason},
                package.batching_for(inputs, outputs, art.recipe),
            )  # fmt: skip
        )
    preprocessing = request.preprocessing
    if request.tokenizer_file is not None:
        text = package.text_preprocessing(Path(request.tokenizer_file), request.max_length)
        preprocessing = Preprocessing(type="text", text=text)
        files[TOKENIZER_FILE] = Path(request.tokenizer_file)
    fp32 = artifacts[TargetId.CPU_FP32].measurement
    totals = {**request.metrics, f"torch_{fp32.metric}": fp32.reference}
    if torch_ms is not None:
        totals["torch_latency_ms"] = torch_ms
    manifest = package.manifest(
        name=request.name, version=request.version, task=request.task, inputs=inputs, outputs=outputs,
        preprocessing=preprocessing, postprocessing=request.postprocessing, labels=request.class_names,
        sample=package.sample_for(sample_in, sample_out, precision="fp32", task=request.task, min_cosine=1.0),
        metrics=totals, variants=variants, skipped=skipped,
        lineage={**request.lineage, "builder": "hub.build", "torch": torch.__version__,
                 "onnxruntime": ort.__version__, "onnx": onnx.__version__, "fused_ops": fused},
    )  # fmt: skip
    # Copy the files out of the scratch names so a later build in the same workdir cannot change them.
    final = ctx.workdir / "artifacts"
    final.mkdir(exist_ok=True)
    kept = {}
    for name, path in files.items():
        kept[name] = final / name
        shutil.copyfile(path, kept[name])
    return BuildResult(manifest, kept, report, fused, torch_ms)


def _sample_row(ctx: _Context, artifacts: dict[TargetId, _Artifact], decisions: dict[TargetId, gate.Decision]) -> int:
    """Pick a validation row every published classifier variant labels like torch (a fair smoke test)."""
    if ctx.request.task != "classification":
        return 0
    want = ctx.reference[0].argmax(-1)
    agree = np.ones_like(want, dtype=bool)
    for target, art in artifacts.items():
        if decisions[target].published and art.outputs is not None:
            agree &= art.outputs[0].argmax(-1) == want
    rows = np.flatnonzero(agree)
    return int(rows[0]) if rows.size else 0

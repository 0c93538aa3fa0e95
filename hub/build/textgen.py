"""The text-generation build: torch reference, export per target, the gate, the manifest.

`build_text_generation` is the entry the training side calls with a checkpoint folder; it
returns the same `BuildResult` as the tensor pipeline (`BuildResult.publish` signs and
registers). Each published variant is a folder (graph, external weights, genai_config.json,
tokenizer, chat template) whose every file the manifest names with its sha256.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hub.build import gate, package
from hub.build.errors import BuildInputError, ExportError, TargetBuildError
from hub.build.lm_block_affine import BlockAffineStats, quantize_block_affine
from hub.build.lm_export import (
    EXPORTS,
    BuiltFolder,
    ExportJob,
    export_optimum,
    prepare_source,
    restore_tokenizer,
    run_builder,
)
from hub.build.lm_gate import UNMEASURED, LmMeasurement, measure_variant, quality_reason
from hub.build.lm_reference import TorchReference, chunk, eos_ids, load_causal_lm, load_tokenizer
from hub.build.pipeline import BuildResult, GateEntry, Progress
from hub.build.textgen_request import TextGenBuildRequest
from shared.generation import GenerationError, layout_from_genai_config, read_genai_config
from shared.manifest import (
    TEXT_GENERATION,
    GenerationSpec,
    KvCacheLayout,
    Manifest,
    SkippedVariant,
    Variant,
    VariantFile,
    VariantMetrics,
)
from shared.targets import TARGET_PROVIDERS, TargetId

__all__ = ["build_text_generation"]

logger = logging.getLogger(__name__)

_CPU = (TargetId.CPU_FP32, TargetId.CPU_INT8, TargetId.CPU_INT4)
_CUDA = (TargetId.CUDA_FP16, TargetId.CUDA_INT4)
# Mean distance of the weights from their int4 grid, in steps, below which they came from one.
_NEAR_GRID = 0.05
_MAX_PIECE = 512  # tokens per validation piece: perplexity needs no longer context, and prefill is O(n^2)


def _quiet(step: str, detail: str) -> None:
    logger.info("%s: %s", step, detail)


def _options(request: TextGenBuildRequest, target: TargetId, extra: dict[str, str] | None = None) -> dict[str, str]:
    precision, provider = EXPORTS[target]
    options: dict[str, str] = {}
    if precision in ("int4", "int8"):
        options["block_size"] = str(request.block_size)
        if provider == "cpu":
            options["accuracy_level"] = "4"  # int8 activations: MLAS's fastest MatMulNBits kernels
    return {**options, **(extra or {})}


def _spec(
    request: TextGenBuildRequest, folder: Path, reference: TorchReference, eos: list[int], context: int
) -> GenerationSpec:
    config = request.config
    genai = folder / "genai_config.json"
    if genai.is_file():
        layout = layout_from_genai_config(read_genai_config(folder))
    else:  # optimum's graph: names as the builder's, with position ids
        heads = int(config["num_attention_heads"])
        layout = KvCacheLayout(
            num_layers=int(config["num_hidden_layers"]),
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_size=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            position_ids="position_ids",
        )
    template = request.chat_template
    if template is None and (request.checkpoint / "chat_template.jinja").is_file():
        template = (request.checkpoint / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer_config = request.checkpoint / "tokenizer_config.json"
    if template is None and tokenizer_config.is_file():
        found = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template")
        template = found if isinstance(found, str) else None
    bos, pad = config.get("bos_token_id"), config.get("pad_token_id")
    return GenerationSpec(
        tokenizer_config_file="tokenizer_config.json" if tokenizer_config.is_file() else None,
        chat_template=template,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=eos,
        pad_token_id=pad if isinstance(pad, int) else None,
        context_length=context,
        vocab_size=int(config["vocab_size"]),
        defaults=request.defaults,
        kv_cache=layout,
        samples=reference.samples,
        parity_tokens=request.parity_tokens,
    )


def _finish_folder(request: TextGenBuildRequest, folder: Path, eos: list[int], context: int) -> None:
    """Give the folder the checkpoint's tokenizer and the true special tokens and context."""
    restore_tokenizer(request.checkpoint, folder)
    genai = folder / "genai_config.json"
    if not genai.is_file():
        return
    config = json.loads(genai.read_text())
    model = config["model"]
    # The ChatGLM builder forces bos 1; the checkpoint's own ids are the truth.
    model["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    if isinstance(request.config.get("bos_token_id"), int):
        model["bos_token_id"] = request.config["bos_token_id"]
    model["context_length"] = context
    config.setdefault("search", {})["max_length"] = context
    genai.write_text(json.dumps(config, indent=4))


def _build(
    request: TextGenBuildRequest,
    source: Path,
    workdir: Path,
    targets: list[TargetId],
    extra: dict[TargetId, dict[str, str]],
    tag: str,
) -> dict[TargetId, BuiltFolder]:
    jobs = [ExportJob(t, workdir / f"export-{tag}" / t.value, _options(request, t, extra.get(t))) for t in targets]
    return {b.job.target: b for b in run_builder(source, jobs, workdir, python=request.builder_python)}


def _fallback(request: TextGenBuildRequest, workdir: Path, target: TargetId, why: str) -> BuiltFolder:
    job = ExportJob(target, workdir / "export-optimum" / target.value)
    folder = export_optimum(request.checkpoint, job.output, job.precision, block_size=request.block_size)
    logger.warning("%s: the model builder failed (%s); exported with optimum", target.value, why)
    return BuiltFolder(job, folder, None, exporter="optimum text-generation-with-past")


def _block_affine(
    request: TextGenBuildRequest, fp32: BuiltFolder, workdir: Path, target: TargetId
) -> tuple[BuiltFolder, BlockAffineStats]:
    """The int4 retry: the fp32 graph's projections in int4 with a float minimum per block, head in int8."""
    options = {**_options(request, target), "method": "block-affine"}
    job = ExportJob(target, workdir / "export-block-affine" / target.value, options)
    if fp32.folder is None:
        raise TargetBuildError("export", target.value, "no cpu-fp32 graph to quantize")
    stats = quantize_block_affine(fp32.folder, job.output, block_size=request.block_size)
    logger.info(
        "block-affine int4: %d projections (weights %.3f of a step from a 16-level grid), %d int8 heads",
        stats.int4_matmuls, stats.grid_offset, stats.int8_matmuls,
    )  # fmt: skip
    return BuiltFolder(job, job.output, exporter=f"{fp32.exporter} (cpu-fp32) + block-affine int4"), stats


def build_text_generation(request: TextGenBuildRequest, workdir: Path, progress: Progress | None = None) -> BuildResult:
    """Export every requested target, gate it against torch, and return the manifest and files."""
    say = progress or _quiet
    workdir.mkdir(parents=True, exist_ok=True)
    config = request.config
    eos = eos_ids(request.checkpoint, config)
    if not eos:
        raise BuildInputError(
            "checkpoint", f"{request.checkpoint}: no eos_token_id in generation_config.json or config.json"
        )
    limit = int(config.get("max_position_embeddings") or 2048)
    context = request.context_length or limit
    tokenizer = load_tokenizer(request.checkpoint)
    sequences = [list(s) for s in request.validation_ids] + [tokenizer.encode(t).ids for t in request.validation_texts]
    pieces = chunk(sequences, min(context, _MAX_PIECE))
    if not pieces:
        raise BuildInputError("validation", "the validation data tokenize to no sequence of two or more tokens")
    prompts = [(text, tokenizer.encode(text).ids) for text in request.sample_prompts]
    if empty := [text for text, ids in prompts if not ids]:
        raise BuildInputError("request", f"sample prompt {empty[0]!r} tokenizes to nothing")
    say("reference", f"torch fp32: perplexity on {len(pieces)} pieces, greedy on {len(prompts)} prompts")
    model = load_causal_lm(request.checkpoint)
    reference = TorchReference.measure(model, pieces, prompts, max(request.parity_tokens, 1), eos)
    del model
    say("reference", f"perplexity {reference.perplexity:.4g}")

    source, relabel = prepare_source(request.checkpoint, workdir)
    relabel_failed = False
    cpu = [t for t in request.targets if t in _CPU]
    say("export", f"model builder: {', '.join(t.value for t in cpu)}" + (f" (as {relabel})" if relabel else ""))
    built = _build(request, source, workdir, cpu, {}, "builder")
    for target, item in list(built.items()):
        if item.folder is None:
            built[target] = _fallback(request, workdir, target, item.error or "")
    for item in built.values():
        assert item.folder is not None
        _finish_folder(request, item.folder, eos, context)
    spec = _spec(request, built[TargetId.CPU_FP32].folder or workdir, reference, eos, context)

    def measure(target: TargetId, item: BuiltFolder) -> LmMeasurement:
        assert item.folder is not None
        say("measure", f"{target.value}: perplexity, parity, decode speed ({item.exporter})")
        try:
            return measure_variant(
                target, item.folder, spec, pieces, reference.perplexity,
                threads=request.threads, decode_tokens=request.decode_tokens,
            )  # fmt: skip
        except GenerationError as exc:
            # A graph the loop cannot run fails the gate like a wrong one.
            return LmMeasurement(
                target, None, reference.perplexity, None, request.parity_tokens, None, note=str(exc)[:900]
            )

    measured = {TargetId.CPU_FP32: measure(TargetId.CPU_FP32, built[TargetId.CPU_FP32])}
    if (why := quality_reason(measured[TargetId.CPU_FP32], request.budget("fp32"))) is not None:
        if relabel is None:
            raise ExportError("gate", f"cpu-fp32 disagrees with torch: {why}")
        # The relabelled GLM graph is not GLM after all: export with optimum instead.
        say("export", f"{relabel} relabel failed the parity check ({why}); optimum for every CPU target")
        built = {t: _fallback(request, workdir, t, f"relabel to {relabel}: {why}") for t in cpu}
        for item in built.values():
            assert item.folder is not None
            _finish_folder(request, item.folder, eos, context)
        spec = _spec(request, built[TargetId.CPU_FP32].folder or workdir, reference, eos, context)
        measured = {TargetId.CPU_FP32: measure(TargetId.CPU_FP32, built[TargetId.CPU_FP32])}
        if (why := quality_reason(measured[TargetId.CPU_FP32], request.budget("fp32"))) is not None:
            raise ExportError("gate", f"cpu-fp32 disagrees with torch after the optimum export too: {why}")
        relabel, relabel_failed = None, True
    baseline = measured[TargetId.CPU_FP32].tokens_per_s or 0.0

    decisions: dict[TargetId, gate.Decision] = {
        TargetId.CPU_FP32: gate.Decision(TargetId.CPU_FP32, True, "baseline: parity and perplexity as torch")
    }
    attempts: dict[TargetId, list[dict[str, Any]]] = {}
    quality_failed: dict[TargetId, str] = {}
    builder_int4_failed: str | None = None  # why the builder's int4 failed, when block-affine passed instead
    for target in (t for t in cpu if t != TargetId.CPU_FP32):
        precision = EXPORTS[target][0]
        budget = request.budget(precision)
        measured[target] = measure(target, built[target])
        why = quality_reason(measured[target], budget, quantized=True)
        if why is not None and precision == "int4":
            first, tried = why, measured[target]
            attempts[target] = [
                {
                    "exporter": built[target].exporter,
                    "options": built[target].job.extra_options,
                    "perplexity_change": tried.change,
                    "parity_matched": tried.parity_matched,
                    "reason": why,
                }
            ]
            say("gate", f"{target.value}: {why}; retrying as block-affine int4 (a float minimum per block)")
            try:
                retry, stats = _block_affine(request, built[TargetId.CPU_FP32], workdir, target)
            except TargetBuildError as exc:
                why = f"{first}; block-affine int4 could not be built: {exc}"
            else:
                built[target], measured[target] = retry, measure(target, retry)
                why = quality_reason(measured[target], budget, quantized=True)
                builder_int4_failed = first if why is None else None
                if why is not None:
                    why = f"{first}; as block-affine int4: {why}"
                if why is not None and 0 < stats.grid_offset < _NEAR_GRID:
                    why += (
                        f" (the weights lie {stats.grid_offset:.1%} of a step off a 16-level grid: a quantized"
                        " checkpoint fine-tuned by less than a step, which int4 rounds back)"
                    )
        rate = measured[target].tokens_per_s or 0.0
        if why is not None:
            quality_failed[target] = why
            lower = "cpu-int8 or cpu-fp32" if precision == "int4" else "cpu-fp32"
            decisions[target] = gate.Decision(target, False, f"{why} (devices fall back to {lower})")
        elif rate < baseline * request.min_speedup:
            decisions[target] = gate.Decision(
                target, False, f"decode {rate:.1f} tokens/s is not faster than cpu-fp32's {baseline:.1f}"
            )
        else:
            change = measured[target].change or 0.0
            decisions[target] = gate.Decision(
                target,
                True,
                f"perplexity {change:+.2%} within {budget:.0%}, parity, {rate / max(baseline, 1e-9):.2f}x cpu-fp32",
            )

    cuda = [t for t in request.targets if t in _CUDA]
    if cuda:
        say("export", f"model builder: {', '.join(t.value for t in cuda)} (built here, not runnable: no GPU)")
        # The model builder is the only CUDA exporter here; a GLM whose relabel failed has none.
        jobs = {} if relabel_failed else _build(request, source, workdir, cuda, {}, "cuda")
        for target in cuda:
            export = jobs.get(target)
            if export is None or export.folder is None:
                why = export.error if export is not None else "the ChatGLM relabel failed the parity check"
                decisions[target] = gate.Decision(target, False, f"no CUDA export: {why}")
                continue
            if target == TargetId.CUDA_INT4 and TargetId.CPU_INT4 in quality_failed:
                reason = f"same quantization as cpu-int4, which failed: {quality_failed[TargetId.CPU_INT4]}"
                decisions[target] = gate.Decision(target, False, reason)
                continue
            if target == TargetId.CUDA_INT4 and builder_int4_failed is not None:
                reason = (
                    "cpu-int4 passed as block-affine int4, a CPU graph; the builder's int4, which CUDA gets, "
                    f"failed: {builder_int4_failed}"
                )
                decisions[target] = gate.Decision(target, False, reason)
                continue
            _finish_folder(request, export.folder, eos, context)
            built[target] = export
            note = UNMEASURED + (
                "; quality as measured for cpu-int4"
                if target == TargetId.CUDA_INT4 and TargetId.CPU_INT4 in measured
                else ""
            )
            measured[target] = LmMeasurement(
                target, None, reference.perplexity, None, request.parity_tokens, None, note=note
            )
            decisions[target] = gate.Decision(target, True, note)
    for target, decision in decisions.items():
        say("gate", f"{target.value}: {'publish' if decision.published else 'skip'} ({decision.reason})")
    say("package", "manifest and files")
    return _package(request, built, measured, decisions, spec, reference, relabel, attempts)


def _package(
    request: TextGenBuildRequest,
    built: dict[TargetId, BuiltFolder],
    measured: dict[TargetId, LmMeasurement],
    decisions: dict[TargetId, gate.Decision],
    spec: GenerationSpec,
    reference: TorchReference,
    relabel: str | None,
    attempts: dict[TargetId, list[dict[str, Any]]],
) -> BuildResult:
    files: dict[str, Path] = {}
    variants: list[Variant] = []
    skipped: list[SkippedVariant] = []
    report: list[GateEntry] = []
    for target in request.targets:
        decision = decisions.get(target)
        if decision is None:
            continue
        item, m = built.get(target), measured.get(target)
        precision, provider = EXPORTS[target]
        recipe: dict[str, Any] = {
            "exporter": item.exporter if item else None,
            "precision": precision,
            "execution_provider": provider,
            "options": item.job.extra_options if item else {},
            **({"relabel": relabel} if relabel else {}),
            **({"earlier_attempts": attempts[target]} if target in attempts else {}),
        }
        tokens_per_s = m.tokens_per_s if m else None
        latency = 1000 / tokens_per_s if tokens_per_s else None
        report.append(
            GateEntry(
                gate.Measurement(target, "perplexity", m.perplexity if m else None, reference.perplexity, latency),
                gate.Decision(target, decision.published, decision.reason),
                recipe,
            )
        )
        if not decision.published or item is None or item.folder is None or m is None:
            skipped.append(SkippedVariant(target=target, reason=decision.reason[:1000]))
            continue
        entries = []
        for path in sorted(p for p in item.folder.rglob("*") if p.is_file()):
            rel = f"{target.value}/{path.relative_to(item.folder).as_posix()}"
            size, sha = package.file_digest(path)
            entries.append(VariantFile(path=rel, size=size, sha256=sha))
            files[rel] = path
        graph = next(e for e in entries if e.path == f"{target.value}/model.onnx")
        variants.append(
            Variant(
                target=target,
                precision=precision,
                providers=list(TARGET_PROVIDERS[target]),
                file=graph.path,
                size=graph.size,
                sha256=graph.sha256,
                files=entries,
                metrics=VariantMetrics(
                    metric="perplexity",
                    value=m.perplexity,
                    reference=reference.perplexity,
                    latency_ms=latency,
                    latency_note=m.note,
                    generation=m.metrics(),
                ),
                recipe=recipe,
            )
        )
    fp32 = built[TargetId.CPU_FP32].folder
    assert fp32 is not None
    inputs, outputs = package.tensor_specs(fp32 / "model.onnx")
    metrics = {"perplexity": reference.perplexity, **request.metrics}
    metrics.update({f"candidate.{name}": score for name, score in request.candidate_scores.items()})
    lineage = {**request.lineage, "checkpoint": str(request.checkpoint), "candidates": dict(request.candidate_scores)}
    manifest = Manifest(
        name=request.name,
        version=request.version,
        task=TEXT_GENERATION,
        inputs=inputs,
        outputs=outputs,
        generation=spec,
        metrics=metrics,
        variants=variants,
        skipped=skipped,
        lineage=lineage,
    )
    return BuildResult(manifest=manifest, files=files, report=report)

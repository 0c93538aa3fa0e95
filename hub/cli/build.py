"""The ``autodl-hub build`` command: build, gate and register a model version.

Heavy imports (torch, onnxruntime) happen when the command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import numpy as np

    from hub.build.pipeline import BuildResult

__all__ = ["build_command", "load_arrays"]

logger = logging.getLogger(__name__)


def load_arrays(
    path: Path, *, tokenizer: Path | None, max_length: int, step: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read inputs (and optional `labels`) from .npz, or sentences (one per line) from .txt."""
    import numpy as np

    from hub.build.errors import BuildInputError
    from hub.build.loader import tokenize

    if not path.is_file():
        raise BuildInputError(step, f"{path} does not exist")
    if path.suffix == ".txt":
        if tokenizer is None:
            raise BuildInputError(step, f"{path} holds text but the model has no tokenizer.json")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise BuildInputError(step, f"{path} has no sentences")
        return tokenize(tokenizer, lines, max_length), None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise BuildInputError(step, f"{path} is not a readable .npz file: {exc}") from exc
    labels = arrays.pop("labels", None)
    return arrays, labels


def build_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="torch.save'd module, TorchScript file, or Hugging Face directory (a causal LM folder builds text generation)"
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="model name in the registry")],
    version: Annotated[str, typer.Option("--version", help="semantic version of this build")],
    validation: Annotated[
        Path,
        typer.Option(
            help=".npz of inputs by name (+ 'labels'), or .txt sentences for text models; "
            "for text generation a .txt file or a folder of text files (perplexity)"
        ),
    ],
    targets: Annotated[
        list[str] | None, typer.Option("--targets", help="target ids, repeated or comma-separated [default: all]")
    ] = None,
    calibration: Annotated[Path | None, typer.Option(help="calibration set, same format as --validation")] = None,
    task: Annotated[
        str | None, typer.Option(help="classification, embedding, regression or text-generation [default: guessed]")
    ] = None,
    output: Annotated[list[str] | None, typer.Option("--output", help="output tensor names, in order")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(help="largest accuracy loss a variant may have")] = 0.01,
    min_cosine: Annotated[float, typer.Option(help="smallest cosine to torch for embedding models")] = 0.98,
    threads: Annotated[int, typer.Option(help="threads for latency measurement")] = 1,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="text generation: sample prompt for the parity check, repeated")
    ] = None,
    parity_tokens: Annotated[int, typer.Option(help="text generation: greedy tokens that must equal torch's")] = 8,
    max_ppl_change: Annotated[
        list[str] | None,
        typer.Option("--max-ppl-change", help="text generation: PRECISION=FRACTION, e.g. int4=0.05 (repeated)"),
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="keep build files here [default: a temporary dir]")] = None,
    register: Annotated[bool, typer.Option("--register/--no-register", help="register with the hub")] = True,
    alias: Annotated[
        list[str] | None, typer.Option("--alias", help="point this alias (stable, ...) at the version; repeatable")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(envvar="AUTODL_HUB_DATA_DIR", help="hub data directory")] = None,
) -> None:
    """Build ONNX variants of a model, gate them by measurement, and register the version."""
    from hub.build.errors import BuildError
    from hub.errors import HubError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        lm = _is_causal_lm(model, task)

        def run(where: Path) -> BuildResult:
            if lm:
                return _run_text_generation(model, name, version, validation, targets, threads, prompt,
                                            parity_tokens, max_ppl_change, where)  # fmt: skip
            return _run(model, name, version, validation, targets, calibration, task, output, max_accuracy_drop,
                        min_cosine, threads, where)  # fmt: skip

        if workdir is not None:
            _finish(run(workdir), register, data_dir, workdir, alias or [])
        else:
            with tempfile.TemporaryDirectory(prefix=f"build-{name}-") as tmp:
                _finish(run(Path(tmp)), register, data_dir, None, alias or [])
    except (BuildError, HubError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _run(
    model: Path,
    name: str,
    version: str,
    validation: Path,
    targets: list[str] | None,
    calibration: Path | None,
    task: str | None,
    output: list[str] | None,
    max_accuracy_drop: float,
    min_cosine: float,
    threads: int,
    workdir: Path,
) -> BuildResult:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from hub.build.loader import load_model
    from hub.build.pipeline import build
    from hub.build.request import DEFAULT_TARGETS, BuildRequest, parse_targets

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        current = bar.add_task(f"load {model}", total=None)

        def say(step: str, detail: str) -> None:
            bar.update(current, description=f"[bold]{step}[/bold]: {detail}")
            console.log(f"{step}: {detail}")

        loaded = load_model(model)
        inputs, labels = load_arrays(
            validation, tokenizer=loaded.tokenizer_file, max_length=loaded.max_length, step="validation"
        )
        calib = None
        if calibration is not None:
            calib, _ = load_arrays(
                calibration, tokenizer=loaded.tokenizer_file, max_length=loaded.max_length, step="calibration"
            )
        request = BuildRequest(
            name=name,
            version=version,
            model=loaded.module,
            validation=inputs,
            task=task or loaded.task,
            labels=labels,
            calibration=calib,
            targets=parse_targets(targets) if targets else DEFAULT_TARGETS,
            max_accuracy_drop=max_accuracy_drop,
            min_cosine=min_cosine,
            output_names=tuple(output) if output else loaded.output_names,
            class_names=loaded.class_names,
            tokenizer_file=loaded.tokenizer_file,
            transformer=loaded.transformer,
            max_length=loaded.max_length,
            lineage={"source": loaded.source, "model_path": str(model)},
            threads=threads,
        )
        result = build(request, workdir, say)
        bar.update(current, description="[green]built[/green]")
    return result


def _is_causal_lm(model: Path, task: str | None) -> bool:
    """Whether the model is a text-generation checkpoint (a Hugging Face causal LM folder)."""
    if task is not None:
        return task == "text-generation"
    config = model / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def _validation_texts(path: Path) -> tuple[str, ...]:
    from hub.build.errors import BuildInputError

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".py", ".rst"))
    elif path.is_file():
        files = [path]
    else:
        raise BuildInputError("validation", f"{path} does not exist")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise BuildInputError("validation", f"{file}: not readable UTF-8 text: {exc}") from exc
    if not any(t.strip() for t in texts):
        raise BuildInputError("validation", f"{path} holds no text")
    return tuple(texts)


def _run_text_generation(
    model: Path,
    name: str,
    version: str,
    validation: Path,
    targets: list[str] | None,
    threads: int,
    prompts: list[str] | None,
    parity_tokens: int,
    budgets: list[str] | None,
    workdir: Path,
) -> BuildResult:
    from hub.build.errors import BuildInputError
    from hub.build.textgen import build_text_generation
    from hub.build.textgen_request import TextGenBuildRequest
    from shared.targets import GENERATION_TARGETS

    changes = {"int8": 0.01, "int4": 0.05, "fp32": 0.001}
    for item in budgets or []:
        precision, _, value = item.partition("=")
        try:
            changes[precision.strip()] = float(value)
        except ValueError as exc:
            raise BuildInputError("request", f"--max-ppl-change {item!r}: expected PRECISION=FRACTION") from exc
    extra: dict[str, Any] = {"sample_prompts": tuple(prompts)} if prompts else {}
    request = TextGenBuildRequest(
        name=name,
        version=version,
        checkpoint=model,
        validation_texts=_validation_texts(validation),
        targets=tuple(targets) if targets else GENERATION_TARGETS,  # type: ignore[arg-type]
        parity_tokens=parity_tokens,
        max_ppl_change=changes,
        threads=max(threads, 1),
        lineage={"source": "checkpoint", "model_path": str(model)},
        **extra,
    )

    def say(step: str, detail: str) -> None:
        typer.echo(f"{step}: {detail}", err=True)

    return build_text_generation(request, workdir, say)


def _finish(
    result: BuildResult, register: bool, data_dir: Path | None, workdir: Path | None, aliases: list[str]
) -> None:
    manifest = result.manifest
    for entry in result.report:
        m, d = entry.measurement, entry.decision
        latency = f"{m.latency_ms:.3f} ms" if m.latency_ms is not None else "unmeasured"
        value = f"{m.value:.4f}" if m.value is not None else "n/a"
        status = "published" if d.published else "skipped"
        typer.echo(f"  {m.target.value:16s} {status:9s} {m.metric} {value}  latency {latency}  ({d.reason})")
    if result.fused:
        typer.echo(f"  fused: {json.dumps(result.fused)}")
    if workdir is not None:
        (workdir / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    if not register:
        typer.echo(f"{manifest.name} {manifest.version} built, not registered")
        return
    from hub.cli.admin import load_settings
    from hub.db import create_engine_for, migrate
    from hub.registry import publish_build

    settings = load_settings(data_dir)
    engine = create_engine_for(settings)
    migrate(engine)
    from sqlmodel import Session

    with Session(engine, expire_on_commit=False) as session:
        registered = publish_build(session, settings, result, aliases, actor="cli")
        pointed = f", {', '.join(aliases)} -> {registered.version}" if aliases else ""
        typer.echo(f"{manifest.name} {registered.version} registered ({len(manifest.variants)} variants{pointed})")

"""A whole training job: task file -> trained model -> build -> registered version.

`run_training` is what ``autodl-hub train`` and ``POST /jobs`` call. The build goes
through ``hub.build.pipeline.build`` and the result is registered with
``hub.registry.publish_build``; the manifest's lineage records the data report, the
search, the CV scores and the task config.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.training.captured import CapturedRow
from hub.training.errors import DataError, TrainingError
from hub.training.progress import Progress
from hub.training.runner import TrainedModel, check_task, train_task
from hub.training.search import resolve_storage
from hub.training.spec import TaskSpec, load_spec, parse_spec
from shared import tracing

if TYPE_CHECKING:
    from sqlmodel import Session

    from hub.build.pipeline import BuildResult
    from hub.build.request import BuildRequest
    from hub.build.textgen_request import TextGenBuildRequest
    from hub.config import HubSettings
    from hub.training.lm_runner import TrainedLM

__all__ = [
    "TrainSummary",
    "build_request",
    "next_version",
    "run_training",
    "shared_search",
    "text_generation_request",
]

logger = logging.getLogger(__name__)

FIRST_VERSION = "0.1.0"


@dataclass(frozen=True)
class TrainSummary:
    """What a training job produced (the ``--json`` output and the job's result)."""

    model: str
    task: str
    metric: str
    dry_run: bool
    version: str | None = None
    test_metric: float | None = None
    cv_score: float | None = None
    baseline: float | None = None
    cv_baseline: float | None = None
    candidate: str | None = None
    published_targets: list[str] = field(default_factory=list)
    skipped_targets: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    data_report: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    candidate_scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-able data."""
        return {
            "model": self.model,
            "version": self.version,
            "task": self.task,
            "metric": self.metric,
            "test_metric": self.test_metric,
            "cv_score": self.cv_score,
            "baseline": self.baseline,
            "cv_baseline": self.cv_baseline,
            "candidate": self.candidate,
            "published_targets": self.published_targets,
            "skipped_targets": self.skipped_targets,
            "aliases": self.aliases,
            "dry_run": self.dry_run,
            "data_report": self.data_report,
            "plan": self.plan,
            "candidate_scores": self.candidate_scores,
        }


def next_version(session: Session, name: str) -> tuple[str, str | None]:
    """Return (the next patch version, the current latest) for model `name`."""
    from hub.registry import UnknownModelError, get_model, list_versions

    try:
        model = get_model(session, name)
    except UnknownModelError:
        return FIRST_VERSION, None
    versions = list_versions(session, model)
    if not versions:
        return FIRST_VERSION, None
    latest = versions[0].version
    major, minor, patch = (int(p) for p in latest.split("-")[0].split("+")[0].split("."))
    return f"{major}.{minor}.{patch + 1}", latest


def build_request(trained: TrainedModel, name: str, version: str, *, parent: str | None = None) -> BuildRequest:
    """Turn a trained model into a build request for ``hub.build.pipeline.build``."""
    from hub.build.request import BuildRequest, TransformerShape

    spec = trained.spec
    transformer = None
    encoder = getattr(trained.model, "encoder", None)
    config = getattr(encoder, "config", None)
    if config is not None and getattr(config, "model_type", None) is not None:
        transformer = TransformerShape(
            model_type="bert", num_heads=int(config.num_attention_heads), hidden_size=int(config.hidden_size)
        )
    lineage = dict(trained.lineage)
    if parent is not None:
        lineage["parent_version"] = parent
    return BuildRequest(
        name=name,
        version=version,
        model=trained.model,
        validation=trained.validation_inputs,
        # The gate scores classifiers by accuracy; other tasks by cosine against torch.
        task="classification" if spec.is_classification else "regression",
        labels=trained.validation_labels if spec.is_classification else None,
        calibration=trained.calibration_inputs,
        targets=tuple(spec.build.targets),
        max_accuracy_drop=spec.build.max_accuracy_drop,
        min_cosine=spec.build.min_cosine,
        output_names=(trained.output_name,),
        preprocessing=trained.preprocessing,
        postprocessing=trained.postprocessing,
        class_names=trained.labels,
        tokenizer_file=trained.tokenizer_path,
        transformer=transformer,
        metrics=trained.metrics,
        lineage=lineage,
        max_length=spec.model.max_length,
        threads=spec.resource.threads or 1,
    )


@tracing.traced("hub.training.job")
def run_training(
    task: Path | str,
    settings: HubSettings,
    *,
    base_dir: Path | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    actor: str = "training",
    study_name: str | None = None,
) -> TrainSummary:
    """Run a task file (a path, or YAML text with `base_dir`): train, build, publish.

    `study_name` (a worker's job) keeps a search of several trials in the hub database
    under that name, unless the task names its own storage: other workers can join it,
    and a re-queued job resumes it.
    """
    if isinstance(task, Path):
        spec = load_spec(task)
        base_dir = base_dir or task.parent
    else:
        base_dir = base_dir or Path.cwd()
        spec = parse_spec(task, source="task", base_dir=base_dir)
    if spec.task == "text-generation":
        return _run_text_generation(
            spec, base_dir, settings, dry_run=dry_run, progress=progress, cancel=cancel, actor=actor
        )
    spec = shared_search(spec, study_name)
    captured = captured_rows(spec, settings)
    if dry_run:
        plan = check_task(spec, base_dir, captured)
        return TrainSummary(
            model=spec.publish.model,
            task=spec.task,
            metric=spec.metric,
            dry_run=True,
            version=None if spec.publish.version == "auto" else spec.publish.version,
            data_report=plan.report.to_dict(),
            plan=plan.to_dict(),
        )
    storage = resolve_storage(spec.search.storage, settings.database_url)
    trained = train_task(spec, base_dir, storage=storage, cancel=cancel, progress=progress, captured=captured)
    return _build_and_publish(spec, trained, settings, progress=progress, cancel=cancel, actor=actor)


def shared_search(spec: TaskSpec, study_name: str | None) -> TaskSpec:
    """Return `spec` with its search in the hub database under `study_name`, when it can be shared."""
    # Text generation has its own search (search.run_lm_search); workers do not join it yet.
    if study_name is None or spec.search.trials < 2 or spec.search.storage is not None:
        return spec
    if spec.task == "text-generation":
        return spec
    search = spec.search.model_copy(update={"storage": "hub", "study_name": study_name})
    return spec.model_copy(update={"search": search})


def captured_rows(spec: TaskSpec, settings: HubSettings) -> list[CapturedRow]:
    """Return the labelled captured items the task asks for (`data.include_captured`), oldest first."""
    wanted = spec.data.include_captured
    if wanted is None:
        return []
    from sqlmodel import Session

    from hub.datasets.items import item_content, list_items
    from hub.db import create_engine_for, migrate

    engine = create_engine_for(settings)
    migrate(engine)
    try:
        with Session(engine) as session:
            rows, _ = list_items(session, wanted.model, labelled=True, limit=10_000_000)
            out = [CapturedRow(row.id, str(row.label), item_content(settings, row)) for row in reversed(rows)]
    finally:
        engine.dispose()
    if not out:
        raise DataError(f"data.include_captured: model {wanted.model!r} has no labelled captured items")
    return out


# Build one version: (name, version, parent version, working folder, progress callback) -> result.
_Build = Callable[[str, str, "str | None", Path, Callable[[str, str], None]], "BuildResult"]


def _build_and_register(
    spec: TaskSpec,
    settings: HubSettings,
    build: _Build,
    *,
    progress: Progress | None,
    cancel: threading.Event | None,
    actor: str,
) -> tuple[str, BuildResult]:
    """Pick the next version, build it in a temporary folder, and publish it with the task's aliases."""
    from sqlmodel import Session

    from hub.db import create_engine_for, migrate
    from hub.registry import publish_build

    engine = create_engine_for(settings)
    migrate(engine)
    name = spec.publish.model
    try:
        with Session(engine, expire_on_commit=False) as session:
            version, parent = next_version(session, name)
        if spec.publish.version != "auto":
            version = spec.publish.version

        def say(step: str, detail: str) -> None:
            if cancel is not None and cancel.is_set():
                raise TrainingError("cancelled during the build")
            if progress is not None:
                progress.message(f"build: {step}: {detail}")

        with tempfile.TemporaryDirectory(prefix=f"build-{name}-") as workdir:
            result = build(name, version, parent, Path(workdir), say)
            with Session(engine, expire_on_commit=False) as session:
                publish_build(session, settings, result, spec.publish.aliases, actor=actor)
    finally:
        engine.dispose()
    if progress is not None:
        progress.message(f"published {name} {version}: {', '.join(v.target.value for v in result.manifest.variants)}")
    return version, result


def _build_and_publish(
    spec: TaskSpec,
    trained: TrainedModel,
    settings: HubSettings,
    *,
    progress: Progress | None,
    cancel: threading.Event | None,
    actor: str,
) -> TrainSummary:
    from hub.build.pipeline import build

    version, result = _build_and_register(
        spec,
        settings,
        lambda name, version, parent, workdir, say: build(
            build_request(trained, name, version, parent=parent), workdir, say
        ),
        progress=progress,
        cancel=cancel,
        actor=actor,
    )
    lineage = trained.lineage
    return TrainSummary(
        model=spec.publish.model,
        task=spec.task,
        metric=spec.metric,
        dry_run=False,
        version=version,
        test_metric=trained.test_metric,
        cv_score=trained.cv_score,
        baseline=trained.baseline,
        cv_baseline=float(lineage["cv_baseline"]),
        candidate=str(lineage["candidate"]),
        published_targets=[v.target.value for v in result.manifest.variants],
        skipped_targets={s.target.value: s.reason for s in result.manifest.skipped},
        aliases=list(spec.publish.aliases),
        data_report=trained.report.to_dict(),
    )


def text_generation_request(
    trained: TrainedLM, name: str, version: str, *, parent: str | None = None
) -> TextGenBuildRequest:
    """Turn a trained language model into a build request for ``hub.build.textgen``."""
    from hub.build.textgen_request import TextGenBuildRequest
    from shared.manifest import GenerationDefaults
    from shared.targets import GENERATION_TARGETS

    spec = trained.spec
    generation = trained.generation
    lineage = dict(trained.lineage)
    if parent is not None:
        lineage["parent_version"] = parent
    targets = tuple(spec.build.targets) if "targets" in spec.build.model_fields_set else GENERATION_TARGETS
    return TextGenBuildRequest(
        name=name,
        version=version,
        checkpoint=trained.model_dir,
        validation_ids=tuple(tuple(int(t) for t in row) for row in trained.validation_ids),
        sample_prompts=tuple(trained.sample_prompts),
        parity_tokens=spec.build.parity_tokens,
        max_ppl_change={
            "fp32": 0.001,
            "int8": spec.build.max_ppl_increase_int8,
            "int4": spec.build.max_ppl_increase_int4,
        },
        targets=targets,
        defaults=GenerationDefaults(
            max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            top_p=generation.top_p,
            top_k=generation.top_k,
            stop=list(generation.stop),
        ),
        context_length=generation.context_length,
        chat_template=trained.chat_template,
        candidate_scores={s.name: s.val_perplexity for s in trained.candidates},
        metrics=dict(trained.metrics),
        lineage=lineage,
        threads=spec.resource.threads or 2,
    )


def _run_text_generation(
    spec: TaskSpec,
    base_dir: Path,
    settings: HubSettings,
    *,
    dry_run: bool,
    progress: Progress | None,
    cancel: threading.Event | None,
    actor: str,
) -> TrainSummary:
    """Train a text-generation task into a Hugging Face folder, then build and publish it."""
    from hub.training.lm_runner import check_text_generation, train_text_generation

    if dry_run:
        plan = check_text_generation(spec, base_dir)
        return TrainSummary(
            model=spec.publish.model,
            task=spec.task,
            metric="perplexity",
            dry_run=True,
            version=None if spec.publish.version == "auto" else spec.publish.version,
            data_report=plan.report.to_dict(),
            plan=plan.to_dict(),
        )
    storage = resolve_storage(spec.search.storage, settings.database_url)
    with tempfile.TemporaryDirectory(prefix=f"train-{spec.publish.model}-") as workdir:
        trained = train_text_generation(
            spec, base_dir, Path(workdir), storage=storage, cancel=cancel, progress=progress
        )
        published, skipped, version = _publish_text_generation(
            spec, trained, settings, progress=progress, cancel=cancel, actor=actor
        )
    return TrainSummary(
        model=spec.publish.model,
        task=spec.task,
        metric="perplexity",
        dry_run=False,
        version=version,
        test_metric=trained.val_perplexity,
        cv_score=min(s.val_perplexity for s in trained.candidates),
        baseline=trained.baseline_perplexity,
        cv_baseline=trained.baseline_perplexity,
        candidate=trained.chosen,
        published_targets=published,
        skipped_targets=skipped,
        aliases=list(spec.publish.aliases),
        data_report=trained.report.to_dict(),
        candidate_scores={s.name: s.val_perplexity for s in trained.candidates},
    )


def _publish_text_generation(
    spec: TaskSpec,
    trained: TrainedLM,
    settings: HubSettings,
    *,
    progress: Progress | None,
    cancel: threading.Event | None,
    actor: str,
) -> tuple[list[str], dict[str, str], str]:
    try:
        from hub.build.textgen import build_text_generation
    except ImportError as exc:
        raise TrainingError(f"the text-generation build (hub.build.textgen) is not installed: {exc}") from exc

    version, result = _build_and_register(
        spec,
        settings,
        lambda name, version, parent, workdir, say: build_text_generation(
            text_generation_request(trained, name, version, parent=parent), workdir, say
        ),
        progress=progress,
        cancel=cancel,
        actor=actor,
    )
    published = [v.target.value for v in result.manifest.variants]
    return published, {s.target.value: s.reason for s in result.manifest.skipped}, version

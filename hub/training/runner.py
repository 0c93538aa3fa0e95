"""Run a training task: data -> search -> retrain on all training rows -> test.

The result, `TrainedModel`, holds everything the build pipeline needs: the torch model,
held-out validation inputs and labels, calibration inputs, pre- and post-processing,
labels, metrics, and the lineage (data hash, quality report, search, CV scores, task).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hub.training.captured import CapturedRow
from hub.training.data import load_dataset, split_indices
from hub.training.dataset import Dataset, QualityReport
from hub.training.errors import DataError
from hub.training.metrics import baseline, score
from hub.training.progress import Progress
from hub.training.search import SearchResult, fit_config, run_search
from hub.training.spec import TaskSpec
from hub.training.trainer import choose_device, fit, predict
from hub.training.zoo import build_model, featurize, input_names, output_name, text_model_dir
from shared import tracing
from shared.manifest import ImagePreprocessing, Postprocessing, Preprocessing, TextPreprocessing

__all__ = ["Plan", "TrainedModel", "check_task", "join_search", "study_name_for", "train_task"]

logger = logging.getLogger(__name__)

CALIBRATION_ROWS = 128


@dataclass(frozen=True)
class Plan:
    """What a task would do, found without training (``--dry-run``)."""

    spec: TaskSpec
    report: QualityReport
    data_hash: str
    train_rows: int
    test_rows: int
    labels: tuple[str, ...] | None
    device: str

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as JSON-able data."""
        return {
            "task": self.spec.task,
            "model": self.spec.publish.model,
            "candidates": self.spec.model.candidates,
            "trials": self.spec.search.trials,
            "cv_folds": self.spec.search.cv_folds,
            "metric": self.spec.metric,
            "train_rows": self.train_rows,
            "test_rows": self.test_rows,
            "labels": list(self.labels) if self.labels else None,
            "device": self.device,
            "data_hash": self.data_hash,
            "data_report": self.report.to_dict(),
            "targets": [str(t) for t in self.spec.build.targets],
        }


@dataclass(frozen=True)
class TrainedModel:
    """A trained model and everything a build request needs."""

    spec: TaskSpec
    model: nn.Module  # on CPU, in eval mode
    input_names: tuple[str, ...]
    output_name: str
    validation_inputs: dict[str, np.ndarray]  # the held-out test rows
    validation_labels: np.ndarray
    calibration_inputs: dict[str, np.ndarray]
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    labels: list[str] | None
    test_metric: float
    cv_score: float
    baseline: float
    metrics: dict[str, float]
    lineage: dict[str, Any]
    search: SearchResult
    report: QualityReport
    tokenizer_path: Path | None = None


def study_name_for(spec: TaskSpec, data_hash: str) -> str:
    """Return a study name that workers on the same task and data share."""
    if spec.search.study_name:
        return spec.search.study_name
    settings = spec.model_dump(mode="json", include={"task", "model", "search", "training"})
    digest = hashlib.sha256((data_hash + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    return f"{spec.publish.model}-{digest[:12]}"


@tracing.traced("hub.training.prepare")
def _prepare(
    spec: TaskSpec, base_dir: Path, captured: Sequence[CapturedRow] = ()
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    if spec.resource.threads is not None:
        torch.set_num_threads(spec.resource.threads)
    dataset = load_dataset(spec, base_dir, captured)
    _check_memory(spec, dataset)
    train_rows, test_rows = split_indices(
        dataset.y, spec.data.validation_split, spec.training.seed, stratify=spec.is_classification
    )
    return dataset, train_rows, test_rows


def check_task(spec: TaskSpec, base_dir: Path, captured: Sequence[CapturedRow] = ()) -> Plan:
    """Load and check the data and report what training would do; train nothing."""
    dataset, train_rows, test_rows = _prepare(spec, base_dir, captured)
    device = "cuda" if spec.resource.use_gpu and torch.cuda.is_available() else "cpu"
    return Plan(spec, dataset.report, dataset.data_hash, len(train_rows), len(test_rows), dataset.labels, device)


def join_search(
    spec: TaskSpec,
    base_dir: Path,
    *,
    storage: str,
    sampler_seed: int,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Run trials of another worker's search (same data, split and study); train nothing else."""
    dataset, train_rows, _ = _prepare(spec, base_dir)
    device = choose_device(spec.resource.use_gpu)
    return run_search(
        spec,
        dataset.subset(train_rows),
        base_dir,
        device=device,
        storage=storage,
        study_name=study_name_for(spec, dataset.data_hash),
        cancel=cancel,
        progress=progress,
        sampler_seed=sampler_seed,
    )


@tracing.traced("hub.training.train")
def train_task(
    spec: TaskSpec,
    base_dir: Path,
    *,
    storage: str | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    captured: Sequence[CapturedRow] = (),
) -> TrainedModel:
    """Run the task: check data, search with CV, retrain the best on all training rows, test."""
    dataset, train_rows, test_rows = _prepare(spec, base_dir, captured)
    train_rows = _repeat_field_rows(spec, dataset, train_rows)
    train, test = dataset.subset(train_rows), dataset.subset(test_rows)
    device = choose_device(spec.resource.use_gpu)
    if device.type == "cuda" and spec.resource.max_memory_mb is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.resource.max_memory_mb * 2**20 / total), device)
    if progress is not None:
        progress.message(
            f"data: {dataset.report.rows_in} rows in, {len(train)} train / {len(test)} test, "
            f"{len(dataset.report.issues)} quality issues; training on {device.type}"
        )
    study = study_name_for(spec, dataset.data_hash)
    search = run_search(
        spec, train, base_dir, device=device, storage=storage, study_name=study, cancel=cancel, progress=progress
    )
    params = search.best.params
    candidate = search.candidate
    # Retrain on every training row for as many epochs as early stopping chose in CV.
    epochs = spec.training.epochs
    if spec.training.early_stopping is not None and search.best.best_epochs:
        epochs = max(1, int(round(float(np.median(search.best.best_epochs)))))
    inputs = featurize(train, candidate, spec, base_dir)
    model = build_model(candidate, train, spec, params, base_dir)
    fit(
        model,
        inputs,
        train.y,
        fit_config(spec, params, train, epochs=epochs),
        device=device,
        cancel=cancel,
        progress=progress,
        label=f"final {candidate}",
    )
    model = model.cpu().eval()
    test_inputs = featurize(test, candidate, spec, base_dir)
    test_metric = score(spec.metric, test.y, predict(model, test_inputs, device=torch.device("cpu")))
    trivial = baseline(spec.metric, train.y, test.y)
    cv_score = float(search.best.value if search.best.value is not None else float("nan"))
    if progress is not None:
        progress.message(
            f"{candidate}: cv {spec.metric} {cv_score:.4f} (baseline {search.baseline:.4f}), "
            f"test {spec.metric} {test_metric:.4f} (baseline {trivial:.4f})"
        )
    rng = np.random.default_rng(spec.training.seed)
    calibration_rows = np.sort(rng.choice(len(train), size=min(CALIBRATION_ROWS, len(train)), replace=False))
    calibration = {name: array[calibration_rows] for name, array in inputs.items()}
    preprocessing, tokenizer = _preprocessing(spec, dataset, candidate, base_dir)
    labels = list(dataset.labels) if dataset.labels else None
    postprocessing = (
        Postprocessing(output=output_name(spec.task), softmax=True, top_k=min(5, len(labels)), labels=labels)
        if labels
        else Postprocessing(output=output_name(spec.task))
    )
    metrics = {
        f"test_{spec.metric}": test_metric,
        f"cv_{spec.metric}": cv_score,
        f"baseline_{spec.metric}": trivial,
    }
    lineage = {
        "dataset_hash": dataset.data_hash,
        "data_path": spec.data.path,
        "data_report": dataset.report.to_dict(),
        "split": {"train_rows": len(train), "test_rows": len(test), "seed": spec.training.seed},
        "search": search.to_dict(),
        "cv_scores": list(search.best.fold_scores),
        "cv_score": cv_score,
        "cv_baseline": search.baseline,
        "candidate": candidate,
        "params": params,
        "final_epochs": epochs,
        "device": device.type,
        "training_config": spec.model_dump(mode="json"),
    }
    if captured:
        lineage["captured_items"] = sorted(row.id for row in captured)
    if spec.is_classification:
        lineage["ood"] = ood_reference(predict(model, inputs, device=torch.device("cpu")))
    return TrainedModel(
        spec=spec,
        model=model,
        input_names=input_names(spec.task),
        output_name=output_name(spec.task),
        validation_inputs=test_inputs,
        validation_labels=test.y,
        calibration_inputs=calibration,
        preprocessing=preprocessing,
        postprocessing=postprocessing,
        labels=labels,
        test_metric=test_metric,
        cv_score=cv_score,
        baseline=trivial,
        metrics=metrics,
        lineage=lineage,
        search=search,
        report=dataset.report,
        tokenizer_path=tokenizer,
    )


def _repeat_field_rows(spec: TaskSpec, dataset: Dataset, train_rows: np.ndarray) -> np.ndarray:
    """Repeat the training rows captured on devices `include_captured.repeat` times (never the test rows)."""
    wanted = spec.data.include_captured
    if wanted is None or wanted.repeat <= 1 or dataset.field is None:
        return train_rows
    field_rows = train_rows[dataset.field[train_rows]]
    return np.concatenate([train_rows, *([field_rows] * (wanted.repeat - 1))])


def ood_reference(outputs: np.ndarray) -> dict[str, Any]:
    """Return the centroid of the training outputs and their mean distance to it.

    A device's capture policy scores a request by its output's distance to this centroid in
    units of that spread (`max_ood_score`): far from everything seen in training means new.
    """
    rows = outputs.reshape(len(outputs), -1).astype(np.float64)
    centroid = rows.mean(axis=0)
    spread = float(np.linalg.norm(rows - centroid, axis=1).mean()) if len(rows) else 1.0
    return {"centroid": [round(float(v), 6) for v in centroid], "spread": max(spread, 1e-6)}


def _preprocessing(
    spec: TaskSpec, dataset: Dataset, candidate: str, base_dir: Path
) -> tuple[Preprocessing, Path | None]:
    if dataset.kind == "tabular":
        assert dataset.tabular is not None
        vocab = {name: list(words) for name, words in dataset.tabular.vocab.items()}
        return Preprocessing(type="tabular", features=list(dataset.tabular.features), categories=vocab or None), None
    if dataset.kind == "image":
        assert dataset.image is not None
        image = ImagePreprocessing(
            size=dataset.image.size,
            grayscale=dataset.image.channels == 1,
            mean=list(dataset.image.mean),
            std=list(dataset.image.std),
            scale=1 / 255,
            channels_first=True,
        )
        return Preprocessing(type="image", image=image), None
    tokenizer = text_model_dir(candidate, base_dir) / "tokenizer.json"
    raw = tokenizer.read_bytes()
    text = TextPreprocessing(
        tokenizer_sha256=hashlib.sha256(raw).hexdigest(), tokenizer_size=len(raw), max_length=spec.model.max_length
    )
    return Preprocessing(type="text", text=text), tokenizer


def _check_memory(spec: TaskSpec, dataset: Dataset) -> None:
    """Refuse data whose tensors alone exceed resource.max_memory_mb."""
    budget = spec.resource.max_memory_mb
    if budget is None or dataset.x is None:
        return
    # Inputs, their fold copies and the batch buffers: about four times the raw array.
    needed_mb = 4 * dataset.x.nbytes / 2**20
    if needed_mb > budget:
        raise DataError(f"resource.max_memory_mb: the data needs about {needed_mb:.0f} MB, the budget is {budget} MB")

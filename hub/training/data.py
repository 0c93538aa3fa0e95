"""Data for training: load a task's data set, check it can train, split it.

Loaders live next door (``tabular``, ``images``, ``texts``); each returns a `Dataset`
(`hub.training.dataset`) whose `QualityReport` records every defect found and what
cleaning did about it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hub.training.captured import CapturedRow
from hub.training.dataset import Dataset, ImageInfo, Issue, QualityReport, TabularInfo, hash_files, resolve_path
from hub.training.errors import DataError
from hub.training.images import load_images
from hub.training.spec import TaskSpec
from hub.training.tabular import load_tabular
from hub.training.texts import load_texts

__all__ = [
    "Dataset",
    "ImageInfo",
    "Issue",
    "QualityReport",
    "TabularInfo",
    "check_trainable",
    "hash_files",
    "load_dataset",
    "resolve_path",
    "split_indices",
]

logger = logging.getLogger(__name__)


def load_dataset(spec: TaskSpec, base_dir: Path, captured: Sequence[CapturedRow] = ()) -> Dataset:
    """Load, check and clean the task's data (plus `captured` rows from the field); raise DataError naming the field."""
    if spec.task.startswith("tabular"):
        dataset = load_tabular(spec, base_dir)
    elif spec.task == "image-classification":
        dataset = load_images(spec, base_dir, captured)
    else:
        dataset = load_texts(spec, base_dir, captured)
    check_trainable(dataset, spec)
    for issue in dataset.report.issues:
        logger.info(
            "data check %s%s: %s -> %s",
            issue.check,
            f" [{issue.column}]" if issue.column else "",
            issue.detail,
            issue.action,
        )
    return dataset


def check_trainable(dataset: Dataset, spec: TaskSpec) -> None:
    """Refuse data that cannot train: empty, one class, or classes too small to split."""
    if len(dataset) == 0:
        raise DataError(f"data.path: {spec.data.path!r} has no usable rows after cleaning")
    if not spec.is_classification:
        if len(dataset) < 2 * spec.search.cv_folds:
            raise DataError(f"data.path: {len(dataset)} rows are too few for search.cv_folds={spec.search.cv_folds}")
        return
    counts = np.bincount(dataset.y, minlength=len(dataset.labels or ()))
    present = [i for i, c in enumerate(counts) if c > 0]
    labels = dataset.labels or ()
    if len(present) < 2:
        only = labels[present[0]] if present else "none"
        field_name = "data.target" if dataset.kind != "image" else "data.path"
        raise DataError(f"{field_name}: a single class ({only!r}) after cleaning; classification needs at least 2")
    # Stratified k-fold on the training part needs every class in every fold.
    needed = int(np.ceil(spec.search.cv_folds / (1.0 - spec.data.validation_split))) + 1
    small = [f"{labels[i]!r} ({counts[i]})" for i in present if counts[i] < needed]
    if small:
        raise DataError(
            f"data.path: classes {', '.join(small)} have fewer than {needed} examples, too few for "
            f"search.cv_folds={spec.search.cv_folds} and data.validation_split={spec.data.validation_split}"
        )


def split_indices(y: np.ndarray, fraction: float, seed: int, *, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, test), stratified by class when asked."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    train, test = train_test_split(index, test_size=fraction, random_state=seed, stratify=y if stratify else None)
    return np.sort(train), np.sort(test)

"""The types every data loader shares: the loaded data set, its quality report, and file helpers.

`hub.training.data` dispatches to the loaders (``tabular``, ``images``, ``texts``); they and it
import these types from here, so no loader imports the module that calls it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "IMBALANCE_RATIO",
    "Dataset",
    "ImageInfo",
    "Issue",
    "QualityReport",
    "TabularInfo",
    "class_report",
    "hash_files",
    "resolve_path",
]

# A class this many times larger than the smallest one is reported as imbalance.
IMBALANCE_RATIO = 3.0


@dataclass(frozen=True)
class Issue:
    """One defect the quality check found, and what cleaning did about it."""

    check: str  # missing_values, duplicates, constant_column, out_of_range, label_imbalance, unreadable_file, ...
    count: int
    detail: str
    action: str
    column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the issue as JSON-able data."""
        return {
            "check": self.check,
            "column": self.column,
            "count": self.count,
            "detail": self.detail,
            "action": self.action,
        }


@dataclass(frozen=True)
class QualityReport:
    """What the data looked like and what cleaning changed."""

    rows_in: int
    rows_out: int
    issues: tuple[Issue, ...] = ()
    class_counts: dict[str, int] | None = None

    def count(self, check: str) -> int:
        """Return how many rows, values or files the named check flagged."""
        return sum(issue.count for issue in self.issues if issue.check == check)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-able data (it goes into the manifest's lineage)."""
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "issues": [issue.to_dict() for issue in self.issues],
            "class_counts": self.class_counts,
        }


@dataclass(frozen=True)
class TabularInfo:
    """Per-column facts the in-graph encoder needs (computed on the cleaned data)."""

    features: tuple[str, ...]
    # column -> values compared for one-hot: codes 0..k-1 for string columns, the values for numeric ones
    categorical: dict[str, tuple[float, ...]]
    # string columns only: the strings behind codes 0..k-1 (the device sends the index)
    vocab: dict[str, tuple[str, ...]]
    fill: dict[str, float]  # numeric column -> imputation value (median)
    bounds: dict[str, tuple[float, float]]  # numeric column -> outlier caps


@dataclass(frozen=True)
class ImageInfo:
    """How pixels were normalized, so the device can do the same."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Dataset:
    """A cleaned data set: inputs, labels, and the report of how it got here."""

    kind: Literal["tabular", "image", "text"]
    y: np.ndarray  # int64 class indices, or float32 for regression
    report: QualityReport
    data_hash: str
    x: np.ndarray | None = None  # tabular float32 [n, f] (string columns as codes); image float32 [n, c, h, w]
    texts: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None  # class names, index = class id
    tabular: TabularInfo | None = None
    image: ImageInfo | None = None
    class_weighted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    field: np.ndarray | None = None  # bool per row: captured on a device (data.include_captured)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> Dataset:
        """Return the rows at `index`."""
        return replace(
            self,
            y=self.y[index],
            x=None if self.x is None else self.x[index],
            texts=None if self.texts is None else tuple(self.texts[i] for i in index),
            field=None if self.field is None else self.field[index],
        )


def resolve_path(path: str, base_dir: Path) -> Path:
    """Resolve a data path relative to the task file's folder."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


def class_report(y: np.ndarray, labels: tuple[str, ...]) -> tuple[dict[str, int], Issue | None]:
    """Count classes and flag imbalance (the loss is class-weighted then)."""
    counts = np.bincount(y, minlength=len(labels))
    by_name = {labels[i]: int(c) for i, c in enumerate(counts)}
    present = counts[counts > 0]
    if present.size >= 2 and present.max() > IMBALANCE_RATIO * present.min():
        ratio = float(present.max() / present.min())
        return by_name, Issue(
            "label_imbalance",
            int(present.min()),
            f"largest class is {ratio:.1f}x the smallest",
            "class-weighted loss",
        )
    return by_name, None


def hash_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """Return the sha256 over the files' relative names and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = str(path.relative_to(root)) if root is not None else path.name
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()

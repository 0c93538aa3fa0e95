"""Load a text-classification table (CSV or Parquet): a text column and a label column."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hub.training.captured import CapturedRow, captured_issue, captured_texts
from hub.training.dataset import Dataset, Issue, QualityReport, class_report, hash_files, resolve_path
from hub.training.errors import DataError
from hub.training.spec import TaskSpec
from hub.training.tabular import read_table

__all__ = ["load_texts"]


def load_texts(spec: TaskSpec, base_dir: Path, captured: Sequence[CapturedRow] = ()) -> Dataset:
    """Load texts and labels; drop empty texts and duplicates."""
    path = resolve_path(spec.data.path, base_dir)
    names, columns = read_table(path)
    target, text_column = spec.data.target, spec.data.text_column
    assert target is not None  # the spec requires it for text tasks
    for field_name, column in (("data.target", target), ("data.text_column", text_column)):
        if column not in columns:
            raise DataError(f"{field_name}: column {column!r} is not in {path.name} (columns: {', '.join(names)})")
    raw_texts = list(columns[text_column])
    raw_labels = list(columns[target])
    issues: list[Issue] = []
    from_field = [False] * len(raw_texts)
    if captured:
        field_rows = captured_texts(captured)
        from_field += [True] * len(field_rows)
        raw_texts += [text for _, text, _ in field_rows]
        raw_labels += [label for _, _, label in field_rows]
        model = spec.data.include_captured.model if spec.data.include_captured else "?"
        issues.append(captured_issue([label for _, _, label in field_rows], model))
    rows_in = len(raw_texts)
    texts: list[str] = []
    labels_text: list[str] = []
    missing_text = missing_label = 0
    seen: set[tuple[str, str]] = set()
    duplicates = 0
    kept_field: list[bool] = []
    for text, label, is_field in zip(raw_texts, raw_labels, from_field, strict=True):
        if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
            missing_text += 1
            continue
        if label is None or (isinstance(label, float) and np.isnan(label)) or str(label) == "":
            missing_label += 1
            continue
        label_str = str(int(label)) if isinstance(label, float) and label.is_integer() else str(label)
        key = (" ".join(str(text).split()), label_str)
        if key in seen and spec.data.clean:
            duplicates += 1
            continue
        seen.add(key)
        texts.append(str(text))
        labels_text.append(label_str)
        kept_field.append(is_field)
    if missing_text:
        issues.append(
            Issue(
                "missing_values",
                missing_text,
                f"{missing_text} empty texts",
                f"dropped {missing_text} rows",
                text_column,
            )
        )
    if missing_label:
        issues.append(
            Issue(
                "missing_target",
                missing_label,
                f"{missing_label} rows have no {target}",
                f"dropped {missing_label} rows",
                target,
            )
        )
    if duplicates:
        issues.append(
            Issue(
                "duplicates",
                duplicates,
                f"{duplicates} rows repeat an earlier text and label",
                f"dropped {duplicates} rows",
            )
        )
    classes = tuple(sorted(set(labels_text)))
    index = {label: i for i, label in enumerate(classes)}
    y = np.array([index[v] for v in labels_text], dtype=np.int64)
    counts, imbalance = class_report(y, classes)
    if imbalance is not None:
        issues.append(imbalance)
    return Dataset(
        kind="text",
        y=y,
        report=QualityReport(rows_in, len(y), tuple(issues), counts),
        data_hash=hashlib.sha256((hash_files([path]) + "".join(sorted(r.id for r in captured))).encode()).hexdigest()
        if captured
        else hash_files([path]),
        texts=tuple(texts),
        labels=classes,
        class_weighted=imbalance is not None,
        field=np.array(kept_field, dtype=bool) if any(kept_field) else None,
    )

"""`data.include_captured`: labelled field items join the training rows, and bad ones stop before training."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hub.training.captured import CapturedRow
from hub.training.data import load_dataset
from hub.training.errors import DataError, SpecError
from hub.training.spec import parse_spec

TASK = """
task: {task}
data:
  path: {path}
  {target}
  include_captured: {{model: digits, labelled_only: {labelled}}}
model: {{candidates: [{candidate}]}}
search: {{trials: 1, cv_folds: 2}}
publish: {{model: digits}}
"""


def _spec(tmp_path: Path, task: str = "image-classification", labelled: str = "true") -> object:
    path, target, candidate = "builtin:digits", "", "cnn-small"
    if task == "tabular-classification":
        path, target, candidate = "data.csv", "target: label", "mlp-small"
    text = TASK.format(task=task, path=path, target=target, labelled=labelled, candidate=candidate)
    return parse_spec(text, source="task.yaml", base_dir=tmp_path)


def _png_row(value: int, label: str, i: int) -> CapturedRow:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    body = json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "n": i}).encode()
    return CapturedRow(id=f"{i:064x}", label=label, content=body)


def test_captured_images_are_added_and_reported(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    base = load_dataset(spec, tmp_path)  # type: ignore[arg-type]
    rows = [_png_row(40 * (i % 5), str(i % 3), i) for i in range(12)]
    dataset = load_dataset(spec, tmp_path, rows)  # type: ignore[arg-type]
    issues = {issue.check: issue for issue in dataset.report.issues}
    assert issues["from_field"].count == 12
    assert "0: 4, 1: 4, 2: 4" in issues["from_field"].detail
    # Flat images repeat each other within a class: cleaning drops the repeats as for any image.
    added = len(dataset) - len(base)
    assert 0 < added <= 12
    assert dataset.data_hash != base.data_hash
    assert dataset.x is not None and dataset.x.shape[1:] == base.x.shape[1:]  # type: ignore[union-attr]


def test_a_label_outside_the_classes_or_a_non_image_stops_before_training(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    with pytest.raises(DataError, match="labelled 'cat'"):
        load_dataset(spec, tmp_path, [_png_row(10, "cat", 1)])  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no single 'image'"):
        load_dataset(spec, tmp_path, [CapturedRow("f" * 64, "1", b'{"data": [1, 2]}')])  # type: ignore[arg-type]
    with pytest.raises(DataError, match="not a JSON request"):
        load_dataset(spec, tmp_path, [CapturedRow("e" * 64, "1", b"\x89PNG")])  # type: ignore[arg-type]


def test_the_spec_refuses_captured_data_where_it_cannot_train(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="include_captured"):
        _spec(tmp_path, task="tabular-classification")
    with pytest.raises(SpecError, match="unlabelled items cannot train"):
        _spec(tmp_path, labelled="false")


def test_repeat_copies_field_rows_among_training_rows_only(tmp_path: Path) -> None:
    import numpy as np

    from hub.training.runner import _repeat_field_rows

    text = TASK.format(
        task="image-classification", path="builtin:digits", target="", labelled="true", candidate="cnn-small"
    )
    spec = parse_spec(
        text.replace("labelled_only: true}", "labelled_only: true, repeat: 3}"), source="t", base_dir=tmp_path
    )
    rows = [_png_row(40 * (i % 6), str(i % 3), i) for i in range(12)]
    dataset = load_dataset(spec, tmp_path, rows)
    assert dataset.field is not None and 0 < int(dataset.field.sum()) <= 12
    field_rows = np.flatnonzero(dataset.field)
    train_rows = np.arange(len(dataset))[: len(dataset) - 2]  # the last two rows (field ones) held out
    repeated = _repeat_field_rows(spec, dataset, train_rows)
    kept_field = [r for r in field_rows if r in train_rows]
    assert len(repeated) == len(train_rows) + 2 * len(kept_field)
    assert not set(repeated) & {len(dataset) - 1, len(dataset) - 2}

"""The quality report finds seeded defects, and cleaning records what it did."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hub.training.data import load_dataset
from hub.training.spec import parse_spec


def _tabular_spec(tmp_path: Path, file: str = "data.csv", task: str = "tabular-classification") -> str:
    return f"""
task: {task}
data: {{path: {file}, target: label}}
model: {{candidates: [mlp-small]}}
search: {{trials: 1, cv_folds: 2}}
publish: {{model: demo}}
"""


def _write_defective_csv(path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = ["size,colour,flat,label"]
    for i in range(60):
        size = f"{rng.normal(10, 2):.3f}"
        if i in (3, 17, 40):
            size = ""  # three NaNs
        if i == 25:
            size = "5000"  # an entry error far outside the range
        colour = ["red", "green", "blue"][i % 3] if i != 8 else ""
        lines.append(f"{size},{colour},7,{'a' if i % 2 else 'b'}")
    lines += [lines[1], lines[2]]  # two duplicate rows
    path.write_text("\n".join(lines) + "\n")


def test_tabular_report_catches_seeded_defects(tmp_path: Path) -> None:
    _write_defective_csv(tmp_path / "data.csv")
    data = load_dataset(parse_spec(_tabular_spec(tmp_path), base_dir=tmp_path), tmp_path)
    report = data.report
    assert report.rows_in == 62 and report.rows_out == 60
    assert report.count("duplicates") == 2
    missing = {i.column: i for i in report.issues if i.check == "missing_values"}
    assert missing["size"].count == 3 and missing["size"].action.startswith("imputed with median")
    assert missing["colour"].count == 1 and "most frequent" in missing["colour"].action
    outlier = next(i for i in report.issues if i.check == "out_of_range")
    assert outlier.column == "size" and outlier.count == 1 and outlier.action.startswith("capped to")
    constant = next(i for i in report.issues if i.check == "constant_column")
    assert constant.column == "flat" and constant.action == "column dropped"
    # Cleaned data: no NaN, no outlier left, the constant column gone, strings as codes.
    assert data.x is not None and not np.isnan(data.x).any()
    assert data.tabular is not None and data.tabular.features == ("size", "colour")
    assert data.x[:, 0].max() < 100
    assert data.tabular.vocab["colour"] == ("blue", "green", "red")
    assert report.to_dict()["issues"]  # goes into the manifest lineage as JSON


def test_parquet_loads_like_csv(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"x": [float(i) for i in range(20)], "label": ["lo"] * 10 + ["hi"] * 10})
    pq.write_table(table, tmp_path / "data.parquet")
    data = load_dataset(parse_spec(_tabular_spec(tmp_path, "data.parquet"), base_dir=tmp_path), tmp_path)
    assert len(data) == 20 and data.labels == ("hi", "lo")


def test_label_imbalance_is_reported_and_weighted(tmp_path: Path) -> None:
    rows = [f"{i},{'rare' if i < 6 else 'common'}" for i in range(60)]
    (tmp_path / "data.csv").write_text("x,label\n" + "\n".join(rows) + "\n")
    data = load_dataset(parse_spec(_tabular_spec(tmp_path), base_dir=tmp_path), tmp_path)
    issue = next(i for i in data.report.issues if i.check == "label_imbalance")
    assert issue.action == "class-weighted loss" and data.class_weighted
    assert data.report.class_counts == {"common": 54, "rare": 6}


def _png(colour: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(colour, 30, size=(12, 12)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name, colour in (("dark", 40), ("light", 210)):
        (root / name).mkdir(parents=True)
        for i in range(8):
            (root / name / f"{i}.png").write_bytes(_png(colour, seed=i + colour))
    (root / "dark" / "copy.png").write_bytes((root / "dark" / "0.png").read_bytes())  # a duplicate
    (root / "light" / "broken.png").write_bytes(_png(210, 99)[:40])  # a truncated, corrupt file
    (root / "light" / "notes.jpg").write_text("not an image at all")
    return root


def test_image_report_catches_corrupt_and_duplicate_files(image_folder: Path) -> None:
    spec = parse_spec(
        f"""
task: image-classification
data: {{path: {image_folder}, image_size: [8, 8], grayscale: true}}
model: {{candidates: [cnn-small]}}
search: {{trials: 1, cv_folds: 2}}
publish: {{model: shades}}
"""
    )
    data = load_dataset(spec, image_folder.parent)
    unreadable = next(i for i in data.report.issues if i.check == "unreadable_file")
    assert unreadable.count == 2 and "broken.png" in unreadable.detail and "notes.jpg" in unreadable.detail
    assert data.report.count("duplicates") == 1
    assert data.report.rows_in == 19 and data.report.rows_out == 16
    assert data.x is not None and data.x.shape == (16, 1, 8, 8)
    assert data.labels == ("dark", "light")
    # Normalized with the data set's own statistics, which the manifest carries to the device.
    assert abs(float(data.x.mean())) < 1e-4
    assert data.image is not None and data.image.size == (8, 8)


def test_text_report_drops_empty_and_duplicate_rows(tmp_path: Path) -> None:
    rows = ["text,label"] + [f"review number {i},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    rows += ['"",pos', "review number 3,pos", "review number 4,"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    spec = parse_spec(
        """
task: text-classification
data: {path: t.csv, target: label}
model: {candidates: [minilm]}
search: {trials: 1, cv_folds: 2}
publish: {model: t}
""",
        base_dir=tmp_path,
    )
    data = load_dataset(spec, tmp_path)
    assert data.report.count("missing_values") == 1
    assert data.report.count("duplicates") == 1
    assert data.report.count("missing_target") == 1
    assert len(data) == 20

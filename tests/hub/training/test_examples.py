"""Each example trains in small settings; digits is accurate; the result is built and registered."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hub.training.runner import train_task
from hub.training.spec import load_spec


@pytest.mark.slow
def test_digits_reaches_95_percent(small_task: Callable[..., Path]) -> None:
    path = small_task("digits", search={"trials": 1, "cv_folds": 2}, training={"epochs": 15})
    trained = train_task(load_spec(path), path.parent)
    assert trained.test_metric >= 0.95, trained.metrics
    assert trained.cv_score >= 0.95
    assert trained.baseline < 0.2  # ten classes: the majority class gets about a tenth
    assert trained.preprocessing.type == "image" and trained.preprocessing.image is not None
    assert trained.preprocessing.image.size == (8, 8) and trained.preprocessing.image.grayscale
    assert trained.labels == [str(d) for d in range(10)]
    assert trained.validation_inputs["pixel_values"].shape[1:] == (1, 8, 8)
    assert len(trained.calibration_inputs["pixel_values"]) == 128


@pytest.mark.slow
def test_text_example_fine_tunes_minilm(small_task: Callable[..., Path]) -> None:
    path = small_task("reviews", search={"trials": 1, "cv_folds": 2}, training={"epochs": 1})
    trained = train_task(load_spec(path), path.parent)
    assert trained.input_names == ("input_ids", "attention_mask")
    ids = trained.validation_inputs["input_ids"]
    assert ids.dtype == np.int64 and ids.shape[1] == 32
    assert trained.preprocessing.text is not None and trained.tokenizer_path is not None
    assert trained.preprocessing.text.tokenizer_size == trained.tokenizer_path.stat().st_size
    assert trained.labels == ["negative", "positive"]
    # Only the top encoder layer and the head were trained; the rest kept the shipped weights.
    trainable = {n.split(".")[3] for n, p in trained.model.named_parameters() if p.requires_grad and ".layer." in n}
    assert trainable == {"5"}
    assert any(n.startswith("head.") and p.requires_grad for n, p in trained.model.named_parameters())
    assert 0.0 <= trained.test_metric <= 1.0
    assert set(trained.lineage) >= {"dataset_hash", "data_report", "search", "cv_scores", "training_config"}


def test_dry_run_checks_without_training(small_task: Callable[..., Path], tmp_path: Path) -> None:
    from hub.cli.main import app

    path = small_task("churn")
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run", "--json", "--data-dir", str(tmp_path / "hub")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] is True and summary["version"] is None and summary["published_targets"] == []
    assert summary["plan"]["train_rows"] == 240
    assert {i["check"] for i in summary["data_report"]["issues"]} >= {"duplicates", "missing_values", "out_of_range"}
    assert not (tmp_path / "hub" / "artifacts").exists()


@pytest.mark.slow
def test_train_command_builds_and_registers(small_task: Callable[..., Path], tmp_path: Path) -> None:
    """`autodl-hub train --json` in a real process: trained, built, signed and registered."""
    import onnxruntime as ort
    from sqlmodel import Session

    from hub.config import HubSettings
    from hub.db import create_engine_for
    from hub.registry import artifact_path, resolve_version

    path = small_task(
        "churn",
        search={"trials": 2, "cv_folds": 2},
        training={"epochs": 8, "early_stopping": 2},
        publish={"model": "churn", "version": "auto", "aliases": ["latest", "candidate"]},
    )
    data_dir = tmp_path / "hub"
    command = [
        str(Path(sys.executable).parent / "autodl-hub"),
        "train",
        str(path),
        "--json",
        "--data-dir",
        str(data_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["model"] == "churn" and summary["version"] == "0.1.0"
    assert "cpu-fp32" in summary["published_targets"]
    assert summary["cv_score"] > summary["cv_baseline"]
    assert summary["test_metric"] > 0.5

    settings = HubSettings(data_dir=data_dir)
    engine = create_engine_for(settings)
    with Session(engine) as session:
        _, version = resolve_version(session, "churn", "candidate")
        assert version.version == "0.1.0"
        manifest = version.manifest
        lineage = version.lineage
        assert version.dataset_hash == lineage["dataset_hash"]
        assert version.training_config is not None and version.training_config["task"] == "tabular-classification"
        fp32 = next(v for v in manifest["variants"] if v["target"] == "cpu-fp32")
    engine.dispose()
    assert {i["check"] for i in lineage["data_report"]["issues"]} >= {"duplicates", "missing_values"}
    assert len(lineage["cv_scores"]) == 2 and len(lineage["search"]["trials"]) == 2
    assert manifest["preprocessing"]["type"] == "tabular"
    assert manifest["preprocessing"]["categories"]["contract"] == ["month-to-month", "one-year", "two-year"]
    assert manifest["labels"] == ["no", "yes"]
    assert manifest["metrics"]["test_accuracy"] == pytest.approx(summary["test_metric"])

    # The stored artifact runs raw rows (a blank cell, a string category as its index) in ONNX Runtime.
    session = ort.InferenceSession(str(artifact_path(settings, fp32["sha256"])), providers=["CPUExecutionProvider"])
    features = manifest["preprocessing"]["features"]
    row = {"tenure_months": 3, "monthly_charges": float("nan"), "support_calls": 6, "region": 0,
           "contract": manifest["preprocessing"]["categories"]["contract"].index("month-to-month")}  # fmt: skip
    logits = session.run(None, {"features": np.array([[row[f] for f in features]], dtype=np.float32)})[0]
    assert logits.shape == (1, 2) and np.isfinite(logits).all()

    # A second run of the same task becomes the next patch version.
    again = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["version"] == "0.1.1"

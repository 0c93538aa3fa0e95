"""`autodl-hub train` on a text-generation task, in a real process: trained, exported, gated, published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.hub import train_json
from tests.support.lm_tasks import lm_task, write_code_corpus


def _builder() -> None:
    from hub.build.errors import BuildError
    from hub.build.lm_export import builder_python

    try:
        builder_python()
    except BuildError as exc:
        pytest.skip(f"the model-builder environment is missing: {exc}")


def test_dry_run_prints_the_plan_and_data_report(tmp_path: Path) -> None:
    from hub.cli import app

    data = write_code_corpus(tmp_path / "code")
    (data / "again.py").write_text((data / "mod_1.py").read_text())
    task = tmp_path / "task.yaml"
    task.write_text(lm_task(data, ["qwen2", "glm:small"]))
    result = CliRunner().invoke(app, ["train", str(task), "--dry-run", "--json", "--data-dir", str(tmp_path / "hub")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] is True and summary["metric"] == "perplexity"
    assert summary["plan"]["candidates"] == ["qwen2:tiny", "glm:small"]
    assert summary["plan"]["train_rows"] + summary["plan"]["test_rows"] == 24
    assert [i["check"] for i in summary["data_report"]["issues"]] == ["duplicate_documents"]
    assert not (tmp_path / "hub" / "artifacts").exists()


def test_bad_candidate_is_one_line_and_exit_1(tmp_path: Path) -> None:
    from hub.cli import app

    task = tmp_path / "task.yaml"
    task.write_text(lm_task(write_code_corpus(tmp_path / "code"), ["qwen2", "baichuan-13b"]))
    result = CliRunner().invoke(app, ["train", str(task), "--data-dir", str(tmp_path / "hub")])
    assert result.exit_code == 1
    assert "model.candidates[1]: unknown candidate 'baichuan-13b'" in result.output


@pytest.mark.slow
@pytest.mark.timeout(900)  # training, two builder exports and the gate; minutes on a busy 2-core machine
def test_train_publishes_a_text_generation_version(tmp_path: Path) -> None:
    from sqlmodel import Session

    from hub.config import HubSettings
    from hub.db import create_engine_for
    from hub.registry import resolve_version

    _builder()
    data = write_code_corpus(tmp_path / "code")
    task = tmp_path / "task.yaml"
    task.write_text(
        lm_task(
            data,
            ["qwen2", "llama"],
            training={"max_steps": 30, "select_steps": 4},
            build={"targets": ["cpu-int4", "cpu-fp32"]},
            publish={"model": "code-lm", "aliases": ["latest", "candidate"]},
        )
    )
    data_dir = tmp_path / "hub"
    summary = train_json(task, data_dir, timeout=840)
    assert summary["model"] == "code-lm" and summary["version"] == "0.1.0"
    assert set(summary["candidate_scores"]) == {"qwen2:tiny", "llama:tiny"}
    assert summary["candidate"] == min(summary["candidate_scores"], key=summary["candidate_scores"].get)
    assert summary["test_metric"] < summary["baseline"]  # 30 steps beat the unigram model
    assert "cpu-fp32" in summary["published_targets"]
    engine = create_engine_for(HubSettings(data_dir=data_dir))
    with Session(engine) as session:
        _, version = resolve_version(session, "code-lm", "candidate")
        manifest, lineage = version.manifest, version.lineage
    engine.dispose()
    assert manifest["task"] == "text-generation"
    generation = manifest["generation"]
    assert generation["context_length"] == 64 and generation["defaults"]["max_new_tokens"] == 8
    assert generation["samples"] and generation["samples"][0]["text"].startswith('"""Module')
    assert set(lineage["candidates"]) == {"qwen2:tiny", "llama:tiny"}
    runs = {run["name"]: run for run in lineage["candidate_runs"]}
    assert set(runs) == {"qwen2:tiny", "llama:tiny"} and all(run["steps"] == 4 for run in runs.values())
    assert manifest["metrics"]["candidate.llama:tiny"] == pytest.approx(runs["llama:tiny"]["val_perplexity"])
    assert lineage["data_report"]["documents"] == 24

"""`autodl-hub build` on a causal LM checkpoint folder builds text generation (a real process)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.lm_checkpoints import make_checkpoint, validation_texts

pytestmark = pytest.mark.slow
_SCRIPT = Path(sys.executable).with_name("autodl-hub")


def _build(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_SCRIPT), "build", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_build_of_a_checkpoint_folder_writes_a_text_generation_manifest(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ck", "qwen2", steps=0)
    validation = tmp_path / "held-out.txt"
    validation.write_text("\n".join(validation_texts()))
    work = tmp_path / "work"
    done = _build(
        checkpoint, "--name", "coder", "--version", "0.1.0", "--validation", validation,
        "--targets", "cpu-fp32", "--prompt", "def main(", "--parity-tokens", "4", "--no-register", "--workdir", work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["task"] == "text-generation"
    assert [v["target"] for v in manifest["variants"]] == ["cpu-fp32"]
    assert manifest["generation"]["samples"][0]["text"] == "def main("
    assert "cpu-fp32" in done.stdout and "published" in done.stdout


def test_a_checkpoint_without_a_tokenizer_is_one_clear_error(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ck", "llama", steps=0)
    (checkpoint / "tokenizer.json").unlink()
    validation = tmp_path / "v.txt"
    validation.write_text("x = 1\n")
    done = _build(checkpoint, "--name", "c", "--version", "0.1.0", "--validation", validation, "--no-register")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: checkpoint: {checkpoint}: no tokenizer.json"
    shutil.rmtree(checkpoint)

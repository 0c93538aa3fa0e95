"""A text-generation build request refuses what it cannot build, naming the file or field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hub.build.errors import BuildInputError
from hub.build.textgen_request import TextGenBuildRequest
from shared.targets import GENERATION_TARGETS, TargetId
from tests.support.lm_checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "llama", "llama", steps=0)


def _request(folder: Path, **changes: object) -> TextGenBuildRequest:
    fields: dict[str, object] = {
        "name": "coder",
        "version": "1.0.0",
        "checkpoint": folder,
        "validation_texts": ("x = 1\n",),
    }
    fields.update(changes)
    return TextGenBuildRequest(**fields)  # type: ignore[arg-type]


def test_a_good_request_gets_every_generation_target_with_the_fp32_baseline(checkpoint: Path) -> None:
    request = _request(checkpoint)
    assert request.targets == GENERATION_TARGETS
    assert _request(checkpoint, targets=("cpu-int4",)).targets == (TargetId.CPU_FP32, TargetId.CPU_INT4)
    assert request.budget("int4") == 0.05 and request.budget("int8") == 0.01
    assert request.config["architectures"] == ["LlamaForCausalLM"]


def test_bad_requests_name_the_file_or_field(checkpoint: Path, tmp_path: Path) -> None:
    cases: list[tuple[dict[str, object], str]] = [
        ({"checkpoint": tmp_path}, "no config.json"),
        ({"validation_texts": (), "validation_ids": ((1,),)}, "no validation sequence"),
        ({"targets": ("cuda-int8",)}, "not a text-generation target"),
        ({"targets": ("tpu-int2",)}, "unknown target"),
        ({"context_length": 100_000}, "larger than the model's 512"),
        ({"version": "one"}, "semantic version"),
        ({"max_ppl_change": {"int3": 0.1}}, "not a budget"),
        ({"sample_prompts": ()}, "sample_prompts"),
    ]
    for change, message in cases:
        with pytest.raises(BuildInputError, match=message):
            _request(checkpoint, **change)
    odd = tmp_path / "odd"
    shutil.copytree(checkpoint, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["BaichuanForCausalLM"]}))
    with pytest.raises(BuildInputError, match="'BaichuanForCausalLM' is not supported"):
        _request(odd)
    (odd / "config.json").write_text(json.dumps(config))
    (odd / "tokenizer.json").unlink()
    with pytest.raises(BuildInputError, match="no tokenizer.json"):
        _request(odd)
    (odd / "model.safetensors").unlink()
    with pytest.raises(BuildInputError, match="no weights"):
        _request(odd)

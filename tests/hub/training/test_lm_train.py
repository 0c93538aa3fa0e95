"""Text-generation training: every family trains, auto_select picks the best, the folder reloads and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hub.training.lm_runner import train_text_generation
from hub.training.spec import parse_spec
from tests.support.lm_tasks import lm_task, write_chat_jsonl, write_code_corpus


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_code_corpus(tmp_path_factory.mktemp("corpus") / "code")


def _greedy(model: torch.nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)  # type: ignore[operator]
    return [int(t) for t in out[0, ids.shape[1] :]]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "glm"])
def test_tiny_family_trains_and_reloads(family: str, code: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = parse_spec(lm_task(code, [family], training={"max_steps": 6}), base_dir=tmp_path)
    trained = train_text_generation(spec, tmp_path, tmp_path / "out")
    assert trained.chosen == f"{family}:tiny"
    (score,) = trained.candidates
    assert score.steps == 6 and score.train_loss > 0
    # Six steps already beat a model that knows nothing (uniform over the vocabulary).
    assert trained.val_perplexity < len(trained.tokenizer)
    folder = trained.model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 8 and generation["eos_token_id"] == trained.tokenizer.eos_token_id
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == family and config["max_position_embeddings"] == 64
    reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = trained.sample_prompts[0]
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    assert ids.shape[1] > 0
    with torch.no_grad():
        assert _greedy(reloaded, ids, 8) == _greedy(trained.model, ids, 8)
        blocks = torch.from_numpy(trained.validation_ids[:2])
        assert torch.allclose(reloaded(blocks).logits, trained.model(blocks).logits, atol=1e-5)
    assert trained.validation_ids.shape[1] == 33  # block + the shifted target


def test_auto_select_picks_the_lower_validation_perplexity(code: Path, tmp_path: Path) -> None:
    spec = parse_spec(lm_task(code, ["llama", "qwen3:small"], training={"max_steps": 4}), base_dir=tmp_path)
    trained = train_text_generation(spec, tmp_path, tmp_path / "out")
    scores = {s.name: s for s in trained.candidates}
    assert set(scores) == {"llama:tiny", "qwen3:small"}
    assert all(s.steps == 3 for s in scores.values())  # the same budget for each
    best = min(scores.values(), key=lambda s: s.val_perplexity)
    assert trained.chosen == best.name
    assert scores["llama:tiny"].val_perplexity != scores["qwen3:small"].val_perplexity
    recorded = json.loads((tmp_path / "out" / "training.json").read_text())
    assert {c["name"] for c in recorded["candidate_runs"]} == set(scores)
    assert recorded["selected_by"] == "val_perplexity" and recorded["candidate"] == best.name


def test_search_tunes_lr_warmup_and_width(code: Path, tmp_path: Path) -> None:
    spec = parse_spec(
        lm_task(code, ["qwen2"], search={"trials": 3, "strategy": "random"}, training={"max_steps": 4}),
        base_dir=tmp_path,
    )
    trained = train_text_generation(spec, tmp_path, tmp_path / "out")
    assert trained.search is not None and len(trained.search.trials) == 3
    assert {"lr", "warmup", "width"} <= set(trained.search.best.params)
    values = [t.value for t in trained.search.trials]
    assert trained.search.best.value == min(v for v in values if v is not None)
    width = trained.search.best.params["width"]
    assert trained.model.config.hidden_size == {0.5: 128, 1.0: 256, 1.5: 384}[width]


def test_chat_data_gets_a_chat_template_and_chat_prompts(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    spec = parse_spec(lm_task(data, ["qwen2"], model={"max_length": 32}), base_dir=tmp_path)
    trained = train_text_generation(spec, tmp_path, tmp_path / "out")
    assert trained.chat_template is not None and trained.report.kinds == {"chat": 30}
    assert trained.sample_prompts[0].startswith("<|im_start|>user\nWhat is ")
    assert trained.sample_prompts[0].endswith("<|im_start|>assistant\n")
    tokenizer = AutoTokenizer.from_pretrained(trained.model_dir)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"
    assert len(trained.stop_token_ids) == 2  # end of text, end of turn
    assert tokenizer.convert_ids_to_tokens(trained.stop_token_ids) == ["<|endoftext|>", "<|im_end|>"]

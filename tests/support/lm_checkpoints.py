"""Tiny causal LM checkpoints made in the test: a byte-level BPE tokenizer trained on a small
corpus, a transformers model from a config, a few training steps, saved as a Hugging Face folder
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja).
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "qwen3", "glm")
EOS = "<|endoftext|>"
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def corpus() -> list[str]:
    """Python source from the standard library: on every machine, real, repetitive enough to learn."""
    import argparse
    import json
    import textwrap as tw

    texts = []
    for module in (json, tw, argparse):
        source = inspect.getsource(module)
        texts += [source[i : i + 1200] for i in range(0, min(len(source), 24_000), 1200)]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as transformers does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.chat_template = TEMPLATE
    return fast


def config_for(family: str, vocab: int, eos: int) -> PretrainedConfig:
    """Return a tiny config of the family (two layers, grouped-query attention)."""
    common = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "tie_word_embeddings": False,
    }
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if family == "glm":
        # ORT's GroupQueryAttention wants the rotary half-width a multiple of 8: head_dim 32 at 0.5.
        return GlmConfig(head_dim=32, partial_rotary_factor=0.5, **common)
    raise ValueError(family)


_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "glm": GlmForCausalLM,
}


def make_checkpoint(folder: Path, family: str = "llama", *, steps: int = 30, seed: int = 0) -> Path:
    """Write a tiny trained checkpoint of `family` to `folder` and return it."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a 100k-parameter model: more threads only contend
    texts = corpus()
    tokenizer = train_tokenizer(texts)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    model = _CLASSES[family](config_for(family, len(tokenizer), eos))
    ids = [t for text in texts for t in tokenizer(text)["input_ids"] + [eos]]
    data = torch.tensor(ids[: (len(ids) // 64) * 64]).view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = data[(step * 4) % len(data) :][:4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def validation_texts() -> list[str]:
    """Held-out text: a module the tokenizer and model never saw."""
    import csv

    source = inspect.getsource(csv)
    return [textwrap.dedent(source[i : i + 600]) for i in range(0, 3600, 600)]

"""Causal language model candidates: transformers families built from a config at a size preset.

A candidate name is a family (``qwen2``, ``qwen3``, ``llama``, ``glm``), optionally with a
size (``qwen2:small``); without one the task's ``model.size`` applies. Every family is a
decoder with rotary positions, RMSNorm, SwiGLU and grouped-query attention, so one preset
table fits all four; the head size stays fixed and the search's width multiplier changes
the number of heads. Embeddings are tied: at a vocabulary of a few thousand they are a
large share of a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "FAMILIES",
    "PRESETS",
    "SIZES",
    "FamilyCandidate",
    "Preset",
    "build_config",
    "build_family_model",
    "parse_family",
]

Size = Literal["tiny", "small", "base"]
SIZES: tuple[Size, ...] = ("tiny", "small", "base")

# model_type -> the transformers class that trains it (architectures in config.json).
FAMILIES: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "glm": "GlmForCausalLM",
}


@dataclass(frozen=True)
class Preset:
    """The shape of one size: layers, heads, head size, MLP ratio."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_ratio: float

    def hidden(self, width: float = 1.0) -> int:
        """Return the hidden size at a width multiplier (whole heads, at least two)."""
        return self.heads_at(width) * self.head_dim

    def heads_at(self, width: float) -> int:
        """Return the attention heads at a width multiplier (a multiple of the KV heads)."""
        heads = max(2, round(self.heads * width))
        kv = min(self.kv_heads, heads)
        return max(kv, heads - heads % kv)


# tiny: 4 layers x 256 wide (about 3.5M parameters with a 4k vocabulary), which trains to a
# code perplexity in the tens within a few minutes on 2 cores (research/llm.md section 5).
PRESETS: dict[Size, Preset] = {
    "tiny": Preset(layers=4, heads=8, kv_heads=4, head_dim=32, mlp_ratio=2.75),
    "small": Preset(layers=8, heads=8, kv_heads=4, head_dim=64, mlp_ratio=2.75),
    "base": Preset(layers=12, heads=12, kv_heads=4, head_dim=64, mlp_ratio=2.75),
}


@dataclass(frozen=True)
class FamilyCandidate:
    """A family at a size, trained from scratch."""

    name: str  # as written in the task
    family: str
    size: Size

    @property
    def label(self) -> str:
        """Return ``family:size``."""
        return f"{self.family}:{self.size}"


def parse_family(name: str, default_size: Size) -> FamilyCandidate | None:
    """Return the family candidate `name` names, or None when it is not a family name."""
    family, _, size = name.partition(":")
    if family not in FAMILIES:
        return None
    if not size:
        return FamilyCandidate(name, family, default_size)
    if size not in SIZES:
        return None
    return FamilyCandidate(name, family, SIZES[SIZES.index(size)])


def build_config(
    candidate: FamilyCandidate,
    *,
    vocab_size: int,
    context_length: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    width: float = 1.0,
) -> PretrainedConfig:
    """Return the transformers config of `candidate` at `width` (no weights, no download)."""
    import transformers

    # transformers' config classes are untyped; build them through Any.
    classes: Any = transformers

    preset = PRESETS[candidate.size]
    heads = preset.heads_at(width)
    hidden = heads * preset.head_dim
    # Round the MLP to a multiple of 32 so the int4 blocks (32 columns) fit without padding.
    intermediate = max(32, int(round(hidden * preset.mlp_ratio / 32)) * 32)
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": preset.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": min(preset.kv_heads, heads),
        "head_dim": preset.head_dim,
        "max_position_embeddings": context_length,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    config: PretrainedConfig
    if candidate.family == "qwen2":
        config = classes.Qwen2Config(**common, use_sliding_window=False)
    elif candidate.family == "qwen3":
        config = classes.Qwen3Config(**common, use_sliding_window=False)
    elif candidate.family == "llama":
        config = classes.LlamaConfig(**common, mlp_bias=False, attention_bias=False)
    else:
        # GLM-4's port: half the head dimensions rotate (interleaved), biased q/k/v.
        config = classes.GlmConfig(**common, partial_rotary_factor=0.5, attention_bias=True)
    config.architectures = [FAMILIES[candidate.family]]
    return config


def build_family_model(config: PretrainedConfig, *, seed: int) -> PreTrainedModel:
    """Return a freshly initialised causal LM for `config` (deterministic for `seed`)."""
    import torch
    from transformers import AutoModelForCausalLM

    auto: Any = AutoModelForCausalLM
    torch.manual_seed(seed)
    # Eager attention: SDPA's CPU kernels are slower for these sizes and the export path
    # traces eager attention anyway.
    model: PreTrainedModel = auto.from_config(config, attn_implementation="eager")
    return model

"""The text-generation part of the manifest: how to run a language model, and what its gate measured.

`shared.manifest.Manifest.generation` holds a `GenerationSpec` for task ``text-generation``;
each variant's `VariantMetrics.generation` holds `GenerationMetrics`. Pydantic only, like all
of `shared`; the loop that runs such a model is `shared.generation` (numpy, onnxruntime).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "REL_PATH",
    "TEXT_GENERATION",
    "GenerationDefaults",
    "GenerationMetrics",
    "GenerationSpec",
    "KvCacheLayout",
    "SamplePrompt",
]

TEXT_GENERATION = "text-generation"
# A file inside a variant folder: relative POSIX parts, each starting with a letter, digit or "_"
# (so no "..", no empty and no hidden parts).
REL_PATH = r"^[A-Za-z0-9_][A-Za-z0-9._+-]*(?:/[A-Za-z0-9_][A-Za-z0-9._+-]*)*$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationMetrics(_Frozen):
    """Per variant of a language model: quality against torch, and speed, as the gate measured."""

    perplexity: float | None = Field(default=None, description="on the validation tokens, by the ONNX loop")
    reference_perplexity: float | None = Field(default=None, description="torch fp32 on the same tokens")
    perplexity_change: float | None = Field(default=None, description="relative: 0.01 is +1 %")
    parity_matched: int | None = Field(
        default=None, ge=0, description="greedy tokens equal to torch's, min over prompts"
    )
    parity_tokens: int | None = Field(default=None, ge=0, description="tokens compared per sample prompt (N)")
    decode_tokens_per_s: float | None = None
    time_to_first_token_ms: float | None = None
    rss_mb: float | None = None
    note: str | None = Field(default=None, max_length=1000, description="'unmeasured: ...' for GPU targets built here")


class GenerationDefaults(_Frozen):
    """Sampling defaults; a request may override each. temperature 0 is greedy; top_k 0 is off."""

    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=16, description="stop strings (text)")


class KvCacheLayout(_Frozen):
    """The graph's interface: names of its inputs and outputs, and the cache's shape.

    Caches are [batch, num_kv_heads, sequence, head_size]; `{i}` in a name is the layer.
    The loop grows the cache by concatenation (present = past + new), one request at a time, or
    where genai_config sets past_present_share_buffer, writes into one buffer per request.
    """

    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_size: int = Field(ge=1)
    dtype: Literal["float32", "float16"] = "float32"
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    position_ids: str | None = Field(default=None, description="None where the graph derives positions itself")
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    logits: str = "logits"

    def bytes_per_token(self) -> int:
        """Return the cache's bytes per token of one sequence (keys and values, every layer)."""
        itemsize = 4 if self.dtype == "float32" else 2
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * itemsize


class SamplePrompt(_Frozen):
    """A prompt and torch's greedy continuation: the parity check of every variant."""

    text: str = Field(max_length=20_000)
    prompt_ids: list[int] = Field(min_length=1, max_length=4096)
    expected_ids: list[int] = Field(min_length=1, max_length=1024, description="torch fp32 greedy tokens")


class GenerationSpec(_Frozen):
    """How to run a language model: tokenizer, template, special tokens, cache layout, defaults.

    File names are relative to the variant folder; every variant folder carries them.
    """

    tokenizer_file: str = Field(default="tokenizer.json", pattern=REL_PATH)
    tokenizer_config_file: str | None = Field(default="tokenizer_config.json", pattern=REL_PATH)
    chat_template: str | None = Field(default=None, max_length=100_000, description="Jinja, as transformers uses it")
    bos_token_id: int | None = Field(default=None, ge=0)
    eos_token_ids: list[int] = Field(min_length=1, max_length=16)
    pad_token_id: int | None = Field(default=None, ge=0)
    context_length: int = Field(ge=2)
    vocab_size: int = Field(ge=2)
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    kv_cache: KvCacheLayout
    samples: list[SamplePrompt] = Field(default_factory=list, max_length=16)
    parity_tokens: int = Field(default=8, ge=0, description="N: the first N greedy tokens must equal torch's")

    @model_validator(mode="after")
    def _ids_in_vocabulary(self) -> GenerationSpec:
        specials = [*self.eos_token_ids, self.bos_token_id, self.pad_token_id]
        for token in (t for t in specials if t is not None):
            if token >= self.vocab_size:
                raise ValueError(f"special token id {token} >= vocab_size {self.vocab_size}")
        for sample in self.samples:
            if len(sample.prompt_ids) + len(sample.expected_ids) > self.context_length:
                raise ValueError(f"sample prompt {sample.text[:40]!r} is longer than the context")
        return self

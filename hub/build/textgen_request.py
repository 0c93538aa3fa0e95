"""What to build for text generation: a frozen, validated request over a Hugging Face checkpoint folder.

The training side (hub.training) writes the folder: ``config.json``, ``*.safetensors``,
``tokenizer.json`` (+ ``tokenizer_config.json``), optionally ``chat_template.jinja`` and
``generation_config.json``; `hub.build.textgen.build_text_generation` exports, gates and packages it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.build.errors import BuildInputError
from hub.build.request import parse_targets
from shared.manifest import GenerationDefaults
from shared.targets import GENERATION_TARGETS, TargetId

__all__ = ["SUPPORTED_ARCHITECTURES", "TextGenBuildRequest", "checkpoint_config"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$")
# transformers classes the export handles: the model builder natively, GLM relabelled to its
# ChatGLM builder behind a parity check (hub.build.lm_export).
SUPPORTED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "GlmForCausalLM"}
)


def checkpoint_config(folder: Path) -> dict[str, Any]:
    """Return the checkpoint's config.json; raise BuildInputError naming the file."""
    path = folder / "config.json"
    if not path.is_file():
        raise BuildInputError("checkpoint", f"{folder}: no config.json (a Hugging Face model folder is needed)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildInputError("checkpoint", f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise BuildInputError("checkpoint", f"{path}: not a JSON object")
    return config


@dataclass(frozen=True)
class TextGenBuildRequest:
    """A validated text-generation build; see `hub.build.textgen.build_text_generation`.

    Validation data are token id sequences (`validation_ids`) or texts (`validation_texts`, tokenized
    with the checkpoint's tokenizer.json); each sequence is cut to `context_length`. `sample_prompts`
    are texts whose torch greedy continuation (`parity_tokens` tokens) every variant must reproduce.
    `max_ppl_change` maps a precision to the largest relative perplexity increase it may cost.
    """

    name: str
    version: str
    checkpoint: Path
    validation_ids: tuple[tuple[int, ...], ...] = ()
    validation_texts: tuple[str, ...] = ()
    sample_prompts: tuple[str, ...] = ("def main():", "The quick brown fox")
    parity_tokens: int = 8
    max_ppl_change: dict[str, float] = field(default_factory=lambda: {"int8": 0.01, "int4": 0.05, "fp32": 0.001})
    targets: tuple[TargetId, ...] = GENERATION_TARGETS
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    context_length: int | None = None
    chat_template: str | None = None
    candidate_scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    threads: int = 2
    decode_tokens: int = 32
    min_speedup: float = 1.05
    block_size: int = 32
    builder_python: Path | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise BuildInputError("request", f"model name {self.name!r} is not a valid name")
        if not _SEMVER.match(self.version):
            raise BuildInputError("request", f"version {self.version!r} is not a semantic version")
        folder = Path(self.checkpoint)
        object.__setattr__(self, "checkpoint", folder)
        config = checkpoint_config(folder)
        arch = (config.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise BuildInputError(
                "checkpoint",
                f"{folder / 'config.json'}: architecture {arch!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}",
            )
        if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
            raise BuildInputError("checkpoint", f"{folder}: no weights (*.safetensors or pytorch_model.bin)")
        if not (folder / "tokenizer.json").is_file():
            raise BuildInputError("checkpoint", f"{folder}: no tokenizer.json")
        limit = int(config.get("max_position_embeddings") or config.get("seq_length") or 0)
        if self.context_length is not None and limit and self.context_length > limit:
            raise BuildInputError(
                "request", f"context_length {self.context_length} is larger than the model's {limit} (config.json)"
            )
        targets = parse_targets([t.value if isinstance(t, TargetId) else t for t in self.targets])
        if unknown := [t.value for t in targets if t not in GENERATION_TARGETS]:
            raise BuildInputError("targets", f"{', '.join(unknown)}: not a text-generation target")
        if TargetId.CPU_FP32 not in targets:
            # cpu-fp32 is the speed baseline of the gate and the last fallback.
            targets = (TargetId.CPU_FP32, *targets)
        object.__setattr__(self, "targets", targets)
        ids = tuple(tuple(int(t) for t in seq) for seq in self.validation_ids)
        object.__setattr__(self, "validation_ids", ids)
        object.__setattr__(self, "validation_texts", tuple(self.validation_texts))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        if not any(len(s) >= 2 for s in ids) and not any(t.strip() for t in self.validation_texts):
            raise BuildInputError("validation", "no validation sequence of two or more tokens and no validation text")
        if not self.sample_prompts or not all(p for p in self.sample_prompts):
            raise BuildInputError("request", "sample_prompts must hold at least one non-empty prompt")
        if self.parity_tokens < 0:
            raise BuildInputError("request", "parity_tokens must be >= 0")
        for precision, budget in self.max_ppl_change.items():
            if precision not in ("fp32", "fp16", "int8", "int4") or not 0 <= budget < 10:
                raise BuildInputError("request", f"max_ppl_change[{precision!r}] = {budget} is not a budget")
        if self.threads < 1 or self.decode_tokens < 4 or self.block_size not in (16, 32, 64, 128, 256):
            raise BuildInputError("request", "threads >= 1, decode_tokens >= 4, block_size in 16..256 (powers of 2)")

    @property
    def config(self) -> dict[str, Any]:
        """Return the checkpoint's config.json."""
        return checkpoint_config(self.checkpoint)

    def budget(self, precision: str) -> float:
        """Return the relative perplexity increase allowed for a precision."""
        defaults = {"fp32": 0.001, "fp16": 0.01, "int8": 0.01, "int4": 0.05}
        return self.max_ppl_change.get(precision, defaults[precision])

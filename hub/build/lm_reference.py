"""The torch side of the text-generation gate: tokenized data, perplexity and greedy continuations.

Runs in the hub's environment (transformers 4.x), on the checkpoint exactly as training saved it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from hub.build.errors import BuildInputError, ModelLoadError
from shared.manifest import SamplePrompt

__all__ = [
    "TorchReference",
    "chunk",
    "eos_ids",
    "load_causal_lm",
    "load_tokenizer",
    "torch_decode_rate",
    "torch_greedy",
]


def load_tokenizer(checkpoint: Path) -> Tokenizer:
    """Load the checkpoint's tokenizer.json with `tokenizers` (what the agent uses)."""
    try:
        return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception
        raise BuildInputError("checkpoint", f"{checkpoint / 'tokenizer.json'}: cannot load: {exc}") from exc


def load_causal_lm(checkpoint: Path) -> Any:
    """Load the checkpoint's transformers model in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for bad folders
        raise ModelLoadError("load", f"{checkpoint}: transformers cannot load it: {exc}") from exc
    model.train(False)  # eval mode (dropout off); .eval() is untyped
    return model


def eos_ids(checkpoint: Path, config: dict[str, Any]) -> list[int]:
    """Return the end-of-sequence ids: generation_config.json first, then config.json."""
    value = None
    path = checkpoint / "generation_config.json"
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if value is None:
        value = config.get("eos_token_id")
    ids = value if isinstance(value, list) else [value] if value is not None else []
    return [int(i) for i in ids]


def chunk(sequences: Sequence[Sequence[int]], length: int) -> list[list[int]]:
    """Cut sequences into pieces of at most `length` tokens (pieces under two tokens are dropped)."""
    out = []
    for seq in sequences:
        for start in range(0, len(seq), length):
            piece = list(seq[start : start + length])
            if len(piece) >= 2:
                out.append(piece)
    return out


@torch.no_grad()
def torch_greedy(model: Any, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    """Return torch's greedy continuation with its KV cache: up to n tokens, ending before an EOS in `eos`."""
    ids, past, out = torch.tensor([prompt]), None, []
    for _ in range(n):
        result = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        if token in eos:
            break
        out.append(token)
        ids = torch.tensor([[token]])
    return out


@torch.no_grad()
def torch_decode_rate(model: Any, prompt: list[int], n: int) -> tuple[float, float]:
    """Return (decode tokens/s, time to first token s) of torch's generate() with its KV cache."""
    ids = torch.tensor([prompt])
    started = time.perf_counter()
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    first = time.perf_counter() - started
    started = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    total = time.perf_counter() - started
    return (n - 1) / max(total - first, 1e-9), first


@dataclass(frozen=True)
class TorchReference:
    """torch fp32's perplexity on the validation pieces and its greedy continuation of each prompt."""

    perplexity: float
    samples: list[SamplePrompt]

    @classmethod
    @torch.no_grad()
    def measure(
        cls,
        model: Any,
        pieces: list[list[int]],
        prompts: list[tuple[str, list[int]]],
        n: int,
        eos: list[int],
    ) -> TorchReference:
        """Measure the reference: perplexity over `pieces`, greedy continuations of `prompts`."""
        total, count = 0.0, 0
        for piece in pieces:
            ids = torch.tensor([piece])
            logits = model(input_ids=ids).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total, count = total + float(nll), count + len(piece) - 1
        samples = []
        for text, ids_ in prompts:
            expected = torch_greedy(model, ids_, n, eos)
            if expected:
                samples.append(SamplePrompt(text=text, prompt_ids=ids_, expected_ids=expected))
        return cls(perplexity=math.exp(total / max(count, 1)), samples=samples)

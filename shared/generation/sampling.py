"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.generation.errors import GenerationError

__all__ = ["SamplingParams", "choose_token"]


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings. temperature 0 is greedy; top_k 0 and top_p 1 are off.

    The same seed gives the same tokens for the same prompt and model; seed None draws one.
    `stop_token_ids` end generation like EOS (neither is yielded); `ignore_eos` decodes through
    EOS (benchmarks that need a fixed number of tokens).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise GenerationError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", frozenset(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """Whether the arg-max is taken (no randomness)."""
        return self.temperature == 0 or self.top_k == 1


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Return the next token id from one position's logits [vocab]."""
    if params.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scores.shape[0]:
        # argpartition keeps the k largest in O(vocab); everything else is excluded.
        keep = np.argpartition(scores, -params.top_k)[-params.top_k :]
    else:
        keep = np.arange(scores.shape[0])
    kept = scores[keep]
    order = np.argsort(-kept, kind="stable")
    keep, kept = keep[order], kept[order]
    probs = np.exp(kept - kept[0])
    probs /= probs.sum()
    if params.top_p < 1:
        # The smallest prefix whose mass reaches top_p, always at least the best token.
        cut = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        keep, probs = keep[:cut], probs[:cut]
        probs /= probs.sum()
    return int(keep[int(rng.choice(probs.shape[0], p=probs))])

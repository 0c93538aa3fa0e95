"""The text-generation gate: each variant measured with the one generation loop against torch.

Per CPU variant: validation perplexity (relative change against torch fp32 within the
precision's budget), greedy continuation of every sample prompt equal to torch's for the first
N tokens (a quantized variant: the first token; its budget decides), and decode tokens/s faster
than the cpu-fp32 variant. CUDA variants cannot run on the build machine; they are published
unmeasured, cuda-int4 only if cpu-int4 passed the quality gate with the same quantization.
"""

from __future__ import annotations

import resource
import statistics
from dataclasses import dataclass
from pathlib import Path

from shared.generation import GenerationModel, SamplingParams, load_model
from shared.manifest import GenerationMetrics, GenerationSpec, SamplePrompt
from shared.targets import TargetId

__all__ = ["LmDecision", "LmMeasurement", "decode_rate", "measure_variant", "parity", "quality_reason"]

UNMEASURED = "unmeasured: no CUDA on the build machine"


@dataclass(frozen=True)
class LmMeasurement:
    """What the loop measured for one variant folder."""

    target: TargetId
    perplexity: float | None
    reference_perplexity: float
    parity_matched: int | None
    parity_tokens: int
    tokens_per_s: float | None
    time_to_first_token_ms: float | None = None
    rss_mb: float | None = None
    note: str | None = None

    @property
    def change(self) -> float | None:
        """Return the relative perplexity change against torch (0.01 is +1 %)."""
        if self.perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity - 1

    def metrics(self) -> GenerationMetrics:
        """Return the manifest's record of this measurement."""
        return GenerationMetrics(
            perplexity=self.perplexity,
            reference_perplexity=self.reference_perplexity,
            perplexity_change=self.change,
            parity_matched=self.parity_matched,
            parity_tokens=self.parity_tokens,
            decode_tokens_per_s=self.tokens_per_s,
            time_to_first_token_ms=self.time_to_first_token_ms,
            rss_mb=self.rss_mb,
            note=self.note,
        )


@dataclass(frozen=True)
class LmDecision:
    """Published or not, and why."""

    target: TargetId
    published: bool
    reason: str


def parity(model: GenerationModel, samples: list[SamplePrompt], n: int) -> int:
    """Return the fewest leading greedy tokens equal to torch's, over all sample prompts (at most n).

    Both stopping at the same EOS before n tokens counts as n: the continuations are equal.
    """
    worst = n
    for sample in samples:
        want = sample.expected_ids[:n]
        got = list(model.generate(sample.prompt_ids, SamplingParams(max_new_tokens=n)))
        if got == want:
            continue
        matched = 0
        for a, b in zip(got, want, strict=False):
            if a != b:
                break
            matched += 1
        worst = min(worst, matched)
    return worst


def decode_rate(model: GenerationModel, prompt: list[int], tokens: int, runs: int = 3) -> tuple[float, float]:
    """Return (median decode tokens/s, median time to first token ms) over `runs` greedy runs.

    EOS is ignored so every run decodes `tokens` tokens; the first (prefill) step is timed apart.
    """
    import time

    rates, firsts = [], []
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    for _ in range(runs):
        generation = model.generate(prompt, params)
        started = time.perf_counter()
        count = 0
        first_at = started
        for _token in generation:
            count += 1
            if count == 1:
                first_at = time.perf_counter()
        ended = time.perf_counter()
        rates.append((count - 1) / max(ended - first_at, 1e-9))
        firsts.append((first_at - started) * 1000)
    return statistics.median(rates), statistics.median(firsts)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_variant(
    target: TargetId,
    folder: Path,
    spec: GenerationSpec,
    pieces: list[list[int]],
    reference_perplexity: float,
    *,
    threads: int,
    decode_tokens: int,
) -> LmMeasurement:
    """Load the folder with the loop and measure perplexity, parity and decode speed."""
    model = load_model(folder, spec=spec, threads=threads)
    ppl = model.perplexity(pieces)
    matched = parity(model, spec.samples, spec.parity_tokens) if spec.samples else None
    prompt = spec.samples[0].prompt_ids if spec.samples else pieces[0][: max(2, len(pieces[0]) // 2)]
    rate, first_ms = decode_rate(model, prompt, decode_tokens)
    return LmMeasurement(
        target, ppl, reference_perplexity, matched, spec.parity_tokens, rate, first_ms, round(_rss_mb(), 1)
    )


def quality_reason(m: LmMeasurement, budget: float, *, quantized: bool = False) -> str | None:
    """Return why a measured variant fails the quality gate, or None when it passes.

    A float export must give torch's greedy tokens, all N: that checks the export itself. A
    quantized one is judged by its perplexity budget: rounding may flip a near tie a few tokens
    in, so it must match only the first token of every sample prompt. The device checks each
    variant's own `parity_matched` tokens.
    """
    if m.perplexity is None and m.note is not None:
        return m.note
    change = m.change
    if change is not None and change > budget:
        return f"perplexity {m.perplexity:.4g} is {change:+.2%} against torch's {m.reference_perplexity:.4g}, over the {budget:.2%} budget"
    wanted = min(1, m.parity_tokens) if quantized else m.parity_tokens
    if m.parity_matched is not None and m.parity_matched < wanted:
        return f"greedy tokens equal torch's for {m.parity_matched} of the first {m.parity_tokens} on a sample prompt"
    return None

"""The text-generation quality rule: float exports match torch token for token; quantized ones
are judged by their perplexity budget and must match the first token."""

from __future__ import annotations

from hub.build.lm_gate import LmMeasurement, quality_reason
from shared.targets import TargetId


def _measured(perplexity: float, matched: int) -> LmMeasurement:
    return LmMeasurement(TargetId.CPU_INT4, perplexity, 20.0, matched, 12, 100.0)


def test_a_float_export_must_give_all_of_torchs_greedy_tokens() -> None:
    assert quality_reason(_measured(20.0, 12), 0.001) is None
    assert quality_reason(_measured(20.0, 5), 0.001) == (
        "greedy tokens equal torch's for 5 of the first 12 on a sample prompt"
    )


def test_a_quantized_variant_within_budget_may_part_from_torch_after_the_first_token() -> None:
    assert quality_reason(_measured(20.1, 5), 0.05, quantized=True) is None
    assert "0 of the first 12" in (quality_reason(_measured(20.1, 0), 0.05, quantized=True) or "")
    over = quality_reason(_measured(22.0, 12), 0.05, quantized=True)
    assert over == "perplexity 22 is +10.00% against torch's 20, over the 5.00% budget"

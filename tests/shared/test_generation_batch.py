"""Sequences decoding together as one batch: the same tokens as alone, slots bounded, memory given back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shared.generation import GenerationError, GenerationModel, SamplingParams, load_model
from shared.generation.batch import BatchedModel
from tests.shared.test_generation import _rss_mb
from tests.support.tiny_decoder import write_folder

PROMPTS = [[1, 2, 3], [7], [5, 9, 11, 13, 17, 19, 23, 29], [40, 41], [3, 3, 3, 3, 3]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> GenerationModel:
    return load_model(write_folder(tmp_path_factory.mktemp("gqa"), gqa=True), threads=1)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)  # n tokens, whatever the tiny model makes


def _together(batched: BatchedModel, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
    """Generate greedily from every prompt at once, each on a thread of its own."""
    out: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        try:
            start.wait()
            out[i] = list(batched.generate(prompts[i], _greedy(budgets[i])))
        except BaseException as exc:  # surfaced below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return out


class _Slow(BatchedModel):
    """Every run takes 10 ms (a real model's step), longer than the 2 ms a step waits for the others."""

    def _run(self, first: int, end: int, ids: np.ndarray, totals: np.ndarray) -> np.ndarray:
        time.sleep(0.01)
        return super()._run(first, end, ids, totals)


def test_sequences_decoded_together_give_each_the_tokens_it_gets_alone(model: GenerationModel) -> None:
    batched = _Slow(model, slots=len(PROMPTS))
    # Different budgets: sequences end while others go on, and the last ones move into freed slots.
    budgets = [40, 12, 30, 5, 25]
    alone = [list(model.generate(p, _greedy(n))) for p, n in zip(PROMPTS, budgets, strict=True)]
    assert all(len(tokens) == n for tokens, n in zip(alone, budgets, strict=True))
    assert _together(batched, PROMPTS, budgets) == alone
    assert batched.rows / batched.steps > 1.5, "the steps should have run several sequences each"
    assert batched.active == 0  # every slot was given back
    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, seed=11, ignore_eos=True)
    assert list(batched.generate(PROMPTS[0], sampled)) == list(model.generate(PROMPTS[0], sampled))


def test_steps_longer_than_the_wait_still_run_every_sequence_together(model: GenerationModel) -> None:
    batched = _Slow(model, slots=4)
    assert batched.gather_s < 0.01
    prompts = [[1, 2], [3, 4], [5, 6], [7, 8]]
    alone = [list(model.generate(p, _greedy(30))) for p in prompts]
    assert _together(batched, prompts, [30] * 4) == alone
    # The prompts run one after another, so the sequences start apart; waiters that arrive during
    # a step wait for the others from its end, so they come together (not two halves in turn).
    assert batched.rows / batched.steps > 2.5, (batched.rows, batched.steps)


def test_a_sequence_past_the_slots_is_refused_and_a_closed_one_frees_its_slot(model: GenerationModel) -> None:
    batched = BatchedModel(model, slots=2)
    first = batched.generate(PROMPTS[0], _greedy(50))
    second = batched.generate(PROMPTS[1], _greedy(50))
    next(first)
    token = next(second)
    third = batched.generate(PROMPTS[2], _greedy(5))
    with pytest.raises(GenerationError, match="all 2 sequence slots are taken"):
        next(third)
    first.close()  # a client went away: its slot is free at once, and the other goes on where it was
    assert batched.active == 1
    assert [token, *second] == list(model.generate(PROMPTS[1], _greedy(50)))
    assert list(batched.generate(PROMPTS[2], _greedy(5))) == list(model.generate(PROMPTS[2], _greedy(5)))


def test_the_buffer_is_resident_only_as_far_as_tokens_fill_it_and_a_freed_slot_gives_it_back(
    tmp_path: Path,
) -> None:
    model = load_model(write_folder(tmp_path / "long", gqa=True, context_length=100_000), threads=1)
    list(model.generate([1, 2], _greedy(2)))  # ORT's own first-run allocations, outside the measure
    before = _rss_mb()
    batched = BatchedModel(model, slots=4, length=100_000)  # whole contexts: 4 x 51 MB reserved
    generation = batched.generate(PROMPTS[2], _greedy(240))
    for _ in range(200):
        next(generation)
    assert _rss_mb() - before < 10, "200 tokens made the reserved contexts resident"
    filled = batched._buffer[:, 0, :, :208]
    assert filled.any()
    generation.close()
    assert not filled.any(), "the freed slot's pages should read as new zero pages"


def test_a_sequence_longer_than_a_slot_decodes_alone_beside_the_batch(model: GenerationModel) -> None:
    batched = _Slow(model, slots=2, length=16)
    prompts, budgets = [PROMPTS[2], PROMPTS[3], PROMPTS[0]], [30, 10, 12]  # 8 + 30 tokens: past a slot
    alone = [list(model.generate(p, _greedy(n))) for p, n in zip(prompts, budgets, strict=True)]
    assert _together(batched, prompts, budgets) == alone
    assert batched.rows == 9 + 11, "only the two short sequences took slots"
    assert batched.active == 0


def test_a_graph_that_grows_its_cache_by_copies_cannot_batch(tmp_path: Path) -> None:
    model = load_model(write_folder(tmp_path / "plain"), threads=1)
    with pytest.raises(GenerationError, match="present is written into its past's buffer"):
        BatchedModel(model, slots=2)

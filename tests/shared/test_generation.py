"""The generation loop over plain ONNX Runtime, on a tiny decoder written in ONNX by the test."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders

from shared.generation import (
    GenerationError,
    GenerationModel,
    SamplingParams,
    TextStream,
    load_model,
    spec_from_genai_config,
)
from tests.support.tiny_decoder import HEAD_SIZE, KV_HEADS, LAYERS, VOCAB, build_graph, genai_config, write_folder

PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> GenerationModel:
    return load_model(write_folder(tmp_path_factory.mktemp("tiny")), threads=1)


def recomputed_greedy(model: GenerationModel, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the graph every step."""
    ids, out = list(prompt), []
    for _ in range(n):
        token = int(np.argmax(model.logits(ids)[-1]))
        if token in stop:
            break
        out.append(token)
        ids.append(token)
    return out


def test_greedy_with_the_cache_equals_recomputing_the_whole_sequence(model: GenerationModel) -> None:
    for prompt in (PROMPT, [7], [5, 9, 11, 13, 17, 19, 23, 29]):
        generation = model.generate(prompt, SamplingParams(max_new_tokens=30))
        tokens = list(generation)
        assert tokens == recomputed_greedy(model, prompt, 30, set(model.spec.eos_token_ids))
        assert len(set(tokens)) > 3, "the tiny decoder should not repeat one token"
        assert generation.finish_reason in ("length", "stop")
        assert generation.prompt_tokens == len(prompt) and generation.tokens == tokens
        assert generation.time_to_first_token_s is not None and generation.time_to_first_token_s > 0


def test_the_cache_grows_per_request_and_is_freed_at_the_end(model: GenerationModel) -> None:
    generation = model.generate(PROMPT, SamplingParams(max_new_tokens=5))
    assert generation.cache_tokens == 0  # nothing is allocated before the first step
    next(generation)
    assert generation.cache_tokens == len(PROMPT)
    next(generation)
    assert generation.cache_tokens == len(PROMPT) + 1
    generation.close()
    assert generation.finish_reason == "cancelled" and generation.cache_tokens == 0
    assert list(generation) == []
    assert model.kv_bytes_per_token == 2 * LAYERS * KV_HEADS * HEAD_SIZE * 4


def test_the_same_seed_gives_the_same_tokens_and_sampling_follows_the_settings(model: GenerationModel) -> None:
    hot = SamplingParams(max_new_tokens=40, temperature=1.5, seed=7, stop_token_ids=frozenset())
    first, second = list(model.generate(PROMPT, hot)), list(model.generate(PROMPT, hot))
    assert first == second
    runs = {tuple(model.generate(PROMPT, SamplingParams(max_new_tokens=40, temperature=1.5, seed=s))) for s in range(6)}
    assert len(runs) > 1, "different seeds should give different samples"
    greedy = list(model.generate(PROMPT, SamplingParams(max_new_tokens=20)))
    # top_k=1 and a tiny top_p leave only the best token: the same as greedy, whatever the seed
    assert list(model.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, top_k=1, seed=3))) == greedy
    assert (
        list(model.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=4))) == greedy
    )
    # top_k=3: every sampled token is among the 3 best logits at its step
    params = SamplingParams(max_new_tokens=20, temperature=2.0, top_k=3, seed=5)
    ids = list(PROMPT)
    for token in model.generate(PROMPT, params):
        assert token in np.argsort(model.logits(ids)[-1])[-3:]
        ids.append(token)


def test_generation_stops_on_eos_stop_ids_the_budget_and_the_context(tmp_path: Path) -> None:
    probe = load_model(write_folder(tmp_path / "probe"))
    free = list(probe.generate(PROMPT, SamplingParams(max_new_tokens=12)))
    third = free[2]
    assert third not in free[:2]
    eos_model = load_model(write_folder(tmp_path / "eos", eos=third))
    generation = eos_model.generate(PROMPT, SamplingParams(max_new_tokens=12))
    assert list(generation) == free[:2] and generation.finish_reason == "stop"
    generation = probe.generate(PROMPT, SamplingParams(max_new_tokens=12, stop_token_ids=frozenset({third})))
    assert list(generation) == free[:2] and generation.finish_reason == "stop"
    generation = probe.generate(PROMPT, SamplingParams(max_new_tokens=2))
    assert len(list(generation)) == 2 and generation.finish_reason == "length"
    short = load_model(write_folder(tmp_path / "short", context_length=6))
    generation = short.generate(PROMPT, SamplingParams(max_new_tokens=50, stop_token_ids=frozenset()))
    assert len(list(generation)) == 3 and generation.finish_reason == "length"


def test_cancellation_ends_a_request_between_tokens(model: GenerationModel) -> None:
    seen: list[int] = []
    generation = model.generate(PROMPT, SamplingParams(max_new_tokens=30), cancelled=lambda: len(seen) >= 4)
    for token in generation:
        seen.append(token)
    assert len(seen) == 4 and generation.finish_reason == "cancelled"


def test_sequences_run_concurrently_from_threads_on_one_model(model: GenerationModel) -> None:
    prompts = [[i + 1, i + 2] for i in range(6)]
    params = [SamplingParams(max_new_tokens=25, temperature=0.0 if i % 2 else 1.2, seed=i) for i in range(6)]
    expected = [list(model.generate(p, q)) for p, q in zip(prompts, params, strict=True)]
    got: dict[int, list[int]] = {}
    barrier = threading.Barrier(6)

    def run(i: int) -> None:
        barrier.wait()
        got[i] = list(model.generate(prompts[i], params[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [got[i] for i in range(6)] == expected


def test_prompts_run_one_at_a_time_while_other_sequences_decode(tmp_path: Path) -> None:
    model = load_model(write_folder(tmp_path / "tiny"), threads=1)
    session, lock = model.session, threading.Lock()
    running = {"prompt": 0, "most_prompts": 0, "decode_beside_prompt": 0}

    class Watched:  # the session, counting the runs in flight by kind
        def __getattr__(self, name: str) -> object:
            return getattr(session, name)

        def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> object:
            prompt = feed["input_ids"].shape[1] > 1
            with lock:
                running["prompt"] += prompt
                running["most_prompts"] = max(running["most_prompts"], running["prompt"])
                running["decode_beside_prompt"] += not prompt and running["prompt"] > 0
            try:
                # A long prompt: others arrive meanwhile; decode steps take time too, so on a busy
                # machine a sequence's steps still overlap the next one's prompt.
                time.sleep(0.05 if prompt else 0.002)
                return session.run(outputs, feed)
            finally:
                with lock:
                    running["prompt"] -= prompt

    model.session = Watched()  # type: ignore[assignment]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        time.sleep(0.02 * i)
        results[i] = list(model.generate([i + 1, i + 2, i + 3], SamplingParams(max_new_tokens=40, ignore_eos=True)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(len(results[i]) == 40 for i in range(4))
    # A prompt's logits are [prompt, vocab]: never two at once. Sequences past theirs go on.
    assert running["most_prompts"] == 1
    assert running["decode_beside_prompt"] > 0


def test_perplexity_is_the_exponent_of_the_mean_negative_log_likelihood(model: GenerationModel) -> None:
    sequences = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    total, count = 0.0, 0
    for ids in sequences:
        logits = model.logits(ids).astype(np.float64)
        for pos in range(len(ids) - 1):
            row = logits[pos]
            total -= row[ids[pos + 1]] - np.log(np.exp(row - row.max()).sum()) - row.max()
            count += 1
    assert model.perplexity(sequences) == pytest.approx(np.exp(total / count), rel=1e-6)
    with pytest.raises(GenerationError, match="at least one sequence"):
        model.perplexity([[4]])


def test_graphs_with_position_ids_run_too(tmp_path: Path) -> None:
    folder = tmp_path / "pos"
    folder.mkdir()
    build_graph(folder / "model.onnx", position_ids=True)
    spec = spec_from_genai_config(genai_config())
    model = load_model(folder, spec=spec)
    tokens = list(model.generate(PROMPT, SamplingParams(max_new_tokens=15)))
    assert tokens == recomputed_greedy(model, PROMPT, 15, set(spec.eos_token_ids))


def test_bad_requests_and_folders_are_clear_errors(model: GenerationModel, tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match="no tokens"):
        model.generate([])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        model.generate([1, VOCAB])
    with pytest.raises(GenerationError, match="context holds"):
        model.generate(list(range(1, 60)) * 3)
    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}):
        with pytest.raises(GenerationError):
            SamplingParams(**bad)  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match="genai_config"):
        load_model(tmp_path)
    (tmp_path / "genai_config.json").write_text(json.dumps(genai_config()))
    with pytest.raises(GenerationError, match="graph is missing"):
        load_model(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(GenerationError, match="cannot load"):
        load_model(tmp_path)


def test_text_stream_never_splits_a_character() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, trainer)
    text = "naïve 漢字 🙂 def add(a, b): return a + b"
    ids = tokenizer.encode(text).ids
    stream = TextStream(tokenizer)
    deltas = [stream.push(t) for t in ids]
    deltas.append(stream.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0, "multi-byte characters span tokens here"


def test_importing_shared_does_not_import_the_loop_and_the_loop_needs_no_torch_hub_or_agent() -> None:
    code = (
        "import sys, shared, shared.manifest; assert 'shared.generation' not in sys.modules;"
        "import shared.generation;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'hub', 'agent', 'transformers')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_group_query_attention_graphs_decode_into_one_shared_buffer_with_the_same_tokens(tmp_path: Path) -> None:
    shared = load_model(write_folder(tmp_path / "gqa", gqa=True), threads=1)
    assert shared.share_buffer  # genai_config's past_present_share_buffer
    copying = load_model(tmp_path / "gqa", spec=shared.spec, threads=1)
    copying.share_buffer = False  # the same graph, its cache grown by a new present each step
    for prompt in (PROMPT, [7], [5, 9, 11, 13, 17, 19, 23, 29]):
        generation = shared.generate(prompt, SamplingParams(max_new_tokens=30))
        tokens = list(generation)
        assert tokens == recomputed_greedy(shared, prompt, 30, set(shared.spec.eos_token_ids))
        assert tokens == list(copying.generate(prompt, SamplingParams(max_new_tokens=30)))
        assert len(set(tokens)) > 3, "the tiny decoder should not repeat one token"
    hot = SamplingParams(max_new_tokens=25, temperature=1.2, seed=3)
    assert list(shared.generate(PROMPT, hot)) == list(copying.generate(PROMPT, hot))
    generation = shared.generate(PROMPT, SamplingParams(max_new_tokens=5))
    assert generation.cache_tokens == 0  # nothing is allocated before the first step
    next(generation)
    next(generation)
    assert generation.cache_tokens == len(PROMPT) + 1
    generation.close()
    assert generation.cache_tokens == 0


def test_a_shared_buffer_holds_the_prompt_and_budget_and_says_when_full(tmp_path: Path) -> None:
    model = load_model(write_folder(tmp_path / "gqa", gqa=True), threads=1)
    cache = model.shared_cache(4)
    assert cache.forward([1, 2, 3]).shape == (3, VOCAB)
    assert cache.forward([4]).shape == (1, VOCAB) and cache.tokens == 4
    with pytest.raises(GenerationError, match="the cache holds 4"):
        cache.forward([5])


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_a_shared_buffer_is_resident_only_as_far_as_tokens_fill_it(tmp_path: Path) -> None:
    model = load_model(write_folder(tmp_path / "gqa", gqa=True), threads=1)
    length = 100_000  # 2 layers x K,V x 2 heads x 16 x 4 bytes: 51 MB reserved
    model.shared_cache(4).forward([1, 2])  # ORT's own first-run allocations, outside the measure
    before = _rss_mb()
    cache = model.shared_cache(length)
    cache.forward(PROMPT)
    for token in range(10):
        cache.forward([token])
    assert cache.tokens == len(PROMPT) + 10
    assert _rss_mb() - before < 10, "writing 13 tokens made the whole buffer resident"

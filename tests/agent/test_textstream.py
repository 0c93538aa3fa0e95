"""Streamed text as the agent uses it: UTF-8 safe deltas (shared.generation.TextStream) with a real
byte-level BPE, and stop strings held back."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from agent.textstream import StopHoldBack
from shared.generation import TextStream as IncrementalDecoder

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界。机器学习模型在边缘设备上运行。",
    "Emoji: 🚀🔥 and é à ü ß 🙂",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE small enough that a Chinese character or an emoji spans several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.mark.parametrize(
    "text",
    ["你好，世界。机器学习", "🚀🔥 rocket on fire 🙂", "mixed é and 世界 and 🚀", "plain ascii text", "🙂"],
)
def test_deltas_never_split_a_character_and_add_up_to_the_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_a_multibyte_character_spans_tokens_so_some_pushes_hold_bytes(tokenizer: Tokenizer) -> None:
    # Guards the test above: with this vocabulary an emoji is several byte tokens.
    ids = tokenizer.encode("🚀").ids
    assert len(ids) > 1
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in ids][:-1] == [""] * (len(ids) - 1)


def test_naive_per_token_decoding_would_send_replacement_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("世界🚀").ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_special_tokens_add_no_text(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id("<|endoftext|>")
    decoder = IncrementalDecoder(tokenizer)
    out = [decoder.push(i) for i in [*tokenizer.encode("ab").ids, eos]]
    assert "".join(out) + decoder.flush() == "ab"


def _run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    hold = StopHoldBack(stops)
    sent = [hold.push(p) for p in pieces]
    if not hold.stopped:
        sent.append(hold.flush())
    return sent, hold.stopped


@pytest.mark.parametrize(
    ("stops", "pieces", "text", "stopped"),
    [
        (["\n\n"], ["Hello", "\n", "\nmore"], "Hello", True),  # split across two pieces
        (["END"], ["a E", "N", "D tail"], "a ", True),  # a stop in three pieces
        (["END"], ["a E", "N", "x"], "a ENx", False),  # a false start is released whole
        (["END"], ["aEN"], "aEN", False),  # held at the end, flushed: it never became a stop
        (["stop", "st"], ["te", "st"], "te", True),  # the earliest stop wins
        (["ab", "b"], ["xab"], "x", True),
        ([], ["any", "thing"], "anything", False),
        (["<|im_end|>"], ["answer<|im", "_end|>junk"], "answer", True),
        (["。"], ["你好", "。再见"], "你好", True),
    ],
)
def test_stop_strings(stops: list[str], pieces: list[str], text: str, stopped: bool) -> None:
    sent, did_stop = _run(stops, pieces)
    assert "".join(sent) == text
    assert did_stop is stopped


def test_no_prefix_of_a_stop_is_ever_sent_before_it_completes() -> None:
    hold = StopHoldBack(["STOP"])
    sent = [hold.push(c) for c in "abcST"]
    assert "".join(sent) == "abc"  # "ST" is held
    assert hold.push("O") == ""
    assert hold.push("P") == "" and hold.stopped
    assert hold.flush() == ""

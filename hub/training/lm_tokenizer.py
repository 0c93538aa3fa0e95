"""The tokenizer of a text-generation model: a byte-level BPE trained on the corpus, or a checkpoint's own.

Byte-level BPE never meets an unknown character (every byte is in the base alphabet), so
code, prose and any script tokenize without an ``<unk>``. Three special tokens: one
document separator that is also BOS, EOS and padding, and the two ChatML markers, so
chat-shaped data gets the same template Qwen and SmolLM use. Documents become one token
stream (each followed by EOS) that the trainer cuts into blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hub.training.corpus import Document
from hub.training.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CHATML_TEMPLATE",
    "EOS",
    "IM_END",
    "IM_START",
    "encode_documents",
    "render",
    "stop_token_ids",
    "train_tokenizer",
]

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(docs: Sequence[Document], *, vocab_size: int, chat: bool) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer of `vocab_size` on `docs` (with the chat template if `chat`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Chat turns are learned from their contents; the markers are special tokens already.
    tokenizer.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    fast: PreTrainedTokenizerBase = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
    if chat:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def render(doc: Document, tokenizer: PreTrainedTokenizerBase) -> str:
    """Return the text the model trains on for `doc` (chats through the tokenizer's template)."""
    if doc.kind != "chat":
        return doc.text
    if not tokenizer.chat_template:
        raise DataError(f"{doc.source}: chat data, but the tokenizer has no chat template")
    messages = [{"role": role, "content": content} for role, content in doc.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert isinstance(text, str)
    return text


def encode_documents(docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Return the token stream of `docs`, each document followed by EOS (int32)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    texts = [render(d, tokenizer) for d in docs]
    ids: list[int] = []
    # Batches keep the Rust tokenizer's parallel path without one list of every document.
    for start in range(0, len(texts), 256):
        for row in tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(int(eos))
    return np.asarray(ids, dtype=np.int32)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the ids that end a generation: EOS, and the end of a chat turn when there is one."""
    out = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    if not tokenizer.chat_template:
        return out
    vocab = tokenizer.get_vocab()
    for marker in (IM_END, "<|eot_id|>", "<|end|>"):
        if marker in vocab and vocab[marker] not in out:
            out.append(int(vocab[marker]))
    return out


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (and the chat template) into `out`."""
    tokenizer.save_pretrained(str(out))

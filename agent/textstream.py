"""Token ids to streamed text: UTF-8 safe incremental decoding and stop strings held back.

Two failure modes users of llama.cpp, Ollama and ORT GenAI report again and again
(research/llm.md §6): a byte-level BPE splits one character over several tokens, so
decoding token by token sends U+FFFD; and a stop string split over tokens is either
missed or its first half has already been sent when the second half arrives.

`IncrementalDecoder` decodes a small window of the ids (text-generation-inference's
prefix/read offsets) and emits new text only once it does not end in an incomplete
character. `StopHoldBack` sends text only when it can no longer be the start of a
stop string, and cuts the output at the first stop string found.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["IncrementalDecoder", "StopHoldBack", "TextDecoder"]

_REPLACEMENT = "\ufffd"


class TextDecoder(Protocol):
    """What the decoder needs of a tokenizer (`tokenizers.Tokenizer` has it)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Return the text of `ids`."""
        ...


class IncrementalDecoder:
    """Turns token ids, one at a time, into text deltas that never split a character."""

    def __init__(self, tokenizer: TextDecoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # Text of ids[prefix:read] was emitted already; decoding from `prefix` (a few tokens
        # back) keeps tokenizers that change a token's text by its neighbour (leading spaces
        # in SentencePiece) right, without decoding the whole output every step.
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (may be empty)."""
        self._ids.append(token_id)
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self._ids))
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Return what is left at the end of the output (an incomplete character stays U+FFFD)."""
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if after.startswith(before) else ""

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)


class StopHoldBack:
    """Holds text back until it cannot be the start of a stop string; finds the stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add decoded text; return what is safe to send. After a stop, `stopped` is True."""
        if self.stopped:
            return ""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        first = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            out, self._pending = self._pending[:first], ""
            return out
        keep = self._held(self._pending)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """Return the held text at the end of the output (it turned out not to be a stop)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _held(self, text: str) -> int:
        """Return the length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

"""Text around the loop: the variant's tokenizer, and streaming text that never splits a character."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from shared.generation.errors import GenerationError
from shared.manifest_generation import GenerationSpec

__all__ = ["TextStream", "load_tokenizer"]


def load_tokenizer(folder: Path | str, spec: GenerationSpec | None = None) -> Tokenizer:
    """Load the variant folder's `tokenizers` JSON (spec.tokenizer_file, default tokenizer.json)."""
    path = Path(folder) / (spec.tokenizer_file if spec is not None else "tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise GenerationError(f"{path}: cannot load the tokenizer: {exc}") from exc


class TextStream:
    """Turn token ids into text deltas as they arrive.

    Byte-level BPE splits multi-byte characters across tokens; decoding one token at a time
    would emit U+FFFD. Like text-generation-inference, decode a short window of recent tokens
    and emit only text that is complete (does not end in a replacement character).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip))

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (often empty inside a character)."""
        self._ids.append(int(token))
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Return whatever is held back at the end of the stream."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]

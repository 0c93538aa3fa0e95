"""Stop strings held back while streaming: never a prefix of a stop sent, the output cut at the stop.

A stop string split over tokens is, in llama.cpp, MLX and SwiftLM issues (research/llm.md §6),
either missed or its first half already sent when the second half arrives. `StopHoldBack`
sends text only once it can no longer be the start of a stop string. (Its companion, text
that never splits a UTF-8 character, is `shared.generation.TextStream`.)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopHoldBack"]


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

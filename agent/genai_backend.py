"""ONNX Runtime GenAI as an optional generation backend (`autodl[agent,genai]`), reading the same folder.

The default stays the own loop (`shared.generation`), which runs wherever ONNX Runtime
does (Jetson included). ORT GenAI preallocates the KV cache for long contexts and was the
steadiest under CPU contention (research/llm.md §3). It needs the model builder's
`genai_config.json` in the variant folder; tokenization and text stay the agent's own
(`tokenizers`, the manifest's chat template), so both backends answer alike.

Version pairing: onnxruntime-genai 0.16 and later require onnxruntime >= 1.30, which the
agent's pin (< 1.29, for its footprint) excludes; 0.15.x requires onnxruntime >= 1.28.0,
so `genai` pins 0.15.x and the agent keeps one onnxruntime (1.28).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["GenaiLoop", "available"]


def available() -> bool:
    """Return True when onnxruntime-genai is installed."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


class GenaiLoop:
    """The TokenLoop interface of agent.textgen over `og.Generator`, one generator per request."""

    def __init__(
        self,
        folder: Path,
        kv_bytes_per_token: int,
        context_length: int,
        eos_token_ids: Sequence[int],
        providers: Sequence[str],
    ) -> None:
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(folder))
        if "CUDAExecutionProvider" in providers:
            config.clear_providers()
            config.append_provider("cuda")
        self._model = og.Model(config)
        self.kv_bytes_per_token = kv_bytes_per_token
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)

    def generate(
        self, prompt_ids: Sequence[int], params: Any = None, *, cancelled: Callable[[], bool] | None = None
    ) -> GenaiGeneration:
        """Return an iterator over new token ids (not EOS), with `finish_reason` once it ends."""
        og = self._og
        options: dict[str, Any] = {
            # max_length counts the prompt (onnxruntime-genai#1425); the KV buffer is sized to it, not the context.
            "max_length": min(self.context_length, len(prompt_ids) + int(params.max_new_tokens)),
            "do_sample": not params.greedy,
        }
        if not params.greedy:
            options.update(temperature=float(params.temperature), top_p=float(params.top_p))
            if params.top_k:
                options["top_k"] = int(params.top_k)
            if params.seed is not None:
                options["random_seed"] = int(params.seed)
        generator_params = og.GeneratorParams(self._model)
        generator_params.set_search_options(**options)
        generator = og.Generator(self._model, generator_params)
        generator.append_tokens(list(prompt_ids))
        return GenaiGeneration(generator, self.eos_token_ids | params.stop_token_ids, cancelled)


class GenaiGeneration(Iterator[int]):
    """One request on an `og.Generator`."""

    def __init__(self, generator: Any, stop: frozenset[int], cancelled: Callable[[], bool] | None) -> None:
        self._generator: Any = generator
        self._stop = stop
        self._cancelled = cancelled
        self.finish_reason: str | None = None

    def __iter__(self) -> GenaiGeneration:
        return self

    def __next__(self) -> int:
        generator = self._generator
        if self.finish_reason is not None or generator is None:
            raise StopIteration
        if self._cancelled is not None and self._cancelled():
            self._end("cancelled")
        if generator.is_done():
            self._end("length")
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in self._stop:
            self._end("stop")
        return token

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self._generator = None  # frees the preallocated cache now
        raise StopIteration

    def close(self) -> None:
        """End early (a client went away)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self._generator = None

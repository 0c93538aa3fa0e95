"""Prefill, then one token per step with a KV cache that grows by concatenation.

One `GenerationModel` holds one ONNX Runtime session; every `generate` call keeps its own
cache, so several sequences run at once from different threads (ORT's `run` is thread-safe).
The cache of a request grows with it (past + new each step) rather than being allocated for
the whole context up front: memory follows what requests use (`kv_bytes_per_token`).

Graphs whose attention writes the new keys into the past's own buffer (the model builder's
GroupQueryAttention; genai_config's `past_present_share_buffer`) get one zeroed buffer per
request, sized for its prompt and budget and bound as both past and present: no copy of the
cache per step, and its pages become resident only as tokens fill them.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, NoReturn, Protocol

import numpy as np
import onnxruntime as ort

from shared.generation.config import GENAI_CONFIG, graph_file, read_genai_config, spec_from_genai_config
from shared.generation.errors import GenerationError
from shared.generation.sampling import SamplingParams, choose_token
from shared.manifest_generation import GenerationSpec

__all__ = ["FinishReason", "Generation", "GenerationModel", "SharedCache", "StepCache", "load_model"]

FinishReason = Literal["stop", "length", "cancelled"]
_ORT_TYPES = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


class GenerationModel:
    """A loaded language model: an ORT session over the graph, and its GenerationSpec."""

    def __init__(
        self,
        session: ort.InferenceSession,
        spec: GenerationSpec,
        *,
        folder: Path | None = None,
        share_buffer: bool = False,
    ) -> None:
        self.session = session
        self.spec = spec
        self.folder = folder
        self.share_buffer = share_buffer
        layout = spec.kv_cache
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        layers = range(layout.num_layers)
        self._past = [(layout.past_key.format(i=i), layout.past_value.format(i=i)) for i in layers]
        self._present = [n for i in layers for n in (layout.present_key.format(i=i), layout.present_value.format(i=i))]
        needed = [layout.input_ids, *(n for pair in self._past for n in pair)]
        if missing := [n for n in needed if n not in inputs]:
            raise GenerationError(f"the graph has no input(s) {missing[:4]}; it has {sorted(inputs)[:6]}")
        if missing := [n for n in [layout.logits, *self._present] if n not in outputs]:
            raise GenerationError(f"the graph has no output(s) {missing[:4]}; it has {sorted(outputs)[:6]}")
        self._mask = layout.attention_mask if layout.attention_mask in inputs else None
        # optimum's graphs take position ids; the builder's derive them from the mask.
        position = layout.position_ids or "position_ids"
        self._positions = position if position in inputs else None
        self._types = {name: _ORT_TYPES.get(arg.type, np.int64) for name, arg in inputs.items()}
        self._kv_dtype = self._types[self._past[0][0]]
        self._outputs = [layout.logits, *self._present]
        logits_type = next(o.type for o in session.get_outputs() if o.name == layout.logits)
        self._logits_dtype = _ORT_TYPES.get(logits_type, np.float32)
        # One prompt at a time: a prompt's pass already uses every intra-op thread, and its logits
        # are [prompt, vocab] (SmolLM2: 6 MB for 32 tokens, 94 MB for 480), so prompts run together
        # only multiply that memory. Sequences past their prompt decode meanwhile.
        self._prompt_lock = threading.Lock()

    @property
    def kv_bytes_per_token(self) -> int:
        """Return the cache's bytes per token of one sequence, as the graph stores it."""
        layout = self.spec.kv_cache
        return 2 * layout.num_layers * layout.num_kv_heads * layout.head_size * np.dtype(self._kv_dtype).itemsize

    @property
    def context_length(self) -> int:
        """Return the most tokens (prompt and generated) one sequence may hold."""
        return self.spec.context_length

    def empty_cache(self) -> list[np.ndarray]:
        """Return a cache holding no tokens: [1, kv_heads, 0, head_size] per key and value."""
        layout = self.spec.kv_cache
        shape = (1, layout.num_kv_heads, 0, layout.head_size)
        return [np.zeros(shape, dtype=self._kv_dtype) for _ in range(2 * layout.num_layers)]

    def forward(self, token_ids: Sequence[int], cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run new tokens after `cache`; return logits [new, vocab] and the grown cache."""
        past_len = int(cache[0].shape[2])
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        feed: dict[str, np.ndarray] = {
            self.spec.kv_cache.input_ids: ids.astype(self._types[self.spec.kv_cache.input_ids])
        }
        if self._mask is not None:
            feed[self._mask] = np.ones((1, past_len + ids.shape[1]), dtype=self._types[self._mask])
        if self._positions is not None:
            positions = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64).reshape(1, -1)
            feed[self._positions] = positions.astype(self._types[self._positions])
        for (key, value), k, v in zip(self._past, cache[0::2], cache[1::2], strict=True):
            feed[key], feed[value] = k, v
        try:
            out = self.session.run(self._outputs, feed)
        except Exception as exc:  # ORT raises its own types; callers see one error for a graph that fails
            raise GenerationError(f"ONNX Runtime cannot run the graph: {exc}") from exc
        logits = np.asarray(out[0])[0]
        return logits.astype(np.float32, copy=False), [np.asarray(a) for a in out[1:]]

    def shared_cache(self, length: int) -> SharedCache:
        """Return a cache buffer for `length` tokens, bound as both the graph's past and present."""
        return SharedCache(self, length)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Return the logits [len, vocab] of a sequence run in one pass with an empty cache."""
        self._check_ids(token_ids)
        return self.forward(token_ids, self.empty_cache())[0]

    def nll(self, token_ids: Sequence[int]) -> tuple[float, int]:
        """Return the summed negative log-likelihood of tokens 1.. given their prefix, and their count."""
        if len(token_ids) < 2:
            return 0.0, 0
        logits = self.logits(token_ids).astype(np.float64)[:-1]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = np.asarray(token_ids[1:], dtype=np.int64)
        return float(-log_probs[np.arange(targets.shape[0]), targets].sum()), int(targets.shape[0])

    def perplexity(self, sequences: Sequence[Sequence[int]]) -> float:
        """Return exp(mean NLL) over every predicted token of every sequence (each within the context)."""
        total, count = 0.0, 0
        for ids in sequences:
            nll, n = self.nll(ids)
            total, count = total + nll, count + n
        if count == 0:
            raise GenerationError("perplexity needs at least one sequence of two or more tokens")
        return float(np.exp(total / count))

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        cancelled: Callable[[], bool] | None = None,
        cache: Callable[[int], StepCache] | None = None,
    ) -> Generation:
        """Return an iterator over new token ids (not the prompt, not the stop token).

        `cache` makes a share_buffer graph's cache for a number of tokens (default: a
        `SharedCache` of the request's own; `shared.generation.batch` gives a batch slot).
        """
        self._check_ids(prompt_ids)
        if len(prompt_ids) >= self.context_length:
            raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}")
        return Generation(self, list(prompt_ids), params or SamplingParams(), cancelled, cache)

    def cache_binding(self, buffer: np.ndarray) -> ort.IOBinding:
        """Return a binding with layer i's key or value, `buffer[i]`, as both its past and its present."""
        binding = self.session.io_binding()
        names = [n for pair in self._past for n in pair]
        for i, (past, present) in enumerate(zip(names, self._present, strict=True)):
            value = ort.OrtValue.ortvalue_from_numpy(buffer[i])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def run_bound(self, binding: ort.IOBinding, ids: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """Run `ids` [rows, new] over the cache `binding` holds, row r filled to `totals[r]` after them.

        Return logits [rows, new, vocab]. The mask is each row's tokens, then padding to the
        longest; the graph writes the logits into an array of ours (no second copy of a
        prompt's [new, vocab]).
        """
        layout = self.spec.kv_cache
        rows, new = ids.shape
        binding.bind_cpu_input(layout.input_ids, ids.astype(self._types[layout.input_ids]))
        if self._mask is not None:
            mask = np.arange(int(totals.max())) < totals[:, None]
            binding.bind_cpu_input(self._mask, mask.astype(self._types[self._mask]))
        if self._positions is not None:
            positions = totals[:, None] - new + np.arange(new)
            binding.bind_cpu_input(self._positions, positions.astype(self._types[self._positions]))
        logits = np.empty((rows, new, self.spec.vocab_size), dtype=self._logits_dtype)
        binding.bind_output(layout.logits, "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # ORT raises its own types; callers see one error for a graph that fails
            raise GenerationError(f"ONNX Runtime cannot run the graph over a bound cache ({rows} rows): {exc}") from exc
        return logits.astype(np.float32, copy=False)

    def _check_ids(self, token_ids: Sequence[int]) -> None:
        if len(token_ids) == 0:
            raise GenerationError("no tokens given")
        if len(token_ids) > self.context_length:
            raise GenerationError(f"{len(token_ids)} tokens; the context holds {self.context_length}")
        low, high = min(token_ids), max(token_ids)
        if low < 0 or high >= self.spec.vocab_size:
            raise GenerationError(
                f"token id {low if low < 0 else high} is outside the vocabulary ({self.spec.vocab_size})"
            )


class StepCache(Protocol):
    """One request's cache that the graph reads as past and writes as present, in place."""

    @property
    def tokens(self) -> int:
        """Return how many tokens it holds."""

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Run new tokens after the filled ones; return their logits [new, vocab]."""

    def release(self) -> None:
        """Give the memory back; the cache is not used again."""


class SharedCache:
    """One request's cache as one buffer the graph reads as past and writes as present.

    [2 * layers, 1, kv_heads, length, head_size] in an anonymous mapping: zero pages that become
    resident as tokens are written, so a buffer sized for a long budget costs what is used
    (numpy would advise huge pages for an array this large, and 2 MB pages fill at once).
    The graph learns how many tokens are filled from the attention mask.
    """

    def __init__(self, model: GenerationModel, length: int) -> None:
        layout = model.spec.kv_cache
        self.model = model
        self.tokens = 0
        shape = (2 * layout.num_layers, 1, layout.num_kv_heads, length, layout.head_size)
        size = int(np.prod(shape)) * np.dtype(model._kv_dtype).itemsize
        try:
            self._memory = mmap.mmap(-1, size)
        except (OSError, ValueError) as exc:  # no address space (or overcommit refused) for the budget
            raise GenerationError(f"cannot reserve {size >> 20} MB for a cache of {length} tokens: {exc}") from exc
        self._buffer = np.frombuffer(self._memory, dtype=model._kv_dtype).reshape(shape)
        self._binding = model.cache_binding(self._buffer)

    @property
    def length(self) -> int:
        """Return the most tokens the buffer holds."""
        return int(self._buffer.shape[3])

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Run new tokens after the filled ones; return their logits [new, vocab]."""
        if self.tokens + len(token_ids) > self.length:
            raise GenerationError(f"{self.tokens} + {len(token_ids)} tokens; the cache holds {self.length}")
        total = self.tokens + len(token_ids)
        logits = self.model.run_bound(self._binding, np.asarray([token_ids]), np.asarray([total]))
        self.tokens = total
        rows: np.ndarray = logits[0]
        return rows

    def release(self) -> None:
        """Nothing to do: the buffer is unmapped with the last reference to this cache."""


class Generation(Iterator[int]):
    """One request's tokens, yielded as they are made; finish_reason is set when it ends."""

    def __init__(
        self,
        model: GenerationModel,
        prompt_ids: list[int],
        params: SamplingParams,
        cancelled: Callable[[], bool] | None,
        cache: Callable[[int], StepCache] | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.time_to_first_token_s: float | None = None
        self._pending = prompt_ids
        self._cache = model.empty_cache()
        self._new_cache = cache or model.shared_cache  # share_buffer graphs: a buffer for `length` tokens
        self._shared: StepCache | None = None
        self._cancelled = cancelled
        self._rng = np.random.default_rng(params.seed)
        eos = frozenset() if params.ignore_eos else frozenset(model.spec.eos_token_ids)
        self._stop = eos | params.stop_token_ids
        # The prompt plus what is generated must fit the context; past that the answer is "length".
        self._budget = min(params.max_new_tokens, model.context_length - len(prompt_ids))
        self._started = time.perf_counter()

    @property
    def cache_tokens(self) -> int:
        """Return how many tokens the cache holds now."""
        if self._shared is not None:
            return self._shared.tokens
        return int(self._cache[0].shape[2]) if self._cache else 0

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> int:
        if self.finish_reason is not None:
            raise StopIteration
        if self._cancelled is not None and self._cancelled():
            return self._finish("cancelled")
        if len(self.tokens) >= self._budget:
            return self._finish("length")
        with self.model._prompt_lock if not self.tokens else nullcontext():
            if self.model.share_buffer:
                if self._shared is None:  # the last generated token is never run: prompt + budget - 1
                    self._shared = self._new_cache(self.prompt_tokens + max(0, self._budget - 1))
                logits = self._shared.forward(self._pending)
            else:
                logits, self._cache = self.model.forward(self._pending, self._cache)
        token = choose_token(logits[-1], self.params, self._rng)
        if self.time_to_first_token_s is None:
            self.time_to_first_token_s = time.perf_counter() - self._started
        if token in self._stop:
            return self._finish("stop")
        self.tokens.append(token)
        self._pending = [token]
        return token

    def _finish(self, reason: FinishReason) -> NoReturn:
        self.finish_reason = reason
        self._free()  # the cache goes as soon as the request ends
        raise StopIteration

    def close(self) -> None:
        """End the request early and free its cache (a client went away)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self._free()

    def _free(self) -> None:
        shared, self._cache, self._shared = self._shared, [], None
        if shared is not None:
            shared.release()


def load_model(
    folder: Path | str,
    *,
    spec: GenerationSpec | None = None,
    graph: str | None = None,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    session_options: ort.SessionOptions | None = None,
) -> GenerationModel:
    """Load a variant folder: its graph, and `spec` or else the folder's genai_config.json."""
    folder = Path(folder)
    config = read_genai_config(folder) if spec is None or (folder / GENAI_CONFIG).is_file() else None
    if spec is None:
        assert config is not None  # read_genai_config raised otherwise
        template = folder / "chat_template.jinja"
        spec = spec_from_genai_config(config, chat_template=template.read_text("utf-8") if template.is_file() else None)
    path = folder / (graph or (graph_file(config) if config is not None else "model.onnx"))
    if not path.is_file():
        raise GenerationError(f"{path}: the graph is missing")
    options = session_options or ort.SessionOptions()
    if session_options is None and threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    chosen = list(providers) if providers else ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    chosen = [p for p in chosen if p in available] or ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # ORT raises its own types for a bad or unsupported graph
        raise GenerationError(f"{path}: ONNX Runtime cannot load the graph: {exc}") from exc
    # ORT GenAI's switch for graphs that write present into past's buffer (GroupQueryAttention).
    share = bool(config is not None and config.get("search", {}).get("past_present_share_buffer", False))
    return GenerationModel(session, spec, folder=folder, share_buffer=share)

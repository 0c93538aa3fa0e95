"""Decode steps of concurrent sequences run as one batch: the weights are read once for all of them.

On a CPU a small model's decode step is bound by reading its weights (SmolLM2-135M int4:
about 95 MB a token). Four sequences stepping on their own read them four times and fight
over the same cores, so four streams made hardly more tokens a second than one. Here every
sequence has a slot in one buffer [2 * layers, slots, kv_heads, context, head_size], bound
as both the graph's past and present (as `SharedCache` does for one), and one step runs the
next token of every sequence waiting for one, as the rows of one batch. The graph
(GroupQueryAttention) reads each row's length from its attention-mask row, so rows of
different lengths batch as they are. A prompt runs alone, in its own slot.

The sequences in flight hold slots 0..n-1 (when one ends, the last takes its place, with its
filled tokens copied), so a step's rows are one contiguous view of the buffer. A step starts
once every sequence past its prompt waits for one, or `gather_s` after the first did or the
last step ended, whichever is later (a sequence whose client reads slowly joins the next
step). The buffer is reserved but resident only as far as tokens fill it; a freed slot's
pages go back at once. A slot holds SLOT_TOKENS (prompt and budget), not the whole context:
attention's scratch is sized by the buffer's length, and a step over 8,192-token slots ran
SmolLM2 4 % slower than over 512. A longer sequence decodes alone in a buffer of its own.

Greedy tokens equal the unbatched loop's (tested on a GroupQueryAttention graph and on
SmolLM2-135M int4); a batched MatMul may round differently from one row alone, so logits
can differ in their last bits with the company a sequence keeps.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

from shared.generation.errors import GenerationError
from shared.generation.loop import Generation, GenerationModel, StepCache
from shared.generation.sampling import SamplingParams
from shared.manifest_generation import GenerationSpec

__all__ = ["BatchedModel"]

GATHER_S = 0.002  # how long a step waits for sequences still busy with their last token
SLOT_TOKENS = 1024  # a slot's length (or the context's, if shorter); longer sequences decode alone


class BatchedModel:
    """A GenerationModel whose sequences decode together, up to `slots` at once."""

    def __init__(
        self, model: GenerationModel, slots: int, *, length: int = SLOT_TOKENS, gather_s: float = GATHER_S
    ) -> None:
        if not model.share_buffer:
            raise GenerationError("batched decoding needs a graph whose present is written into its past's buffer")
        if slots < 1:
            raise GenerationError(f"slots must be >= 1, got {slots}")
        layout = model.spec.kv_cache
        self.model = model
        self.slots = slots
        self.gather_s = gather_s
        self.length = min(length, model.context_length)
        self._dtype = np.dtype(model._kv_dtype)
        shape = (2 * layout.num_layers, slots, layout.num_kv_heads, self.length, layout.head_size)
        size = int(np.prod(shape)) * self._dtype.itemsize
        # Private anonymous memory, not charged against overcommit: zero pages until written,
        # given back by MADV_DONTNEED.
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
        try:
            self._memory = mmap.mmap(-1, size, flags=flags)
        except (OSError, ValueError) as exc:
            raise GenerationError(f"cannot reserve {size >> 20} MB for {slots} sequences' caches: {exc}") from exc
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # 2 MB pages would make a few tokens cost megabytes
            self._memory.madvise(mmap.MADV_NOHUGEPAGE)
        self._buffer = np.frombuffer(self._memory, dtype=self._dtype).reshape(shape)
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}  # (first, end) slot -> the cache bound
        self._run_lock = threading.Lock()  # one run over the buffer at a time: a prompt or a step
        self._cond = threading.Condition()  # the slots, the sequences waiting for a step, their results
        self._active: list[_Slot] = []  # slot i is _active[i]
        self._waiting: list[_Slot] = []
        self._stepping = False
        self._step_ended = 0.0
        self.steps = 0  # decode steps run, and the rows they ran: rows / steps is the mean batch
        self.rows = 0

    # what the agent reads of a loaded model, as the unbatched one has it
    @property
    def spec(self) -> GenerationSpec:
        """Return the model's GenerationSpec."""
        return self.model.spec

    @property
    def kv_bytes_per_token(self) -> int:
        """Return the cache's bytes per token of one sequence."""
        return self.model.kv_bytes_per_token

    @property
    def context_length(self) -> int:
        """Return the most tokens one sequence may hold."""
        return self.model.context_length

    @property
    def active(self) -> int:
        """Return the sequences holding a slot now."""
        with self._cond:
            return len(self._active)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> Generation:
        """Return an iterator over new token ids, as `GenerationModel.generate`, decoding in batches."""
        return self.model.generate(prompt_ids, params, cancelled=cancelled, cache=self._slot)

    def _slot(self, length: int) -> StepCache:
        """Return a free slot for a sequence of up to `length` tokens (the Generation's cache).

        A sequence longer than a slot gets a buffer of its own and decodes alone.
        """
        if length > self.length:
            return self.model.shared_cache(length)
        slot = _Slot(self, length)
        with self._cond:
            if len(self._active) >= self.slots:
                raise GenerationError(f"all {self.slots} sequence slots are taken")
            slot.index = len(self._active)
            self._active.append(slot)
        return slot

    def _prompt(self, slot: _Slot, token_ids: Sequence[int]) -> np.ndarray:
        with self._run_lock:
            total = slot.tokens + len(token_ids)
            logits = self._run(slot.index, slot.index + 1, np.asarray([token_ids]), np.asarray([total]))
            slot.tokens = total
        with self._cond:
            slot.decoding = True
        rows: np.ndarray = logits[0]
        return rows

    def _step(self, slot: _Slot, token: int) -> np.ndarray:
        """Wait for a step that runs `token` after the slot's tokens; return its logits [1, vocab]."""
        batch: list[_Slot] = []
        with self._cond:
            slot.pending, slot.result, slot.error = token, None, None
            self._waiting.append(slot)
            self._cond.notify_all()  # a step waiting for the last sequence may start now
            arrived = time.monotonic()
            while True:
                if slot.result is not None or slot.error is not None:
                    break
                if not self._stepping:
                    decoding = sum(1 for s in self._active if s.decoding)
                    # The others of the last step get as long as this one to come back: counted from
                    # the step's end, or waiters from during a step would go alone, and the
                    # sequences would settle in two halves stepping in turn.
                    deadline = max(arrived, self._step_ended) + self.gather_s
                    now = time.monotonic()
                    if len(self._waiting) >= decoding or now >= deadline:
                        batch, self._waiting, self._stepping = self._waiting, [], True
                        break
                    self._cond.wait(deadline - now)
                else:
                    self._cond.wait()
        if slot.result is None and slot.error is None:
            self._lead(batch)
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def _lead(self, batch: list[_Slot]) -> None:
        """Run one step for `batch`: each contiguous run of slots as one batch of rows.

        Results are handed over under the condition, all at once when the step is done: a
        sequence woken early must not see its result, go on and wait for the next step
        before this one has finished with it.
        """
        results: dict[_Slot, np.ndarray | GenerationError] = {}
        try:
            with self._run_lock:
                runs: list[list[_Slot]] = []
                for slot in sorted(batch, key=lambda s: s.index):
                    if slot.index < 0:  # released meanwhile from another thread
                        results[slot] = GenerationError("the sequence has ended")
                    elif runs and runs[-1][-1].index + 1 == slot.index:
                        runs[-1].append(slot)
                    else:
                        runs.append([slot])
                for run in runs:
                    ids = np.asarray([[s.pending] for s in run])
                    totals = np.asarray([s.tokens + 1 for s in run])
                    try:
                        logits = self._run(run[0].index, run[-1].index + 1, ids, totals)
                    except GenerationError as exc:
                        results.update((s, exc) for s in run)
                        continue
                    for row, s in enumerate(run):
                        s.tokens += 1
                        results[s] = logits[row]
                self.steps += len(runs)
                self.rows += len(batch)
        finally:
            with self._cond:
                self._stepping = False
                self._step_ended = time.monotonic()
                for s in batch:
                    outcome = results.get(s, GenerationError("the decode step failed"))
                    if isinstance(outcome, GenerationError):
                        s.error = outcome
                    else:
                        s.result = outcome
                self._cond.notify_all()

    def _run(self, first: int, end: int, ids: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """Run `ids` [rows, new] in slots first..end-1 whose lengths become `totals`; return logits [rows, new, vocab]."""
        if int(totals.max()) > self.length:
            raise GenerationError(f"{int(totals.max())} tokens; a slot holds {self.length}")
        binding = self._bindings.get((first, end))
        if binding is None:
            binding = self._bindings[(first, end)] = self.model.cache_binding(self._buffer[:, first:end])
        return self.model.run_bound(binding, ids, totals)

    def _release(self, slot: _Slot) -> None:
        """Free `slot`: the last sequence moves into its place, and the last slot's pages go back."""
        with self._run_lock, self._cond:
            if slot.index < 0:
                return
            if slot in self._waiting:
                self._waiting.remove(slot)
            last = self._active[-1]
            if last is not slot:
                filled = last.tokens
                self._buffer[:, slot.index, :, :filled] = self._buffer[:, last.index, :, :filled]
                self._active[slot.index] = last
                last.index, freed = slot.index, last.index
            else:
                freed = slot.index
            self._active.pop()
            slot.index = -1
            self._forget(freed)
            self._cond.notify_all()  # fewer sequences to wait for

    def _forget(self, index: int) -> None:
        """Give the pages of slot `index` back (they read as zeros when next written)."""
        page = mmap.PAGESIZE
        per_layer = self._buffer[0, 0].nbytes
        for i in range(self._buffer.shape[0]):
            start = (i * self.slots + index) * per_layer
            first, end = -(-start // page) * page, (start + per_layer) // page * page
            if end > first:
                self._memory.madvise(mmap.MADV_DONTNEED, first, end - first)


class _Slot:
    """One sequence's place in the batch buffer: the Generation's cache (`StepCache`)."""

    def __init__(self, batch: BatchedModel, length: int) -> None:
        self.batch = batch
        self.length = length
        self.index = -1
        self.tokens = 0
        self.decoding = False  # past its prompt: steps wait for it
        self.pending = 0
        self.result: np.ndarray | None = None
        self.error: GenerationError | None = None

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Run new tokens after the filled ones; return their logits [new, vocab]."""
        if self.index < 0:
            raise GenerationError("the sequence has ended")
        if self.tokens + len(token_ids) > self.length:
            raise GenerationError(f"{self.tokens} + {len(token_ids)} tokens; the cache holds {self.length}")
        if not self.decoding or len(token_ids) != 1:
            return self.batch._prompt(self, token_ids)
        return self.batch._step(self, token_ids[0])

    def release(self) -> None:
        """Give the slot back."""
        self.batch._release(self)

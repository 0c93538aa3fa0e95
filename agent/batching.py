"""Dynamic batching, as Triton does it: concurrent requests of one model run as one `session.run`.

Requests with the same shapes (but for the first axis), dtypes and requested outputs
are stacked on the first axis up to `max_batch_size` rows; the outputs are split back
by rows. No thread of its own. Up to `instances` runs of a model go at once (Triton's instance
count: a run with one intra-op thread uses one core, so a 2-core device runs two); a
request that finds a free run and no queue runs at once, alone, with no hand-off (so
batching costs nothing at concurrency 1); requests that arrive while every run is taken
queue, and when a run ends the oldest queued request leads the next batch with those
behind it. With `max_queue_delay_us`, a leader waits up to that long for a batch to fill.

A batcher keeps an estimate of its runs' durations: a model whose runs are quick
(`QUICK_RUN_S`) and that waits for no batch is `quick`, and the HTTP server answers its
small requests on its selector thread (agent.server).

A model is batched only when its variant allows it (`Variant.batching`, or the agent's
`batching` setting for the model, from the desired state's config) and the sample's rows
come out bit-identical alone and together (`LoadedModel.rows_independent`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from agent.runtime import LoadedModel
from shared import tracing
from shared.manifest import Batching

__all__ = ["QUICK_RUN_S", "BatchStats", "Batcher", "Batchers"]

logger = logging.getLogger(__name__)

# model, version, rows in the run, seconds each request waited, seconds the run took
BatchStats = Callable[[str, str, int, list[float], float], None]

# A run this short costs less than handing its request to a worker thread and back.
QUICK_RUN_S = 200e-6


class _Pending:
    __slots__ = ("done", "error", "event", "inputs", "key", "lead", "outputs", "queued_at", "result", "rows")

    def __init__(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, rows: int, key: object) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.rows = rows
        self.key = key
        self.event = threading.Event()
        self.lead = False
        self.done = False
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.queued_at = time.perf_counter()


class Batcher:
    """Runs one loaded model's requests, in batches when its policy allows."""

    def __init__(self, model: LoadedModel, policy: Batching | None, stats: BatchStats, instances: int = 1) -> None:
        self.model = model
        self.policy = policy
        self.instances = max(1, instances)
        self.max_rows = policy.max_batch_size if policy is not None else 1
        self.delay_s = (policy.max_queue_delay_us if policy is not None else 0) / 1e6
        self._stats = stats
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: deque[_Pending] = deque()
        self._running = 0  # runs in flight, each with its leader; at most `instances`
        self.run_s = math.inf  # a run's seconds on an idle core (inf: none yet); see _timed
        if self.max_rows > 1:
            reason = model.rows_independent
            if reason is not None:
                logger.warning("%s %s: no dynamic batching: %s", model.name, model.version, reason)
                self.max_rows = 1

    @property
    def quick(self) -> bool:
        """Return whether its runs take under QUICK_RUN_S and a request waits for no batch."""
        return self.run_s <= QUICK_RUN_S and self.delay_s == 0

    @property
    def batching(self) -> bool:
        """Return whether requests may share a run."""
        return self.max_rows > 1

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Return the model's outputs for one request, run alone or with others."""
        rows = _rows(inputs)
        if not self.batching or rows is None or rows >= self.max_rows:
            start = time.perf_counter()
            result = self.model.run(inputs, outputs)
            elapsed = time.perf_counter() - start
            self._timed(elapsed)
            self._stats(self.model.name, self.model.version, rows or 1, [0.0], elapsed)
            return result
        with self._lock:
            idle = self._running < self.instances and not self._queue and self.delay_s == 0
            if idle:
                self._running += 1
        if idle:  # nobody to batch with: run at once, as unbatched, then pass on what queued meanwhile
            start = time.perf_counter()
            try:
                result = self.model.run(inputs, outputs)
            finally:
                elapsed = time.perf_counter() - start
                self._pass_lead()
            self._timed(elapsed)
            self._stats(self.model.name, self.model.version, rows, [0.0], elapsed)
            return result
        key = (tuple((k, a.shape[1:], a.dtype.str) for k, a in inputs.items()), tuple(outputs or ()))
        me = _Pending(inputs, outputs, rows, key)
        with self._lock:
            self._queue.append(me)
            lead = me.lead = self._running < self.instances
            if lead:
                self._running += 1
            else:
                self._arrived.notify()
        if not lead:
            with tracing.span("agent.infer.queue"):  # waiting for a run to take this request along
                me.event.wait()
            lead = me.lead and not me.done
        if lead:
            self._lead(me)
        if me.error is not None:
            raise me.error
        assert me.result is not None
        return me.result

    def _lead(self, me: _Pending) -> None:
        """Run `me` with the queued requests like it, then pass the lead on."""
        with self._lock:
            if self.delay_s > 0:
                deadline = me.queued_at + self.delay_s
                with tracing.span("agent.infer.queue"):  # the leader waits for a batch to fill
                    while self._queued_rows(me) < self.max_rows and (left := deadline - time.perf_counter()) > 0:
                        self._arrived.wait(left)
            batch = self._take(me)
        try:
            self._execute(batch)
        finally:
            self._pass_lead()

    def _pass_lead(self) -> None:
        """Wake the oldest queued request without a run to lead the next one, or free the run's slot."""
        with self._lock:
            waiting = next((p for p in self._queue if not p.lead), None)
            if waiting is not None:
                waiting.lead = True
                waiting.event.set()
            else:
                self._running -= 1

    def _queued_rows(self, me: _Pending) -> int:
        return sum(p.rows for p in self._queue if p is me or (p.key == me.key and not p.lead))

    def _take(self, me: _Pending) -> list[_Pending]:
        """Remove and return `me` and the oldest queued requests like it (not leading their own), up to max_rows."""
        self._queue.remove(me)
        batch, rows, keep = [me], me.rows, deque[_Pending]()
        while self._queue:
            pending = self._queue.popleft()
            if pending.key == me.key and not pending.lead and rows + pending.rows <= self.max_rows:
                batch.append(pending)
                rows += pending.rows
            else:
                keep.append(pending)
        self._queue = keep
        return batch

    def _execute(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        waited = [start - p.queued_at for p in batch]
        rows = sum(p.rows for p in batch)
        try:
            if len(batch) == 1:
                batch[0].result = self.model.run(batch[0].inputs, batch[0].outputs)
            else:
                stacked = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
                together = self.model.run(stacked, batch[0].outputs)
                at = 0
                for pending in batch:
                    pending.result = {k: v[at : at + pending.rows] for k, v in together.items()}
                    at += pending.rows
        except BaseException as exc:  # every request of the batch gets the run's error
            for pending in batch:
                pending.error = exc
        finally:
            elapsed = time.perf_counter() - start
            for pending in batch:
                pending.done = True
                pending.event.set()
        self._timed(elapsed)
        self._stats(self.model.name, self.model.version, rows, waited, elapsed)

    def _timed(self, seconds: float) -> None:
        """Fold a run's duration into `run_s` (unlocked: a lost update is harmless).

        The estimate is of a run's time on an idle core: a run slowed by other processes
        taking the CPU (every run at high load) does not raise it, as an average would;
        runs that stay slower raise it by 5 % a run.
        """
        self.run_s = min(seconds, self.run_s * 1.05)


def _rows(inputs: dict[str, np.ndarray]) -> int | None:
    """Return the common first-axis length of the inputs (None: they have none)."""
    rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(rows) != 1:
        return None
    value = rows.pop()
    return value if value else None


class Batchers:
    """The batcher of each active model, made again when the model or its policy changes."""

    def __init__(self, policy: Callable[[LoadedModel], Batching | None], stats: BatchStats, instances: int = 1) -> None:
        self._policy = policy
        self._stats = stats
        self._instances = instances
        self._lock = threading.Lock()
        self._by_name: dict[str, Batcher] = {}

    def peek(self, model: LoadedModel) -> Batcher | None:
        """Return the batcher of this loaded model if a request made it already."""
        found = self._by_name.get(model.name)
        return found if found is not None and found.model is model else None

    def get(self, model: LoadedModel) -> Batcher:
        """Return the batcher of this loaded model."""
        policy = self._policy(model)
        with self._lock:
            found = self._by_name.get(model.name)
            if found is not None and found.model is model and found.policy == policy:
                return found
        made = Batcher(model, policy, self._stats, self._instances)  # outside the lock: it may run the row check
        with self._lock:
            self._by_name[model.name] = made
        return made

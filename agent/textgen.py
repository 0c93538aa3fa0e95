"""The text-generation engine of the agent: bounded sequences in flight, one request's stream of text.

A `TextModel` is what a text-generation manifest loads into: the tokenizer, the chat
template, the context length and defaults, and the one generation loop
(`shared.generation`) that yields token ids. `TextModel.stream()` turns a request into
`Delta` texts and one `Finished`, with the prompt and output clamped to the context,
stop strings held back, UTF-8 safe deltas (`shared.generation.TextStream`), and cancellation within one token (a client
that went away, the request's time limit).

Sequences in flight are bounded per model (`SequenceLimiter`): each holds a KV cache
that grows with its tokens, so the limit comes from the memory free when the model
loaded and the model's KV bytes per token at its whole context (settable); a few
requests more wait in a queue, and past that a request is refused with 503 at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from agent.chat_template import ChatMessage, ChatTemplate
from agent.errors import AgentError
from agent.openai_schema import BadRequest, SamplingFields
from agent.textstream import StopHoldBack

if TYPE_CHECKING:
    from shared.generation import SamplingParams

__all__ = [
    "Admitted",
    "Busy",
    "Delta",
    "Finished",
    "Generation",
    "SequenceLimiter",
    "TextModel",
    "TokenLoop",
    "derive_max_sequences",
]

logger = logging.getLogger(__name__)

MEMORY_SHARE = 0.5  # of the memory free at load that in-flight KV caches may take


class TokenLoop(Protocol):
    """The generation loop (`shared.generation.GenerationModel`): prompt ids in, new ids out."""

    def generate(
        self, prompt_ids: Sequence[int], params: Any = None, *, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[int]: ...


class Tokenizer(Protocol):
    """What the engine uses of a `tokenizers.Tokenizer`."""

    def encode(self, sequence: str, add_special_tokens: bool = True) -> Any: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class Busy(AgentError):
    """Every sequence slot and queue place is taken: answer 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Delta:
    """Text that is safe to send."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of one generation."""

    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    decode_tps: float | None
    timed_out: bool = False
    cancelled: bool = False


def derive_max_sequences(free_bytes: int, kv_bytes_per_token: int, context_length: int, cap: int = 64) -> int:
    """Return how many whole-context KV caches fit in MEMORY_SHARE of the free memory (1..cap)."""
    per_sequence = max(1, kv_bytes_per_token * context_length)
    return max(1, min(cap, int(free_bytes * MEMORY_SHARE // per_sequence)))


class SequenceLimiter:
    """At most `slots` sequences run; `queue` more wait; past that, `Busy` at once."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots = slots
        self.queue = queue
        self._cond = threading.Condition()
        self._running = 0
        self._waiting = 0
        self._durations: list[float] = []

    @property
    def running(self) -> int:
        """Return the sequences in flight."""
        with self._cond:
            return self._running

    @property
    def waiting(self) -> int:
        """Return the requests queued for a slot."""
        with self._cond:
            return self._waiting

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Take a slot, waiting in the queue; return False when cancelled while waiting; raise Busy."""
        return self.admit() or self.wait(cancelled)

    def admit(self) -> bool:
        """Take a slot now (True) or a place in the queue (False, then `wait` or `leave`); raise Busy past both."""
        with self._cond:
            if self._running < self.slots and self._waiting == 0:
                self._running += 1
                return True
            if self._waiting >= self.queue:
                raise Busy(
                    f"{self._running} sequences in flight and {self._waiting} queued (limits {self.slots}"
                    f" and {self.queue})",
                    self._retry_after(),
                )
            self._waiting += 1
            return False

    def wait(self, cancelled: Callable[[], bool]) -> bool:
        """Turn a place in the queue into a slot; False (the place given up) when cancelled first."""
        with self._cond:
            try:
                while self._running >= self.slots:
                    self._cond.wait(0.05)
                    if cancelled():
                        return False
                self._running += 1
                return True
            finally:
                self._waiting -= 1

    def leave(self) -> None:
        """Give up a place in the queue without waiting."""
        with self._cond:
            self._waiting -= 1

    def release(self, seconds: float | None) -> None:
        """Give a slot back; `seconds` it was held (None: it was not used) feeds the Retry-After estimate."""
        with self._cond:
            self._running -= 1
            if seconds is not None:
                self._durations = [*self._durations[-31:], seconds]
            self._cond.notify()
            idle = self._running == 0 and self._waiting == 0
        if idle:
            from agent.runtime import release_heap

            release_heap()  # the requests' KV caches are garbage now: give their pages back

    def _retry_after(self) -> int:
        if not self._durations:
            return 1
        return max(1, math.ceil(sorted(self._durations)[len(self._durations) // 2]))


@dataclass
class TextModel:
    """A loaded text-generation model, ready for requests."""

    name: str
    version: str
    tokenizer: Tokenizer
    loop: TokenLoop
    context_length: int
    limiter: SequenceLimiter
    template: ChatTemplate | None = None
    eos_token_ids: tuple[int, ...] = ()  # the loop stops on them; kept for the smoke test and /v1/models
    defaults: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 300.0
    kv_bytes_per_token: int = 0

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """Render the chat template; raise BadRequest when the model has none or it fails."""
        from agent.chat_template import TemplateError

        if self.template is None:
            raise BadRequest(f"model {self.name} has no chat template; use /v1/completions", "messages")
        try:
            return self.template.render(messages)
        except TemplateError as exc:
            raise BadRequest(str(exc), "messages", "template_error") from exc

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Return the token ids of `text` (special tokens in the text parsed when `special`)."""
        return list(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def params(
        self, fields: SamplingFields, limit: int | None, prompt_tokens: int, param: str = "prompt"
    ) -> SamplingParams:
        """Apply defaults and clamp `prompt + max_tokens` to the context; raise BadRequest."""
        room = self.context_length - prompt_tokens
        if room < 1:
            raise BadRequest(
                f"the prompt is {prompt_tokens} tokens; the context of {self.name} is {self.context_length} tokens",
                param,
                "context_length_exceeded",
            )
        d = self.defaults
        wanted = limit or int(d.get("max_new_tokens") or room)
        temperature = fields.temperature if fields.temperature is not None else float(d.get("temperature") or 0.0)
        top_p = fields.top_p if fields.top_p is not None else float(d.get("top_p") or 1.0)
        top_k = fields.top_k if fields.top_k is not None else int(d.get("top_k") or 0)
        from shared.generation import SamplingParams

        return SamplingParams(
            max_new_tokens=min(wanted, room), temperature=temperature, top_p=top_p, top_k=top_k, seed=fields.seed
        )

    def stops(self, fields: SamplingFields) -> list[str]:
        """Return the request's stop strings, else the model's defaults."""
        if fields.stop is not None:
            return fields.stop
        return [s for s in self.defaults.get("stop") or [] if isinstance(s, str) and s]

    def admit(
        self, prompt_ids: list[int], params: SamplingParams, stops: Sequence[str], disconnected: Callable[[], bool]
    ) -> Admitted:
        """Take a sequence slot or a place in the queue now, without waiting; raise Busy past both."""
        return Admitted(self, prompt_ids, params, stops, disconnected, self.limiter.admit())

    def start(
        self, prompt_ids: list[int], params: SamplingParams, stops: Sequence[str], disconnected: Callable[[], bool]
    ) -> Generation | None:
        """Take a sequence slot (waiting in the queue) and return the generation; raise Busy.

        None when the client went away or the time limit passed while queued.
        """
        return self.admit(prompt_ids, params, stops, disconnected).begin()


class Admitted:
    """A request that holds a sequence slot or a place in the queue: `begin` (waits) or `abandon`."""

    def __init__(
        self,
        model: TextModel,
        prompt_ids: list[int],
        params: SamplingParams,
        stops: Sequence[str],
        disconnected: Callable[[], bool],
        has_slot: bool,
    ) -> None:
        self.model = model
        self.prompt_ids = prompt_ids
        self.params = params
        self.stops = stops
        self.disconnected = disconnected
        self.started = time.monotonic()
        self._has_slot = has_slot
        self._used = False

    def begin(self) -> Generation | None:
        """Wait in the queue for a slot if need be; return the generation.

        None when the client went away or the time limit passed while queued.
        """
        assert not self._used, "an admission begins once"
        self._used = True
        deadline = self.started + self.model.timeout_s
        timed_out = threading.Event()
        disconnected = self.disconnected

        def cancelled() -> bool:
            if time.monotonic() > deadline:
                timed_out.set()
                return True
            return disconnected()

        if not self._has_slot and not self.model.limiter.wait(cancelled):
            return None
        return Generation(self.model, self.prompt_ids, self.params, self.stops, cancelled, timed_out, self.started)

    def abandon(self) -> None:
        """Give the slot or the queue place back when the generation will not begin."""
        if self._used:
            return
        self._used = True
        if self._has_slot:
            self.model.limiter.release(None)
        else:
            self.model.limiter.leave()


class Generation:
    """One admitted request: iterate for Delta texts and a Finished; the slot is freed at the end or on close()."""

    def __init__(
        self,
        model: TextModel,
        prompt_ids: list[int],
        params: SamplingParams,
        stops: Sequence[str],
        cancelled: Callable[[], bool],
        timed_out: threading.Event,
        started: float,
    ) -> None:
        self.model = model
        self.prompt_ids = prompt_ids
        self.params = params
        self.stops = stops
        self.cancelled = cancelled
        self.timed_out = timed_out
        self.started = started
        self._released = False

    def close(self) -> None:
        """Free the sequence slot (once)."""
        if not self._released:
            self._released = True
            self.model.limiter.release(time.monotonic() - self.started)

    def __iter__(self) -> Iterator[Delta | Finished]:
        try:
            yield from self._run()
        finally:
            self.close()

    def _run(self) -> Iterator[Delta | Finished]:
        params, cancelled, started = self.params, self.cancelled, self.started
        from shared.generation import TextStream

        decoder = TextStream(self.model.tokenizer)
        hold = StopHoldBack(self.stops)
        count = 0
        first: float | None = None
        reason = "length"
        tokens = self.model.loop.generate(self.prompt_ids, params, cancelled=cancelled)
        try:
            for token in tokens:
                if first is None:
                    first = time.monotonic()
                count += 1
                text = hold.push(decoder.push(token))
                if text:
                    yield Delta(text)
                if hold.stopped:
                    reason = "stop"
                    break
            else:
                # The loop ended by itself: EOS ("stop"), the budget ("length") or cancelled.
                reason = "stop" if getattr(tokens, "finish_reason", None) == "stop" else "length"
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # frees the request's KV cache at once
        if not hold.stopped:
            tail = hold.push(decoder.flush()) + hold.flush()
            if hold.stopped:
                reason = "stop"
            if tail:
                yield Delta(tail)
        end = time.monotonic()
        ttft = (first - started) if first is not None else None
        tps = (count - 1) / (end - first) if first is not None and count > 1 and end > first else None
        timed_out = self.timed_out.is_set()
        was_cancelled = not timed_out and cancelled()
        yield Finished(reason, len(self.prompt_ids), count, ttft, tps, timed_out, was_cancelled)

"""The causal-LM training loop and validation perplexity.

Training draws random windows of `block + 1` tokens from the training stream (documents
joined by EOS), so a step costs the same whatever the documents' lengths; AdamW with a
linear warm-up and a cosine decay to a tenth of the peak, gradients clipped at 1.
Validation cuts the held-out stream into consecutive blocks and reports the perplexity
of every predicted token, and the summed negative log-likelihood so candidates with
different tokenizers can be compared per byte.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hub.training.errors import DataError, TrainingCancelled
from hub.training.progress import Progress

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["Evaluation", "LMFitConfig", "LMFitResult", "evaluate", "fit_lm", "validation_blocks"]

_LOG_EVERY = 10


@dataclass(frozen=True)
class LMFitConfig:
    """One training run's settings."""

    steps: int
    batch_size: int
    block: int
    lr: float
    warmup: float  # fraction of the steps
    weight_decay: float
    seed: int
    eval_blocks: int = 64


@dataclass(frozen=True)
class Evaluation:
    """Validation loss over `tokens` predicted tokens."""

    nll: float  # summed, in nats
    tokens: int

    @property
    def loss(self) -> float:
        """Return the mean loss per token."""
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        """Return exp(mean loss)."""
        return math.exp(min(self.loss, 50.0))


@dataclass(frozen=True)
class LMFitResult:
    """What one training run reached."""

    steps: int
    train_loss: float  # mean of the last tenth of the steps (nan for no steps)
    validation: Evaluation
    seconds: float
    tokens_per_s: float


def validation_blocks(ids: np.ndarray, block: int, max_blocks: int) -> np.ndarray:
    """Return up to `max_blocks` consecutive blocks of `block + 1` tokens from `ids` (int64)."""
    span = block + 1
    n = min(max_blocks, len(ids) // span)
    if n == 0:
        # A short validation stream still gives one (shorter) block.
        if len(ids) < 2:
            raise DataError("the validation split has fewer than two tokens; add data or raise data.validation_split")
        return np.asarray(ids, dtype=np.int64)[None, :]
    return np.asarray(ids[: n * span], dtype=np.int64).reshape(n, span)


@torch.no_grad()
def evaluate(model: PreTrainedModel, blocks: np.ndarray, *, batch_size: int = 8) -> Evaluation:
    """Return the summed next-token loss of `model` over `blocks`."""
    model.train(False)
    nll = 0.0
    tokens = 0
    for start in range(0, len(blocks), batch_size):
        batch = torch.from_numpy(blocks[start : start + batch_size])
        logits = model(input_ids=batch[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        tokens += int(batch[:, 1:].numel())
    return Evaluation(nll=nll, tokens=tokens)


def fit_lm(
    model: PreTrainedModel,
    train_ids: np.ndarray,
    val_blocks: np.ndarray,
    config: LMFitConfig,
    *,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    label: str = "train",
) -> LMFitResult:
    """Train `model` for `config.steps` steps on `train_ids`; return its validation loss."""
    block = min(config.block, len(train_ids) - 1)
    if block < 2:
        raise DataError("the training split has too few tokens for one block; add data")
    generator = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, int(config.steps * config.warmup)) if config.steps else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, config.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if progress is not None:
        progress.fit_started(label, config.steps)
    losses: list[float] = []
    stream = torch.from_numpy(np.asarray(train_ids, dtype=np.int64))
    offsets = np.arange(block + 1)
    started = time.perf_counter()
    model.train()
    for step in range(config.steps):
        if cancel is not None and cancel.is_set():
            raise TrainingCancelled(f"{label}: cancelled at step {step}")
        starts = generator.integers(0, len(train_ids) - block, size=config.batch_size)
        batch = stream[torch.from_numpy(starts[:, None] + offsets)]
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise DataError(f"{label}: the loss became {float(loss)} at step {step}; lower training.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None and ((step + 1) % _LOG_EVERY == 0 or step + 1 == config.steps):
            progress.epoch_done(step + 1, float(np.mean(losses[-_LOG_EVERY:])), None)
    seconds = time.perf_counter() - started
    validation = evaluate(model, val_blocks)
    tail = losses[-max(1, len(losses) // 10) :]
    return LMFitResult(
        steps=config.steps,
        train_loss=float(np.mean(tail)) if losses else float("nan"),
        validation=validation,
        seconds=seconds,
        tokens_per_s=config.steps * config.batch_size * block / seconds if seconds > 0 and config.steps else 0.0,
    )

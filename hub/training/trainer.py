"""The torch training loop: seeded, early-stopping, on CUDA when present and asked for, cancellable."""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hub.training.errors import TrainingCancelled, TrainingError
from hub.training.metrics import higher_is_better, score
from hub.training.progress import Progress

__all__ = ["FitConfig", "FitResult", "choose_device", "fit", "predict", "seed_everything"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """How to train one model."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    patience: int | None
    seed: int
    metric: str
    classification: bool
    class_weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class FitResult:
    """What a training run reached."""

    best_epoch: int  # 1-based; the epoch whose weights the model holds
    best_score: float | None  # on the validation rows, None without them
    epochs_run: int
    val_scores: tuple[float, ...]
    train_losses: tuple[float, ...]


def choose_device(use_gpu: bool) -> torch.device:
    """Return CUDA when asked for and present, else CPU; say which in the log."""
    if use_gpu and torch.cuda.is_available():
        device = torch.device("cuda")
        logger.info("training on CUDA (%s)", torch.cuda.get_device_name(device))
        return device
    reason = "resource.use_gpu is false" if not use_gpu else "no CUDA device is available"
    logger.info("training on CPU (%s)", reason)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run repeats."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _tensors(inputs: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(array)).to(device) for name, array in inputs.items()}


def predict(
    model: nn.Module, inputs: dict[str, np.ndarray], *, device: torch.device | None = None, batch_size: int = 256
) -> np.ndarray:
    """Run the model in eval mode over `inputs` in batches; return its outputs as float32."""
    device = device or next(model.parameters()).device
    model.eval()
    tensors = _tensors(inputs, device)
    rows = len(next(iter(inputs.values())))
    outputs = []
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in tensors.items()}
            outputs.append(model(**batch).float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0,), dtype=np.float32)


def _optimizer(config: FitConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise TrainingError(f"training.optimizer: unknown optimizer {config.optimizer!r}")


def fit(
    model: nn.Module,
    inputs: dict[str, np.ndarray],
    y: np.ndarray,
    config: FitConfig,
    *,
    device: torch.device,
    val_inputs: dict[str, np.ndarray] | None = None,
    val_y: np.ndarray | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    label: str = "training",
) -> FitResult:
    """Train `model` in place; with validation rows, stop early and keep the best epoch's weights."""
    seed_everything(config.seed)
    model.to(device)
    optimizer = _optimizer(config, model)
    tensors = _tensors(inputs, device)
    target = torch.from_numpy(y).to(device)
    weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device) if config.class_weights else None
    # Regression models de-standardize in the graph; the loss is taken in standard units.
    target_std = getattr(model, "target_std", None)
    scale = float(target_std) if isinstance(target_std, torch.Tensor) else 1.0
    generator = torch.Generator().manual_seed(config.seed)
    rows = len(y)
    better = higher_is_better(config.metric)
    best_score: float | None = None
    best_epoch = 0
    best_state: dict[str, torch.Tensor] | None = None
    val_scores: list[float] = []
    losses: list[float] = []
    if progress is not None:
        progress.fit_started(label, config.epochs)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(rows, generator=generator).to(device)
        total = 0.0
        for start in range(0, rows, config.batch_size):
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled("training cancelled")
            index = order[start : start + config.batch_size]
            if len(index) < 2 and rows > 1 and start > 0:
                continue  # a single-row last batch adds noise and nothing else
            outputs = model(**{k: v[index] for k, v in tensors.items()})
            if config.classification:
                loss = nn.functional.cross_entropy(outputs, target[index], weight=weights)
            else:
                loss = nn.functional.mse_loss(outputs.reshape(-1) / scale, target[index].reshape(-1) / scale)
            if not torch.isfinite(loss):
                raise TrainingError(f"{label}: the loss became {loss.item()} at epoch {epoch}; lower training.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / rows)
        current: float | None = None
        if val_inputs is not None and val_y is not None:
            current = score(config.metric, val_y, predict(model, val_inputs, device=device))
            val_scores.append(current)
            if best_score is None or (current > best_score if better else current < best_score):
                best_score, best_epoch = current, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            best_epoch = epoch
        if progress is not None:
            progress.epoch_done(epoch, losses[-1], current)
        if config.patience is not None and best_state is not None and epoch - best_epoch >= config.patience:
            logger.debug("%s: early stop at epoch %d (best %d)", label, epoch, best_epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, best_score, len(losses), tuple(val_scores), tuple(losses))

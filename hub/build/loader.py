"""Load a model to build from a path: torch.save'd module, TorchScript, or a Hugging Face directory."""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub.build.errors import ModelLoadError
from hub.build.request import TransformerShape

__all__ = ["LoadedModel", "SentenceEmbedding", "load_model", "tokenize", "transformer_shape"]

logger = logging.getLogger(__name__)

# Architectures ONNX Runtime's optimizer fuses as "bert" (encoder-only, post-LN, GELU).
_BERT_LIKE = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "camembert", "mpnet"}


class SentenceEmbedding(torch.nn.Module):
    """A Hugging Face encoder with mean pooling and L2 normalization in the graph.

    Pooling lives in the ONNX graph so the agent serves sentence embeddings without
    re-implementing pooling, and every variant is gated on the final embedding.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


@dataclass(frozen=True)
class LoadedModel:
    """A module ready for export, with what its directory told us."""

    module: torch.nn.Module
    task: str
    source: str
    output_names: tuple[str, ...] = ("output",)
    tokenizer_file: Path | None = None
    class_names: list[str] | None = None
    transformer: TransformerShape | None = None
    max_length: int = 128


def transformer_shape(module: torch.nn.Module) -> TransformerShape | None:
    """Return the attention shape of a BERT-like module, None for anything else."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type not in _BERT_LIKE:
        return None
    return TransformerShape(
        model_type="bert", num_heads=int(config.num_attention_heads), hidden_size=int(config.hidden_size)
    )


def _load_hf(path: Path) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
        architectures = config.architectures or []
        # Eager attention: with SDPA the exported graph has no pattern ORT can fuse into Attention.
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            module: torch.nn.Module = AutoModelForSequenceClassification.from_pretrained(
                path, attn_implementation="eager"
            ).eval()
            labels = [str(config.id2label[i]) for i in range(config.num_labels)]
            task, outputs = "classification", ("logits",)
        else:
            module = SentenceEmbedding(AutoModel.from_pretrained(path, attn_implementation="eager")).eval()
            labels, task, outputs = None, "embedding", ("sentence_embedding",)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError("load", f"{path} is not a loadable Hugging Face model: {exc}") from exc
    tokenizer = path / "tokenizer.json"
    max_length = 128
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = int(json.loads(st_config.read_text()).get("max_seq_length", max_length))
    return LoadedModel(
        module=module,
        task=task,
        source=f"huggingface:{path.name}",
        output_names=outputs,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
        class_names=labels,
        transformer=transformer_shape(module),
        max_length=max_length,
    )


def load_model(path: Path) -> LoadedModel:
    """Load a model from a file or directory; raise ModelLoadError saying why not."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError("load", f"{path} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError("load", f"{path} is a directory without config.json (not a Hugging Face model)")
        return _load_hf(path)
    module: Any
    if zipfile.is_zipfile(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            return LoadedModel(module=module.eval(), task="classification", source="torchscript")
        except RuntimeError:
            logger.debug("%s is not TorchScript; trying torch.load", path)
    try:
        # A pickled nn.Module needs full unpickling; only build models you trust.
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises many unrelated types for non-model files
        raise ModelLoadError("load", f"{path} is neither TorchScript nor a torch.save'd module: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            "load", f"{path} holds a {type(module).__name__}, not a torch.nn.Module (save the module, not a state dict)"
        )
    return LoadedModel(
        module=module.eval(), task="classification", source="torch.save", transformer=transformer_shape(module)
    )


def tokenize(
    tokenizer_file: Path, texts: list[str], max_length: int, *, pad_to_max: bool = False
) -> dict[str, np.ndarray]:
    """Tokenize texts with a `tokenizers` JSON file, as the agent does; int64 arrays."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.enable_truncation(max_length=max_length)
    if pad_to_max:
        tok.enable_padding(length=max_length)
    else:
        tok.enable_padding()
    encodings = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }

"""Read ONNX Runtime GenAI's `genai_config.json` (the model builder writes it) into the manifest's terms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.generation.errors import GenerationError
from shared.manifest_generation import GenerationDefaults, GenerationSpec, KvCacheLayout

__all__ = ["GENAI_CONFIG", "graph_file", "layout_from_genai_config", "read_genai_config", "spec_from_genai_config"]

GENAI_CONFIG = "genai_config.json"


def read_genai_config(folder: Path) -> dict[str, Any]:
    """Return the folder's genai_config.json; raise GenerationError when absent or not JSON."""
    path = Path(folder) / GENAI_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GenerationError(f"{path}: cannot read the model's genai_config.json: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise GenerationError(f"{path}: no 'model' section")
    return data


def _name(pattern: object, default: str) -> str:
    # The builder writes layer patterns printf-style ("present.%d.key"); the manifest uses "{i}".
    return str(pattern).replace("%d", "{i}") if pattern else default


def layout_from_genai_config(config: dict[str, Any]) -> KvCacheLayout:
    """Return the graph's cache layout and tensor names from a genai_config."""
    decoder = config["model"].get("decoder", {})
    inputs, outputs = decoder.get("inputs", {}), decoder.get("outputs", {})
    try:
        return KvCacheLayout(
            num_layers=decoder["num_hidden_layers"],
            num_kv_heads=decoder.get("num_key_value_heads", decoder.get("num_attention_heads")),
            head_size=decoder["head_size"],
            input_ids=inputs.get("input_ids", "input_ids"),
            attention_mask=inputs.get("attention_mask", "attention_mask"),
            position_ids=inputs.get("position_ids"),
            past_key=_name(inputs.get("past_key_names"), "past_key_values.{i}.key"),
            past_value=_name(inputs.get("past_value_names"), "past_key_values.{i}.value"),
            present_key=_name(outputs.get("present_key_names"), "present.{i}.key"),
            present_value=_name(outputs.get("present_value_names"), "present.{i}.value"),
            logits=outputs.get("logits", "logits"),
        )
    except (KeyError, ValidationError) as exc:
        raise GenerationError(f"genai_config decoder section is incomplete: {exc}") from exc


def graph_file(config: dict[str, Any]) -> str:
    """Return the graph's file name inside the folder."""
    return str(config["model"].get("decoder", {}).get("filename", "model.onnx"))


def spec_from_genai_config(config: dict[str, Any], *, chat_template: str | None = None) -> GenerationSpec:
    """Return a GenerationSpec (special tokens, context, cache) from a genai_config."""
    model = config["model"]
    search = config.get("search", {})
    eos = model.get("eos_token_id")
    eos_ids = [int(t) for t in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    pad = model.get("pad_token_id")
    try:
        return GenerationSpec(
            chat_template=chat_template,
            bos_token_id=model.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=pad[0] if isinstance(pad, list) else pad,
            context_length=model["context_length"],
            vocab_size=model["vocab_size"],
            defaults=GenerationDefaults(
                temperature=float(search.get("temperature", 0.7)) if search.get("do_sample") else 0.0,
                top_k=max(0, int(search.get("top_k", 0))) if search.get("do_sample") else 0,
                top_p=float(search.get("top_p", 1.0)) or 1.0,
            ),
            kv_cache=layout_from_genai_config(config),
        )
    except (KeyError, ValidationError) as exc:
        raise GenerationError(f"genai_config cannot describe the model: {exc}") from exc

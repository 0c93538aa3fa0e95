"""Raw request JSON (numbers, text, a base64 image, tabular rows) -> the model's input tensors."""

from __future__ import annotations

import base64
import binascii
import io
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from agent.tensors import InvalidInputError, UnsupportedInputError, check_input, spec_text
from shared.manifest import ImagePreprocessing, Manifest, TensorSpec

__all__ = ["MAX_IMAGE_PIXELS", "preprocess"]

# A small compressed file can claim a huge bitmap (a decompression bomb): its size is
# checked from the header, before a pixel is decoded. 4096 x 4096 covers any camera frame
# a model here resizes down from.
MAX_IMAGE_PIXELS = 4096 * 4096


def preprocess(manifest: Manifest, body: Any, tokenizer_path: Path | None = None) -> dict[str, np.ndarray]:
    """Turn a ``:predict`` body into input arrays as the manifest's preprocessing says."""
    if not isinstance(body, dict):
        raise InvalidInputError("request body must be a JSON object")
    kind = manifest.preprocessing.type
    if kind == "text" or "text" in body:
        return _text(manifest, body, tokenizer_path)
    if kind == "image" or "image" in body:
        return _image(manifest, body)
    if kind == "tabular" and manifest.preprocessing.features is not None and "features" in body:
        return _tabular(manifest, body["features"])
    return _numbers(manifest, body)


def _cast(spec: TensorSpec, data: Any) -> np.ndarray:
    try:
        array = np.asarray(data, dtype=np.dtype(spec.dtype))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"input {spec.name!r} is not {spec_text(spec)}: {exc}") from exc
    # One example without its batch dimension is accepted and batched.
    if array.ndim == len(spec.shape) - 1:
        array = array[np.newaxis, ...]
    check_input(spec, array)
    return array


def _numbers(manifest: Manifest, body: dict[str, Any]) -> dict[str, np.ndarray]:
    specs = manifest.inputs
    if "inputs" in body and isinstance(body["inputs"], dict):
        given = body["inputs"]
        missing = [spec_text(s) for s in specs if s.name not in given]
        if missing:
            raise InvalidInputError(f"missing inputs: {', '.join(missing)}")
        return {s.name: _cast(s, given[s.name]) for s in specs}
    data = body.get("data", body.get("instances"))
    if data is None:
        raise InvalidInputError(
            f"give 'data' (or 'inputs' by name); the model takes {', '.join(map(spec_text, specs))}"
        )
    if len(specs) != 1:
        raise InvalidInputError(f"the model has {len(specs)} inputs; give them by name in 'inputs'")
    return {specs[0].name: _cast(specs[0], data)}


def _tabular(manifest: Manifest, rows: Any) -> dict[str, np.ndarray]:
    columns = manifest.preprocessing.features or []
    categories = manifest.preprocessing.categories or {}
    rows = [rows] if isinstance(rows, dict) else rows
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InvalidInputError("'features' must be an object or a list of objects keyed by column")
    missing = sorted({c for r in rows for c in columns if c not in r})
    if missing:
        raise InvalidInputError(f"missing feature columns: {', '.join(missing)}")
    table = [[_cell(c, r[c], categories.get(c)) for c in columns] for r in rows]
    return {manifest.inputs[0].name: _cast(manifest.inputs[0], table)}


def _cell(column: str, value: Any, vocabulary: list[str] | None) -> float:
    """Return one tabular value as the graph expects it: a category's index, NaN for missing."""
    if value is None:
        return math.nan  # the graph imputes missing values
    if vocabulary is not None and isinstance(value, str):
        return float(vocabulary.index(value)) if value in vocabulary else -1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        expected = f"one of {vocabulary}" if vocabulary is not None else "a number"
        raise InvalidInputError(f"feature {column!r}: expected {expected}, got {value!r}")
    return float(value)


@lru_cache(maxsize=8)
def _tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _text(manifest: Manifest, body: dict[str, Any], tokenizer_path: Path | None) -> dict[str, np.ndarray]:
    spec = manifest.preprocessing.text
    if spec is None or tokenizer_path is None:
        raise InvalidInputError(f"model {manifest.name} does not take text")
    texts = body.get("text")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidInputError("'text' must be a string or a non-empty list of strings")
    tokenizer = _tokenizer(str(tokenizer_path))
    tokenizer.enable_truncation(spec.max_length)
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    fields = {
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }
    arrays = {}
    for input_spec in manifest.inputs:
        if input_spec.name not in fields:
            raise InvalidInputError(f"text model input {spec_text(input_spec)} is not a tokenizer field")
        arrays[input_spec.name] = np.asarray(fields[input_spec.name], dtype=np.dtype(input_spec.dtype))
    return arrays


def _image(manifest: Manifest, body: dict[str, Any]) -> dict[str, np.ndarray]:
    spec = manifest.preprocessing.image
    if spec is None:
        raise InvalidInputError(f"model {manifest.name} does not take images")
    images = body.get("image")
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise InvalidInputError("'image' must be a base64 string or a list of them")
    batch = np.stack([_one_image(b64, spec) for b64 in images])
    input_spec = manifest.inputs[0]
    array = batch.astype(np.dtype(input_spec.dtype))
    check_input(input_spec, array)
    return {input_spec.name: array}


def _one_image(b64: str, spec: ImagePreprocessing) -> np.ndarray:
    try:  # Pillow is the optional `image` extra: devices without image models skip its 22 MB
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise UnsupportedInputError(
            "image input needs Pillow, which this agent lacks: pip install 'autodl[agent,image]'"
        ) from exc

    try:
        raw = base64.b64decode(b64, validate=True)
        opened = Image.open(io.BytesIO(raw))  # reads the header only
        width, height = opened.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidInputError(
                f"'image' decodes to {width} x {height} pixels, over the limit of {MAX_IMAGE_PIXELS} pixels"
            )
        opened.load()
    except InvalidInputError:
        raise
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise InvalidInputError(f"'image' is not a base64-encoded image: {exc}") from exc
    height, width = spec.size
    image = opened.convert("L" if spec.grayscale else "RGB").resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) * spec.scale
    if spec.invert:
        array = 1.0 - array
    if array.ndim == 2:
        array = array[..., np.newaxis]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    array = (array - mean) / std
    return np.transpose(array, (2, 0, 1)) if spec.channels_first else array

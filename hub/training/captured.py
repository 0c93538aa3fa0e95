"""Captured hard examples as training rows (`data.include_captured`).

The hub's dataset of a model (`hub.datasets`) holds each item's raw request as a device
received it; here a labelled item becomes what the task's loader reads: an image decoded
like a file of an image folder, or a text with its label. The data report says how many rows
came from the field and which classes they fill; the version's lineage lists their ids.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from hub.training.dataset import Issue
from hub.training.errors import DataError

__all__ = ["CapturedRow", "captured_images", "captured_issue", "captured_texts"]


@dataclass(frozen=True)
class CapturedRow:
    """One labelled captured item: its id, label and raw request body."""

    id: str
    label: str
    content: bytes


def _body(row: CapturedRow) -> dict[str, object]:
    try:
        body = json.loads(row.content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"data.include_captured: item {row.id} is not a JSON request: {exc}") from exc
    if not isinstance(body, dict):
        raise DataError(f"data.include_captured: item {row.id} is not a JSON object")
    return body


def _first(value: object) -> object:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def captured_images(rows: Sequence[CapturedRow]) -> list[tuple[str, bytes, str]]:
    """Return (id, encoded image bytes, label) of image requests (``{"image": base64}``)."""
    out = []
    for row in rows:
        image = _first(_body(row).get("image"))
        if not isinstance(image, str):
            raise DataError(f"data.include_captured: item {row.id} holds no single 'image' (base64)")
        try:
            out.append((row.id, base64.b64decode(image, validate=True), row.label))
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"data.include_captured: item {row.id}: 'image' is not base64") from exc
    return out


def captured_texts(rows: Sequence[CapturedRow]) -> list[tuple[str, str, str]]:
    """Return (id, text, label) of text requests (``{"text": "..."}``)."""
    out = []
    for row in rows:
        text = _first(_body(row).get("text"))
        if not isinstance(text, str):
            raise DataError(f"data.include_captured: item {row.id} holds no single 'text'")
        out.append((row.id, text, row.label))
    return out


def captured_issue(labels: Sequence[str], model: str) -> Issue:
    """Report rows from the field and the classes they fill."""
    counts = Counter(labels)
    by_class = ", ".join(f"{label}: {n}" for label, n in sorted(counts.items()))
    return Issue(
        "from_field",
        len(labels),
        f"{len(labels)} labelled items captured on devices running {model} ({by_class})",
        f"added {len(labels)} rows",
    )

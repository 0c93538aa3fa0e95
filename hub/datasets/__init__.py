"""Datasets of captured hard examples, one per model: upload from devices, labels, export and import.

items (the domain: store a device's batch idempotently, list, label, delete, export, import) and
captured (read labelled items back as training rows for `data.include_captured`).
"""

from __future__ import annotations

from hub.datasets.items import (
    CaptureCounters,
    UnknownItemError,
    delete_item,
    export_items,
    get_item,
    import_labels,
    item_content,
    label_item,
    list_items,
    store_batch,
)

__all__ = [
    "CaptureCounters",
    "UnknownItemError",
    "delete_item",
    "export_items",
    "get_item",
    "import_labels",
    "item_content",
    "label_item",
    "list_items",
    "store_batch",
]

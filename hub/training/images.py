"""Load images: a folder with one sub-folder per class, or the built-in digits.

Every file is opened and decoded; files that do not decode are reported and dropped.
Pixels are scaled to [0, 1] and normalized with the data set's mean and standard
deviation, which the manifest's image preprocessing repeats on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hub.training.captured import CapturedRow, captured_images, captured_issue
from hub.training.dataset import Dataset, ImageInfo, Issue, QualityReport, class_report, hash_files, resolve_path
from hub.training.errors import DataError
from hub.training.spec import TaskSpec

__all__ = ["load_images"]


def load_images(spec: TaskSpec, base_dir: Path, captured: Sequence[CapturedRow] = ()) -> Dataset:
    """Load the task's images (and labelled captured ones), check them, and normalize them."""
    if spec.data.path == "builtin:digits":
        return _digits(spec, captured)
    root = resolve_path(spec.data.path, base_dir)
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder (an image folder has one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data.path: {root} has no class sub-folders")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.is_file() and not path.name.startswith(".")
    ]
    height, width = spec.data.image_size
    channels = 1 if spec.data.grayscale else 3
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    digests: list[bytes] = []
    issues: list[Issue] = []
    unreadable: list[str] = []
    for path, label in files:
        raw = path.read_bytes()
        try:
            array = _decode(raw, (height, width), spec.data.grayscale)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            unreadable.append(f"{path.relative_to(root)} ({type(exc).__name__})")
            continue
        pixels.append(array)
        labels.append(label)
        digests.append(hashlib.sha256(array.tobytes()).digest())
    if unreadable:
        issues.append(
            Issue(
                "unreadable_file",
                len(unreadable),
                "cannot decode: " + ", ".join(unreadable[:10]),
                f"dropped {len(unreadable)} files",
            )
        )
    if not pixels:
        raise DataError(f"data.path: no readable images under {root}")
    x = np.stack(pixels).reshape(len(pixels), height, width, channels).transpose(0, 3, 1, 2)
    y = np.array(labels, dtype=np.int64)
    data_hash = hash_files([p for p, _ in files], root)
    x, y, data_hash = _add_captured(spec, captured, x, y, tuple(classes), digests, issues, data_hash)
    return _finish(spec, x, y, tuple(classes), digests, len(files) + len(captured), issues, data_hash, len(captured))


def _decode(raw: bytes, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """Decode fully (``load`` catches truncated files that ``open`` accepts) and resize."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        converted = image.convert("L" if grayscale else "RGB").resize((size[1], size[0]))
        return np.asarray(converted, dtype=np.float32) / 255.0


def _add_captured(
    spec: TaskSpec,
    captured: Sequence[CapturedRow],
    x: np.ndarray,
    y: np.ndarray,
    classes: tuple[str, ...],
    digests: list[bytes],
    issues: list[Issue],
    data_hash: str,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode captured images like the others (same size, channels and [0, 1] scale) and append them."""
    if not captured:
        return x, y, data_hash
    height, width = x.shape[2], x.shape[3]
    grayscale = x.shape[1] == 1
    pixels, labels = [], []
    for item, raw, label in captured_images(captured):
        if label not in classes:
            raise DataError(f"data.include_captured: item {item} is labelled {label!r}, not one of {list(classes)}")
        try:
            array = _decode(raw, (height, width), grayscale)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise DataError(f"data.include_captured: item {item} does not decode as an image: {exc}") from exc
        pixels.append(array.reshape(height, width, 1 if grayscale else 3).transpose(2, 0, 1))
        labels.append(label)
        digests.append(hashlib.sha256(pixels[-1].tobytes()).digest())
    issues.append(captured_issue(labels, spec.data.include_captured.model if spec.data.include_captured else "?"))
    ids = "".join(sorted(row.id for row in captured))
    data_hash = hashlib.sha256((data_hash + ids).encode()).hexdigest()
    x = np.concatenate([x, np.stack(pixels).astype(x.dtype)])
    y = np.concatenate([y, np.array([classes.index(label) for label in labels], dtype=np.int64)])
    return x, y, data_hash


def _digits(spec: TaskSpec, captured: Sequence[CapturedRow] = ()) -> Dataset:
    """scikit-learn's 8x8 handwritten digits, ink intensity 0..16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    issues: list[Issue] = []
    outside = (images < 0) | (images > 16)
    if outside.any():
        issues.append(Issue("out_of_range", int(outside.sum()), "pixels outside 0..16", "clipped to 0..16"))
    x = (np.clip(images, 0, 16) / 16.0)[:, None, :, :]
    digests = [hashlib.sha256(row.tobytes()).digest() for row in x]
    data_hash = hashlib.sha256(np.ascontiguousarray(bunch.images).tobytes() + bunch.target.tobytes()).hexdigest()
    classes = tuple(str(int(c)) for c in bunch.target_names)
    y = np.asarray(bunch.target, dtype=np.int64)
    rows_in = len(x) + len(captured)
    x, y, data_hash = _add_captured(spec, captured, x, y, classes, digests, issues, data_hash)
    return _finish(spec, x, y, classes, digests, rows_in, issues, data_hash, len(captured))


def _finish(
    spec: TaskSpec,
    x: np.ndarray,
    y: np.ndarray,
    classes: tuple[str, ...],
    digests: list[bytes],
    rows_in: int,
    issues: list[Issue],
    data_hash: str,
    field_rows: int = 0,
) -> Dataset:
    """Drop duplicate images, report classes, normalize; the last `field_rows` rows came from devices."""
    field = np.zeros(len(x), dtype=bool)
    field[len(x) - field_rows :] = field_rows > 0
    seen: set[bytes] = set()
    keep = np.ones(len(x), dtype=bool)
    for i, digest in enumerate(digests):
        key = digest + int(y[i]).to_bytes(4, "little")
        if key in seen:
            keep[i] = False
        seen.add(key)
    if (count := int((~keep).sum())) > 0:
        action = f"dropped {count} images" if spec.data.clean else "kept (clean: false)"
        issues.append(Issue("duplicates", count, f"{count} images repeat an earlier one of the same class", action))
        if spec.data.clean:
            x, y, field = x[keep], y[keep], field[keep]
    blank = np.array([float(img.max() - img.min()) == 0.0 for img in x], dtype=bool)
    if blank.any():
        issues.append(
            Issue("constant_image", int(blank.sum()), f"{int(blank.sum())} images are one flat colour", "kept")
        )
    counts, imbalance = class_report(y, classes)
    if imbalance is not None:
        issues.append(imbalance)
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-6)
    x = ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    info = ImageInfo(
        size=(int(x.shape[2]), int(x.shape[3])),
        channels=int(x.shape[1]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
    return Dataset(
        kind="image",
        y=y,
        report=QualityReport(rows_in, len(y), tuple(issues), counts),
        data_hash=data_hash,
        x=x,
        labels=classes,
        image=info,
        class_weighted=imbalance is not None,
        field=field if field.any() else None,
    )

"""Build-pipeline test data: the digits CNN trained on sklearn's digits, its build request, varied sentences.

Needs torch (the hub's extra): import it after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hub.build.request import BuildRequest

__all__ = ["CLASSES", "Digits", "digits_cnn", "digits_request", "sentences", "train_digits"]


@dataclass(frozen=True)
class Digits:
    model: torch.nn.Module
    train: np.ndarray
    validation: np.ndarray
    labels: np.ndarray


def digits_cnn() -> torch.nn.Sequential:
    """A small conv net for 8x8 digit images."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 16, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def train_digits() -> Digits:
    """Return the digits CNN, trained on sklearn's load_digits (a few seconds)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    torch.manual_seed(0)
    # One thread: on a shared 2-core runner, spinning OpenMP threads make training 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net = digits_cnn()
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    x, y = torch.from_numpy(images[:1400]), torch.from_numpy(data.target[:1400])
    for _ in range(15):
        order = torch.randperm(1400)
        for start in range(0, 1400, 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
    net.eval()
    torch.set_num_threads(threads)
    return Digits(net, images[:1400], images[1400:], data.target[1400:])


CLASSES = [str(i) for i in range(10)]


def digits_request(digits: Digits, **overrides: object) -> BuildRequest:
    """A build request for the digits CNN; keyword arguments override fields."""
    fields: dict[str, object] = {
        "name": "digits",
        "version": "1.0.0",
        "model": digits.model,
        "validation": {"input": digits.validation},
        "labels": digits.labels,
        "calibration": {"input": digits.train[:256]},
        "output_names": ("logits",),
        "class_names": CLASSES,
    }
    fields.update(overrides)
    return BuildRequest(**fields)  # type: ignore[arg-type]


SUBJECTS = ["The engineer", "A small robot", "My grandmother", "The committee", "Our edge device", "A hungry cat",
            "The river", "This database", "The violinist", "A delivery drone"]  # fmt: skip
VERBS = ["quietly repaired", "refused to process", "painted", "measured", "forgot about", "celebrated", "uploaded"]
OBJECTS = ["the broken sensor before dawn.", "a report on quarterly revenue growth in three regions.",
           "the old bridge near the village", "every photo from last summer's trip to the mountains",
           "an unusually long list of tasks that nobody wanted to do", "the firmware"]  # fmt: skip


def sentences(n: int) -> list[str]:
    """Varied sentences of different lengths and topics."""
    return [f"{SUBJECTS[i % 10]} {VERBS[(i * 3) % 7]} {OBJECTS[(i * 5) % 6]}" for i in range(n)]

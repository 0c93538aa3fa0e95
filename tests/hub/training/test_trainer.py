"""The training loop: seeded, early-stopping, cancellable, and honest about its device."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hub.training.errors import TrainingCancelled
from hub.training.trainer import FitConfig, choose_device, fit, predict


def _data(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return {"features": x}, y


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


def _config(**changes: object) -> FitConfig:
    values: dict[str, object] = {
        "epochs": 8, "batch_size": 16, "optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0,
        "patience": 3, "seed": 3, "metric": "accuracy", "classification": True,
    }  # fmt: skip
    values.update(changes)
    return FitConfig(**values)  # type: ignore[arg-type]


def _train(seed: int, **changes: object) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    model = _Net()
    inputs, y = _data()
    result = fit(
        model, inputs, y, _config(**changes), device=torch.device("cpu"),
        val_inputs={"features": inputs["features"][:50]}, val_y=y[:50],
    )  # fmt: skip
    return model, result


def test_same_seed_same_model() -> None:
    first, a = _train(1)
    second, b = _train(1)
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a == b


def test_learns_the_rule() -> None:
    model, result = _train(0)
    inputs, y = _data(seed=5)
    accuracy = float((predict(model, inputs).argmax(1) == y).mean())
    assert accuracy > 0.9


def test_early_stopping_stops_when_nothing_improves() -> None:
    # lr=0: the validation score never changes, so the run stops after `patience` epochs.
    _, result = _train(0, lr=0.0, epochs=50, patience=2)
    assert result.epochs_run == 3 and result.best_epoch == 1  # type: ignore[attr-defined]


def test_cancel_stops_training() -> None:
    cancel = threading.Event()
    cancel.set()
    inputs, y = _data()
    with pytest.raises(TrainingCancelled):
        fit(_Net(), inputs, y, _config(), device=torch.device("cpu"), cancel=cancel)


def test_device_choice_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hub.training.trainer"):
        device = choose_device(use_gpu=False)
    assert device.type == "cpu"
    assert "training on CPU (resource.use_gpu is false)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hub.training.trainer"):
        device = choose_device(use_gpu=True)
    if torch.cuda.is_available():
        assert device.type == "cuda" and "training on CUDA" in caplog.text
    else:
        assert device.type == "cpu" and "no CUDA device is available" in caplog.text


def test_tabular_preprocessing_lives_in_the_onnx_graph(tmp_path: Path) -> None:
    """Imputation, caps, standardization and one-hot run in ONNX Runtime on raw rows."""
    import onnxruntime as ort

    from hub.training.data import load_dataset
    from hub.training.spec import load_spec
    from hub.training.zoo import build_model
    from tests.support.paths import EXAMPLES

    spec = load_spec(EXAMPLES / "churn" / "task.yaml")
    data = load_dataset(spec, EXAMPLES / "churn")
    model = build_model("mlp-small", data, spec, {"dropout": 0.0}, EXAMPLES).eval()
    assert data.tabular is not None
    contract = data.tabular.features.index("contract")
    charges = data.tabular.features.index("monthly_charges")
    rows = data.x[:4].copy()  # type: ignore[index]
    rows[0, charges] = np.nan  # a missing value: imputed in the graph
    rows[1, charges] = 1e6  # an outlier: capped in the graph
    rows[2, contract] = -1  # an unknown category: an all-zero one-hot
    path = tmp_path / "tab.onnx"
    torch.onnx.export(
        model, (torch.from_numpy(rows),), str(path), input_names=["features"], output_names=["logits"],
        dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"features": rows})[0]
    torch_out = predict(model, {"features": rows})
    assert np.isfinite(onnx_out).all()
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-4, atol=1e-5)
    capped = rows.copy()
    capped[1, charges] = data.tabular.bounds["monthly_charges"][1]
    np.testing.assert_allclose(session.run(None, {"features": capped})[0][1], onnx_out[1], rtol=1e-5)
    filled = rows.copy()
    filled[0, charges] = data.tabular.fill["monthly_charges"]
    np.testing.assert_allclose(session.run(None, {"features": filled})[0][0], onnx_out[0], rtol=1e-5)
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert {"IsNaN", "Where", "Equal"} <= ops

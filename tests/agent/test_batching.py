"""Dynamic batching with real ONNX Runtime sessions: rows split back exactly, models whose rows mix refused."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from agent.batching import Batcher
from agent.runtime import LoadedModel, load_model
from agent.telemetry import Telemetry
from shared import metrics
from shared.manifest import Batching, TensorSpec
from tests.support.models import SAMPLE_X, make_model_release, make_release

KEY = Ed25519PrivateKey.generate()


def _load(tmp_path: Path, release: object) -> LoadedModel:
    manifest = release.manifest  # type: ignore[attr-defined]
    path = tmp_path / f"{manifest.name}.onnx"
    path.write_bytes(release.files[manifest.variants[0].sha256])  # type: ignore[attr-defined]
    return load_model(manifest, manifest.variants[0], path, threads=1)


def centered_release() -> object:
    """y = x - mean(x over the batch): each row depends on the rows run with it."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "centered",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    expected = SAMPLE_X - SAMPLE_X.mean(axis=0, keepdims=True)
    spec = [TensorSpec(name="x", dtype="float32", shape=["batch", 4])]
    out = [TensorSpec(name="y", dtype="float32", shape=["batch", 4])]
    return make_model_release(
        KEY, "centered", model.SerializeToString(), spec, out, {"x": SAMPLE_X}, {"y": expected}, batching=Batching()
    )


def test_a_model_whose_rows_mix_is_never_batched(tmp_path: Path) -> None:
    model = _load(tmp_path, centered_release())
    assert model.rows_independent is not None and "differs" in model.rows_independent
    assert not Batcher(model, Batching(), lambda *a: None).batching


@pytest.mark.parametrize("instances", [1, 2])
def test_concurrent_requests_share_runs_and_get_their_own_rows_exactly(tmp_path: Path, instances: int) -> None:
    model = _load(tmp_path, make_release(KEY, "lin", "1.0.0", seed=5))
    runs: list[tuple[int, list[float]]] = []
    lock = threading.Lock()

    def stats(name: str, version: str, rows: int, waited: list[float], compute: float) -> None:
        with lock:
            runs.append((rows, waited))

    batcher = Batcher(model, Batching(max_batch_size=16, max_queue_delay_us=20_000), stats, instances)
    assert batcher.batching
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(1 + i % 3, 4)).astype(np.float32) for i in range(24)]
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        results[i] = batcher.run({"x": inputs[i]})["y"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, x in enumerate(inputs):
        assert results[i].tobytes() == model.run({"x": x})["y"].tobytes()
    assert sum(rows for rows, _ in runs) == sum(len(x) for x in inputs)
    assert max(rows for rows, _ in runs) > 3 and all(rows <= 16 for rows, _ in runs)


def test_queue_compute_and_batch_size_reach_telemetry_and_metrics(tmp_path: Path) -> None:
    telemetry = Telemetry(tmp_path)
    telemetry.observe("m", "1.0.0", 0.004, True)
    telemetry.observe_batch("m", "1.0.0", 6, [0.001, 0.003], 0.002)
    telemetry.refused("content_length")
    points = {name: value for name, value, labels in telemetry.collect() if labels.get("model") == "m"}
    assert points[metrics.BATCH_SIZE_MEAN] == 6 and points[metrics.BATCHES] == 1
    assert points[metrics.COMPUTE_P50_MS] == 2.0 and points[metrics.QUEUE_P95_MS] == 3.0
    text = telemetry.prometheus([])
    assert 'autodl_agent_batch_size_bucket{le="8",model="m",version="1.0.0"} 1' in text
    assert 'autodl_agent_http_refused_total{reason="content_length"} 1' in text
    assert 'autodl_agent_batch_size_count{model="m",version="1.0.0"} 1' in text
    assert 'autodl_agent_compute_seconds_total{model="m",version="1.0.0"} 0.002' in text

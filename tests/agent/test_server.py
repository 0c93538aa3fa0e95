"""The local inference API over real HTTP with real ONNX Runtime sessions."""

from __future__ import annotations

import base64
import io
import sys
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from agent.errors import ModelLoadError, SmokeTestError
from agent.runtime import LoadedModel, ModelRegistry, load_model, smoke_test
from agent.server import InferenceServer, ServerContext
from shared.manifest import (
    Batching,
    ImagePreprocessing,
    Manifest,
    Postprocessing,
    Preprocessing,
    Sample,
    TensorSpec,
    TextPreprocessing,
    Variant,
)
from tests.support.models import SAMPLE_X, linear_weights, make_release, reference, slow_linear_onnx, tensor

KEY = Ed25519PrivateKey.generate()


def load(tmp_path: Path, manifest: Manifest, data: bytes, tokenizer: Path | None = None) -> LoadedModel:
    path = tmp_path / f"{manifest.name}-{manifest.version}.onnx"
    path.write_bytes(data)
    return load_model(manifest, manifest.variants[0], path, threads=1, tokenizer_path=tokenizer)


def linear(tmp_path: Path, version: str = "1.0.0", seed: int = 1, **kw: object) -> LoadedModel:
    release = make_release(KEY, "lin", version, seed, **kw)  # type: ignore[arg-type]
    return load(tmp_path, release.manifest, release.files[release.sha256])


@pytest.fixture
def api() -> Iterator[tuple[ModelRegistry, str]]:
    registry = ModelRegistry()
    server = InferenceServer("127.0.0.1", 0, ServerContext(registry, lambda: True, lambda: {"ok": True}))
    server.start()
    try:
        yield registry, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def v2_request(x: np.ndarray, datatype: str = "FP32") -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}


def test_v2_infer_returns_the_reference_output(tmp_path: Path, api: tuple[ModelRegistry, str]) -> None:
    registry, url = api
    registry.activate(linear(tmp_path))
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    meta = httpx.get(f"{url}/v2/models/lin").json()
    assert meta["versions"] == ["1.0.0"] and meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    out = httpx.post(f"{url}/v2/models/lin/infer", json=v2_request(SAMPLE_X)).json()
    y = np.asarray(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
    np.testing.assert_allclose(y, reference(SAMPLE_X, *linear_weights(1)), rtol=1e-5, atol=1e-5)
    assert out["model_version"] == "1.0.0" and out["outputs"][0]["datatype"] == "FP32"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (v2_request(np.zeros((2, 5), np.float32)), "expected x float32[batch, 4]"),
        (v2_request(np.zeros((2, 4), np.int64), "INT64"), "dtype int64, expected x float32[batch, 4]"),
        ({"inputs": [{"name": "z", "shape": [1], "datatype": "FP32", "data": [1]}]}, "unknown input 'z'"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}, "does not fit shape"),
        ({"nothing": 1}, "'inputs' list"),
    ],
)
def test_bad_infer_requests_get_400_naming_the_spec(
    tmp_path: Path, api: tuple[ModelRegistry, str], body: dict[str, object], message: str
) -> None:
    registry, url = api
    registry.activate(linear(tmp_path))
    response = httpx.post(f"{url}/v2/models/lin/infer", json=body)
    assert response.status_code == 400 and message in response.json()["error"]
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.post(f"{url}/v2/models/nope/infer", json=body).status_code == 404
    assert httpx.post(f"{url}/v2/models/lin/infer", content=b"{broken").status_code == 400


def test_predict_applies_softmax_labels_and_top_k(tmp_path: Path, api: tuple[ModelRegistry, str]) -> None:
    registry, url = api
    post = Postprocessing(softmax=True, top_k=2)
    registry.activate(linear(tmp_path, labels=["cat", "dog", "eel"], postprocessing=post))
    answer = httpx.post(f"{url}/v1/models/lin:predict", json={"data": [1.0, 2.0, 3.0, 4.0]}).json()
    logits = reference(SAMPLE_X[:1], *linear_weights(1))[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs)[:2]
    top = answer["predictions"][0]
    assert [p["label"] for p in top] == [["cat", "dog", "eel"][i] for i in order]
    assert top[0]["score"] == pytest.approx(float(probs[order[0]]), rel=1e-5)
    bad = httpx.post(f"{url}/v1/models/lin:predict", json={"data": [1.0, 2.0]})
    assert bad.status_code == 400 and "float32[batch, 4]" in bad.json()["error"]


def test_smoke_test_and_load_failures_are_typed(tmp_path: Path) -> None:
    smoke_test(linear(tmp_path))
    with pytest.raises(SmokeTestError, match="max difference"):
        smoke_test(linear(tmp_path, version="1.0.1", wrong_sample=True))
    release = make_release(KEY, "lin", "1.0.2", 1, model_bytes=b"not an onnx model")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load(tmp_path, release.manifest, b"not an onnx model")


def test_hot_swap_under_load_fails_no_request(tmp_path: Path, api: tuple[ModelRegistry, str]) -> None:
    registry, url = api
    models = [linear(tmp_path, version="1.0.0", seed=1), linear(tmp_path, version="2.0.0", seed=2)]
    expected = {"1.0.0": reference(SAMPLE_X, *linear_weights(1)), "2.0.0": reference(SAMPLE_X, *linear_weights(2))}
    registry.activate(models[0])
    stop = threading.Event()
    failures: list[str] = []
    seen: set[str] = set()

    def loop() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                r = client.post(f"{url}/v2/models/lin/infer", json=v2_request(SAMPLE_X))
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                body = r.json()
                y = np.asarray(body["outputs"][0]["data"], np.float32).reshape(2, 3)
                if not np.allclose(y, expected[body["model_version"]], atol=1e-5):
                    failures.append(f"wrong output for {body['model_version']}")
                seen.add(body["model_version"])

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(40):
        registry.activate(models[(i + 1) % 2])
        threading.Event().wait(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert failures == [] and seen == {"1.0.0", "2.0.0"}


def test_quick_models_are_answered_by_the_selector_and_slow_or_waiting_ones_by_workers(tmp_path: Path) -> None:
    """A model whose runs are quick is answered on the selector thread once its first run is timed."""
    threads: dict[str, list[str]] = {}

    def track(model: LoadedModel) -> nullcontext[None]:
        threads.setdefault(model.name, []).append(threading.current_thread().name)
        return nullcontext()

    slow = make_release(KEY, "slow", "1.0.0", 1, model_bytes=slow_linear_onnx(1, rounds=2))
    waits = make_release(KEY, "waits", "1.0.0", 1)  # quick, but its requests wait for a batch to fill
    registry = ModelRegistry()
    for model in (linear(tmp_path), load(tmp_path, slow.manifest, slow.files[slow.sha256]),
                  load(tmp_path, waits.manifest, waits.files[waits.sha256])):  # fmt: skip
        registry.activate(model)
    batching = {"waits": Batching(max_batch_size=4, max_queue_delay_us=500)}
    context = ServerContext(registry, lambda: True, dict, track=track, batching=lambda m: batching.get(m.name))
    server = InferenceServer("127.0.0.1", 0, context)
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            for name in ("lin", "slow", "waits"):
                for _ in range(20):
                    out = client.post(f"/v2/models/{name}/infer", json=v2_request(SAMPLE_X)).json()["outputs"][0]
                    y = np.asarray(out["data"], np.float32).reshape(out["shape"])
                    np.testing.assert_allclose(y, reference(SAMPLE_X, *linear_weights(1)), rtol=1e-5, atol=1e-5)
    finally:
        server.stop()
    assert threads["lin"][0] != "http-select" and threads["lin"][-10:] == ["http-select"] * 10
    assert "http-select" not in threads["slow"] + threads["waits"]


def _onnx(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_text_is_tokenized_with_tokenizers_and_mean_pooled(tmp_path: Path, api: tuple[ModelRegistry, str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "edge": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    table = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
            helper.make_node("Mul", ["emb", "mask3"], ["last_hidden_state"]),
        ],
        "embed",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", 8])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )
    ids = np.array([[2, 3]], np.int64)
    manifest = Manifest(
        name="emb",
        version="1.0.0",
        task="embedding",
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "seq"]), TensorSpec(name="attention_mask", dtype="int64", shape=["batch", "seq"])],
        outputs=[TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "seq", 8])],
        preprocessing=Preprocessing(type="text", text=TextPreprocessing(tokenizer_sha256="0" * 64, tokenizer_size=1)),
        postprocessing=Postprocessing(pooling="mean", normalize=True),
        sample=Sample(inputs={"input_ids": tensor(ids), "attention_mask": tensor(np.ones_like(ids))}, outputs={"last_hidden_state": tensor(table[ids])}),
        variants=[Variant(target="cpu-fp32", precision="fp32", providers=["CPUExecutionProvider"], file="m.onnx", size=1, sha256="0" * 64)],
    )  # fmt: skip
    registry, url = api
    model = load(tmp_path, manifest, _onnx(graph), tokenizer=tok_path)
    smoke_test(model)
    registry.activate(model)
    answer = httpx.post(f"{url}/v1/models/emb:predict", json={"text": ["hello world", "edge"]}).json()
    for text_ids, got in zip([[2, 4], [3]], answer["predictions"], strict=True):
        want = table[text_ids].mean(axis=0)
        np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)


def _image_model(tmp_path: Path) -> LoadedModel:
    """A 2x2 grayscale image model that returns its normalized pixels."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1)],
        "flat",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["batch", 4])],
    )
    x = np.zeros((1, 1, 2, 2), np.float32)
    manifest = Manifest(
        name="img",
        version="1.0.0",
        task="classification",
        inputs=[TensorSpec(name="pixels", dtype="float32", shape=["batch", 1, 2, 2])],
        outputs=[TensorSpec(name="flat", dtype="float32", shape=["batch", 4])],
        preprocessing=Preprocessing(type="image", image=ImagePreprocessing(size=(2, 2), grayscale=True, mean=[0.5], std=[0.5])),
        sample=Sample(inputs={"pixels": tensor(x)}, outputs={"flat": tensor(x.reshape(1, 4))}),
        variants=[Variant(target="cpu-fp32", precision="fp32", providers=["CPUExecutionProvider"], file="m.onnx", size=1, sha256="0" * 64)],
    )  # fmt: skip
    return load(tmp_path, manifest, _onnx(graph))


def test_base64_image_is_resized_and_normalized(tmp_path: Path, api: tuple[ModelRegistry, str]) -> None:
    registry, url = api
    registry.activate(_image_model(tmp_path))
    pixels = np.array([[0, 255], [51, 102]], np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode()}
    answer = httpx.post(f"{url}/v1/models/img:predict", json=body).json()
    np.testing.assert_allclose(answer["predictions"][0], ((pixels / 255 - 0.5) / 0.5).ravel(), atol=1e-5)
    bad = httpx.post(f"{url}/v1/models/img:predict", json={"image": "bm90IGFuIGltYWdl"})
    assert bad.status_code == 400 and "not a base64-encoded image" in bad.json()["error"]


def test_image_input_without_pillow_is_501_naming_the_extra(
    tmp_path: Path, api: tuple[ModelRegistry, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, url = api
    registry.activate(_image_model(tmp_path))
    monkeypatch.setitem(sys.modules, "PIL", None)  # an agent installed without the `image` extra
    answer = httpx.post(f"{url}/v1/models/img:predict", json={"image": "aGVsbG8="})
    assert answer.status_code == 501 and "autodl[agent,image]" in answer.json()["error"]
    tensors = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": [0.0] * 4}]}
    assert httpx.post(f"{url}/v2/models/img/infer", json=tensors).status_code == 200  # tensors still served


def test_tabular_rows_map_categories_and_missing_values(tmp_path: Path, api: tuple[ModelRegistry, str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["echo"])],
        "echo",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.FLOAT, ["batch", 2])],
    )
    x = np.zeros((1, 2), np.float32)
    manifest = Manifest(
        name="tab",
        version="1.0.0",
        task="classification",
        inputs=[TensorSpec(name="features", dtype="float32", shape=["batch", 2])],
        outputs=[TensorSpec(name="echo", dtype="float32", shape=["batch", 2])],
        preprocessing=Preprocessing(type="tabular", features=["contract", "tenure"], categories={"contract": ["monthly", "yearly"]}),
        sample=Sample(inputs={"features": tensor(x)}, outputs={"echo": tensor(x)}),
        variants=[Variant(target="cpu-fp32", precision="fp32", providers=["CPUExecutionProvider"], file="m.onnx", size=1, sha256="0" * 64)],
    )  # fmt: skip
    registry, url = api
    registry.activate(load(tmp_path, manifest, _onnx(graph)))
    rows = [{"contract": "yearly", "tenure": 12}, {"contract": "weekly", "tenure": None}]
    answer = httpx.post(f"{url}/v1/models/tab:predict", json={"features": rows}).json()
    assert answer["predictions"][0] == [1.0, 12.0]
    unknown_category, missing_value = answer["predictions"][1]
    assert unknown_category == -1.0 and np.isnan(missing_value)
    bad = httpx.post(f"{url}/v1/models/tab:predict", json={"features": {"contract": "monthly", "tenure": "long"}})
    assert bad.status_code == 400 and "feature 'tenure'" in bad.json()["error"]
    missing = httpx.post(f"{url}/v1/models/tab:predict", json={"features": {"contract": "monthly"}})
    assert missing.status_code == 400 and "missing feature columns: tenure" in missing.json()["error"]

"""The test models: tiny ONNX linear models, a slow one with the same answers, signed releases.

Every version is a linear model y = x @ W + b of its own seed (`linear_weights`), so an
agent's answer to SAMPLE_X tells which bytes it really runs (`reference`). onnx is fine in
tests, never in the agent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from shared.manifest import (
    Batching,
    Manifest,
    Postprocessing,
    Preprocessing,
    Sample,
    SignedManifest,
    TensorData,
    TensorSpec,
    Variant,
    sign_manifest,
)
from shared.targets import TargetId

__all__ = [
    "SAMPLE_X",
    "Release",
    "linear_io_model",
    "linear_onnx",
    "linear_weights",
    "make_release",
    "reference",
    "slow_linear_onnx",
    "tensor",
    "write_files",
]

SAMPLE_X = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], dtype=np.float32)


def linear_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return a deterministic (W, b) for a 4 -> 3 linear model."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)


def linear_onnx(weights: np.ndarray, bias: np.ndarray, padding_bytes: int = 0) -> bytes:
    """Return an ONNX model y = x @ W + b (x float32[batch, 4], y float32[batch, 3])."""
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    if padding_bytes:
        # An unused initializer makes the file big enough to interrupt its download.
        pad = np.random.default_rng(0).integers(0, 255, size=padding_bytes, dtype=np.uint8)
        inits.append(numpy_helper.from_array(pad, "padding"))
    return linear_io_model(nodes, inits, "linear")


def linear_io_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], name: str) -> bytes:
    """Return a checked opset-17 model of `nodes` from x float32[batch, 4] to y float32[batch, 3]."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def slow_linear_onnx(seed: int, rounds: int = 24, width: int = 256) -> bytes:
    """Return y = x @ W + b of `seed`, plus a chain of width x width MatMuls whose sum is added times zero.

    The outputs equal `linear_onnx`'s (the manifest sample passes), but every request pays
    for `rounds` real matrix products on data derived from the input: an honest model that
    is correct and slow (about rounds * width**3 multiply-adds a request).
    """
    weights, bias = linear_weights(seed)
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(rng.normal(size=(4, width)).astype(np.float32), "P"),
        numpy_helper.from_array((rng.normal(size=(width, width)) / width).astype(np.float32), "Q"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["lin"]),
        helper.make_node("MatMul", ["x", "P"], ["h0"]),
        helper.make_node("Transpose", ["h0"], ["h0t"]),
        helper.make_node("MatMul", ["h0t", "h0"], ["m0"]),
    ]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "Q"], [f"p{i}"]))
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [f"m{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"m{rounds}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["nothing"]),
        helper.make_node("Add", ["lin", "nothing"], ["y"]),
    ]
    return linear_io_model(nodes, inits, "slow_linear")


def reference(x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Return what the model must compute."""
    return (x @ weights + bias).astype(np.float32)


@dataclass(frozen=True)
class Release:
    """A signed model version and its files, as a hub would publish it."""

    name: str
    version: str
    signed: SignedManifest
    files: dict[str, bytes]  # sha256 -> bytes

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest

    @property
    def sha256(self) -> str:
        return self.manifest.variants[0].sha256


def tensor(array: np.ndarray) -> TensorData:
    if array.dtype == object:  # strings (ONNX string tensors)
        values = [v.decode() if isinstance(v, bytes) else str(v) for v in array.ravel()]
        return TensorData(dtype="string", shape=list(array.shape), data=values)
    return TensorData(dtype=str(array.dtype), shape=list(array.shape), data=array.ravel().tolist())  # type: ignore[arg-type]


def make_release(
    key: Ed25519PrivateKey,
    name: str,
    version: str,
    seed: int,
    *,
    padding_bytes: int = 0,
    wrong_sample: bool = False,
    labels: list[str] | None = None,
    postprocessing: Postprocessing | None = None,
    target: TargetId = TargetId.CPU_FP32,
    model_bytes: bytes | None = None,
    expected: np.ndarray | None = None,
) -> Release:
    """Build a linear model version (or `model_bytes`, whose output on SAMPLE_X is `expected`), sign it."""
    weights, bias = linear_weights(seed)
    data = model_bytes if model_bytes is not None else linear_onnx(weights, bias, padding_bytes)
    expected = reference(SAMPLE_X, weights, bias) if expected is None else expected
    if wrong_sample:
        expected = expected + 10.0  # the model will not reproduce this: its smoke test fails
    sha = hashlib.sha256(data).hexdigest()
    manifest = Manifest(
        name=name,
        version=version,
        task="classification",
        inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 3])],
        preprocessing=Preprocessing(type="tensor"),
        postprocessing=postprocessing or Postprocessing(),
        labels=labels,
        sample=Sample(inputs={"x": tensor(SAMPLE_X)}, outputs={"y": tensor(expected)}, atol=1e-4, rtol=1e-4),
        variants=[
            Variant(
                target=target,
                precision="fp32",
                providers=["CPUExecutionProvider"],
                file="model.onnx",
                size=len(data),
                sha256=sha,
            )
        ],
    )
    return Release(name, version, sign_manifest(manifest, key), {sha: data})


def write_files(release: Release, directory: Path) -> dict[str, Path]:
    """Write a release's files by name (for hub.registry.publish_version)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for variant in release.manifest.variants:
        path = directory / variant.file
        path.write_bytes(release.files[variant.sha256])
        out[variant.file] = path
    return out


def make_model_release(
    key: Ed25519PrivateKey,
    name: str,
    data: bytes,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    sample_in: dict[str, np.ndarray],
    sample_out: dict[str, np.ndarray],
    *,
    version: str = "1.0.0",
    batching: Batching | None = None,
    preprocessing: Preprocessing | None = None,
) -> Release:
    """Sign any ONNX model with its interface and an exact sample (fp32 on CPU)."""
    sha = hashlib.sha256(data).hexdigest()
    manifest = Manifest(
        name=name,
        version=version,
        task="classification",
        inputs=inputs,
        outputs=outputs,
        preprocessing=preprocessing or Preprocessing(type="tensor"),
        sample=Sample(
            inputs={k: tensor(v) for k, v in sample_in.items()},
            outputs={k: tensor(v) for k, v in sample_out.items()},
            atol=1e-5,
            rtol=1e-5,
        ),
        variants=[
            Variant(
                target=TargetId.CPU_FP32,
                precision="fp32",
                providers=["CPUExecutionProvider"],
                file="model.onnx",
                size=len(data),
                sha256=sha,
                batching=batching,
            )
        ],
    )
    return Release(name, version, sign_manifest(manifest, key), {sha: data})

"""Publishing a text-generation version: every file of each folder variant is stored and served."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from shared.manifest import (
    GenerationSpec,
    KvCacheLayout,
    Manifest,
    TensorSpec,
    Variant,
    VariantFile,
    load_public_key,
    verify_manifest,
)
from shared.targets import TargetId
from tests.support.hub_app import Built, Hub, upload


def _folder_version(workdir: Path) -> Built:
    files: dict[str, Path] = {}
    variants = []
    for target, precision in ((TargetId.CPU_INT4, "int4"), (TargetId.CPU_FP32, "fp32")):
        entries = []
        # tokenizer.json is byte-identical in both folders: one blob, two names.
        for name, data in (
            ("model.onnx", os.urandom(5000)),
            ("model.onnx.data", os.urandom(70_000)),
            ("tokenizer.json", b"{}"),
        ):
            path = workdir / target.value / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            rel = f"{target.value}/{name}"
            files[rel] = path
            entries.append(VariantFile(path=rel, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
        variants.append(
            Variant(
                target=target,
                precision=precision,
                providers=["CPUExecutionProvider"],
                file=entries[0].path,
                size=entries[0].size,
                sha256=entries[0].sha256,
                files=entries,
            )
        )
    manifest = Manifest(
        name="coder",
        version="1.0.0",
        task="text-generation",
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", 300])],
        generation=GenerationSpec(
            eos_token_ids=[0],
            context_length=256,
            vocab_size=300,
            kv_cache=KvCacheLayout(num_layers=2, num_kv_heads=2, head_size=8),
        ),
        variants=variants,
    )
    return Built(manifest, files)


def test_every_file_of_a_folder_variant_is_stored_served_and_signed(sqlite_hub: Hub, tmp_path: Path) -> None:
    built = _folder_version(tmp_path / "build")
    response = upload(sqlite_hub, built)
    assert response.status_code == 201, response.text
    listed = {a["file"]: a for a in response.json()["artifacts"]}
    assert set(listed) == set(built.files)
    assert listed["cpu-int4/model.onnx.data"]["target"] == "cpu-int4"
    for name, path in built.files.items():
        got = sqlite_hub.request("GET", f"/artifacts/{listed[name]['sha256']}")
        assert got.status_code == 200 and got.content == path.read_bytes(), name
    device = sqlite_hub.enrolled_device(name="d")
    # A device reads the manifests of the versions it is told to run (and only those).
    deployed = sqlite_hub.request("PUT", f"/devices/{device['device_id']}/models/coder", json={"version": "1.0.0"})
    assert deployed.status_code == 200, deployed.text
    raw = sqlite_hub.request("GET", "/models/coder/versions/1.0.0/manifest", key=device["device_token"])
    manifest = verify_manifest(raw.content, load_public_key(device["signing_public_key"]))
    assert {f.path for f in manifest.files()} == set(built.files)


def test_a_folder_file_missing_from_the_upload_is_refused(sqlite_hub: Hub, tmp_path: Path) -> None:
    built = _folder_version(tmp_path / "build")
    partial = Built(built.manifest, {k: v for k, v in built.files.items() if k != "cpu-fp32/model.onnx.data"})
    response = upload(sqlite_hub, partial)
    assert response.status_code == 422 and "cpu-fp32/model.onnx.data" in response.text

"""The text-generation gate on a tiny trained model: int4 is refused when its perplexity budget is
below what it costs, int8 within budget is published, and the signed manifest names every file,
which the registry stores and serves so that the downloaded folder runs with the shared loop.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hub.build.pipeline import BuildResult
from hub.build.textgen import build_text_generation
from hub.build.textgen_request import TextGenBuildRequest
from shared.generation import SamplingParams, load_model
from shared.manifest import load_public_key, verify_manifest
from shared.targets import TargetId
from tests.support.hub_app import Built, Hub, upload
from tests.support.lm_checkpoints import make_checkpoint, validation_texts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    root = tmp_path_factory.mktemp("gate")
    checkpoint = make_checkpoint(root / "coder", "llama", steps=20)
    request = TextGenBuildRequest(
        name="coder",
        version="1.0.0",
        checkpoint=checkpoint,
        validation_texts=tuple(validation_texts()),
        sample_prompts=("def main(", "import os\n"),
        parity_tokens=4,
        targets=(TargetId.CPU_INT8, TargetId.CPU_INT4, TargetId.CUDA_FP16, TargetId.CUDA_INT4),
        # int4 may cost nothing at all: refused; int8 has room.
        max_ppl_change={"int4": 0.0, "int8": 0.05},
        min_speedup=0.0,  # speed on a 100k-parameter model is noise; this test is about quality
        threads=1,
        decode_tokens=8,
        candidate_scores={"llama-tiny": 120.5, "qwen2-tiny": 131.0},
    )
    return build_text_generation(request, root / "work")


def test_int4_over_its_budget_is_refused_and_block_affine_int4_is_tried_next(result: BuildResult) -> None:
    entries = {e.measurement.target: e for e in result.report}
    int4 = entries[TargetId.CPU_INT4]
    # All-int4 costs perplexity (and here its greedy tokens): over a 0 % budget, refused ...
    (first,) = int4.recipe["earlier_attempts"]
    assert first["perplexity_change"] > 0 and "over the 0.00% budget" in first["reason"], first
    assert first["exporter"] == "onnxruntime-genai model builder" and "method" not in first["options"]
    # ... then block-affine int4 made from the fp32 graph, measured again, is what the gate decided on.
    assert int4.recipe["options"]["method"] == "block-affine"
    assert int4.recipe["exporter"].endswith("(cpu-fp32) + block-affine int4")
    change = int4.measurement.value / int4.measurement.reference - 1  # type: ignore[operator]
    assert int4.decision.published == (change <= 0), int4.decision.reason
    assert entries[TargetId.CPU_INT8].decision.published, entries[TargetId.CPU_INT8].decision.reason
    manifest = result.manifest
    published = {v.target for v in manifest.variants}
    assert {TargetId.CPU_FP32, TargetId.CPU_INT8, TargetId.CUDA_FP16} <= published
    # CUDA variants are built here but cannot run (no GPU): published unmeasured; cuda-int4 (the
    # builder's int4, which failed on the CPU) refused, whether block-affine then passed or not.
    cuda_fp16 = manifest.variant("cuda-fp16")
    assert cuda_fp16 is not None and cuda_fp16.precision == "fp16" and cuda_fp16.providers[0] == "CUDAExecutionProvider"
    assert cuda_fp16.metrics is not None and (cuda_fp16.metrics.latency_note or "").startswith("unmeasured")
    cuda_int4 = entries[TargetId.CUDA_INT4]
    assert not cuda_int4.decision.published
    assert ("block-affine" in cuda_int4.decision.reason) == int4.decision.published, cuda_int4.decision.reason
    assert (TargetId.CPU_INT4 in published) == int4.decision.published
    assert all(s.target in (TargetId.CPU_INT4, TargetId.CUDA_INT4) for s in manifest.skipped)
    int8 = manifest.variant("cpu-int8")
    assert int8 is not None and int8.precision == "int8" and int8.metrics is not None
    generation = int8.metrics.generation
    assert generation is not None and generation.parity_matched == 4 and generation.parity_tokens == 4
    assert generation.perplexity_change is not None and abs(generation.perplexity_change) < 0.05
    assert generation.decode_tokens_per_s and generation.decode_tokens_per_s > 0
    assert manifest.metrics["candidate.llama-tiny"] == 120.5 and manifest.lineage["candidates"]["qwen2-tiny"] == 131.0


def test_the_manifest_names_every_file_with_its_hash(result: BuildResult) -> None:
    manifest = result.manifest
    spec = manifest.generation
    assert spec is not None and spec.eos_token_ids == [0] and spec.chat_template and spec.samples
    assert spec.kv_cache.num_layers == 2 and spec.kv_cache.num_kv_heads == 2 and spec.kv_cache.head_size == 16
    named = {f.path: f for f in manifest.files()}
    assert set(named) == set(result.files)
    for variant in manifest.variants:
        names = {variant.local_path(f.path) for f in variant.artifact_files()}
        assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    for name, path in result.files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == named[name].sha256
        assert path.stat().st_size == named[name].size


def test_published_folders_download_verify_and_generate_torchs_tokens(
    result: BuildResult, sqlite_hub: Hub, tmp_path: Path
) -> None:
    response = upload(sqlite_hub, Built(result.manifest, result.files))
    assert response.status_code == 201, response.text
    device = sqlite_hub.enrolled_device(name="d")
    # A device reads only the versions in its desired state.
    deployed = sqlite_hub.request("PUT", f"/devices/{device['device_id']}/models/coder", json={"version": "1.0.0"})
    assert deployed.status_code == 200, deployed.text
    raw = sqlite_hub.request("GET", "/models/coder/versions/1.0.0/manifest", key=device["device_token"])
    manifest = verify_manifest(raw.content, load_public_key(device["signing_public_key"]))
    assert manifest.generation is not None
    for variant in manifest.variants:
        if "CUDAExecutionProvider" in variant.providers:
            continue  # fp16 attention has no CPU kernel; these run on a GPU device only
        folder = tmp_path / variant.target.value
        for item in variant.artifact_files():
            got = sqlite_hub.request("GET", f"/artifacts/{item.sha256}", key=device["device_token"])
            assert got.status_code == 200
            assert hashlib.sha256(got.content).hexdigest() == item.sha256
            dest = folder / variant.local_path(item.path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(got.content)
        model = load_model(folder, spec=manifest.generation, threads=1)
        for sample in manifest.generation.samples:
            n = manifest.generation.parity_tokens
            tokens = list(model.generate(sample.prompt_ids, SamplingParams(max_new_tokens=n)))
            assert tokens == sample.expected_ids[:n], variant.target

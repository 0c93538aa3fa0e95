"""The text-generation manifest: generation section, folder variants, per-variant generation metrics."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from shared.manifest import (
    GenerationMetrics,
    GenerationSpec,
    KvCacheLayout,
    Manifest,
    SamplePrompt,
    SignedManifest,
    TensorSpec,
    Variant,
    VariantFile,
    VariantMetrics,
    generate_signing_key,
    load_private_key,
    load_public_key,
    public_key_b64,
    sign_manifest,
    verify_manifest,
)
from shared.targets import TargetId


def _file(path: str, content: bytes) -> VariantFile:
    return VariantFile(path=path, size=len(content), sha256=hashlib.sha256(content).hexdigest())


def folder_variant(target: TargetId, precision: str) -> Variant:
    files = [
        _file(f"{target}/model.onnx", b"graph" + target.encode()),
        _file(f"{target}/model.onnx.data", b"weights" + target.encode()),
        _file(f"{target}/tokenizer.json", b"{}"),
        _file(f"{target}/genai_config.json", b"{}"),
    ]
    graph = files[0]
    return Variant(
        target=target,
        precision=precision,
        providers=["CPUExecutionProvider"],
        file=graph.path,
        size=graph.size,
        sha256=graph.sha256,
        files=files,
        metrics=VariantMetrics(
            metric="perplexity",
            value=12.5,
            reference=12.2,
            generation=GenerationMetrics(
                perplexity=12.5,
                reference_perplexity=12.2,
                perplexity_change=0.0246,
                parity_matched=8,
                parity_tokens=8,
                decode_tokens_per_s=140.0,
            ),
        ),
    )


def generation_spec() -> GenerationSpec:
    return GenerationSpec(
        chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
        bos_token_id=1,
        eos_token_ids=[2],
        pad_token_id=2,
        context_length=2048,
        vocab_size=49152,
        kv_cache=KvCacheLayout(num_layers=30, num_kv_heads=3, head_size=64),
        samples=[SamplePrompt(text="def add(a, b):", prompt_ids=[1, 5, 6], expected_ids=[7, 8, 9])],
        parity_tokens=8,
    )


def text_generation_manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "smollm2",
        "version": "1.0.0",
        "task": "text-generation",
        "inputs": [TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
        "outputs": [TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", 49152])],
        "generation": generation_spec(),
        "variants": [folder_variant(TargetId.CPU_INT4, "int4"), folder_variant(TargetId.CPU_FP32, "fp32")],
    }
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_a_text_generation_manifest_signs_verifies_and_names_every_file() -> None:
    manifest = text_generation_manifest()
    key = load_private_key(generate_signing_key())
    signed = SignedManifest.from_bytes(sign_manifest(manifest, key).to_bytes())
    back = verify_manifest(signed, load_public_key(public_key_b64(key)))
    assert back == manifest
    int4 = back.variant("cpu-int4")
    assert int4 is not None and int4 is back.variant(TargetId.CPU_INT4)
    assert int4.folder == "cpu-int4" and int4.precision == "int4"
    assert [f.path for f in int4.artifact_files()] == [
        "cpu-int4/model.onnx",
        "cpu-int4/model.onnx.data",
        "cpu-int4/tokenizer.json",
        "cpu-int4/genai_config.json",
    ]
    assert int4.local_path("cpu-int4/model.onnx.data") == "model.onnx.data"
    assert len(back.files()) == 8
    assert back.generation is not None and back.generation.kv_cache.bytes_per_token() == 2 * 30 * 3 * 64 * 4
    assert back.generation.kv_cache.past_key.format(i=3) == "past_key_values.3.key"
    assert int4.metrics is not None and int4.metrics.generation is not None
    assert int4.metrics.generation.parity_matched == 8
    # a changed file hash is a changed manifest: the signature no longer verifies
    tampered = back.model_copy(update={"variants": [folder_variant(TargetId.CPU_INT4, "int4")]})
    with pytest.raises(Exception, match="bad signature"):
        verify_manifest(signed.model_copy(update={"manifest": tampered}), load_public_key(public_key_b64(key)))


def test_single_file_variants_still_list_their_one_file() -> None:
    variant = Variant(
        target=TargetId.CPU_FP32,
        precision="fp32",
        providers=["CPUExecutionProvider"],
        file="m.onnx",
        size=3,
        sha256="a" * 64,
    )
    assert variant.folder is None
    assert [(f.path, f.size, f.sha256) for f in variant.artifact_files()] == [("m.onnx", 3, "a" * 64)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"generation": None}, "needs a generation section"),
        (
            {
                "variants": [
                    Variant(
                        target=TargetId.CPU_FP32,
                        precision="fp32",
                        providers=["CPUExecutionProvider"],
                        file="m.onnx",
                        size=3,
                        sha256="a" * 64,
                    )
                ]
            },
            "must be a folder",
        ),
        ({"task": "classification"}, "needs a sample"),
    ],
)
def test_text_generation_manifest_sections_are_checked(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        text_generation_manifest(**change)


def test_folder_variants_refuse_unsafe_or_inconsistent_files() -> None:
    good = folder_variant(TargetId.CPU_INT4, "int4")
    for path in ("../etc/passwd", "/abs/model.onnx", "cpu-int4/../x", ".hidden/x", "a//b", "cpu-int4/.git"):
        with pytest.raises(ValidationError):
            VariantFile(path=path, size=1, sha256="a" * 64)
    with pytest.raises(ValidationError, match="one folder"):
        good.model_validate(
            {**good.model_dump(), "files": [*good.model_dump()["files"], _file("other/x", b"1").model_dump()]}
        )
    with pytest.raises(ValidationError, match="listed twice"):
        good.model_validate(
            {**good.model_dump(), "files": [*good.model_dump()["files"], good.model_dump()["files"][1]]}
        )
    with pytest.raises(ValidationError, match="not one of its files"):
        good.model_validate({**good.model_dump(), "file": "cpu-int4/missing.onnx"})
    with pytest.raises(ValidationError, match="two different"):
        good.model_validate({**good.model_dump(), "size": good.size + 1})


def test_generation_spec_checks_ids_and_sample_lengths() -> None:
    spec = generation_spec().model_dump()
    with pytest.raises(ValidationError, match="vocab_size"):
        GenerationSpec.model_validate({**spec, "eos_token_ids": [49152]})
    with pytest.raises(ValidationError, match="longer than the context"):
        GenerationSpec.model_validate({**spec, "context_length": 4})
    with pytest.raises(ValidationError):
        GenerationSpec.model_validate({**spec, "eos_token_ids": []})

from __future__ import annotations

import json

import pytest

from shared.codec import ProtocolError
from shared.manifest import (
    Manifest,
    Sample,
    SignatureError,
    SignedManifest,
    TensorData,
    TensorSpec,
    Variant,
    generate_signing_key,
    load_private_key,
    load_public_key,
    public_key_b64,
    sign_manifest,
    verify_manifest,
)
from shared.targets import DeviceProfile, TargetId, choose_targets


def _variant(target: TargetId, precision: str, sha: str) -> Variant:
    return Variant(
        target=target,
        precision=precision,
        providers=["CPUExecutionProvider"],
        file=f"{target}.onnx",
        size=1234,
        sha256=sha * 64,
    )


def _manifest() -> Manifest:
    return Manifest(
        name="digits",
        version="1.0.0",
        task="image-classification",
        inputs=[TensorSpec(name="input", dtype="float32", shape=["batch", 1, 8, 8])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", 10])],
        labels=[str(i) for i in range(10)],
        sample=Sample(
            inputs={"input": TensorData(dtype="float32", shape=[1, 1, 8, 8], data=[0.5] * 64)},
            outputs={"logits": TensorData(dtype="float32", shape=[1, 10], data=[0.1] * 10)},
        ),
        variants=[_variant(TargetId.CPU_FP32, "fp32", "a"), _variant(TargetId.CPU_INT8, "int8", "b")],
    )


@pytest.fixture
def key_pem() -> bytes:
    return generate_signing_key()


def test_signed_manifest_verifies_after_the_wire(key_pem: bytes) -> None:
    key = load_private_key(key_pem)
    signed = sign_manifest(_manifest(), key)
    manifest = verify_manifest(signed.to_bytes(), load_public_key(public_key_b64(key)))
    assert manifest == _manifest().model_copy(update={"created_at": manifest.created_at})
    assert manifest.choose(choose_targets(DeviceProfile(cpu_flags=["avx512_vnni"]))).target == TargetId.CPU_INT8
    assert manifest.choose(choose_targets(DeviceProfile(cpu_flags=["sse4_2"]))).target == TargetId.CPU_FP32
    assert manifest.choose([TargetId.CUDA_FP16]) is None
    for variant in manifest.variants:
        assert manifest.variant_by_sha256(variant.sha256) == variant
    assert manifest.variant_by_sha256("0" * 64) is None


def test_every_single_byte_change_is_detected(key_pem: bytes) -> None:
    key = load_private_key(key_pem)
    public = load_public_key(public_key_b64(key))
    data = sign_manifest(_manifest(), key).to_bytes()
    start, end = data.index(b'"manifest"'), data.index(b',"signature"')
    for i in range(start + 12, end):
        damaged = bytearray(data)
        damaged[i] = (damaged[i] + 1) % 256
        with pytest.raises((SignatureError, ProtocolError)):
            verify_manifest(bytes(damaged), public)


def test_a_changed_value_fails_the_signature(key_pem: bytes) -> None:
    key = load_private_key(key_pem)
    obj = json.loads(sign_manifest(_manifest(), key).to_bytes())
    obj["manifest"]["variants"][0]["sha256"] = "c" * 64
    with pytest.raises(SignatureError, match="bad signature"):
        verify_manifest(json.dumps(obj).encode(), load_public_key(public_key_b64(key)))


def test_a_manifest_signed_by_another_key_is_refused(key_pem: bytes) -> None:
    other = load_private_key(generate_signing_key())
    signed = sign_manifest(_manifest(), other)
    with pytest.raises(SignatureError):
        verify_manifest(signed, load_public_key(public_key_b64(load_private_key(key_pem))))


def test_garbage_is_a_protocol_error_not_a_crash(key_pem: bytes) -> None:
    public = load_public_key(public_key_b64(load_private_key(key_pem)))
    for bad in (b"", b"null", b'{"manifest": {}}', b"\x00" * 10):
        with pytest.raises(ProtocolError):
            verify_manifest(bad, public)
    with pytest.raises(SignatureError):
        load_public_key("not base64!")


def test_sample_shape_must_match_its_data() -> None:
    with pytest.raises(ValueError, match="holds 4 values"):
        TensorData(dtype="float32", shape=[2, 2], data=[1.0])


def test_signed_manifest_parses_only_signed_manifests() -> None:
    with pytest.raises(ProtocolError) as err:
        SignedManifest.from_bytes(b'{"signature": "x"}')
    assert err.value.reason == "invalid"

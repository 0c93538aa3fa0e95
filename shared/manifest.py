"""The artifact manifest: what a model version is, how to feed it, and its variants.

A manifest is signed by the hub (Ed25519 over its canonical JSON); an agent verifies
it with the public key it received at enrollment before it trusts any field, and then
checks each downloaded file against the variant's sha256.

Verification uses libsodium (PyNaCl), which every install has. Signing and the hub's PEM
key use `cryptography`, imported by those functions only: it is a hub dependency, and
the agent, which only verifies, never loads it (8 MB of RSS).

Errors::

    ProtocolError (shared.codec)    the bytes are not a signed manifest
    SignatureError (ValueError)     the signature does not match the manifest and key
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.codec import DEFAULT_MAX_BYTES, decode
from shared.manifest_generation import (
    REL_PATH,
    TEXT_GENERATION,
    GenerationDefaults,
    GenerationMetrics,
    GenerationSpec,
    KvCacheLayout,
    SamplePrompt,
)
from shared.messages import Version, utcnow
from shared.targets import TargetId

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "Batching",
    "Dtype",
    "GenerationDefaults",
    "GenerationMetrics",
    "GenerationSpec",
    "ImagePreprocessing",
    "KvCacheLayout",
    "Manifest",
    "Postprocessing",
    "Preprocessing",
    "Sample",
    "SamplePrompt",
    "SignatureError",
    "SignedManifest",
    "SkippedVariant",
    "TEXT_GENERATION",
    "TensorData",
    "TensorSpec",
    "TextPreprocessing",
    "Variant",
    "VariantFile",
    "VariantMetrics",
    "canonical_json",
    "generate_signing_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_b64",
    "sign_manifest",
    "verify_manifest",
]

Dtype = Literal["float32", "float16", "int64", "int32", "int8", "uint8", "bool", "string"]
Sha256 = str


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SignatureError(ValueError):
    """A manifest whose signature does not verify with the hub's key."""


class TensorSpec(_Frozen):
    """A named model input or output; a string dimension is dynamic (``batch``)."""

    name: str = Field(min_length=1, max_length=256)
    dtype: Dtype
    shape: list[int | str] = Field(max_length=8)


class TensorData(_Frozen):
    """A small tensor carried in JSON, row-major."""

    dtype: Dtype
    shape: list[int] = Field(max_length=8)
    data: list[float] | list[int] | list[bool] | list[str]

    @model_validator(mode="after")
    def _size_matches(self) -> TensorData:
        size = 1
        for dim in self.shape:
            size *= dim
        if size != len(self.data):
            raise ValueError(f"shape {self.shape} holds {size} values, data has {len(self.data)}")
        return self


class ImagePreprocessing(_Frozen):
    """Turn an image into the input tensor: resize, scale to [0, 1], normalize."""

    size: tuple[int, int] = Field(description="height, width")
    grayscale: bool = False
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    scale: float = Field(default=1 / 255, gt=0)
    channels_first: bool = True
    invert: bool = False


class TextPreprocessing(_Frozen):
    """Tokenize text with a `tokenizers` JSON file shipped as an artifact."""

    tokenizer_sha256: Sha256 = Field(pattern=r"^[0-9a-f]{64}$")
    tokenizer_size: int = Field(ge=1)
    max_length: int = Field(default=128, ge=1, le=8192)


class Preprocessing(_Frozen):
    """How raw input becomes the model's input tensors."""

    type: Literal["tensor", "image", "text", "tabular"] = "tensor"
    image: ImagePreprocessing | None = None
    text: TextPreprocessing | None = None
    features: list[str] | None = Field(default=None, description="tabular column order")
    categories: dict[str, list[str]] | None = Field(
        default=None,
        description="tabular string columns: the value is sent as its index in this list (unknown: -1)",
    )

    @model_validator(mode="after")
    def _spec_present(self) -> Preprocessing:
        if self.type == "image" and self.image is None:
            raise ValueError("type 'image' needs an image spec")
        if self.type == "text" and self.text is None:
            raise ValueError("type 'text' needs a text spec")
        return self


class Postprocessing(_Frozen):
    """How the output tensor becomes an answer."""

    output: str | None = Field(default=None, description="output tensor to post-process; the first if None")
    softmax: bool = False
    top_k: int | None = Field(default=None, ge=1)
    labels: list[str] | None = None
    pooling: Literal["mean", "cls"] | None = Field(default=None, description="token embeddings -> sentence")
    normalize: bool = False


class Sample(_Frozen):
    """An input with its expected output: the agent's smoke test for every variant."""

    inputs: dict[str, TensorData]
    outputs: dict[str, TensorData]
    atol: float = Field(default=1e-3, ge=0)
    rtol: float = Field(default=1e-2, ge=0)
    min_cosine: float | None = Field(
        default=None, description="compare by cosine similarity instead (quantized variants)"
    )
    argmax_match: bool = Field(default=False, description="compare by arg-max (quantized classifiers)")


class VariantMetrics(_Frozen):
    """What the build gate measured for one variant."""

    metric: str = Field(description="accuracy, cosine, or the task's metric name")
    value: float | None = None
    reference: float | None = Field(default=None, description="the torch model's value")
    latency_ms: float | None = Field(default=None, description="median, batch 1; None when unmeasured")
    latency_note: str | None = Field(default=None, description="'unmeasured: ...' for GPU targets built here")
    generation: GenerationMetrics | None = Field(default=None, description="text generation: what the gate measured")


class VariantFile(_Frozen):
    """One file of a variant that is a folder (graph, external weights, tokenizer, config)."""

    path: str = Field(
        min_length=1, max_length=256, pattern=REL_PATH, description="name in the registry; relative path on disk"
    )
    size: int = Field(ge=0)
    sha256: Sha256 = Field(pattern=r"^[0-9a-f]{64}$")


class Batching(_Frozen):
    """Dynamic batching of a variant: requests stacked on the first axis, run as one.

    The build sets it when every input and output has a leading batch axis and each row's
    result does not depend on the other rows (not so under dynamic INT8 quantization,
    whose activation scale is taken over the whole batch). Absent: the agent does not batch.
    """

    max_batch_size: int = Field(default=8, ge=1, le=1024, description="rows in one run; 1 turns batching off")
    max_queue_delay_us: int = Field(
        default=0, ge=0, le=1_000_000, description="how long a request may wait for others to join its batch"
    )


class Variant(_Frozen):
    """One artifact of a model version, built for one target.

    A single-file variant is `file` with its `size` and `sha256`. A folder variant also lists
    `files`, every file of the folder (paths like ``cpu-int4/model.onnx``, all under one
    folder); `file` is then its graph, one of them, with the same size and hash.
    """

    target: TargetId
    precision: Literal["fp32", "fp16", "int8", "int4"]
    providers: list[str] = Field(min_length=1)
    file: str = Field(min_length=1, max_length=256)
    size: int = Field(ge=1)
    sha256: Sha256 = Field(pattern=r"^[0-9a-f]{64}$")
    files: list[VariantFile] = Field(default_factory=list, max_length=64)
    metrics: VariantMetrics | None = None
    sample: Sample | None = Field(default=None, description="overrides the manifest's sample tolerances")
    recipe: dict[str, Any] = Field(default_factory=dict, description="how the variant was made")
    batching: Batching | None = Field(default=None, description="None: rows may depend on each other; no batching")

    @model_validator(mode="after")
    def _folder_is_consistent(self) -> Variant:
        if not self.files:
            return self
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"variant {self.target}: a file is listed twice")
        folders = {p.split("/", 1)[0] if "/" in p else "" for p in paths}
        if len(folders) != 1 or "" in folders:
            raise ValueError(f"variant {self.target}: files must all lie in one folder, got {sorted(folders)}")
        graph = next((f for f in self.files if f.path == self.file), None)
        if graph is None:
            raise ValueError(f"variant {self.target}: its graph {self.file!r} is not one of its files")
        if (graph.size, graph.sha256) != (self.size, self.sha256):
            raise ValueError(f"variant {self.target}: {self.file!r} has two different sizes or hashes")
        return self

    @property
    def folder(self) -> str | None:
        """Return the folder of a folder variant (``cpu-int4``), None for a single file."""
        return self.files[0].path.split("/", 1)[0] if self.files else None

    def artifact_files(self) -> list[VariantFile]:
        """Return every file to download for this variant (one for a single-file variant)."""
        return list(self.files) or [VariantFile(path=self.file, size=self.size, sha256=self.sha256)]

    def local_path(self, path: str) -> str:
        """Return a file's path inside the variant folder (``model.onnx`` for ``cpu-int4/model.onnx``)."""
        folder = self.folder
        return path[len(folder) + 1 :] if folder and path.startswith(folder + "/") else path


class SkippedVariant(_Frozen):
    """A target that was considered and not published, with the reason."""

    target: TargetId
    reason: str


class Manifest(_Frozen):
    """A model version: its interface, processing, sample, metrics and variants."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: Version
    task: str = Field(min_length=1, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    postprocessing: Postprocessing = Field(default_factory=Postprocessing)
    labels: list[str] | None = None
    sample: Sample | None = Field(default=None, description="required except for text generation (see generation)")
    generation: GenerationSpec | None = Field(default=None, description="task text-generation only")
    metrics: dict[str, float] = Field(default_factory=dict)
    variants: list[Variant] = Field(default_factory=list)
    skipped: list[SkippedVariant] = Field(default_factory=list)
    lineage: dict[str, Any] = Field(default_factory=dict, description="data hash, training config, parent")

    @model_validator(mode="after")
    def _task_sections(self) -> Manifest:
        if self.task == TEXT_GENERATION:
            if self.generation is None:
                raise ValueError("a text-generation manifest needs a generation section")
            for variant in self.variants:
                if not variant.files:
                    raise ValueError(f"text-generation variant {variant.target} must be a folder (files)")
        elif self.sample is None:
            raise ValueError(f"a {self.task} manifest needs a sample")
        elif self.generation is not None:
            raise ValueError("a generation section belongs to text-generation manifests only")
        return self

    def files(self) -> list[VariantFile]:
        """Return every variant file (single files and folder contents), each once, in order."""
        seen: dict[str, VariantFile] = {}
        for variant in self.variants:
            for item in variant.artifact_files():
                seen.setdefault(item.path, item)
        return list(seen.values())

    def variant(self, target: TargetId | str) -> Variant | None:
        """Return the variant built for `target` (an id or its name), if any."""
        return next((v for v in self.variants if v.target == target), None)

    def variant_by_sha256(self, sha256: str) -> Variant | None:
        """Return the variant whose file has this sha256, if any (what a journal or a cache names)."""
        return next((v for v in self.variants if v.sha256 == sha256), None)

    def choose(self, targets: list[TargetId]) -> Variant | None:
        """Return the first variant in the device's order of preference."""
        for target in targets:
            if (found := self.variant(target)) is not None:
                return found
        return None


class SignedManifest(_Frozen):
    """A manifest with the hub's Ed25519 signature over its canonical JSON."""

    manifest: Manifest
    signature: str = Field(description="base64 Ed25519 signature")
    key_id: str = Field(description="first 16 hex digits of sha256(public key)")

    def to_bytes(self) -> bytes:
        """Serialize for serving over HTTP."""
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = 4 * DEFAULT_MAX_BYTES) -> SignedManifest:
        """Parse bytes; raise ProtocolError when they are not a signed manifest."""
        return decode(data, cls, max_bytes=max_bytes)


def canonical_json(manifest: Manifest) -> bytes:
    """Return the bytes that are signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def generate_signing_key() -> bytes:
    """Return a new Ed25519 private key as PEM (PKCS8, unencrypted)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("the signing key is not an Ed25519 key")
    return key


def public_key_b64(private_key: Ed25519PrivateKey) -> str:
    """Return the raw public key as base64, the form agents receive at enrollment."""
    return base64.b64encode(private_key.public_key().public_bytes_raw()).decode()


def load_public_key(b64: str) -> VerifyKey:
    """Load a raw base64 Ed25519 public key."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError as exc:
        raise SignatureError(f"not an Ed25519 public key: {exc}") from exc
    if len(raw) != 32:
        raise SignatureError(f"not an Ed25519 public key: {len(raw)} bytes, expected 32")
    return VerifyKey(raw)


def key_id(public_key: bytes) -> str:
    """Return a short, stable id for a raw public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    """Sign a manifest with the hub's key."""
    signature = private_key.sign(canonical_json(manifest))
    return SignedManifest(
        manifest=manifest,
        signature=base64.b64encode(signature).decode(),
        key_id=key_id(private_key.public_key().public_bytes_raw()),
    )


def verify_manifest(signed: SignedManifest | bytes, public_key: VerifyKey) -> Manifest:
    """Return the manifest if its signature verifies; raise SignatureError otherwise.

    Bytes are parsed first (ProtocolError when they are not a signed manifest).
    """
    if isinstance(signed, bytes):
        signed = SignedManifest.from_bytes(signed)
    expected = key_id(bytes(public_key))
    if signed.key_id != expected:
        raise SignatureError(f"manifest signed by key {signed.key_id}, expected {expected}")
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        public_key.verify(canonical_json(signed.manifest), signature)
    except (BadSignatureError, ValueError) as exc:
        raise SignatureError(f"manifest {signed.manifest.name} {signed.manifest.version}: bad signature") from exc
    return signed.manifest

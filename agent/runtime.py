"""ONNX Runtime sessions: provider choice, graph optimization, threads, warm-up, smoke test, hot swap.

A swap replaces one reference under a lock. A request takes the reference once and
runs on it, so requests in flight finish on the old session while new ones get the new.

Memory-mapped weights: ORT copies every initializer stored inside a model file into its
own memory, but maps initializers kept in an external-data file. So a CPU model of some
size is served from a copy that ORT itself optimized on this device and saved with its
weights beside it (ORT's "offline optimization"): pages nobody reads, such as most rows of
a vocabulary embedding, never become resident, and they are clean pages the kernel can
drop. MiniLM INT8 serves in 11 MB less RSS. The copy lives in the cache next to the
verified file it came from, keyed by ORT version and CPU, with its own sha256s checked on
every load, and it is smoke-tested like any model; anything wrong with it and the
verified file is loaded directly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.artifacts import sha256_file
from agent.errors import ModelLoadError, SmokeTestError
from shared.manifest import Manifest, Sample, TensorData, TensorSpec, Variant

if TYPE_CHECKING:
    import onnxruntime as ort

    from agent.textgen import TextModel

__all__ = [
    "LoadedModel",
    "ModelRegistry",
    "load_model",
    "release_heap",
    "rows_independent",
    "sample_inputs",
    "smoke_test",
    "tensor_array",
    "warm_up",
]

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
MAPPED_MIN_BYTES = 4 * 1024 * 1024  # smaller models gain nothing from a mapped copy
_MAPPED_MODEL, _MAPPED_WEIGHTS, _MAPPED_SUMS = "model.onnx", "weights.bin", "sha256.json"


def tensor_array(tensor: TensorData) -> np.ndarray:
    """Return a manifest tensor as a numpy array (strings as str objects, as ORT takes them)."""
    if tensor.dtype == "string":
        return np.asarray([str(v) for v in tensor.data], dtype=object).reshape(tensor.shape)
    return np.asarray(tensor.data, dtype=np.dtype(tensor.dtype)).reshape(tensor.shape)


def sample_inputs(manifest: Manifest) -> dict[str, np.ndarray]:
    """Return the manifest sample's inputs as arrays."""
    if manifest.sample is None:  # text generation: its check is generation.samples (parity tokens)
        raise SmokeTestError(f"{manifest.name} {manifest.version}: the manifest has no tensor sample")
    return {name: tensor_array(t) for name, t in manifest.sample.inputs.items()}


@dataclass(frozen=True)
class LoadedModel:
    """One version of a model, ready to answer requests."""

    name: str
    version: str
    target: str
    manifest: Manifest
    variant: Variant
    session: ort.InferenceSession | None = field(repr=False, compare=False)  # None: served by ORT GenAI
    path: Path
    providers: tuple[str, ...]
    tokenizer_path: Path | None = None
    text: TextModel | None = field(default=None, repr=False, compare=False)  # a text-generation model

    # Worked out once per loaded model, not per request.
    @cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        """Return the manifest's input specs by name."""
        return {spec.name: spec for spec in self.manifest.inputs}

    @cached_property
    def output_names(self) -> list[str]:
        """Return the session's output names, in order."""
        return [o.name for o in self.session.get_outputs()] if self.session is not None else []

    @cached_property
    def answer_head(self) -> bytes:
        """Return an OIP answer's leading fields, model name and version, as JSON without the closing brace."""
        head = {"model_name": self.name, "model_version": self.version}
        return json.dumps(head, separators=(",", ":")).encode()[:-1]

    @cached_property
    def rows_independent(self) -> str | None:
        """Return why requests of this model cannot be batched bit-identically (None: they can)."""
        return rows_independent(self)

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the session; ORT sessions are safe to call from many threads."""
        if self.session is None:
            from agent.tensors import UnsupportedInputError

            raise UnsupportedInputError(f"{self.name} is served by ONNX Runtime GenAI: use its generate endpoints")
        names = outputs or self.output_names
        values = self.session.run(names, inputs)
        return {
            name: value if type(value) is np.ndarray else np.asarray(value)  # sequences and maps are lists
            for name, value in zip(names, values, strict=True)
        }


def _providers(wanted: list[str]) -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available]
    if CPU not in chosen:
        chosen.append(CPU)  # CPU is always the last resort
    return chosen


def _libc(function: str) -> Any:
    """Return the C library's `function`, or None where there is none (musl or macOS lack glibc's)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name, use_errno=True), function)
    except (OSError, AttributeError):
        return None


def release_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them after a model's protobuf is parsed)."""
    malloc_trim = _libc("malloc_trim")
    if malloc_trim is not None:  # not glibc: nothing to trim
        malloc_trim(0)


def release_mapped_pages(folder: Path) -> int:
    """Drop the resident pages of this process's unwritten mappings of files in `folder`; return their bytes.

    ORT maps a graph's external weights (private, copy-on-write) and keeps the mappings for
    the session's life. Weights it prepacked (every MatMulNBits, the LM head) are never read
    there again, yet the pages read while packing stay resident and count in the process's RSS
    (SmolLM2-135M int4: 16 MB). Dropped, only what is read again (the embedding rows a prompt
    gathers) comes back, from the page cache. A mapping with any page written (an anonymous
    copy) is left alone: dropping it would lose the write. Linux only; elsewhere nothing happens.
    """
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    madvise = _libc("madvise")
    try:
        smaps = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    if advice is None or madvise is None:
        return 0
    inside = f"{folder.resolve()}/"
    candidates: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in smaps:
        fields = line.split(maxsplit=5)
        if not fields:
            continue
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            start, end = (int(address, 16) for address in fields[0].split("-"))
            current = (start, end) if len(fields) == 6 and fields[5].startswith(inside) else None
        elif current is not None and fields[0] == "Anonymous:":
            if fields[1] == "0":
                candidates.append(current)
            current = None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(end - start for start, end in candidates if madvise(start, end - start, advice) == 0)


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)


def tune_heap(arena_max: int, mmap_threshold_kb: int) -> bool:
    """Bound glibc's heap for a long-lived server; call before threads start. Return whether it applied.

    glibc gives each thread that allocates its own arena (up to 8 per core), and a buffer
    freed in one arena is reused only by its threads: a language model's sequences, each
    growing its KV cache by one token a step on a thread of its own, leave every arena
    holding its peak. And after the first large block is freed glibc raises its mmap
    threshold to that block's size (up to 32 MB), so every later buffer of a few MB (a KV
    tensor, a prompt's logits) lands in an arena instead of a mapping returned to the
    kernel on free. A fixed threshold keeps such buffers mapped, and a few arenas keep what
    is freed shared. 0 leaves glibc's default for either.

    The threshold is 1 MB, not glibc's initial 128 KB: a buffer under it is reused from
    the heap, while one over it costs a fresh mapping, its page faults and, when freed, an
    unmap that flushes the TLB of every core running one of the process's threads. A
    request to MiniLM allocates and frees four 196 KB buffers (its output, the encoded
    answer): with a 128 KB threshold 8 concurrent clients got 0.55-0.60 of `session.run`'s
    requests/s (bench/serving.py), with 1 MB 0.86-0.88. SmolLM2-135M int4, four streams,
    peak RSS: 293 MB at 1 MB, 297 at 128 KB, 301 at 4 MB, 312-318 with glibc's dynamic
    threshold (bench/generation_served.py).
    """
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False  # not glibc (musl, macOS): its allocator has no such settings
    applied = True
    if arena_max > 0:
        applied = bool(mallopt(_M_ARENA_MAX, arena_max)) and applied
    if mmap_threshold_kb > 0:
        applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_kb * 1024)) and applied
    return applied


def load_model(
    manifest: Manifest,
    variant: Variant,
    path: Path,
    threads: int,
    tokenizer_path: Path | None = None,
    mapped_dir: Path | None = None,
) -> LoadedModel:
    """Create an ORT session for a verified file; raise ModelLoadError.

    With `mapped_dir`, a CPU-only model of MAPPED_MIN_BYTES or more is served from a
    mapped-weights copy kept there (see the module doc); `path` stays the verified file.
    """
    # Imported here: an agent with no model yet does not pay ORT's ~30 MB of RSS.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = _providers(list(variant.providers))
    source = path
    if mapped_dir is not None and providers == [CPU] and path.stat().st_size >= MAPPED_MIN_BYTES:
        mapped = mapped_copy(path, mapped_dir)
        if mapped is not None:
            source = mapped
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized already
    try:
        session = ort.InferenceSession(str(source), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
        if source != path:
            logger.warning("%s: the mapped copy does not load (%s); loading the verified file", source, exc)
            shutil.rmtree(source.parent, ignore_errors=True)
            return load_model(manifest, variant, path, threads, tokenizer_path)
        raise ModelLoadError(f"{manifest.name} {manifest.version}: ONNX Runtime cannot load the model: {exc}") from exc
    release_heap()
    expected = {spec.name for spec in manifest.inputs}
    actual = {i.name for i in session.get_inputs()}
    if not expected <= actual:
        raise ModelLoadError(
            f"{manifest.name} {manifest.version}: model inputs {sorted(actual)} lack {sorted(expected - actual)}"
        )
    return LoadedModel(
        name=manifest.name,
        version=manifest.version,
        target=str(variant.target),
        manifest=manifest,
        variant=variant,
        session=session,
        path=path,
        providers=tuple(session.get_providers()),
        tokenizer_path=tokenizer_path,
    )


def mapped_copy(path: Path, mapped_dir: Path) -> Path | None:
    """Return a copy of `path` optimized by ORT for this CPU with its weights in a mapped file.

    Made once per file, ORT version and CPU, then reused after its sha256s are checked;
    None when it cannot be made (a full disk, an ORT that cannot save the graph).
    """
    import onnxruntime as ort

    from agent.device import cpu_flags

    cpu = hashlib.sha256(" ".join(cpu_flags()).encode()).hexdigest()[:8]
    final = mapped_dir / f"ort-{ort.__version__}-{cpu}"
    if final.exists():
        if _intact(final):
            return final / _MAPPED_MODEL
        logger.warning("%s is damaged; making it again", final)
        shutil.rmtree(final, ignore_errors=True)
    mapped_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=mapped_dir))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(tmp / _MAPPED_MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", _MAPPED_WEIGHTS)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
        sums = {name: sha256_file(tmp / name) for name in (_MAPPED_MODEL, _MAPPED_WEIGHTS) if (tmp / name).exists()}
        (tmp / _MAPPED_SUMS).write_text(json.dumps(sums))
        for name in (*sums, _MAPPED_SUMS):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
    except Exception as exc:  # ORT's errors are untyped; a full disk is an OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and _intact(final):
            return final / _MAPPED_MODEL  # another load of the same file made it first
        logger.warning("%s: no mapped-weights copy (%s); serving the verified file as it is", path.name, exc)
        return None
    release_heap()
    return final / _MAPPED_MODEL


def _intact(folder: Path) -> bool:
    try:
        sums = json.loads((folder / _MAPPED_SUMS).read_text())
        return _MAPPED_MODEL in sums and all(sha256_file(folder / name) == sha for name, sha in sums.items())
    except (OSError, ValueError):
        return False


def warm_up(model: LoadedModel, runs: int) -> None:
    """Run the sample a few times so the first real request does not pay for allocation."""
    if model.text is not None:
        return  # a language model's smoke test generates, which warms it up
    inputs = sample_inputs(model.manifest)
    for _ in range(runs):
        model.run(inputs)
    if model.variant.batching is not None:
        model.rows_independent  # noqa: B018 - worked out now, not on the first request


def rows_independent(model: LoadedModel) -> str | None:
    """Run the sample's rows alone and together; return why a batched row differs (None: none does).

    The check behind dynamic batching's promise: a batched response is bit-identical to an
    unbatched one. A one-row sample is run twice stacked, which proves the batch axis only.
    """
    inputs = sample_inputs(model.manifest)
    rows = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
    if len(rows) != 1 or min(rows) < 1:
        return "the sample's inputs share no first axis"
    n = rows.pop()
    if n == 1:
        inputs, n = {k: np.concatenate([a, a]) for k, a in inputs.items()}, 2
    try:
        together = model.run(inputs)
        for i in range(n):
            alone = model.run({k: a[i : i + 1] for k, a in inputs.items()})
            for name, value in alone.items():
                batched = together[name]
                if batched.ndim == 0 or batched.shape[0] != n:
                    return f"output {name!r} has no batch axis"
                same = (
                    np.array_equal(batched[i : i + 1], value)
                    if value.dtype == object
                    else batched[i : i + 1].tobytes() == value.tobytes()
                )
                if not same:
                    return f"output {name!r} of a row differs when run with other rows"
    except Exception as exc:  # ORT's errors are untyped: a model that cannot take 2 rows cannot batch
        return f"the model does not run a batch of {n}: {exc}"
    return None


def smoke_test(model: LoadedModel) -> None:
    """Run the manifest sample and compare with its expected outputs; raise SmokeTestError."""
    if model.text is not None:
        from agent.textgen_runtime import smoke_test_text

        smoke_test_text(model)
        return
    sample: Sample | None = model.variant.sample or model.manifest.sample
    if sample is None:
        raise SmokeTestError(f"{model.name} {model.version}: the manifest has no tensor sample")
    try:
        got = model.run(sample_inputs(model.manifest), list(sample.outputs))
    except Exception as exc:  # an ORT failure on the sample is a failed smoke test
        raise SmokeTestError(f"{model.name} {model.version}: the sample does not run: {exc}") from exc
    for name, expected_tensor in sample.outputs.items():
        _compare(model, name, got[name], tensor_array(expected_tensor), sample)


def _compare(model: LoadedModel, name: str, got: np.ndarray, expected: np.ndarray, sample: Sample) -> None:
    where = f"{model.name} {model.version} ({model.target}) output {name!r}"
    if got.shape != expected.shape:
        raise SmokeTestError(f"{where}: shape {list(got.shape)}, sample expects {list(expected.shape)}")
    if got.dtype == object or expected.dtype == object:  # strings: equal or not
        if not np.array_equal(got, expected):
            raise SmokeTestError(f"{where}: strings differ from the sample's")
        return
    a = got.astype(np.float64)
    b = expected.astype(np.float64)
    if sample.argmax_match:
        if not np.array_equal(a.argmax(axis=-1), b.argmax(axis=-1)):
            raise SmokeTestError(f"{where}: arg-max differs from the sample's")
        return
    if sample.min_cosine is not None:
        a2 = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
        b2 = b.reshape(a2.shape)
        denom = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        cosine = np.sum(a2 * b2, axis=1) / np.where(denom == 0, 1, denom)
        if float(cosine.min()) < sample.min_cosine:
            raise SmokeTestError(f"{where}: cosine {float(cosine.min()):.4f} < {sample.min_cosine}")
        return
    if not np.allclose(a, b, atol=sample.atol, rtol=sample.rtol):
        worst = float(np.max(np.abs(a - b)))
        raise SmokeTestError(f"{where}: max difference {worst:.4g} beyond atol={sample.atol} rtol={sample.rtol}")


class ModelRegistry:
    """The active model per name; swapping is one assignment under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, LoadedModel] = {}

    def get(self, name: str) -> LoadedModel | None:
        """Return the active model of a name."""
        with self._lock:
            return self._active.get(name)

    def activate(self, model: LoadedModel) -> LoadedModel | None:
        """Make `model` the active one for its name; return the one it replaced."""
        with self._lock:
            old = self._active.get(model.name)
            self._active[model.name] = model
        release_heap()  # warm-up and smoke-test buffers are garbage now
        logger.info("%s %s is active (%s, %s)", model.name, model.version, model.target, ",".join(model.providers))
        return old

    def remove(self, name: str) -> LoadedModel | None:
        """Stop serving a name."""
        with self._lock:
            return self._active.pop(name, None)

    def all(self) -> list[LoadedModel]:
        """Return every active model, by name."""
        with self._lock:
            return [self._active[k] for k in sorted(self._active)]

    def describe(self) -> list[dict[str, Any]]:
        """Return a JSON-able summary of the active models."""
        return [
            {"name": m.name, "version": m.version, "target": m.target, "providers": list(m.providers)}
            for m in self.all()
        ]

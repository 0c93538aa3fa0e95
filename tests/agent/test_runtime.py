"""A big CPU model is served from an ORT-optimized copy whose weights ORT memory-maps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from agent.artifacts import ArtifactCache
from agent.runtime import MAPPED_MIN_BYTES, LoadedModel, load_model, release_mapped_pages, smoke_test
from tests.support.models import SAMPLE_X, Release, linear_io_model, make_release

KEY = Ed25519PrivateKey.generate()
ROWS = 500_000  # a 6 MB lookup table, like a vocabulary embedding: a request reads 4 of its rows


def table_release(seed: int = 3) -> Release:
    """y = the sum of the table rows that x's values (cast to int) index."""
    table = np.random.default_rng(seed).normal(size=(ROWS, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["x"], ["ids"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        helper.make_node("ReduceSum", ["rows", "axis"], ["y"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1], np.int64), "axis")]
    data = linear_io_model(nodes, inits, "table")
    assert len(data) >= MAPPED_MIN_BYTES
    expected = table[SAMPLE_X.astype(np.int64)].sum(axis=1)
    return make_release(KEY, "table", "1.0.0", seed, model_bytes=data, expected=expected)


def load(cache: ArtifactCache, release: Release) -> LoadedModel:
    path = cache.path(release.sha256)
    path.write_bytes(release.files[release.sha256])
    variant = release.manifest.variants[0]
    return load_model(release.manifest, variant, path, threads=1, mapped_dir=cache.mapped_dir(release.sha256))


def mapped_files(cache: ArtifactCache, release: Release) -> dict[str, Path]:
    (folder,) = cache.mapped_dir(release.sha256).iterdir()
    return {p.name: p for p in folder.iterdir()}


def test_big_cpu_model_runs_from_mapped_weights(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    release = table_release()
    model = load(cache, release)
    files = mapped_files(cache, release)
    assert set(files) == {"model.onnx", "weights.bin", "sha256.json"}
    assert files["weights.bin"].stat().st_size > MAPPED_MIN_BYTES
    assert str(files["weights.bin"]) in Path("/proc/self/maps").read_text()  # mapped, not copied
    assert model.path == cache.path(release.sha256)  # the verified file stays the model's identity
    smoke_test(model)  # the sample's expected output comes from numpy, not from ORT


def _resident_kb(path: Path) -> int:
    """Return the kB of `path` this process has resident through its mappings."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            inside = len(fields) == 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_released_weight_pages_come_back_only_as_they_are_read(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    release = table_release()
    model = load(cache, release)
    weights = mapped_files(cache, release)["weights.bin"]
    everywhere = np.linspace(0, ROWS - 1, 4 * 4096, dtype=np.float32).reshape(-1, 4)  # rows on every page
    before, sample = model.run({"x": everywhere})["y"], model.run({"x": SAMPLE_X})["y"]
    assert _resident_kb(weights) > 4096  # the whole table was read
    released = release_mapped_pages(cache.mapped_dir(release.sha256))
    assert released >= 4096 * 1024 and _resident_kb(weights) == 0
    np.testing.assert_array_equal(model.run({"x": SAMPLE_X})["y"], sample)  # read again from the file
    assert _resident_kb(weights) < 4096  # only what that request read (and the kernel's read-around) is back
    np.testing.assert_array_equal(model.run({"x": everywhere})["y"], before)


def test_damaged_mapped_copy_is_made_again(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    release = table_release()
    load(cache, release)
    weights = mapped_files(cache, release)["weights.bin"]
    intact = weights.read_bytes()[:4096]
    with open(weights, "r+b") as fh:  # what a bad sector or a stray write would leave: the rows the sample reads
        fh.write(b"\xff" * 4096)
    model = load(cache, release)
    assert mapped_files(cache, release)["weights.bin"].read_bytes()[:4096] == intact
    smoke_test(model)


def test_small_models_load_directly_and_gc_drops_mapped_copies(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    small = make_release(KEY, "lin", "1.0.0", 1)
    smoke_test(load(cache, small))
    assert not cache.mapped_dir(small.sha256).exists()
    table = table_release()
    load(cache, table)
    assert cache.mapped_dir(table.sha256).exists()
    cache.gc(keep=[small.sha256])
    assert not cache.mapped_dir(table.sha256).exists() and not cache.path(table.sha256).exists()


_HEAP_PROBE = """
import sys
from pathlib import Path
import numpy as np
from agent.config import AgentSettings
from agent.runtime import tune_heap
def status(key):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
def faults():
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])
if sys.argv[1] == "tuned":
    settings = AgentSettings()
    assert tune_heap(settings.malloc_arena_max, settings.malloc_mmap_threshold_kb)
big = np.ones(16 << 20, np.uint8)
del big  # an untuned glibc raises its mmap threshold to 16 MB here
before = status("VmRSS")
blocks, pins = [], []
for _ in range(64):  # buffers freed between live ones, as in a server's heap (KV caches between requests)
    blocks.append(np.ones(2 << 20, np.uint8))
    pins.append(np.ones(8192, np.uint8))
del blocks
retained = (status("VmRSS") - before) / 1024
before = faults()
for _ in range(200):  # a request's output and answer: allocated, filled, freed
    np.ones(196 << 10, np.uint8)
print(retained, faults() - before)
"""


def _heap_probe(mode: str) -> tuple[float, int]:
    """Return MB of freed 2 MB buffers still resident, and page faults of 200 reused 196 KB buffers."""
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    retained, faults = out.stdout.split()
    return float(retained), int(faults)


def test_a_tuned_heap_gives_freed_buffers_back_to_the_system() -> None:
    assert _heap_probe("plain")[0] > 96  # glibc's defaults keep 128 MB of freed 2 MB buffers resident
    assert _heap_probe("tuned")[0] < 8  # the agent's settings give them back at once


def test_a_tuned_heap_reuses_a_requests_medium_buffers() -> None:
    # Mapped anew, each 196 KB buffer would fault in its 49 pages (9,800 in all) and unmap on free.
    assert _heap_probe("tuned")[1] < 500

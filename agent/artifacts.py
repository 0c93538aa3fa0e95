"""Content-addressed artifact cache: resumable HTTP downloads, sha256 and signature checks.

Files live at ``cache/objects/<sha256>`` once verified; a transfer in progress lives at
``cache/partial/<sha256>.part`` and is resumed with ``Range`` after an interruption.
Nothing reaches ``objects/`` before its size and sha256 match. A variant that is a folder
(a language model: graph, external weights, tokenizer) is every file verified by its own
sha256, then linked under its name into ``cache/folders/<graph sha256>/`` (ONNX Runtime
finds external weights beside the graph by name).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeAlias

import httpx

from agent.errors import (
    CancelledError,
    DesiredStateError,
    DiskSpaceError,
    DownloadError,
    EnrollmentError,
    HubUnavailableError,
    VerificationError,
)
from shared.codec import ProtocolError
from shared.manifest import Manifest, SignatureError, load_public_key, verify_manifest

__all__ = ["ArtifactCache", "Verifier", "fetch_manifest", "sha256_file", "verify_signed"]

# Verifies signed manifest bytes against an expected sha256 (when named); the str says where they came from.
Verifier: TypeAlias = Callable[[bytes, str | None, str], Manifest]

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _raise_for_status(response: httpx.Response, what: str) -> None:
    code = response.status_code
    if code in (401, 403):
        raise EnrollmentError(f"the hub refused the device token for {what} (HTTP {code})")
    if code == 404:
        raise DesiredStateError(f"{what} does not exist on the hub (HTTP 404)")
    if code >= 500 or code == 429:
        raise HubUnavailableError(f"the hub answered HTTP {code} for {what}")
    if code >= 400:
        raise DesiredStateError(f"the hub refused {what} (HTTP {code})")


def fetch_manifest(
    client: httpx.Client, url: str, verify: Verifier, expected_sha256: str | None = None
) -> tuple[Manifest, bytes]:
    """Download a signed manifest and verify it (`agent.trust.KeyRing.verify`); return the manifest and its bytes."""
    try:
        response = client.get(url)
    except httpx.HTTPError as exc:
        raise HubUnavailableError(f"manifest {url}: {exc}") from exc
    _raise_for_status(response, f"manifest {url}")
    data = response.content
    return verify(data, expected_sha256, url), data


def verify_signed(
    data: bytes, public_key_b64: str, expected_sha256: str | None = None, source: str = "journaled"
) -> Manifest:
    """Verify signed manifest bytes with one key: the desired state's sha256 when it names one, then the signature."""
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise VerificationError(f"manifest {source}: sha256 differs from the desired state's")
    try:
        return verify_manifest(data, load_public_key(public_key_b64))
    except (SignatureError, ProtocolError) as exc:
        raise VerificationError(f"manifest rejected: {exc}") from exc


class ArtifactCache:
    """Verified files by sha256, resumable partial downloads, and copies derived from verified files."""

    def __init__(self, root: Path, chunk_bytes: int = 256 * 1024, reserve_mb: int = 64) -> None:
        self.root = root
        self.objects = root / "objects"
        self.partial = root / "partial"
        self.mapped = root / "mapped"
        self.folders = root / "folders"
        self.chunk_bytes = chunk_bytes
        self.reserve_bytes = reserve_mb * 1024 * 1024
        self.objects.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Return where a verified file lives."""
        return self.objects / sha256

    def mapped_dir(self, sha256: str) -> Path:
        """Return where the mapped-weights copies of a verified model live (agent.runtime.mapped_copy)."""
        return self.mapped / sha256

    def part_path(self, sha256: str) -> Path:
        """Return where a partial download of a file lives."""
        return self.partial / f"{sha256}.part"

    def has(self, sha256: str, size: int) -> bool:
        """Return True when a file of the right size is in the cache (not re-hashed)."""
        path = self.path(sha256)
        return path.exists() and path.stat().st_size == size

    def verify(self, sha256: str, size: int) -> Path:
        """Re-hash a cached file; raise VerificationError (and drop it) when it is not intact."""
        path = self.path(sha256)
        if not path.exists():
            raise VerificationError(f"artifact {sha256[:12]} is missing from the cache")
        actual_size = path.stat().st_size
        if actual_size != size:
            path.unlink(missing_ok=True)
            raise VerificationError(f"artifact {sha256[:12]}: size {actual_size}, manifest says {size}")
        actual = sha256_file(path)
        if actual != sha256:
            path.unlink(missing_ok=True)
            raise VerificationError(f"artifact {sha256[:12]}: sha256 is {actual[:12]}, manifest says {sha256[:12]}")
        return path

    def ensure_space(self, needed: int) -> None:
        """Raise DiskSpaceError unless `needed` bytes plus the reserve fit on the disk."""
        free = shutil.disk_usage(self.root).free
        if free < needed + self.reserve_bytes:
            raise DiskSpaceError(
                f"not enough disk: {needed // 1024} KiB needed + {self.reserve_bytes // 1024} KiB reserve,"
                f" {free // 1024} KiB free"
            )

    def download(
        self,
        client: httpx.Client,
        url: str,
        sha256: str,
        size: int,
        cancelled: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """Fetch a file into the cache, resuming a partial copy; verify it; return its path."""
        if self.has(sha256, size):
            return self.path(sha256)
        part = self.part_path(sha256)
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.unlink()
            offset = 0
        self.ensure_space(size - offset)
        if offset < size:
            self._transfer(client, url, part, offset, size, cancelled, progress)
        return self._commit(part, sha256, size)

    def _transfer(
        self,
        client: httpx.Client,
        url: str,
        part: Path,
        offset: int,
        size: int,
        cancelled: Callable[[], bool],
        progress: Callable[[int], None] | None,
    ) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if offset:
            logger.info("resuming %s at byte %d of %d", url, offset, size)
        try:
            with client.stream("GET", url, headers=headers) as response:
                if response.status_code == 416 and offset:
                    return  # the partial file already holds every byte; verification decides
                _raise_for_status(response, f"artifact {url}")
                mode = "ab"
                if offset and response.status_code != 206:
                    logger.info("server ignored Range for %s; starting over", url)
                    mode, offset = "wb", 0
                with part.open(mode) as fh:
                    for block in response.iter_bytes(self.chunk_bytes):
                        if cancelled():
                            raise CancelledError(f"download of {url} cancelled by a newer desired state")
                        offset += len(block)
                        if offset > size:
                            raise VerificationError(f"artifact {url} is larger than the manifest's {size} bytes")
                        fh.write(block)
                        # Flush per block so a crash leaves a resumable prefix on disk.
                        fh.flush()
                        if progress is not None:
                            progress(offset)
                    os.fsync(fh.fileno())
        except httpx.HTTPError as exc:
            raise DownloadError(f"artifact {url} stopped at byte {offset} of {size}: {exc}") from exc
        if offset < size:
            raise DownloadError(f"artifact {url} truncated at byte {offset} of {size}")

    def _commit(self, part: Path, sha256: str, size: int) -> Path:
        actual_size = part.stat().st_size
        if actual_size != size:
            raise DownloadError(f"artifact {sha256[:12]} has {actual_size} of {size} bytes")
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise VerificationError(f"artifact {sha256[:12]}: sha256 is {actual[:12]}, manifest says {sha256[:12]}")
        final = self.path(sha256)
        os.replace(part, final)
        return final

    def folder(self, key: str, files: Iterable[tuple[str, str]]) -> Path:
        """Return a folder holding verified objects under their names: (relative path, sha256) pairs.

        Hard links (copies across file systems), made under a temporary name and renamed, so a
        folder that exists is complete. `key` names it (the variant's graph sha256).
        """
        final = self.folders / key
        wanted = list(files)
        self.folders.mkdir(parents=True, exist_ok=True)
        tmp = self.folders / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for name, sha in wanted:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.path(sha), target)
            except OSError:
                shutil.copyfile(self.path(sha), target)
        # Made afresh from the just-verified objects every time: nothing unverified is loaded.
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another worker made it first
        return final

    def gc(self, keep: Iterable[str]) -> list[str]:
        """Delete cached files not in `keep`, and what was derived from them; return the removed sha256s."""
        wanted = set(keep)
        removed = []
        for path in self.objects.iterdir():
            if path.name not in wanted:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        for derived in (self.mapped, self.folders):
            if derived.exists():
                for folder in derived.iterdir():
                    if folder.name not in wanted:
                        shutil.rmtree(folder, ignore_errors=True)
        return removed

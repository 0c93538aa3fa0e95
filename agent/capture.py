"""Hard-example capture: judge off the request path, spool on disk, upload to the hub when online.

Once a request's answer is written (the HTTP server's `Response.after`) its model's policy is
looked up and, when capture is on, the request (its body as received, the first output) goes
to a bounded queue: a few microseconds of the connection's thread and no copy, where judging
there (scores, the item's hash and base64) cost the CNN's p50 8-12 % with every request
captured. A full queue drops the offer and counts it. One thread wakes at most every
`gather_s` (sooner when the queue is half full), judges every offer queued meanwhile against
its `CapturePolicy` and the daily cap, and writes what is kept into the spool as one file
(written to a temporary name, fsynced and renamed, so a crash never leaves half an item; one
file and one fsync per batch, where a file and an fsync per item cost more kernel time than
serving the request did), saves the day's count once per batch and keeps the disk budget
(oldest item dropped first, counted): its work comes in bursts that leave most requests
untouched, where work on every request's own thread delays each one. Another thread uploads
the spool in batches; an item leaves the spool only when the hub answered that it is stored,
already there, or refused for good, so days offline lose nothing within budget and a resent
batch is stored once (items are named by their content hash).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import ValidationError

from agent.updates import backoff_delay
from shared.capture import (
    MAX_BATCH_ITEMS,
    MAX_ITEM_BYTES,
    CaptureBatch,
    CaptureItem,
    CapturePolicy,
    CaptureReason,
    CaptureResult,
    capture_path,
    item_id,
)
from shared.manifest import Manifest

__all__ = ["Capture", "CaptureCounters", "Spool", "judge", "scores"]

logger = logging.getLogger(__name__)

BATCH_BYTES = 8 * 1024 * 1024
QUEUE_ITEMS = 1024  # offers waiting to be judged; past it (or QUEUE_BYTES) an offer is dropped and counted
QUEUE_BYTES = 16 * 1024 * 1024  # their bodies and outputs, held as the server had them
GATHER_S = 0.05  # the spooler wakes at most this often (sooner with the queue half full), for every offer meanwhile


@dataclass
class CaptureCounters:
    """What capture did since start (for /metrics)."""

    offered: int = 0
    judged: int = 0
    kept: int = 0
    queue_full: int = 0
    over_daily_cap: int = 0
    spool_dropped: int = 0
    too_large: int = 0
    unjudged: int = 0
    uploaded: int = 0
    upload_duplicates: int = 0
    upload_refused: int = 0
    upload_errors: int = 0


@dataclass(frozen=True)
class _Offer:
    """One answered request waiting to be judged: the body and output as the server had them."""

    policy: CapturePolicy
    manifest: Manifest
    body: bytes | bytearray  # the server's own buffer for this request; nothing writes it after the answer
    output: np.ndarray
    content_type: str
    at: datetime


def _softmax(row: np.ndarray) -> np.ndarray:
    shifted = np.exp(row - row.max())
    return np.asarray(shifted / shifted.sum())


def scores(manifest: Manifest, output: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Return class probabilities of the first row and its OOD score (None without a reference)."""
    row = np.asarray(output, dtype=np.float64).reshape(output.shape[0] if output.ndim > 1 else 1, -1)[0]
    probs = row if (row.min() >= 0 and abs(row.sum() - 1.0) < 1e-3) else _softmax(row)
    ood = None
    reference = manifest.lineage.get("ood")
    if isinstance(reference, dict) and isinstance(reference.get("centroid"), list):
        centroid = np.asarray(reference["centroid"], dtype=np.float64)
        spread = float(reference.get("spread") or 1.0)
        if centroid.shape == row.shape and spread > 0:
            ood = float(np.linalg.norm(row - centroid) / spread)
    return probs, ood


def judge(
    policy: CapturePolicy, probs: np.ndarray, ood: float | None, draw: Callable[[], float]
) -> CaptureReason | None:
    """Return why the request is kept under `policy`, or None."""
    if not policy.enabled:
        return None
    ordered = np.sort(probs)[::-1]
    top1 = float(ordered[0]) if ordered.size else 0.0
    top2 = float(ordered[1]) if ordered.size > 1 else 0.0
    if policy.min_confidence is not None and top1 < policy.min_confidence:
        return CaptureReason.LOW_CONFIDENCE
    if policy.min_margin is not None and top1 - top2 < policy.min_margin:
        return CaptureReason.SMALL_MARGIN
    if policy.max_ood_score is not None and ood is not None and ood > policy.max_ood_score:
        return CaptureReason.OUT_OF_DISTRIBUTION
    if policy.sample_rate > 0 and draw() < policy.sample_rate:
        return CaptureReason.SAMPLE
    return None


class Spool:
    """Captured items on disk, oldest first: each batch of items one file, a JSON line each.

    A batch is written under a temporary name, fsynced and renamed into place, so a crash
    leaves whole items or none of them: one file and one fsync per batch instead of per item
    (on a small device the syscalls of a file per item cost more CPU than serving the request).
    When some items of a file leave (uploaded, or dropped past the budget), the file is
    written again without them, or removed with its last item, so nothing comes back after a
    restart. The order, sizes and files are kept in memory (read from the folder once, at
    start), so storing and enforcing the budget cost the same with ten items spooled as with
    ten thousand. Single-item ``<id>.json`` files, as earlier agents wrote, are read too.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()  # the index
        self._io = threading.Lock()  # writing, rewriting and removing files
        self._items: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id -> (file name, bytes)
        self._live: dict[str, set[str]] = {}  # file name -> the ids it still holds
        self._bytes = 0
        self._seq = 0
        files = [*directory.glob("*.jsonl"), *directory.glob("*.json")]
        for path in sorted(files, key=_written_at):
            data = path.read_bytes()
            for line in [data] if path.suffix == ".json" else data.splitlines():
                one = path.stem if path.suffix == ".json" else _line_id(line)
                if one is not None and one not in self._items:
                    self._index(one, path.name, len(line) + 1)
            if not self._live.get(path.name):
                path.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        """Return the bytes the spool holds."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: str) -> bool:
        return item in self._items

    def put(self, item: CaptureItem, budget_bytes: int) -> int | None:
        """Store `item`; drop the oldest items past `budget_bytes`; return how many were dropped.

        None means the item was already in the spool (the same request, captured again).
        """
        stored, dropped = self.put_many([item], budget_bytes)
        return dropped if stored else None

    def put_many(self, items: list[CaptureItem], budget_bytes: int) -> tuple[int, int]:
        """Store `items` not spooled already, as one file; drop the oldest past `budget_bytes`.

        Return (items stored, items dropped).
        """
        with self._lock:
            fresh = {item.id: item for item in items if item.id not in self._items}
        if not fresh:
            return 0, 0
        lines = {one: item.model_dump_json().encode() for one, item in fresh.items()}
        with self._io:
            self._seq += 1
            name = f"{time.time_ns():020d}-{self._seq:06d}.jsonl"
            _write_durably(self.directory / name, b"".join(line + b"\n" for line in lines.values()))
            touched: set[str] = set()
            dropped = 0
            with self._lock:
                for one, line in lines.items():
                    self._index(one, name, len(line) + 1)
                while self._bytes > budget_bytes and len(self._items) > 1:
                    touched.add(self._unindex(next(iter(self._items))))
                    dropped += 1
            self._tidy(touched)
        return len(lines), dropped

    def oldest(self, limit: int) -> list[CaptureItem]:
        """Return up to `limit` items, oldest first; unreadable ones are removed."""
        with self._lock:
            wanted = [(one, self._items[one][0]) for one in islice(self._items, limit)]
        lines: dict[str, bytes] = {}
        for name in dict.fromkeys(file for _, file in wanted):
            try:
                data = (self.directory / name).read_bytes()
            except OSError:
                continue  # removed meanwhile: its items were answered for or dropped
            if name.endswith(".json"):
                lines[name.removesuffix(".json")] = data
            else:
                lines.update((one, line) for line in data.splitlines() if (one := _line_id(line)) is not None)
        items: list[CaptureItem] = []
        for one, _ in wanted:
            if one not in lines:
                continue
            try:
                items.append(CaptureItem.model_validate_json(lines[one]))
            except ValidationError as exc:
                logger.warning("capture spool: dropping unreadable %s: %s", one, exc)
                self.remove([one])
        return items

    def remove(self, ids: list[str]) -> None:
        """Forget items the hub has answered for."""
        with self._io:
            with self._lock:
                touched = {self._unindex(one) for one in ids if one in self._items}
            self._tidy(touched)

    def _index(self, one: str, name: str, size: int) -> None:
        self._items[one] = (name, size)
        self._live.setdefault(name, set()).add(one)
        self._bytes += size

    def _unindex(self, one: str) -> str:
        """Forget one item (under `_lock`); return the name of the file that held it."""
        name, size = self._items.pop(one)
        self._bytes -= size
        self._live[name].discard(one)
        return name

    def _tidy(self, names: set[str]) -> None:
        """Remove the files that hold no item now; write the others again with what they hold (under `_io`)."""
        for name in names:
            path = self.directory / name
            with self._lock:
                live = set(self._live.get(name, ()))
                if not live:
                    self._live.pop(name, None)
            if not live:
                path.unlink(missing_ok=True)
                continue
            try:
                kept = [line for line in path.read_bytes().splitlines() if _line_id(line) in live]
                _write_durably(path, b"".join(line + b"\n" for line in kept))
            except OSError as exc:  # the items stay spooled; after a restart the file offers them all again
                logger.warning("capture spool: cannot write %s again: %s", name, exc)


def _written_at(path: Path) -> tuple[int, str]:
    """Return when a spool file was first written: its name says (a file written again keeps it)."""
    stamp = path.name.split("-", 1)[0]
    if path.suffix == ".jsonl" and stamp.isdigit():
        return int(stamp), path.name
    return path.stat().st_mtime_ns, path.name  # an earlier agent's single-item file, never written again


def _line_id(line: bytes) -> str | None:
    """Return the id of a spooled item's JSON line (its first field), or None when unreadable."""
    if line.startswith(b'{"id":"') and line[71:72] == b'"':
        return line[7:71].decode("ascii", "replace")
    try:
        value = json.loads(line).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _write_durably(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file, fsynced, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the renames into `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


def _item(
    one: str,
    manifest: Manifest,
    body: bytes | bytearray,
    content_type: str,
    reason: CaptureReason,
    probs: np.ndarray,
    ood: float | None,
    now: datetime,
) -> CaptureItem:
    """Return the captured item of one request: its body as received, the top classes, why it was kept."""
    labels = manifest.labels or []
    top = np.argsort(-probs)[:3]
    outputs: dict[str, Any] = {
        "top": [
            {"class": labels[c] if c < len(labels) else str(c), "score": score}
            for c, score in zip(top.tolist(), probs[top].round(6).tolist(), strict=True)
        ]
    }
    if ood is not None:
        outputs["ood_score"] = round(ood, 6)
    return CaptureItem(
        id=one,
        model=manifest.name,
        version=manifest.version,
        reason=reason,
        content_type=content_type,
        content_b64=base64.b64encode(body).decode(),
        outputs=outputs,
        captured_at=now,
    )


class Capture:
    """Judge, spool and upload hard examples for the models whose policy asks for it."""

    def __init__(
        self,
        directory: Path,
        policies: Callable[[], dict[str, CapturePolicy]],
        upload: Callable[[CaptureBatch], CaptureResult] | None,
        device_id: str,
        *,
        interval_s: float = 10.0,
        retry_max_s: float = 300.0,
        day_counts: tuple[Callable[[], str | None], Callable[[str], None]] | None = None,
        gather_s: float = GATHER_S,
    ) -> None:
        self.spool = Spool(directory)
        self.counters = CaptureCounters()
        self._policies = policies
        self._upload = upload
        self._device_id = device_id
        self._interval_s = interval_s
        self._retry_max_s = retry_max_s
        self._gather_s = gather_s
        self._lock = threading.Lock()  # the queue, the day's count and the counters
        self._pending: deque[_Offer] = deque()  # offered by the server, judged and spooled by a thread
        self._pending_bytes = 0
        self._arrived = threading.Event()
        self._half_full = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._random = random.Random()
        self._load_day, self._save_day = day_counts or (lambda: None, lambda _: None)
        self._day, self._day_count = self._restore_day()
        self._threads = [
            threading.Thread(target=self._spool_loop, name="capture", daemon=True),
            threading.Thread(target=self._upload_loop, name="capture-upload", daemon=True),
        ]

    def _restore_day(self) -> tuple[str, int]:
        raw = self._load_day()
        try:
            day, count = json.loads(raw) if raw else ("", 0)
            return str(day), int(count)
        except (ValueError, TypeError):
            return "", 0

    def start(self) -> None:
        """Start the spooling and upload threads."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop both threads (offers not yet judged and spooled are dropped)."""
        self._stop.set()
        self._wake.set()
        self._arrived.set()
        self._half_full.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)

    def offer(
        self, manifest: Manifest, body: bytes | bytearray, output: np.ndarray, content_type: str = "application/json"
    ) -> None:
        """Queue one answered request for judging when its model's policy is on; never blocks.

        The HTTP server calls this once the answer is written, before the connection reads its
        next request (`Response.after`): it keeps references, copies nothing and judges nothing.
        """
        policy = self._policies().get(manifest.name)
        if policy is None or not policy.enabled:
            return
        offer = _Offer(policy, manifest, body, output, content_type, datetime.now(UTC))
        with self._lock:
            self.counters.offered += 1
            if len(body) > MAX_ITEM_BYTES:
                self.counters.too_large += 1
                return
            size = len(body) + getattr(output, "nbytes", 0)
            if len(self._pending) >= QUEUE_ITEMS or self._pending_bytes + size > QUEUE_BYTES:
                self.counters.queue_full += 1
                return
            self._pending.append(offer)
            self._pending_bytes += size
            half_full = len(self._pending) >= QUEUE_ITEMS // 2 or self._pending_bytes >= QUEUE_BYTES // 2
        if half_full:
            self._half_full.set()
        if not self._arrived.is_set():  # the spooler is waiting: wake it once for what gathers now
            self._arrived.set()

    def _over_cap(self, policy: CapturePolicy, now: datetime) -> bool:
        """Return (and count) whether today's items reached the policy's cap; call with the lock held."""
        today = now.date().isoformat()
        if today != self._day:
            self._day, self._day_count = today, 0
        if self._day_count >= policy.daily_cap:
            self.counters.over_daily_cap += 1
            return True
        return False

    def flush(self) -> None:
        """Ask the uploader to try now (for example after reconnecting)."""
        self._wake.set()

    # spooling ----------------------------------------------------------------------------------
    def _spool_loop(self) -> None:
        while not self._stop.is_set():
            self._arrived.wait()
            self._half_full.wait(self._gather_s)  # let offers gather: one file and one fsync for many
            if self._stop.is_set():
                return
            self._arrived.clear()
            self._half_full.clear()
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
                self._pending_bytes = 0
            try:
                self._store(self._judge(batch))
            except Exception:  # a bad item or a full disk must not end capture
                logger.exception("capture: judging or storing %d offers failed", len(batch))

    def _judge(self, batch: list[_Offer]) -> list[tuple[CapturePolicy, CaptureItem]]:
        """Return the items of `batch` their policies keep, within the daily cap, each request once."""
        kept: list[tuple[CapturePolicy, CaptureItem]] = []
        ids: set[str] = set()
        judged = unjudged = 0
        for offer in batch:
            try:
                probs, ood = scores(offer.manifest, np.asarray(offer.output))
                reason = judge(offer.policy, probs, ood, self._random.random)
            except (ValueError, TypeError):  # an output that is no scores (strings, an empty tensor)
                unjudged += 1
                continue
            judged += 1
            if reason is None:
                continue
            manifest = offer.manifest
            one = item_id(offer.body, manifest.name, manifest.version)
            if one in ids or one in self.spool:
                continue  # a request captured again is neither stored nor counted again
            with self._lock:
                if self._over_cap(offer.policy, offer.at):
                    continue
                self._day_count += 1
            ids.add(one)
            kept.append(
                (offer.policy, _item(one, manifest, offer.body, offer.content_type, reason, probs, ood, offer.at))
            )
        with self._lock:
            self.counters.judged += judged
            self.counters.unjudged += unjudged
        return kept

    def _store(self, batch: list[tuple[CapturePolicy, CaptureItem]]) -> None:
        """Spool each model's items of `batch` together; save the day's count once."""
        if not batch:
            return
        by_model: dict[str, tuple[CapturePolicy, list[CaptureItem]]] = {}
        for policy, item in batch:
            by_model.setdefault(item.model, (policy, []))[1].append(item)
        for policy, items in by_model.values():
            try:
                stored, dropped = self.spool.put_many(items, int(policy.disk_budget_mb * 1024 * 1024))
            except OSError as exc:  # a full or failing disk: these items are lost, capture goes on
                logger.warning("capture: %d items not spooled: %s", len(items), exc)
                with self._lock:
                    self._day_count -= len(items)
                continue
            with self._lock:
                self.counters.spool_dropped += dropped
                self.counters.kept += stored
        with self._lock:
            day = json.dumps([self._day, self._day_count])
        self._save_day(day)
        self._wake.set()

    # uploading ---------------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(self._interval_s if failures == 0 else backoff_delay(failures, 1.0, self._retry_max_s))
            self._wake.clear()
            if self._stop.is_set() or self._upload is None:
                continue
            try:
                while self.upload_once():
                    pass
                failures = 0
            except Exception as exc:  # offline, hub down, 5xx: keep the items and retry later
                failures += 1
                self.counters.upload_errors += 1
                logger.info("capture upload failed (%s); %d items kept for later", exc, len(self.spool))

    def upload_once(self) -> bool:
        """Upload the oldest batch; return whether there may be more."""
        if self._upload is None:
            return False
        items = self.spool.oldest(MAX_BATCH_ITEMS)
        if not items:
            return False
        # A batch stays well under the hub's body limit (16 MB): at least one item, then up to 8 MB.
        size, cut = 0, 0
        for cut, item in enumerate(items):  # noqa: B007 - `cut` is used after the loop
            size += len(item.content_b64)
            if size > BATCH_BYTES and cut > 0:
                break
        else:
            cut = len(items)
        items = items[:cut]
        result = self._upload(CaptureBatch(device_id=self._device_id, items=items))
        answered = [*result.stored, *result.duplicates, *result.refused]
        for one, why in result.refused.items():
            logger.warning("capture item %s refused by the hub: %s", one, why)
        self.spool.remove(answered)
        self.counters.uploaded += len(result.stored)
        self.counters.upload_duplicates += len(result.duplicates)
        self.counters.upload_refused += len(result.refused)
        return len(set(answered)) >= len(items) and len(self.spool) > 0


def http_uploader(client: httpx.Client, hub_url: str, device_id: str) -> Callable[[CaptureBatch], CaptureResult]:
    """Return an upload function that posts a batch with `client` (which carries the device token)."""
    url = hub_url.rstrip("/") + capture_path(device_id)

    def upload(batch: CaptureBatch) -> CaptureResult:
        response = client.post(
            url,
            content=batch.model_dump_json().encode(),
            headers={"Content-Type": "application/json"},
        )
        response.raise_for_status()
        return CaptureResult.model_validate_json(response.content)

    return upload

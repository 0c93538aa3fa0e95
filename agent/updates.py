"""The update state machine, journaled in SQLite so a crash resumes or rolls back.

    idle -> downloading -> verifying -> staging -> active
              any failure -> rolled_back (with the reason; the old version keeps serving)

Each step is saved before it acts and returns the next state (`_STEPS`). After a crash
`RESUME` maps the state the journal stopped in to a safe place to start again: a
download resumes (with ``Range``), anything after it is verified again from scratch,
and an active model is re-hashed and smoke-tested before it serves.
"""

from __future__ import annotations

import errno
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from agent.artifacts import ArtifactCache, fetch_manifest
from agent.config import AgentSettings, Identity
from agent.errors import (
    AgentError,
    CancelledError,
    DesiredStateError,
    FatalError,
    TransientError,
    VerificationError,
    backoff_delay,
)
from agent.runtime import LoadedModel, ModelRegistry, load_model, smoke_test, warm_up
from agent.store import ModelRecord, Slot, Store
from agent.trust import KeyRing
from shared import routes, tracing
from shared.codec import ProtocolError
from shared.manifest import TEXT_GENERATION, Manifest, SignedManifest, Variant, canonical_json
from shared.messages import DesiredModel, DesiredState, UpdateState
from shared.targets import TargetId

__all__ = ["RESUME", "Updater", "backoff_delay"]  # backoff_delay lives in agent.errors; kept here for callers

logger = logging.getLogger(__name__)

S = UpdateState

# Where to start again after a crash, by the state the journal stopped in (None: nothing to do).
RESUME: dict[UpdateState, UpdateState | None] = {
    S.IDLE: None,
    S.DOWNLOADING: S.DOWNLOADING,
    S.VERIFYING: S.VERIFYING,
    S.STAGING: S.VERIFYING,  # a half-staged session is gone with the process: verify again
    S.ACTIVE: None,
    S.COMMITTED: None,
    S.ROLLED_BACK: None,
}

IN_PROGRESS = frozenset({S.DOWNLOADING, S.VERIFYING, S.STAGING})


def _disk_full(exc: BaseException) -> bool:
    """Return True for "no space left" from the file system or from SQLite (the journal)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def _key(model: DesiredModel) -> str:
    # With the manifest's sha256: the same version re-signed (a retired key) is a change to follow.
    return f"{model.version}@{model.manifest_url}#{model.manifest_sha256 or ''}"


@dataclass
class _Job:
    """The working set of one update; rebuilt from the journal after a crash."""

    name: str
    desired: DesiredModel
    cancelled: Callable[[], bool]
    record: ModelRecord
    manifest: Manifest | None = None
    variant: Variant | None = None
    path: Path | None = None
    tokenizer: Path | None = None
    loaded: LoadedModel | None = None


class Updater:
    """Converges the active models to the desired state, one worker thread per model name."""

    def __init__(
        self,
        settings: AgentSettings,
        identity: Identity,
        store: Store,
        cache: ArtifactCache,
        registry: ModelRegistry,
        client: httpx.Client,
        targets: list[TargetId],
        threads: int,
        on_change: Callable[[], None] = lambda: None,
        on_activated: Callable[[str, str, str | None], None] = lambda name, version, previous: None,
        keys: KeyRing | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.store = store
        self.keys = keys or KeyRing(identity.signing_public_key, store, client, identity.hub_url)
        self.cache = cache
        self.registry = registry
        self.client = client
        self.targets = targets
        self.threads = threads
        self.on_change = on_change
        self.on_activated = on_activated
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._revision: int | None = None
        self._stopped = threading.Event()

    # lifecycle ---------------------------------------------------------------------------------
    def recover(self) -> None:
        """Serve what the journal says was active (re-verified), and resume unfinished updates."""
        for record in self.store.models():
            self._restore_active(record)
            resume = RESUME[record.state]
            if resume is not None and record.pending is not None:
                logger.info("%s: resuming the update to %s from %s", record.name, record.pending.version, resume)
                pending = record.pending
                desired = DesiredModel(
                    version=pending.version, manifest_url=pending.manifest_url, manifest_sha256=pending.manifest_sha256
                )
                self._worker(record.name).want(desired, start=resume)
            elif resume is not None:
                self._save(record.with_(state=S.ROLLED_BACK, error="interrupted before the manifest arrived"))
        self.on_change()

    def stop(self) -> None:
        """Stop every worker (an update in progress stays journaled and resumes next start)."""
        self._stopped.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop()

    def busy(self) -> bool:
        """Return True while any model is being updated."""
        with self._lock:
            return any(w.busy() for w in self._workers.values())

    # desired state -----------------------------------------------------------------------------
    def superseded(self, desired: DesiredState) -> int | None:
        """Return the newer revision already received when `desired` is older (else None).

        Revisions only grow, so an older one is a stale copy: a broker that crashed brings
        back the retained desired state it last saved, and the device may see it before
        the hub has published the current one again.
        """
        raw = self.store.get("desired")
        if raw is None:
            return None
        stored = DesiredState.model_validate_json(raw)
        if stored.device_id != desired.device_id:  # enrolled again under a new id: its revisions start over
            return None
        return stored.revision if desired.revision < stored.revision else None

    def apply(self, desired: DesiredState) -> None:
        """Start converging to a desired state; returns at once, workers do the rest."""
        if desired.device_id != self.identity.device_id:
            raise DesiredStateError(
                f"desired state for device {desired.device_id!r}, this is {self.identity.device_id!r}"
            )
        self.store.put("desired", desired.model_dump_json())
        with self._lock:
            self._revision = desired.revision
        for record in self.store.models():
            if record.name not in desired.models:
                self._remove(record.name)
        for name, model in desired.models.items():
            self._worker(name).want(model)
        self._settle()

    def applied_revision(self) -> int:
        """Return the desired revision the agent last finished applying."""
        raw = self.store.get("applied_revision")
        return int(raw) if raw is not None else 0

    def _settle(self) -> None:
        with self._lock:
            revision = self._revision
            busy = any(w.busy() for w in self._workers.values())
        if revision is not None and not busy:
            self.store.put("applied_revision", str(revision))
        self.on_change()

    def _remove(self, name: str) -> None:
        with self._lock:
            worker = self._workers.pop(name, None)
        if worker is not None:
            worker.stop()
        self.registry.remove(name)
        self.store.delete_model(name)
        logger.info("%s: removed (no longer desired)", name)

    def _worker(self, name: str) -> _Worker:
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                worker = self._workers[name] = _Worker(self, name)
            return worker

    def _save(self, record: ModelRecord, detail: str | None = None) -> ModelRecord:
        self.store.save_model(record, detail)
        self.on_change()
        return record

    # one update ----------------------------------------------------------------------------------
    def run_update(self, name: str, desired: DesiredModel, cancelled: Callable[[], bool], start: UpdateState) -> None:
        """Drive one model through the state machine; raise TransientError to be retried."""
        record = self.store.model(name)
        serving = self.registry.get(name)
        if serving is not None and serving.version == desired.version and start == S.DOWNLOADING:
            active = record.active
            if active is not None and active.manifest and desired.manifest_sha256 not in (None, active.manifest_sha256):
                try:
                    record = self._resigned(record, desired)
                except FatalError as exc:  # the model loaded keeps serving; the new signature is refused
                    logger.warning("%s: re-signed manifest of %s refused: %s", name, desired.version, exc)
                    self._save(record.with_(error=str(exc), failed=_key(desired)), f"refused: {exc}")
                    return
            if record.state not in (S.ACTIVE, S.COMMITTED) or record.desired_version != desired.version:
                self._save(record.with_(state=S.ACTIVE, desired_version=desired.version, pending=None, error=None))
            return
        if record.failed == _key(desired) and start == S.DOWNLOADING:
            return  # this exact version failed fatally; a new desired version is needed
        if start == S.DOWNLOADING and (record.pending is None or record.pending.version != desired.version):
            pending = Slot(desired.version, manifest_url=desired.manifest_url, manifest_sha256=desired.manifest_sha256)
            record = record.with_(pending=pending)
        job = _Job(name, desired, cancelled, record.with_(desired_version=desired.version))
        state: UpdateState | None = start
        try:
            while state is not None:
                if cancelled():
                    raise CancelledError(f"update to {desired.version} replaced by a newer desired state")
                job.record = self._save(job.record.with_(state=state, error=None))
                with tracing.span(f"agent.update.{_SPAN[state]}", {"model": name, "version": desired.version}):
                    state = _STEPS[state](self, job)
        except CancelledError as exc:
            logger.info("%s: %s", name, exc)
            self._save(job.record.with_(state=S.ACTIVE if job.record.active else S.IDLE, pending=None), str(exc))
        except TransientError as exc:
            self._save(job.record.with_(error=f"retrying: {exc}"))
            raise
        except FatalError as exc:
            logger.warning("%s: update to %s refused: %s", name, desired.version, exc)
            self._save(
                job.record.with_(state=S.ROLLED_BACK, pending=None, error=str(exc), failed=_key(desired)),
                f"rolled back: {exc}",
            )

    def _resigned(self, record: ModelRecord, desired: DesiredModel) -> ModelRecord:
        """Take the serving version's manifest signed anew (a retired key): same content, no reload."""
        active = record.active
        assert active is not None and active.manifest is not None
        self.keys.refresh()
        manifest, raw = fetch_manifest(self.client, desired.manifest_url, self.keys.verify, desired.manifest_sha256)
        try:
            journaled = SignedManifest.from_bytes(active.manifest.encode()).manifest
        except ProtocolError as exc:
            raise VerificationError(f"journaled manifest of {active.version} unreadable: {exc}") from exc
        if canonical_json(manifest) != canonical_json(journaled):
            raise VerificationError(
                f"{record.name} {desired.version}: the hub serves another manifest for this version"
            )
        slot = replace(active, manifest=raw.decode(), manifest_sha256=desired.manifest_sha256)
        return self._save(record.with_(active=slot), f"{desired.version}: manifest re-signed by the hub")

    def _download(self, job: _Job) -> UpdateState:
        # Read the key chain first: a key retired meanwhile is refused before anything is fetched.
        self.keys.refresh()
        manifest, raw = fetch_manifest(
            self.client, job.desired.manifest_url, self.keys.verify, job.desired.manifest_sha256
        )
        if manifest.name != job.name or manifest.version != job.desired.version:
            raise VerificationError(
                f"manifest is {manifest.name} {manifest.version}, desired {job.name} {job.desired.version}"
            )
        variant = manifest.choose(self.targets)
        if variant is None:
            offered = ", ".join(str(v.target) for v in manifest.variants) or "none"
            wanted = ", ".join(str(t) for t in self.targets)
            raise DesiredStateError(
                f"{job.name} {manifest.version} offers targets [{offered}], this device runs [{wanted}]"
            )
        pending = Slot(
            manifest.version,
            str(variant.target),
            variant.sha256,
            job.desired.manifest_url,
            raw.decode(),
            job.desired.manifest_sha256,
        )
        job.record = self._save(job.record.with_(pending=pending), f"downloading {variant.file} ({variant.target})")
        for sha, size in _files(manifest, variant):
            self.cache.download(self.client, self._artifact_url(sha), sha, size, job.cancelled)
        return S.VERIFYING

    def _verify(self, job: _Job) -> UpdateState:
        pending = job.record.pending
        if pending is None or pending.manifest is None:
            return S.DOWNLOADING  # crashed before the manifest was journaled: fetch it again
        # The same checks as a first run: the desired state's sha256, then the signature.
        manifest = self.keys.verify(pending.manifest.encode(), job.desired.manifest_sha256, "journaled")
        variant = manifest.variant_by_sha256(pending.sha256 or "")
        if variant is None:
            raise VerificationError(f"journaled variant {pending.sha256} is not in the manifest")
        if not all(self.cache.has(sha, size) for sha, size in _files(manifest, variant)):
            return S.DOWNLOADING  # a file never finished: resume the transfer
        job.manifest, job.variant = manifest, variant
        job.path, job.tokenizer = self._verified(manifest, variant)
        return S.STAGING

    def _verified(self, manifest: Manifest, variant: Variant) -> tuple[Path, Path | None]:
        """Re-hash every file of a variant; return the graph (or the folder of a folder variant) and tokenizer."""
        for sha, size in _files(manifest, variant):
            self.cache.verify(sha, size)
        tokenizer = None
        if (text := manifest.preprocessing.text) is not None:
            tokenizer = self.cache.path(text.tokenizer_sha256)
        if variant.files:
            named = [(variant.local_path(f.path), f.sha256) for f in variant.files]
            return self.cache.folder(variant.sha256, named), tokenizer
        return self.cache.path(variant.sha256), tokenizer

    def _load(self, manifest: Manifest, variant: Variant, path: Path, tokenizer: Path | None) -> LoadedModel:
        if manifest.task == TEXT_GENERATION:
            from agent.textgen_runtime import load_text_model

            return load_text_model(manifest, variant, path, self.threads, self.settings)
        return load_model(manifest, variant, path, self.threads, tokenizer, self.cache.mapped_dir(variant.sha256))

    def _stage(self, job: _Job) -> UpdateState:
        if job.manifest is None or job.variant is None or job.path is None:
            return S.VERIFYING  # resumed here after a crash: never stage what was not verified now
        with tracing.span("agent.update.load"):
            job.loaded = self._load(job.manifest, job.variant, job.path, job.tokenizer)
        with tracing.span("agent.update.warm_up"):
            warm_up(job.loaded, self.settings.warmup_runs)
        with tracing.span("agent.update.smoke_test"):
            smoke_test(job.loaded)
        return S.ACTIVE

    def _activate(self, job: _Job) -> None:
        if job.loaded is None:
            raise VerificationError("reached activation without a staged model")
        if job.cancelled():
            raise CancelledError(f"update to {job.desired.version} replaced before activation")
        self.registry.activate(job.loaded)
        record = job.record
        previous = record.active if record.active and record.active.version != job.loaded.version else record.previous
        job.record = self._save(
            record.with_(
                state=S.ACTIVE, active=record.pending, previous=previous, pending=None, error=None, failed=None
            ),
            f"active {job.loaded.version} ({job.loaded.target})",
        )
        self._collect_garbage()
        self.on_activated(job.name, job.loaded.version, previous.version if previous else None)

    def want(self, name: str, desired: DesiredModel) -> None:
        """Converge one model to `desired` outside the desired state (the `deploy` command)."""
        self._worker(name).want(desired)

    def save(self, record: ModelRecord, detail: str | None = None) -> ModelRecord:
        """Persist a model record (journaled) and report the change."""
        return self._save(record, detail)

    def _artifact_url(self, sha256: str) -> str:
        return routes.url(self.identity.hub_url, routes.artifact(sha256))

    def _collect_garbage(self) -> None:
        keep: set[str] = set()
        for record in self.store.models():
            for slot in (record.active, record.previous, record.pending):
                if slot is None:
                    continue
                if slot.sha256:
                    keep.add(slot.sha256)
                if slot.manifest:
                    # Parsed, not verified: which files to keep must not depend on which keys are trusted now.
                    try:
                        manifest = SignedManifest.from_bytes(slot.manifest.encode()).manifest
                    except ProtocolError:
                        continue
                    variant = manifest.variant_by_sha256(slot.sha256 or "")
                    if variant is not None:
                        keep.update(sha for sha, _ in _files(manifest, variant))
                    elif (text := manifest.preprocessing.text) is not None:
                        keep.add(text.tokenizer_sha256)
        self.cache.gc(keep)

    # startup -----------------------------------------------------------------------------------
    def _restore_active(self, record: ModelRecord) -> None:
        for slot in (record.active, record.previous):
            if slot is None or slot.manifest is None or slot.sha256 is None:
                continue
            try:
                model = self.load_verified(slot)
            except AgentError as exc:
                logger.warning("%s %s cannot be restored: %s", record.name, slot.version, exc)
                self._save(record.with_(error=f"restore {slot.version}: {exc}"))
                continue
            self.registry.activate(model)
            if slot is record.previous:
                self._save(record.with_(active=slot, previous=None), f"restored previous {slot.version}")
            return

    def load_verified(self, slot: Slot) -> LoadedModel:
        """Load a journaled version again from its re-verified manifest and file, smoke-tested."""
        assert slot.manifest is not None and slot.sha256 is not None
        manifest = self.keys.verify(slot.manifest.encode())
        variant = manifest.variant_by_sha256(slot.sha256)
        if variant is None:
            raise VerificationError(f"variant {slot.sha256[:12]} is not in the manifest")
        path, tokenizer = self._verified(manifest, variant)
        model = self._load(manifest, variant, path, tokenizer)
        smoke_test(model)
        return model


def _files(manifest: Manifest, variant: Variant) -> list[tuple[str, int]]:
    """Return (sha256, size) of every file a variant needs: its file(s), and a classifier's tokenizer."""
    files = [(f.sha256, f.size) for f in variant.artifact_files()]
    if (text := manifest.preprocessing.text) is not None:
        files.append((text.tokenizer_sha256, text.tokenizer_size))
    return files


# Span names of the steps: download, verify, stage (load, warm up, smoke test), swap.
_SPAN = {S.DOWNLOADING: "download", S.VERIFYING: "verify", S.STAGING: "stage", S.ACTIVE: "swap"}

_STEPS: dict[UpdateState, Callable[[Updater, _Job], UpdateState | None]] = {
    S.DOWNLOADING: Updater._download,
    S.VERIFYING: Updater._verify,
    S.STAGING: Updater._stage,
    S.ACTIVE: Updater._activate,
}


class _Worker:
    """A thread that keeps one model name converging to the latest wanted version."""

    def __init__(self, updater: Updater, name: str) -> None:
        self.updater = updater
        self.name = name
        self._cond = threading.Condition()
        self._want: DesiredModel | None = None
        self._start = S.DOWNLOADING
        self._done: DesiredModel | None = None
        self._trace: object = None
        self._running = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"update-{name}", daemon=True)
        self._thread.start()

    def want(self, desired: DesiredModel, start: UpdateState = S.DOWNLOADING) -> None:
        """Ask for a version; a different one than the update in progress cancels it."""
        with self._cond:
            if self._want is not None and _key(desired) == _key(self._want) and start == S.DOWNLOADING:
                return  # the same version again (a re-sent retained state): keep going
            self._want, self._start = desired, start
            self._trace = tracing.capture()  # the desired state's trace: the update joins it
            self._cond.notify_all()

    def busy(self) -> bool:
        """Return True while the wanted version is not yet handled."""
        with self._cond:
            return self._running or (self._want is not None and self._want != self._done)

    def stop(self) -> None:
        """Stop after the current step."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                while not self._stopped and (self._want is None or self._want == self._done):
                    self._cond.wait()
                if self._stopped:
                    return
                target, start, trace = self._want, self._start, self._trace
                self._start = S.DOWNLOADING
                self._running = True
            assert target is not None
            try:
                with (
                    tracing.resumed(trace),
                    tracing.span("agent.update", {"model": self.name, "version": target.version}),
                ):
                    self.updater.run_update(self.name, target, functools.partial(self._superseded, target), start)
                attempt = 0
                done = True
            except TransientError as exc:
                done = False
                delay = backoff_delay(attempt, self.updater.settings.retry_min_s, self.updater.settings.retry_max_s)
                attempt += 1
                logger.warning("%s: %s; retrying in %.1fs", self.name, exc, delay)
            except Exception as exc:  # a bug must not kill the worker; report it as a failed update
                # A full disk is retried, though: space may come back, and the partial download resumes.
                done = not _disk_full(exc)
                if done:
                    logger.exception("%s: update to %s crashed", self.name, target.version)
                else:
                    delay = backoff_delay(attempt, self.updater.settings.retry_min_s, self.updater.settings.retry_max_s)
                    attempt += 1
                    logger.warning("%s: update to %s: disk full; retrying in %.1fs", self.name, target.version, delay)
            with self._cond:
                self._running = False
                if done:
                    self._done = target
                else:
                    self._start = S.DOWNLOADING
                    self._cond.wait_for(functools.partial(self._changed, target), timeout=delay)
            try:
                self.updater._settle()
            except Exception:  # e.g. the journal on a full disk: the worker must outlive it
                logger.exception("%s: could not record the settled state", self.name)

    def _changed(self, target: DesiredModel) -> bool:
        return self._stopped or self._want != target

    def _superseded(self, target: DesiredModel) -> bool:
        with self._cond:
            return self._stopped or self._want != target

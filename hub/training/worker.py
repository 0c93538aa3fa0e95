"""The training worker (``autodl-hub worker``): claims queued jobs from the hub database and runs them.

One job at a time per worker. While a job runs, a heartbeat thread writes the job's
progress and new log lines into its row every ``job_heartbeat_s`` and reads back whether
the job was cancelled or taken away (re-queued after this worker looked dead); either
sets the cancel event that training checks at every batch. An idle worker re-queues
jobs whose worker went silent, then claims the oldest job it can run, else joins a
running job's search as a helper (Optuna trials into the same study), else sleeps.

A database that cannot be reached is waited out with capped exponential backoff. The
embedded worker of ``autodl-hub serve`` is this, started with multiprocessing *spawn*:
torch and ONNX Runtime do not survive ``fork``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from hub.config import HubSettings
from hub.db import create_engine_for, migrate
from hub.training import jobs
from hub.training.errors import SpecError, TrainingCancelled, TrainingError
from hub.training.progress import LogProgress

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from sqlalchemy.engine import Engine

    from hub.models import TrainingJob

__all__ = ["JobReporter", "Worker", "run_worker", "start_embedded_workers", "torch_sees_gpu"]

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


def torch_sees_gpu() -> bool:
    """Return True when torch can use a CUDA device here."""
    import torch

    return bool(torch.cuda.is_available())


class JobReporter(LogProgress):
    """Progress events as log lines and a progress dict, which the heartbeat drains (thread-safe)."""

    def __init__(self) -> None:
        super().__init__(sink=self._add)
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._started = time.monotonic()
        self.trial_numbers: list[int] = []
        self._state: dict[str, Any] = {"phase": "starting", "trials_done": 0, "trials": 0, "epoch": 0, "epochs": 0}

    def _add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def search_started(self, trials: int) -> None:
        with self._lock:
            self._state.update(phase="search", trials=trials)
        super().search_started(trials)

    def trial_finished(self, number: int, value: float | None, state: str) -> None:
        with self._lock:
            self.trial_numbers.append(number)
            self._state["trials_done"] += 1
            self._state["last_trial"] = value
        super().trial_finished(number, value, state)

    def fit_started(self, label: str, epochs: int) -> None:
        with self._lock:
            phase = "final" if label.startswith("final") else self._state["phase"]
            self._state.update(phase=phase, step=label, epoch=0, epochs=epochs)
        super().fit_started(label, epochs)

    def epoch_done(self, epoch: int, loss: float, score: float | None) -> None:
        with self._lock:
            self._state.update(epoch=epoch, loss=round(loss, 6), metric=score)
        super().epoch_done(epoch, loss, score)

    def message(self, text: str) -> None:
        if text.startswith("build:"):
            with self._lock:
                self._state.update(phase="build", step=text[len("build: ") :][:200])
        super().message(text)

    @property
    def phase(self) -> str:
        """Return search, final, build (or starting)."""
        with self._lock:
            return str(self._state["phase"])

    def drain(self) -> tuple[dict[str, Any], list[str]]:
        """Return the progress now (with fraction and ETA) and the lines since the last drain."""
        with self._lock:
            lines, self._lines = self._lines, []
            state = dict(self._state)
        trials = max(int(state["trials"]), 1)
        within = state["epoch"] / state["epochs"] if state["epochs"] else 0.0
        done = {"starting": 0.0, "search": min(state["trials_done"] + within, trials), "final": trials + within}
        fraction = 0.97 if state["phase"] == "build" else done.get(state["phase"], 1.0) / (trials + 1)
        elapsed = time.monotonic() - self._started
        state["fraction"] = round(min(max(fraction, 0.0), 1.0), 4)
        state["elapsed_s"] = round(elapsed, 1)
        state["eta_s"] = round(elapsed * (1 - fraction) / fraction, 1) if fraction >= 0.02 else None
        return state, lines

    def restore(self, lines: list[str]) -> None:
        """Put back lines a failed heartbeat could not write."""
        with self._lock:
            self._lines = lines + self._lines


class Worker:
    """Claims and runs training jobs until `stop` is set."""

    def __init__(
        self,
        settings: HubSettings,
        *,
        name: str | None = None,
        gpu: bool | None = None,
        stop: threading.Event | None = None,
        parent_pid: int | None = None,
        join_searches: bool = True,
    ) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self._gpu = gpu
        self.stop = stop or threading.Event()
        self.parent_pid = parent_pid
        self.join_searches = join_searches
        self._engine: Engine | None = None

    @property
    def gpu(self) -> bool:
        """Return whether torch sees a GPU here (asked once, when the first job is queued)."""
        if self._gpu is None:
            self._gpu = torch_sees_gpu()
            logger.info("worker %s: %s", self.name, "torch sees a GPU" if self._gpu else "CPU only (no GPU for torch)")
        return self._gpu

    def preload(self) -> None:
        """Import torch and the training code now, so the first job (or search joined) starts at once."""
        import hub.training.job
        import hub.training.runner  # noqa: F401

        _ = self.gpu

    def run(self) -> None:
        """Work until stopped; database outages are retried with capped exponential backoff."""
        logger.info("worker %s started", self.name)
        failures = 0
        try:
            while not self._stopping():
                try:
                    worked = self.run_once()
                    failures = 0
                except (OperationalError, DBAPIError) as exc:
                    failures += 1
                    delay = min(MAX_BACKOFF_S, self.settings.job_poll_s * 2 ** min(failures, 8))
                    delay *= random.uniform(0.5, 1.0)  # jitter: workers do not retry in lockstep
                    logger.warning("worker %s: database unavailable (%s); retry in %.1f s", self.name, exc, delay)
                    self._dispose()
                    self.stop.wait(delay)
                    continue
                if not worked:
                    self.stop.wait(self.settings.job_poll_s)
        finally:
            self._dispose()
            logger.info("worker %s stopped", self.name)

    def run_once(self) -> bool:
        """Reap lost jobs, then run one job or help one search; return whether there was work."""
        engine = self._connect()
        limit = self.settings.job_log_lines
        with Session(engine, expire_on_commit=False) as session:
            jobs.reap_lost(session, self.settings)
            # An idle hub's embedded worker never loads torch: only a queued job needs the GPU question.
            job = helped = None
            if jobs.has_queued(session):
                job = jobs.claim(session, self.name, gpu=self.gpu, limit=limit)
                if job is None:
                    jobs.note_waiting(session, self.name, gpu=self.gpu)
            if job is None and self.join_searches:
                helped = jobs.join_search(session, self.name)
        if job is not None:
            self._run_job(engine, job)
            return True
        if helped is not None:
            self._help(engine, helped)
            return True
        return False

    def _connect(self) -> Engine:
        if self._engine is None:
            engine = create_engine_for(self.settings)
            try:
                migrate(engine)
            except Exception:
                engine.dispose()
                raise
            self._engine = engine
        return self._engine

    def _dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _stopping(self) -> bool:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.warning("worker %s: the hub process that started it is gone; stopping", self.name)
            self.stop.set()
        return self.stop.is_set()

    def _run_job(self, engine: Engine, job: TrainingJob) -> None:
        from hub.training.job import run_training

        logger.info("worker %s: running job %s (%s)", self.name, job.id, job.model)
        reporter = JobReporter()
        cancel = threading.Event()
        why: dict[str, str] = {}
        shared = self._study_name(job)
        if shared is not None:
            with Session(engine) as session:
                jobs.open_search(session, job.id, self.name, shared)
        beat = threading.Thread(
            target=self._heartbeats,
            args=(engine, job.id, shared is not None, reporter, cancel, why),
            name=f"heartbeat-{job.id}",
            daemon=True,
        )
        beat.start()
        status: jobs.JobStatus = "failed"
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            with tempfile.TemporaryDirectory(prefix=f"job-{job.id}-") as tmp:
                base_dir = self._base_dir(engine, job, Path(tmp))
                summary = run_training(
                    job.task,
                    self.settings,
                    base_dir=base_dir,
                    dry_run=job.dry_run,
                    progress=reporter,
                    cancel=cancel,
                    actor=job.actor,
                    study_name=shared,
                )
            result, status = summary.to_dict(), "succeeded"
        except TrainingCancelled:
            status, error = "cancelled", "cancelled"
        except (TrainingError, SpecError) as exc:
            error = str(exc)
        except Exception as exc:  # a job's failure is reported in the job, never kills the worker
            logger.exception("training job %s failed", job.id)
            error = f"{type(exc).__name__}: {exc}"
        if cancel.is_set() and status == "failed":
            status, error = "cancelled", "cancelled"
        cancel.set()  # ends the heartbeat thread
        beat.join()
        progress, lines = reporter.drain()
        limit = self.settings.job_log_lines
        with Session(engine) as session:
            if why.get("reason") == "lost":
                logger.warning(
                    "job %s was taken from worker %s; its outcome (%s) is dropped", job.id, self.name, status
                )
            elif why.get("reason") == "stop" and status == "cancelled":
                jobs.release(session, job.id, self.name, reason=f"worker {self.name} stopped", lines=lines, limit=limit)
            else:
                progress["phase"] = "done"
                lines.append(status + (f": {error}" if error else ""))
                jobs.finish(
                    session,
                    job.id,
                    self.name,
                    status=status,
                    lines=lines,
                    limit=limit,
                    progress=progress,
                    result=result,
                    error=error,
                )
        logger.info("worker %s: job %s %s", self.name, job.id, status)

    def _heartbeats(
        self,
        engine: Engine,
        job_id: str,
        shared: bool,
        reporter: JobReporter,
        cancel: threading.Event,
        why: dict[str, str],
    ) -> None:
        limit = self.settings.job_log_lines
        closed = not shared
        while not cancel.wait(self.settings.job_heartbeat_s):
            if self._stopping():
                why["reason"] = "stop"
                cancel.set()
                return
            progress, lines = reporter.drain()
            try:
                with Session(engine) as session:
                    if not closed and reporter.phase in ("final", "build"):
                        # The search is over: helpers still running a trial can stop.
                        closed = jobs.open_search(session, job_id, self.name, None)
                    asked = jobs.heartbeat(session, job_id, self.name, progress=progress, lines=lines, limit=limit)
            except (OperationalError, DBAPIError) as exc:
                reporter.restore(lines)
                logger.warning("job %s: heartbeat failed (%s); retrying", job_id, exc)
                continue
            if asked is None:
                why["reason"] = "lost"
                cancel.set()
            elif asked:
                why["reason"] = "cancelled"
                cancel.set()

    def _study_name(self, job: TrainingJob) -> str | None:
        from hub.training.job import shared_search
        from hub.training.spec import parse_spec

        if job.dry_run:
            return None
        try:
            spec = parse_spec(job.task, source="task", base_dir=Path(job.base_dir or "."))
        except SpecError:
            return None  # run_training reports the error
        name = f"{spec.publish.model}-job-{job.id}"
        return name if shared_search(spec, name).search.study_name == name and self._db_is_shared() else None

    def _db_is_shared(self) -> bool:
        return ":memory:" not in self.settings.database_url

    def _base_dir(self, engine: Engine, job: TrainingJob, tmp: Path) -> Path:
        if job.data_id is not None:
            from hub.training.archive import unpack_archive

            with Session(engine) as session:
                return unpack_archive(session, job.data_id, tmp / "data")
        return Path(job.base_dir) if job.base_dir else self.settings.data_dir / "datasets"

    def _help(self, engine: Engine, job: TrainingJob) -> None:
        """Run trials of `job`'s search until its study has enough or the owner moves on."""
        from hub.training.runner import join_search
        from hub.training.search import resolve_storage
        from hub.training.spec import parse_spec

        assert job.study_name is not None
        logger.info("worker %s: joining the search of job %s (%s)", self.name, job.id, job.study_name)
        reporter = JobReporter()
        cancel = threading.Event()
        watch = threading.Thread(target=self._watch_search, args=(engine, job.id, cancel), daemon=True)
        watch.start()
        outcome = "done"
        try:
            with tempfile.TemporaryDirectory(prefix=f"help-{job.id}-") as tmp:
                base_dir = self._base_dir(engine, job, Path(tmp))
                spec = parse_spec(job.task, source="task", base_dir=base_dir)
                spec = spec.model_copy(
                    update={"search": spec.search.model_copy(update={"storage": "hub", "study_name": job.study_name})}
                )
                storage = resolve_storage("hub", self.settings.database_url)
                assert storage is not None
                join_search(
                    spec,
                    base_dir,
                    storage=storage,
                    sampler_seed=spec.training.seed + 1 + random.randrange(1_000_000),
                    cancel=cancel,
                    progress=reporter,
                )
        except TrainingCancelled:
            outcome = "stopped: the search ended"
        except Exception as exc:  # a helper's failure costs trials, never the job
            logger.warning("worker %s: helping job %s failed: %s", self.name, job.id, exc)
            outcome = f"failed: {type(exc).__name__}: {exc}"
        cancel.set()
        watch.join()
        numbers = ", ".join(str(n) for n in reporter.trial_numbers) or "none"
        line = f"worker {self.name} helped the search: trials {numbers} ({outcome})"
        with Session(engine) as session:
            jobs.leave_search(session, job.id, [line], self.settings.job_log_lines)

    def _watch_search(self, engine: Engine, job_id: str, cancel: threading.Event) -> None:
        while not cancel.wait(self.settings.job_heartbeat_s):
            if self._stopping():
                cancel.set()
                return
            try:
                with Session(engine) as session:
                    job = jobs.get_job(session, job_id)
            except (OperationalError, DBAPIError):
                continue
            if job is None or job.status != "running" or job.study_name is None or job.cancel_requested:
                cancel.set()


def run_worker(
    settings: HubSettings, name: str | None = None, parent_pid: int | None = None, *, preload: bool = False
) -> None:
    """Run a worker in this process until SIGTERM or SIGINT (the process's entry point).

    `preload` (``autodl-hub worker``) loads torch before the first job; the embedded worker
    of ``serve`` does not, so an idle hub never loads torch.
    """
    worker = Worker(settings, name=name, parent_pid=parent_pid)
    if preload:
        worker.preload()

    def stop(_signum: int, _frame: object) -> None:
        worker.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()


def _embedded_main(settings_json: str, name: str, parent_pid: int, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    run_worker(HubSettings.model_validate_json(settings_json), name=name, parent_pid=parent_pid)


def start_embedded_workers(settings: HubSettings, count: int) -> list[BaseProcess]:
    """Start `count` worker processes with spawn (never fork: torch and ONNX Runtime break)."""
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().level
    processes: list[BaseProcess] = []
    for index in range(count):
        name = f"{socket.gethostname()}-embedded-{os.getpid()}-{index}"
        process = context.Process(
            target=_embedded_main,
            args=(settings.model_dump_json(), name, os.getpid(), level),
            name=f"training-worker-{index}",
            daemon=False,
        )
        process.start()
        processes.append(process)
    return processes

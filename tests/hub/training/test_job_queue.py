"""The job queue in the database: exclusive claims, lost workers, cancel, waiting GPU jobs, bad input."""

from __future__ import annotations

import io
import logging
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from hub.config import HubSettings
from hub.db import create_engine_for, migrate
from hub.errors import InvalidInputError, PayloadTooLargeError
from hub.models import utcnow
from hub.training import jobs
from hub.training.archive import check_archive
from hub.training.errors import SpecError
from hub.training.worker import Worker
from tests.support.dashboard import ui_login
from tests.support.hub_app import Hub

TASK = """task: image-classification
data: {path: builtin:digits}
model: {candidates: [mlp]}
search: {trials: 1, cv_folds: 2}
training: {epochs: 1}
build: {targets: [cpu-fp32]}
publish: {model: digits}
"""


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Iterator[HubSettings]:
    """Settings on a migrated database (SQLite file, then PostgreSQL)."""
    settings = HubSettings(data_dir=tmp_path / "data", database_url=database_url, job_lost_after_s=5)
    engine = create_engine_for(settings)
    migrate(engine)
    engine.dispose()
    yield settings


def _session(settings: HubSettings) -> Session:
    return Session(create_engine_for(settings), expire_on_commit=False)


def test_concurrent_claims_never_hand_out_a_job_twice(settings: HubSettings) -> None:
    with _session(settings) as session:
        submitted = [jobs.submit(session, settings, TASK, dry_run=True).id for _ in range(12)]
    taken: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        engine = create_engine_for(settings)
        with Session(engine, expire_on_commit=False) as session:
            while True:
                job = jobs.claim(session, name, gpu=False, limit=100)
                if job is None:
                    # A claim may lose a race and return None while others remain: look again.
                    if not jobs.has_queued(session):
                        break
                    continue
                with lock:
                    taken.append((job.id, name))
        engine.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    counts = Counter(job_id for job_id, _ in taken)
    assert sorted(counts) == sorted(submitted)
    assert set(counts.values()) == {1}
    with _session(settings) as session:
        for job_id, name in taken:
            job = jobs.get_job(session, job_id)
            assert job is not None and job.status == "running" and job.worker == name and job.attempts == 1


def test_a_lost_job_is_requeued_once_then_failed(settings: HubSettings) -> None:
    with _session(settings) as session:
        job_id = jobs.submit(session, settings, TASK).id
        assert jobs.claim(session, "w1", gpu=False, limit=100) is not None
        assert jobs.reap_lost(session, settings) == []  # it just heartbeated
        later = utcnow() + timedelta(seconds=6)
        assert jobs.reap_lost(session, settings, now=later) == [job_id]
        job = jobs.get_job(session, job_id)
        assert job is not None and job.status == "queued" and job.worker is None
        assert "worker w1 stopped heartbeating" in job.log[-1] and job.log[-1].endswith("re-queued")
        # The old worker's late heartbeat is refused: the job is not its own any more.
        assert jobs.heartbeat(session, job_id, "w1", progress={}, lines=["late"], limit=100) is None
        assert jobs.claim(session, "w2", gpu=False, limit=100) is not None
        assert jobs.reap_lost(session, settings, now=utcnow() + timedelta(seconds=6)) == [job_id]
        session.expire_all()
        job = jobs.get_job(session, job_id)
        assert job is not None and job.status == "failed" and job.attempts == 2
        assert job.error is not None and "second time this job lost its worker" in job.error
        assert not jobs.finish(session, job_id, "w2", status="succeeded", lines=[], limit=100, progress={})


def test_cancel_a_queued_job_and_ask_a_running_one(settings: HubSettings) -> None:
    with _session(settings) as session:
        first = jobs.submit(session, settings, TASK).id
        second = jobs.submit(session, settings, TASK).id
        cancelled = jobs.request_cancel(session, settings, second)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert jobs.claim(session, "w1", gpu=False, limit=100) is not None
        assert jobs.claim(session, "w2", gpu=False, limit=100) is None  # the cancelled one never starts
        assert jobs.heartbeat(session, first, "w1", progress={}, lines=["a"], limit=100) is False
        running = jobs.request_cancel(session, settings, first)
        assert running is not None and running.status == "running" and running.cancel_requested
        assert jobs.heartbeat(session, first, "w1", progress={"phase": "search"}, lines=["b"], limit=100) is True


def test_the_log_is_bounded(settings: HubSettings) -> None:
    with _session(settings) as session:
        job_id = jobs.submit(session, settings, TASK).id
        jobs.claim(session, "w1", gpu=False, limit=10)
        jobs.heartbeat(
            session, job_id, "w1", progress={}, lines=[f"line {i}" for i in range(30)] + ["x" * 5000], limit=10
        )
        job = jobs.get_job(session, job_id)
        assert job is not None and len(job.log) == 10
        assert job.log[-2] == "line 29" and len(job.log[-1]) == jobs.MAX_LINE


def test_a_cuda_job_waits_for_a_gpu_worker_and_says_why(settings: HubSettings) -> None:
    with _session(settings) as session:
        job_id = jobs.submit(session, settings, TASK.replace("publish:", "resource: {require_gpu: true}\npublish:")).id
    worker = Worker(settings, name="cpu-only", gpu=False)
    assert worker.run_once() is False
    with _session(settings) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None and job.status == "queued" and job.resource == "cuda"
        assert "torch sees a GPU" in job.note
        gpu_claim = jobs.claim(session, "gpu-worker", gpu=True, limit=100)
        assert gpu_claim is not None and gpu_claim.id == job_id and gpu_claim.note == ""


def test_a_task_that_does_not_parse_is_refused_with_its_line(settings: HubSettings) -> None:
    with _session(settings) as session, pytest.raises(SpecError, match="line 3"):
        jobs.submit(session, settings, "task: image-classification\ndata: {path: builtin:digits}\nmodel: a: b\n")


def test_a_worker_backs_off_while_the_database_is_unreachable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.support.processes import free_port

    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none?connect_timeout=1"
    worker = Worker(HubSettings(data_dir=tmp_path, database_url=url, job_poll_s=0.05), name="w", gpu=False)
    thread = threading.Thread(target=worker.run)
    with caplog.at_level(logging.WARNING, logger="hub.training.worker"):
        thread.start()
        threading.Event().wait(1.5)
        worker.stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    retries = [r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()]
    assert 1 <= len(retries) < 20, retries  # retried, and with growing delays rather than a busy loop


def _tar(members: dict[str, bytes], *, absolute: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(("/" if absolute else "") + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("archive", "error"),
    [
        (_tar({"../escape.csv": b"a,b\n"}), "unsafe path"),
        (_tar({"etc/passwd": b"x"}, absolute=True), "unsafe path"),
        (b"this is not a tar file", "not a readable tar"),
    ],
)
def test_unsafe_or_broken_archives_are_refused(archive: bytes, error: str) -> None:
    with pytest.raises(InvalidInputError, match=error):
        check_archive(archive, 10**6)


def test_archives_over_the_limit_are_refused(sqlite_hub: Hub) -> None:
    with pytest.raises(PayloadTooLargeError):
        check_archive(_tar({"a.csv": b"x" * 1000}), 10)
    good = sqlite_hub.request("POST", "/jobs/data", content=_tar({"data/a.csv": b"x,y\n1,2\n"}))
    assert good.status_code == 201, good.text
    bad = sqlite_hub.request("POST", "/jobs/data", content=_tar({"../a.csv": b"x"}))
    assert bad.status_code == 422 and "unsafe path" in bad.json()["detail"]
    unknown = sqlite_hub.request("POST", "/jobs", json={"task": TASK, "data": "0" * 64})
    assert unknown.status_code == 422 and "no uploaded archive" in unknown.json()["detail"]


def test_the_dashboard_lists_jobs_with_why_they_wait(sqlite_hub: Hub) -> None:
    task = TASK.replace("publish:", "resource: {require_gpu: true}\npublish:")
    job_id = sqlite_hub.request("POST", "/jobs", json={"task": task}).json()["id"]
    Worker(sqlite_hub.settings, name="cpu-only", gpu=False).run_once()
    signed_in = ui_login(sqlite_hub.client, sqlite_hub.admin_key)
    assert signed_in.status_code == 303
    page = sqlite_hub.client.get("/ui/jobs")
    assert page.status_code == 200
    assert f'data-job="{job_id}"' in page.text and "queued" in page.text and "torch sees a GPU" in page.text
    metrics = sqlite_hub.client.get("/metrics").text
    assert 'autodl_hub_training_jobs{status="queued"} 1.0' in metrics


@pytest.mark.parametrize(
    ("seen", "log", "new"),
    [
        ([], ["a", "b"], ["a", "b"]),
        (["a", "b"], ["a", "b", "c"], ["c"]),
        (["a", "b", "c"], ["b", "c", "d", "e"], ["d", "e"]),  # the hub dropped the oldest line
        (["a", "b"], ["a", "b"], []),
    ],
)
def test_remote_follow_shows_each_log_line_once(seen: list[str], log: list[str], new: list[str]) -> None:
    from hub.cli.remote import new_lines

    assert new_lines(seen, log) == new

"""Training workers as real processes: a hub (API only) and ``autodl-hub worker`` processes on one database.

Each test runs on SQLite and on PostgreSQL unless its subject needs PostgreSQL (two
workers claiming at once, row locks). Tasks are the digits example cut to seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboard import ui_login
from tests.support.hub import HubProcess, WorkerProcess
from tests.support.paths import EXAMPLES
from tests.support.postgres import pg_schema_url
from tests.support.waiting import WaitTimeout, wait_for

pytestmark = pytest.mark.slow

FINISHED = {"succeeded", "failed", "cancelled"}
FAST = {"AUTODL_HUB_JOB_HEARTBEAT_S": "0.5", "AUTODL_HUB_JOB_POLL_S": "0.2", "AUTODL_HUB_JOB_LOST_AFTER_S": "4"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The hub database: a SQLite file, then a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub' / 'hub.db'}"
    else:
        yield from pg_schema_url()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema."""
    yield from pg_schema_url()


def digits_task(
    small_task: Callable[..., Path], *, trials: int = 1, epochs: int = 2, model: str = "digits", **extra: Any
) -> str:
    """The digits example cut down: one candidate, two folds, a few epochs, one build target."""
    sections: dict[str, dict[str, Any]] = {
        "model": {"candidates": ["mlp"], "auto_select": False},
        "search": {"trials": trials, "cv_folds": 2, "timeout_s": None},
        "training": {"epochs": epochs, "early_stopping": None},
        "resource": {"use_gpu": False, "threads": 1},
        "build": {"targets": ["cpu-fp32"]},
        "publish": {"model": model},
    }
    for section, values in extra.items():
        sections[section] = {**sections.get(section, {}), **values}
    return small_task("digits", **sections).read_text()


def start_hub(tmp_path: Path, db_url: str, **env: str) -> HubProcess:
    hub = HubProcess(tmp_path / "hub", mqtt=False, database_url=db_url, workers=0, env={**FAST, **env})
    hub.start()
    return hub


def submit(hub: HubProcess, task: str) -> str:
    with hub.api() as client:
        response = client.post("/jobs", json={"task": task})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def job(hub: HubProcess, job_id: str) -> dict[str, Any]:
    with hub.api() as client:
        response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def wait_job(
    hub: HubProcess, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 240.0, *logs: Any
) -> dict[str, Any]:
    """Poll the job until `until` holds; on timeout, fail with its state and the workers' logs."""
    seen: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        seen.update(job(hub, job_id))
        return dict(seen) if until(seen) else None

    try:
        return wait_for(f"job {job_id}", check, timeout, every=0.3)
    except WaitTimeout as exc:
        tails = "\n".join(w.log_tail() for w in logs)
        raise AssertionError(f"{exc}: {seen.get('status')} {seen.get('log', [])[-15:]}\n{tails}") from None


def test_a_job_submitted_through_the_api_is_trained_by_a_worker_process(
    tmp_path: Path, db_url: str, small_task: Callable[..., Path]
) -> None:
    hub = start_hub(tmp_path, db_url)
    try:
        job_id = submit(hub, digits_task(small_task))
        assert job(hub, job_id)["status"] == "queued"  # nobody runs it: the hub has no embedded worker
        with WorkerProcess(hub, "w1") as worker:
            done = wait_job(hub, job_id, lambda j: j["status"] in FINISHED, 240, worker)
        assert done["status"] == "succeeded", (done["error"], done["log"][-20:])
        assert done["worker"] == "w1" and done["version"] == "0.1.0" and done["result"]["version"] == "0.1.0"
        assert done["progress"]["phase"] == "done" and done["progress"]["fraction"] > 0.9
        assert any("claimed by worker w1" in line for line in done["log"])
        assert any("published digits 0.1.0" in line for line in done["log"])
        with hub.api() as client:
            assert client.get("/models/digits/versions/0.1.0").status_code == 200
            assert ui_login(client, hub.admin_key).status_code == 303
            page = client.get("/ui/jobs")
        assert job_id in page.text and "succeeded" in page.text and "0.1.0" in page.text
    finally:
        hub.stop()


def test_cancel_reaches_a_running_job_within_seconds(
    tmp_path: Path, db_url: str, small_task: Callable[..., Path]
) -> None:
    hub = start_hub(tmp_path, db_url)
    try:
        with WorkerProcess(hub, "w1") as worker:
            job_id = submit(hub, digits_task(small_task, trials=50, epochs=400))
            wait_job(hub, job_id, lambda j: j["progress"].get("epoch", 0) > 0, 120, worker)
            with hub.api() as client:
                asked = client.post(f"/jobs/{job_id}/cancel")
            assert asked.status_code == 200, asked.text
            started = time.monotonic()
            done = wait_job(hub, job_id, lambda j: j["status"] in FINISHED, 30, worker)
            took = time.monotonic() - started
        assert done["status"] == "cancelled" and done["result"] is None, done["log"][-10:]
        assert took < 15, f"cancel took {took:.1f} s"
    finally:
        hub.stop()


def test_a_hub_restart_mid_job_loses_nothing(tmp_path: Path, db_url: str, small_task: Callable[..., Path]) -> None:
    hub = start_hub(tmp_path, db_url)
    try:
        with WorkerProcess(hub, "w1") as worker:
            job_id = submit(hub, digits_task(small_task, trials=2, epochs=8))
            before = wait_job(hub, job_id, lambda j: any(line.startswith("trial 0") for line in j["log"]), 120, worker)
            hub.stop(signal.SIGKILL)
            time.sleep(2)  # the worker trains on while no hub answers
            hub.start()
            during = job(hub, job_id)
            assert during["status"] in ("running", "succeeded")
            assert during["log"][: len(before["log"])] == before["log"]  # nothing written before the kill is lost
            done = wait_job(hub, job_id, lambda j: j["status"] in FINISHED, 240, worker)
        assert done["status"] == "succeeded", (done["error"], done["log"][-20:])
        assert done["attempts"] == 1 and done["version"] == "0.1.0"
        hub.stop()
        hub.start()  # and once more after it finished: the record is in the database
        again = job(hub, job_id)
        assert again["status"] == "succeeded" and again["result"] == done["result"] and again["log"] == done["log"]
    finally:
        hub.stop()


def test_a_killed_workers_job_is_requeued_and_completed_by_another(
    tmp_path: Path, db_url: str, small_task: Callable[..., Path]
) -> None:
    hub = start_hub(tmp_path, db_url)
    try:
        first = WorkerProcess(hub, "doomed").start()
        # Long enough (seconds on a quiet machine) that the worker is killed mid-job, not after it.
        job_id = submit(hub, digits_task(small_task, trials=2, epochs=150))
        wait_job(
            hub,
            job_id,
            lambda j: j["status"] == "running" and j["worker"] == "doomed" and j["progress"].get("epoch", 0) > 0,
            120,
            first,
        )
        first.stop(signal.SIGKILL)
        with WorkerProcess(hub, "rescuer") as second:
            done = wait_job(hub, job_id, lambda j: j["status"] in FINISHED, 240, second)
        assert done["status"] == "succeeded", (done["error"], done["log"][-20:])
        assert done["worker"] == "rescuer" and done["attempts"] == 2 and done["version"] == "0.1.0"
        lost = [line for line in done["log"] if "worker doomed stopped heartbeating" in line]
        assert len(lost) == 1 and lost[0].endswith("re-queued")
    finally:
        hub.stop()


def test_two_workers_on_postgres_take_six_jobs_none_twice(
    tmp_path: Path, pg_url: str, small_task: Callable[..., Path]
) -> None:
    hub = start_hub(tmp_path, pg_url)
    try:
        ids = [submit(hub, digits_task(small_task, epochs=1, model=f"m{i}")) for i in range(6)]
        with WorkerProcess(hub, "a") as a, WorkerProcess(hub, "b") as b:
            finished = [wait_job(hub, i, lambda j: j["status"] in FINISHED, 300, a, b) for i in ids]
        for state in finished:
            assert state["status"] == "succeeded", (state["error"], state["log"][-10:])
            assert state["attempts"] == 1
            assert len([line for line in state["log"] if line.startswith("claimed by worker")]) == 1
            assert state["version"] == "0.1.0"
        assert {state["worker"] for state in finished} == {"a", "b"}
    finally:
        hub.stop()


def test_one_search_is_split_across_two_workers_into_one_study(
    tmp_path: Path, db_url: str, small_task: Callable[..., Path]
) -> None:
    import optuna

    from hub.training.search import resolve_storage

    hub = start_hub(tmp_path, db_url)
    try:
        with WorkerProcess(hub, "a") as a, WorkerProcess(hub, "b") as b:
            time.sleep(3)  # both idle and polling, so the one that does not claim joins
            job_id = submit(hub, digits_task(small_task, trials=6, epochs=3, search={"pruning": False}))
            done = wait_job(hub, job_id, lambda j: j["status"] in FINISHED, 300, a, b)
        assert done["status"] == "succeeded", (done["error"], done["log"][-20:])
        owner = done["worker"]
        owned = {int(m.group(1)) for line in done["log"] if (m := re.match(r"trial (\d+): (COMPLETE|PRUNED)", line))}
        helped_lines = [
            m for line in done["log"] if (m := re.match(r"worker (\S+) helped the search: trials ([\d, ]+) \(", line))
        ]
        assert len(helped_lines) == 1, done["log"]
        helper, numbers = helped_lines[0].groups()
        assert {owner, helper} == {"a", "b"}
        helped = {int(n) for n in numbers.split(",")}
        assert owned and helped and not owned & helped
        study_name = f"digits-job-{job_id}"
        storage = resolve_storage("hub", db_url)
        assert storage is not None
        study = optuna.load_study(study_name=study_name, storage=storage)
        finished = {t.number for t in study.trials if t.state.is_finished()}
        assert owned | helped <= finished and len(finished) >= 6
    finally:
        hub.stop()


def test_serve_runs_one_embedded_worker_by_default(tmp_path: Path, small_task: Callable[..., Path]) -> None:
    hub = HubProcess(tmp_path / "hub", mqtt=False, env=FAST)
    with hub:
        job_id = submit(hub, digits_task(small_task))
        done = wait_job(hub, job_id, lambda j: j["status"] in FINISHED, 240)
        assert done["status"] == "succeeded", (done["error"], done["log"][-20:])
        assert "embedded" in done["worker"]


def test_train_remote_uploads_the_data_and_follows_the_job(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(EXAMPLES / "churn" / "churn.csv", project / "data" / "churn.csv")
    task = yaml.safe_load((EXAMPLES / "churn" / "task.yaml").read_text())
    task["data"]["path"] = "data/churn.csv"  # relative: only the uploaded archive has it
    task["model"] = {"candidates": ["linear"], "auto_select": False}
    task["search"].update(trials=1, cv_folds=2)
    task["training"].update(epochs=3, early_stopping=None)
    task["build"]["targets"] = ["cpu-fp32"]
    (project / "task.yaml").write_text(yaml.safe_dump(task))
    hub = start_hub(tmp_path, f"sqlite:///{tmp_path / 'hub' / 'hub.db'}")
    try:
        with WorkerProcess(hub, "w1"):
            args = ["train", str(project / "task.yaml"), "--remote", hub.url, "--api-key", hub.admin_key, "--json"]
            out = hub.run_cli(*args, timeout=300)
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["model"] == "churn" and summary["version"] == "0.1.0"
        assert summary["published_targets"] == ["cpu-fp32"]
        with hub.api() as client:
            state = client.get(f"/jobs/{summary['job']}").json()
        assert state["status"] == "succeeded" and state["worker"] == "w1"
        refused = hub.run_cli(
            "train", str(project / "task.yaml"), "--remote", hub.url, "--api-key", "adk_x", check=False
        )
        assert refused.returncode == 1 and "401" in refused.stderr
    finally:
        hub.stop()

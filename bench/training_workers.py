"""Wall time of one search spread over 2 training workers against 1 worker, same trials.

A hub (API only, no embedded worker) and N ``autodl-hub worker`` processes on one
database; the digits example cut down (one candidate, 2 folds, a few epochs, 1 thread per
worker) with `--trials` trials. For each N: the search's wall time (claimed until the
final fit starts, seen by polling the job's progress) and the whole job's (submitted until
succeeded: search, final fit, build, publish). Workers are started and idle before the
job is submitted, so their start-up is not counted.

    .venv/bin/python bench/training_workers.py [--trials 8] [--epochs 4] [--database-url URL] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_flag_set  # noqa: E402
from tests.support.hub import HubProcess, WorkerProcess  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits" / "task.yaml"


def task_text(trials: int, epochs: int, model: str) -> str:
    task = yaml.safe_load(EXAMPLE.read_text())
    task["model"] = {"candidates": ["mlp"], "auto_select": False}
    task["search"].update(trials=trials, cv_folds=2, timeout_s=None, pruning=False)
    task["training"].update(epochs=epochs, early_stopping=None)
    task["resource"] = {"use_gpu": False, "threads": 1}
    task["build"]["targets"] = ["cpu-fp32"]
    task["publish"]["model"] = model
    return yaml.safe_dump(task)


def run_once(hub: HubProcess, workers: int, trials: int, epochs: int) -> dict[str, Any]:
    procs = [WorkerProcess(hub, f"bench-{workers}-{i}").start() for i in range(workers)]
    try:
        for proc in procs:  # idle and polling before the job exists
            deadline = time.monotonic() + 120
            while "started" not in proc.log_tail() and time.monotonic() < deadline:
                time.sleep(0.2)
        with hub.api() as client:
            submitted = time.monotonic()
            job_id = client.post("/jobs", json={"task": task_text(trials, epochs, f"bench{workers}")}).json()["id"]
            running = final = None
            while True:
                job = client.get(f"/jobs/{job_id}").json()
                now = time.monotonic()
                if running is None and job["status"] == "running":
                    running = now
                if final is None and job["progress"].get("phase") in ("final", "build", "done"):
                    final = now
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.2)
        if job["status"] != "succeeded":
            raise SystemExit(
                f"the {workers}-worker job {job['status']}: {job['error']}\n" + "\n".join(job["log"][-20:])
            )
        helpers = [line for line in job["log"] if "helped the search" in line]
        return {
            "workers": workers,
            "trials": trials,
            "search_s": round((final or now) - (running or submitted), 1),
            "job_s": round(now - submitted, 1),
            "owner_trials": sum(1 for line in job["log"] if line.startswith("trial ") and "COMPLETE" in line),
            "helper": helpers[0] if helpers else None,
        }
    finally:
        for proc in procs:
            proc.stop()


def main() -> None:
    """Run the benchmark and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--database-url", default=None, help="default: a SQLite file in a temporary dir")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    flags = cpu_flag_set()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        env = {"AUTODL_HUB_JOB_HEARTBEAT_S": "1", "AUTODL_HUB_JOB_POLL_S": "0.5"}
        hub = HubProcess(Path(tmp) / "hub", mqtt=False, database_url=args.database_url, workers=0, env=env)
        with hub:
            for workers in (1, 2):
                rows.append(run_once(hub, workers, args.trials, args.epochs))
    out = {
        "rows": rows,
        "speedup_search": round(rows[0]["search_s"] / max(rows[1]["search_s"], 1e-9), 2),
        "speedup_job": round(rows[0]["job_s"] / max(rows[1]["job_s"], 1e-9), 2),
        "env": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags,
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "database": "postgresql" if args.database_url else "sqlite",
        },
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"{'workers':>7} {'trials':>6} {'search s':>9} {'job s':>7} {'owner trials':>12}")
    for row in rows:
        print(
            f"{row['workers']:>7} {row['trials']:>6} {row['search_s']:>9} {row['job_s']:>7} {row['owner_trials']:>12}"
        )
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()

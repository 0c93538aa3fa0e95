"""``autodl-hub train --remote``: submit a task file to a hub's job queue and follow it.

Data the task names by a relative path is packed into a tar.gz and uploaded first
(``POST /jobs/data``), so a worker on any node can unpack it; built-in data sets and
absolute (hub-side) paths are sent as they are. Progress comes from polling
``GET /jobs/{id}``: a progress bar on a terminal, new log lines on stderr otherwise.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

__all__ = ["RemoteError", "cancel", "follow", "new_lines", "pack_data", "submit"]

FINISHED = ("succeeded", "failed", "cancelled")


class RemoteError(Exception):
    """The hub refused the job, or could not be reached."""


def pack_data(task_path: Path) -> bytes | None:
    """Return a tar.gz of the data the task names by a relative path, or None when there is none."""
    try:
        raw = yaml.safe_load(task_path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # the hub reports the task's own errors, with their line
    data = raw.get("data") if isinstance(raw, dict) else None
    path = data.get("path") if isinstance(data, dict) else None
    if not isinstance(path, str) or path.startswith("builtin:") or Path(path).is_absolute():
        return None
    local = (task_path.parent / path).resolve()
    if not local.exists():
        raise RemoteError(f"data.path: {local} does not exist")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        # Kept at the same relative path, so the task file needs no change on the worker.
        tar.add(local, arcname=Path(path).as_posix())
    return buffer.getvalue()


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise RemoteError(f"cannot reach the hub: {exc}") from exc
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise RemoteError(f"the hub answered {response.status_code}: {detail}")
    return response.json()


def submit(client: httpx.Client, task_path: Path, *, dry_run: bool = False) -> dict[str, Any]:
    """Upload the task's data (if local) and queue the task; return the job."""
    body: dict[str, Any] = {"task": task_path.read_text(), "dry_run": dry_run}
    archive = pack_data(task_path)
    if archive is not None:
        body["data"] = _call(client, "POST", "/jobs/data", content=archive)["id"]
    job: dict[str, Any] = _call(client, "POST", "/jobs", json=body)
    return job


def follow(
    client: httpx.Client,
    job_id: str,
    *,
    on_update: Callable[[dict[str, Any], list[str]], None],
    interval: float = 1.0,
) -> dict[str, Any]:
    """Poll the job until it finishes; call `on_update(job, new log lines)` each time."""
    seen: list[str] = []
    while True:
        job: dict[str, Any] = _call(client, "GET", f"/jobs/{job_id}")
        on_update(job, new_lines(seen, job["log"]))
        seen = job["log"]
        if job["status"] in FINISHED:
            return job
        time.sleep(interval)


def new_lines(seen: list[str], log: list[str]) -> list[str]:
    """Return the lines of `log` after those already `seen` (the hub keeps only the last lines)."""
    for overlap in range(min(len(seen), len(log)), 0, -1):
        if seen[-overlap:] == log[:overlap]:
            return log[overlap:]
    return log


def cancel(client: httpx.Client, job_id: str) -> None:
    """Ask the hub to cancel the job."""
    _call(client, "POST", f"/jobs/{job_id}/cancel")

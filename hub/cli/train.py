"""The ``autodl-hub train`` command (kept light: the heavy imports happen when it runs)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["train"]


def train(
    task: Annotated[Path, typer.Argument(help="the task file (YAML)", show_default=False)],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check the task file and the data, print the plan; train nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="the hub's data dir [env AUTODL_HUB_DATA_DIR]", show_default=False)
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="SQLAlchemy URL [env AUTODL_HUB_DATABASE_URL]", show_default=False),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
    remote: Annotated[
        str | None,
        typer.Option("--remote", help="a hub URL: queue the job there (its workers train) and follow it"),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="AUTODL_HUB_API_KEY", help="an operator key for --remote")
    ] = None,
) -> None:
    """Train a task file, build it for its targets, and register the version (here, or on a hub's workers)."""
    if remote is not None:
        _train_remote(task, remote, api_key, dry_run=dry_run, as_json=as_json)
        return
    from hub.cli.admin import load_settings
    from hub.errors import HubError
    from hub.training.errors import TrainingError
    from hub.training.job import run_training
    from hub.training.progress import LogProgress, Progress, RichProgress

    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("alembic", "hub.build", "hub.registry"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = load_settings(data_dir, database_url=database_url)
    build_error: type[Exception] = _build_error()
    progress: Progress
    try:
        if sys.stderr.isatty() and not dry_run:
            with RichProgress() as progress:
                summary = run_training(task, settings, dry_run=dry_run, progress=progress)
        else:
            progress = LogProgress(sink=None if as_json else _stderr)
            summary = run_training(task, settings, dry_run=dry_run, progress=progress)
    except (TrainingError, HubError, build_error) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt as exc:
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(130) from exc
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
        return
    _print_summary(summary.to_dict())


def _train_remote(task: Path, url: str, api_key: str | None, *, dry_run: bool, as_json: bool) -> None:
    import httpx

    from hub.cli.remote import RemoteError, cancel, follow, submit
    from hub.config import HubSettings
    from hub.tls import client_context

    if not api_key:
        typer.echo("error: --remote needs --api-key (or AUTODL_HUB_API_KEY): an operator key of that hub", err=True)
        raise typer.Exit(1)
    if not task.is_file():
        typer.echo(f"error: {task}: no such task file", err=True)
        raise typer.Exit(1)
    headers = {"Authorization": f"Bearer {api_key}"}
    verify = client_context(HubSettings())  # the hub's CA (AUTODL_HUB_TLS_CA_FILE, or the local data dir's)
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60, verify=verify) as client:
        job: dict[str, object] = {}
        try:
            job = submit(client, task, dry_run=dry_run)
            typer.echo(f"job {job['id']} queued on {url}", err=True)
            job = _follow(client, str(job["id"]), follow, quiet=as_json)
        except RemoteError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        except KeyboardInterrupt as exc:
            if job.get("id"):
                cancel(client, str(job["id"]))
                typer.echo(f"error: interrupted; job {job['id']} cancelled", err=True)
            raise typer.Exit(130) from exc
    if job["status"] != "succeeded":
        typer.echo(f"error: job {job['id']} {job['status']}: {job['error']}", err=True)
        raise typer.Exit(1)
    summary = job["result"]
    assert isinstance(summary, dict)
    if as_json:
        typer.echo(json.dumps({**summary, "job": job["id"]}))
        return
    _print_summary(summary)


def _follow(client: object, job_id: str, follow: Any, *, quiet: bool) -> dict[str, object]:
    """Follow the job with a progress bar on a terminal, plain log lines otherwise."""
    if quiet or not sys.stderr.isatty():

        def show(job: dict[str, Any], lines: list[str]) -> None:
            for line in [] if quiet else lines:
                typer.echo(line, err=True)

        result: dict[str, object] = follow(client, job_id, on_update=show)
        return result
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bars:
        bar = bars.add_task(f"job {job_id}: queued", total=1.0)

        def update(job: dict[str, Any], lines: list[str]) -> None:
            for line in lines:
                bars.console.print(line)
            progress = job.get("progress") or {}
            what = job["status"] if job["status"] != "running" else progress.get("phase", "running")
            note = f" ({job['note']})" if job["status"] == "queued" and job.get("note") else ""
            bars.update(
                bar, completed=float(progress.get("fraction") or 0.0), description=f"job {job_id}: {what}{note}"
            )

        result = follow(client, job_id, on_update=update)
        return result


def _build_error() -> type[Exception]:
    from hub.build.errors import BuildError

    return BuildError


def _stderr(text: str) -> None:
    typer.echo(text, err=True)


def _print_summary(summary: dict[str, object]) -> None:
    if summary["dry_run"]:
        plan = summary["plan"]
        assert isinstance(plan, dict)
        typer.echo(f"dry run: {summary['model']} ({summary['task']}), nothing trained or published")
        typer.echo(f"  data: {plan['train_rows']} train / {plan['test_rows']} test rows, hash {plan['data_hash'][:12]}")
        for issue in plan["data_report"]["issues"]:
            column = f" [{issue['column']}]" if issue["column"] else ""
            typer.echo(f"  check {issue['check']}{column}: {issue['detail']} -> {issue['action']}")
        typer.echo(
            f"  search: {plan['trials']} trials x {plan['cv_folds']} folds over {', '.join(plan['candidates'])}, "
            f"metric {plan['metric']}, on {plan['device']}"
        )
        typer.echo(f"  build: {', '.join(plan['targets'])}")
        return
    metric = summary["metric"]
    typer.echo(f"{summary['model']} {summary['version']} registered ({summary['candidate']})")
    if metric == "perplexity":
        typer.echo(
            f"  validation perplexity: {summary['test_metric']:.2f} (unigram baseline {summary['baseline']:.2f})"
        )
        scores = summary["candidate_scores"]
        assert isinstance(scores, dict)
        for name, value in scores.items():
            typer.echo(f"  candidate {name}: validation perplexity {value:.2f}")
        typer.echo(f"  published: {', '.join(summary['published_targets']) or 'none'}")  # type: ignore[arg-type]
        skipped_lm = summary["skipped_targets"]
        assert isinstance(skipped_lm, dict)
        for target, reason in skipped_lm.items():
            typer.echo(f"  skipped {target}: {reason}")
        return
    typer.echo(f"  test {metric}: {summary['test_metric']:.4f} (majority/mean baseline {summary['baseline']:.4f})")
    typer.echo(f"  cv {metric}: {summary['cv_score']:.4f} (baseline {summary['cv_baseline']:.4f})")
    typer.echo(f"  published: {', '.join(summary['published_targets']) or 'none'}")  # type: ignore[arg-type]
    skipped = summary["skipped_targets"]
    assert isinstance(skipped, dict)
    for target, reason in skipped.items():
        typer.echo(f"  skipped {target}: {reason}")

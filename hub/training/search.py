"""The candidate and hyperparameter search: Optuna (TPE, median pruner) with k-fold CV.

Each trial picks a candidate architecture, a learning rate, a weight decay and a dropout,
trains on k-1 folds and scores on the held-out fold, k times; the trial's value is the
mean fold score. The pruner stops a trial whose running mean falls below the median of
earlier trials at the same fold. With an RDB storage (the hub's database), several
workers given the same study name share one search, capped at `search.trials` in total.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hub.training.dataset import Dataset
from hub.training.errors import SpecError, TrainingError
from hub.training.metrics import baseline, higher_is_better
from hub.training.progress import Progress
from hub.training.spec import TaskSpec
from hub.training.trainer import FitConfig, fit
from hub.training.zoo import build_model, featurize

__all__ = ["SearchResult", "TrialResult", "fit_config", "resolve_storage", "run_lm_search", "run_search"]

# Width multipliers of a text-generation family's preset that the search tries.
LM_WIDTHS = (0.5, 1.0, 1.5)

logger = logging.getLogger(__name__)
_OPEN_ATTEMPTS = 3  # a study is opened this many times before a search fails


@dataclass(frozen=True)
class TrialResult:
    """One trial of the search."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL
    params: dict[str, Any]
    value: float | None
    fold_scores: tuple[float, ...] = ()
    best_epochs: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the trial as JSON-able data."""
        return {
            "number": self.number,
            "state": self.state,
            "params": self.params,
            "value": self.value,
            "fold_scores": list(self.fold_scores),
            "best_epochs": list(self.best_epochs),
        }


@dataclass(frozen=True)
class SearchResult:
    """The best configuration found, and every trial (this worker's and others')."""

    study_name: str
    metric: str
    best: TrialResult
    baseline: float  # the majority class (or training mean) scored on the same folds
    trials: tuple[TrialResult, ...] = field(default_factory=tuple)

    @property
    def candidate(self) -> str:
        """Return the best trial's candidate architecture."""
        return str(self.best.params["candidate"])

    def to_dict(self) -> dict[str, Any]:
        """Return the search as JSON-able data (it goes into the manifest's lineage)."""
        return {
            "study_name": self.study_name,
            "metric": self.metric,
            "baseline": self.baseline,
            "best": self.best.to_dict(),
            "trials": [t.to_dict() for t in self.trials],
        }


def fit_config(spec: TaskSpec, params: dict[str, Any], train: Dataset, *, epochs: int | None = None) -> FitConfig:
    """Return the loop settings for `params` (and the task's training section)."""
    weights = None
    if train.class_weighted and train.labels:
        counts = np.bincount(train.y, minlength=len(train.labels)).astype(np.float64)
        weights = tuple(float(len(train.y) / (len(counts) * max(c, 1.0))) for c in counts)
    return FitConfig(
        epochs=epochs or spec.training.epochs,
        batch_size=spec.training.batch_size,
        optimizer=spec.training.optimizer,
        lr=float(params["lr"]),
        weight_decay=float(params["weight_decay"]),
        patience=spec.training.early_stopping,
        seed=spec.training.seed,
        metric=spec.metric,
        classification=spec.is_classification,
        class_weights=weights,
    )


def resolve_storage(storage: str | None, hub_database_url: str | None) -> str | None:
    """Return the Optuna storage URL: None (in memory), a URL, or the hub database for 'hub'.

    Optuna's tables (``studies``, ``trials``, ``alembic_version``) would collide with the
    hub's own, so in PostgreSQL they live in their own schema, and beside an SQLite hub
    database in an ``optuna.db`` file.
    """
    if storage is None or storage != "hub":
        return storage
    if hub_database_url is None:
        raise SpecError("search.storage: 'hub' needs the hub's database URL (run it through autodl-hub)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(hub_database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise SpecError("search.storage: the hub database is in memory; give an explicit storage URL")
        return f"sqlite:///{Path(url.database).with_name('optuna.db')}"
    if backend == "postgresql":
        options = url.query.get("options", "")
        options = options if isinstance(options, str) else " ".join(options)
        current = next((o.split("=", 1)[1] for o in options.split() if o.startswith("-csearch_path=")), None)
        schema = f"{current.split(',')[0]}_optuna" if current else "optuna"
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        engine.dispose()
        kept = " ".join(o for o in options.split() if not o.startswith("-csearch_path="))
        return url.update_query_dict({"options": f"{kept} -csearch_path={schema}".strip()}).render_as_string(
            hide_password=False
        )
    raise SpecError(f"search.storage: Optuna cannot use a {backend} hub database; give a storage URL")


def run_search(
    spec: TaskSpec,
    train: Dataset,
    base_dir: Path,
    *,
    device: torch.device,
    storage: str | None = None,
    study_name: str,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    sampler_seed: int | None = None,
) -> SearchResult:
    """Search candidates and hyperparameters with k-fold CV on `train`; return the best.

    Workers sharing a study pass different `sampler_seed`s, so they do not all try the
    same random configurations; the folds stay those of the task's seed.
    """
    import optuna
    from sklearn.model_selection import KFold, StratifiedKFold

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = spec.search
    candidates = spec.model.candidates if spec.model.auto_select else spec.model.candidates[:1]
    seed = spec.training.seed
    draw = seed if sampler_seed is None else sampler_seed
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.TPESampler(seed=draw) if search.strategy == "tpe" else optuna.samplers.RandomSampler(seed=draw)
    )
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        if search.pruning
        else optuna.pruners.NopPruner()
    )
    direction: Literal["maximize", "minimize"] = "maximize" if higher_is_better(spec.metric) else "minimize"
    study = _open_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner, direction=direction)
    lr = spec.training.lr
    if not study.trials:
        # The task's own settings are the first trial, so even a one-trial search is sane.
        study.enqueue_trial(
            {
                "candidate": candidates[0],
                "lr": lr,
                "weight_decay": float(np.clip(spec.training.weight_decay, 1e-6, 1e-2)),
                "dropout": 0.1,
            }
        )
    splitter = (
        StratifiedKFold(search.cv_folds, shuffle=True, random_state=seed)
        if spec.is_classification
        else KFold(search.cv_folds, shuffle=True, random_state=seed)
    )
    folds = list(splitter.split(np.zeros(len(train.y)), train.y))
    trivial = float(np.mean([baseline(spec.metric, train.y[a], train.y[b]) for a, b in folds]))
    features: dict[str, dict[str, np.ndarray]] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {
            "candidate": trial.suggest_categorical("candidate", list(candidates)),
            "lr": trial.suggest_float("lr", lr / 10, max(min(lr * 10, 1.0), lr), log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            "dropout": trial.suggest_float("dropout", 0.0, 0.4),
        }
        if progress is not None:
            progress.trial_started(trial.number, params)
        candidate = str(params["candidate"])
        if candidate not in features:
            features[candidate] = featurize(train, candidate, spec, base_dir)
        inputs = features[candidate]
        scores: list[float] = []
        epochs: list[int] = []
        for k, (fit_rows, val_rows) in enumerate(folds):
            model = build_model(candidate, train.subset(fit_rows), spec, params, base_dir)
            result = fit(
                model,
                {n: a[fit_rows] for n, a in inputs.items()},
                train.y[fit_rows],
                fit_config(spec, params, train.subset(fit_rows)),
                device=device,
                val_inputs={n: a[val_rows] for n, a in inputs.items()},
                val_y=train.y[val_rows],
                cancel=cancel,
                progress=progress,
                label=f"trial {trial.number} fold {k + 1}/{len(folds)}",
            )
            assert result.best_score is not None
            scores.append(result.best_score)
            epochs.append(result.best_epoch)
            trial.set_user_attr("fold_scores", scores)
            trial.set_user_attr("best_epochs", epochs)
            trial.report(float(np.mean(scores)), k)
            if k < len(folds) - 1 and trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.mean(scores))

    def finished(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress is not None:
            progress.trial_finished(trial.number, trial.value, trial.state.name)

    if progress is not None:
        progress.search_started(search.trials)
    callbacks: list[Any] = [finished]
    if storage is not None:
        # Shared studies: every worker stops once the study as a whole has enough trials.
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        callbacks.append(MaxTrialsCallback(search.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    # Another worker may already have spent (part of) a shared study's budget.
    done = sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials)
    if done < search.trials:
        study.optimize(
            objective, n_trials=search.trials - done, timeout=search.timeout_s, callbacks=callbacks, catch=()
        )
    trials = tuple(_result(t) for t in study.trials)
    complete = [t for t in trials if t.state == "COMPLETE"]
    if not complete:
        raise TrainingError(f"search: no trial of study {study_name!r} completed")
    best = _result(study.best_trial)
    logger.info("search: best %s %s = %.4f with %s", study_name, spec.metric, best.value, best.params)
    return SearchResult(study_name=study_name, metric=spec.metric, best=best, baseline=trivial, trials=trials)


def run_lm_search(
    spec: TaskSpec,
    objective: Callable[[dict[str, Any]], float],
    *,
    tune_width: bool,
    storage: str | None = None,
    study_name: str | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Tune learning rate, warm-up (and width) of a language model: `objective` returns validation perplexity."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = spec.training.seed
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.TPESampler(seed=seed)
        if spec.search.strategy == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    name = study_name or f"{spec.publish.model}-lm"
    study = _open_study(study_name=name, storage=storage, sampler=sampler, direction="minimize")
    lr = spec.training.lr
    first: dict[str, Any] = {"lr": lr, "warmup": spec.training.warmup}
    if tune_width:
        first["width"] = 1.0
    if not study.trials:
        study.enqueue_trial(first)  # the task's own settings are trial 0

    def run(trial: optuna.Trial) -> float:
        if cancel is not None and cancel.is_set():
            raise TrainingError("search cancelled")
        params: dict[str, Any] = {
            "lr": trial.suggest_float("lr", lr / 10, min(lr * 10, 1.0), log=True),
            "warmup": trial.suggest_float("warmup", 0.0, 0.3),
        }
        if tune_width:
            params["width"] = trial.suggest_categorical("width", list(LM_WIDTHS))
        if progress is not None:
            progress.trial_started(trial.number, params)
        return objective(params)

    def finished(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if progress is not None:
            progress.trial_finished(trial.number, trial.value, trial.state.name)

    if progress is not None:
        progress.search_started(spec.search.trials)
    done = sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials)
    if done < spec.search.trials:
        study.optimize(
            run, n_trials=spec.search.trials - done, timeout=spec.search.timeout_s, callbacks=[finished], catch=()
        )
    trials = tuple(_result(t) for t in study.trials)
    if not any(t.state == "COMPLETE" for t in trials):
        raise TrainingError(f"search: no trial of study {name!r} completed")
    best = _result(study.best_trial)
    return SearchResult(study_name=name, metric="perplexity", best=best, baseline=float("nan"), trials=trials)


def _result(trial: Any) -> TrialResult:
    return TrialResult(
        number=int(trial.number),
        state=str(trial.state.name),
        params=dict(trial.params),
        value=None if trial.value is None else float(trial.value),
        fold_scores=tuple(float(s) for s in trial.user_attrs.get("fold_scores", ())),
        best_epochs=tuple(int(e) for e in trial.user_attrs.get("best_epochs", ())),
    )


def _open_study(*, study_name: str, storage: str | None, **options: Any) -> Any:
    """Create the study, or load it when another worker made it first; raise TrainingError.

    Workers of one search open it at once: on a new PostgreSQL database each may try to
    create Optuna's tables and types, and all but one fail on a duplicate key. Tried again,
    the tables are there.
    """
    import optuna

    for attempt in range(_OPEN_ATTEMPTS):
        try:
            return optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True, **options)
        except Exception as exc:  # SQLAlchemy and Optuna raise many kinds for a bad storage
            if attempt + 1 == _OPEN_ATTEMPTS:
                raise TrainingError(f"search.storage: cannot open the study {study_name!r}: {exc}") from exc
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")

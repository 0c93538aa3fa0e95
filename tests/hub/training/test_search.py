"""The Optuna search: cross-validated, better than the trivial model, shareable through a database."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hub.training.data import load_dataset
from hub.training.errors import SpecError
from hub.training.search import _open_study, resolve_storage, run_search
from hub.training.spec import load_spec
from tests.support.postgres import pg_schema_url

SMALL = {"epochs": 6, "batch_size": 32, "early_stopping": 2}


def _churn(small_task: Callable[..., Path], trials: int):  # type: ignore[no-untyped-def]
    path = small_task("churn", search={"trials": trials, "cv_folds": 3}, training=SMALL)
    spec = load_spec(path)
    return spec, load_dataset(spec, path.parent)


def test_cv_metric_beats_the_majority_class(small_task: Callable[..., Path]) -> None:
    spec, data = _churn(small_task, trials=2)
    result = run_search(spec, data, Path("."), device=torch.device("cpu"), study_name="cv")
    assert len(result.best.fold_scores) == 3
    assert result.best.value is not None
    # The majority class scores about 0.64 here; a model that learned something scores clearly above.
    assert result.best.value > result.baseline + 0.05, (result.best.value, result.baseline)
    assert {t.state for t in result.trials} <= {"COMPLETE", "PRUNED"}
    assert result.to_dict()["best"]["params"]["candidate"] in spec.model.candidates


def test_workers_share_one_study_through_rdb_storage(small_task: Callable[..., Path], tmp_path: Path) -> None:
    spec, data = _churn(small_task, trials=2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = run_search(spec, data, Path("."), device=torch.device("cpu"), storage=storage, study_name="shared")
    assert len(first.trials) == 2
    # A second worker on the same study sees the finished trials and, the budget spent, adds none.
    second = run_search(spec, data, Path("."), device=torch.device("cpu"), storage=storage, study_name="shared")
    assert [t.number for t in second.trials] == [0, 1]
    assert second.best.value == first.best.value


def test_hub_storage_is_beside_an_sqlite_hub_db(tmp_path: Path) -> None:
    url = resolve_storage("hub", f"sqlite:///{tmp_path / 'hub.db'}")
    assert url == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert resolve_storage(None, "sqlite:///x.db") is None
    with pytest.raises(SpecError, match="search.storage"):
        resolve_storage("hub", None)


def test_hub_storage_in_postgres_gets_its_own_schema(small_task: Callable[..., Path], postgres_url: str) -> None:
    import optuna
    from sqlalchemy import create_engine, text

    url = resolve_storage("hub", postgres_url)
    assert url is not None and "_optuna" in url
    spec, data = _churn(small_task, trials=1)
    try:
        result = run_search(spec, data, Path("."), device=torch.device("cpu"), storage=url, study_name="pg")
        assert len(result.trials) == 1
        assert len(optuna.load_study(study_name="pg", storage=url).trials) == 1
    finally:
        schema = url.split("search_path%3D")[-1].split("&")[0] if "%3D" in url else url.split("search_path=")[-1]
        engine = create_engine(postgres_url)
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def _open_at_once(url: str, workers: int) -> list[object]:
    """Open one study from `workers` threads released together; return each one's study id or error."""
    start, got = threading.Barrier(workers), []

    def open_it() -> None:
        start.wait()
        try:
            got.append(_open_study(study_name="digits-job", storage=url, direction="minimize")._study_id)
        except Exception as exc:  # surfaced by the caller
            got.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return got


def test_workers_opening_one_study_at_once_on_a_new_postgres_database_all_get_it() -> None:
    # Each one finds no Optuna tables and creates them; all but one hit a duplicate key, then retry.
    for url in pg_schema_url("autodl_optuna_"):
        got = _open_at_once(url, 4)
        assert len(got) == 4 and len(set(got)) == 1 and isinstance(got[0], int), got

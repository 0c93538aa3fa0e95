"""Progress of a training task: a rich progress bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["LogProgress", "Progress", "RichProgress"]

logger = logging.getLogger(__name__)


class Progress:
    """Receives progress events; the base class ignores them."""

    def search_started(self, trials: int) -> None:
        """A search of up to `trials` trials begins."""

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        """Trial `number` begins with `params`."""

    def trial_finished(self, number: int, value: float | None, state: str) -> None:
        """Trial `number` ended (complete, pruned or failed)."""

    def fit_started(self, label: str, epochs: int) -> None:
        """A training run of up to `epochs` epochs begins."""

    def epoch_done(self, epoch: int, loss: float, score: float | None) -> None:
        """An epoch ended with its mean training loss and validation score."""

    def message(self, text: str) -> None:
        """Say something to whoever watches."""


class LogProgress(Progress):
    """Progress as log lines, optionally also handed to `sink` (a job's log)."""

    def __init__(self, sink: Callable[[str], None] | None = None) -> None:
        self._sink = sink

    def _say(self, text: str) -> None:
        logger.info("%s", text)
        if self._sink is not None:
            self._sink(text)

    def search_started(self, trials: int) -> None:
        self._say(f"search: up to {trials} trials")

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self._say(f"trial {number}: {shown}")

    def trial_finished(self, number: int, value: float | None, state: str) -> None:
        self._say(f"trial {number}: {state}" + (f", cv score {value:.4f}" if value is not None else ""))

    def fit_started(self, label: str, epochs: int) -> None:
        self._say(f"{label}: up to {epochs} epochs")

    def epoch_done(self, epoch: int, loss: float, score: float | None) -> None:
        logger.debug("epoch %d loss %.4f score %s", epoch, loss, score)

    def message(self, text: str) -> None:
        self._say(text)


class RichProgress(Progress):
    """Two rich progress bars: trials of the search, and epochs of the current run."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichBars

        # On stderr, so stdout carries only the summary (``--json``).
        self._bars = RichBars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._trials: Any = None
        self._epochs: Any = None

    def __enter__(self) -> RichProgress:
        self._bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._bars.stop()

    def search_started(self, trials: int) -> None:
        self._trials = self._bars.add_task("trials", total=trials)

    def trial_finished(self, number: int, value: float | None, state: str) -> None:
        if self._trials is not None:
            shown = f"{value:.4f}" if value is not None else state
            self._bars.update(self._trials, advance=1, description=f"trials (last: {shown})")

    def fit_started(self, label: str, epochs: int) -> None:
        if self._epochs is not None:
            self._bars.remove_task(self._epochs)
        self._epochs = self._bars.add_task(label, total=epochs)

    def epoch_done(self, epoch: int, loss: float, score: float | None) -> None:
        if self._epochs is not None:
            self._bars.update(self._epochs, completed=epoch)

    def message(self, text: str) -> None:
        self._bars.console.print(text)

"""The loop that drives rollouts: every few seconds, one reconcile step per running rollout.

It keeps no state of its own: everything is read from the DB on each tick, so a hub
restarted mid-rollout carries on from where it stopped. On start it also finishes any
interrupted rollback and publishes again the desired state of devices in active rollouts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlmodel import Session, col, select

from hub.config import HubSettings
from hub.db import SessionFactory
from hub.models import Device
from hub.rollouts.engine import RolloutContext, advance, complete_reverts
from hub.rollouts.history import record_changes
from hub.rollouts.queries import active_rollout_ids, chunks, list_rollouts, members_of
from shared.messages import DesiredState

__all__ = ["RolloutController", "RolloutSettings", "install", "republish"]

logger = logging.getLogger(__name__)


class RolloutController:
    """Run `hub.rollouts.engine.advance` for every running rollout, in a background thread.

    `lock` serialises the loop with the API's operator actions, so a pause or an abort
    never interleaves with a half-done tick of the same hub.
    """

    def __init__(
        self,
        session_factory: SessionFactory,
        context: RolloutContext,
        interval_s: float = 2.0,
        history_interval_s: float = 10.0,
    ) -> None:
        self._sessions = session_factory
        self._context = context
        self._interval = interval_s
        self._history_interval = history_interval_s
        self._history_due = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.RLock()
        self.counters: Counter[str] = Counter()

    def start(self) -> None:
        """Recover from a previous run, then start the loop thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        with self.lock:
            try:
                with self._sessions() as session:
                    reverted = complete_reverts(session, self._context)
                    sent = republish(session, self._context)
                logger.info(
                    "rollout controller started: %d rollbacks finished, %d desired states re-sent", reverted, sent
                )
            except Exception:
                self.counters["errors"] += 1
                logger.exception("rollout recovery failed; the loop retries on every tick")
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for the current tick to end."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Run the next tick now (after a create or an operator action)."""
        self._wake.set()

    def tick(self) -> int:
        """Advance every running rollout once; return how many were processed."""
        with self._sessions() as session:
            ids = active_rollout_ids(session)
        for rollout_id in ids:
            with self.lock, self._sessions() as session:
                try:
                    advance(session, self._context, rollout_id)
                    self.counters["ticks"] += 1
                except Exception:
                    # One broken rollout (a deleted version, a DB hiccup) must not stop the others.
                    session.rollback()
                    self.counters["errors"] += 1
                    logger.exception("rollout %s: reconcile step failed; retrying next tick", rollout_id)
        with self.lock, self._sessions() as session:
            complete_reverts(session, self._context)
        # The history pass reads the whole fleet: it runs on its own, slower clock.
        if time.monotonic() >= self._history_due:
            self._history_due = time.monotonic() + self._history_interval
            with self._sessions() as session:
                self.counters["history"] += record_changes(session)
        return len(ids)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                self.counters["errors"] += 1
                logger.exception("rollout controller tick failed")
            self._wake.wait(self._interval)
            self._wake.clear()


def republish(session: Session, ctx: RolloutContext) -> int:
    """Publish again the stored desired state of every device an active rollout touched.

    A hub that died between a commit and its publish would otherwise leave a device
    waiting; desired state is idempotent (same revision), so sending it twice is harmless.
    """
    if ctx.messaging is None:
        return 0
    count = 0
    for rollout in list_rollouts(session, active=True, limit=1000):
        ids = [r.device_id for r in members_of(session, rollout.id) if r.assigned_version is not None]
        for chunk in chunks(ids):
            for device in session.exec(select(Device).where(col(Device.id).in_(chunk))):
                if device.desired and not device.decommissioned:
                    ctx.messaging.publish_desired(DesiredState.model_validate(device.desired))
                    count += 1
    return count


class RolloutSettings(BaseSettings):
    """Tuning of the rollout loop (``AUTODL_HUB_ROLLOUT_*``)."""

    model_config = SettingsConfigDict(env_prefix="AUTODL_HUB_ROLLOUT_", extra="ignore")

    interval_s: float = Field(default=2.0, gt=0, description="seconds between two reconcile passes")
    history_interval_s: float = Field(default=10.0, ge=0, description="seconds between two deployment-history passes")
    enabled: bool = Field(default=True, description="false: this replica only serves the API")


def install(app: FastAPI, settings: HubSettings, session_factory: SessionFactory, messaging: Any | None) -> None:
    """Attach a RolloutController to `app` (``app.state.rollout_controller``), run for the app's lifespan."""
    tuning = RolloutSettings()
    controller = RolloutController(
        session_factory, RolloutContext(settings, messaging), tuning.interval_s, tuning.history_interval_s
    )
    app.state.rollout_controller = controller
    if not tuning.enabled:
        return
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
        controller.start()
        try:
            async with inner(app_) as state:
                yield state
        finally:
            controller.stop()

    app.router.lifespan_context = lifespan

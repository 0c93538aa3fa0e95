"""How long one rollout controller pass takes as the fleet grows (SQLite or PostgreSQL).

For each fleet size: N devices running 1.0.0, a canary rollout to 2.0.0 (10/50/100%),
then the time of the tick that moves the first cohort (one desired-state write per
device), of a steady tick (analysis only, nothing to move), and of the deployment
history pass. No broker: desired state is written to the database only.

    .venv/bin/python bench/rollout_tick.py [--sizes 100,1000,5000] [--database-url URL] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.config import HubSettings  # noqa: E402
from hub.db import create_engine_for, migrate, session_factory  # noqa: E402
from hub.models import Device  # noqa: E402
from hub.registry import desired_model, publish_version, resolve_version  # noqa: E402
from hub.rollouts.engine import RolloutContext, advance, create_rollout  # noqa: E402
from hub.rollouts.history import record_changes  # noqa: E402
from hub.rollouts.spec import RolloutSpec  # noqa: E402
from hub.security import load_or_create_signing_key  # noqa: E402
from shared.messages import DesiredState, ModelStatus, ReportedState, UpdateState  # noqa: E402
from tests.support.models import make_release, write_files  # noqa: E402


def run(size: int, workdir: Path, database_url: str) -> dict[str, Any]:
    settings = HubSettings(data_dir=workdir, database_url=database_url)
    engine = create_engine_for(settings)
    migrate(engine)
    sessions = session_factory(engine)
    key = load_or_create_signing_key(settings.signing_key)
    with sessions() as session:
        for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
            release = make_release(key, "clf", version, seed)
            publish_version(session, settings, release.manifest, write_files(release, workdir / version))
        model, row = resolve_version(session, "clf", "1.0.0")
        entry = desired_model(settings, model, row)
        for i in range(size):
            device_id = f"dev-{size}-{i:06d}"
            desired = DesiredState(device_id=device_id, revision=1, models={"clf": entry})
            reported = ReportedState(
                device_id=device_id,
                revision=1,
                models={"clf": ModelStatus(active="1.0.0", state=UpdateState.COMMITTED)},
            )
            session.add(
                Device(
                    id=device_id,
                    online=True,
                    desired=desired.model_dump(mode="json"),
                    reported=reported.model_dump(mode="json"),
                )
            )
        session.commit()
        spec = RolloutSpec.model_validate(
            {"model": "clf", "version": "2.0.0", "steps": [10, 50, 100], "analysis": {"min_observation_s": 3600}}
        )
        rollout = create_rollout(session, spec, actor="bench")
    ctx = RolloutContext(settings)
    timings: dict[str, Any] = {"devices": size}
    for label in ("move_tick_s", "steady_tick_s"):
        with sessions() as session:
            start = time.perf_counter()
            advance(session, ctx, rollout.id)
            timings[label] = time.perf_counter() - start
    for label in ("history_first_s", "history_steady_s"):
        with sessions() as session:
            start = time.perf_counter()
            record_changes(session)
            timings[label] = time.perf_counter() - start
    timings["moved"] = -(-size // 10)
    engine.dispose()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000", help="comma-separated fleet sizes")
    parser.add_argument("--database-url", default="", help="default: a SQLite file in a temp dir")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(size, Path(tmp), args.database_url))
    if args.json:
        print(json.dumps(results, indent=2))  # noqa: T201
        return
    print(
        f"{'devices':>8} {'moved':>6} {'move tick s':>12} {'steady tick s':>14} {'history 1st s':>14} {'history s':>10}"
    )  # noqa: T201
    for r in results:
        print(  # noqa: T201
            f"{r['devices']:>8} {r['moved']:>6} {r['move_tick_s']:>12.3f} {r['steady_tick_s']:>14.3f} "
            f"{r['history_first_s']:>14.3f} {r['history_steady_s']:>10.3f}"
        )


if __name__ == "__main__":
    main()

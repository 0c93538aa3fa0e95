"""Container entrypoint: enroll once from ``AUTODL_HUB_URL`` and a token file, then run.

``python -m agent.entrypoint [run [OPTIONS]]`` enrolls (pinning ``AUTODL_HUB_CA_HASH`` when set,
as `autodl-agent enroll --ca-hash` does) when the state dir holds no
identity yet (device name from ``AUTODL_AGENT_ENROLL_NAME``, labels from
``AUTODL_AGENT_ENROLL_LABELS`` as ``k=v,k=v``), then replaces itself with
``autodl-agent run``. Any other arguments go straight to ``autodl-agent`` (so
``docker run IMAGE --help`` or ``IMAGE status`` work). An unreachable hub is retried with
capped exponential backoff and jitter, because devices often boot before the hub answers;
a refused token or a missing token file ends the process with exit code 1 and one line.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import AgentSettings
from agent.errors import AgentError, FatalError, TransientError

__all__ = ["ENV_VARS", "EnrollPlan", "EntrypointError", "ensure_enrolled", "main", "parse_labels", "plan_from_env"]

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_FILE = "/run/secrets/autodl/token"
# Variables this module reads beside AgentSettings' own (deployment checks use the list).
ENV_VARS = frozenset(
    {
        "AUTODL_HUB_URL",
        "AUTODL_HUB_CA_HASH",
        "AUTODL_AGENT_ENROLL_DEVICE_CERT",
        "AUTODL_AGENT_ENROLL_TOKEN_FILE",
        "AUTODL_AGENT_ENROLL_NAME",
        "AUTODL_AGENT_ENROLL_LABELS",
        "AUTODL_AGENT_ENROLL_ATTEMPTS",
        "AUTODL_AGENT_ENROLL_BACKOFF_MIN_S",
        "AUTODL_AGENT_ENROLL_BACKOFF_MAX_S",
    }
)


class EntrypointError(FatalError):
    """The container is not configured well enough to enroll."""


@dataclass(frozen=True)
class EnrollPlan:
    """Where and how to enroll, read from the environment."""

    hub_url: str
    token_file: Path
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    attempts: int = 0  # 0: retry an unreachable hub forever
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    ca_hash: str | None = None  # the pin `autodl-hub token create` prints
    device_cert: bool = False  # MQTT with a device certificate (`enroll --device-cert`)


def parse_labels(text: str) -> dict[str, str]:
    """Parse ``"k=v,k2=v2"`` into a dict; raise EntrypointError on an item without ``=``."""
    labels: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EntrypointError(f"AUTODL_AGENT_ENROLL_LABELS: {item!r} is not k=v")
        labels[key.strip()] = value.strip()
    return labels


def plan_from_env(environ: Mapping[str, str]) -> EnrollPlan:
    """Read the enrollment plan from environment variables."""
    hub_url = environ.get("AUTODL_HUB_URL", "").strip()
    if not hub_url:
        raise EntrypointError("not enrolled and AUTODL_HUB_URL is not set: cannot enroll")
    try:
        attempts = int(environ.get("AUTODL_AGENT_ENROLL_ATTEMPTS", "0"))
        backoff_min = float(environ.get("AUTODL_AGENT_ENROLL_BACKOFF_MIN_S", "1"))
        backoff_max = float(environ.get("AUTODL_AGENT_ENROLL_BACKOFF_MAX_S", "60"))
    except ValueError as exc:
        raise EntrypointError(f"enrollment retry settings: {exc}") from exc
    return EnrollPlan(
        hub_url=hub_url,
        token_file=Path(environ.get("AUTODL_AGENT_ENROLL_TOKEN_FILE", DEFAULT_TOKEN_FILE)),
        name=environ.get("AUTODL_AGENT_ENROLL_NAME", "").strip() or socket.gethostname(),
        labels=parse_labels(environ.get("AUTODL_AGENT_ENROLL_LABELS", "")),
        attempts=max(attempts, 0),
        backoff_min_s=max(backoff_min, 0.0),
        backoff_max_s=max(backoff_max, backoff_min, 0.0),
        ca_hash=environ.get("AUTODL_HUB_CA_HASH", "").strip() or None,
        device_cert=environ.get("AUTODL_AGENT_ENROLL_DEVICE_CERT", "").strip().lower() in ("1", "true", "yes"),
    )


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise EntrypointError(f"not enrolled and the enrollment token file {path} is unreadable: {exc}") from exc
    if not token:
        raise EntrypointError(f"not enrolled and the enrollment token file {path} is empty")
    return token


def ensure_enrolled(
    settings: AgentSettings,
    environ: Mapping[str, str],
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Enroll unless an identity exists; return True when this call enrolled the device."""
    if settings.identity_path.exists():
        logger.info("enrolled already (identity in %s)", settings.identity_path)
        return False
    plan = plan_from_env(environ)
    token = _read_token(plan.token_file)
    from agent.enrollment import enroll  # httpx and the device probe load only when needed

    attempt = 0
    while True:
        attempt += 1
        try:
            identity = enroll(
                settings,
                plan.hub_url,
                token,
                plan.name,
                plan.labels,
                ca_hash=plan.ca_hash,
                device_cert=plan.device_cert,
            )
        except TransientError as exc:
            if plan.attempts and attempt >= plan.attempts:
                raise
            # Full jitter: a fleet that boots together must not hit the hub in lockstep.
            delay = random.uniform(0, min(plan.backoff_max_s, plan.backoff_min_s * 2 ** (attempt - 1)))
            logger.warning("enrollment attempt %d failed (%s); retrying in %.1fs", attempt, exc, delay)
            sleep(delay)
            continue
        logger.info("enrolled as %s with %s", identity.device_id, plan.hub_url)
        return True


def _agent_command() -> str:
    # Beside the interpreter in a venv; on PATH otherwise.
    beside = Path(sys.executable).with_name("autodl-agent")
    if beside.exists():
        return str(beside)
    found = shutil.which("autodl-agent")
    if found is None:
        raise EntrypointError("autodl-agent is not installed beside this Python nor on PATH")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Enroll if needed, then exec ``autodl-agent run``; other arguments pass through."""
    args = list(sys.argv[1:] if argv is None else argv)
    settings = AgentSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        command = _agent_command()
        if args and args[0] != "run":
            os.execv(command, [command, *args])
        ensure_enrolled(settings, os.environ)
    except AgentError as exc:
        logger.error("%s", exc)
        return 1
    run_args = args or ["run"]
    os.execv(command, [command, *run_args])
    return 0  # not reached: execv replaces the process


if __name__ == "__main__":
    sys.exit(main())

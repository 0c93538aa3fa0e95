"""The agent's error tree; every foreign exception is converted at the boundary.

Errors::

    AgentError
    ├── TransientError            retry later with capped exponential backoff and jitter
    │   ├── DownloadError         the hub or the network failed mid-transfer
    │   └── HubUnavailableError   the hub did not answer or answered 5xx
    └── FatalError                report, roll back, do not retry the same input
        ├── NotEnrolledError      no identity in the state dir
        ├── AlreadyEnrolledError  an identity exists and --force was not given
        ├── EnrollmentError       the hub refused the enrollment
        ├── CredentialsError      the broker refused our credentials
        ├── DesiredStateError     the desired state names nothing this device can run
        ├── DiskSpaceError        not enough free disk for the artifact
        ├── VerificationError     sha256, size or signature mismatch
        ├── ModelLoadError        ONNX Runtime could not load the model
        ├── SmokeTestError        the model's output on the manifest sample is off
        ├── CancelledError        a newer desired state replaced this update
        └── EntrypointError       (agent.entrypoint) the container cannot enroll or run
    ├── CommandError              (agent.commands) a command's arguments or outcome; its result says why
    ├── HealingError              (agent.healing) nothing to roll back to or reload
    ├── InvalidInputError         (agent.tensors) a request that does not fit the model (HTTP 400)
    ├── UnsupportedInputError     (agent.tensors) a valid request this install cannot decode (HTTP 501)
    ├── HttpError, Refused        (agent.http_messages) a request refused with its status, before or after parsing
    ├── BadRequest                (agent.openai_schema) an OpenAI-style request that does not fit (HTTP 400)
    ├── TemplateError             (agent.chat_template) a chat template that cannot render these messages
    ├── Busy                      (agent.textgen) every generation slot is taken (HTTP 503, retry)
    └── CliError                  (agent.cli) one error line, exit 1

`backoff_delay` is the wait before retrying after a TransientError.
"""

from __future__ import annotations

import random

__all__ = [
    "AgentError",
    "AlreadyEnrolledError",
    "CancelledError",
    "CredentialsError",
    "DesiredStateError",
    "DiskSpaceError",
    "DownloadError",
    "EnrollmentError",
    "FatalError",
    "HubUnavailableError",
    "ModelLoadError",
    "NotEnrolledError",
    "SmokeTestError",
    "TransientError",
    "VerificationError",
    "backoff_delay",
]


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Return a capped exponential delay with full jitter, so a fleet does not retry in lockstep."""
    ceiling = min(high, low * (2 ** min(attempt, 30)))
    return random.uniform(low, max(low, ceiling))


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class TransientError(AgentError):
    """A failure that may go away: retry with backoff."""


class FatalError(AgentError):
    """A failure that retrying the same input will not fix: report it and roll back."""


class DownloadError(TransientError):
    """A transfer that stopped before the whole file arrived."""


class HubUnavailableError(TransientError):
    """The hub could not be reached or answered with a server error."""


class NotEnrolledError(FatalError):
    """The state dir holds no identity; run `autodl-agent enroll` first."""


class AlreadyEnrolledError(FatalError):
    """The device is already enrolled; pass --force to enroll again."""


class EnrollmentError(FatalError):
    """The hub refused the enrollment (bad or expired token, invalid request)."""


class CredentialsError(FatalError):
    """The MQTT broker refused the device's credentials."""


class DesiredStateError(FatalError):
    """The desired state asks for something this device cannot run."""


class DiskSpaceError(FatalError):
    """Not enough free disk space for an artifact."""


class VerificationError(FatalError):
    """A file or manifest failed its sha256, size or signature check."""


class ModelLoadError(FatalError):
    """ONNX Runtime could not create a session for the model."""


class SmokeTestError(FatalError):
    """The model's output on the manifest's sample is outside tolerance."""


class CancelledError(FatalError):
    """The update was replaced by a newer desired state."""

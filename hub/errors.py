"""The hub's domain errors; `hub.main` maps each to one HTTP status.

Errors::

    HubError
    ├── InvalidInputError        422  the request is well-formed JSON but makes no sense
    ├── NotFoundError            404  an unknown model, version, device, command or artifact
    ├── ConflictError            409  it exists already, or the state forbids the change
    ├── AuthenticationError      401  no, unknown or revoked credentials
    ├── PermissionDeniedError    403  the key's role is too low
    ├── RateLimitedError         429  too many requests; `retry_after` seconds
    ├── PayloadTooLargeError     413  an upload above `max_upload_bytes`
    └── UnavailableError         503  a dependency (broker) is not ready

`hub.main` turns a HubError into its HTTP status in one exception handler; the CLI turns it
into one ``error:`` line and exit 1. The other roots belong to one package each and never
reach an HTTP client as themselves: the code that calls into the package converts them
(``raise InvalidInputError(...) from exc``) or records them where they belong:

    TrainingError       hub.training.errors   a failed job (SpecError -> 422 when a job is created)
    BuildError          hub.build.errors      the build CLI's error line; a failed training job
    MessagingError      hub.messaging.session retried on reconnect; logged
    IngestRejected      hub.messaging.ingest  a message counted as rejected and dropped
    BrokerError         hub.broker.embedded   `serve` exits with it (mosquitto would not start);
                                              a failed revocation is UnavailableError (503)
    BrokerAdminError    hub.broker.admin      logged; the next reconcile retries
    BootstrapError      hub.broker.bootstrap  the bootstrap command's error line
    CertificateError    hub.tls               `serve` exits with it; a bad CSR is InvalidInputError (422)
    DemoError           hub.cli.demo          the demo's error line
    RemoteError         hub.cli.remote        `train --remote`'s error line (the hub refused, or is unreachable)
    InvalidTransition   hub.rollouts.plan     the engine raises RolloutStateError (409) from it

tests/test_error_trees.py checks that every exception class in hub/ descends from one of these.
"""

from __future__ import annotations

__all__ = [
    "ROOTS",
    "AuthenticationError",
    "ConflictError",
    "HubError",
    "InvalidInputError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitedError",
    "UnavailableError",
]


class HubError(Exception):
    """Base of every error the hub's domain raises; `status` is its HTTP code."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(HubError):
    """The request makes no sense (a file that does not match its manifest...)."""

    status = 422


class NotFoundError(HubError):
    """The thing named does not exist."""

    status = 404


class ConflictError(HubError):
    """The thing exists already, or its state forbids the change."""

    status = 409


class AuthenticationError(HubError):
    """No valid credentials."""

    status = 401


class PermissionDeniedError(HubError):
    """Valid credentials whose role is too low."""

    status = 403


class RateLimitedError(HubError):
    """Too many requests for this key; retry after `retry_after` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PayloadTooLargeError(HubError):
    """An upload above the configured limit."""

    status = 413


class UnavailableError(HubError):
    """A dependency the request needs is not ready."""

    status = 503


# The roots of the hub's error tree besides HubError (module, class), as drawn above.
ROOTS = (
    ("hub.training.errors", "TrainingError"),
    ("hub.build.errors", "BuildError"),
    ("hub.messaging.session", "MessagingError"),
    ("hub.messaging.ingest", "IngestRejected"),
    ("hub.broker.embedded", "BrokerError"),
    ("hub.broker.admin", "BrokerAdminError"),
    ("hub.broker.bootstrap", "BootstrapError"),
    ("hub.tls", "CertificateError"),
    ("hub.cli.remote", "RemoteError"),
    ("hub.cli.demo", "DemoError"),
    ("hub.rollouts.plan", "InvalidTransition"),
)

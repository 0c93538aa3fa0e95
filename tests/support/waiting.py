"""The one poller of the test harness: wait until a check holds, or fail naming what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TypeVar

import httpx

__all__ = ["WaitTimeout", "wait_for"]

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A condition a test waited for did not hold in time (an assertion failure and a timeout)."""


def wait_for(what: str, check: Callable[[], T | None | Literal[False]], timeout: float = 90.0, every: float = 0.1) -> T:
    """Poll `check` until it returns something truthy and return that; WaitTimeout naming `what` after `timeout`.

    An HTTP error while polling counts as "not yet" (a process that is starting or restarting);
    the last one is named in the failure.
    """
    deadline = time.monotonic() + timeout
    last_error: httpx.HTTPError | None = None
    while True:
        try:
            value = check()
        except httpx.HTTPError as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(every)

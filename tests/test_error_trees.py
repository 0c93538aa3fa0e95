"""One error tree per side, as drawn in hub/errors.py and agent/errors.py: every public exception
class in hub/ descends from HubError or a listed root; every one in agent/ from AgentError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import agent
import hub
from agent.errors import AgentError
from hub.errors import ROOTS, HubError


def _exceptions(package: ModuleType) -> list[type[Exception]]:
    """Return the public exception classes defined in `package`'s modules (importing each)."""
    found = []
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        if ".migrations" in info.name or info.name.endswith("__main__"):
            continue  # alembic scripts run inside alembic; __main__ runs the program
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Exception)  # not KeyboardInterrupt and the like: they are signals
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found.append(obj)
    return found


def test_every_hub_exception_is_in_the_drawn_tree() -> None:
    pytest.importorskip("torch")  # hub.build and hub.training import it
    roots = tuple(getattr(importlib.import_module(module), name) for module, name in ROOTS)
    outside = [f"{e.__module__}.{e.__name__}" for e in _exceptions(hub) if not issubclass(e, (HubError, *roots))]
    assert outside == [], "add these under HubError or to hub.errors.ROOTS (and its docstring)"


def test_every_agent_exception_is_an_agent_error() -> None:
    outside = [f"{e.__module__}.{e.__name__}" for e in _exceptions(agent) if not issubclass(e, AgentError)]
    assert outside == []

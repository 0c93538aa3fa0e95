"""The route table of the agent's HTTP server: (method, pattern) -> handler.

Exact paths are looked up in a dictionary, patterned ones tried in order of
registration; ``{name}`` matches within one path segment (``/v2/models/{name}/infer``,
``/v1/models/{name}:predict``). Another module adds its routes with one call each:
``server.router.add("POST", "/v1/chat/completions", handler)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus

from agent.http_messages import Deferred, HttpError, Request, Response, Streaming

__all__ = ["Handler", "Router"]

Handler = Callable[[Request], "Response | Streaming | Deferred"]
_REMEMBERED = 1024  # patterned (method, path) pairs kept matched; past it the memory starts again


class Router:
    """The route table: exact paths by dictionary, patterned ones in order of registration."""

    def __init__(self) -> None:
        self._exact: dict[tuple[str, str], Handler] = {}
        self._patterns: list[tuple[str, re.Pattern[str], Handler]] = []
        self._found: dict[tuple[str, str], tuple[Handler, dict[str, str]]] = {}  # patterned paths seen

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Route `method pattern` to `handler`; ``{name}`` matches within one path segment."""
        self._found.clear()
        if "{" not in pattern:
            self._exact[(method, pattern)] = handler
            return
        regex = "".join(
            f"(?P<{part[1:-1]}>[^/]+?)" if part.startswith("{") else re.escape(part)
            for part in re.split(r"(\{[A-Za-z_]+\})", pattern)
        )
        self._patterns.append((method, re.compile(f"^{regex}$"), handler))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """Return the handler and parameters of a request; raise HttpError 404 or 405."""
        handler = self._exact.get((method, path))
        if handler is not None:
            return handler, {}
        found = self._found.get((method, path))
        if found is not None:  # a model's infer path, say: matched once, then looked up
            return found[0], dict(found[1])
        for route_method, regex, handler in self._patterns:
            if route_method == method and (match := regex.match(path)) is not None:
                params = match.groupdict()
                if len(self._found) >= _REMEMBERED:
                    self._found.clear()
                self._found[(method, path)] = (handler, params)
                return handler, dict(params)
        allowed = {m for (m, p) in self._exact if p == path}
        allowed.update(m for m, regex, _ in self._patterns if regex.match(path) is not None)
        if allowed:
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{method} not allowed on {path}; use {', '.join(sorted(allowed))}",
                "method_not_allowed",
                (("Allow", ", ".join(sorted(allowed))),),
            )
        raise HttpError(HTTPStatus.NOT_FOUND, f"no route for {method} {path}", "not_found")

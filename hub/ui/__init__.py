"""The hub's web dashboard at /ui: server-rendered pages, a little JavaScript, no build step.

`install(app)` adds the pages, the static files (/ui/static) and HTML error pages for
/ui paths; the REST API's JSON errors are unchanged.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from hub.errors import HubError
from hub.ui.auth import NotSignedIn
from hub.ui.render import STATIC_DIR, render
from hub.ui.routes import router

__all__ = ["install"]

_Handler = Callable[[Request, Exception], Awaitable[Response]]
_AnyHandler = Callable[[Request, Any], Any]


_FRAGMENT = re.compile(r"^/ui/(api/.*|rollouts/[^/]+/live)$")


def _is_page(request: Request) -> bool:
    # Pages redirect to the sign-in form; script-fetched JSON and fragments get a plain 401.
    return request.method == "GET" and not _FRAGMENT.match(request.url.path)


async def _not_signed_in(request: Request, exc: Exception) -> Response:
    if _is_page(request):
        target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""), safe="/?=&")
        return RedirectResponse(f"/ui/login?next={target}", status_code=303)
    message = exc.message if isinstance(exc, HubError) else "sign in"
    return render(request, "error.html", {"user": None, "status": 401, "message": message}, status_code=401)


def _html_errors(api_handler: _AnyHandler | None) -> _Handler:
    async def handler(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/ui") and isinstance(exc, HubError):
            context = {"user": None, "status": exc.status, "message": exc.message}
            return render(request, "error.html", context, status_code=exc.status)
        if api_handler is None:
            raise exc
        response = api_handler(request, exc)
        result: Response = await response if inspect.isawaitable(response) else response
        return result

    return handler


def install(app: FastAPI) -> None:
    """Serve the dashboard from `app` under /ui (call after the API's error handlers are added)."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR, packages=None), name="ui-static")
    app.add_exception_handler(NotSignedIn, _not_signed_in)
    app.add_exception_handler(HubError, _html_errors(app.exception_handlers.get(HubError)))

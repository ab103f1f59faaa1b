"""Errors to HTTP responses: one exception handler, statuses carried by the error classes.

Every error sdxl-export raises on purpose is an :class:`~sdxl_export.errors.SDXLExportError`
that carries its own ``http_status`` (400 a bad request, 404 an unknown model, 413 too large,
429 queue full, 499 client gone, 503 not ready, 504 past ``--timeout``, 500 our fault) and
``retryable`` (False: ``x-should-retry: false``, so the ``openai`` client does not re-run a
request that fails the same way again). :class:`GuardedRoute` turns any other exception a
route raises into an :class:`UnexpectedError` (logged with its traceback, answered with the
request id, the replica goes on serving), so one handler, registered with FastAPI's
``add_exception_handler``, renders every failure in the shape of the API the path belongs
to (A1111's ``{error, detail, body, errors}`` under ``/sdapi/``, OpenAI's ``{error: {...}}``
elsewhere).

No response body names a file-system path: messages pass through :func:`scrub_paths`, which
keeps only the last component of every absolute path (an error on an unauthenticated
endpoint, or a 4xx, tells a stranger nothing about the server's disks).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ..errors import InvalidRequestError, SDXLExportError
from . import a1111_api, openai_api

log = logging.getLogger(__name__)

#: an absolute POSIX path (two or more components) or a Windows drive path
_PATH = re.compile(r"(?<![\w.~])(?:[A-Za-z]:\\|/)(?:[^\s'\"()<>,;:\\/]+[\\/])+([^\s'\"()<>,;:\\/]*)")


class BodyTooLargeError(InvalidRequestError):
    """The request body is over the server's cap (413)."""

    http_status = 413


class UnexpectedError(SDXLExportError):
    """Anything a route raised that is not one of our named errors: a bug or an environment
    failure (500; the traceback is in the log under the request id)."""


#: this server's own routes, which hints name ("GET /sdapi/v1/loras"): not file-system paths
_ROUTE_PREFIXES = ("/v1/", "/sdapi/", "/healthz", "/readyz", "/metrics", "/openapi.json")


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path cut to its last component (``/srv/m/x.onnx`` -> ``x.onnx``);
    the server's own routes stay whole."""
    def cut(m: re.Match[str]) -> str:
        if m.group(0).startswith(_ROUTE_PREFIXES):
            return m.group(0)
        return m.group(1) or "<dir>"

    return _PATH.sub(cut, text)


def flavour(path: str) -> str:
    return "a1111" if path.startswith("/sdapi/") else "openai"


def error_response(path: str, status: int, message: str, *, request_id: str, param: str | None = None,
                   code: str | None = None, kind: str = "Error", headers: dict[str, str] | None = None) -> Response:
    message = scrub_paths(message)
    if flavour(path) == "a1111":
        body = a1111_api.error_body(status, message, kind=kind, request_id=request_id)
    else:
        body = openai_api.error_body(status, message, param=param, code=code, request_id=request_id)
    return JSONResponse(body, status_code=status, headers=headers)


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def exception_response(request: Request, exc: SDXLExportError, get_service: Callable[[], Any]) -> Response:
    rid = request_id(request)
    status = int(getattr(exc, "http_status", 500))
    cause = exc.__cause__ if isinstance(exc, UnexpectedError) and exc.__cause__ is not None else exc
    kind = type(cause).__name__
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503) and retry_after:
        headers["Retry-After"] = str(retry_after)
    if status >= 500 and not getattr(exc, "retryable", True):
        headers["x-should-retry"] = "false"
    svc = get_service()
    if svc is not None:
        svc.metrics.errors.labels(kind=kind).inc()
    if isinstance(exc, UnexpectedError):
        log.error("request %s failed", rid, exc_info=cause)
        message = f"internal error ({kind}); request id {rid}"
    elif status >= 500:
        log.error("request %s failed: %s", rid, exc.one_line())
        message = f"{exc.one_line()} (request id {rid})"
    else:
        message = exc.one_line()
    return error_response(request.url.path, status, message, request_id=rid, kind=kind, headers=headers,
                          param=getattr(exc, "param", None), code=getattr(exc, "code", None))


class GuardedRoute(APIRoute):
    """Routes whose unexpected exceptions become :class:`UnexpectedError` (FastAPI's custom
    route class): the app's one handler renders them instead of Starlette's bare 500, which
    would also re-raise into the server's log."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (SDXLExportError, RequestValidationError, HTTPException):
                raise
            except Exception as exc:
                raise UnexpectedError(type(exc).__name__, None) from exc

        return guarded


def install(app: FastAPI, get_service: Callable[[], Any]) -> None:
    """Register the handlers: our errors, and FastAPI's own validation errors as 400s."""

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SDXLExportError)
        return exception_response(request, exc, get_service)

    async def on_validation(request: Request, exc: Exception) -> Response:
        errors: list[dict[str, Any]] = list(getattr(exc, "errors", list)())
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        err = InvalidRequestError(f"invalid field {where or 'body'}: {first.get('msg', 'invalid value')}",
                                  "see GET /openapi.json for the request's schema")
        err.param = where or None  # type: ignore[attr-defined]
        return exception_response(request, err, get_service)

    app.add_exception_handler(SDXLExportError, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)

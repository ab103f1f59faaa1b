"""The ASGI app: OpenAI, AUTOMATIC1111 and native routes over one :class:`ImageService`.

``build_app(get_service, config)`` is used by both deployments: the embedded server passes
a lifespan that loads the service; on Ray Serve the deployment owns the service and the
app only routes to it. Routes live in one :class:`fastapi.APIRouter` per API
(``serve/routes/``); errors are rendered by one exception handler from the status each
error class carries (``serve/http.py``). Every response carries ``x-request-id``; every
request ends in one access-log line (logger ``sdxl_export.serve.access``) and in the
Prometheus metrics. ``GET /openapi.json`` describes every route's bodies.

Status codes: 400 a bad field (named, in that API's error shape), 401 missing/wrong
credentials, 404 an unknown model (OpenAI) or sampler (A1111), 413 body too large, 429 queue
full (``Retry-After``), 503 not ready / shutting down / over the connection limit
(``Retry-After``), 504 past ``--timeout`` (``x-should-retry: false``), 500 an internal
failure (with the request id; logged with its traceback; the replica goes on serving).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, FastAPI, Request

from .. import __version__
from . import http
from .config import ServeConfig
from .context import AppContext
from .http import BodyTooLargeError, error_response
from .service import ImageService, new_request_id

log = logging.getLogger(__name__)
access_log = logging.getLogger("sdxl_export.serve.access")

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
#: Paths answered even when ``--max-connections`` requests are in flight (probes must not fail
#: because the replica is busy; the queue's own 429 handles generation).
UNLIMITED_PATHS = PUBLIC_PATHS | {"/metrics", "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/skip"}


class GatewayMiddleware:
    """Request ids, authentication, the body-size cap, metrics and the access log.

    Pure ASGI (no buffering). Holds only immutable config; per-request data lives in the
    ASGI scope, so one instance serves every connection concurrently.
    """

    def __init__(self, app: Any, *, config: ServeConfig, get_service: Callable[[], ImageService | None],
                 route_paths: Callable[[], frozenset[str]], max_in_flight: int | None = None):
        self.app = app
        self.config = config
        self.get_service = get_service
        self.route_paths = route_paths
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # event loop only
        self._bearer = config.api_key.encode() if config.api_key else None
        token = config.basic_token()
        self._basic = token.encode() if token else None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        got = headers.get(b"authorization", b"")
        scheme, _, value = got.partition(b" ")
        scheme = scheme.lower()
        ok = False
        if self._bearer is not None and scheme == b"bearer":
            ok = hmac.compare_digest(value.strip(), self._bearer)
        if self._basic is not None and scheme == b"basic":
            ok = hmac.compare_digest(value.strip(), self._basic) or ok
        return ok

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if given and len(given) <= 64 and given.replace("-", "").isalnum() else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        access: dict[str, Any] = {}
        state["access"] = access
        t0 = time.perf_counter()
        status = [0]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        limited = path not in UNLIMITED_PATHS
        if limited:
            self.in_flight += 1
        try:
            if limited and self.max_in_flight is not None and self.in_flight > self.max_in_flight:
                resp = error_response(path, 503, f"the server is at its limit of {self.max_in_flight} requests "
                                      "in flight", request_id=rid, kind="ServiceUnavailableError",
                                      headers={"Retry-After": "1"})
                await resp(scope, receive, send_wrapper)
                return
            if self.config.auth_required and path not in PUBLIC_PATHS and not self._authorized(headers):
                challenge = 'Bearer realm="sdxl-export"' if self._bearer else 'Basic realm="sdxl-export"'
                resp = error_response(path, 401, "missing or invalid credentials", request_id=rid,
                                      code="invalid_api_key", kind="Unauthorized",
                                      headers={"WWW-Authenticate": challenge})
                await resp(scope, receive, send_wrapper)
                return
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
                resp = error_response(path, 413, f"the request body is over {self.config.max_body_bytes} bytes",
                                      request_id=rid, kind="BodyTooLargeError")
                await resp(scope, receive, send_wrapper)
                return
            seen = [0]
            limit = self.config.max_body_bytes

            async def receive_wrapper() -> dict[str, Any]:
                message: dict[str, Any] = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        raise BodyTooLargeError(f"the request body is over {limit} bytes", "send a smaller body")
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            if limited:
                self.in_flight -= 1
            self._record(scope, path, rid, status[0], access, time.perf_counter() - t0)

    def _record(self, scope: dict[str, Any], path: str, rid: str, status: int, access: dict[str, Any],
                seconds: float) -> None:
        route = f"{scope.get('method', '?')} {path if path in self.route_paths() else 'other'}"
        svc = self.get_service()
        if svc is not None:
            svc.metrics.requests.labels(route=route, status=str(status)).inc()
            svc.metrics.request_seconds.labels(route=route).observe(seconds)
        if path in PUBLIC_PATHS or path == "/metrics":
            return  # probes and scrapes would drown the log
        fields = " ".join(f"{k}={v}" for k, v in access.items())
        access_log.info("id=%s route=%s status=%d %s total_ms=%.1f", rid, route, status, fields, seconds * 1000)


def _with_request(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """A route function taking the request, annotated here (where ``Request`` resolves), for
    modules that register routes on the app with ``@app.get`` (``controlnet_api``)."""
    async def run(request: Request) -> Any:
        return await handler(request)

    run.__name__ = handler.__name__
    return run


def build_app(get_service: Callable[[], ImageService | None], config: ServeConfig, *,
              lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
              routers: Sequence[APIRouter] = (), max_in_flight: int | None = None) -> FastAPI:
    """The FastAPI app of one replica. ``get_service`` returns the replica's service (None
    while a Ray replica is still constructing it). ``routers``: more routes (a feature's own
    module); they reach the service through :func:`~sdxl_export.serve.context.ctx` and should
    use :func:`~sdxl_export.serve.routes.new_router`. ``max_in_flight``: requests in flight
    beyond which new ones get 503, probes excepted."""
    from .routes import a1111, native, openai, ops

    app = FastAPI(title="sdxl-export", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.ctx = AppContext(get_service, config)
    http.install(app, get_service)
    for router in (ops.router, openai.router, native.router, a1111.router, *routers):
        app.include_router(router)
    # routes a feature registers on the app itself get the same error handling
    app.router.route_class = http.GuardedRoute
    from . import controlnet_api

    controlnet_api.register(app, lambda: getattr(get_service(), "pipe", None), _with_request)
    from . import workflows_api  # inpainting edits and the hires-fix lists: their own module

    context: AppContext = app.state.ctx

    async def generate(request: Request, parse: Callable[..., Any], *, json_body: bool = True) -> list[Any]:
        return await context.generate(request, parse, "img2img", json_body=json_body)

    workflows_api.register(app, generate=generate, encode=context.encode, guarded=_with_request,
                           service=context.service, config=config)
    known: dict[str, frozenset[str]] = {}

    def route_paths() -> frozenset[str]:
        """The routes' paths (metrics label them; anything else is "other"), read once from the
        schema (FastAPI includes routers lazily)."""
        if "paths" not in known:
            known["paths"] = frozenset(app.openapi().get("paths", {})) | {"/openapi.json"}
        return known["paths"]

    app.add_middleware(GatewayMiddleware, config=config, get_service=get_service, route_paths=route_paths,
                       max_in_flight=max_in_flight)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.state.started = time.time()
    return app

"""The ASGI app: OpenAI, AUTOMATIC1111 and native routes over one :class:`ImageService`.

``build_app(get_service, config)`` is used by both deployments: the embedded server passes
a lifespan that loads the service; on Ray Serve the deployment owns the service and the
app only routes to it. Every response carries ``x-request-id``; every request ends in one
access-log line (logger ``sdxl_export.serve.access``) and in the Prometheus metrics.

Status codes: 400 a bad field (named, in that API's error shape), 401 missing/wrong
credentials, 413 body too large, 429 queue full (``Retry-After``), 503 not ready /
shutting down (``Retry-After``), 504 past ``--timeout``, 500 an internal failure (with the
request id; logged with its traceback; the replica goes on serving).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import InvalidRequestError, MissingComponentError, NumericalError, SDXLExportError
from . import a1111_api, native_api, openai_api
from .batching import JobCancelledError
from .common import ParamError, ParsedRequest, png_b64
from .config import ServeConfig
from .service import (
    ClientGoneError,
    ImageService,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
    new_request_id,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("sdxl_export.serve.access")

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
ROUTES = ("/healthz", "/readyz", "/metrics", "/v1/models", "/v1/images/generations", "/v1/generate", "/v1/info",
          "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/samplers", "/sdapi/v1/schedulers", "/sdapi/v1/sd-models",
          "/sdapi/v1/options", "/sdapi/v1/scripts", "/sdapi/v1/progress", "/sdapi/v1/loras",
          "/sdapi/v1/refresh-loras", "/v1/images/edits", "/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes")


class BodyTooLargeError(InvalidRequestError):
    """The request body is over the server's cap (413)."""


def _flavour(path: str) -> str:
    return "a1111" if path.startswith("/sdapi/") else "openai"


def status_for(exc: BaseException) -> int:
    if isinstance(exc, BodyTooLargeError):
        return 413
    if isinstance(exc, QueueFullError):
        return 429
    if isinstance(exc, ServiceUnavailableError):
        return 503
    if isinstance(exc, RequestTimeoutError):
        return 504
    if isinstance(exc, (ClientGoneError, JobCancelledError)):
        return 499
    if isinstance(exc, ParamError) and exc.code == "model_not_found":
        return 404
    if isinstance(exc, (InvalidRequestError, MissingComponentError)):
        return 400
    return 500


def error_response(path: str, status: int, message: str, *, request_id: str, param: str | None = None,
                   code: str | None = None, kind: str = "Error", headers: dict[str, str] | None = None) -> Response:
    if _flavour(path) == "a1111":
        body = a1111_api.error_body(status, message, kind=kind, request_id=request_id)
    else:
        body = openai_api.error_body(status, message, param=param, code=code, request_id=request_id)
    return JSONResponse(body, status_code=status, headers=headers)


def exception_response(path: str, exc: BaseException, request_id: str, service: ImageService | None) -> Response:
    status = status_for(exc)
    kind = type(exc).__name__
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, ServiceUnavailableError):
        headers["Retry-After"] = "5"
    if status == 500 and isinstance(exc, NumericalError):
        headers["x-should-retry"] = "false"  # deterministic: the same request fails again
    if service is not None:
        service.metrics.errors.labels(kind=kind).inc()
    if status == 500 and not isinstance(exc, SDXLExportError):
        log.error("request %s failed", request_id, exc_info=exc)
        message = f"internal error ({kind}); request id {request_id}"
    elif status == 500:
        log.error("request %s failed: %s", request_id, exc.one_line() if isinstance(exc, SDXLExportError) else exc)
        message = f"{exc.one_line() if isinstance(exc, SDXLExportError) else exc} (request id {request_id})"
    else:
        message = exc.one_line() if isinstance(exc, SDXLExportError) else str(exc)
    return error_response(path, status, message, request_id=request_id, kind=kind, headers=headers,
                          param=getattr(exc, "param", None), code=getattr(exc, "code", None))


class GatewayMiddleware:
    """Request ids, authentication, the body-size cap, metrics and the access log.

    Pure ASGI (no buffering). Holds only immutable config; per-request data lives in the
    ASGI scope, so one instance serves every connection concurrently.
    """

    def __init__(self, app: Any, *, config: ServeConfig, get_service: Callable[[], ImageService | None]):
        self.app = app
        self.config = config
        self.get_service = get_service
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

        try:
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
            self._record(scope, path, rid, status[0], access, time.perf_counter() - t0)

    def _record(self, scope: dict[str, Any], path: str, rid: str, status: int, access: dict[str, Any],
                seconds: float) -> None:
        route = f"{scope.get('method', '?')} {path if path in ROUTES else 'other'}"
        svc = self.get_service()
        if svc is not None:
            svc.metrics.requests.labels(route=route, status=str(status)).inc()
            svc.metrics.request_seconds.labels(route=route).observe(seconds)
        if path in PUBLIC_PATHS or path == "/metrics":
            return  # probes and scrapes would drown the log
        fields = " ".join(f"{k}={v}" for k, v in access.items())
        access_log.info("id=%s route=%s status=%d %s total_ms=%.1f", rid, route, status, fields, seconds * 1000)


async def _json(request: Request) -> Any:
    return _loads(await request.body())


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ParamError("body", f"the request body is not valid JSON ({exc})", "send a JSON object") from None


def build_app(get_service: Callable[[], ImageService | None], config: ServeConfig, *,
              lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    """The FastAPI app of one replica. ``get_service`` returns the replica's service (None
    while a Ray replica is still constructing it)."""
    app = FastAPI(title="sdxl-export", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(GatewayMiddleware, config=config, get_service=get_service)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def service() -> ImageService:
        svc = get_service()
        if svc is None:
            raise ServiceUnavailableError("the replica is starting", "retry when GET /readyz answers 200")
        return svc

    def rid(request: Request) -> str:
        return str(request.scope.get("state", {}).get("request_id", ""))

    def models_of(svc: ImageService) -> a1111_api.Models:
        name = config.served_model_name
        pipe = svc.pipe
        refiner = f"{name}-refiner" if pipe is not None and pipe.has_refiner else None
        sha = ""
        if pipe is not None:
            files = pipe.artifacts.component("unet").get("files") or {}
            sha = next(iter(files.values()), "") or ""
        from ..runtime import available_controlnets as available

        return a1111_api.Models(base=name, refiner=refiner, sha256=sha or "0" * 64,
                                controlnets=tuple(available(pipe.runners)) if pipe is not None else ())

    async def generate(request: Request, parse: Callable[[Any, ImageService], ParsedRequest], *,
                       json_body: bool = True) -> list[Any]:
        svc = service()
        svc.check_ready()
        raw = await request.body()
        # JSON of up to --max-body-mb and image decoding: in a thread, off the event loop
        # (json_body=False: the route read a non-JSON body itself, e.g. multipart edits)
        parsed = await run_in_threadpool(lambda: parse(_loads(raw) if json_body else None, svc))
        request_id = rid(request)
        # the checks preprocess an input image (img2img): off the event loop too
        jobs = await run_in_threadpool(lambda: svc.make_jobs(parsed.prompts, parsed.negatives, parsed.seeds,
                                                             request_id=request_id, images=parsed.images,
                                                             masks=parsed.masks, **parsed.kwargs))
        p = jobs[0].params
        access = request.scope["state"]["access"]
        access.update(size=f"{p.width}x{p.height}", steps=p.steps, images=len(jobs))
        results = await svc.generate(jobs, disconnected=request.is_disconnected)
        access.update(batch=max(r.batch_size for r in results),
                      queue_ms=f"{max(r.queue_seconds for r in results) * 1000:.1f}")
        parsed.kwargs.update(height=p.height, width=p.width, num_inference_steps=p.steps,
                             guidance_scale=p.guidance_scale)
        request.scope["state"]["parsed"] = parsed
        return results

    async def encode(results: list[Any]) -> list[str]:
        return await run_in_threadpool(lambda: [png_b64(r.image) for r in results])

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def run(request: Request) -> Any:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a response
                return exception_response(request.url.path, exc, rid(request), get_service())
        run.__name__ = handler.__name__
        return run

    # ---- operations ----------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        svc = get_service()
        if svc is None or not svc.ready or svc.draining:
            state = ("starting" if svc is None else "draining" if svc.draining else
                     "failed" if svc.load_error else "loading")
            return JSONResponse({"status": state, "error": svc.load_error if svc else None}, status_code=503,
                                headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready", "backend": svc.pipe.backend, "device": str(svc.pipe.device),
                             "max_batch_size": svc.max_batch, "max_queue": config.max_queue,
                             "waiting": svc.waiting})

    @app.get("/metrics")
    async def metrics() -> Response:
        svc = service()
        return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

    @app.get("/v1/info")
    @guarded
    async def info(request: Request) -> Any:
        svc = service()
        svc.check_ready()
        pipe = svc.pipe
        from ..runtime import scheduler_names

        sizes = svc.served_sizes()
        return {"model": config.served_model_name, "version": __version__, "backend": pipe.backend,
                "device": str(pipe.device), "native_size": pipe.native_size, "refiner": pipe.has_refiner,
                "sizes": None if sizes is None else [f"{w}x{h}" for h, w in sizes],
                "max_batch_size": svc.max_batch, "max_queue": config.max_queue,
                "max_images_per_request": config.max_images_per_request, "schedulers": list(scheduler_names())}

    # ---- OpenAI ----------------------------------------------------------------------------------------
    @app.get("/v1/models")
    @guarded
    async def list_models(request: Request) -> Any:
        return openai_api.models([config.served_model_name], int(getattr(app.state, "started", time.time())))

    @app.post("/v1/images/generations")
    @guarded
    async def images_generations(request: Request) -> Any:
        def parse(body: Any, svc: ImageService) -> ParsedRequest:
            return openai_api.parse(body, model_ids=[config.served_model_name],
                                    has_refiner=bool(svc.pipe is not None and svc.pipe.has_refiner),
                                    max_images=config.max_images_per_request)

        results = await generate(request, parse)
        return openai_api.response(await encode(results), [r.seed for r in results])

    # ---- native ------------------------------------------------------------------------------------------
    @app.post("/v1/generate")
    @guarded
    async def native_generate(request: Request) -> Any:
        def parse(body: Any, svc: ImageService) -> ParsedRequest:
            return native_api.parse(body, has_refiner=bool(svc.pipe is not None and svc.pipe.has_refiner),
                                    max_images=config.max_images_per_request)

        results = await generate(request, parse)
        parsed: ParsedRequest = request.scope["state"]["parsed"]
        return {"request_id": rid(request), "images": await encode(results), "seeds": [r.seed for r in results],
                "seed": results[0].seed, "parameters": parsed.kwargs,
                "timings": [{"queue_ms": r.queue_seconds * 1000, "batch_size": r.batch_size,
                             "run_ms": r.run_seconds * 1000, "stages_ms": {k: sum(v) * 1000 for k, v in
                                                                          r.timings.get("stages", {}).items()}}
                            for r in results]}

    # ---- AUTOMATIC1111 -------------------------------------------------------------------------------------
    async def a1111_generate(request: Request, parse_body: Callable[..., Any]) -> Any:
        meta: dict[str, Any] = {}

        def parse(body: Any, svc: ImageService) -> ParsedRequest:
            parsed, m = parse_body(body, models=models_of(svc), max_images=config.max_images_per_request)
            meta.update(m)
            return parsed

        results = await generate(request, parse)
        parsed: ParsedRequest = request.scope["state"]["parsed"]
        if parsed.post is not None:  # e.g. A1111's paste-back of the original outside the mask
            for i, r in enumerate(results):
                r.image = parsed.post(i, r.image)
        send = parsed.echo.get("send_images", True) is not False
        return a1111_api.txt2img_response(await encode(results) if send else [], parsed, meta,
                                          models_of(service()), send)

    @app.post("/sdapi/v1/txt2img")
    @guarded
    async def txt2img(request: Request) -> Any:
        return await a1111_generate(request, a1111_api.parse_txt2img)

    @app.post("/sdapi/v1/img2img")
    @guarded
    async def img2img(request: Request) -> Any:
        return await a1111_generate(request, a1111_api.parse_img2img)

    @app.get("/sdapi/v1/samplers")
    @guarded
    async def samplers(request: Request) -> Any:
        return a1111_api.samplers()

    @app.get("/sdapi/v1/schedulers")
    @guarded
    async def schedulers(request: Request) -> Any:
        return a1111_api.schedulers()

    @app.get("/sdapi/v1/sd-models")
    @guarded
    async def sd_models(request: Request) -> Any:
        svc = service()
        svc.check_ready()
        return a1111_api.sd_models(models_of(svc), str(config.artifacts))

    @app.get("/sdapi/v1/options")
    @guarded
    async def options(request: Request) -> Any:
        svc = service()
        svc.check_ready()
        return a1111_api.options(models_of(svc))

    @app.get("/sdapi/v1/scripts")
    @guarded
    async def scripts(request: Request) -> Any:
        from . import controlnet_api

        svc = get_service()
        names = controlnet_api.scripts(svc.pipe if svc is not None else None)
        return {"txt2img": names, "img2img": names}

    @app.get("/sdapi/v1/loras")
    @guarded
    async def list_loras(request: Request) -> Any:
        from . import loras as lora_names

        return a1111_api.loras(lora_names.available(config.lora_dir))

    @app.post("/sdapi/v1/refresh-loras")
    @guarded
    async def refresh_loras(request: Request) -> Any:
        return None  # the folder is read on every request: nothing is cached to refresh

    @app.get("/sdapi/v1/progress")
    @guarded
    async def progress(request: Request) -> Any:
        svc = get_service()
        busy = bool(svc is not None and (svc.waiting or svc.running))
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "stopping_generation": False,
                          "job": "txt2img" if busy else "", "job_count": int(svc.waiting if svc else 0),
                          "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}

    from . import controlnet_api

    controlnet_api.register(app, lambda: getattr(get_service(), "pipe", None), guarded)

    from . import workflows_api  # inpainting edits and the hires-fix lists: their own module

    workflows_api.register(app, generate=generate, encode=encode, guarded=guarded, service=service, config=config)
    app.state.started = time.time()
    return app


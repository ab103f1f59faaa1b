"""Operations: ``/healthz`` (liveness: always 200 while the process runs, even at the
concurrency limit), ``/readyz`` (503 until loaded and warmed up), ``/metrics``, ``/v1/info``."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ... import __version__
from ..context import ctx
from ..http import scrub_paths
from ..schemas import Health, Info, Ready
from . import new_router

router = new_router(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Any:
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(request: Request) -> Any:
    c = ctx(request)
    svc = c.get_service()
    if svc is None or not svc.ready or svc.draining:
        state = ("starting" if svc is None else "draining" if svc.draining else
                 "failed" if svc.load_error else "loading")
        error = scrub_paths(svc.load_error) if svc is not None and svc.load_error else None
        return JSONResponse({"status": state, "error": error}, status_code=503, headers={"Retry-After": "5"})
    return {"status": "ready", "backend": svc.pipe.backend, "device": str(svc.pipe.device),
            "max_batch_size": svc.max_batch, "max_queue": c.config.max_queue, "waiting": svc.waiting}


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    svc = ctx(request).service()
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)


@router.get("/v1/info", response_model=Info)
async def info(request: Request) -> Any:
    c = ctx(request)
    svc = c.ready_service()
    pipe = svc.pipe
    from ...runtime import scheduler_names

    sizes = svc.served_sizes()
    cfg = c.config
    return {"model": cfg.served_model_name, "aliases": list(cfg.model_aliases), "version": __version__,
            "backend": pipe.backend, "device": str(pipe.device), "native_size": pipe.native_size,
            "refiner": pipe.has_refiner, "sizes": None if sizes is None else [f"{w}x{h}" for h, w in sizes],
            "size_policy": cfg.size_policy, "max_pixels": svc.max_pixels,
            "max_batch_size": svc.max_batch, "max_queue": cfg.max_queue,
            "max_images_per_request": cfg.max_images_per_request, "max_steps": cfg.max_steps,
            "schedulers": list(scheduler_names()), "defaults": pipe.defaults.effective()}

"""AUTOMATIC1111 web UI API routes (``/sdapi/v1/...``): generation, the lists clients read,
the settings Open WebUI posts, progress with interrupt/skip, and the small endpoints SD
front ends call on start-up (VAEs, embeddings, styles, memory, PNG info)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from .. import a1111_api
from ..common import ParsedRequest, body_dict, loads_json
from ..context import ctx
from ..schemas import (
    A1111_ERRORS,
    A1111Embeddings,
    A1111Images,
    A1111Img2Img,
    A1111Lora,
    A1111Model,
    A1111Progress,
    A1111Sampler,
    A1111Scheduler,
    A1111Scripts,
    A1111Style,
    A1111Txt2Img,
    A1111Vae,
    Memory,
    Options,
    PngInfo,
    PngInfoRequest,
    body_doc,
)
from ..service import ImageService
from . import new_router

router = new_router(prefix="/sdapi/v1", tags=["a1111"], responses=A1111_ERRORS)


async def _generate(request: Request, parse_body: Callable[..., Any], job: str) -> Any:
    c = ctx(request)
    meta: dict[str, Any] = {}

    def parse(body: Any, svc: ImageService) -> ParsedRequest:
        parsed, m = parse_body(body, models=c.models(svc), max_images=c.config.max_images_per_request)
        meta.update(m)
        return parsed

    results = await c.generate(request, parse, job=job)
    parsed: ParsedRequest = request.scope["state"]["parsed"]
    if parsed.post is not None:  # e.g. A1111's paste-back of the original outside the mask
        for i, r in enumerate(results):
            r.image = parsed.post(i, r.image)
    send = parsed.echo.get("send_images", True) is not False
    return a1111_api.txt2img_response(await c.encode(results) if send else [], parsed, meta,
                                      c.models(c.service()), send)


@router.post("/txt2img", response_model=A1111Images, openapi_extra=body_doc(A1111Txt2Img))
async def txt2img(request: Request) -> Any:
    return await _generate(request, a1111_api.parse_txt2img, "txt2img")


@router.post("/img2img", response_model=A1111Images, openapi_extra=body_doc(A1111Img2Img))
async def img2img(request: Request) -> Any:
    return await _generate(request, a1111_api.parse_img2img, "img2img")


@router.get("/samplers", response_model=list[A1111Sampler])
async def samplers() -> Any:
    return a1111_api.samplers()


@router.get("/schedulers", response_model=list[A1111Scheduler])
async def schedulers() -> Any:
    return a1111_api.schedulers()


@router.get("/sd-models", response_model=list[A1111Model])
async def sd_models(request: Request) -> Any:
    c = ctx(request)
    return a1111_api.sd_models(c.models(c.ready_service()), c.config.served_model_name)


@router.post("/refresh-checkpoints", response_model=None)
async def refresh_checkpoints() -> None:
    return None  # one model per replica: nothing to rescan


@router.get("/options", response_model=Options)
async def get_options(request: Request) -> Any:
    c = ctx(request)
    return a1111_api.options(c.models(c.ready_service()))


@router.post("/options", response_model=None, openapi_extra=body_doc(Options))
async def set_options(request: Request) -> None:
    """Open WebUI posts the whole settings dict (or one key) to pick a checkpoint: settings that
    already hold are accepted, others refused naming the setting."""
    c = ctx(request)
    body = body_dict(loads_json(await request.body()))
    a1111_api.check_options(body, c.models(c.ready_service()))


@router.get("/sd-vae", response_model=list[A1111Vae])
async def sd_vae() -> Any:
    return []  # the model's own VAE only ("Automatic"); no separate VAE files


@router.post("/refresh-vae", response_model=None)
async def refresh_vae() -> None:
    return None


@router.get("/embeddings", response_model=A1111Embeddings)
async def embeddings() -> Any:
    return {"loaded": {}, "skipped": {}}  # textual inversion is not served


@router.get("/prompt-styles", response_model=list[A1111Style])
async def prompt_styles() -> Any:
    return []


@router.get("/scripts", response_model=A1111Scripts)
async def scripts(request: Request) -> Any:
    from .. import controlnet_api

    svc = ctx(request).get_service()
    names = controlnet_api.scripts(svc.pipe if svc is not None else None)
    return {"txt2img": names, "img2img": names}


@router.get("/loras", response_model=list[A1111Lora])
async def list_loras(request: Request) -> Any:
    from ...lora.files import available_loras

    return a1111_api.loras(available_loras(ctx(request).config.lora_dir))


@router.post("/refresh-loras", response_model=None)
async def refresh_loras() -> None:
    return None  # the folder is read on every request: nothing is cached to refresh


@router.get("/memory", response_model=Memory)
async def memory() -> Any:
    return a1111_api.memory()


@router.post("/png-info", response_model=PngInfo, openapi_extra=body_doc(PngInfoRequest))
async def png_info(request: Request) -> Any:
    body = body_dict(loads_json(await request.body()))
    return a1111_api.png_info(body.get("image"))


@router.get("/progress", response_model=A1111Progress)
async def progress(request: Request, skip_current_image: bool = False) -> Any:
    svc = ctx(request).get_service()
    if svc is None:
        return a1111_api.progress({"running": False, "step": 0, "steps": 0, "progress": 0.0, "eta_s": None,
                                   "current_image": None, "interrupted": False, "skipped": False, "kind": ""}, 0)
    snap = svc.progress.snapshot(preview=not skip_current_image)
    return a1111_api.progress(snap, svc.waiting)


@router.post("/interrupt", response_model=None)
async def interrupt(request: Request) -> None:
    ctx(request).service().interrupt()


@router.post("/skip", response_model=None)
async def skip(request: Request) -> None:
    ctx(request).service().progress.skip()

"""What every router of the app shares: the replica's service, its config, and the one
request path (parse -> check -> queue -> wait) all generating routes go through.

Routers reach it as ``request.app.state.ctx`` (:func:`ctx`), so a feature can register its
own routes from its own module (``build_app(..., routers=[my_router])`` or
``app.include_router``) without touching ``app.py``. Holds only immutable config and a
callable; per-request data lives in the request's scope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from . import a1111_api
from .common import ParsedRequest, loads_json, png_b64
from .config import ServeConfig
from .http import request_id
from .limits import MAX_IMAGE_PIXELS
from .service import ImageService, ServiceUnavailableError


class AppContext:
    """The replica's service (None while a Ray replica constructs it) and config."""

    def __init__(self, get_service: Callable[[], ImageService | None], config: ServeConfig):
        self.get_service = get_service
        self.config = config

    def service(self) -> ImageService:
        svc = self.get_service()
        if svc is None:
            raise ServiceUnavailableError("the replica is starting", "retry when GET /readyz answers 200")
        return svc

    def ready_service(self) -> ImageService:
        svc = self.service()
        svc.check_ready()
        return svc

    def models(self, svc: ImageService) -> a1111_api.Models:
        name = self.config.served_model_name
        pipe = svc.pipe
        refiner = f"{name}-refiner" if pipe is not None and pipe.has_refiner else None
        sha = ""
        if pipe is not None:
            files = pipe.artifacts.component("unet").get("files") or {}
            sha = next(iter(files.values()), "") or ""
        from ..runtime import available_controlnets as available

        return a1111_api.Models(base=name, refiner=refiner, sha256=sha or "0" * 64,
                                controlnets=tuple(available(pipe.runners)) if pipe is not None else (),
                                defaults=pipe.defaults.to_dict() if pipe is not None else None)

    async def generate(self, request: Request, parse: Callable[[Any, ImageService], ParsedRequest],
                       job: str = "txt2img", *, json_body: bool = True) -> list[Any]:
        """Parse (off the event loop: JSON of up to --max-body-mb and image decoding), check and
        cut into jobs (off the loop too: img2img preprocesses), queue, wait. The parsed request is
        left in ``request.state.parsed`` (its kwargs updated to the values that ran).
        ``json_body=False``: the route read a non-JSON body itself (multipart edits); ``parse`` gets None."""
        svc = self.ready_service()
        raw = await request.body()
        cap = max(svc.max_pixels, self.config.max_upload_pixels)

        def parse_capped() -> ParsedRequest:
            token = MAX_IMAGE_PIXELS.set(cap)  # decode_image refuses larger uploads undecoded
            try:
                return parse(loads_json(raw) if json_body else None, svc)
            finally:
                MAX_IMAGE_PIXELS.reset(token)

        parsed = await run_in_threadpool(parse_capped)
        rid = request_id(request)
        jobs = await run_in_threadpool(lambda: svc.make_jobs(parsed.prompts, parsed.negatives, parsed.seeds,
                                                             request_id=rid, images=parsed.images,
                                                             notes=parsed.notes, masks=parsed.masks,
                                                             **parsed.kwargs))
        p = jobs[0].params
        access = request.scope["state"]["access"]
        access.update(size=f"{p.width}x{p.height}", steps=p.steps, images=len(jobs))
        results = await svc.generate(jobs, disconnected=request.is_disconnected, kind=job)
        access.update(batch=max(r.batch_size for r in results),
                      queue_ms=f"{max(r.queue_seconds for r in results) * 1000:.1f}")
        parsed.kwargs.update(height=p.height, width=p.width, num_inference_steps=p.steps,
                             guidance_scale=p.guidance_scale)
        request.scope["state"]["parsed"] = parsed
        return results

    @staticmethod
    async def encode(results: list[Any]) -> list[str]:
        return await run_in_threadpool(lambda: [png_b64(r.image) for r in results])


def ctx(request: Request) -> AppContext:
    return request.app.state.ctx  # type: ignore[no-any-return]

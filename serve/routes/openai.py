"""OpenAI Images API routes: ``GET /v1/models``, ``POST /v1/images/generations``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request

from .. import openai_api
from ..common import ParsedRequest
from ..context import ctx
from ..schemas import ERRORS, OpenAIImagesRequest, OpenAIImagesResponse, OpenAIModels, body_doc
from ..service import ImageService
from . import new_router

router = new_router(tags=["openai"])


@router.get("/v1/models", response_model=OpenAIModels, responses=ERRORS)
async def list_models(request: Request) -> Any:
    c = ctx(request)
    started = int(getattr(request.app.state, "started", time.time()))
    return openai_api.models(c.config.model_ids, started)


@router.post("/v1/images/generations", response_model=OpenAIImagesResponse, responses=ERRORS,
             openapi_extra=body_doc(OpenAIImagesRequest))
async def images_generations(request: Request) -> Any:
    c = ctx(request)

    def parse(body: Any, svc: ImageService) -> ParsedRequest:
        return openai_api.parse(body, model_ids=c.config.model_ids,
                                has_refiner=bool(svc.pipe is not None and svc.pipe.has_refiner),
                                max_images=c.config.max_images_per_request)

    results = await c.generate(request, parse)
    return openai_api.response(await c.encode(results), [r.seed for r in results])

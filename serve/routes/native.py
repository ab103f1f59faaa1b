"""Native API route: ``POST /v1/generate`` (every runtime argument by its runtime name)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from .. import native_api
from ..common import ParsedRequest
from ..context import ctx
from ..http import request_id
from ..schemas import ERRORS, NativeRequest, NativeResponse, body_doc
from ..service import ImageService
from . import new_router

router = new_router(tags=["native"])


@router.post("/v1/generate", response_model=NativeResponse, responses=ERRORS, openapi_extra=body_doc(NativeRequest))
async def native_generate(request: Request) -> Any:
    c = ctx(request)

    def parse(body: Any, svc: ImageService) -> ParsedRequest:
        return native_api.parse(body, has_refiner=bool(svc.pipe is not None and svc.pipe.has_refiner),
                                max_images=c.config.max_images_per_request)

    results = await c.generate(request, parse)
    parsed: ParsedRequest = request.scope["state"]["parsed"]
    return {"request_id": request_id(request), "images": await c.encode(results),
            "seeds": [r.seed for r in results], "seed": results[0].seed, "parameters": parsed.kwargs,
            "notes": parsed.notes,
            "timings": [{"queue_ms": r.queue_seconds * 1000, "batch_size": r.batch_size,
                         "run_ms": r.run_seconds * 1000, "stages_ms": {k: sum(v) * 1000 for k, v in
                                                                      r.timings.get("stages", {}).items()}}
                        for r in results]}
